"""/classify runs the artifact's classify-only graph, the quality verdict comes from the graph's
own score where it computes one, and only the models that serve are loaded."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from service_inputs import png
from test_joint_model import TinyJoint, frame_with_lesion, joint_metadata

from service.metrics import ServiceMetrics
from service.predictors import ImageRequest
from service.registry import ModelRegistry
from shared.labels import TASK_CLASSIFICATION, TASK_DIAGNOSIS, TASK_SEGMENTATION
from shared.postprocessing import class_probabilities
from shared.preprocessing import Preprocessing
from shared.promotion import GateFloors, demote, promote
from shared.quality import FEATURE_REASON
from shared.store import publish_artifact
from shared.variants import GRAPH_CLASSIFY, RUNTIME_ONNX

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


class Graph(torch.nn.Module):
    """TinyJoint as a runtime file computes it: the full graph or the classify-only one, with a
    rigged quality score (bright frames score 3: flagged) and `shift` moving the class logits
    (a classify graph a little off the full one, as reordered float arithmetic may be)."""

    def __init__(self, classify: bool, quality: bool = True, shift: float = 0.0) -> None:
        super().__init__()
        self.joint = TinyJoint()
        self.classify, self.quality, self.shift = classify, quality, shift

    def names(self) -> list[str]:
        names = ["classes"] if self.classify else ["classes", "masks"]
        return names + (["quality"] if self.quality else [])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        classes, masks = self.joint(x)
        shifted = classes + self.shift * torch.tensor([1.0, 0.0, -1.0])
        outputs = (shifted,) if self.classify else (classes, masks)
        if self.quality:
            outputs += (torch.where(x.mean(dim=(1, 2, 3)) > 1.0, 3.0, 0.25),)
        return outputs


def export(module: Graph, path: Path) -> Path:
    names = module.names()
    torch.onnx.export(
        module.eval(),
        (torch.zeros((1, 3, 64, 64)),),
        str(path),
        input_names=["x"],
        output_names=names,
        dynamic_axes={"x": {0: "n"}, **{name: {0: "n"} for name in names}},
        dynamo=False,
    )
    return path


RECORD = {  # fabricated figures shaped as export-onnx writes them; only their difference matters
    "source": "tests: fabricated figures",
    "reference": {"accuracy": 0.9, "macro_auc": 0.9},
    "variant": {"accuracy": 0.9, "macro_auc": 0.9},
}


def publish_joint(
    models: Path,
    version: str,
    classify: Graph | None,
    quality: bool = True,
    classify_record: dict | None = None,
) -> None:
    work = models.parent / f"work-{version}"
    work.mkdir()
    torch.jit.script(TinyJoint().eval()).save(str(work / "model.pt"))
    metadata = joint_metadata()
    runtimes = [{"runtime": RUNTIME_ONNX, "precision": "fp32", "validation": RECORD}]
    files = {"model.onnx": export(Graph(classify=False, quality=quality), work / "model.onnx")}
    if classify is not None:
        runtimes.append({
            "runtime": RUNTIME_ONNX, "graph": GRAPH_CLASSIFY, "precision": "fp32",
            "validation": classify_record or RECORD,
        })  # fmt: skip
        files["classify.onnx"] = export(classify, work / "classify.onnx")
    metadata["runtimes"] = runtimes
    publish_artifact(models, TASK_DIAGNOSIS, version, work / "model.pt", metadata, files)
    promote(models, TASK_DIAGNOSIS, version, GateFloors())


def post(client, path: str, data: bytes) -> dict:
    response = client.post(path, content=data, headers={"Content-Type": "image/png"})
    assert response.status_code == 200, response.text
    return response.json()


def expected_probabilities(client, data: bytes, module: torch.nn.Module) -> dict[str, float]:
    runtime = client.app.state.runtime
    model = runtime.registry.get(TASK_DIAGNOSIS)
    pixels = runtime.predictor.decode(ImageRequest(data)).pixels
    batch = Preprocessing.from_metadata(model.info.metadata["preprocessing"])(pixels)[None]
    with torch.no_grad():
        logits = module(torch.from_numpy(batch))[0][0].numpy()
    return class_probabilities(model.calibration.apply(logits), model.class_names)


def test_classify_runs_the_classify_graph_and_diagnose_the_full_one(serve, tmp_path):
    models = tmp_path / "models"
    shifted = Graph(classify=True, shift=0.005)  # within the agreement tolerance, yet visible
    publish_joint(models, "j1", shifted)
    data = png(frame_with_lesion()[0])
    with serve(models) as client:
        model = client.app.state.runtime.registry.get(TASK_DIAGNOSIS)
        assert model.graphs == ("full", GRAPH_CLASSIFY)
        classified = post(client, "/classify", data)["probabilities"]
        diagnosed = post(client, "/diagnose", data)["classification"]["probabilities"]
        from_classify = expected_probabilities(client, data, shifted)
        from_full = expected_probabilities(client, data, Graph(classify=True))
    for label in classified:
        assert classified[label] == pytest.approx(from_classify[label], abs=1e-5)
        assert diagnosed[label] == pytest.approx(from_full[label], abs=1e-5)
    assert any(abs(classified[k] - diagnosed[k]) > 1e-4 for k in classified)


def test_a_classify_graph_that_disagrees_with_the_full_one_is_not_used(serve, tmp_path, caplog):
    models = tmp_path / "models"
    publish_joint(models, "j1", Graph(classify=True, shift=1.0))
    data = png(frame_with_lesion()[0])
    with caplog.at_level(logging.ERROR), serve(models) as client:
        assert client.get("/models").json()["models"][TASK_DIAGNOSIS]["runtime"] == RUNTIME_ONNX
        assert client.app.state.runtime.registry.get(TASK_DIAGNOSIS).graphs == ("full",)
        classified = post(client, "/classify", data)["probabilities"]
        diagnosed = post(client, "/diagnose", data)["classification"]["probabilities"]
    assert classified == diagnosed
    assert any("classify.onnx disagrees with model.onnx" in r.getMessage() for r in caplog.records)


def test_a_classify_graph_outside_the_bar_is_not_used(serve, tmp_path, caplog):
    models = tmp_path / "models"
    worse = {**RECORD, "variant": {"accuracy": 0.88, "macro_auc": 0.9}}
    publish_joint(models, "j1", Graph(classify=True), classify_record=worse)
    with caplog.at_level(logging.WARNING), serve(models) as client:
        assert client.app.state.runtime.registry.get(TASK_DIAGNOSIS).graphs == ("full",)
        assert post(client, "/classify", png(frame_with_lesion()[0]))["label"]
    assert any("classify.onnx was not validated" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("path", ["/classify", "/segment", "/diagnose"])
def test_the_quality_verdict_is_the_graphs_own_score(serve, tmp_path, path):
    models = tmp_path / "models"
    publish_joint(models, "j1", Graph(classify=True))
    bright = np.full((120, 160), 250, dtype=np.uint8)  # the rigged score flags it
    bright[::7, :] = 240
    with serve(models) as client:
        flagged = post(client, path, png(bright))["quality"]
        passed = post(client, path, png(frame_with_lesion()[0]))["quality"]
    assert flagged == {"in_distribution": False, "score": 3.0, "reasons": [FEATURE_REASON]}
    assert passed == {"in_distribution": True, "score": 0.25, "reasons": []}


def test_without_a_score_in_its_graphs_the_image_statistics_decide(serve, tmp_path):
    models = tmp_path / "models"
    publish_joint(models, "j1", Graph(classify=True, quality=False), quality=False)
    with serve(models) as client:
        detector = client.app.state.runtime.predictor.detector
        frame = frame_with_lesion()[0]
        quality = post(client, "/classify", png(frame))["quality"]
    expected = detector.assess(frame)
    assert quality["in_distribution"] == expected.in_distribution
    assert quality["score"] == pytest.approx(expected.score)


def test_only_the_joint_model_is_loaded_while_it_serves(tmp_path, publish_tiny):
    models = tmp_path / "models"
    publish_tiny(models, TASK_CLASSIFICATION, "c1")
    publish_tiny(models, TASK_SEGMENTATION, "s1")
    publish_joint(models, "j1", Graph(classify=True))
    registry = ModelRegistry(models, {}, ServiceMetrics())
    registry.refresh()
    assert set(registry.loaded()) == {TASK_DIAGNOSIS}
    assert registry.ready

    demote(models, TASK_DIAGNOSIS, "j1")  # no joint model any more: the separate ones load
    registry.refresh()
    assert set(registry.loaded()) == {TASK_CLASSIFICATION, TASK_SEGMENTATION}
    assert registry.ready

    promote(models, TASK_DIAGNOSIS, "j1", GateFloors())  # and are let go again
    registry.refresh()
    assert set(registry.loaded()) == {TASK_DIAGNOSIS}


def test_the_torchscript_module_is_not_kept_once_model_onnx_serves(tmp_path):
    models = tmp_path / "models"
    publish_joint(models, "j1", None)
    registry = ModelRegistry(models, {}, ServiceMetrics())
    registry.refresh()
    model = registry.get(TASK_DIAGNOSIS)
    assert model.runtime == RUNTIME_ONNX and model.module is None
    assert model.graphs == ("full",)
    torchscript = ModelRegistry(models, {}, ServiceMetrics(), inference_runtime="torchscript")
    torchscript.refresh()
    assert torchscript.get(TASK_DIAGNOSIS).module is not None


_NO_TORCH_SCRIPT = """
import io, sys
import numpy as np
from PIL import Image
from fastapi.testclient import TestClient
from service.app import create_app
from service.settings import Settings
png = io.BytesIO()
Image.fromarray(np.full((64, 64), 90, np.uint8)).save(png, format="PNG")
with TestClient(create_app(Settings(MODEL_DIR=sys.argv[1], RELOAD_INTERVAL_S=0))) as client:
    answer = client.post("/classify", content=png.getvalue(), headers={"Content-Type": "image/png"})
    print(answer.status_code, client.get("/models").json()["models"]["diagnosis"]["runtime"])
print("torch imported:", "torch" in sys.modules)
"""


def test_a_service_that_serves_onnx_runtime_never_imports_torch(tmp_path):
    models = tmp_path / "models"
    publish_joint(models, "j1", Graph(classify=True))
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", _NO_TORCH_SCRIPT, str(models)],
        capture_output=True, text=True, cwd=repo, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[:2] == ["200 onnxruntime", "torch imported: False"]
