"""Fixtures shared by the test suites: a tiny model registry built in a temporary folder.

The tiny models are real TorchScript artifacts published with shared.store, but their output
is rigged to depend on the input in a way a test can predict:

* the classifier's logits are [-4 s - 2, 0, 4 s - 2] (plus a small contribution of its conv
  layers), where s is the mean of the normalised input: a dark image is "normal", a mid-grey one
  (s near 0, a pixel mean near 115) "benign", a bright one "malignant";
* the segmenter's lesion logit at each pixel is 20 (x - 0.5), x the normalised grey value, so
  every pixel brighter than about 143 is lesion.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_manifests import classification_metadata, segmentation_metadata
from torch import nn

from shared.labels import CLASS_NAMES, TASK_CLASSIFICATION, TASK_SEGMENTATION
from shared.promotion import GateFloors
from shared.promotion import promote as promote_version
from shared.store import ArtifactInfo, publish_artifact


class TinyClassifier(nn.Module):
    def __init__(self, num_classes: int = len(CLASS_NAMES)) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, stride=2), nn.ReLU()
        )
        self.head = nn.Linear(8, num_classes)
        self.register_buffer("rig", torch.tensor([-4.0, 0.0, 4.0])[:num_classes])
        self.register_buffer("bias", torch.tensor([-2.0, 0.0, -2.0])[:num_classes])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        learned = self.head(self.features(x).mean(dim=(2, 3)))
        s = x.mean(dim=(1, 2, 3)).unsqueeze(1)
        return s * self.rig + self.bias + 0.01 * learned


class TinySegmenter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        learned = self.conv2(torch.relu(self.conv1(x)))
        return 20.0 * (x.mean(dim=1, keepdim=True) - 0.5) + 0.01 * torch.tanh(learned)


class BrokenSegmenter(nn.Module):
    """Scripts fine, fails at its first forward: a version that must never replace a good one."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(-1, 7, 3)


@pytest.fixture(scope="session")
def tiny_model_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """TorchScript files of the tiny models, scripted once per session."""
    folder = tmp_path_factory.mktemp("tiny-models")
    torch.manual_seed(0)
    files = {}
    for key, module in {
        TASK_CLASSIFICATION: TinyClassifier(),
        TASK_SEGMENTATION: TinySegmenter(),
        "broken-segmentation": BrokenSegmenter(),
    }.items():
        files[key] = folder / f"{key}.pt"
        torch.jit.script(module.eval()).save(str(files[key]))
    return files


PublishTiny = Callable[..., ArtifactInfo]


@pytest.fixture(scope="session")
def publish_tiny(tiny_model_files: dict[str, Path]) -> PublishTiny:
    """publish_tiny(model_dir, task, version, created_at=..., model="<task>", promote=True,
    **metadata): publish a tiny model and (unless promote=False) promote it, as an operator
    would, so that it serves."""

    def publish(
        model_dir: Path,
        task: str,
        version: str,
        *,
        created_at: str = "2026-01-01T00:00:00+00:00",
        model: str | None = None,
        promote: bool = True,
        **overrides: Any,
    ) -> ArtifactInfo:
        metadata = (
            classification_metadata() if task == TASK_CLASSIFICATION else segmentation_metadata()
        )
        metadata.update(created_at=created_at, **overrides)
        info = publish_artifact(model_dir, task, version, tiny_model_files[model or task], metadata)
        if promote:  # what `python -m training promote` does: the gate, then the record
            promote_version(model_dir, task, version, GateFloors())
        return info

    return publish


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, publish_tiny: PublishTiny) -> Path:
    """A registry with one good version of each task ("v1"). Treat it as read-only."""
    model_dir = tmp_path_factory.mktemp("registry")
    publish_tiny(model_dir, TASK_CLASSIFICATION, "v1")
    publish_tiny(model_dir, TASK_SEGMENTATION, "v1")
    return model_dir
