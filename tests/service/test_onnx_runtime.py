"""INFERENCE_RUNTIME: an artifact's validated model.onnx runs in ONNX Runtime, and only then."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from service_inputs import png
from test_joint_model import TinyJoint, frame_with_lesion, joint_metadata

from service import registry
from service.metrics import ServiceMetrics
from service.registry import ModelRegistry
from shared.labels import TASK_DIAGNOSIS
from shared.onnx_runtime import OnnxSessions
from shared.probe import probe_inputs, write_probe
from shared.promotion import GateFloors, promote
from shared.store import publish_artifact
from shared.variants import RUNTIME_ONNX

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


def export_onnx(module: torch.nn.Module, path: Path) -> Path:
    torch.onnx.export(
        module.eval(),
        (torch.zeros((1, 3, 64, 64)),),
        str(path),
        input_names=["x"],
        output_names=["classes", "masks"],
        dynamic_axes={"x": {0: "n"}, "classes": {0: "n"}, "masks": {0: "n"}},
        dynamo=False,
    )
    return path


def validation(accuracy_delta: float = 0.0) -> dict:
    # A fixture's record, shaped as `python -m training export-onnx` writes it; the figures were
    # not measured (the tiny model has none to measure), only their difference matters here.
    return {
        "source": "tests: fabricated figures",
        "reference": {"accuracy": 0.9, "lesion_dice": 0.9},
        "variant": {"accuracy": 0.9 + accuracy_delta, "lesion_dice": 0.9},
    }


def publish_joint(
    models: Path,
    version: str,
    onnx_module: torch.nn.Module,
    record: dict,
    probe_of: torch.nn.Module | None = None,
) -> None:
    """A promoted TinyJoint whose model.onnx is `onnx_module`, with (`probe_of`) a probe of that
    module's answers, as export-onnx records model.pt's."""
    work = models.parent / f"work-{version}"
    work.mkdir()
    model_file = work / "model.pt"
    torch.jit.script(TinyJoint().eval()).save(str(model_file))
    metadata = joint_metadata()
    metadata["runtimes"] = [{"runtime": RUNTIME_ONNX, "precision": "fp32", "validation": record}]
    onnx_file = export_onnx(onnx_module, work / "model.onnx")
    probe_file = None
    if probe_of is not None:
        inputs = probe_inputs((3, 64, 64))
        with torch.inference_mode():
            answers = [[t.numpy() for t in probe_of.eval()(torch.from_numpy(b))] for b in inputs]
        probe_file = work / "probe.npz"
        write_probe(probe_file, inputs, answers)
        metadata["probe"] = {"batches": len(inputs), "source": "tests"}
    publish_artifact(
        models, TASK_DIAGNOSIS, version, model_file, metadata, {RUNTIME_ONNX: onnx_file},
        probe_file=probe_file,
    )  # fmt: skip
    promote(models, TASK_DIAGNOSIS, version, GateFloors())


class Disagreeing(TinyJoint):
    """TinyJoint with the lesion logits shifted: a model.onnx that is not model.pt's model."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        classes, masks = super().forward(x)
        return classes, masks + 1.0


@pytest.fixture
def onnx_dir(tmp_path: Path) -> Path:
    publish_joint(tmp_path / "models", "j1", TinyJoint(), validation())
    return tmp_path / "models"


def runtime_series(client) -> list[str]:
    return [
        line
        for line in client.get("/metrics").text.splitlines()
        if line.startswith("busi_model_runtime{")
    ]


def diagnose(client, data: bytes) -> dict:
    response = client.post("/diagnose", content=data, headers={"Content-Type": "image/png"})
    assert response.status_code == 200, response.text
    return response.json()


def test_a_validated_model_onnx_serves_by_default_and_answers_as_model_pt(serve, onnx_dir):
    frame, _ = frame_with_lesion()
    data = png(frame)
    with serve(onnx_dir) as client:
        assert client.get("/models").json()["models"][TASK_DIAGNOSIS]["runtime"] == RUNTIME_ONNX
        assert runtime_series(client) == [
            'busi_model_runtime{runtime="onnxruntime",task="diagnosis",version="j1"} 1.0'
        ]
        onnx_answer = diagnose(client, data)
    with serve(onnx_dir, INFERENCE_RUNTIME="torchscript") as client:
        assert client.get("/models").json()["models"][TASK_DIAGNOSIS]["runtime"] == "torchscript"
        assert runtime_series(client) == [
            'busi_model_runtime{runtime="torchscript",task="diagnosis",version="j1"} 1.0'
        ]
        torch_answer = diagnose(client, data)
    assert onnx_answer["classification"]["label"] == torch_answer["classification"]["label"]
    for label, p in torch_answer["classification"]["probabilities"].items():
        assert onnx_answer["classification"]["probabilities"][label] == pytest.approx(p, abs=1e-4)
    assert onnx_answer["segmentation"]["bbox"] == torch_answer["segmentation"]["bbox"]
    assert onnx_answer["segmentation"]["mask_png"] == torch_answer["segmentation"]["mask_png"]


def test_a_variant_outside_the_validation_bar_does_not_serve(serve, tmp_path, caplog):
    models = tmp_path / "models"
    publish_joint(models, "j1", TinyJoint(), validation(accuracy_delta=-0.02))
    with caplog.at_level(logging.WARNING), serve(models) as client:
        assert client.get("/models").json()["models"][TASK_DIAGNOSIS]["runtime"] == "torchscript"
        assert diagnose(client, png(frame_with_lesion()[0]))["classification"]["label"]
    assert any("not validated within the bar" in r.getMessage() for r in caplog.records)


def test_a_model_onnx_that_disagrees_with_model_pt_does_not_serve(serve, tmp_path, caplog):
    models = tmp_path / "models"
    publish_joint(models, "j1", Disagreeing(), validation())
    with caplog.at_level(logging.ERROR), serve(models, INFERENCE_RUNTIME="onnxruntime") as client:
        assert client.get("/models").json()["models"][TASK_DIAGNOSIS]["runtime"] == "torchscript"
        assert client.get("/readyz").status_code == 200
    assert any("disagrees with model.pt" in r.getMessage() for r in caplog.records)


def _no_model_pt_process(*args, **kwargs):
    raise AssertionError("model.pt was run for the check although the artifact has a probe")


@pytest.mark.parametrize(
    "onnx_module, runtime, logged",
    [
        (TinyJoint, RUNTIME_ONNX, "agrees with model.pt's answers recorded in probe.npz"),
        # the probe holds model.pt's answers; model.onnx is another model
        (
            Disagreeing,
            "torchscript",
            "disagrees with model.pt's answers recorded in probe.npz by 1",
        ),
    ],
)
def test_with_a_probe_model_onnx_is_checked_against_it_without_running_model_pt(
    serve, tmp_path, monkeypatch, caplog, onnx_module, runtime, logged
):
    models = tmp_path / "models"
    publish_joint(models, "j1", onnx_module(), validation(), probe_of=TinyJoint())
    monkeypatch.setattr(registry, "torchscript_outputs", _no_model_pt_process)
    with caplog.at_level(logging.INFO), serve(models) as client:
        assert client.get("/models").json()["models"][TASK_DIAGNOSIS]["runtime"] == runtime
        assert diagnose(client, png(frame_with_lesion()[0]))["classification"]["label"]
    assert logged in caplog.text


def test_an_artifact_without_model_onnx_runs_in_torchscript_quietly(serve, tmp_path, caplog):
    models = tmp_path / "models"
    model_file = tmp_path / "model.pt"
    torch.jit.script(TinyJoint().eval()).save(str(model_file))
    publish_artifact(models, TASK_DIAGNOSIS, "j1", model_file, joint_metadata())
    promote(models, TASK_DIAGNOSIS, "j1", GateFloors())
    with caplog.at_level(logging.WARNING), serve(models) as client:
        assert client.get("/models").json()["models"][TASK_DIAGNOSIS]["runtime"] == "torchscript"
    assert not [r for r in caplog.records if "runs in TorchScript" in r.getMessage()]


def test_batched_onnx_forwards_give_each_request_its_own_result(onnx_dir):
    from service.batching import Batcher, BatchingConfig

    metrics = ServiceMetrics()
    registry = ModelRegistry(onnx_dir, {}, metrics, tasks=(TASK_DIAGNOSIS,))
    config = BatchingConfig(max_batch_size=4, max_queue=64, threads_alone=1, threads_batched=1)
    registry.batcher = Batcher(config, metrics, registry.inference_lock)
    registry.refresh()
    model = registry.get(TASK_DIAGNOSIS)
    assert model.runtime == RUNTIME_ONNX
    rng = np.random.default_rng(1)
    inputs = [rng.normal(i / 8, 0.3, (1, 3, 64, 64)).astype(np.float32) for i in range(16)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda x: registry.forward(model, x), inputs))
    batch_sizes = metrics.batch_size.labels(TASK_DIAGNOSIS)._sum.get()  # images forwarded
    assert batch_sizes == len(inputs)
    scripted = torch.jit.script(TinyJoint().eval())
    for x, (classes, masks) in zip(inputs, results, strict=True):
        expected_classes, expected_masks = scripted(torch.from_numpy(x))
        np.testing.assert_allclose(classes, expected_classes.numpy(), atol=1e-5)
        np.testing.assert_allclose(masks, expected_masks.numpy(), atol=1e-5)
    registry.batcher.stop()


def config_entry(session, key: str) -> str | None:
    try:
        return session.get_session_options().get_session_config_entry(key)
    except Exception:  # onnxruntime raises when the entry is not set
        return None


def test_a_lone_forward_spins_in_its_own_session_with_the_same_answers(onnx_dir):
    from service.batching import Batcher, BatchingConfig

    metrics = ServiceMetrics()
    registry = ModelRegistry(onnx_dir, {}, metrics, tasks=(TASK_DIAGNOSIS,))
    config = BatchingConfig(threads_alone=2, threads_batched=1, spin_us=150)
    registry.batcher = Batcher(config, metrics, registry.inference_lock)
    registry.refresh()
    sessions = registry.get(TASK_DIAGNOSIS).onnx
    quiet, _ = sessions.session(2)
    spinning, _ = sessions.session(2, spinning=True)
    assert spinning is not quiet
    assert config_entry(quiet, "session.intra_op.allow_spinning") == "0"
    assert config_entry(spinning, "session.intra_op.spin_duration_us") == "150"
    assert config_entry(spinning, "session.force_spinning_stop") == "1"  # none after a forward
    x = np.random.default_rng(2).normal(0.5, 0.3, (1, 3, 64, 64)).astype(np.float32)
    for ours, theirs in zip(sessions.run(x, 2, spinning=True), sessions.run(x, 2), strict=True):
        np.testing.assert_array_equal(ours, theirs)
    registry.batcher.stop()


def _config(session, key: str) -> str | None:
    """A session's config entry, None when it was not set."""
    try:
        return session.get_session_options().get_session_config_entry(key)
    except RuntimeError:  # onnxruntime: "SessionOptions does not have configuration with key"
        return None


@pytest.mark.parametrize("arena", [True, False])
def test_the_arena_setting_reaches_every_session_and_changes_no_answer(onnx_dir, arena):
    from service.batching import Batcher, BatchingConfig

    metrics = ServiceMetrics()
    registry = ModelRegistry(onnx_dir, {}, metrics, tasks=(TASK_DIAGNOSIS,))
    config = BatchingConfig(threads_alone=2, threads_batched=1, spin_us=150, onnx_arena=arena)
    registry.batcher = Batcher(config, metrics, registry.inference_lock)
    registry.refresh()
    model = registry.get(TASK_DIAGNOSIS)
    sessions = model.onnx
    made = [sessions.session(2)[0], sessions.session(1)[0], sessions.session(2, spinning=True)[0]]
    assert [s.get_session_options().enable_cpu_mem_arena for s in made] == [arena] * 3
    # With the arena, every session allocates from the process's one shared arena.
    assert [_config(s, "session.use_env_allocators") for s in made] == ["1" if arena else None] * 3
    x = np.random.default_rng(3).normal(0.5, 0.3, (1, 3, 64, 64)).astype(np.float32)
    reference = OnnxSessions.from_file(model.info.path / "model.onnx", arena=not arena)
    for ours, theirs in zip(sessions.run(x, 2), reference.run(x, 2), strict=True):
        np.testing.assert_array_equal(ours, theirs)
    registry.batcher.stop()
