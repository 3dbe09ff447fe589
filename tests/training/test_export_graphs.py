"""The graphs export-onnx ships: the classify-only graph gives the full graph's class logits,
both compute the quality check on the encoder's pooled features, and the check's evaluation."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnxruntime as ort
import pytest
import torch
from test_export_onnx import _export, world  # noqa: F401 (the module-scoped fixture)

from shared.labels import TASK_DIAGNOSIS
from shared.quality import FeatureOodDetector
from shared.store import verify_artifact
from shared.variants import GRAPH_CLASSIFY, RUNTIME_ONNX
from training import export_onnx, joint
from training.studies.ood import evaluate_feature_check

PRESET = joint.get_preset("joint-smoke")


@pytest.fixture(scope="module")
def served() -> torch.nn.Module:
    torch.manual_seed(0)
    return export_onnx.eager_network(PRESET, joint.build_model(PRESET, False).state_dict())


def test_the_classify_graph_and_the_quality_score_agree_with_the_full_network(served):
    x = torch.randn(3, 3, 64, 64)
    rng = np.random.default_rng(0)
    classify = export_onnx.ServedGraph(served, GRAPH_CLASSIFY)
    with torch.inference_mode():
        features = classify.features(torch.randn(40, 3, 64, 64)).numpy()
    detector = FeatureOodDetector.fit(features + rng.normal(0, 1e-3, features.shape))
    full = export_onnx.ServedGraph(served, "full", detector)
    cut = export_onnx.ServedGraph(served, GRAPH_CLASSIFY, detector)
    assert full.output_names == ["classes", "masks", "quality"]
    assert cut.output_names == ["classes", "quality"]
    with torch.inference_mode():
        classes, masks = served(x)
        full_out, cut_out = full(x), cut(x)
        pooled = cut.features(x).numpy()
    torch.testing.assert_close(full_out[0], classes)
    torch.testing.assert_close(full_out[1], masks)
    torch.testing.assert_close(cut_out[0], classes, rtol=0, atol=1e-5)
    torch.testing.assert_close(cut_out[1], full_out[2], rtol=0, atol=1e-5)
    expected = detector.scores(pooled)
    assert np.allclose(full_out[2].numpy(), expected, rtol=1e-4, atol=1e-4)

    example = torch.zeros((1, 3, 64, 64))
    for module, names in ((full, full.output_names), (cut, cut.output_names)):
        session = ort.InferenceSession(export_onnx.export_onnx(module, example))
        assert [o.name for o in session.get_outputs()] == names
        got = session.run(None, {"x": x.numpy()})
        assert np.allclose(got[0], classes.numpy(), atol=1e-4)
        assert np.allclose(got[-1], expected, rtol=1e-3, atol=1e-3)


def test_the_classify_graph_standardises_as_the_network_does():
    """A recipe that standardises each image inside the network (JointUNet.encode): the
    classify-only graph, which runs the encoder itself, standardises too."""
    preset = dataclasses.replace(PRESET, image_standardise=True)
    torch.manual_seed(0)
    served = export_onnx.eager_network(preset, joint.build_model(preset, False).state_dict())
    x = torch.rand(3, 3, 64, 64)
    with torch.inference_mode():
        classes, _ = served(x)
        cut = export_onnx.ServedGraph(served, GRAPH_CLASSIFY)(x)[0]
        unstandardised = export_onnx.eager_network(PRESET, served.state_dict())(x)[0]
    torch.testing.assert_close(cut, classes, rtol=0, atol=1e-5)
    assert not torch.allclose(unstandardised, classes, atol=1e-3)


def test_export_onnx_ships_a_classify_graph_validated_against_the_full_one(world, tmp_path):  # noqa: F811
    out = tmp_path / "models"
    assert _export(world, out, "graphs-1") == 0
    info = verify_artifact(out, TASK_DIAGNOSIS, "graphs-1")
    variant = info.manifest.runtime(RUNTIME_ONNX, GRAPH_CLASSIFY)
    assert variant is not None and variant.file == "classify.onnx" and variant.holds
    assert variant.outputs == ("classes",)
    validation = variant.validation
    assert validation["reference_graph"] == "full"
    assert validation["agreement"]["n_images"] == 6
    assert validation["agreement"]["class_disagreements"] == 0
    assert set(validation["reference"]) == {"accuracy", "macro_auc"}
    assert "quality" not in info.metadata  # no --quality-data-path: no check in the graphs

    x = np.random.default_rng(0).normal(size=(2, 3, 64, 64)).astype(np.float32)
    full = ort.InferenceSession(str(info.path / "model.onnx")).run(None, {"x": x})
    cut = ort.InferenceSession(str(info.runtime_path(variant))).run(None, {"x": x})
    assert len(cut) == 1 and np.allclose(cut[0], full[0], atol=1e-4)


def test_the_feature_check_evaluation_holds_or_says_why():
    rng = np.random.default_rng(0)
    features = np.concatenate([rng.normal(0, 1, (300, 6)), rng.normal(0.5, 1.2, (150, 6))])
    sites = ["a"] * 300 + ["b"] * 150
    folds = rng.integers(0, 5, 450)
    far = rng.normal(8, 1, (30, 6))
    result = evaluate_feature_check(features, sites, folds, far, ["synthetic"] * 30)
    assert result["holds"] and result["refusals"] == []
    assert result["auroc_mean_over_folds"] > 0.99
    assert set(result["flagged_by_site"]) == {"a", "b"}
    assert all(f["flagged"] <= 0.02 for f in result["flagged_by_site"].values())

    near = rng.normal(0, 1, (30, 6))  # "non-ultrasound" images just like the training ones
    refused = evaluate_feature_check(features, sites, folds, near, ["synthetic"] * 30)
    assert not refused["holds"]
    assert any("AUROC" in reason for reason in refused["refusals"])


@pytest.mark.parametrize("flip", [False, True])
def test_an_ensemble_exports_its_members_mean_and_their_features_side_by_side(flip):
    from dataclasses import replace

    from shared.models.joint import JointEnsemble

    preset = replace(PRESET, flip_tta=flip)
    torch.manual_seed(1)
    nets = [joint.build_model(preset, False) for _ in range(2)]
    state = JointEnsemble(nets).state_dict()
    served = export_onnx.eager_network(preset, state, members=2)
    singles = [export_onnx.eager_network(preset, net.state_dict()) for net in nets]
    x = torch.randn(3, 3, 64, 64)
    with torch.inference_mode():
        outs = [single(x) for single in singles]
        classes, masks = served(x)
        torch.testing.assert_close(classes, 0.5 * (outs[0][0] + outs[1][0]))
        torch.testing.assert_close(masks, 0.5 * (outs[0][1] + outs[1][1]))
        cut = export_onnx.ServedGraph(served, GRAPH_CLASSIFY)
        one = export_onnx.ServedGraph(singles[0], GRAPH_CLASSIFY)
        features = cut.features(torch.randn(40, 3, 64, 64)).numpy()
        width = one.features(x).shape[1]
        assert features.shape == (40, 2 * width)  # each member's pooled features, side by side
        torch.testing.assert_close(cut.features(x)[:, :width], one.features(x))
    rng = np.random.default_rng(0)
    detector = FeatureOodDetector.fit(features + rng.normal(0, 1e-3, features.shape))
    full = export_onnx.ServedGraph(served, "full", detector)
    cut = export_onnx.ServedGraph(served, GRAPH_CLASSIFY, detector)
    with torch.inference_mode():
        full_out, cut_out = full(x), cut(x)
        expected = detector.scores(cut.features(x).numpy())
    torch.testing.assert_close(full_out[0], classes)
    torch.testing.assert_close(cut_out[0], classes, rtol=0, atol=1e-5)
    assert np.allclose(full_out[2].numpy(), expected, rtol=1e-4, atol=1e-4)
    assert np.allclose(cut_out[1].numpy(), expected, rtol=1e-4, atol=1e-4)
    session = ort.InferenceSession(export_onnx.export_onnx(full, torch.zeros((1, 3, 64, 64))))
    got = session.run(None, {"x": x.numpy()})
    assert np.allclose(got[0], classes.numpy(), atol=1e-4)
    assert np.allclose(got[1], masks.numpy(), atol=1e-3)


def test_an_ensemble_of_self_averaging_members_is_refused():
    from shared.models.joint import JointEnsemble, JointFlipAverage

    members = [JointFlipAverage(joint.build_model(PRESET, False)) for _ in range(2)]
    with pytest.raises(ValueError, match="as a whole"):
        export_onnx.ServedGraph(JointEnsemble(members), GRAPH_CLASSIFY)
