"""Synthetic images for the quality checks: ultrasound-like speckle scans and obvious outsiders.

A "scan" is a B-mode-like frame: Rayleigh speckle smoothed to a grain of a few pixels, brighter
near the skin and fading with depth, a dark elliptical "lesion", inside a trapezoid sector with
black margins. Each seed gives another scan, so a detector can be fitted on a few dozen of them.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def speckle_scan(seed: int, height: int = 240, width: int = 320) -> np.ndarray:
    rng = np.random.default_rng(seed)
    speckle = rng.rayleigh(1.0, (height, width))
    speckle = ndimage.gaussian_filter(speckle, sigma=rng.uniform(0.8, 1.4))
    depth = np.linspace(1.0, rng.uniform(0.35, 0.6), height)[:, None]
    tissue = speckle * depth * rng.uniform(70, 100)
    yy, xx = np.mgrid[0:height, 0:width]
    cy, cx = rng.uniform(0.35, 0.65) * height, rng.uniform(0.3, 0.7) * width
    ry, rx = rng.uniform(0.08, 0.18) * height, rng.uniform(0.08, 0.2) * width
    lesion = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
    tissue[lesion] *= rng.uniform(0.15, 0.4)
    tissue[: height // 20] *= 1.8  # the bright skin line
    inset = (yy / height) * width * 0.12  # a sector that widens with depth: black margins
    sector = (xx > width * 0.14 - inset) & (xx < width * 0.86 + inset)
    return np.clip(tissue * sector, 0, 255).astype(np.uint8)


def outsiders(height: int = 240, width: int = 320) -> dict[str, np.ndarray]:
    """Images no scanner produces: blank, noise, gradients, a checkerboard."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width]
    images = {
        "black": np.zeros((height, width)),
        "white": np.full((height, width), 255.0),
        "uniform-noise": rng.integers(0, 256, (height, width)),
        "gradient": 255.0 * xx / (width - 1),
        "checkerboard": 255.0 * (((yy // 20) + (xx // 20)) % 2),
    }
    return {name: np.asarray(a).astype(np.uint8) for name, a in images.items()}
