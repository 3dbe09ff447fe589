"""`python -m training export-onnx` on a tiny joint artifact and a synthetic BUSI-layout folder."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from synthetic_busi import write_busi_folder

from shared.errors import ArtifactIntegrityError
from shared.labels import CLASS_NAMES, TASK_DIAGNOSIS
from shared.manifest import Manifest
from shared.probe import probe_inputs, read_probe
from shared.promotion import PROMOTIONS_FILE
from shared.store import list_versions, publish_artifact, verify_artifact
from shared.variants import ONNX_FILE, RUNTIME_ONNX, VALIDATION_BAR
from training import export_onnx, joint
from training.__main__ import main as training_main
from training.export import build_metadata, export_torchscript

PRESET = joint.get_preset("joint-smoke")  # 64 px, no pretrained weights needed
SOURCE = "src-1"


def _perturbed(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Other weights for the same network (cheaper than building one more)."""
    g = torch.Generator().manual_seed(seed)
    return {
        k: v * (1 + 0.05 * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v
        for k, v in state.items()
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A published tiny joint artifact (random weights), a data folder, two fold models."""
    root = tmp_path_factory.mktemp("runtimes")
    data = write_busi_folder(root / "busi", per_class=2)
    torch.manual_seed(0)
    served = export_onnx.eager_network(PRESET, joint.build_model(PRESET, False).state_dict())
    model_file = root / "model.pt"
    export_torchscript(served, torch.zeros((1, 3, PRESET.size, PRESET.size))).save(str(model_file))
    recipe = {k: v for k, v in asdict(PRESET).items() if k != "description"}
    metadata = build_metadata(
        task=TASK_DIAGNOSIS,
        name="tiny-joint",
        architecture=f"joint_unet_{PRESET.encoder}",
        preprocessing=joint.preprocessing_for(PRESET),
        output={
            "type": "joint",
            "classes": {"type": "logits", "shape": [3]},
            "mask": {"type": "logits", "shape": [1, 64, 64], "threshold": PRESET.threshold},
        },
        metrics={"kind": "none"},
        training={"preset": "joint-smoke", "recipe": recipe},
        data_fingerprint={"sha256": "0" * 64, "n_images": 0},
        class_names=CLASS_NAMES,
    )
    publish_artifact(root / "models", TASK_DIAGNOSIS, SOURCE, model_file, metadata)
    # two folds: each image scored by the model of the other
    keys = sorted(f"{p.parent.name}/{p.name}" for p in data.glob("*/*).png"))
    folds = {"k": 2, "items": {key: {"fold": i % 2, "group": i} for i, key in enumerate(keys)}}
    (root / "folds.json").write_text(json.dumps(folds))
    cv_dir = root / "cv"
    cv_dir.mkdir()
    for fold in (0, 1):
        torch.save(_perturbed(served.model.state_dict(), fold), cv_dir / f"fold{fold}.pt")
        (cv_dir / f"fold{fold}.json").write_text(json.dumps({"recipe": recipe}))
    return {"root": root, "data": data, "models": root / "models", "cv": cv_dir}


def _export(world: dict[str, Path], out: Path, version: str, *extra: str) -> int:
    return training_main([
        "export-onnx", "--model-dir", str(world["models"]), "--task", TASK_DIAGNOSIS,
        "--version", SOURCE, "--data-path", str(world["data"]), "--output-model-dir", str(out),
        "--new-version", version, "--threads", "1", *extra,
    ])  # fmt: skip


def test_export_onnx_publishes_a_new_version_whose_onnx_answers_as_model_pt(world, tmp_path):
    out = tmp_path / "models"
    assert _export(world, out, "src-1-onnx") == 0

    info = verify_artifact(out, TASK_DIAGNOSIS, "src-1-onnx")
    source = verify_artifact(world["models"], TASK_DIAGNOSIS, SOURCE)
    assert info.model_path.read_bytes() == source.model_path.read_bytes()
    manifest = Manifest.from_dict(info.metadata)
    assert manifest.status == source.manifest.status  # carried over, not promoted
    assert info.metadata["derived_from"] == {
        "version": SOURCE, "sha256": source.sha256,
        "change": "adds model.onnx for ONNX Runtime, classify.onnx (the encoder and class head "
        "only) for /classify, model.pt's answers on fixed inputs for the check at load (probe.npz)",
    }  # fmt: skip
    variant = manifest.runtime(RUNTIME_ONNX)
    assert variant is not None and variant.file == ONNX_FILE and variant.holds
    validation = variant.validation
    assert validation["source"].startswith("not held out")
    assert validation["command"].startswith("python -m training export-onnx --model-dir ")
    assert validation["n_images"] == 6 == validation["artifact_agreement"]["n_images"]
    assert set(validation["reference"]) == set(VALIDATION_BAR) == set(validation["variant"])
    assert validation["artifact_agreement"]["class_disagreements"] == 0
    assert validation["onnx_opset"] == export_onnx.ONNX_OPSET
    assert validation["onnxruntime_version"] == ort.__version__
    assert not (out / PROMOTIONS_FILE).exists()  # published, not promoted

    session = ort.InferenceSession(str(info.runtime_path(variant)))
    scripted = torch.jit.load(str(info.model_path))
    x = torch.randn(3, 3, 64, 64)
    classes, masks = session.run(None, {"x": x.numpy()})
    expected = scripted(x)
    torch.testing.assert_close(torch.from_numpy(classes), expected[0], rtol=0, atol=1e-4)
    torch.testing.assert_close(torch.from_numpy(masks), expected[1], rtol=0, atol=1e-4)

    # model.pt's own answers on the probe's inputs, for the service's check at load
    assert info.probe_path is not None and info.metadata["probe"]["batches"] == 2
    probe = read_probe(info.probe_path)
    for batch, fixed in zip(probe.inputs, probe_inputs((3, 64, 64)), strict=True):
        np.testing.assert_array_equal(batch, fixed)
    with torch.inference_mode():
        for batch, recorded in zip(probe.inputs, probe.outputs, strict=True):
            answers = scripted(torch.from_numpy(batch))
            assert len(recorded) == len(answers) == 2
            for r, a in zip(recorded, answers, strict=True):
                torch.testing.assert_close(torch.from_numpy(r), a, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_export_onnx_with_fold_models_validates_out_of_fold(world, tmp_path):
    out = tmp_path / "models"
    argv = ["--cv-dir", str(world["cv"]), "--folds-file", str(world["root"] / "folds.json")]
    assert _export(world, out, "oof-1", *argv) == 0
    variant = verify_artifact(out, TASK_DIAGNOSIS, "oof-1").manifest.runtime(RUNTIME_ONNX)
    assert variant is not None and variant.holds
    validation = variant.validation
    assert validation["source"].startswith("out-of-fold")
    assert validation["n_images"] == 6 == validation["fold_models_agreement"]["n_images"]
    # the fold models are not the artifact: their figures are the folds', not the artifact's own
    own = export_onnx.bar_figures(_own_rows(world))
    assert validation["reference"] != own


def _own_rows(world: dict[str, Path]) -> list[dict]:
    from training.data import load_split_images, scan_dataset

    data = load_split_images(scan_dataset(world["data"]))
    scripted = torch.jit.load(str(world["models"] / TASK_DIAGNOSIS / SOURCE / "model.pt"))
    return export_onnx.score(
        scripted, joint.preprocessing_for(PRESET), data.images, data.masks, data.labels,
        [s.key for s in data.samples], 8, PRESET.threshold,
    )  # fmt: skip


def test_export_onnx_publishes_nothing_when_the_files_disagree(world, tmp_path, monkeypatch):
    monkeypatch.setattr(export_onnx, "RUNTIME_AGREEMENT_ATOL", 0.0)
    out = tmp_path / "models"
    assert _export(world, out, "refused-1", "--limit", "3") == 1
    assert list_versions(out, TASK_DIAGNOSIS) == []


def test_a_tampered_model_onnx_fails_verification(world, tmp_path):
    out = tmp_path / "models"
    assert _export(world, out, "v-1", "--limit", "3") == 0
    folder = out / TASK_DIAGNOSIS / "v-1"
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    onnx_file = copy / TASK_DIAGNOSIS / "v-1" / ONNX_FILE
    data = bytearray(onnx_file.read_bytes())
    data[-1] ^= 0xFF
    onnx_file.write_bytes(bytes(data))
    with pytest.raises(ArtifactIntegrityError, match="checksum of model.onnx"):
        verify_artifact(copy, TASK_DIAGNOSIS, "v-1")
    (copy / TASK_DIAGNOSIS / "v-1" / ONNX_FILE).unlink()
    with pytest.raises(ArtifactIntegrityError, match="lacks model.onnx"):
        verify_artifact(copy, TASK_DIAGNOSIS, "v-1")
    assert verify_artifact(out, TASK_DIAGNOSIS, "v-1").path == folder


FIGURES = {"accuracy": 0.84, "macro_auc": 0.94, "lesion_dice": 0.70}
AGREEING = {
    "n_images": 623,
    "max_abs_class_logit_diff": 2e-5,
    "max_abs_mask_logit_diff": 4e-4,
    "class_disagreements": 0,
}


def _validation(variant: dict, agreement: dict | None = None) -> dict:
    return {"reference": FIGURES, "variant": variant, "artifact_agreement": agreement or AGREEING}


def test_a_variant_within_the_bar_may_publish():
    nudged = {k: v - 0.9 * VALIDATION_BAR[k] for k, v in FIGURES.items()}
    assert export_onnx.refusals(_validation(nudged)) == []


@pytest.mark.parametrize("key", sorted(VALIDATION_BAR))
def test_a_variant_off_by_more_than_the_bar_is_refused(key):
    for sign in (-1, 1):
        off = {**FIGURES, key: FIGURES[key] + sign * 1.5 * VALIDATION_BAR[key]}
        reasons = export_onnx.refusals(_validation(off))
        assert len(reasons) == 1 and reasons[0].startswith(key)


def test_a_variant_missing_a_figure_is_refused():
    reasons = export_onnx.refusals(_validation({**FIGURES, "macro_auc": float("nan")}))
    assert reasons == ["not measured for both runtimes: macro_auc"]


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"class_disagreements": 1}, "another class"),
        ({"max_abs_mask_logit_diff": 2e-2}, "mask logits differ"),
        ({"max_abs_class_logit_diff": float("nan")}, "class logits differ"),
        ({"n_images": 0}, "not compared"),
    ],
)
def test_an_artifact_whose_onnx_disagrees_with_model_pt_is_refused(change, words):
    reasons = export_onnx.refusals(_validation(FIGURES, {**AGREEING, **change}))
    assert len(reasons) == 1 and words in reasons[0]


def test_only_joint_diagnosis_artifacts_are_rebuilt(publish_tiny, tmp_path):
    info = publish_tiny(tmp_path, "classification", "c1", promote=False)
    with pytest.raises(ValueError, match="joint diagnosis models only"):
        export_onnx.eager_model(info)


def test_spread_keeps_every_class_of_a_sorted_folder():
    assert export_onnx.spread(10, 0) == list(range(10))
    assert export_onnx.spread(9, 3) == [0, 3, 6]
    assert len(export_onnx.spread(623, 30)) == 30
    assert np.all(np.diff(export_onnx.spread(623, 30)) > 0)
