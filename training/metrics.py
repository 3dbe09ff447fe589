"""Classification metrics in plain NumPy (no scikit-learn): confusion matrix, per-class precision /
recall / F1, one-vs-rest ROC AUC (Mann-Whitney rank formula), ROC curves, and percentile bootstrap
confidence intervals over images.

Conventions: `y_true` holds class indices (N,), `probs` class probabilities (N, K) in the order of
`class_names`; the confusion matrix has true classes as rows and predictions as columns. A metric
that is undefined (no positive or no negative examples, a class never predicted) is NaN, never a
made-up 0 or 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.stats import rankdata


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


def bootstrap_ci(
    y_true: np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    n_resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, list[float]]:
    """Percentile bootstrap intervals ([low, high]) of every scalar of `_scalars`, resampling
    images with replacement. Resamples where a metric is undefined are left out for that metric.
    """
    rng = np.random.default_rng(seed)
    n = len(y_true)
    draws: dict[str, list[float]] = {}
    for _ in range(n_resamples):
        idx = rng.integers(0, n, size=n)
        for key, value in _scalars(y_true[idx], probs[idx], class_names).items():
            draws.setdefault(key, []).append(value)
    alpha = (1.0 - level) / 2.0
    out = {}
    for key, values in draws.items():
        arr = np.asarray(values)
        arr = arr[~np.isnan(arr)]
        if arr.size == 0:
            out[key] = [float("nan"), float("nan")]
        else:
            out[key] = [float(np.quantile(arr, alpha)), float(np.quantile(arr, 1.0 - alpha))]
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
