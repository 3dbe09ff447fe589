"""compare-cv's figures: rows that carry only a class half or only a mask half."""

from __future__ import annotations

import math

from training.metrics import diagnosis_figures, group_bootstrap


def _row(label, probs=None, dice=None, mask_pixels=0, group=0):
    return {"label": label, "probs": probs, "dice": dice, "mask_pixels": mask_pixels,
            "group": group}  # fmt: skip


def test_class_and_mask_halves_are_scored_on_their_own_rows():
    rows = [
        _row(0, probs=[0.8, 0.1, 0.1], dice=1.0, mask_pixels=5, group=0),  # normal, drawn
        _row(1, probs=[0.1, 0.8, 0.1], dice=0.6, mask_pixels=40, group=1),
        _row(2, probs=[0.1, 0.2, 0.7], group=2),  # classified only
        _row(1, dice=0.8, mask_pixels=30, group=3),  # segmented only
        _row(0, dice=1.0, mask_pixels=0, group=4),  # segmented only, nothing drawn
    ]
    figures = diagnosis_figures(rows)
    assert figures["accuracy"] == 1.0  # the three classified rows
    assert math.isclose(figures["lesion_dice"], 0.7)  # the two lesion rows with a mask
    assert figures["normal_with_lesion_segment"] == 0.5  # one of two normal masks drawn
    # /diagnose draws only when the class is not normal: the drawn normal was classed normal
    assert figures["normal_with_lesion_diagnose"] == 0.0


def test_a_recipe_without_a_classifier_has_no_class_figures():
    rows = [_row(1, dice=0.5, mask_pixels=9, group=g) for g in range(4)]
    figures = diagnosis_figures(rows)
    assert math.isnan(figures["accuracy"]) and math.isnan(figures["normal_with_lesion_diagnose"])
    assert figures["lesion_dice"] == 0.5
    interval = group_bootstrap(rows, 50)
    assert interval["lesion_dice"] == [0.5, 0.5] and "accuracy" not in interval
