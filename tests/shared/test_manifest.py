"""The typed manifest: what training publishes and the service reads is one validated object."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_manifests import classification_metadata, segmentation_metadata

from shared.labels import CLASS_NAMES, TASK_CLASSIFICATION, TASK_DIAGNOSIS, TASK_SEGMENTATION
from shared.manifest import STATUS_CANDIDATE, STATUS_SMOKE, Manifest, ManifestError
from shared.store import MANIFEST_FILE

SHIPPED = Path(__file__).resolve().parents[2] / "models"
FILLED = {  # the fields publish_artifact fills in
    "schema_version": 1,
    "version": "v1",
    "model_file": "model.pt",
    "sha256": "0" * 64,
    "created_at": "2026-01-01T00:00:00+00:00",
}


def manifest_dict(task: str = TASK_CLASSIFICATION, **overrides: object) -> dict:
    base = classification_metadata() if task == TASK_CLASSIFICATION else segmentation_metadata()
    return {**base, **FILLED, "task": task, **overrides}


def shipped_manifests() -> list[Path]:
    return sorted(SHIPPED.glob(f"*/*/{MANIFEST_FILE}"))


@pytest.mark.parametrize("path", shipped_manifests(), ids=lambda p: p.parent.parent.name)
def test_every_shipped_manifest_reads_as_written(path):
    data = json.loads(path.read_text())
    manifest = Manifest.from_dict(data)
    assert (manifest.task, manifest.version, manifest.sha256) == (
        data["task"],
        data["version"],
        data["sha256"],
    )
    assert manifest.status == STATUS_CANDIDATE  # schema 1 as first written: no status field
    # writing it back changes nothing but the fields added since (status, the preprocessing's
    # defaults spelled out), and reading that again gives the same object
    again = manifest.to_dict()
    assert {k for k in set(data) | set(again) if data.get(k) != again.get(k)} <= {
        "status",
        "preprocessing",
    }
    assert Manifest.from_dict(again) == manifest


def test_shipped_manifests_expose_their_typed_fields():
    by_task = {p.parent.parent.name: Manifest.from_dict(json.loads(p.read_text())) for p in
               shipped_manifests()}  # fmt: skip
    joint = by_task[TASK_DIAGNOSIS]
    assert joint.output.type == "joint"
    assert joint.output.shapes == [(3,), (1, 224, 224)]
    assert joint.output.classes.calibration.calibrated
    assert joint.class_names == CLASS_NAMES
    figures = joint.headline_figures
    assert figures.source == "cross_validation" and figures.n_images == 2498  # 5 folds pooled
    assert joint.training.preset == "joint-sites-zoom-lite0" and joint.training.epochs == 8
    # model.pt's answers recorded, so the service checks model.onnx without starting model.pt
    assert joint.extra["probe"]["file"] == "probe.npz" and joint.extra["probe"]["batches"] == 2
    segmenter = by_task[TASK_SEGMENTATION]
    assert segmenter.output.mask.threshold == 0.5 and segmenter.output.classes is None
    assert segmenter.headline_figures.lesion_dice == pytest.approx(0.7317, abs=1e-4)
    assert segmenter.headline_figures.n_images == 94
    classifier = by_task[TASK_CLASSIFICATION]
    assert classifier.headline_figures.accuracy == pytest.approx(0.7766, abs=1e-4)
    assert classifier.headline_figures.malignant_sensitivity == pytest.approx(8 / 9)
    assert classifier.input.shape == (3, 160, 160) and not classifier.input_problems()


def test_every_problem_is_named_at_once():
    data = manifest_dict(class_names=5, input={"channels": 0, "height": 56}, status="final")
    del data["name"]
    with pytest.raises(ManifestError) as caught:
        Manifest.from_dict(data)
    problems = caught.value.problems
    assert "missing fields ['name']" in problems
    assert "class_names must be an ordering of ['normal', 'benign', 'malignant']" in problems
    assert "input channels, height and width must be a list of positive integers" in problems
    assert "status must be one of ['candidate', 'smoke']" in problems
    assert caught.value.code == "artifact_integrity"  # the service counts it as a failed load


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        ({"schema_version": 2}, "schema_version must be 1"),
        ({"task": "detection"}, "task must be one of"),
        ({"output": {"type": "logits", "shape": [4]}}, "output.shape must be [number of"),
        ({"output": {"type": "softmax", "shape": [3]}}, "output.type must be one of"),
        ({"output": {"shape": [3], "temperature": -1}}, "temperature must be a positive"),
        ({"preprocessing": {"resize": 64, "resize_mode": "zoom"}}, "preprocessing is invalid"),
        ({"metrics": {"test": {"accuracy": 1.5}}}, "accuracy must be a number in [0, 1]"),
        ({"training": {"smoke": "yes"}}, "training.smoke must be true or false"),
        ({"training": {"smoke": True}, "status": "candidate"}, "status must be 'smoke'"),
        ({"sha256": "abc"}, "sha256 must be 64 lower-case hex digits"),
        ({"version": "../v1"}, "version is not a valid version name"),
    ],
)
def test_invalid_fields_are_refused(overrides, problem):
    with pytest.raises(ManifestError, match=problem.replace("[", r"\[")):
        Manifest.from_dict(manifest_dict(**overrides))


def test_segmentation_mask_needs_a_threshold_in_the_open_unit_interval():
    side = 64
    output = {"type": "logits", "shape": [1, side, side], "threshold": 1.0}
    with pytest.raises(ManifestError, match="threshold must lie in"):
        Manifest.from_dict(manifest_dict(TASK_SEGMENTATION, output=output))


def test_a_diagnosis_manifest_declares_both_outputs_and_its_mask_matches_the_input():
    base = {**manifest_dict(), "task": TASK_DIAGNOSIS}
    side = 56  # the tiny classifier's preprocessing: resize 64, crop 56
    good = {
        "type": "joint",
        "classes": {"type": "logits", "shape": [3]},
        "mask": {"type": "logits", "shape": [1, side, side], "threshold": 0.4},
    }
    manifest = Manifest.from_dict({**base, "output": good})
    assert manifest.output.to_dict() == good
    with pytest.raises(ManifestError, match="must be {type: joint"):
        Manifest.from_dict({**base, "output": {"type": "logits", "shape": [3]}})
    wrong_side = {**good, "mask": {**good["mask"], "shape": [1, 32, 32]}}
    with pytest.raises(ManifestError, match=r"output.mask.shape must be \[1, 56, 56\]"):
        Manifest.from_dict({**base, "output": wrong_side})


def test_a_smoke_run_is_marked_smoke_whether_or_not_the_job_says_so():
    assert Manifest.from_dict(manifest_dict(training={"smoke": True})).status == STATUS_SMOKE
    named = manifest_dict(training={"preset": "joint-smoke"})
    assert Manifest.from_dict(named).smoke
    assert Manifest.from_dict(manifest_dict()).status == STATUS_CANDIDATE


def test_unknown_keys_survive_a_round_trip():
    data = manifest_dict(notes={"reviewer": "x"})
    data["input"] = {**data["input"], "mask_channel": "predicted"}
    again = Manifest.from_dict(data).to_dict()
    assert again["notes"] == {"reviewer": "x"} and again["input"]["mask_channel"] == "predicted"


def test_a_model_the_decoder_cannot_feed_is_a_valid_artifact_with_input_problems():
    data = manifest_dict()
    data["input"] = {**data["input"], "channels": 4}  # image + mask channel
    problems = Manifest.from_dict(data).input_problems()
    assert problems == ["manifest input [4, 56, 56] disagrees with its preprocessing (3 x 56 x 56)"]


def runtime_entry(**overrides: object) -> dict:
    entry = {
        "runtime": "onnxruntime",
        "file": "model.onnx",
        "sha256": "1" * 64,
        "precision": "fp32",
        "validation": {
            "reference": {"accuracy": 0.835, "macro_auc": 0.948},
            "variant": {"accuracy": 0.833, "macro_auc": 0.947},
        },
    }
    return {**entry, **overrides}


def test_a_runtime_variant_reads_round_trips_and_holds_within_the_bar():
    manifest = Manifest.from_dict(manifest_dict(runtimes=[runtime_entry(opset=20)]))
    variant = manifest.runtime("onnxruntime")
    assert variant is not None and manifest.runtime("openvino") is None
    assert variant.deltas == pytest.approx({"accuracy": -0.002, "macro_auc": -0.001})
    assert variant.holds
    assert Manifest.from_dict(manifest.to_dict()) == manifest
    assert manifest.to_dict()["runtimes"][0]["opset"] == 20  # unknown keys survive


@pytest.mark.parametrize(
    ("validation", "holds"),
    [
        ({"reference": {"accuracy": 0.835}, "variant": {"accuracy": 0.829}}, False),  # 0.6 pt
        ({"reference": {"lesion_dice": 0.70}, "variant": {"lesion_dice": 0.706}}, False),
        ({"reference": {"accuracy": 0.835}, "variant": {"macro_auc": 0.9}}, False),  # none shared
        ({"reference": {"accuracy": 0.835}, "variant": {"accuracy": float("nan")}}, False),
        ({}, False),
        ({"reference": {"accuracy": 0.835}, "variant": {"accuracy": 0.84}}, True),
    ],
)
def test_a_runtime_variant_holds_only_with_shared_figures_within_the_bar(validation, holds):
    manifest = Manifest.from_dict(manifest_dict(runtimes=[runtime_entry(validation=validation)]))
    assert manifest.runtimes[0].holds is holds


@pytest.mark.parametrize(
    ("runtimes", "problem"),
    [
        ({"runtime": "onnxruntime"}, "runtimes must be a list"),
        ([runtime_entry(runtime="tensorrt")], "runtimes[0].runtime must be one of"),
        ([runtime_entry(file="../model.onnx")], "runtimes[0].file must be 'model.onnx'"),
        ([runtime_entry(sha256="xyz")], "runtimes[0].sha256 must be 64"),
        ([runtime_entry(precision="fp16")], "runtimes[0].precision must be one of"),
        ([runtime_entry(precision="int8")], "runtimes[0].file must be 'model.int8.onnx'"),
        ([runtime_entry(graph="decoder")], "runtimes[0].graph must be one of"),
        ([runtime_entry(graph="classify")], "runtimes[0].file must be 'classify.onnx'"),
        ([runtime_entry(outputs="classes")], "runtimes[0].outputs must be a list"),
        ([runtime_entry(validation=[])], "runtimes[0].validation must be an object"),
        ([runtime_entry(), runtime_entry()], "listed twice"),
    ],
)
def test_invalid_runtime_variants_are_refused(runtimes, problem):
    with pytest.raises(ManifestError) as raised:
        Manifest.from_dict(manifest_dict(runtimes=runtimes))
    assert any(problem in p for p in raised.value.problems), raised.value.problems
