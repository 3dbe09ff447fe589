"""The OOD evaluation set (no downloads) and the per-fold evaluation."""

from __future__ import annotations

import numpy as np
import pytest
from synthetic_scans import speckle_scan

from shared.quality import image_statistics
from training.studies import ood


def test_auroc_counts_pairs_and_ties():
    assert ood.auroc(np.array([0.1, 0.2]), np.array([0.3, 0.4])) == 1.0
    assert ood.auroc(np.array([0.5]), np.array([0.5])) == 0.5
    assert ood.auroc(np.array([0.9]), np.array([0.1])) == 0.0


def test_synthetic_outsiders_decode_like_uploads():
    images = ood.synthetic_images()
    assert len(images) == 30
    assert all(s.pixels.dtype == np.uint8 and s.pixels.ndim == 2 for s in images)


def test_bundled_sample_images_are_found_without_a_download():
    pytest.importorskip("skimage")
    photos = ood.skimage_images()
    dicoms = ood.pydicom_images()
    assert len(photos) >= 20
    assert len(dicoms) >= 20  # CT, MR, RT dose, colour test images; no US among them


def test_per_fold_evaluation_separates_scans_from_outsiders():
    scans = np.stack([image_statistics(speckle_scan(seed)) for seed in range(60)])
    folds = np.arange(60) % 3
    outsiders = np.stack([image_statistics(s.pixels) for s in ood.synthetic_images()])
    wide = np.stack([image_statistics(ood.as_wide_export(speckle_scan(s))) for s in range(60)])
    result = ood.evaluate(scans, folds, outsiders, ["synthetic"] * len(outsiders), wide)
    assert result["auroc_mean_over_folds"] > 0.98
    assert result["busi_flagged"] <= 0.2  # 40 fitting scans per fold: a rough threshold
    assert result["busi_as_4to3_export_flagged"] <= 0.3
    assert result["ood_by_source"]["synthetic"]["detected"] > 0.9
    assert [f["fold"] for f in result["per_fold"]] == [0, 1, 2]
