"""shared.inference: an artifact loaded in each runtime it ships, frames in, findings out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from shared.calibration import Calibration
from shared.inference import (
    RUNTIME_TORCHSCRIPT,
    InferenceModel,
    ModelSpec,
    load_artifact,
    module_forward,
    predict,
)
from shared.labels import CLASS_NAMES, TASK_DIAGNOSIS
from shared.models import available_models
from shared.postprocessing import softmax
from shared.preprocessing import Preprocessing
from shared.store import publish_artifact, verify_artifact
from shared.variants import RUNTIME_ONNX

PRE = Preprocessing(resize=64, resize_mode="letterbox", trim_border=True)


class Joint(nn.Module):
    """Class logits linear in the mean grey value (dark: normal), lesion logits from the grey
    value of each pixel."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = x.mean(dim=(1, 2, 3)).unsqueeze(1)
        classes = torch.cat([-3.0 * s - 1.0, 0.5 * s, 3.0 * s - 1.5], dim=1)
        return classes, 12.0 * (x[:, :1] - 0.4)


def metadata(onnx: bool = False) -> dict:
    data = {
        "name": "tiny-joint",
        "architecture": "tiny_joint",
        "preprocessing": PRE.to_metadata(),
        "input": {"channels": 3, "height": 64, "width": 64, "dtype": "float32"},
        "output": {
            "type": "joint",
            "classes": {"type": "logits", "shape": [3], "temperature": 2.0},
            "mask": {"type": "logits", "shape": [1, 64, 64], "threshold": 0.5},
        },
        "class_names": list(CLASS_NAMES),
        "metrics": {"test": {"accuracy": 0.9, "n": 10}},
        "training": {"preset": "tiny"},
        "data_fingerprint": {"sha256": "0" * 64},
        "framework": {"torch": torch.__version__},
        "intended_use": "tests only",
    }
    if onnx:
        record = {"reference": {"accuracy": 0.9}, "variant": {"accuracy": 0.9}}
        data["runtimes"] = [{"runtime": RUNTIME_ONNX, "precision": "fp32", "validation": record}]
    return data


def frames(n: int = 5) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        frame = np.zeros((60 + 7 * i, 90 - 5 * i), np.uint8)
        frame[4:-4, 6:-6] = rng.integers(20, 200, size=(frame.shape[0] - 8, frame.shape[1] - 12))
        frame[20:40, 30:50] = 230
        out.append(frame)
    return out


def publish(tmp_path: Path, onnx: bool = False):
    work = tmp_path / "work"
    work.mkdir()
    torch.jit.script(Joint().eval()).save(str(work / "model.pt"))
    files = {}
    if onnx:
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnx")
        torch.onnx.export(
            Joint().eval(), (torch.zeros((1, 3, 64, 64)),), str(work / "model.onnx"),
            input_names=["x"], output_names=["classes", "masks"],
            dynamic_axes={"x": {0: "n"}, "classes": {0: "n"}, "masks": {0: "n"}}, dynamo=False,
        )  # fmt: skip
        files = {RUNTIME_ONNX: work / "model.onnx"}
    models = tmp_path / "models"
    publish_artifact(models, TASK_DIAGNOSIS, "v1", work / "model.pt", metadata(onnx), files)
    return verify_artifact(models, TASK_DIAGNOSIS, "v1")


def test_findings_are_the_served_steps_frame_by_frame(tmp_path):
    info = publish(tmp_path)
    model = load_artifact(info)
    assert model.runtime == RUNTIME_TORCHSCRIPT
    found = predict(model, frames(), batch_size=2)
    module = Joint().eval()
    for pixels, f in zip(frames(), found, strict=True):
        layout = PRE.layout(pixels)
        x = torch.from_numpy(PRE.normalise(PRE.resize_image(pixels, layout))[None])
        classes, masks = (t.numpy() for t in module(x))
        np.testing.assert_allclose(f.logits, classes[0], atol=1e-6)
        np.testing.assert_allclose(f.probabilities, softmax(classes[0] / 2.0), atol=1e-6)
        prob = 1.0 / (1.0 + np.exp(-masks[0, 0].astype(np.float64)))
        expected = PRE.frame_map(prob.astype(np.float32), layout)
        np.testing.assert_allclose(f.lesion_map, expected, atol=1e-5)
        assert f.mask.shape == pixels.shape and f.mask.dtype == np.uint8
        assert set(np.unique(f.mask)) <= {0, 255}
        assert f.quality is None


def test_batching_does_not_change_a_finding(tmp_path):
    model = load_artifact(publish(tmp_path))
    one = predict(model, frames(), batch_size=1)
    many = predict(model, frames(), batch_size=16)
    for a, b in zip(one, many, strict=True):
        assert np.array_equal(a.logits, b.logits)
        assert np.array_equal(a.lesion_map, b.lesion_map)
        assert np.array_equal(a.mask, b.mask)


def test_segment_lesion_leaves_frames_labelled_normal_without_a_mask():
    spec = ModelSpec(PRE, CLASS_NAMES, Calibration())
    dark = np.full((50, 60), 5, np.uint8)  # normal on the rigged logits
    found = predict(InferenceModel(module_forward(Joint().eval()), spec), [dark], segment="lesion")
    assert found[0].label(CLASS_NAMES) == "normal"
    assert found[0].mask is None and found[0].lesion_map is None


def test_model_onnx_serves_where_it_holds_and_gives_model_pt_findings(tmp_path):
    info = publish(tmp_path, onnx=True)
    onnx = load_artifact(info, threads=1)
    scripted = load_artifact(info, runtime=RUNTIME_TORCHSCRIPT)
    assert onnx.runtime == RUNTIME_ONNX and scripted.runtime == RUNTIME_TORCHSCRIPT
    for a, b in zip(predict(onnx, frames()), predict(scripted, frames()), strict=True):
        np.testing.assert_allclose(a.logits, b.logits, atol=1e-4)
        assert a.label(CLASS_NAMES) == b.label(CLASS_NAMES)
        assert (a.mask != b.mask).mean() < 0.01


def test_the_joint_network_is_in_the_model_registry():
    assert "joint_unet" in available_models()
