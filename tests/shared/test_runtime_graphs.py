"""Runtime variants by graph and precision: the file each ships in, read and round-tripped, and
the quality check on the model's features (shared.quality.FeatureOodDetector)."""

from __future__ import annotations

import numpy as np
import pytest
from test_manifest import manifest_dict, runtime_entry

from shared.manifest import Manifest, ManifestError
from shared.quality import FEATURE_REASON, FeatureOodDetector, feature_quality
from shared.variants import GRAPH_CLASSIFY, runtime_file_name


@pytest.mark.parametrize(
    ("graph", "precision", "name"),
    [
        ("full", "fp32", "model.onnx"),
        ("classify", "fp32", "classify.onnx"),
        ("full", "int8", "model.int8.onnx"),
        ("classify", "int8", "classify.int8.onnx"),
    ],
)
def test_each_graph_and_precision_ships_in_its_own_file(graph, precision, name):
    assert runtime_file_name("onnxruntime", graph, precision) == name


def test_unknown_graphs_and_precisions_have_no_file():
    with pytest.raises(ValueError):
        runtime_file_name("onnxruntime", "decoder")
    with pytest.raises(ValueError):
        runtime_file_name("onnxruntime", "full", "fp16")


def test_a_classify_graph_entry_reads_beside_the_full_one_and_round_trips():
    classify = runtime_entry(graph="classify", file="classify.onnx", outputs=["classes", "quality"])
    manifest = Manifest.from_dict(manifest_dict(runtimes=[runtime_entry(), classify]))
    full = manifest.runtime("onnxruntime")
    cut = manifest.runtime("onnxruntime", GRAPH_CLASSIFY)
    assert full is not None and full.graph == "full" and full.file == "model.onnx"
    assert cut is not None and cut.file == "classify.onnx"
    assert cut.outputs == ("classes", "quality")
    assert manifest.runtime("onnxruntime", GRAPH_CLASSIFY, "int8") is None
    assert Manifest.from_dict(manifest.to_dict()) == manifest
    assert "graph" not in manifest.to_dict()["runtimes"][0]  # a full graph's entry is as before


def test_the_same_graph_and_precision_listed_twice_is_refused():
    classify = runtime_entry(graph="classify", file="classify.onnx")
    with pytest.raises(ManifestError, match="listed twice"):
        Manifest.from_dict(manifest_dict(runtimes=[classify, dict(classify)]))


def blobs(rng: np.random.Generator, n: int, centre: float, d: int = 8) -> np.ndarray:
    return rng.normal(centre, 1.0, (n, d))


def test_the_feature_check_flags_what_lies_away_from_the_training_features():
    rng = np.random.default_rng(0)
    train = blobs(rng, 400, 0.0)
    detector = FeatureOodDetector.fit(train)
    near, far = blobs(rng, 200, 0.0), blobs(rng, 50, 6.0)
    assert (detector.scores(near) > 1).mean() < 0.05
    assert (detector.scores(far) > 1).all()
    z = (far - detector.mean) @ detector.whiten
    assert np.allclose(detector.distances(far), np.sqrt((z * z).sum(1)))


def test_the_out_of_fold_threshold_keeps_a_small_site_from_being_flagged_more():
    rng = np.random.default_rng(1)
    big, small = blobs(rng, 600, 0.0, d=20), rng.normal(0.0, 1.6, (120, 20))
    features = np.concatenate([big, small])
    sites = np.array(["big"] * 600 + ["small"] * 120)
    folds = rng.integers(0, 5, len(features))
    pooled = FeatureOodDetector.fit(features)  # in-sample quantile over both sites
    per_site = FeatureOodDetector.fit(features, folds, sites)
    new_small = rng.normal(0.0, 1.6, (400, 20))
    assert (pooled.scores(new_small) > 1).mean() > 0.05
    assert (per_site.scores(new_small) > 1).mean() < 0.03
    assert per_site.threshold > pooled.threshold


def test_a_features_score_becomes_the_verdict():
    assert feature_quality(0.4) == feature_quality(0.4)
    assert feature_quality(0.4).in_distribution and feature_quality(0.4).reasons == ()
    flagged = feature_quality(2.5)
    assert not flagged.in_distribution and flagged.score == 2.5
    assert flagged.reasons == (FEATURE_REASON,)
    assert feature_quality(float("nan")).in_distribution is False


def test_fit_refuses_too_few_or_non_finite_features():
    with pytest.raises(ValueError):
        FeatureOodDetector.fit(np.zeros((1, 4)))
    with pytest.raises(ValueError):
        FeatureOodDetector.fit(np.full((10, 4), np.nan))
