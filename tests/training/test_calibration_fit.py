"""Calibration fitting and its cross-fitted report, on synthetic out-of-fold logits."""

from __future__ import annotations

import json

import numpy as np
import pytest

from shared.calibration import Calibration
from shared.postprocessing import softmax
from training.__main__ import main as training_main
from training.studies import calibration


def overconfident_rows(n: int = 600, temperature: float = 2.5, seed: int = 0) -> list[dict]:
    """Labels drawn from softmax(z); the "model" reports z * temperature (over-confident)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.2, (n, 3))
    z[:, 1] += 0.8  # benign the most common class, as in BUSI
    labels = np.array([rng.choice(3, p=p) for p in softmax(z)])
    logits = z * temperature
    return [
        {"key": f"k{i}", "label": int(labels[i]), "fold": i % 5, "group": i,
         "logits": logits[i].tolist()}
        for i in range(n)
    ]  # fmt: skip


def test_ece_of_a_perfectly_calibrated_bin_is_zero_and_of_a_wrong_one_is_the_gap():
    confidence = np.full(10, 0.7)
    assert calibration.ece(confidence, np.array([1] * 7 + [0] * 3)) == pytest.approx(0.0)
    assert calibration.ece(confidence, np.zeros(10)) == pytest.approx(0.7)


def test_temperature_fit_recovers_the_overconfidence():
    rows = overconfident_rows(n=3000)
    logits = np.array([r["logits"] for r in rows])
    labels = np.array([r["label"] for r in rows])
    fitted = calibration.fit_temperature(logits, labels)
    assert fitted.temperature == pytest.approx(2.5, rel=0.15)


def test_cross_fitted_calibration_lowers_ece_brier_and_nll():
    report = calibration.calibrate(overconfident_rows())
    before, after = report["before"], report["after_crossfitted"]
    assert after["ece"] < before["ece"] / 2
    assert after["brier"] < before["brier"]
    assert after["nll"] < before["nll"]
    assert set(after["per_class"]) == {"normal", "benign", "malignant"}
    # a pure temperature problem: vector scaling must not "clearly help"
    assert report["method"] == "temperature"
    # temperature scaling keeps every label
    assert after["accuracy"] == pytest.approx(before["accuracy"])


def test_vector_scaling_is_chosen_when_the_classes_are_miscalibrated_differently():
    rows = overconfident_rows(n=1500)
    for row in rows:  # a bias towards "normal" that one temperature cannot undo
        row["logits"][0] += 3.0
    report = calibration.calibrate(rows)
    assert report["method"] == "vector"
    assert report["after_crossfitted"]["accuracy"] > report["before"]["accuracy"]


def test_abstain_band_gives_about_the_target_coverage_and_better_accuracy():
    report = calibration.calibrate(overconfident_rows())
    abstain = report["abstain"]
    assert abstain["crossfitted_coverage"] == pytest.approx(0.90, abs=0.04)
    assert abstain["crossfitted_accuracy_answered"] > abstain["accuracy_all"]
    assert abstain["accuracy_abstained"] < abstain["accuracy_all"]


@pytest.mark.slow
def test_calibrate_command_writes_the_report_and_valid_manifest_fields(tmp_path):
    oof = tmp_path / "oof_logits.json"
    oof.write_text(json.dumps({"rows": overconfident_rows()}))
    out = tmp_path / "report"
    assert training_main(["calibrate", "--oof", str(oof), "--output-dir", str(out)]) == 0
    for name in (
        "calibration.json",
        "manifest.json",
        "report.md",
        "reliability.png",
        "coverage.png",
    ):
        assert (out / name).stat().st_size > 0, name
    fields = calibration.manifest_fields(out / "manifest.json")
    parsed = Calibration.from_manifest(fields, 3)
    assert parsed.calibrated and parsed.temperature > 1.5
    assert 0.34 < parsed.uncertain_below < 1.0
    saved = json.loads((out / "calibration.json").read_text())
    assert saved["command"].startswith("python -m training calibrate --oof")
