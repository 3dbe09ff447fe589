"""The joint task: one network that classifies the scan and outlines the lesion, trained on both
losses at once, cross-validated on grouped folds and published as one `diagnosis` artifact.

    python -m training cv --preset joint-lite0 --data-path D [--folds 0 1] [--output-dir R]
        trains one model per fold (all folds unless --folds), evaluates each on its held-out
        fold and writes `R/fold<k>.json` (out-of-fold predictions); once every fold is there,
        `R/oof.json` and `R/report.md` with pooled figures and group-bootstrap intervals.
    python -m training fit --preset joint-lite0 --data-path D --model-dir M [--cv-report R]
        trains the same recipe on every image (no held-out data), exports TorchScript with the
        flip averaging baked in and publishes it as `M/diagnosis/<version>`, carrying the
        cross-validated figures of R in its manifest.

Geometry: THE preprocessing is `letterbox` with `trim_border` (shared.preprocessing): the dark
margins are trimmed, the scan keeps its aspect ratio and is padded to a square. Training adds
aspect (0.75-1.33) and margin augmentation so a 640x480 frame and a squashed 256x256 one look
alike to the model.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from shared.labels import CLASS_NAMES, TASK_DIAGNOSIS
from shared.models.joint import JointFlipAverage, JointUNet
from shared.postprocessing import dice_iou, softmax
from shared.preprocessing import Preprocessing
from training import cli, distributed, engine
from training.augment import Appearance, appearance, lesion_free_band, zoom_crop
from training.data import (
    LoadedSplit,
    Sample,
    data_fingerprint,
    groups_largest_first,
    load_image,
    load_split_images,
    scan_dataset,
    subset_per_class,
)
from training.metrics import _scalars, confusion_matrix
from training.runner import Evaluation, Run, finish_run
from training.segmentation import SegmentationDataset, augment_pair

log = logging.getLogger(__name__)

DEFAULT_FOLDS_FILE = Path(__file__).parent / "splits" / "busi-5fold.json"
GROUPS_FILE = Path(__file__).parent / "splits" / "busi.json"
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
    zoom_p: float = 0.0  # zoomed-in window (each side 0.45-1 of the frame), lesion kept whole
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
PRESETS["joint-sites-zoom-lite1"] = replace(
    PRESETS["joint-sites-zoom-lite0"],
    encoder="efficientnet_lite1",
    description="joint-sites-zoom-lite0 with the EfficientNet-Lite1 encoder",
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


# --- folds -------------------------------------------------------------------------------------


def make_folds(
    keys: list[str], labels: list[int], groups: list[int], k: int = 5, seed: int = 0
) -> dict[str, Any]:
    """Grouped, class-stratified k folds: a near-duplicate group never straddles two folds.

    A group counts under its most severe label; groups go largest first (ties shuffled by
    `seed`) to the fold furthest below its share of that class, then of all images.
    """
    members, order = groups_largest_first(groups, seed)
    filled = [[0] * len(CLASS_NAMES) for _ in range(k)]
    sizes = [0] * k
    fold_of: dict[int, int] = {}
    for group in order:
        label = max(labels[i] for i in members[group])
        fold = min(range(k), key=lambda f: (filled[f][label], sizes[f], f))
        fold_of[group] = fold
        filled[fold][label] += len(members[group])
        sizes[fold] += len(members[group])
    return {
        "k": k,
        "seed": seed,
        "items": {
            key: {"fold": fold_of[g], "group": g} for key, g in zip(keys, groups, strict=True)
        },
        "per_fold": [
            {CLASS_NAMES[c]: filled[f][c] for c in range(len(CLASS_NAMES))} for f in range(k)
        ],
    }


def load_folds(path: Path, samples: list[Sample]) -> dict[str, dict[str, int]]:
    items = json.loads(Path(path).read_text())["items"]
    keys = {s.key for s in samples}
    if set(items) != keys:
        raise ValueError(
            f"fold file {path} does not match the data folder "
            f"({len(keys - set(items))} images not in it, {len(set(items) - keys)} extra)"
        )
    return items


# --- data --------------------------------------------------------------------------------------


def burn_in_label(canvas: np.ndarray, top: int, left: int, rng: random.Random) -> None:
    """Draw a block of bright "text" (like a scanner's burned-in annotation) in place."""
    height, width = canvas.shape
    h, w = max(2, height // 32), max(4, width // 10)
    top, left = min(top, height - h), min(left, width - w)
    block = np.asarray([[200 if rng.random() < 0.5 else 0 for _ in range(w)] for _ in range(h)])
    canvas[top : top + h, left : left + w] = block.astype(np.uint8)


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


def augment_geometry(
    image: np.ndarray, mask: np.ndarray, preset: JointPreset, rng: random.Random
) -> tuple[np.ndarray, np.ndarray]:
    """Aspect stretch and black margins, as non-square scanner frames bring them."""
    if rng.random() < preset.aspect_p:
        height, width = image.shape
        factor = math.exp(rng.uniform(math.log(0.75), math.log(4 / 3)))
        size = (max(8, round(width * factor)), height)
        image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
        mask = np.asarray(Image.fromarray(mask).resize(size, Image.Resampling.NEAREST))
    if rng.random() < preset.margin_p:
        height, width = image.shape
        pad = [round(rng.uniform(0, 0.3) * side) for side in (height, height, width, width)]
        canvas_i = np.zeros((height + pad[0] + pad[1], width + pad[2] + pad[3]), np.uint8)
        canvas_m = np.zeros_like(canvas_i)
        if rng.random() < 0.5 and min(pad) > 0:
            burn_in_label(canvas_i, rng.randrange(pad[0]), rng.randrange(pad[2]), rng)
        canvas_i[pad[0] : pad[0] + height, pad[2] : pad[2] + width] = image
        canvas_m[pad[0] : pad[0] + height, pad[2] : pad[2] + width] = mask
        image, mask = canvas_i, canvas_m
    return np.ascontiguousarray(image), np.ascontiguousarray(mask)


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
                image, mask = zoom_crop(image, mask, self.rng)
            image, mask = augment_pair(image, mask, self.rng)
            image = appearance(image, self.appearance, self.rng)
            image, mask = augment_geometry(image, mask, self.preset, self.rng)
        x, y = model_inputs(self.preprocessing, image, mask)
        return torch.from_numpy(x), (torch.tensor(label, dtype=torch.long), torch.from_numpy(y))


def sites_without_normals(samples: list[Sample]) -> frozenset[str]:
    """The sites (training.sites) among `samples` with lesion scans but no normal scan: the ones
    whose lesion scans lend lesion-free bands as normal tissue. Empty for single-site data."""
    normal = CLASS_NAMES.index("normal")
    sites = {s.site for s in samples if s.site}
    return frozenset(
        site for site in sites if not any(s.site == site and s.label == normal for s in samples)
    )


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
        return self.ce(class_logits, labels) + self.mask_weight * (bce + 1.0 - dice)


def build_model(preset: JointPreset, pretrained: bool) -> JointUNet:
    return JointUNet(
        preset.encoder,
        num_classes=len(CLASS_NAMES),
        pretrained=pretrained,
        freeze_stem_stages=preset.freeze_stem_stages,
        dropout=preset.dropout,
    )


def class_weights(labels: list[int]) -> torch.Tensor:
    counts = np.bincount(labels, minlength=len(CLASS_NAMES)).astype(np.float64)
    weights = counts.sum() / (len(CLASS_NAMES) * np.maximum(counts, 1.0))
    return torch.tensor(weights, dtype=torch.float32)


def _collate(batch: list) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    xs, targets = zip(*batch, strict=True)
    labels, masks = zip(*targets, strict=True)
    return torch.stack(xs), (torch.stack(labels), torch.stack(masks))


class JointTask:
    """Predicts class logits and a (1, S, S) lesion logit map from one letterboxed scan;
    class-weighted, label-smoothed cross-entropy + mask_weight * (BCE + soft Dice); the
    classification and lesion figures of `_figures`, pooled out of fold by the `cv` driver.

    No validation split: `fit` trains on every image and keeps the last epoch, and the figures
    that describe the recipe are its cross-validated ones (`cv`), carried in the manifest.
    """

    kind = TASK_DIAGNOSIS
    command = "fit"
    presets = PRESETS
    default_output = "training/reports/fit/{preset}"
    smoke_per_class = 3

    def resolve_preset(self, args: argparse.Namespace) -> JointPreset:
        return resolve_preset(args)

    def preprocessing(self, preset: JointPreset) -> Preprocessing:
        return preprocessing_for(preset)

    def build_model(self, preset: JointPreset, pretrained: bool) -> JointUNet:
        return build_model(preset, pretrained)

    def loss(self, preset: JointPreset, labels: list[int]) -> JointLoss:
        weights = class_weights(labels) if preset.class_weighted else None
        return JointLoss(weights, preset.label_smoothing, preset.mask_weight)

    def optimizer(
        self, preset: JointPreset, net: nn.Module, steps_per_epoch: int
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.OneCycleLR]:
        """AdamW over the trainable parameters, one-cycle to preset.lr, stepped per batch."""
        params = [p for p in net.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=preset.lr, weight_decay=preset.weight_decay)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=preset.lr,
            epochs=preset.epochs,
            steps_per_epoch=steps_per_epoch,
            pct_start=preset.pct_start,
        )
        return optimizer, scheduler

    def selection(self, preset: JointPreset) -> engine.Selection:
        return engine.Selection(None)  # the last epoch: no held-out data inside a fit

    def metrics(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        """The figures of per-image rows (evaluate_images), as the service would score them."""
        return _figures(rows)

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


JOINT = JointTask()


def train(
    preset: JointPreset,
    data: LoadedSplit,
    *,
    seed: int,
    pretrained: bool,
    checkpoint: Path | None = None,
    resume: Path | None = None,
    progress: bool = False,
    device: torch.device | None = None,
) -> tuple[JointUNet, engine.History, float]:
    """Train the recipe on `data` (engine.fit, no validation: the last epoch is kept); returns
    the model (eval mode, on `device`), its history and the training seconds.

    With `checkpoint`, a checkpoint is written after every epoch; `resume` (default: the
    checkpoint when it exists) continues from one.
    """
    device = device or engine.resolve_device("cpu")
    engine.seed_everything(seed)
    preprocessing = preprocessing_for(preset)
    model = build_model(preset, pretrained)
    # Under torchrun (training.distributed): every rank starts from rank 0's weights, draws its
    # own dropout and augmentation, loads batch / N of each global batch from its own shard and
    # DDP averages the gradients. Outside torchrun each helper below is the identity.
    if distributed.rank() > 0:
        engine.seed_everything(distributed.rank_seed(seed))
    net = distributed.wrap(model) if distributed.is_active() else model.to(device)
    dataset = JointDataset(data, preprocessing, preset, seed=distributed.rank_seed(seed))
    sampler = distributed.sampler(dataset, seed)
    loader = DataLoader(
        dataset,
        batch_size=distributed.per_rank_batch(preset.batch_size),
        shuffle=sampler is None,
        sampler=sampler,
        drop_last=True,
        collate_fn=_collate,
    )
    loss_fn = JOINT.loss(preset, expected_labels(data.samples, preset)).to(device)
    optimizer, scheduler = JOINT.optimizer(preset, net, max(1, len(loader)))
    if resume is None and checkpoint is not None and Path(checkpoint).is_file():
        resume = checkpoint

    def before_epoch(epoch: int) -> None:
        dataset.set_epoch(epoch)
        distributed.set_epoch(sampler, epoch)

    result = engine.fit(
        net,
        loss_fn,
        optimizer,
        loader,
        epochs=preset.epochs,
        scheduler=scheduler,
        step_every="step",
        selection=JOINT.selection(preset),
        checkpoint=checkpoint,
        resume=resume,
        before_epoch=before_epoch,
        progress=progress,
        device=device,
    )
    distributed.unwrap(net, into=model)
    model.eval()
    return model, result.history, result.seconds


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights on the CPU (what the saved .pt files hold, whatever it trained on)."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


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
    """Class logits and probabilities and frame-sized lesion probability maps, as served; with
    `features`, also the pooled deepest encoder features (one more encoder pass per batch)."""
    net = JointFlipAverage(model) if flip_tta else model
    net.eval()
    device = engine.model_device(model)
    logits_out, maps, pooled = [], [], []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        layouts = [preprocessing.layout(im) for im in chunk]
        x = torch.from_numpy(
            np.stack(
                [
                    preprocessing.normalise(preprocessing.resize_image(im, lay))
                    for im, lay in zip(chunk, layouts, strict=True)
                ]
            )
        ).to(device)
        class_logits, mask_logits = net(x)
        logits_out.append(class_logits.float().cpu().numpy().astype(np.float64))
        if features:
            pooled.append(model.encoder(x)[-1].mean(dim=(2, 3)).float().cpu().numpy())
        for logits, lay in zip(mask_logits.float().cpu().numpy(), layouts, strict=True):
            prob = 1.0 / (1.0 + np.exp(-logits[0].astype(np.float64)))
            maps.append(preprocessing.frame_map(prob.astype(np.float32), lay))
    logits = np.concatenate(logits_out)
    probs = np.stack([softmax(row) for row in logits])
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


def _figures(rows: list[dict[str, Any]]) -> dict[str, float]:
    y = np.asarray([r["label"] for r in rows])
    probs = np.asarray([r["probs"] for r in rows])
    out = _scalars(y, probs, CLASS_NAMES) if len(rows) else {}
    pred = probs.argmax(axis=1) if len(rows) else np.zeros(0, int)
    lesion = y > 0
    dice = np.asarray([r["dice"] for r in rows])
    drawn = np.asarray([r["mask_pixels"] > 0 for r in rows])
    normal = ~lesion
    figures = {
        "accuracy": out.get("accuracy", float("nan")),
        "macro_f1": out.get("macro_f1", float("nan")),
        "macro_auc": out.get("macro_auc", float("nan")),
        "malignant_sensitivity": out.get("malignant_recall", float("nan")),
        "lesion_dice": float(dice[lesion].mean()) if lesion.any() else float("nan"),
        # /segment draws whatever the mask shows; /diagnose only when the class is not normal
        "normal_with_lesion_segment": float(drawn[normal].mean()) if normal.any() else float("nan"),
        "normal_with_lesion_diagnose": (
            float((drawn & (pred > 0))[normal].mean()) if normal.any() else float("nan")
        ),
    }
    return figures


def group_bootstrap(
    rows: list[dict[str, Any]],
    n_resamples: int = 1000,
    seed: int = 0,
    figures: Callable[[list[dict[str, Any]]], dict[str, float]] | None = None,
) -> dict[str, list[float]]:
    """95% percentile intervals resampling near-duplicate groups (row["group"]) with replacement,
    of each of `figures(rows)` (default: this module's headline figures); NaN draws are skipped."""
    figures = figures or _figures
    by_group: dict[Any, list[dict[str, Any]]] = {}
    for row in rows:
        by_group.setdefault(row["group"], []).append(row)
    groups = list(by_group)
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {}
    for _ in range(n_resamples):
        picked = rng.integers(0, len(groups), size=len(groups))
        sample = [row for g in picked for row in by_group[groups[g]]]
        for key, value in figures(sample).items():
            if not math.isnan(value):
                draws.setdefault(key, []).append(value)
    return {
        key: [float(np.quantile(v, 0.025)), float(np.quantile(v, 0.975))]
        for key, v in draws.items()
    }


def summarise(rows_by_canvas: dict[str, list[dict[str, Any]]], n_resamples: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for canvas, rows in rows_by_canvas.items():
        y = np.asarray([r["label"] for r in rows])
        pred = np.asarray([r["probs"] for r in rows]).argmax(axis=1)
        out[canvas] = {
            "n": len(rows),
            **_figures(rows),
            "ci95": group_bootstrap(rows, n_resamples) if n_resamples else {},
            "confusion_matrix": confusion_matrix(y, pred, len(CLASS_NAMES)).tolist(),
        }
    return out


# --- cross-validation --------------------------------------------------------------------------


def cv_main(args: argparse.Namespace) -> dict[str, Any]:
    preset = resolve_preset(args)
    samples = _samples(args)
    folds_file = Path(args.split_file)
    if not folds_file.is_file() and distributed.is_main():
        log.warning("no fold file: making grouped 5-fold split at %s", folds_file)
        write_folds(args.data_path, folds_file, samples)
    distributed.barrier()  # under torchrun the other ranks read the file rank 0 wrote
    items = load_folds(folds_file, samples)
    k = int(json.loads(folds_file.read_text())["k"])
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    engine.configure_threads(args.threads)
    device = engine.resolve_device(args.device)
    todo = args.folds if args.folds is not None else list(range(k))
    data = load_split_images(samples) if todo and not args.report_only else None
    for fold in [] if args.report_only else todo:
        path = output / f"fold{fold}.json"
        if path.is_file():
            log.info("fold %d already done (%s)", fold, path)
            continue
        train_idx = [i for i, s in enumerate(samples) if items[s.key]["fold"] != fold]
        test_idx = [i for i, s in enumerate(samples) if items[s.key]["fold"] == fold]
        log.info("fold %d: training on %d, testing on %d", fold, len(train_idx), len(test_idx))
        model, history, seconds = train(
            preset,
            data.pick(train_idx),
            seed=args.seed + fold,
            pretrained=not args.no_pretrained,
            checkpoint=output / f"fold{fold}.ckpt",
            progress=not args.no_progress,
            device=device,
        )
        if not distributed.is_main():
            continue  # rank 0 evaluates and writes; the others go on to the next fold
        held_out = data.pick(test_idx)
        result = {
            "fold": fold,
            "preset": args.preset,
            "recipe": asdict(preset),
            "train_seconds": round(seconds, 1),
            "threads": torch.get_num_threads(),
            "history": history.to_dict(),
            "rows": {
                name: [
                    {**row, "fold": fold, "group": items[row["key"]]["group"]}
                    for row in evaluate_images(model, preset, held_out, aspect)
                ]
                for name, aspect in CANVASES.items()
            },
        }
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result) + "\n")
        tmp.replace(path)
        torch.save(cpu_state(model), output / f"fold{fold}.pt")  # for later analyses
        (output / f"fold{fold}.ckpt").unlink(missing_ok=True)
        log.info("fold %d: %s", fold, json.dumps(_figures(result["rows"]["plain"])))
    if not distributed.is_main():
        return {"rank": distributed.rank()}
    done = sorted(output.glob("fold*.json"))
    if len(done) < k:
        log.info("%d of %d folds done; the pooled report waits for the rest", len(done), k)
        return {"folds_done": len(done)}
    return write_cv_report(output, args.preset, args.bootstrap)


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


def write_cv_report(output: Path, preset_name: str, n_resamples: int = 1000) -> dict[str, Any]:
    folds = [json.loads(p.read_text()) for p in sorted(output.glob("fold*.json"))]
    pooled = {c: [r for f in folds for r in f["rows"][c]] for c in CANVASES}
    report = {
        "preset": preset_name,
        "recipe": folds[0]["recipe"],
        "k": len(folds),
        "pooled": summarise(pooled, n_resamples),
        "per_fold": [
            {
                "fold": f["fold"],
                "train_seconds": f["train_seconds"],
                **_figures(f["rows"]["plain"]),
            }
            for f in folds
        ],
        "bootstrap": {
            "resamples": n_resamples,
            "unit": "near-duplicate group",
            "method": "percentile",
        },
    }
    (output / "oof.json").write_text(json.dumps(pooled) + "\n")
    (output / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (output / "report.md").write_text(render_report(report))
    log.info("pooled out-of-fold figures: %s", json.dumps(report["pooled"]["plain"]))
    return report


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


def write_folds(data_path: Path, path: Path, samples: list[Sample] | None = None) -> None:
    """Make and save the grouped 5-fold split, reusing the groups of the committed split file
    when it matches the folder (else computing them)."""
    from training.data import group_near_duplicates

    samples = samples or scan_dataset(data_path)
    keys = [s.key for s in samples]
    groups_doc = json.loads(GROUPS_FILE.read_text())["items"] if GROUPS_FILE.is_file() else {}
    if set(groups_doc) == set(keys):
        groups = [int(groups_doc[k]["group"]) for k in keys]
    else:
        groups = group_near_duplicates([load_image(s) for s in samples])
    document = make_folds(keys, [s.label for s in samples], groups)
    document["fingerprint"] = data_fingerprint(samples)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1, sort_keys=True) + "\n")


def fold_split(folds_doc: dict[str, Any], fold: int, val_fraction: float = 0.15) -> dict:
    """A train / val / test split file (training.data's format) whose test split is CV fold
    `fold`, so the separate classification and segmentation jobs can be scored on exactly the
    images a joint fold model was scored on. Val is a grouped, stratified `val_fraction` of the
    other folds (those jobs choose checkpoints and thresholds on it); train is the rest."""
    from training.data import grouped_stratified_split

    items = folds_doc["items"]
    rest = sorted(k for k, v in items.items() if v["fold"] != fold)
    labels = [CLASS_NAMES.index(k.split("/", 1)[0]) for k in rest]
    groups = [int(items[k]["group"]) for k in rest]
    splits = grouped_stratified_split(labels, groups, (1 - val_fraction, val_fraction, 0.0))
    out = {k: {"split": "test", "group": v["group"]} for k, v in items.items() if v["fold"] == fold}
    for key, split, group in zip(rest, splits, groups, strict=True):
        out[key] = {"split": split, "group": group}
    return {"seed": 0, "from_folds": {"fold": fold, "val_fraction": val_fraction}, "items": out}


# --- refit on all the data and publish -----------------------------------------------------------


def fit_main(args: argparse.Namespace) -> dict[str, Any]:
    """Train the recipe on every image (or take --weights), then the engine's finishing step:
    export with the flip averaging baked in, publish as `diagnosis`, metrics.json, report.md."""
    preset = resolve_preset(args)
    samples = _samples(args)
    engine.configure_threads(args.threads)
    device = engine.resolve_device(args.device)
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    if args.weights and not distributed.is_main():
        return {"rank": distributed.rank()}  # publishing a finished run is rank 0's alone
    checkpoint = output / engine.CHECKPOINT_NAME
    if args.weights:  # publish a finished run again (e.g. with its calibration), no training
        model = build_model(preset, pretrained=False)
        history, seconds = load_weights(Path(args.weights), model)
        model.eval()
    else:
        legacy = output / "fit.ckpt"  # the name before the engine: a run stopped then resumes
        resume = args.resume or (legacy if legacy.is_file() and not checkpoint.is_file() else None)
        model, history, seconds = train(
            preset,
            load_split_images(samples),
            seed=args.seed,
            pretrained=not args.no_pretrained,
            checkpoint=checkpoint,
            resume=resume,
            progress=not args.no_progress,
            device=device,
        )
        if not distributed.is_main():
            return {"rank": distributed.rank()}  # rank 0 exports, reports and publishes
        torch.save(cpu_state(model), output / engine.BEST_NAME)
    if args.cv_report and not Path(args.cv_report).is_file():
        log.warning("no cross-validation report at %s: publishing without it", args.cv_report)
        args.cv_report = None
    cv = json.loads(Path(args.cv_report).read_text()) if args.cv_report else None
    metrics = {
        "kind": "cross-validated" if cv else "none",
        "note": (
            "pooled out-of-fold figures of this recipe (grouped 5-fold cross-validation); "
            "the artifact itself was refit on every image"
            if cv
            else "no cross-validation report was given"
        ),
        **({"cross_validation": cv["pooled"], "k": cv["k"]} if cv else {}),
    }
    extra = {"cross_validation": {"k": cv["k"], "pooled": cv["pooled"]} if cv else None}
    document = publish(args, preset, model, history, seconds, samples, metrics, extra)
    checkpoint.unlink(missing_ok=True)  # finished: the same command trains afresh
    (output / "fit.ckpt").unlink(missing_ok=True)
    artifact = document["artifact"]
    return {"version": artifact["version"], "path": artifact["path"], "seconds": seconds}


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
    """The engine's finishing step for trained joint weights: export with the flip averaging
    baked in (and the calibration of --calibration), publish as `diagnosis` with `metrics` in
    the manifest, write metrics.json and report.md. Returns the metrics.json document."""
    output = Path(args.output_dir)
    calibration: dict[str, Any] = {}
    if args.calibration:
        from training.calibration import manifest_fields

        calibration = manifest_fields(args.calibration)  # validated; see training.calibration
    epochs_run = len(history.epochs)
    run = Run(
        args,
        preset,
        output,
        engine.resolve_device(args.device),
        torch.get_num_threads(),
        preprocessing_for(preset),
        data={"train": LoadedSplit(samples, [], [])},
        fit=engine.FitResult(history, epochs_run, None, seconds),
    )
    evaluation = Evaluation(
        served=JointFlipAverage(model) if preset.flip_tta else model,
        example=torch.zeros((1, 3, preset.size, preset.size)),
        name=args.name or args.preset,
        architecture=f"joint_unet_{preset.encoder}",
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
        training={"flip_tta": preset.flip_tta, "n_images": len(samples)},
        intended_use=intended_use,
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
    args = cli.parse(parser, argv, "cv")
    if args.output_dir is None:
        args.output_dir = Path("training/reports/cv") / args.preset
    return args


def parse_oof_args(argv: list[str]) -> argparse.Namespace:
    parser = common_parser(
        "python -m training oof",
        "Out-of-fold logits and features from the CV fold models",
        default_output="training/reports/cv/<preset>",
    )
    args = cli.parse(parser, argv, "oof")
    if args.output_dir is None:
        args.output_dir = Path("training/reports/cv") / args.preset
    return args


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
    args = cli.parse(parser, argv, "fit")
    if args.output_dir is None:
        args.output_dir = Path("training/reports/fit") / args.preset
    return args
