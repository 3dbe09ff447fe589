"""Test-time augmentation baked into the exported network, so the service needs no extra step."""

from __future__ import annotations

import torch
from torch import nn


class HorizontalFlipAverage(nn.Module):
    """Average the logits of a dense predictor over the image and its mirror image.

    The output is still logits of the same shape, so the artifact's output contract (and the
    service's postprocessing) does not change; inference costs two forward passes.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mirrored = self.model(torch.flip(x, dims=[-1]))
        return 0.5 * (self.model(x) + torch.flip(mirrored, dims=[-1]))
