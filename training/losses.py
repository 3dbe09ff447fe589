"""The training losses of every task and the class weights they use.

- `DiceBCELoss`: BCE-with-logits + (1 - soft Dice) over the batch (the segmentation recipes;
  `segmentation_loss(name)` picks theirs by name);
- `JointLoss`: class-weighted, label-smoothed cross-entropy + mask_weight * (BCE + soft Dice)
  (the joint recipes);
- `class_weights`: inverse-frequency class weights (a rare class counts more).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shared.labels import CLASS_NAMES


def class_weights(
    labels: list[int],
    num_classes: int = len(CLASS_NAMES),
    *,
    mean_one: bool = False,
    draw_weights: np.ndarray | None = None,
) -> torch.Tensor:
    """Inverse-frequency weights n / (K * count) (a rare class counts more; an absent class as if
    it had one image); with `mean_one`, scaled to mean 1 (the classification recipes). With
    `draw_weights` (each label's probability of being drawn, e.g. `training.data.site_weights`)
    the counts are those an epoch is expected to show, scaled to len(labels) images."""
    expected = None  # each image counts once
    if draw_weights is not None:
        share = np.asarray(draw_weights, dtype=np.float64)
        expected = share * (len(labels) / share.sum())
    counts = np.bincount(np.asarray(labels), weights=expected, minlength=num_classes)
    counts = counts.astype(np.float64)
    weights = counts.sum() / (num_classes * np.maximum(counts, 1.0))
    return torch.tensor(weights / weights.mean() if mean_one else weights, dtype=torch.float32)


class DiceBCELoss(nn.Module):
    """BCE-with-logits plus (1 - soft Dice) over the whole batch.

    The batch-level Dice stays defined when a batch holds normal scans with empty masks, and
    the smoothing term keeps its gradient finite there.
    """

    def __init__(self, smooth: float = 1.0) -> None:
        super().__init__()
        self.smooth = smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        bce = F.binary_cross_entropy_with_logits(logits, target)
        prob = torch.sigmoid(logits)
        inter = (prob * target).sum()
        dice = (2.0 * inter + self.smooth) / (prob.sum() + target.sum() + self.smooth)
        return bce + (1.0 - dice)


def segmentation_loss(name: str) -> nn.Module:
    """The segmentation recipes' loss by name: "bce" or "dice_bce". Raises ValueError otherwise."""
    if name == "bce":
        return nn.BCEWithLogitsLoss()
    if name == "dice_bce":
        return DiceBCELoss()
    raise ValueError(f"unknown loss {name!r}")


class JointLoss(nn.Module):
    """Cross-entropy (class-weighted, label-smoothed) + mask_weight * (BCE + batch soft Dice)."""

    def __init__(
        self, class_weights: torch.Tensor | None, label_smoothing: float, mask_weight: float
    ) -> None:
        super().__init__()
        self.ce = nn.CrossEntropyLoss(weight=class_weights, label_smoothing=label_smoothing)
        self.mask_weight = mask_weight

    def forward(
        self,
        outputs: tuple[torch.Tensor, torch.Tensor],
        targets: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        class_logits, mask_logits = outputs
        labels, masks = targets
        bce = F.binary_cross_entropy_with_logits(mask_logits, masks)
        prob = torch.sigmoid(mask_logits)
        dice = (2.0 * (prob * masks).sum() + 1.0) / (prob.sum() + masks.sum() + 1.0)
        # DiceBCELoss's terms, summed in the order the joint models were trained with: floating
        # point addition is not associative, and a recipe must train the same model bit for bit.
        return self.ce(class_logits, labels) + self.mask_weight * (bce + 1.0 - dice)
