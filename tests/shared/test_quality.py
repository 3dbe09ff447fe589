"""The image-statistics out-of-distribution check, fitted on synthetic scans and as shipped."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from synthetic_scans import outsiders, speckle_scan

from shared.decoding import decode_image
from shared.quality import (
    DEFAULT_DETECTOR_FILE,
    FEATURE_NAMES,
    OodDetector,
    image_statistics,
    load_detector,
)

REPO = Path(__file__).resolve().parents[2]
BUSI = Path(os.environ.get("BUSI_DATA", REPO.parent / "shared" / "data" / "busi"))


@pytest.fixture(scope="module")
def synthetic_detector() -> OodDetector:
    features = np.stack([image_statistics(speckle_scan(seed)) for seed in range(40)])
    return OodDetector.fit(features, quantile=0.995)


def test_statistics_are_finite_for_every_kind_of_frame():
    frames = [speckle_scan(0), *outsiders().values(), np.zeros((8, 8), np.uint8)]
    for frame in frames:
        features = image_statistics(frame)
        assert features.shape == (len(FEATURE_NAMES),)
        assert np.isfinite(features).all()


def test_held_out_synthetic_scans_pass_and_outsiders_are_flagged_with_reasons(
    synthetic_detector,
):
    passed = [synthetic_detector.assess(speckle_scan(seed)) for seed in range(100, 120)]
    assert sum(q.in_distribution for q in passed) >= 18
    assert all(q.reasons == () for q in passed if q.in_distribution)
    for name, image in outsiders().items():
        quality = synthetic_detector.assess(image)
        assert not quality.in_distribution, name
        assert quality.score > 1.0 and quality.reasons, name


def test_detector_file_round_trip(tmp_path, synthetic_detector):
    path = tmp_path / "detector.json"
    synthetic_detector.save(path)
    loaded = load_detector(path)
    image = speckle_scan(7)
    assert loaded.assess(image) == synthetic_detector.assess(image)


def test_detector_file_of_other_statistics_is_refused(tmp_path, synthetic_detector):
    data = synthetic_detector.to_json()
    data["feature_names"] = data["feature_names"][:-1]
    with pytest.raises(ValueError, match="other image statistics"):
        OodDetector.from_json(data)


def test_fit_needs_more_frames_than_statistics():
    with pytest.raises(ValueError, match="at least"):
        OodDetector.fit(np.zeros((3, len(FEATURE_NAMES))))


def test_shipped_detector_flags_blank_noise_gradient_and_pattern_images():
    detector = load_detector(DEFAULT_DETECTOR_FILE)
    for name, image in outsiders().items():
        assert not detector.assess(image).in_distribution, name


@pytest.mark.busi
def test_shipped_detector_passes_busi_scans_also_as_4to3_exports():
    if not BUSI.is_dir():
        pytest.skip(f"BUSI data folder not found at {BUSI}")
    from training.studies.ood import as_wide_export

    detector = load_detector(DEFAULT_DETECTOR_FILE)
    paths = sorted(BUSI.glob("*/*).png"))[::10]  # every 10th image, masks excluded
    frames = [decode_image(p.read_bytes()).pixels for p in paths]
    plain = np.mean([detector.assess(f).in_distribution for f in frames])
    wide = np.mean([detector.assess(as_wide_export(f)).in_distribution for f in frames])
    # fitted on these images at its 99.5th percentile: nearly all pass
    assert plain >= 0.97 and wide >= 0.95, (plain, wide)
