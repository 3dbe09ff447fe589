"""The calibration an artifact declares: applied to logits, read from and written to a manifest."""

from __future__ import annotations

import numpy as np
import pytest

from shared.calibration import Calibration
from shared.errors import ArtifactIntegrityError
from shared.postprocessing import softmax


def test_absent_keys_mean_uncalibrated_identity():
    calibration = Calibration.from_manifest({"type": "logits", "shape": [3]}, 3)
    logits = np.array([2.0, -1.0, 0.5])
    assert not calibration.calibrated and calibration.method == "none"
    np.testing.assert_array_equal(calibration.apply(logits), logits)


def test_temperature_softens_without_changing_the_label():
    calibration = Calibration.from_manifest({"calibrated": True, "temperature": 2.0}, 3)
    logits = np.array([3.0, 1.0, -2.0])
    raw, calibrated = softmax(logits), softmax(calibration.apply(logits))
    assert calibration.method == "temperature"
    assert calibrated.argmax() == raw.argmax()
    assert calibrated.max() < raw.max()
    np.testing.assert_allclose(calibrated, softmax(logits / 2.0))


def test_vector_scaling_applies_per_class_factor_and_bias():
    spec = {"calibrated": True, "logit_scale": [1.0, 0.5, 2.0], "logit_bias": [0.0, 1.0, -1.0]}
    calibration = Calibration.from_manifest(spec, 3)
    assert calibration.method == "vector"
    np.testing.assert_allclose(calibration.apply(np.array([[1.0, 2.0, 3.0]])), [[1.0, 2.0, 5.0]])


def test_manifest_round_trip():
    calibration = Calibration(
        temperature=1.7, scale=(1.0, 0.9, 1.1), bias=(0.1, 0.0, -0.1), calibrated=True,
        uncertain_below=0.55,
    )  # fmt: skip
    assert Calibration.from_manifest(calibration.to_manifest(), 3) == calibration


@pytest.mark.parametrize(
    "spec",
    [
        {"temperature": 0},
        {"temperature": -1.5},
        {"temperature": float("nan")},
        {"temperature": "2"},
        {"logit_scale": [1.0, 1.0]},
        {"logit_scale": [1.0, 1.0, 1.0], "logit_bias": [0.0, 0.0]},
        {"uncertain_below": 1.5},
        {"calibrated": "yes"},
    ],
)
def test_malformed_calibration_is_an_integrity_error(spec):
    with pytest.raises(ArtifactIntegrityError):
        Calibration.from_manifest(spec, 3)
