"""TorchScript export (checked equal to eager), manifest building, atomic publishing."""

import pytest
import torch
from torch import nn

from shared.preprocessing import Preprocessing
from shared.store import verify_artifact
from training.export import (
    ExportMismatchError,
    build_metadata,
    export_torchscript,
    publish,
)


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean(dim=(2, 3)))


class _Untraceable(nn.Module):
    """Scripting fails (a Python-only call) and the traced graph freezes a data-dependent branch."""

    def forward(self, x, *rest):  # *rest: TorchScript cannot compile varargs
        if bool(x.sum() > 0):  # data-dependent: a trace records only one side
            return x * 2
        return x * -1


def test_export_scripts_and_matches_eager():
    model = _Tiny()
    scripted = export_torchscript(model, torch.randn(1, 3, 16, 16))
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(scripted(x), model(x))


def test_export_raises_when_the_export_differs_from_eager():
    with pytest.raises(ExportMismatchError):
        export_torchscript(_Untraceable(), torch.ones(1, 3, 4, 4), n_random=4)


def test_publish_writes_a_verified_artifact(tmp_path):
    model = _Tiny()
    pre = Preprocessing(resize=16)
    scripted = export_torchscript(model, torch.randn(1, 3, 16, 16))
    metadata = build_metadata(
        task="classification",
        name="tiny-cls",
        architecture="tiny",
        preprocessing=pre,
        output={"type": "logits", "shape": [3]},
        metrics={"test": {"accuracy": 1.0}},
        training={"preset": "tiny"},
        data_fingerprint={"sha256": "0" * 64, "n_images": 1},
        class_names=("normal", "benign", "malignant"),
    )
    info = publish(tmp_path, "classification", "v1", scripted, metadata)
    again = verify_artifact(tmp_path, "classification", "v1")
    assert again.sha256 == info.sha256
    assert again.metadata["class_names"] == ["normal", "benign", "malignant"]
    assert again.metadata["input"]["height"] == 16
    assert "not a medical device" in again.metadata["intended_use"]
    loaded = torch.jit.load(str(info.model_path))
    x = torch.randn(1, 3, 16, 16)
    torch.testing.assert_close(loaded(x), model.eval()(x))


def test_build_metadata_rejects_a_classifier_without_class_names():
    with pytest.raises(ValueError):
        build_metadata(
            task="classification",
            name="n",
            architecture="a",
            preprocessing=Preprocessing(resize=8),
            output={},
            metrics={},
            training={},
            data_fingerprint={},
        )
