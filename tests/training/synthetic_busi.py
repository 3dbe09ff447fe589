"""A synthetic data folder in BUSI's layout, for training tests that must pass without BUSI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from shared.labels import CLASS_NAMES


def write_busi_folder(root: Path, per_class: int = 8, seed: int = 0) -> Path:
    """Speckled grey scans; lesion classes get a bright (benign) or dark (malignant) ellipse."""
    rng = np.random.default_rng(seed)
    for name in CLASS_NAMES:
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            h, w = int(rng.integers(60, 90)), int(rng.integers(70, 100))
            image = rng.normal(90, 20, size=(h, w))
            mask = np.zeros((h, w), dtype=np.uint8)
            if name != "normal":
                yy, xx = np.mgrid[:h, :w]
                cy, cx = rng.integers(h // 3, 2 * h // 3), rng.integers(w // 3, 2 * w // 3)
                inside = ((yy - cy) / (h / 6)) ** 2 + ((xx - cx) / (w / 5)) ** 2 <= 1
                image[inside] += 100 if name == "benign" else -70
                mask[inside] = 255
            # a different texture per image keeps the near-duplicate grouping from merging them
            image += rng.uniform(-30, 30) + 25 * np.sin(np.arange(w) / (2 + i))[None, :]
            stem = f"{name} ({i + 1})"
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(folder / f"{stem}.png")
            Image.fromarray(mask).save(folder / f"{stem}_mask.png")
    return root
