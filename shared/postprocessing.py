"""Turn model outputs into findings: class probabilities, a full-size lesion mask, its geometry.

Used by the service and by the training jobs' evaluation, so reported metrics describe exactly
what the service returns.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from shared.labels import CLASS_NAMES


def softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable softmax over the last axis."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def class_probabilities(
    logits: np.ndarray, class_names: tuple[str, ...] = CLASS_NAMES
) -> dict[str, float]:
    """One image's logits (K,) -> {class name: probability}.

    Raises ValueError on a size mismatch.
    """
    if logits.shape != (len(class_names),):
        raise ValueError(f"expected {len(class_names)} logits, got shape {logits.shape}")
    probs = softmax(logits.astype(np.float64))
    return {name: float(p) for name, p in zip(class_names, probs, strict=True)}


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))


def probability_to_mask(
    probability: np.ndarray, threshold: float, height: int, width: int
) -> np.ndarray:
    """A (h, w) lesion probability map -> (height, width) uint8 mask of 0 / 255.

    The map is resized to the input image's size before thresholding, so the outline is as
    smooth as the bilinear interpolation allows rather than blocky at the model's resolution.
    """
    prob = Image.fromarray(probability.astype(np.float32), mode="F")
    prob = prob.resize((width, height), Image.Resampling.BILINEAR)
    return np.where(np.asarray(prob) > threshold, 255, 0).astype(np.uint8)


@dataclass(frozen=True)
class LesionGeometry:
    area_fraction: float
    bbox: tuple[int, int, int, int] | None  # x, y, width, height in input-image pixels


def lesion_geometry(mask: np.ndarray) -> LesionGeometry:
    """Area fraction and bounding box (x, y, width, height) of the nonzero pixels of a mask."""
    fg = mask > 0
    if not fg.any():
        return LesionGeometry(area_fraction=0.0, bbox=None)
    rows = np.flatnonzero(fg.any(axis=1))
    cols = np.flatnonzero(fg.any(axis=0))
    y0, y1 = int(rows[0]), int(rows[-1])
    x0, x1 = int(cols[0]), int(cols[-1])
    return LesionGeometry(area_fraction=float(fg.mean()), bbox=(x0, y0, x1 - x0 + 1, y1 - y0 + 1))


def dice_iou(pred: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    """Per-image Dice and IoU of two masks (nonzero = lesion). Both empty counts as 1.0."""
    p, t = pred > 0, target > 0
    inter = float(np.logical_and(p, t).sum())
    total = float(p.sum() + t.sum())
    union = float(np.logical_or(p, t).sum())
    if total == 0:
        return 1.0, 1.0
    return 2.0 * inter / total, inter / union
