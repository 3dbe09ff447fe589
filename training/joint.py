"""The joint task: one network that classifies the scan and outlines the lesion, trained on both
losses at once, cross-validated on grouped folds and published as one `diagnosis` artifact.

`JOINT` is its plug-in of the engine (training.runner.Task, without a validation split, plus the
cross-validation hooks of training.crossval); its commands are the engine's drivers:

    python -m training cv --preset joint-lite0 --data-path D [--folds 0 1] [--output-dir R]
        (training.crossval) trains one model per fold (all folds unless --folds), evaluates
        each on its held-out fold and writes `R/fold<k>.json` (out-of-fold predictions); once
        every fold is there, `R/oof.json` and `R/report.md` with pooled figures and
        group-bootstrap intervals.
    python -m training fit --preset joint-lite0 --data-path D --model-dir M [--cv-report R]
        (training.runner.run_task) trains the same recipe on every image (no held-out data),
        exports TorchScript with the flip averaging baked in and publishes it as
        `M/diagnosis/<version>`, carrying the cross-validated figures of R in its manifest.

Geometry: THE preprocessing is `letterbox` with `trim_border` (shared.preprocessing): the dark
margins are trimmed, the scan keeps its aspect ratio and is padded to a square. Training adds
aspect (0.75-1.33) and margin augmentation so a 640x480 frame and a squashed 256x256 one look
alike to the model.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

from shared import inference, models
from shared.labels import CLASS_NAMES, TASK_DIAGNOSIS
from shared.models.joint import JointEnsemble, JointFlipAverage, JointUNet
from shared.postprocessing import dice_iou
from shared.preprocessing import Preprocessing
from training import cli, distributed, engine
from training.augment import (
    Appearance,
    appearance,
    augment_geometry,
    augment_pair,
    burn_in_label,
    lesion_free_band,
    zoom_crop,
)
from training.crossval import cross_validate
from training.data import (
    DEFAULT_FOLDS_FILE,
    LoadedSplit,
    Sample,
    SiteBalancedSampler,
    load_folds,
    load_split_images,
    scan_dataset,
    site_weights,
    subset_per_class,
)
from training.losses import FeatureTap, JointLoss, SiteAdversarialLoss, class_weights
from training.metrics import confusion_matrix, diagnosis_figures, group_bootstrap
from training.runner import Evaluation, Run, finish_run, run_task
from training.segmentation import SegmentationDataset

log = logging.getLogger(__name__)

Row = dict[str, Any]

CANVASES = {"plain": None, "4:3": 4 / 3, "16:9": 16 / 9}


@dataclass(frozen=True)
class JointPreset:
    """A named joint recipe. Flags may override epochs, batch size, lr and size."""

    encoder: str = "efficientnet_lite0"
    size: int = 224
    epochs: int = 20
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    pct_start: float = 0.15
    label_smoothing: float = 0.1
    class_weighted: bool = True
    mask_weight: float = 1.0
    freeze_stem_stages: int = 2
    dropout: float = 0.2
    aspect_p: float = 0.5  # probability of an aspect stretch in 0.75-1.33
    margin_p: float = 0.3  # probability of black margins around the scan
    flip_tta: bool = True
    threshold: float = 0.5
    # Site robustness (training.augment, training.sites); 0 keeps the single-site recipes as run.
    appearance_p: float = 0.0  # probability of gain/gamma/speckle/blur/resample/JPEG/marks
    normal_patch_p: float = 0.0  # lesion scan of a site without normals -> lesion-free band
    zoom_p: float = 0.0  # zoomed-in window (each side zoom_min-1 of the frame), lesion kept whole
    zoom_min: float = 0.45  # the smallest window side, as a share of the frame's
    site_balanced: bool = False  # every site the same share of an epoch (SiteBalancedSampler)
    # Reversal strength of a class-conditioned site adversary on the pooled encoder features
    # (training.losses.SiteAdversarialLoss); 0: none. Inactive when the training data has one site.
    site_adversarial: float = 0.0
    # Each image's channels standardised inside the network (JointUNet.encode), so that a
    # scanner's gain and offset never reach the encoder; travels with the weights, not the service.
    image_standardise: bool = False
    description: str = ""


PRESETS: dict[str, JointPreset] = {
    "joint-lite0": JointPreset(
        description=(
            "EfficientNet-Lite0 (ImageNet) encoder, U-Net decoder + linear class head, 224 px "
            "letterbox, 20 epochs AdamW one-cycle 1e-3, weighted CE (smoothing 0.1) + BCE + Dice, "
            "flip / affine / brightness / aspect / margin augmentation, flip averaging"
        ),
    ),
}
# Two sites (training.sites): the recipe chosen before any of its figures were seen, from the
# issue's throwaway (8 epochs at 224 px on BUSI + BUS-BRA generalised to a third site but called
# its normals lesions) plus two remedies for "this site, so a lesion": appearance augmentation on
# every image and lesion-free bands of BUS-BRA frames as extra normal tissue.
PRESETS["joint-sites-lite0"] = replace(
    PRESETS["joint-lite0"],
    epochs=8,
    appearance_p=0.8,
    normal_patch_p=0.25,
    description=(
        "joint-lite0 for several sites: 8 epochs, appearance augmentation (gain/gamma, speckle, "
        "blur, down-up resampling, JPEG, calliper marks and text; p=0.8) and lesion-free bands "
        "of lesion scans from sites without normal scans as normal tissue (p=0.25)"
    ),
)
# The sweep on the held-out sites (training/reports/sites/sweep.md): each variant changes one
# thing of joint-sites-lite0, named for it.
PRESETS["joint-sites-zoom-lite0"] = replace(
    PRESETS["joint-sites-lite0"],
    zoom_p=0.5,
    description=(
        "joint-sites-lite0 with zoomed-in windows (each side 0.45-1 of the frame, the lesion "
        "kept whole; p=0.5): the field of view varies between sites and scanner presets"
    ),
)
# Fifth round, more than one seed: one run's held-out-site malignant AUC moves by up to 0.07 with
# the seed alone (training/reports/sites-seeds/ensemble-gain.md), as much as recipes differ. The
# Lite1 encoder tied zoom-lite0 on BUS-BRA held out with one seed (0.767 against 0.775) and called
# fewer of its lesions normal; seeds 1 and 2 of it, trained on BUSI alone and scored on BUS-BRA,
# beside zoom-lite0's three. Written down before those runs: zoom-lite1 becomes the candidate for
# the next fold runs (held-out-site runs alone ship nothing) if, over seeds 0-2, its mean BUS-BRA
# malignant AUC is higher than zoom-lite0's (0.775, 0.771, 0.704: 0.750) and its mean malignant
# sensitivity is not lower (0.476, 0.606, 0.456: 0.513).
# Seeds 0-2 (training/reports/sites-seeds/lite1-ensemble-gain.md): malignant AUC 0.767, 0.726,
# 0.746 (mean 0.746 against 0.750), sensitivity 0.507, 0.631, 0.582 (mean 0.573 against 0.513):
# not adopted (its AUC is not higher; it calls more of BUS-BRA's lesions malignant at the argmax,
# which ranks them no better).
PRESETS["joint-sites-zoom-lite1"] = replace(
    PRESETS["joint-sites-zoom-lite0"],
    encoder="efficientnet_lite1",
    description="joint-sites-zoom-lite0 with the EfficientNet-Lite1 encoder",
)
# Trained on both sites, BUS-BRA's 1,500 images outnumber BUSI's 498 three to one and BUSI's
# held-out fold loses most (27% of its lesions called normal, against the BUSI-only recipe's
# accuracy 0.84): every site the same share of an epoch. On one site it draws uniformly (with
# replacement), the training distribution of the recipe it changes, so the held-out-site runs
# cannot tell the two apart; fold 0 is where it can differ. Written down before its fold-0 run
# finished: it replaces joint-sites-zoom-lite0 if its BUSI fold-0 accuracy is higher and neither
# site's fold-0 malignant AUC is lower by more than 0.01 (zoom-lite0: BUSI 0.704, AUC 0.931;
# BUS-BRA AUC 0.921).
# Fold 0: BUSI accuracy 0.736, malignant AUC BUSI 0.934, BUS-BRA 0.901: not adopted.
PRESETS["joint-sites-balanced-zoom-lite0"] = replace(
    PRESETS["joint-sites-zoom-lite0"],
    site_balanced=True,
    description=(
        "joint-sites-zoom-lite0 with site-balanced sampling: epochs of as many draws as images, "
        "with replacement, every site the same share"
    ),
)
# Second round, on the failure the first left (trained on BUSI alone, BUS-BRA's lesions that fill
# their frame are called normal: 59% with zoom-lite0, 39% with zoom-lite1): tighter windows, more
# often, so a lesion filling the frame is seen in training.
PRESETS["joint-sites-tightzoom-lite0"] = replace(
    PRESETS["joint-sites-zoom-lite0"],
    zoom_p=0.7,
    zoom_min=0.25,
    description=(
        "joint-sites-zoom-lite0 with tighter zoomed-in windows, more often (each side 0.25-1 of "
        "the frame, the lesion kept whole; p=0.7)"
    ),
)
PRESETS["joint-sites-tightzoom-lite1"] = replace(
    PRESETS["joint-sites-tightzoom-lite0"],
    encoder="efficientnet_lite1",
    description="joint-sites-tightzoom-lite0 with the EfficientNet-Lite1 encoder",
)
# Third round: the lesion-free bands measured, not assumed. Written down before its fold-0 run:
# fold 0 is where BUSI's normals are scored beside its lesions (27% of them called normal by
# zoom-lite0, which shows BUS-BRA tissue as normal a quarter of the time). It replaces
# joint-sites-zoom-lite0 if its BUSI fold-0 accuracy is higher (> 0.704), neither site's fold-0
# malignant AUC is lower by more than 0.01 (BUSI 0.931, BUS-BRA 0.921) and no more of BUSI's
# fold-0 normals get a lesion (3 of 23).
# Fold 0: BUSI accuracy 0.624, malignant AUC BUSI 0.896, BUS-BRA 0.908: not adopted.
PRESETS["joint-sites-zoom-nopatch-lite0"] = replace(
    PRESETS["joint-sites-zoom-lite0"],
    normal_patch_p=0.0,
    description="joint-sites-zoom-lite0 without the lesion-free bands shown as normal tissue",
)
# Fourth round: the site-adversarial objective the issue lists. Trained on both sites, BUSI's
# lesions are the ones called normal (79 of 516 over the five folds), as if "looks like BUSI"
# meant "normal": a site classifier reading the pooled features, conditioned on the class, is
# trained against the encoder through gradient reversal (strength ramped to 0.5, DANN's
# schedule), so that within a class the two sites' features look alike. With one site in the
# training data it is inactive, so the held-out-site runs are joint-sites-zoom-lite0's by
# construction and only fold runs can tell the two apart. Written down before its runs: it
# replaces joint-sites-zoom-lite0 if, over folds 0 and 1 together (each scored as its run scores
# it, with the mirror), BUSI's accuracy is higher, no more of BUSI's normal scans get a lesion,
# and neither site's malignant AUC is lower by more than 0.01.
# Folds 0 and 1 (training/reports/sites/adversarial-fold-compare.md): BUSI accuracy 0.728 against
# 0.736, BUSI normals given a lesion 7 of 44 against 4, malignant AUC BUSI 0.918 against 0.911,
# BUS-BRA 0.920 against 0.916: not adopted (BUSI's lesions called normal fell, 37 of 206 against
# 48, and its normal scans paid for it).
PRESETS["joint-sites-adversarial-zoom-lite0"] = replace(
    PRESETS["joint-sites-zoom-lite0"],
    site_adversarial=0.5,
    description=(
        "joint-sites-zoom-lite0 with a class-conditioned site adversary on the pooled encoder "
        "features through gradient reversal (strength ramped to 0.5)"
    ),
)
# Sixth round, the lever the issue lists that no round had tried: intensity normalisation per
# image. Trained on BUSI alone, the network calls 40-59% of BUS-BRA's lesions normal (seeds 0-2),
# and appearance augmentation only samples gain and gamma; standardising each image inside the
# network removes gain and offset outright, in training and serving alike. Written down before
# its runs, the rule of the fifth round: seeds 0-2, each trained on BUSI alone and scored on
# BUS-BRA; it becomes the candidate for the next fold runs if its mean BUS-BRA malignant AUC is
# higher than zoom-lite0's (0.775, 0.771, 0.704: 0.750) and its mean malignant sensitivity is not
# lower (0.476, 0.606, 0.456: 0.513).
# Seeds 0-2 (training/reports/sites-seeds/std-ensemble-gain.md): malignant AUC 0.751, 0.745,
# 0.699 (mean 0.732 against 0.750), sensitivity 0.456, 0.532, 0.460 (mean 0.483 against 0.513),
# lesions called normal 0.46-0.61: not adopted.
PRESETS["joint-sites-zoom-std-lite0"] = replace(
    PRESETS["joint-sites-zoom-lite0"],
    image_standardise=True,
    description=(
        "joint-sites-zoom-lite0 with each image's channels standardised to mean 0 and standard "
        "deviation 1 inside the network, before the encoder"
    ),
)
# Seventh round: fine-tuning a pretrained encoder on few images distorts the features that carry
# to another domain (Kumar et al., ICLR 2022); the recipes freeze the stem and 2 of Lite0's 7
# stages. This one freezes 4, so only the three deepest stages (and the decoder and class head)
# learn from BUSI's 623 images. Written down before its runs, the same rule as the fifth and
# sixth rounds: seeds 0-2, each trained on BUSI alone and scored on BUS-BRA; it becomes the
# candidate for the next fold runs if its mean BUS-BRA malignant AUC is higher than
# zoom-lite0's (0.750) and its mean malignant sensitivity is not lower (0.513).
# Seeds 0-2 (training/reports/sites-seeds/freeze4-ensemble-gain.md): malignant AUC 0.759, 0.730,
# 0.670 (mean 0.720), sensitivity 0.386, 0.423, 0.323 (mean 0.377), lesions called normal
# 0.58-0.66: not adopted.
PRESETS["joint-sites-zoom-freeze4-lite0"] = replace(
    PRESETS["joint-sites-zoom-lite0"],
    freeze_stem_stages=4,
    description=(
        "joint-sites-zoom-lite0 with the stem and the first 4 of the encoder's 7 stages kept at "
        "their ImageNet values"
    ),
)
# Eighth round: on a site it never saw, the network trained on BUSI alone calls 40-66% of the
# lesions normal in every recipe so far. Its loss weighs the classes by inverse frequency: on
# BUSI's 107 normal, 347 benign and 169 malignant images, a normal scan counts 1.94, a benign
# 0.60 and a malignant 1.23, so "normal" costs least to say wherever an image looks unfamiliar.
# This one weighs every class the same. Written down before its runs, the rule of the fifth to
# seventh rounds: seeds 0-2, each trained on BUSI alone and scored on BUS-BRA; it becomes the
# candidate for the next fold runs if its mean BUS-BRA malignant AUC is higher than
# zoom-lite0's (0.750) and its mean malignant sensitivity is not lower (0.513).
# Seeds 0-2 (training/reports/sites-seeds/unweighted-ensemble-gain.md): malignant AUC 0.772,
# 0.765, 0.773 (mean 0.770), sensitivity 0.544, 0.542, 0.511 (mean 0.532): the candidate for the
# fold runs. Written down before them, the rule of the fourth round: it replaces
# joint-sites-zoom-lite0 as the recipe of the five fold models if, over folds 0 and 1 together
# (each scored as its run scores it, with the mirror; `python -m training fold-compare` against
# the shipped recipe's runs of those folds), BUSI's accuracy is higher, no more of BUSI's normal
# scans get a lesion, and neither site's malignant AUC is lower by more than 0.01.
# Folds 0 and 1 (training/reports/sites/unweighted-fold-compare.md): BUSI accuracy 0.760 against
# 0.736, malignant AUC BUSI 0.922 against 0.911, BUS-BRA 0.909 against 0.916, but BUSI normals
# given a lesion 5 of 44 against 4, and malignant sensitivity fell on both sites (BUS-BRA 0.715
# against 0.831, BUSI 0.725 against 0.797): not adopted.
PRESETS["joint-sites-zoom-unweighted-lite0"] = replace(
    PRESETS["joint-sites-zoom-lite0"],
    class_weighted=False,
    description="joint-sites-zoom-lite0 with every class weighed the same in the loss",
)
PRESETS["joint-lite1"] = replace(
    PRESETS["joint-lite0"],
    encoder="efficientnet_lite1",
    description="joint-lite0 with the EfficientNet-Lite1 encoder",
)
PRESETS["joint-lite2"] = replace(
    PRESETS["joint-lite0"],
    encoder="efficientnet_lite2",
    description="joint-lite0 with the EfficientNet-Lite2 encoder",
)
# Tiny recipe for tests and smoke runs: no pretrained weights are needed.
PRESETS["joint-smoke"] = replace(
    PRESETS["joint-lite0"], size=64, epochs=1, batch_size=4, description="smoke test recipe"
)


def get_preset(name: str) -> JointPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown joint preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}"
        ) from None


def preprocessing_for(preset: JointPreset) -> Preprocessing:
    return Preprocessing(resize=preset.size, resize_mode="letterbox", trim_border=True)


# --- data --------------------------------------------------------------------------------------


def on_canvas(
    image: np.ndarray, mask: np.ndarray, aspect: float, label: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """The scan centred on a black canvas of width/height `aspect` (e.g. 4:3, 16:9), with a
    burned-in text block in the top-left margin (so trimming dark borders cannot undo the
    canvas: the model has to cope with the letterboxed, smaller scan)."""
    height, width = image.shape
    out_w = max(width, round(height * aspect))
    out_h = max(height, round(out_w / aspect))
    top, left = (out_h - height) // 2, (out_w - width) // 2
    canvas_i = np.zeros((out_h, out_w), dtype=np.uint8)
    canvas_m = np.zeros((out_h, out_w), dtype=np.uint8)
    if label:
        burn_in_label(canvas_i, 2, 2, random.Random(0))
    canvas_i[top : top + height, left : left + width] = image
    canvas_m[top : top + height, left : left + width] = mask
    return canvas_i, canvas_m


def place_on_canvas(
    images: list[np.ndarray], masks: list[np.ndarray], aspect: float
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """`on_canvas` over lists of scans and their masks."""
    placed = [on_canvas(im, m, aspect) for im, m in zip(images, masks, strict=True)]
    return [p[0] for p in placed], [p[1] for p in placed]


def model_inputs(
    preprocessing: Preprocessing, image: np.ndarray, mask: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(C, S, S) input and (1, S, S) soft mask target, the mask laid out as its image."""
    layout = preprocessing.layout(image)
    x = preprocessing.normalise(preprocessing.resize_image(image, layout))
    y = preprocessing.resize_image(mask, layout).astype(np.float32)[None] / 255.0
    return x, y


class JointDataset(SegmentationDataset):
    """(input, (class index, mask target)) pairs, augmented when `preset` is given; the
    per-epoch reseeding is SegmentationDataset's."""

    def __init__(
        self,
        data: LoadedSplit,
        preprocessing: Preprocessing,
        preset: JointPreset | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(data, preprocessing, augment=preset is not None, seed=seed)
        self.preset = preset
        self.patch_sites = sites_without_normals(data.samples)
        self.appearance = Appearance(p=preset.appearance_p) if preset is not None else None
        sites = adversary_sites(data.samples, preset) if preset is not None else []
        self.site_index = {site: i for i, site in enumerate(sites)}

    def __getitem__(self, index: int) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        image, mask = self.data.images[index], self.data.masks[index]
        sample = self.data.samples[index]
        label = sample.label
        if self.preset is not None:
            if sample.site in self.patch_sites and self.rng.random() < self.preset.normal_patch_p:
                band = lesion_free_band(image, mask)
                if band is not None:  # tissue away from the lesion, as a normal scan
                    image, mask, label = band, np.zeros_like(band), CLASS_NAMES.index("normal")
            if self.rng.random() < self.preset.zoom_p:
                image, mask = zoom_crop(image, mask, self.rng, scale=(self.preset.zoom_min, 1.0))
            image, mask = augment_pair(image, mask, self.rng)
            image = appearance(image, self.appearance, self.rng)
            image, mask = augment_geometry(image, mask, self.preset, self.rng)
        x, y = model_inputs(self.preprocessing, image, mask)
        target = (torch.tensor(label, dtype=torch.long), torch.from_numpy(y))
        if self.site_index:  # a site-adversarial recipe also needs the image's site
            target += (torch.tensor(self.site_index[sample.site], dtype=torch.long),)
        return torch.from_numpy(x), target


def sites_without_normals(samples: list[Sample]) -> frozenset[str]:
    """The sites (training.sites) among `samples` with lesion scans but no normal scan: the ones
    whose lesion scans lend lesion-free bands as normal tissue. Empty for single-site data."""
    normal = CLASS_NAMES.index("normal")
    sites = {s.site for s in samples if s.site}
    return frozenset(
        site for site in sites if not any(s.site == site and s.label == normal for s in samples)
    )


def adversary_sites(samples: list[Sample], preset: JointPreset) -> list[str]:
    """The sites a site-adversarial recipe tells apart, in index order: every site of `samples`
    when the recipe has a site adversary and there are at least two, else none."""
    sites = sorted({s.site for s in samples if s.site})
    return sites if preset.site_adversarial > 0 and len(sites) > 1 else []


def expected_labels(samples: list[Sample], preset: JointPreset) -> list[int]:
    """The labels an epoch is expected to show (what the class weights are computed on): a
    `normal_patch_p` share of the lesion scans of sites without normals counts as normal."""
    labels = [s.label for s in samples]
    if preset.normal_patch_p <= 0:
        return labels
    sites = sites_without_normals(samples)
    step = 1.0 / preset.normal_patch_p
    count, next_at = 0, 0.0
    for i, sample in enumerate(samples):
        if sample.site in sites:
            if count >= next_at:
                labels[i] = CLASS_NAMES.index("normal")
                next_at += step
            count += 1
    return labels


# --- loss and model ----------------------------------------------------------------------------


def build_model(preset: JointPreset, pretrained: bool) -> JointUNet:
    return models.build_model(
        "joint_unet",
        encoder=preset.encoder,
        num_classes=len(CLASS_NAMES),
        pretrained=pretrained,
        freeze_stem_stages=preset.freeze_stem_stages,
        dropout=preset.dropout,
        image_standardise=preset.image_standardise,
    )


def build_networks(preset: JointPreset, members: int = 1) -> nn.Module:
    """The recipe's network without pretrained weights, for weights to be loaded into: one
    JointUNet, or with `members` > 1 the JointEnsemble of that many."""
    if members > 1:
        return JointEnsemble([build_model(preset, pretrained=False) for _ in range(members)])
    return build_model(preset, pretrained=False)


def _collate(batch: list) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    xs, targets = zip(*batch, strict=True)
    return torch.stack(xs), tuple(torch.stack(t) for t in zip(*targets, strict=True))


class JointTask:
    """Predicts class logits and a (1, S, S) lesion logit map from one letterboxed scan;
    class-weighted, label-smoothed cross-entropy + mask_weight * (BCE + soft Dice); the
    classification and lesion figures of training.metrics.diagnosis_figures, pooled out of fold
    by the cross-validation driver (training.crossval).

    No validation split: `fit` trains on every image and keeps the last epoch, and the figures
    that describe the recipe are its cross-validated ones (`cv`), carried in the manifest.
    """

    kind = TASK_DIAGNOSIS
    command = "fit"
    presets = PRESETS
    default_output = "training/reports/fit/{preset}"
    smoke_per_class = 3
    validation_split = False

    def resolve_preset(self, args: argparse.Namespace) -> JointPreset:
        return resolve_preset(args)

    def preprocessing(self, preset: JointPreset) -> Preprocessing:
        return preprocessing_for(preset)

    def datasets(self, run: Run) -> tuple[JointDataset, None]:
        # Under torchrun each rank draws its own augmentation (training.distributed.rank_seed).
        seed = distributed.rank_seed(run.seed)
        return JointDataset(run.data["train"], run.preprocessing, run.preset, seed=seed), None

    def train_loader(self, run: Run, dataset: JointDataset, sampler: Sampler | None) -> DataLoader:
        """The batches the joint recipes were trained with: full batches only, the shuffle
        drawn from torch's global generator, (input, (class, mask)) collated as tuples. A
        `site_balanced` recipe draws its epochs from a SiteBalancedSampler instead (this rank's
        share of it under torchrun)."""
        if run.preset.site_balanced:
            sampler = SiteBalancedSampler(
                dataset.data.samples,
                seed=run.seed,
                num_replicas=distributed.world_size(),
                rank=distributed.rank(),
            )
        return DataLoader(
            dataset,
            batch_size=distributed.per_rank_batch(run.preset.batch_size),
            shuffle=sampler is None,
            sampler=sampler,
            drop_last=True,
            collate_fn=_collate,
        )

    def build_model(self, run: Run) -> JointUNet:
        model = build_model(run.preset, pretrained=not run.args.no_pretrained)
        if adversary_sites(run.data["train"].samples, run.preset):
            run.state["feature_tap"] = FeatureTap(model.encoder)
        return model

    def build_loss(self, run: Run) -> nn.Module:
        """JointLoss; for a site-adversarial recipe on several sites, wrapped in the
        SiteAdversarialLoss that reads build_model's feature tap."""
        preset = run.preset
        samples = run.data["train"].samples
        labels = expected_labels(samples, preset)
        draws = site_weights(samples) if preset.site_balanced else None
        weights = class_weights(labels, draw_weights=draws) if preset.class_weighted else None
        loss = JointLoss(weights, preset.label_smoothing, preset.mask_weight)
        sites = adversary_sites(samples, preset)
        if not sites:
            return loss
        tap: FeatureTap = run.state["feature_tap"]
        adversarial = SiteAdversarialLoss(loss, tap, len(sites), preset.site_adversarial)
        run.state["site_adversary"] = adversarial
        return adversarial

    def build_optimizer(
        self, run: Run, model: nn.Module, steps_per_epoch: int
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.OneCycleLR, str]:
        """AdamW over the trainable parameters, one-cycle to preset.lr, stepped per batch."""
        preset = run.preset
        params = [p for p in model.parameters() if p.requires_grad]
        adversarial: SiteAdversarialLoss | None = run.state.get("site_adversary")
        if adversarial is not None:  # the site classifier trains with the network
            params += list(adversarial.adversary.parameters())
        optimizer = torch.optim.AdamW(params, lr=preset.lr, weight_decay=preset.weight_decay)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=preset.lr,
            epochs=preset.epochs,
            steps_per_epoch=steps_per_epoch,
            pct_start=preset.pct_start,
        )
        if adversarial is not None:  # the reversal's ramp follows the schedule's steps
            adversarial.total_steps = preset.epochs * steps_per_epoch
            adversarial.schedule = scheduler
        return optimizer, scheduler, "step"

    def selection(self, preset: JointPreset) -> engine.Selection:
        return engine.Selection(None)  # the last epoch: no held-out data inside a fit

    def validate(self, out: engine.EvalOutput, data: LoadedSplit) -> dict[str, float]:
        return {}  # no validation split: never asked

    def evaluate(self, run: Run, model: nn.Module) -> Evaluation:
        """What `fit` publishes: the served network (flip-averaged when the recipe says so)
        with the cross-validated figures of --cv-report in its manifest."""
        if (tap := run.state.pop("feature_tap", None)) is not None:
            tap.remove()  # training's hook: the published network carries none
        args = run.args
        if args.cv_report and not Path(args.cv_report).is_file():
            log.warning("no cross-validation report at %s: publishing without it", args.cv_report)
            args.cv_report = None
        cv = json.loads(Path(args.cv_report).read_text()) if args.cv_report else None
        return joint_evaluation(
            args,
            run.preset,
            model,
            len(run.data["train"].samples),
            metrics=cross_validated_metrics(cv),
            extra={"cross_validation": {"k": cv["k"], "pooled": cv["pooled"]} if cv else None},
        )

    def report_section(self, document: dict[str, Any]) -> list[str]:
        cv = document.get("cross_validation")
        if not cv:
            return ["No cross-validation report was given: this artifact carries no figures.", ""]
        lines = [
            f"Pooled out-of-fold figures of this recipe ({cv['k']} grouped folds; the artifact "
            "itself was refit on every image), 95% group-bootstrap intervals:",
            "",
            *_figure_table(cv["pooled"]),
            "",
        ]
        return lines

    # --- cross-validation (training.crossval) ---

    def score(self, run: Run, model: nn.Module, data: LoadedSplit) -> dict[str, list[Row]]:
        """Per-image rows of held-out images as served, plain and on each wider canvas."""
        return {
            name: evaluate_images(model, run.preset, data, aspect)
            for name, aspect in CANVASES.items()
        }

    def figures(self, rows: list[Row]) -> dict[str, float]:
        return diagnosis_figures(rows)

    def summarise(self, rows_by_view: dict[str, list[Row]], n_resamples: int) -> dict[str, Any]:
        return summarise(rows_by_view, n_resamples)

    def render_cv_report(self, report: dict[str, Any]) -> str:
        return render_report(report)


JOINT = JointTask()


# --- evaluation --------------------------------------------------------------------------------


@dataclass
class Predictions:
    """What the served model says about a list of frames, plus the pooled encoder features."""

    logits: np.ndarray  # (N, K) class logits, flip-averaged when the recipe says so
    probs: np.ndarray  # (N, K) softmax of the logits
    maps: list[np.ndarray]  # frame-sized lesion probability maps
    features: np.ndarray | None  # (N, C) pooled deepest features of the unflipped input


@torch.inference_mode()
def predict(
    model: JointUNet,
    preprocessing: Preprocessing,
    images: list[np.ndarray],
    flip_tta: bool,
    batch_size: int = 16,
    features: bool = False,
) -> Predictions:
    """Class logits and probabilities and frame-sized lesion probability maps, as served
    (shared.inference.predict); with `features`, also the pooled deepest encoder features (one
    more encoder pass per batch)."""
    net = JointFlipAverage(model) if flip_tta else model
    net.eval()
    served = inference.module_forward(net)
    pooled: list[np.ndarray] = []

    def forward(batch: np.ndarray) -> tuple[np.ndarray, ...]:
        outputs = served(batch)
        if features:
            x = torch.from_numpy(batch).to(engine.model_device(model))
            pooled.append(model.encode(x)[-1].mean(dim=(2, 3)).float().cpu().numpy())
        return outputs

    spec = inference.ModelSpec(preprocessing, CLASS_NAMES)
    found = inference.predict(inference.InferenceModel(forward, spec), images, batch_size)
    logits = np.stack([f.logits for f in found])
    probs = np.stack([f.probabilities for f in found])
    maps = [f.lesion_map for f in found]
    return Predictions(logits, probs, maps, np.concatenate(pooled) if pooled else None)


def evaluate_images(
    model: nn.Module, preset: JointPreset, data: LoadedSplit, canvas: float | None
) -> list[dict[str, Any]]:
    """Per-image predictions and scores on `data`, optionally placed on a black canvas."""
    preprocessing = preprocessing_for(preset)
    images, masks = data.images, data.masks
    if canvas is not None:
        images, masks = place_on_canvas(images, masks, canvas)
    out = predict(model, preprocessing, images, preset.flip_tta)
    rows = []
    for sample, p, logits, prob_map, truth in zip(
        data.samples, out.probs, out.logits, out.maps, masks, strict=True
    ):
        pred_mask = prob_map > preset.threshold
        dice, _ = dice_iou(pred_mask, truth > 127)
        rows.append(
            {
                "key": sample.key,
                "label": sample.label,
                "probs": [round(float(v), 6) for v in p],
                "logits": [round(float(v), 5) for v in logits],
                "dice": round(dice, 6),
                "mask_pixels": int(pred_mask.sum()),
            }
        )
    return rows


# --- pooled figures with group-bootstrap intervals ----------------------------------------------


def summarise(rows_by_canvas: dict[str, list[dict[str, Any]]], n_resamples: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for canvas, rows in rows_by_canvas.items():
        y = np.asarray([r["label"] for r in rows])
        pred = np.asarray([r["probs"] for r in rows]).argmax(axis=1)
        out[canvas] = {
            "n": len(rows),
            **diagnosis_figures(rows),
            "ci95": group_bootstrap(rows, n_resamples) if n_resamples else {},
            "confusion_matrix": confusion_matrix(y, pred, len(CLASS_NAMES)).tolist(),
        }
    return out


# --- cross-validation --------------------------------------------------------------------------


def cv_main(args: argparse.Namespace) -> dict[str, Any]:
    """`python -m training cv`: the generic cross-validation driver on the joint plug-in."""
    return cross_validate(JOINT, args)


def oof_main(args: argparse.Namespace) -> Path:
    """Re-score every image with the fold model that did not train on it (`fold<k>.pt` in the
    CV folder) and write `oof_logits.json`: class logits as served (flip-averaged when the
    recipe says so) and the pooled deepest encoder features, for calibration and OOD work."""
    preset = resolve_preset(args)
    samples = scan_dataset(args.data_path)
    items = load_folds(Path(args.split_file), samples)
    engine.configure_threads(args.threads)
    device = engine.resolve_device(args.device)
    data = load_split_images(samples)
    preprocessing = preprocessing_for(preset)
    rows = []
    for weights in sorted(Path(args.output_dir).glob("fold*.pt")):
        fold = int(weights.stem.removeprefix("fold"))
        model = build_model(preset, pretrained=False)
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        model.to(device).eval()
        held_out = [i for i, s in enumerate(samples) if items[s.key]["fold"] == fold]
        images = [data.images[i] for i in held_out]
        out = predict(model, preprocessing, images, preset.flip_tta, features=True)
        for j, i in enumerate(held_out):
            key = samples[i].key
            rows.append(
                {
                    "key": key,
                    "label": samples[i].label,
                    "fold": fold,
                    "group": items[key]["group"],
                    "logits": [round(float(v), 5) for v in out.logits[j]],
                    "features": [round(float(v), 5) for v in out.features[j]],
                }
            )
        log.info("fold %d: %d held-out images re-scored", fold, len(held_out))
    if len(rows) != len(samples):
        raise ValueError(f"fold weights cover {len(rows)} of {len(samples)} images")
    path = Path(args.output_dir) / "oof_logits.json"
    path.write_text(json.dumps({"preset": args.preset, "rows": rows}) + "\n")
    return path


METRIC_ROWS = (
    ("accuracy", "accuracy"),
    ("macro_f1", "macro-F1"),
    ("macro_auc", "macro AUC (one-vs-rest)"),
    ("malignant_sensitivity", "malignant sensitivity"),
    ("lesion_dice", "lesion Dice (mean per image)"),
    ("normal_with_lesion_segment", "normal scans with a lesion drawn, /segment"),
    ("normal_with_lesion_diagnose", "normal scans with a lesion drawn, /diagnose"),
)


def _figure_table(pooled: dict[str, Any]) -> list[str]:
    """Markdown rows: one metric per row, one canvas per column, with the 95% intervals."""
    canvases = [c for c in CANVASES if c in pooled]
    lines = ["| metric | " + " | ".join(canvases) + " |", "|---|" + "---|" * len(canvases)]
    for key, label in METRIC_ROWS:
        cells = []
        for canvas in canvases:
            fig = pooled[canvas]
            lo, hi = fig["ci95"].get(key, [float("nan"), float("nan")])
            cells.append(f"{fig[key]:.3f} [{lo:.3f}, {hi:.3f}]")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def render_report(report: dict[str, Any]) -> str:
    lines = [
        f"# Cross-validation: {report['preset']}",
        "",
        f"{report['k']} grouped folds; every image is scored once, by the model that did not "
        "train on it. Intervals: 95% percentile bootstrap over near-duplicate groups "
        f"({report['bootstrap']['resamples']} resamples).",
        "",
        *_figure_table(report["pooled"]),
    ]
    lines += [
        "",
        "Per fold (plain images):",
        "",
        "| fold | seconds | " + " | ".join(k for k, _ in METRIC_ROWS) + " |",
        "|---|---|" + "---|" * len(METRIC_ROWS),
    ]
    for fold in report["per_fold"]:
        lines.append(
            f"| {fold['fold']} | {fold['train_seconds']:.0f} | "
            + " | ".join(f"{fold[k]:.3f}" for k, _ in METRIC_ROWS)
            + " |"
        )
    lines += ["", "Recipe: `" + json.dumps(report["recipe"]) + "`", ""]
    return "\n".join(lines)


# --- refit on all the data and publish -----------------------------------------------------------


def fit_main(args: argparse.Namespace) -> dict[str, Any]:
    """Train the recipe on every image (the engine's no-validation run: the last epoch is kept;
    a stopped fit resumes when rerun), then the engine's finishing step: export with the flip
    averaging baked in, publish as `diagnosis`, metrics.json, report.md. With --weights, publish
    those weights again without training."""
    if args.weights:
        return publish_weights(args)
    output = Path(args.output_dir)
    checkpoint = output / engine.CHECKPOINT_NAME
    legacy = output / "fit.ckpt"  # the name before the engine: a run stopped then resumes
    if args.resume is None:
        args.resume = engine.resume_point(checkpoint, legacy)
    document = run_task(JOINT, args)
    if not distributed.is_main():
        return document
    checkpoint.unlink(missing_ok=True)  # finished: the same command trains afresh
    legacy.unlink(missing_ok=True)
    artifact = document["artifact"] or {"version": None, "path": document.get("torchscript")}
    return {
        "version": artifact["version"],
        "path": artifact["path"],
        "seconds": document["training"]["train_seconds"],
    }


def publish_weights(args: argparse.Namespace) -> dict[str, Any]:
    """`fit --weights`: publish the weights of a finished fit again (e.g. with a calibration),
    with the history and training time of the run that trained them."""
    preset = resolve_preset(args)
    samples = _samples(args)
    engine.configure_threads(args.threads)
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    if not distributed.is_main():
        return {"rank": distributed.rank()}  # publishing a finished run is rank 0's alone
    model = build_model(preset, pretrained=False)
    history, seconds = load_weights(Path(args.weights), model)
    model.eval()
    if args.cv_report and not Path(args.cv_report).is_file():
        log.warning("no cross-validation report at %s: publishing without it", args.cv_report)
        args.cv_report = None
    cv = json.loads(Path(args.cv_report).read_text()) if args.cv_report else None
    extra = {"cross_validation": {"k": cv["k"], "pooled": cv["pooled"]} if cv else None}
    document = publish(
        args, preset, model, history, seconds, samples, cross_validated_metrics(cv), extra
    )
    artifact = document["artifact"]
    return {"version": artifact["version"], "path": artifact["path"], "seconds": seconds}


def cross_validated_metrics(cv: dict[str, Any] | None) -> dict[str, Any]:
    """The manifest's metrics of a refit: the recipe's pooled out-of-fold figures (report.json
    of `cv`), or none."""
    return {
        "kind": "cross-validated" if cv else "none",
        "note": (
            "pooled out-of-fold figures of this recipe (grouped 5-fold cross-validation); "
            "the artifact itself was refit on every image"
            if cv
            else "no cross-validation report was given"
        ),
        **({"cross_validation": cv["pooled"], "k": cv["k"]} if cv else {}),
    }


def joint_evaluation(
    args: argparse.Namespace,
    preset: JointPreset,
    model: nn.Module,
    n_images: int,
    metrics: dict[str, Any],
    extra: dict[str, Any],
    intended_use: str | None = None,
) -> Evaluation:
    """What the finishing step exports and publishes for trained joint weights: the network
    (or a JointEnsemble of several) with the flip averaging baked in when the recipe says so
    (and the calibration of --calibration) as `diagnosis`, `metrics` in the manifest."""
    calibration: dict[str, Any] = {}
    if args.calibration:
        from training.studies.calibration import manifest_fields

        # validated; see training.studies.calibration
        calibration = manifest_fields(args.calibration)
    members = ensemble_size(model)
    return Evaluation(
        served=JointFlipAverage(model) if preset.flip_tta else model,
        example=torch.zeros((1, 3, preset.size, preset.size)),
        name=args.name or args.preset,
        architecture=f"joint_unet_{preset.encoder}"
        + (f"_ensemble_of_{members}" if members > 1 else ""),
        output={
            "type": "joint",
            "classes": {"type": "logits", "shape": [len(CLASS_NAMES)], **calibration},
            "mask": {
                "type": "logits",
                "shape": [1, preset.size, preset.size],
                "threshold": preset.threshold,
            },
        },
        metrics=metrics,
        extra=extra,
        training={
            "flip_tta": preset.flip_tta,
            "n_images": n_images,
            **({"ensemble_members": members} if members > 1 else {}),
        },
        intended_use=intended_use,
    )


def ensemble_size(model: nn.Module) -> int:
    """How many networks `model` averages (1 unless it is a JointEnsemble)."""
    return len(model.members) if isinstance(model, JointEnsemble) else 1


def publish(
    args: argparse.Namespace,
    preset: JointPreset,
    model: nn.Module,
    history: engine.History,
    seconds: float,
    samples: list[Sample],
    metrics: dict[str, Any],
    extra: dict[str, Any],
    intended_use: str | None = None,
) -> dict[str, Any]:
    """The engine's finishing step for joint weights trained before (`fit --weights`,
    `sites-publish`): joint_evaluation, then finish_run. Returns the metrics.json document."""
    epochs_run = len(history.epochs)
    run = Run(
        args,
        preset,
        Path(args.output_dir),
        engine.resolve_device(args.device),
        torch.get_num_threads(),
        preprocessing_for(preset),
        data={"train": LoadedSplit(samples, [], [])},
        fit=engine.FitResult(history, epochs_run, None, seconds),
    )
    evaluation = joint_evaluation(
        args, preset, model, len(samples), metrics, extra, intended_use=intended_use
    )
    return finish_run(JOINT, run, evaluation)


def load_weights(path: Path, model: nn.Module) -> tuple[engine.History, float]:
    """Load a fit's weights into `model`: its best.pt (history and time from the metrics.json
    beside it) or a final.pt of the job before the engine ({"model", "history", "seconds"})."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if "model" in saved and isinstance(saved["model"], dict):
        model.load_state_dict(saved["model"])
        return engine.History.from_dict(saved["history"]), float(saved["seconds"])
    model.load_state_dict(saved)
    metrics = path.parent / "metrics.json"
    if not metrics.is_file():
        return engine.History(), 0.0
    document = json.loads(metrics.read_text())
    return (
        engine.History.from_dict(document["history"]),
        float(document["training"]["train_seconds"]),
    )


def _samples(args: argparse.Namespace) -> list[Sample]:
    samples = scan_dataset(args.data_path)
    per_class = args.max_per_class or (JOINT.smoke_per_class if args.smoke else None)
    return subset_per_class(samples, per_class) if per_class else samples


# --- command line ---------------------------------------------------------------------------


def resolve_preset(args: argparse.Namespace) -> JointPreset:
    preset = get_preset(args.preset)
    overrides = cli.recipe_overrides(args)
    if "image_size" in overrides:
        overrides["size"] = overrides.pop("image_size")
    if getattr(args, "no_flip_tta", False):
        overrides["flip_tta"] = False
    if getattr(args, "smoke", False):  # the flags win over the smoke sizes
        overrides = {"epochs": 1, "batch_size": 4, "size": 64, **overrides}
        args.no_pretrained = True
    return replace(preset, **overrides)


def common_parser(
    prog: str,
    description: str,
    *,
    default_output: str,
    split_file: Path | bool = DEFAULT_FOLDS_FILE,
    model_dir: Path | bool = False,
    bootstrap: int = 1000,
) -> argparse.ArgumentParser:
    """training.cli's common flags with the joint commands' defaults (and their older names
    --folds-file, --subset, --resamples)."""
    parser = cli.training_parser(
        prog,
        description,
        presets=PRESETS,
        default_preset="joint-lite0",
        default_output=default_output,
        split_file=split_file,
        split_help="the grouped k-fold file (default: training/splits/busi-5fold.json; made "
        "there when it does not exist); --folds-file is its older name",
        model_dir=model_dir,
        bootstrap=bootstrap,
        aliases={
            "--split-file": ["--folds-file"],
            "--max-per-class": ["--subset"],
            "--bootstrap": ["--resamples"],
        },
    )
    parser.add_argument("--no-flip-tta", action="store_true", help="score without flip averaging")
    return parser


def parse_cv_args(argv: list[str]) -> argparse.Namespace:
    parser = common_parser(
        "python -m training cv",
        "Grouped k-fold cross-validation of a recipe (each fold resumes from its checkpoint)",
        default_output="training/reports/cv/<preset>",
    )
    parser.add_argument("--folds", type=int, nargs="*", default=None, help="folds to run")
    parser.add_argument("--report-only", action="store_true", help="pool finished folds only")
    return _parse(parser, argv, "cv", Path("training/reports/cv"))


def parse_oof_args(argv: list[str]) -> argparse.Namespace:
    parser = common_parser(
        "python -m training oof",
        "Out-of-fold logits and features from the CV fold models",
        default_output="training/reports/cv/<preset>",
    )
    return _parse(parser, argv, "oof", Path("training/reports/cv"))


def parse_fit_args(argv: list[str]) -> argparse.Namespace:
    parser = common_parser(
        "python -m training fit",
        "Train the joint recipe on all images, export and publish it",
        default_output="training/reports/fit/<preset>",
        split_file=False,
        # a candidate, not what scripts/serve.sh serves: `python -m training promote --from`
        model_dir=Path("runs/candidate-models"),
    )
    parser.add_argument("--cv-report", type=Path, default=None, help="report.json of its CV")
    parser.add_argument(
        "--calibration",
        type=Path,
        default=None,
        help="manifest.json of `python -m training calibrate` (default: uncalibrated)",
    )
    parser.add_argument(
        "--weights",
        type=Path,
        default=None,
        help="best.pt (or an older final.pt) of an earlier fit: export and publish it "
        "without training",
    )
    parser.add_argument("--name", default=None, help="artifact name (default: the preset)")
    return _parse(parser, argv, "fit", Path("training/reports/fit"))


def _parse(
    parser: argparse.ArgumentParser, argv: list[str], command: str, reports: Path
) -> argparse.Namespace:
    """cli.parse, with the run folder defaulting to <reports>/<preset>."""
    args = cli.parse(parser, argv, command)
    if args.output_dir is None:
        args.output_dir = reports / args.preset
    return args
