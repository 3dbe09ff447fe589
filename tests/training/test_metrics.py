"""Metrics against values computed by hand."""

import math

import numpy as np
import pytest

from training.metrics import (
    bootstrap_ci,
    classification_metrics,
    confusion_matrix,
    precision_recall_f1,
    roc_auc,
    roc_curve,
)

NAMES = ("normal", "benign", "malignant")


def test_confusion_matrix_rows_are_truth_columns_predictions():
    m = confusion_matrix(np.array([0, 0, 1, 2, 2]), np.array([0, 1, 1, 2, 0]), 3)
    assert m.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]


def test_precision_recall_f1_by_hand():
    m = np.array([[1, 1, 0], [0, 1, 0], [1, 0, 1]])
    p, r, f = precision_recall_f1(m)
    # normal: tp 1, predicted 2, actual 2; benign: tp 1, predicted 2, actual 1;
    # malignant: tp 1, predicted 1, actual 2
    np.testing.assert_allclose(p, [0.5, 0.5, 1.0])
    np.testing.assert_allclose(r, [0.5, 1.0, 0.5])
    np.testing.assert_allclose(f, [0.5, 2 / 3, 2 / 3])


def test_precision_is_undefined_for_a_class_never_predicted():
    p, r, f = precision_recall_f1(np.array([[2, 0], [1, 0]]))
    assert math.isnan(p[1]) and r[1] == 0.0 and f[1] == 0.0


def test_auc_by_hand_with_a_tie():
    # positives 0.8, 0.4; negatives 0.4, 0.1. Pairs: (0.8>0.4) 1, (0.8>0.1) 1,
    # (0.4=0.4) 0.5, (0.4>0.1) 1 -> 3.5 / 4
    assert roc_auc(np.array([0.8, 0.4, 0.4, 0.1]), np.array([1, 1, 0, 0])) == pytest.approx(0.875)


def test_auc_perfect_inverted_and_undefined():
    assert roc_auc(np.array([0.9, 0.1]), np.array([1, 0])) == 1.0
    assert roc_auc(np.array([0.1, 0.9]), np.array([1, 0])) == 0.0
    assert math.isnan(roc_auc(np.array([0.1, 0.9]), np.array([1, 1])))


def test_auc_equals_the_area_under_the_roc_curve():
    rng = np.random.default_rng(1)
    scores = np.round(rng.random(200), 1)  # many ties
    labels = rng.random(200) < scores
    fpr, tpr = roc_curve(scores, labels)
    assert fpr[0] == 0 and tpr[-1] == 1 and fpr[-1] == 1
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc(scores, labels))


def test_classification_metrics_by_hand():
    y = np.array([0, 0, 1, 2, 2])
    probs = np.array(
        [[0.7, 0.2, 0.1], [0.3, 0.6, 0.1], [0.1, 0.8, 0.1], [0.1, 0.2, 0.7], [0.5, 0.1, 0.4]]
    )
    m = classification_metrics(y, probs, NAMES, n_resamples=0)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["macro_f1"] == pytest.approx((0.5 + 2 / 3 + 2 / 3) / 3)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]
    # malignant scores: positives 0.7, 0.4 vs negatives 0.1, 0.1, 0.1 -> 1.0
    assert m["per_class"]["malignant"]["auc"] == 1.0
    # normal scores: positives 0.7, 0.3 vs negatives 0.1, 0.1, 0.5 -> (3 + 2) / 6
    assert m["per_class"]["normal"]["auc"] == pytest.approx(5 / 6)
    assert m["per_class"]["malignant"]["recall"] == 0.5
    assert m["per_class"]["benign"]["support"] == 1


def test_bootstrap_interval_brackets_the_estimate_and_is_seeded():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 120)
    probs = rng.dirichlet([1, 1, 1], 120)
    probs[np.arange(120), y] += 0.5
    probs /= probs.sum(axis=1, keepdims=True)
    point = classification_metrics(y, probs, NAMES, n_resamples=0)["accuracy"]
    a = bootstrap_ci(y, probs, NAMES, n_resamples=300, seed=7)
    b = bootstrap_ci(y, probs, NAMES, n_resamples=300, seed=7)
    assert a == b
    low, high = a["accuracy"]
    assert low < point < high and high - low < 0.3
