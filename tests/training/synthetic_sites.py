"""A synthetic second site in BUS-BRA's layout (lesions only, patients and scanners in
bus_data.csv), for the multi-site tests that must pass without the real folders."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

DEVICES = ("GE Logiq 5 @8-12MHz", "GE Logiq 7 @10-14MHz", "Toshiba Aplio 300")


def write_busbra_folder(root: Path, patients: int = 9, seed: int = 1) -> Path:
    """`patients` patients with one or two views each; benign / malignant by patient; a lesion
    in every image, masks as BUS-BRA ships them; scanners taken in turn."""
    rng = np.random.default_rng(seed)
    rows = []
    for case in range(1, patients + 1):
        label = "malignant" if case % 3 == 0 else "benign"
        device = DEVICES[case % len(DEVICES)]
        for side in ("l", "r") if case % 2 else ("s",):
            h, w = int(rng.integers(70, 110)), int(rng.integers(60, 100))
            image = rng.normal(110, 25, size=(h, w))
            yy, xx = np.mgrid[:h, :w]
            cy, cx = h // 2 + int(rng.integers(-5, 5)), w // 2 + int(rng.integers(-5, 5))
            inside = ((yy - cy) / (h / 7)) ** 2 + ((xx - cx) / (w / 6)) ** 2 <= 1
            image[inside] += 90 if label == "benign" else -80
            image += 20 * np.cos(np.arange(h) / (2 + case))[:, None]
            ident = f"bus_{case:04d}-{side}"
            folder = root / label
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(folder / f"{ident}.png")
            Image.fromarray(np.where(inside, 255, 0).astype(np.uint8)).save(
                folder / f"{ident}_mask.png"
            )
            rows.append(
                {
                    "ID": ident,
                    "Case": case,
                    "Histology": "synthetic",
                    "Pathology": label,
                    "BIRADS": 4,
                    "Device": device,
                    "Width": w,
                    "Height": h,
                    "Side": side,
                    "BBOX": "[0,0,1,1]",
                }
            )
    with (root / "bus_data.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root
