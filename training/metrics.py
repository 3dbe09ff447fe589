"""Every figure the training jobs report, in plain NumPy (no scikit-learn), and the one bootstrap.

    classification  confusion matrix, per-class precision / recall / F1, one-vs-rest ROC AUC
                    (Mann-Whitney rank formula), ROC curves: `classification_metrics`
    segmentation    per-image Dice / IoU of the masks /segment would return, threshold and
                    minimum-area sweeps: `segmentation_metrics`
    diagnosis       the joint network's headline figures of per-image rows: `diagnosis_figures`
    intervals       `bootstrap_intervals`, THE percentile bootstrap: over images
                    (`bootstrap_ci`, `bootstrap_mean_ci`) or over groups of images
                    (`group_bootstrap`: near-duplicate groups, patients)

Conventions: `y_true` holds class indices (N,), `probs` class probabilities (N, K) in the order of
`class_names`; the confusion matrix has true classes as rows and predictions as columns. A metric
that is undefined (no positive or no negative examples, a class never predicted) is NaN, never a
made-up 0 or 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy.stats import rankdata

from shared.labels import CLASS_NAMES
from shared.postprocessing import dice_iou, probability_to_mask

Row = dict[str, Any]


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, K) int counts; rows are the true class, columns the predicted class."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(y_true, int), np.asarray(y_pred, int)), 1)
    return matrix


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def precision_recall_f1(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class precision, recall (sensitivity) and F1 from a confusion matrix.

    F1 is 0 when a class has examples but precision + recall is 0, NaN when the class has
    neither examples nor predictions.
    """
    tp = np.diag(matrix).astype(np.float64)
    predicted = matrix.sum(axis=0).astype(np.float64)
    actual = matrix.sum(axis=1).astype(np.float64)
    precision = _safe_div(tp, predicted)
    recall = _safe_div(tp, actual)
    f1 = _safe_div(2 * tp, predicted + actual)  # = 2PR / (P + R), defined whenever P or R is
    return precision, recall, f1


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of `scores` for the boolean labels `positive`.

    Mann-Whitney U / (n_pos * n_neg) with average ranks for ties, which equals the trapezoidal
    area under the empirical ROC curve. NaN if either class is absent.
    """
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)  # average ranks for ties
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def roc_curve(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates at every distinct threshold (from (0, 0) to (1, 1))."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    order = np.argsort(-scores, kind="mergesort")
    s, p = scores[order], positive[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    tps = np.cumsum(p)[last_of_tie]
    fps = np.cumsum(~p)[last_of_tie]
    tpr = np.r_[0.0, tps / max(p.sum(), 1)]
    fpr = np.r_[0.0, fps / max((~p).sum(), 1)]
    return fpr, tpr


def _scalars(y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str]) -> dict[str, float]:
    """The headline numbers of one sample of images (used for the point estimate and bootstrap)."""
    k = len(class_names)
    y_pred = probs.argmax(axis=1)
    matrix = confusion_matrix(y_true, y_pred, k)
    precision, recall, f1 = precision_recall_f1(matrix)
    aucs = np.array([roc_auc(probs[:, c], y_true == c) for c in range(k)])
    out = {
        "accuracy": float(np.trace(matrix) / max(matrix.sum(), 1)),
        "macro_f1": float(np.mean(f1)) if not np.isnan(f1).any() else float("nan"),
        "macro_auc": float(np.mean(aucs)) if not np.isnan(aucs).any() else float("nan"),
    }
    for c, name in enumerate(class_names):
        out[f"{name}_precision"] = float(precision[c])
        out[f"{name}_recall"] = float(recall[c])
        out[f"{name}_f1"] = float(f1[c])
        out[f"{name}_auc"] = float(aucs[c])
    return out


def bootstrap_intervals(
    n_units: int,
    figures: Callable[[np.ndarray], Mapping[str, float]],
    n_resamples: int,
    seed: int = 0,
    quantiles: tuple[float, float] = (0.025, 0.975),
) -> dict[str, list[float]]:
    """THE percentile bootstrap: `n_resamples` draws, each picking `n_units` unit indices with
    replacement (images, or groups of images), and the `quantiles` of each of `figures(picked)`
    over the draws. A draw where a figure is undefined (NaN) is left out for that figure; a figure
    undefined in every draw has no interval."""
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {}
    for _ in range(n_resamples):
        picked = rng.integers(0, n_units, size=n_units)
        for key, value in figures(picked).items():
            if not math.isnan(value):
                draws.setdefault(key, []).append(value)
    low, high = quantiles
    return {
        key: [float(np.quantile(v, low)), float(np.quantile(v, high))] for key, v in draws.items()
    }


def _level_quantiles(level: float) -> tuple[float, float]:
    alpha = (1.0 - level) / 2.0
    return alpha, 1.0 - alpha


def bootstrap_ci(
    y_true: np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    n_resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, list[float]]:
    """Percentile bootstrap intervals ([low, high]) of every scalar of `_scalars`, resampling
    images with replacement; [nan, nan] for a metric undefined in every resample."""
    point = _scalars(y_true, probs, class_names)
    intervals = bootstrap_intervals(
        len(y_true),
        lambda idx: _scalars(y_true[idx], probs[idx], class_names),
        n_resamples,
        seed,
        _level_quantiles(level),
    )
    return {key: intervals.get(key, [float("nan"), float("nan")]) for key in point}


def bootstrap_mean_ci(
    values: np.ndarray, n_resamples: int = 2000, seed: int = 0, level: float = 0.95
) -> list[float]:
    """Percentile bootstrap interval [low, high] of the mean of `values` (images resampled with
    replacement); [nan, nan] when there are no values."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return [float("nan"), float("nan")]
    intervals = bootstrap_intervals(
        values.size,
        lambda idx: {"mean": float(values[idx].mean())},
        n_resamples,
        seed,
        _level_quantiles(level),
    )
    return intervals["mean"]


def group_bootstrap(
    rows: list[Row],
    n_resamples: int = 1000,
    seed: int = 0,
    figures: Callable[[list[Row]], Mapping[str, float]] | None = None,
) -> dict[str, list[float]]:
    """95% percentile intervals of each of `figures(rows)` (default: `diagnosis_figures`),
    resampling the groups of rows (row["group"]: near-duplicate groups, patients) with
    replacement; a figure undefined in every draw has no interval."""
    figures = figures or diagnosis_figures
    by_group: dict[Any, list[Row]] = {}
    for row in rows:
        by_group.setdefault(row["group"], []).append(row)
    groups = list(by_group)
    return bootstrap_intervals(
        len(groups),
        lambda picked: figures([row for g in picked for row in by_group[groups[g]]]),
        n_resamples,
        seed,
    )


# The headline figures of the joint network, in the order the reports show them.
DIAGNOSIS_FIGURES = (
    "accuracy",
    "macro_f1",
    "macro_auc",
    "malignant_sensitivity",
    "lesion_dice",
    "normal_with_lesion_segment",
    "normal_with_lesion_diagnose",
)


def diagnosis_figures(rows: list[Row]) -> dict[str, float]:
    """The headline figures of per-image rows ("label", "probs": the class probabilities,
    "dice" and "mask_pixels": the lesion mask as served), as the service would score them.
    A row may lack its class half or its mask half (a separate classifier or segmenter): each
    figure is computed on the rows that carry what it needs; NaN where none does."""
    nan = float("nan")
    out = dict.fromkeys(DIAGNOSIS_FIGURES, nan)
    scored = [r for r in rows if r.get("probs") is not None]
    if scored:
        y = np.asarray([r["label"] for r in scored])
        scalars = _scalars(y, np.asarray([r["probs"] for r in scored]), CLASS_NAMES)
        out["accuracy"] = scalars["accuracy"]
        out["macro_f1"] = scalars["macro_f1"]
        out["macro_auc"] = scalars.get("macro_auc", nan)
        out["malignant_sensitivity"] = scalars["malignant_recall"]
    segmented = [r for r in rows if r.get("dice") is not None]
    lesion = [r["dice"] for r in segmented if r["label"] > 0]
    normal = [r for r in segmented if r["label"] == 0]
    if lesion:
        out["lesion_dice"] = float(np.mean(lesion))
    if normal:
        # /segment draws whatever the mask shows; /diagnose only when the class is not normal
        out["normal_with_lesion_segment"] = float(np.mean([r["mask_pixels"] > 0 for r in normal]))
        both = [r for r in normal if r.get("probs") is not None]
        if both:
            out["normal_with_lesion_diagnose"] = float(
                np.mean([r["mask_pixels"] > 0 and int(np.argmax(r["probs"])) > 0 for r in both])
            )
    return out


def classification_metrics(
    y_true: np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    n_resamples: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Every reported number for one split, JSON-ready (NaN becomes None).

    Keys: n, accuracy, macro_f1, macro_auc, per_class {name: precision, recall, f1, auc, support},
    confusion_matrix (rows true, columns predicted), ci95 {metric: [low, high]}, bootstrap.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    k = len(class_names)
    point = _scalars(y_true, probs, class_names)
    matrix = confusion_matrix(y_true, probs.argmax(axis=1), k)
    result: dict[str, Any] = {
        "n": int(len(y_true)),
        "accuracy": point["accuracy"],
        "macro_f1": point["macro_f1"],
        "macro_auc": point["macro_auc"],
        "per_class": {
            name: {
                "precision": point[f"{name}_precision"],
                "recall": point[f"{name}_recall"],
                "f1": point[f"{name}_f1"],
                "auc": point[f"{name}_auc"],
                "support": int(matrix[c].sum()),
            }
            for c, name in enumerate(class_names)
        },
        "confusion_matrix": matrix.tolist(),
        "class_names": list(class_names),
    }
    if n_resamples > 0:
        result["ci95"] = bootstrap_ci(y_true, probs, class_names, n_resamples, seed)
        result["bootstrap"] = {"resamples": n_resamples, "seed": seed, "method": "percentile"}
    return _json_ready(result)


def _json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    if isinstance(value, float) and np.isnan(value):
        return None
    return value


# --- segmentation: the masks /segment would return ---------------------------------------------
# Every number starts from the model's low-resolution logits, goes through
# shared.postprocessing.sigmoid and probability_to_mask (the probability map resized to the
# image's own size, then thresholded) and is scored with dice_iou against the full-size truth, so
# a reported Dice is the Dice of what /segment would return.

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


def segmentation_metrics(
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
