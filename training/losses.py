"""The training losses of every task and the class weights they use.

- `DiceBCELoss`: BCE-with-logits + (1 - soft Dice) over the batch (the segmentation recipes;
  `segmentation_loss(name)` picks theirs by name);
- `JointLoss`: class-weighted, label-smoothed cross-entropy + mask_weight * (BCE + soft Dice)
  (the joint recipes);
- `SiteAdversarialLoss`: a joint loss plus a site-adversarial term on the encoder's pooled
  features, through gradient reversal and conditioned on the class (the two-site recipes);
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


class _ReverseGradient(torch.autograd.Function):
    """Identity forward; the gradient multiplied by -scale backward (Ganin & Lempitsky 2015)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor):
        return -ctx.scale * grad, None


def reverse_gradient(x: torch.Tensor, scale: float) -> torch.Tensor:
    return _ReverseGradient.apply(x, scale)


class FeatureTap:
    """The last training forward's pooled deepest encoder features (N, `width`), taken by a
    forward hook on the encoder (a timm features_only encoder: its `feature_info` gives the
    width). Eval-mode and no-grad forwards are not taken, so scoring and export are untouched
    while the hook is registered; `remove` unregisters it."""

    def __init__(self, encoder: nn.Module) -> None:
        self.features: torch.Tensor | None = None
        self.width: int = encoder.feature_info.channels()[-1]
        self._handle = encoder.register_forward_hook(self._take)

    def _take(self, module: nn.Module, inputs: object, output: list[torch.Tensor]) -> None:
        if module.training and torch.is_grad_enabled():
            self.features = output[-1].mean(dim=(2, 3))

    def pop(self) -> torch.Tensor:
        features, self.features = self.features, None
        if features is None:
            raise RuntimeError("no training forward of the encoder since the last loss")
        return features

    def remove(self) -> None:
        self._handle.remove()
        self.features = None


class SiteAdversarialLoss(nn.Module):
    """`base` (the joint loss) + the cross-entropy of a small site classifier that reads the
    encoder's pooled features through gradient reversal: the classifier learns to tell the sites
    apart, the encoder gets that gradient reversed and scaled by up to `weight`, pushing it to
    make them indistinguishable (DANN, Ganin et al. 2016).

    Conditioned on the class (the true class, one-hot, beside the features; CDAN-style): the
    sites need only look alike *within* a class. An unconditioned adversary would fight the class
    head wherever a class comes from one site only (BUS-BRA has no normal scans), which is the
    link between site and class this term is meant to break, not to learn.

    The reversal's strength rises from 0 to `weight` over training (2 / (1 + exp(-10 p)) - 1 of
    it at progress p, DANN's schedule), p counted in the steps of the per-batch scheduler
    (`schedule`, set with `total_steps` once the optimiser knows the epoch's length; it is
    checkpointed, so a resumed run picks the ramp up where it stopped); without one, full
    strength. Targets are (class, mask, site index).

    The site classifier is not part of the network: it is not published, not checkpointed (a
    resumed run starts it afresh) and, under torchrun, not synchronised between ranks (each rank
    trains its own against the shared encoder, whose gradients are).
    """

    def __init__(
        self,
        base: nn.Module,
        tap: FeatureTap,
        num_sites: int,
        weight: float,
        num_classes: int = len(CLASS_NAMES),
        hidden: int = 64,
    ) -> None:
        super().__init__()
        if num_sites < 2:
            raise ValueError("a site-adversarial term needs at least two sites")
        self.base = base
        self.tap = tap
        self.weight = weight
        self.num_classes = num_classes
        self.total_steps = 0
        self.schedule: torch.optim.lr_scheduler.LRScheduler | None = None
        self.adversary = nn.Sequential(
            nn.Linear(tap.width + num_classes, hidden), nn.ReLU(), nn.Linear(hidden, num_sites)
        )

    def strength(self) -> float:
        """The reversal's scale at the current step."""
        if self.schedule is None or self.total_steps <= 0:
            return self.weight
        progress = min(1.0, self.schedule.last_epoch / self.total_steps)
        return self.weight * (2.0 / (1.0 + float(np.exp(-10.0 * progress))) - 1.0)

    def forward(
        self,
        outputs: tuple[torch.Tensor, torch.Tensor],
        targets: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        labels, masks, sites = targets
        loss = self.base(outputs, (labels, masks))
        if not torch.is_grad_enabled():
            return loss
        features = reverse_gradient(self.tap.pop(), self.strength())
        onehot = F.one_hot(labels, self.num_classes).to(features.dtype)
        site_logits = self.adversary(torch.cat([features, onehot], dim=1))
        # The adversary learns at full strength; only the encoder's gradient is reversed and scaled.
        return loss + F.cross_entropy(site_logits, sites)
