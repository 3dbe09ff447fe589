"""`python -m training drift-reference` publishes a new version carrying the drift reference of
its training sites, and `promote` loads what it promotes and reads the shadow figures."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from synthetic_busi import write_busi_folder
from torch import nn

from shared.drift import MANIFEST_FIELD, DriftReference
from shared.labels import CLASS_NAMES, TASK_CLASSIFICATION, TASK_DIAGNOSIS, TASK_SEGMENTATION
from shared.preprocessing import Preprocessing
from shared.probe import probe_inputs, write_probe
from shared.promotion import PROMOTIONS_FILE
from shared.store import publish_artifact, verify_artifact
from training import drift_reference, promote


class TinyJoint(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = x.mean(dim=(1, 2, 3)).unsqueeze(1)
        logits = torch.cat([-4 * s - 2, 0 * s, 4 * s - 2], dim=1)
        return logits, 20.0 * (x.mean(dim=1, keepdim=True) - 0.5)


def joint_metadata() -> dict:
    pre = Preprocessing(resize=64, resize_mode="letterbox", trim_border=True)
    return {
        "name": "tiny-joint",
        "architecture": "tiny_joint",
        "preprocessing": pre.to_metadata(),
        "input": {"channels": 3, "height": 64, "width": 64, "dtype": "float32"},
        "output": {
            "type": "joint",
            "classes": {"type": "logits", "shape": [3]},
            "mask": {"type": "logits", "shape": [1, 64, 64], "threshold": 0.5},
        },
        "class_names": list(CLASS_NAMES),
        "metrics": {"cross_validation": {"plain": {"accuracy": 0.9, "lesion_dice": 0.9, "n": 100}}},
        "training": {"preset": "tiny"},
        "data_fingerprint": {"sha256": "0" * 64},
        "framework": {"torch": torch.__version__},
    }


@pytest.fixture
def world(tmp_path: Path) -> dict[str, Path]:
    model_file = tmp_path / "joint.pt"
    torch.jit.script(TinyJoint().eval()).save(str(model_file))
    publish_artifact(tmp_path / "models", TASK_DIAGNOSIS, "src", model_file, joint_metadata())
    site_a = write_busi_folder(tmp_path / "site-a", per_class=3, seed=0)
    site_b = write_busi_folder(tmp_path / "site-b", per_class=2, seed=1)
    return {"models": tmp_path / "models", "a": site_a, "b": site_b}


@pytest.fixture
def denormals_restored():
    """The command sets torch's flush-denormal mode on the calling thread (training.engine),
    which would leak into later tests of this process (hypothesis refuses to run with it)."""
    yield
    torch.set_flush_denormal(False)


def test_drift_reference_publishes_a_new_version_with_the_sites_reference(
    world, capsys, denormals_restored
):
    status = drift_reference.main([
        "--model-dir", str(world["models"]), "--version", "src",
        "--data-path", str(world["a"]), str(world["b"]), "--new-version", "src-drift",
        "--threads", "1",
    ])  # fmt: skip
    assert status == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["sites"] == {"site-a": 9, "site-b": 6}
    source = verify_artifact(world["models"], TASK_DIAGNOSIS, "src")
    published = verify_artifact(world["models"], TASK_DIAGNOSIS, "src-drift")  # checksums hold
    assert published.sha256 == source.sha256  # the same model file
    assert published.metadata["derived_from"]["version"] == "src"
    assert MANIFEST_FIELD not in source.metadata  # the source version is unchanged
    reference = DriftReference.from_dict(published.metadata[MANIFEST_FIELD])
    assert sum(reference.pooled("width")) == 15
    assert sum(reference.pooled("probability_malignant")) == 15
    assert sum(reference.pooled("lesion_area_fraction")) == 15
    assert reference.sites["site-b"]["n_images"] == 6
    assert "drift-reference" in published.metadata[MANIFEST_FIELD]["source"]["command"]


def _promote(model_dir: Path, task: str, version: str, *extra: str) -> int:
    return promote.main("promote", [task, version, "--model-dir", str(model_dir), *extra])


def _publish_with_probe(tmp_path: Path, version: str, off_by: float = 0.0) -> None:
    """TinyJoint with a probe of its answers (`off_by` added to its class logits)."""
    model_file = tmp_path / f"{version}.pt"
    torch.jit.script(TinyJoint().eval()).save(str(model_file))
    inputs = probe_inputs((3, 64, 64))
    with torch.inference_mode():
        answers = [[t.numpy() for t in TinyJoint()(torch.from_numpy(b))] for b in inputs]
    for batch_answers in answers:
        batch_answers[0] = batch_answers[0] + off_by
    write_probe(tmp_path / f"{version}.npz", inputs, answers)
    metadata = {**joint_metadata(), "probe": {"batches": 2, "source": "tests"}}
    publish_artifact(
        tmp_path / "models", TASK_DIAGNOSIS, version, model_file, metadata,
        probe_file=tmp_path / f"{version}.npz",
    )  # fmt: skip


def test_drift_reference_carries_the_probe_and_promote_checks_it(
    world, tmp_path, caplog, denormals_restored
):
    _publish_with_probe(tmp_path, "probed")
    status = drift_reference.main([
        "--model-dir", str(world["models"]), "--version", "probed",
        "--data-path", str(world["a"]), "--new-version", "probed-drift", "--threads", "1",
    ])  # fmt: skip
    assert status == 0
    source = verify_artifact(world["models"], TASK_DIAGNOSIS, "probed")
    derived = verify_artifact(world["models"], TASK_DIAGNOSIS, "probed-drift")
    assert source.probe_path is not None and derived.probe_path is not None
    assert derived.probe_path.read_bytes() == source.probe_path.read_bytes()
    assert derived.metadata["probe"] == source.metadata["probe"]
    assert _promote(world["models"], TASK_DIAGNOSIS, "probed-drift") == 0

    _publish_with_probe(tmp_path, "misrecorded", off_by=0.5)
    verify_artifact(world["models"], TASK_DIAGNOSIS, "misrecorded")  # its checksums hold
    with caplog.at_level(logging.INFO):
        assert _promote(world["models"], TASK_DIAGNOSIS, "misrecorded") == 1
    assert "probe.npz does not hold model.pt's answers (off by 0.5)" in caplog.text
    record = json.loads((world["models"] / PROMOTIONS_FILE).read_text())
    assert record["promoted"][TASK_DIAGNOSIS] == ["probed-drift"]


def test_promote_refuses_a_version_that_verifies_but_does_not_load(tmp_path, publish_tiny, caplog):
    publish_tiny(tmp_path, TASK_SEGMENTATION, "good")
    publish_tiny(tmp_path, TASK_SEGMENTATION, "broken", model="broken-segmentation", promote=False)
    verify_artifact(tmp_path, TASK_SEGMENTATION, "broken")  # its files match their checksums
    with caplog.at_level(logging.INFO):
        assert _promote(tmp_path, TASK_SEGMENTATION, "broken") == 1
    assert "the warm-up forward failed" in caplog.text
    record = json.loads((tmp_path / PROMOTIONS_FILE).read_text())
    assert record["promoted"][TASK_SEGMENTATION] == ["good"]  # nothing recorded
    caplog.clear()
    publish_tiny(tmp_path, TASK_SEGMENTATION, "next", promote=False)
    with caplog.at_level(logging.INFO):
        assert _promote(tmp_path, TASK_SEGMENTATION, "next") == 0
    assert "segmentation version next loads and warms up (torchscript" in caplog.text


def _shadow_exposition(path: Path, agree: int, disagree: int) -> str:
    from service.metrics import ServiceMetrics

    metrics = ServiceMetrics()
    pair = (TASK_CLASSIFICATION, "v1", "v2")
    metrics.zero_shadow_pair(*pair)
    metrics.shadow_label_agreement.labels(*pair, "true").inc(agree)
    metrics.shadow_label_agreement.labels(*pair, "false").inc(disagree)
    metrics.shadow_requests.labels(*pair, "scored").inc(agree + disagree)
    path.write_bytes(metrics.exposition())
    return path.resolve().as_uri()


def test_promote_shows_the_shadow_figures_and_refuses_too_small_a_sample(
    tmp_path, publish_tiny, caplog
):
    models = tmp_path / "models"
    publish_tiny(models, TASK_CLASSIFICATION, "v1")
    publish_tiny(models, TASK_CLASSIFICATION, "v2", promote=False)
    few = _shadow_exposition(tmp_path / "few.prom", agree=40, disagree=10)
    with caplog.at_level(logging.INFO):
        refused = _promote(models, TASK_CLASSIFICATION, "v2", "--shadow-metrics", few)
    assert refused == 1
    assert "50 label comparisons, agreement 0.800" in caplog.text
    assert "the shadow sample is too small" in caplog.text
    # two replicas' figures add up to enough
    other = _shadow_exposition(tmp_path / "other.prom", agree=150, disagree=10)
    assert _promote(models, TASK_CLASSIFICATION, "v2", "--shadow-metrics", few, other) == 0
    record = json.loads((models / PROMOTIONS_FILE).read_text())
    assert record["promoted"][TASK_CLASSIFICATION] == ["v1", "v2"]


def test_promote_with_force_promotes_despite_a_small_shadow_sample(tmp_path, publish_tiny):
    models = tmp_path / "models"
    publish_tiny(models, TASK_CLASSIFICATION, "v1")
    publish_tiny(models, TASK_CLASSIFICATION, "v2", promote=False)
    few = _shadow_exposition(tmp_path / "few.prom", agree=4, disagree=1)
    assert _promote(models, TASK_CLASSIFICATION, "v2", "--shadow-metrics", few, "--force") == 0
    assert json.loads((models / PROMOTIONS_FILE).read_text())["promoted"][TASK_CLASSIFICATION] == [
        "v1", "v2",
    ]  # fmt: skip
