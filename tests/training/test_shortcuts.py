"""The caliper / burned-in text detector and inpainting, on synthetic marks over speckle."""

from __future__ import annotations

import json

import numpy as np
import pytest
from synthetic_scans import speckle_scan

from training.studies import shortcuts


def with_marks(seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """A speckle scan with two caliper crosses, a dotted line and a row of text-like glyphs."""
    image = speckle_scan(seed).copy()
    truth = np.zeros(image.shape, bool)
    for cy, cx in ((60, 100), (150, 220)):  # crosses, 11 px arms, 1 px wide
        truth[cy, cx - 5 : cx + 6] = True
        truth[cy - 5 : cy + 6, cx] = True
    for x in range(110, 210, 5):  # a dotted measurement line of 2 x 2 px dots
        truth[100:102, x : x + 2] = True
    for k in range(6):  # glyphs: small hollow boxes, as burned-in text
        x = 120 + 9 * k
        truth[180:187, x] = truth[180:187, x + 5] = True
        truth[180, x : x + 6] = truth[186, x : x + 6] = True
    image[truth] = 245
    return image, truth


def test_detector_finds_crosses_dotted_lines_and_text():
    image, truth = with_marks()
    found = shortcuts.detect_marks(image)
    recall = (found & truth).sum() / truth.sum()
    false_alarm = (found & ~truth).sum() / (~truth).sum()
    assert recall >= 0.9, recall
    assert false_alarm <= 0.01, false_alarm


def test_detector_finds_almost_nothing_on_a_clean_scan():
    for seed in range(5):
        assert shortcuts.detect_marks(speckle_scan(seed)).mean() < 0.002


def test_inpainting_replaces_the_marks_with_their_surroundings():
    image, truth = with_marks()
    clean = speckle_scan(3)
    filled = shortcuts.inpaint(image, shortcuts.detect_marks(image))
    # the marks were near-white; filled in, they are as grey as the tissue around them
    assert filled[truth].mean() < 0.5 * image[truth].mean()
    assert abs(float(filled[truth].mean()) - float(clean[truth].mean())) < 25
    untouched = ~shortcuts.detect_marks(image)
    np.testing.assert_array_equal(filled[untouched], image[untouched])


def test_control_mask_has_the_same_marks_elsewhere():
    _, truth = with_marks()
    moved = shortcuts.shifted_mask(truth, np.random.default_rng(0))
    assert moved.sum() == truth.sum()
    assert (moved & truth).sum() < truth.sum() / 2


def test_compare_counts_flips_and_probability_change():
    labels = np.array([0, 1, 2, 1])
    original = np.eye(3)[[0, 1, 2, 1]] * 0.9 + 0.1 / 3
    inpainted = original.copy()
    inpainted[3] = np.eye(3)[2] * 0.9 + 0.1 / 3  # one label flips to a wrong class
    result = shortcuts.compare(
        labels, np.array([False, False, True, True]), {"original": original, "inpainted": inpainted}
    )
    assert result["all"]["original"]["accuracy"] == 1.0
    assert result["all"]["inpainted"]["accuracy"] == 0.75
    assert result["all"]["inpainted"]["label_flips"] == 0.25
    assert result["with_marks"]["n"] == 2
    assert result["with_marks"]["inpainted"]["label_flips"] == 0.5
    assert result["with_marks"]["inpainted"]["mean_abs_probability_change"] > 0.4


def test_marks_on_the_lesion_edge_are_told_from_marks_in_the_margin():
    marks = np.zeros((64, 64), bool)
    marks[30:33, 20:23] = True  # a caliper cross just outside the lesion's edge
    marks[2:4, 40:60] = True  # text in the top margin
    lesion = np.zeros((64, 64), bool)
    lesion[24:40, 24:40] = True
    near, away = shortcuts.split_near_lesion(marks, lesion)
    assert near[31, 21] and not near[3, 50]
    assert away[3, 50] and not away[31, 21]
    assert (near | away).sum() == marks.sum() and not (near & away).any()
    near, away = shortcuts.split_near_lesion(marks, np.zeros_like(lesion))  # a normal scan
    assert not near.any() and (away == marks).all()


def test_accuracy_change_interval_resamples_groups_and_brackets_the_change():
    labels = np.array([0, 1, 2, 1, 0, 2])
    original = np.eye(3)[labels]
    changed = original.copy()
    changed[[1, 4]] = np.eye(3)[2]  # two of six now wrong: -1/3
    groups = np.array([0, 0, 1, 1, 2, 2])
    lo, hi = shortcuts.accuracy_change_interval(labels, original, changed, groups)
    assert lo <= -1 / 3 <= hi
    assert -1.0 <= lo < hi <= 0.0
    result = shortcuts.compare(
        labels, np.ones(6, bool), {"original": original, "changed": changed}, groups
    )
    assert result["all"]["changed"]["flips_from_to"][1][2] == 1
    assert result["all"]["changed"]["flips_from_to"][0][2] == 1
    assert result["all"]["changed"]["accuracy_change_ci95"] == [lo, hi]


@pytest.mark.slow
def test_shortcuts_command_compares_fold_models_on_their_held_out_images(tmp_path):
    import torch
    from synthetic_busi import write_busi_folder

    from training.__main__ import main as training_main
    from training.data import write_folds
    from training.joint import build_model, get_preset

    data = write_busi_folder(tmp_path / "busi", per_class=4)
    folds_file = tmp_path / "folds.json"
    write_folds(data, folds_file)
    cv_dir = tmp_path / "cv"
    cv_dir.mkdir()
    torch.manual_seed(0)
    # untrained smoke-recipe weights stand in for the five fold models
    model = build_model(get_preset("joint-smoke"), pretrained=False)
    torch.save(model.state_dict(), cv_dir / "fold0.pt")
    for fold in range(1, 5):
        (cv_dir / f"fold{fold}.pt").write_bytes((cv_dir / "fold0.pt").read_bytes())
    out = tmp_path / "report"
    argv = ["shortcuts", "--cv-dir", str(cv_dir), "--data-path", str(data), "--preset",
            "joint-smoke", "--folds-file", str(folds_file), "--output-dir", str(out),
            "--threads", "1"]  # fmt: skip
    assert training_main(argv) == 0
    report = json.loads((out / "shortcuts.json").read_text())
    assert report["n_images"] == 12
    assert report["all"]["n"] == 12
    for name in ("original", "inpainted", "control", "inpainted_near_lesion", "inpainted_away"):
        assert 0.0 <= report["all"][name]["accuracy"] <= 1.0
    assert 0.0 <= report["all"]["inpainted"]["label_flips"] <= 1.0
    assert set(report["mark_prevalence_by_class"]) == {"normal", "benign", "malignant"}
    for fold in range(1, 5):  # one fold model left: refused unless --partial, then scored alone
        (cv_dir / f"fold{fold}.pt").unlink()
    with pytest.raises(ValueError, match="cover"):
        training_main(argv)
    assert training_main([*argv, "--partial"]) == 0
    report = json.loads((out / "shortcuts.json").read_text())
    held_out = json.loads(folds_file.read_text())["items"].values()
    assert report["folds"] == [0]
    assert report["all"]["n"] == sum(item["fold"] == 0 for item in held_out) < 12


def test_shortcuts_command_without_fold_models_reports_mark_prevalence(tmp_path):
    from synthetic_busi import write_busi_folder

    from training.__main__ import main as training_main

    data = write_busi_folder(tmp_path / "busi", per_class=3)
    out = tmp_path / "report"
    argv = ["shortcuts", "--data-path", str(data), "--output-dir", str(out)]
    assert training_main(argv) == 0
    report = json.loads((out / "shortcuts.json").read_text())
    assert report["n_images"] == 9 and "all" not in report


def test_cleaned_copy_has_the_marks_inpainted_and_the_masks_unchanged(tmp_path):
    from PIL import Image
    from synthetic_busi import write_busi_folder

    from training.__main__ import main as training_main
    from training.data import load_image, scan_dataset

    data = write_busi_folder(tmp_path / "busi", per_class=2)
    sample = scan_dataset(data)[0]
    marked, _ = with_marks()
    Image.fromarray(marked).save(data / sample.key)
    cleaned = tmp_path / "cleaned"
    argv = ["shortcuts", "--data-path", str(data), "--output-dir", str(tmp_path / "r"),
            "--write-cleaned", str(cleaned)]  # fmt: skip
    assert training_main(argv) == 0
    copies = scan_dataset(cleaned)
    assert [s.key for s in copies] == [s.key for s in scan_dataset(data)]
    assert shortcuts.detect_marks(load_image(sample)).any()
    assert not shortcuts.detect_marks(load_image(copies[0])).any()
    for original in data.rglob("*_mask*.png"):
        copy = cleaned / original.relative_to(data)
        assert copy.read_bytes() == original.read_bytes()
