"""Segmentation metrics computed the way the service returns masks.

Every number starts from the model's low-resolution logits, goes through
shared.postprocessing.sigmoid and probability_to_mask (resize the probability map to the image's
own size, then threshold) and is scored with shared.postprocessing.dice_iou against the
full-size ground-truth mask, so a reported Dice is the Dice of what /segment would return.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from shared.postprocessing import dice_iou, probability_to_mask

DEFAULT_THRESHOLDS: tuple[float, ...] = tuple(round(t, 2) for t in np.arange(0.05, 0.96, 0.05))


def score_masks(
    probabilities: Sequence[np.ndarray], masks: Sequence[np.ndarray], threshold: float
) -> dict[str, np.ndarray]:
    """Per-image dice, iou and `any_lesion` (the predicted mask has a nonzero pixel) at
    `threshold`; `probabilities` are model-size maps, `masks` the full-size 0/255 truths."""
    dice, iou, any_lesion = [], [], []
    for prob, mask in zip(probabilities, masks, strict=True):
        pred = probability_to_mask(prob, threshold, mask.shape[0], mask.shape[1])
        d, i = dice_iou(pred, mask)
        dice.append(d)
        iou.append(i)
        any_lesion.append(bool(pred.any()))
    return {
        "dice": np.asarray(dice, dtype=np.float64),
        "iou": np.asarray(iou, dtype=np.float64),
        "any_lesion": np.asarray(any_lesion, dtype=bool),
    }


def bootstrap_mean_ci(
    values: np.ndarray, n_resamples: int = 2000, seed: int = 0, level: float = 0.95
) -> list[float]:
    """Percentile bootstrap interval [low, high] of the mean of `values` (images resampled with
    replacement); [nan, nan] when there are no values."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(n_resamples, values.size))].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    return [float(np.quantile(means, alpha)), float(np.quantile(means, 1.0 - alpha))]


def selection_score(scores: dict[str, np.ndarray]) -> float:
    """Mean per-image Dice over every image, lesion and normal alike.

    dice_iou scores an image with an empty truth 1 when nothing is predicted and 0 otherwise, so
    this single number rewards lesion overlap and penalises false positives on normal scans.
    """
    return float(scores["dice"].mean()) if scores["dice"].size else float("nan")


def threshold_sweep(
    probabilities: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
) -> list[dict[str, float]]:
    """For each threshold: mean Dice and IoU over lesion images, the share of normal images
    (empty truth) given any lesion, and the selection score over all images."""
    is_lesion = np.array([mask.any() for mask in masks], dtype=bool)
    rows = []
    for t in thresholds:
        s = score_masks(probabilities, masks, float(t))
        rows.append(
            {
                "threshold": float(t),
                "lesion_dice": _mean(s["dice"][is_lesion]),
                "lesion_iou": _mean(s["iou"][is_lesion]),
                "normal_with_lesion": _mean(s["any_lesion"][~is_lesion].astype(np.float64)),
                "all_dice": selection_score(s),
            }
        )
    return rows


def best_threshold(sweep: list[dict[str, float]], key: str) -> float:
    """The threshold whose `key` is highest (the lowest such threshold on ties)."""
    values = [row[key] for row in sweep]
    return float(sweep[int(np.nanargmax(values))]["threshold"])


def summarise(
    scores: dict[str, np.ndarray],
    class_names: Sequence[str],
    n_resamples: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """The reported numbers of one split at one threshold, with 95% bootstrap intervals.

    Lesion images are those whose class is not "normal" (`class_names` per image).
    """
    names = np.asarray(class_names)
    lesion = names != "normal"
    normal = ~lesion
    out: dict[str, Any] = {
        "n_lesion_images": int(lesion.sum()),
        "n_normal_images": int(normal.sum()),
        "lesion_dice": _mean(scores["dice"][lesion]),
        "lesion_dice_ci95": bootstrap_mean_ci(scores["dice"][lesion], n_resamples, seed),
        "lesion_iou": _mean(scores["iou"][lesion]),
        "lesion_iou_ci95": bootstrap_mean_ci(scores["iou"][lesion], n_resamples, seed),
        "lesion_dice_median": _median(scores["dice"][lesion]),
        "lesion_missed": int((~scores["any_lesion"][lesion]).sum()),
        "normal_with_lesion": _mean(scores["any_lesion"][normal].astype(np.float64)),
        "normal_with_lesion_ci95": bootstrap_mean_ci(
            scores["any_lesion"][normal].astype(np.float64), n_resamples, seed
        ),
        "normal_with_lesion_count": int(scores["any_lesion"][normal].sum()),
        "per_class": {},
    }
    for name in sorted(set(names[lesion].tolist())):
        pick = names == name
        out["per_class"][name] = {
            "n": int(pick.sum()),
            "dice": _mean(scores["dice"][pick]),
            "dice_ci95": bootstrap_mean_ci(scores["dice"][pick], n_resamples, seed),
            "iou": _mean(scores["iou"][pick]),
        }
    out["bootstrap"] = {"resamples": n_resamples, "seed": seed, "method": "percentile, images"}
    return out


def _mean(values: np.ndarray) -> float:
    return float(np.mean(values)) if values.size else float("nan")


def _median(values: np.ndarray) -> float:
    return float(np.median(values)) if values.size else float("nan")


DEFAULT_MIN_AREAS: tuple[float, ...] = (0.0, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02)


def min_area_sweep(
    probabilities: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    threshold: float,
    min_areas: Sequence[float] = DEFAULT_MIN_AREAS,
) -> list[dict[str, float]]:
    """What a "no lesion unless the mask covers at least `a` of the image" rule would do.

    For each candidate `a` (a fraction of the image's pixels, as lesion_geometry reports it),
    masks covering less are emptied; returns the same columns as threshold_sweep. Analysis
    only: the service applies such a rule only if shared.postprocessing does.
    """
    is_lesion = np.array([mask.any() for mask in masks], dtype=bool)
    preds = [
        probability_to_mask(p, threshold, m.shape[0], m.shape[1])
        for p, m in zip(probabilities, masks, strict=True)
    ]
    fractions = np.array([float((pred > 0).mean()) for pred in preds])
    rows = []
    for a in min_areas:
        dice, iou, any_lesion = [], [], []
        for pred, mask, fraction in zip(preds, masks, fractions, strict=True):
            kept = pred if fraction >= a else np.zeros_like(pred)
            d, i = dice_iou(kept, mask)
            dice.append(d)
            iou.append(i)
            any_lesion.append(bool(kept.any()))
        dice_a, iou_a, any_a = np.array(dice), np.array(iou), np.array(any_lesion, dtype=float)
        rows.append(
            {
                "min_area": float(a),
                "lesion_dice": _mean(dice_a[is_lesion]),
                "lesion_iou": _mean(iou_a[is_lesion]),
                "normal_with_lesion": _mean(any_a[~is_lesion]),
                "all_dice": _mean(dice_a),
            }
        )
    return rows
