"""A joint (diagnosis) artifact: one forward answers /classify, /segment and /diagnose."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from service_inputs import png
from tiny_manifests import promote_unchecked, write_unchecked_artifact
from torch import nn

from shared.labels import CLASS_NAMES, TASK_CLASSIFICATION, TASK_DIAGNOSIS, TASK_SEGMENTATION
from shared.manifest import ManifestError
from shared.preprocessing import Preprocessing
from shared.promotion import GateFloors, promote
from shared.store import publish_artifact

PRE = Preprocessing(resize=64, resize_mode="letterbox", trim_border=True)


class TinyJoint(nn.Module):
    """Class logits rigged on the mean grey value (dark: normal, mid: benign, bright: malignant),
    lesion logit 20 (x - 0.5) per pixel, x the normalised grey value."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("rig", torch.tensor([-4.0, 0.0, 4.0]))
        self.register_buffer("bias", torch.tensor([-2.0, 0.0, -2.0]))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = x.mean(dim=(1, 2, 3)).unsqueeze(1)
        return s * self.rig + self.bias, 20.0 * (x.mean(dim=1, keepdim=True) - 0.5)


def joint_metadata(mask_side: int = 64) -> dict:
    return {
        "name": "tiny-joint",
        "architecture": "tiny_joint",
        "created_at": "2026-01-01T00:00:00+00:00",
        "preprocessing": PRE.to_metadata(),
        "input": {"channels": 3, "height": 64, "width": 64, "dtype": "float32"},
        "output": {
            "type": "joint",
            "classes": {"type": "logits", "shape": [3]},
            "mask": {"type": "logits", "shape": [1, mask_side, mask_side], "threshold": 0.5},
        },
        "class_names": list(CLASS_NAMES),
        "metrics": {
            "kind": "cross-validated",
            "cross_validation": {"plain": {"accuracy": 0.9, "lesion_dice": 0.9, "n": 100}},
        },
        "training": {"preset": "tiny"},
        "data_fingerprint": {"sha256": "0" * 64},
        "framework": {"torch": torch.__version__},
        "intended_use": "tests only",
    }


@pytest.fixture
def joint_dir(tmp_path: Path) -> Path:
    model_file = tmp_path / "joint.pt"
    torch.jit.script(TinyJoint().eval()).save(str(model_file))
    publish_artifact(tmp_path / "models", TASK_DIAGNOSIS, "j1", model_file, joint_metadata())
    promote(tmp_path / "models", TASK_DIAGNOSIS, "j1", GateFloors())
    return tmp_path / "models"


def frame_with_lesion() -> tuple[np.ndarray, np.ndarray]:
    """A 4:3 frame: black side margins, a mid-grey scan, one bright rectangle (the "lesion")."""
    frame = np.zeros((120, 160), dtype=np.uint8)
    frame[:, 20:140] = 110
    frame[40:70, 60:100] = 250
    truth = np.zeros_like(frame, dtype=bool)
    truth[40:70, 60:100] = True
    return frame, truth


def inference_count(client, task: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(f'busi_stage_duration_seconds_count{{stage="inference",task="{task}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_joint_model_alone_makes_the_service_ready_and_answers_every_endpoint(serve, joint_dir):
    frame, truth = frame_with_lesion()
    data = png(frame)
    with serve(joint_dir) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["models"][TASK_DIAGNOSIS] is True  # the version: in /models

        before = inference_count(client, TASK_DIAGNOSIS)
        response = client.post("/diagnose", content=data, headers={"Content-Type": "image/png"})
        assert response.status_code == 200
        body = response.json()
        assert inference_count(client, TASK_DIAGNOSIS) == before + 1  # one forward for both
        assert body["classification"]["label"] == "benign"
        assert body["classification"]["model"] == {"name": "tiny-joint", "version": "j1"}
        mask = np.asarray(
            Image.open(io.BytesIO(base64.b64decode(body["segmentation"]["mask_png"])))
        )
        assert mask.shape == frame.shape
        predicted = mask > 0
        dice = 2 * (predicted & truth).sum() / (predicted.sum() + truth.sum())
        assert dice > 0.9  # the letterboxed, trimmed map lands back on the frame's lesion
        assert body["segmentation"]["bbox"]["x"] in range(58, 63)

        classify = client.post("/classify", content=data, headers={"Content-Type": "image/png"})
        assert classify.status_code == 200
        assert classify.json()["model"]["name"] == "tiny-joint"
        segment = client.post("/segment", content=data, headers={"Content-Type": "image/png"})
        assert segment.status_code == 200
        assert segment.json()["model"]["name"] == "tiny-joint"

        described = client.get("/models").json()["models"][TASK_DIAGNOSIS]
        assert described["metrics"]["kind"] == "cross-validated"
        assert described["output"]["type"] == "joint"


def test_diagnose_returns_no_mask_when_the_joint_model_says_normal(serve, joint_dir):
    dark = np.full((80, 80), 20, dtype=np.uint8)
    with serve(joint_dir) as client:
        response = client.post(
            "/diagnose", content=png(dark), headers={"Content-Type": "image/png"}
        )
        assert response.status_code == 200
        assert response.json()["classification"]["label"] == "normal"
        assert response.json()["segmentation"] is None


def test_joint_model_is_preferred_over_separate_ones(serve, joint_dir, publish_tiny):
    publish_tiny(joint_dir, TASK_CLASSIFICATION, "v1")
    publish_tiny(joint_dir, TASK_SEGMENTATION, "v1")
    with serve(joint_dir) as client:
        response = client.post("/classify", content=png(), headers={"Content-Type": "image/png"})
        assert response.status_code == 200
        assert response.json()["model"]["name"] == "tiny-joint"


def test_joint_artifact_whose_mask_disagrees_with_its_manifest_is_refused(serve, tmp_path, caplog):
    model_file = tmp_path / "joint.pt"
    torch.jit.script(TinyJoint().eval()).save(str(model_file))
    with pytest.raises(ManifestError, match=r"output.mask.shape must be \[1, 64, 64\]"):
        publish_artifact(tmp_path / "m", TASK_DIAGNOSIS, "j1", model_file, joint_metadata(32))
    # written around publish_artifact's validation: the service refuses it all the same
    write_unchecked_artifact(tmp_path / "m", TASK_DIAGNOSIS, "j1", model_file, joint_metadata(32))
    promote_unchecked(tmp_path / "m", TASK_DIAGNOSIS, "j1")
    with serve(tmp_path / "m") as client:
        assert client.get("/readyz").status_code == 503
        assert client.get("/models").json()["models"][TASK_DIAGNOSIS] is None
    assert "output.mask.shape must be [1, 64, 64]" in caplog.text
