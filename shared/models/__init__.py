"""Model definitions shared by training and (for tests and tooling) the service, by name.

    model = build_model("efficientnet_lite0", num_classes=3, pretrained=True)

The registry maps a name (the `architecture` field of an artifact's metadata) to a builder that
takes keyword arguments and returns an nn.Module. To add a network, add one line to MODELS.
Builders import their heavy dependencies (timm, torchvision) lazily.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from shared.models import attention_unet, classifiers, joint, unet

MODELS: dict[str, Callable[..., nn.Module]] = {
    # classification
    "resnet18": classifiers.resnet18,
    "efficientnet_lite0": classifiers.efficientnet_lite0,
    # segmentation
    "attention_unet": attention_unet.AttentionUNet,
    "unet_effnet_lite0": unet.UNetEffLite0,
    "gated_unet_effnet_lite0": unet.GatedUNetEffLite0,
    # both at once: class logits and lesion logits from one forward
    "joint_unet": joint.JointUNet,
}


def available_models() -> tuple[str, ...]:
    return tuple(sorted(MODELS))


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the network registered as `name`. Raises ValueError listing the valid names."""
    try:
        builder = MODELS[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}; valid models: {', '.join(available_models())}"
        ) from None
    return builder(**kwargs)
