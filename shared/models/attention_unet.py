"""Attention U-Net (Oktay et al., 2018, "Attention U-Net: Learning Where to Look for the
Pancreas"), the seed's segmenter: a plain U-Net whose skip connections pass through additive
attention gates driven by the coarser decoder features.

Layout: five levels of conv-BN-ReLU pairs, max-pool down, upsample + conv up, and at each skip
the additive gate of the common PyTorch reimplementations (gate and skip at the same scale).
The default widths 16-32-64-128-256 are those of the authors' reference code (64-1024 divided by
its default feature_scale of 4); the 64-1024 variant costs 16 times the compute, about 2.5
GMAC per 64x64 image, which is more than a CPU budget of minutes allows for 50 epochs.
"""

from __future__ import annotations

import torch
from torch import nn


class ConvBlock(nn.Sequential):
    """Two conv3x3-BN-ReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class UpConv(nn.Sequential):
    """Upsample x2 (nearest) then conv3x3-BN-ReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Upsample(scale_factor=2.0, mode="nearest"),
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class AttentionGate(nn.Module):
    """Additive attention: alpha = sigmoid(psi(relu(W_g g + W_x x))); returns x * alpha."""

    def __init__(self, gate_channels: int, skip_channels: int, inter_channels: int) -> None:
        super().__init__()
        self.w_g = nn.Sequential(
            nn.Conv2d(gate_channels, inter_channels, 1), nn.BatchNorm2d(inter_channels)
        )
        self.w_x = nn.Sequential(
            nn.Conv2d(skip_channels, inter_channels, 1), nn.BatchNorm2d(inter_channels)
        )
        self.psi = nn.Sequential(nn.Conv2d(inter_channels, 1, 1), nn.BatchNorm2d(1), nn.Sigmoid())
        self.relu = nn.ReLU(inplace=True)

    def forward(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        alpha = self.psi(self.relu(self.w_g(g) + self.w_x(x)))
        return x * alpha


class AttentionUNet(nn.Module):
    """(N, C, S, S) -> (N, 1, S, S) lesion logits; S must be a multiple of 2**(levels - 1)."""

    def __init__(self, in_channels: int = 1, filters: tuple[int, ...] = (16, 32, 64, 128, 256)):
        super().__init__()
        if len(filters) < 2:
            raise ValueError("need at least two levels")
        self.pool = nn.MaxPool2d(2)
        self.encoders = nn.ModuleList()
        channels = in_channels
        for width in filters:
            self.encoders.append(ConvBlock(channels, width))
            channels = width
        self.ups = nn.ModuleList()
        self.gates = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for deep, shallow in zip(filters[::-1][:-1], filters[::-1][1:], strict=True):
            self.ups.append(UpConv(deep, shallow))
            self.gates.append(AttentionGate(shallow, shallow, shallow // 2))
            self.decoders.append(ConvBlock(2 * shallow, shallow))
        self.head = nn.Conv2d(filters[0], 1, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips: list[torch.Tensor] = []
        for i, encoder in enumerate(self.encoders):
            if i > 0:
                x = self.pool(x)
            x = encoder(x)
            skips.append(x)
        y = skips[-1]
        n = len(skips)
        # TorchScript knows no zip(strict=...); the three lists are built together above.
        for i, (up, gate, decoder) in enumerate(zip(self.ups, self.gates, self.decoders)):  # noqa: B905
            skip = skips[n - 2 - i]
            y = up(y)
            y = decoder(torch.cat([gate(y, skip), y], dim=1))
        return self.head(y)
