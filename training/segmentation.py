"""Lesion segmentation training: `python -m training segment --preset NAME --data-path DIR ...`.

`main(args)` reads as the recipe: data and split -> train (one epoch at a time, checkpointed,
resumable) -> choose the checkpoint and the threshold -> evaluate the test split once -> report
-> export to TorchScript -> publish into the model registry.

Masks are predicted for the whole scan: THE preprocessing stretches the image to a square
(resize_mode="stretch", no crop) so the model's probability map can be resized back onto every
pixel of the input, which is exactly what the service does (shared.postprocessing).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import shlex
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from shared.artifacts import new_version_name
from shared.labels import TASK_SEGMENTATION
from shared.models import build_model
from shared.models.tta import HorizontalFlipAverage
from shared.postprocessing import probability_to_mask, sigmoid
from shared.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from training import engine
from training.data import (
    Sample,
    data_fingerprint,
    load_image,
    load_mask,
    resolve_split,
    subset_per_class,
)
from training.export import build_metadata, export_torchscript, publish
from training.seg_metrics import (
    best_threshold,
    min_area_sweep,
    score_masks,
    selection_score,
    summarise,
    threshold_sweep,
)
from training.seg_plots import plot_iou_vs_threshold, plot_loss_curves, plot_sample_predictions

log = logging.getLogger(__name__)

DEFAULT_SPLIT_FILE = Path(__file__).parent / "splits" / "busi.json"
TARGET_LESION_DICE = 0.80
TARGET_NORMAL_WITH_LESION = 0.10


@dataclass(frozen=True)
class SegPreset:
    """A named recipe. Command-line flags may override epochs, batch size, lr and size."""

    architecture: str
    size: int
    epochs: int
    batch_size: int
    optimizer: str  # "sgd" (Nesterov) | "adamw"
    lr: float
    min_lr: float
    weight_decay: float
    loss: str  # "bce" | "dice_bce"
    train_on: str  # "lesion": benign + malignant only | "all": normal scans (empty masks) too
    augment: str  # "none" | "full" (flip, rotation, scale, shift, brightness/contrast)
    threshold_from: str  # "train" | "val": the split whose scores choose the threshold
    threshold_metric: str  # "lesion_iou" | "all_dice" (see training.seg_metrics)
    checkpoint: str  # "last" | "best_val" (highest val all-image Dice at threshold 0.5)
    flip_tta: bool = False  # also try logits averaged with the mirror image; kept if better on val
    channels: int = 3
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    momentum: float = 0.9
    warmup_epochs: float = 0.0
    encoder_lr_scale: float = 1.0
    pretrained: bool = False
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    description: str = ""


PRESETS: dict[str, SegPreset] = {
    "seed-attention-unet": SegPreset(
        description="the seed's recipe: Attention U-Net at 64x64 from scratch, BCE, SGD",
        architecture="attention_unet",
        size=64,
        channels=1,
        mean=(0.0,),
        std=(1.0,),  # the seed fed grey values scaled to [0, 1]
        epochs=50,
        batch_size=32,
        optimizer="sgd",
        lr=0.1,
        min_lr=1e-5,
        weight_decay=1e-5,
        loss="bce",
        train_on="lesion",
        augment="none",
        threshold_from="train",
        threshold_metric="lesion_iou",
        checkpoint="last",
        model_kwargs={"in_channels": 1, "filters": (16, 32, 64, 128, 256)},
    ),
    "unet-effnet-lite0": SegPreset(
        description=(
            "U-Net decoder on an ImageNet EfficientNet-Lite0 encoder, 192x192, Dice + BCE, "
            "AdamW + cosine, lesion and normal scans, threshold and checkpoint chosen on val"
        ),
        architecture="unet_effnet_lite0",
        size=192,
        epochs=24,
        batch_size=16,
        optimizer="adamw",
        lr=1e-3,
        min_lr=1e-5,
        weight_decay=1e-4,
        warmup_epochs=1.0,
        encoder_lr_scale=0.3,
        loss="dice_bce",
        train_on="all",
        augment="full",
        threshold_from="val",
        threshold_metric="all_dice",
        checkpoint="best_val",
        pretrained=True,
        model_kwargs={"freeze_stem_stages": 2},
    ),
}

# The shipped recipe with an image-level cap on the mask (shared.models.unet.GatedUNetEffLite0),
# aimed at the lesions it draws on normal scans; 16 epochs, as val Dice of the 24-epoch run
# stopped rising after about 10. Written before its test numbers were seen: it is shipped only
# if its val all-image Dice beats unet-effnet-lite0's (0.729).
PRESETS["unet-effnet-lite0-gated"] = replace(
    PRESETS["unet-effnet-lite0"],
    description=(
        "unet-effnet-lite0 with every pixel logit capped by an image-level lesion logit "
        "(pooled encoder features), 16 epochs"
    ),
    architecture="gated_unet_effnet_lite0",
    epochs=16,
)


def get_preset(name: str) -> SegPreset:
    """The preset called `name`. Raises ValueError listing the valid names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown segmentation preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}"
        ) from None


# --- data --------------------------------------------------------------------------------------


@dataclass
class LoadedSplit:
    """Decoded images and merged masks of one split, in memory (BUSI is ~600 scans)."""

    samples: list[Sample]
    images: list[np.ndarray]
    masks: list[np.ndarray]

    @property
    def class_names(self) -> list[str]:
        return [s.class_name for s in self.samples]

    @property
    def labels(self) -> list[int]:
        return [s.label for s in self.samples]

    def pick(self, indices: list[int]) -> LoadedSplit:
        return LoadedSplit(
            [self.samples[i] for i in indices],
            [self.images[i] for i in indices],
            [self.masks[i] for i in indices],
        )

    def subset(self, keep: list[bool]) -> LoadedSplit:
        return self.pick([i for i, k in enumerate(keep) if k])


def load_split_images(samples: list[Sample]) -> LoadedSplit:
    images = [load_image(s) for s in samples]
    masks = [load_mask(s, im.shape) for s, im in zip(samples, images, strict=True)]
    return LoadedSplit(list(samples), images, masks)


def augment_pair(
    image: np.ndarray, mask: np.ndarray, rng: random.Random
) -> tuple[np.ndarray, np.ndarray]:
    """Random flip, rotation (+-10 deg), scale (0.85-1.15), shift (+-6%) applied identically to a
    uint8 image and its mask, then brightness/contrast on the image. Train only, before
    THE preprocessing, on the full-size uint8 arrays the service would also start from."""
    if rng.random() < 0.5:
        image, mask = image[:, ::-1], mask[:, ::-1]
    height, width = image.shape
    if rng.random() < 0.8:
        angle = math.radians(rng.uniform(-10.0, 10.0))
        scale = rng.uniform(0.85, 1.15)
        tx, ty = rng.uniform(-0.06, 0.06) * width, rng.uniform(-0.06, 0.06) * height
        cx, cy = width / 2.0, height / 2.0
        # PIL wants the inverse map (output pixel -> input pixel) of
        # out = scale * R(angle) (in - c) + c + t
        a, b = math.cos(angle) / scale, math.sin(angle) / scale
        d, e = -math.sin(angle) / scale, math.cos(angle) / scale
        c = cx - a * (cx + tx) - b * (cy + ty)
        f = cy - d * (cx + tx) - e * (cy + ty)
        coeffs = (a, b, c, d, e, f)
        image = np.asarray(
            Image.fromarray(np.ascontiguousarray(image)).transform(
                (width, height), Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR
            )
        )
        mask = np.asarray(
            Image.fromarray(np.ascontiguousarray(mask)).transform(
                (width, height), Image.Transform.AFFINE, coeffs, Image.Resampling.NEAREST
            )
        )
    if rng.random() < 0.8:
        contrast, brightness = rng.uniform(0.8, 1.2), rng.uniform(-20.0, 20.0)
        mean = float(image.mean())
        image = np.clip((image.astype(np.float32) - mean) * contrast + mean + brightness, 0, 255)
    return np.ascontiguousarray(image, dtype=np.uint8), np.ascontiguousarray(mask)


class SegmentationDataset(Dataset):
    """(input (C, S, S) float32, target (1, S, S) float32 in [0, 1]) pairs.

    The target is the mask resized by the same Pillow call as the image, divided by 255: a soft
    edge where a pixel of the small grid covers both lesion and background.
    """

    def __init__(
        self, data: LoadedSplit, preprocessing: Preprocessing, augment: bool, seed: int = 0
    ) -> None:
        self.data = data
        self.preprocessing = preprocessing
        self.augment = augment
        self.seed = seed
        self.rng = random.Random(seed)

    def set_epoch(self, epoch: int) -> None:
        """Reseed the augmentation per epoch, so a resumed run draws what an unbroken one would."""
        self.rng = random.Random(self.seed * 100_003 + epoch)

    def __len__(self) -> int:
        return len(self.data.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.data.images[index], self.data.masks[index]
        if self.augment:
            image, mask = augment_pair(image, mask, self.rng)
        x = self.preprocessing(image)
        y = self.preprocessing.resize_image(mask).astype(np.float32)[None] / 255.0
        return torch.from_numpy(x), torch.from_numpy(y)


def fixed_tensors(data: LoadedSplit, preprocessing: Preprocessing) -> TensorDataset:
    """Preprocess an evaluation split once; it never changes between epochs."""
    dataset = SegmentationDataset(data, preprocessing, augment=False)
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))), strict=True)
    return TensorDataset(torch.stack(xs), torch.stack(ys))


# --- loss, optimiser, schedule ----------------------------------------------------------------


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


def build_loss(name: str) -> nn.Module:
    if name == "bce":
        return nn.BCEWithLogitsLoss()
    if name == "dice_bce":
        return DiceBCELoss()
    raise ValueError(f"unknown loss {name!r}")


def build_optimizer(model: nn.Module, preset: SegPreset) -> torch.optim.Optimizer:
    encoder = getattr(model, "encoder", None)
    encoder_ids = {id(p) for p in encoder.parameters()} if encoder is not None else set()
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if id(p) not in encoder_ids], "lr": preset.lr},
        {
            "params": [p for p in trainable if id(p) in encoder_ids],
            "lr": preset.lr * preset.encoder_lr_scale,
        },
    ]
    groups = [g for g in groups if g["params"]]
    if preset.optimizer == "sgd":
        return torch.optim.SGD(
            groups, momentum=preset.momentum, nesterov=True, weight_decay=preset.weight_decay
        )
    if preset.optimizer == "adamw":
        return torch.optim.AdamW(groups, weight_decay=preset.weight_decay)
    raise ValueError(f"unknown optimizer {preset.optimizer!r}")


def build_scheduler(
    optimizer: torch.optim.Optimizer, preset: SegPreset, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-iteration linear warmup then cosine from each group's lr down to min_lr / lr of it."""
    warmup = int(preset.warmup_epochs * steps_per_epoch)
    factor = engine.warmup_cosine(
        preset.epochs * steps_per_epoch, warmup, floor=preset.min_lr / preset.lr
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --- evaluation --------------------------------------------------------------------------------


@torch.inference_mode()
def predict_probabilities(
    model: nn.Module, inputs: torch.Tensor, batch_size: int = 16
) -> list[np.ndarray]:
    """Model-size lesion probability maps (S, S) through shared.postprocessing.sigmoid."""
    model.eval()
    out = []
    for start in range(0, len(inputs), batch_size):
        logits = model(inputs[start : start + batch_size]).float().numpy()
        out.extend(sigmoid(logit[0]) for logit in logits)
    return out


# --- the recipe --------------------------------------------------------------------------------


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training segment",
        description="Train, evaluate, export and publish a lesion segmenter",
        add_help=add_help,
    )
    parser.add_argument(
        "--preset",
        default="unet-effnet-lite0",
        help=f"recipe name, one of {', '.join(sorted(PRESETS))} (default: unet-effnet-lite0)",
    )
    parser.add_argument(
        "--data-path", type=Path, required=True, help="folder in BUSI layout (required)"
    )
    parser.add_argument(
        "--split-file",
        type=Path,
        default=DEFAULT_SPLIT_FILE,
        help="grouped split file (default: training/splits/busi.json; when it does not exist "
        "the split is made in memory and saved to the output folder)",
    )
    parser.add_argument(
        "--output-dir", type=Path, default=None, help="run folder (default: runs/segment-PRESET)"
    )
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="registry to publish into as <model-dir>/segmentation/<version> (default: none)",
    )
    parser.add_argument(
        "--version", default=None, help="artifact version (default: UTC time, e.g. 20260101T...Z)"
    )
    parser.add_argument("--epochs", type=int, default=None, help="override (default: preset's)")
    parser.add_argument("--batch-size", type=int, default=None, help="override (default: preset's)")
    parser.add_argument("--lr", type=float, default=None, help="override (default: preset's)")
    parser.add_argument(
        "--size", type=int, default=None, help="input side override (default: preset's)"
    )
    parser.add_argument(
        "--flip-tta",
        action="store_true",
        help="also try averaging the logits of the image and its mirror image (inside the "
        "exported model); kept only if it scores better on val (default: off)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    parser.add_argument(
        "--resume",
        type=Path,
        default=None,
        help="checkpoint to continue from, e.g. RUN/checkpoint.pt (default: start afresh)",
    )
    parser.add_argument(
        "--test-only",
        action="store_true",
        help="skip training: evaluate, report and export the run's saved best weights",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a run under a minute: 1 epoch, 32 px, a few images per split (default: off)",
    )
    parser.add_argument(
        "--bootstrap", type=int, default=2000, help="bootstrap resamples (default: 2000)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def resolve_preset(args: argparse.Namespace) -> SegPreset:
    preset = get_preset(args.preset)
    overrides = {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "size": args.size,
    }
    if args.flip_tta:
        overrides["flip_tta"] = True
    if args.smoke:
        smoke = {"epochs": 1, "batch_size": 4, "size": 32, "warmup_epochs": 0.0}
        overrides = {k: v if v is not None else smoke.get(k) for k, v in overrides.items()}
        overrides["warmup_epochs"] = 0.0
        if preset.architecture == "attention_unet":
            overrides["model_kwargs"] = {**preset.model_kwargs, "filters": (8, 16, 32)}
    return replace(preset, **{k: v for k, v in overrides.items() if v is not None})


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m training segment`; returns the exit status."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    try:
        get_preset(args.preset)
    except ValueError as exc:
        parser.error(str(exc))  # exits with status 2 and the list of valid presets
    args.command_line = "python -m training segment " + shlex.join(
        argv if argv is not None else __import__("sys").argv[1:]
    )
    run(args)
    return 0


def run(args: argparse.Namespace) -> dict[str, Any]:
    preset = resolve_preset(args)
    output_dir = Path(args.output_dir or Path("runs") / f"segment-{args.preset}")
    output_dir.mkdir(parents=True, exist_ok=True)
    engine.setup_logging(output_dir / "train.log")
    engine.seed_everything(args.seed)
    threads = engine.configure_threads(args.threads)
    log.info("preset %s: %s", args.preset, json.dumps(asdict(preset), default=str))
    log.info("torch threads: %d", threads)

    # data: grouped split, decoded once into memory
    _, splits, split_path = resolve_split(
        args.data_path, args.split_file, fallback=output_dir / "split.json"
    )
    split_file = str(split_path)
    if args.smoke:  # a few of each class keeps every code path alive
        splits = {name: subset_per_class(items, 4) for name, items in splits.items()}
    started = time.perf_counter()
    data = {name: load_split_images(items) for name, items in splits.items()}
    log.info(
        "loaded %s in %.1f s",
        ", ".join(f"{k}={len(v.samples)}" for k, v in data.items()),
        time.perf_counter() - started,
    )
    train_data = data["train"]
    if preset.train_on == "lesion":
        train_data = train_data.subset([c != "normal" for c in train_data.class_names])
    preprocessing = Preprocessing(
        resize=preset.size,
        resize_mode="stretch",
        crop=None,
        mean=preset.mean,
        std=preset.std,
        channels=preset.channels,
    )
    train_loader = DataLoader(
        SegmentationDataset(train_data, preprocessing, preset.augment == "full", args.seed),
        batch_size=preset.batch_size,
        shuffle=True,
        drop_last=len(train_data.images) > preset.batch_size,
    )
    val_tensors = fixed_tensors(data["val"], preprocessing)
    val_loader = DataLoader(val_tensors, batch_size=preset.batch_size)

    # model, loss, optimiser
    model = build_model(
        preset.architecture,
        **({"pretrained": True} if preset.pretrained else {}),
        **preset.model_kwargs,
    )
    loss_fn = build_loss(preset.loss)
    optimizer = build_optimizer(model, preset)
    scheduler = build_scheduler(optimizer, preset, len(train_loader))
    history = engine.History()
    start_epoch, best_metric, best_epoch = 1, -math.inf, 0
    checkpoint_path, best_path = output_dir / "checkpoint.pt", output_dir / "best_model.pt"
    if args.resume:
        restored = engine.load_checkpoint(args.resume, model, optimizer, scheduler)
        start_epoch = restored.epoch + 1
        best_metric = restored.best_metric if restored.best_metric is not None else -math.inf
        best_epoch = int(restored.extra.get("best_epoch", 0))
        history = restored.history

    # train: the checkpoint is chosen on val (or is the last epoch, as the seed did)
    if not args.test_only:
        for epoch in range(start_epoch, preset.epochs + 1):
            train_loader.dataset.set_epoch(epoch)
            with engine.Timer() as timer:
                train_loss = engine.train_one_epoch(
                    model,
                    loss_fn,
                    optimizer,
                    train_loader,
                    epoch,
                    step_scheduler=scheduler,
                    progress=not args.no_progress,
                )
                val = engine.evaluate(
                    model, loss_fn, val_loader, desc="val", progress=not args.no_progress
                )
                probs = [sigmoid(o[0].numpy()) for o in val.outputs]
                scores = score_masks(probs, data["val"].masks, 0.5)
                lesion = np.array([c != "normal" for c in data["val"].class_names])
                values = {
                    "train_loss": train_loss,
                    "val_loss": val.loss,
                    "val_lesion_dice": _mean(scores["dice"][lesion]),
                    "val_normal_with_lesion": _mean(scores["any_lesion"][~lesion]),
                    "val_all_dice": selection_score(scores),
                    "lr": optimizer.param_groups[0]["lr"],
                }
            improved = preset.checkpoint == "last" or values["val_all_dice"] > best_metric
            if improved:
                best_metric, best_epoch = values["val_all_dice"], epoch
                torch.save(model.state_dict(), best_path)
            history.append(epoch, seconds=timer.seconds, **values)
            engine.log_epoch(
                epoch, preset.epochs, seconds=timer.seconds, **values, best_epoch=best_epoch
            )
            engine.save_checkpoint(
                checkpoint_path,
                model=model,
                optimizer=optimizer,
                scheduler=scheduler,
                epoch=epoch,
                best_metric=best_metric,
                history=history,
                extra={"preset": args.preset, "best_epoch": best_epoch},
            )
    elif checkpoint_path.is_file() and not history.epochs:
        restored = engine.load_checkpoint(checkpoint_path, model, restore_rng=False)
        history, best_epoch = restored.history, int(restored.extra.get("best_epoch", 0))
    model.load_state_dict(torch.load(best_path, map_location="cpu", weights_only=True))
    model.eval()
    train_seconds = float(sum(history.column("seconds")))
    log.info("training took %.1f s; using the weights of epoch %d", train_seconds, best_epoch)

    return finish(
        args,
        preset,
        model,
        preprocessing,
        data,
        train_data,
        history,
        best_epoch,
        train_seconds,
        split_file,
        output_dir,
    )


def finish(
    args: argparse.Namespace,
    preset: SegPreset,
    model: nn.Module,
    preprocessing: Preprocessing,
    data: dict[str, LoadedSplit],
    train_data: LoadedSplit,
    history: engine.History,
    best_epoch: int,
    train_seconds: float,
    split_file: str,
    output_dir: Path,
) -> dict[str, Any]:
    """Threshold, the one test evaluation, plots, report, export and publish."""
    with engine.Timer() as eval_timer:
        chooser = train_data if preset.threshold_from == "train" else data["val"]
        chooser_inputs = fixed_tensors(chooser, preprocessing).tensors[0]
        candidates: dict[str, nn.Module] = {"plain": model}
        if preset.flip_tta and preset.threshold_from == "val":
            candidates["flip_tta"] = HorizontalFlipAverage(model).eval()
        tried: dict[str, float] = {}
        for name, candidate in candidates.items():
            probs = predict_probabilities(candidate, chooser_inputs)
            sweep = threshold_sweep(probs, chooser.masks)
            t = best_threshold(sweep, preset.threshold_metric)
            tried[name] = max(row[preset.threshold_metric] for row in sweep)
            if name == "plain" or tried[name] > tried["plain"]:  # ties keep the cheaper model
                chosen, exported = name, candidate
                chooser_probs, chooser_sweep, threshold = probs, sweep, t
        log.info("inference variants on %s: %s; using %s", preset.threshold_from, tried, chosen)
        model = exported
        log.info(
            "threshold %.2f chosen by %s on %s",
            threshold,
            preset.threshold_metric,
            preset.threshold_from,
        )
        val_probs = (
            chooser_probs
            if preset.threshold_from == "val"
            else predict_probabilities(model, fixed_tensors(data["val"], preprocessing).tensors[0])
        )
        val_summary = summarise(
            score_masks(val_probs, data["val"].masks, threshold),
            data["val"].class_names,
            args.bootstrap,
            args.seed,
        )
        # the test split, once
        test = data["test"]
        test_probs = predict_probabilities(model, fixed_tensors(test, preprocessing).tensors[0])
        test_scores = score_masks(test_probs, test.masks, threshold)
        test_summary = summarise(test_scores, test.class_names, args.bootstrap, args.seed)
        test_sweep = threshold_sweep(test_probs, test.masks)
        # analysis only: a minimum-area rule chosen on val, and what it would do on test
        val_area_sweep = min_area_sweep(val_probs, data["val"].masks, threshold)
        min_area = float(
            val_area_sweep[int(np.argmax([r["all_dice"] for r in val_area_sweep]))]["min_area"]
        )
        test_area_sweep = min_area_sweep(test_probs, test.masks, threshold)
    log.info("test: %s", json.dumps(_headline(test_summary)))

    plot_loss_curves(history, output_dir / "loss_curves.png")
    plot_iou_vs_threshold(
        {preset.threshold_from: chooser_sweep, "test": test_sweep},
        threshold,
        output_dir / "iou_vs_threshold.png",
    )
    picks = _sample_indices(test.class_names, per_class=4)
    plot_sample_predictions(
        [test.images[i] for i in picks],
        [test.masks[i] for i in picks],
        [probability_to_mask(test_probs[i], threshold, *test.masks[i].shape) for i in picks],
        [f"{test.class_names[i]}  Dice {test_scores['dice'][i]:.2f}" for i in picks],
        output_dir / "sample_predictions.png",
    )

    # key order, as in the split file, so the two fingerprints agree
    everything = sorted((s for split in data.values() for s in split.samples), key=lambda s: s.key)
    fingerprint = data_fingerprint(everything) | {"split_file": _display_path(split_file)}
    config = {
        "preset": args.preset,
        **{k: v for k, v in asdict(preset).items() if k != "description"},
        "seed": args.seed,
        "threads": args.threads,
        "smoke": bool(args.smoke),
        "train_images": len(train_data.samples),
        "best_epoch": best_epoch,
        "inference": chosen,
        "command": getattr(args, "command_line", None),
    }
    metrics: dict[str, Any] = {
        "task": TASK_SEGMENTATION,
        "preset": args.preset,
        "description": preset.description,
        "threshold": threshold,
        "threshold_selection": f"max mean {preset.threshold_metric} on {preset.threshold_from}",
        "selection_threshold_sweep": chooser_sweep,
        "inference": {"variants_on_selection_split": tried, "chosen": chosen},
        "validation": val_summary,
        "test": test_summary,
        "test_threshold_sweep": test_sweep,
        "min_area_analysis": {
            "note": "not applied: the service has no minimum-area rule; chosen on val",
            "chosen_on_val": min_area,
            "val": val_area_sweep,
            "test": test_area_sweep,
        },
        "best_epoch": best_epoch,
        "epochs_run": len(history.epochs),
        "train_seconds": train_seconds,
        "seconds_per_epoch": train_seconds / max(1, len(history.epochs)),
        "eval_seconds": eval_timer.seconds,
        "split_sizes": {k: len(v.samples) for k, v in data.items()},
        "config": config,
        "history": history.to_dict(),
        "targets": {
            "lesion_dice": TARGET_LESION_DICE,
            "normal_with_lesion": TARGET_NORMAL_WITH_LESION,
        },
    }

    # export + publish
    example = fixed_tensors(test.subset([True] + [False] * (len(test.samples) - 1)), preprocessing)
    scripted = export_torchscript(model, example.tensors[0])
    metrics["artifact"] = None
    if args.model_dir is not None:
        version = args.version or new_version_name()
        metadata = build_metadata(
            task=TASK_SEGMENTATION,
            name=args.preset,
            architecture=preset.architecture,
            preprocessing=preprocessing,
            output={
                "type": "logits",
                "shape": [1, preset.size, preset.size],
                "threshold": threshold,
            },
            metrics={"validation": _headline(val_summary), "test": _headline(test_summary)},
            training=config,
            data_fingerprint=fingerprint,
        )
        info = publish(args.model_dir, TASK_SEGMENTATION, version, scripted, metadata)
        metrics["artifact"] = {"version": version, "path": str(info.path), "sha256": info.sha256}
    else:
        torch.jit.save(scripted, str(output_dir / "model.pt"))
        log.info("no --model-dir: TorchScript saved to %s only", output_dir / "model.pt")

    (output_dir / "metrics.json").write_text(
        json.dumps(_json_ready(metrics), indent=1, sort_keys=True) + "\n"
    )
    (output_dir / "report.md").write_text(render_report(metrics))
    log.info("wrote %s", output_dir)
    return metrics


def _headline(summary: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "lesion_dice",
        "lesion_dice_ci95",
        "lesion_iou",
        "lesion_iou_ci95",
        "normal_with_lesion",
        "normal_with_lesion_ci95",
        "n_lesion_images",
        "n_normal_images",
    )
    return _json_ready({k: summary[k] for k in keys})


def _fmt(value: float | None, ci: list[float | None] | None = None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    text = f"{value:.3f}"
    if ci and ci[0] is not None and not (isinstance(ci[0], float) and math.isnan(ci[0])):
        text += f" [{ci[0]:.3f}, {ci[1]:.3f}]"
    return text


def render_report(metrics: dict[str, Any]) -> str:
    """The run's short Markdown report (every number from metrics.json)."""
    test, val, cfg = metrics["test"], metrics["validation"], metrics["config"]
    dice_ok = (test["lesion_dice"] or 0) >= TARGET_LESION_DICE
    fp = test["normal_with_lesion"]
    fp_ok = fp is not None and fp <= TARGET_NORMAL_WITH_LESION
    lines = [
        f"# Segmentation run: `{metrics['preset']}`",
        "",
        metrics["description"],
        "",
        f"Command: `{cfg['command']}`",
        "",
        f"Training: {metrics['epochs_run']} epochs in {metrics['train_seconds'] / 60:.1f} min "
        f"({metrics['seconds_per_epoch']:.0f} s/epoch, {cfg['threads']} torch threads, CPU); "
        f"weights of epoch {metrics['best_epoch']} "
        f"({'last epoch' if cfg['checkpoint'] == 'last' else 'best val all-image Dice'}). "
        f"Trained on {cfg['train_images']} images ({cfg['train_on']}).",
        "",
        f"Threshold **{metrics['threshold']:.2f}** ({metrics['threshold_selection']}). Masks are "
        "scored as the service returns them: the probability map resized to the image's size, "
        "then thresholded (shared.postprocessing).",
        "",
        "| split | lesion images | Dice (mean, 95% CI) | IoU (mean, 95% CI) | normal images "
        "| normals given a lesion (95% CI) |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in (("val", val), ("test", test)):
        lines.append(
            f"| {name} | {s['n_lesion_images']} | {_fmt(s['lesion_dice'], s['lesion_dice_ci95'])} "
            f"| {_fmt(s['lesion_iou'], s['lesion_iou_ci95'])} | {s['n_normal_images']} "
            f"| {_fmt(s['normal_with_lesion'], s['normal_with_lesion_ci95'])} "
            f"({s['normal_with_lesion_count']}/{s['n_normal_images']}) |"
        )
    lines += ["", "Test per class:", "", "| class | n | Dice (95% CI) | IoU |", "|---|---|---|---|"]
    for name, c in test["per_class"].items():
        lines.append(
            f"| {name} | {c['n']} | {_fmt(c['dice'], c['dice_ci95'])} | {_fmt(c['iou'])} |"
        )
    lines += [
        "",
        f"Lesion images with nothing predicted (test): {test['lesion_missed']}; "
        f"median lesion Dice {_fmt(test['lesion_dice_median'])}.",
        "",
        f"Targets on test: lesion Dice >= {TARGET_LESION_DICE:.2f}: "
        f"**{'met' if dice_ok else 'missed'}**; normals given a lesion <= "
        f"{TARGET_NORMAL_WITH_LESION:.0%}: **{'met' if fp_ok else 'missed'}**. "
        f"Intervals are percentile bootstraps over images ({test['bootstrap']['resamples']} "
        "resamples); near-duplicate groups never straddle splits.",
        "",
        _min_area_line(metrics),
        "",
        "![loss curves](loss_curves.png)",
        "![IoU against threshold](iou_vs_threshold.png)",
        "![sample predictions](sample_predictions.png)",
        "",
    ]
    if metrics.get("artifact"):
        lines.insert(
            4,
            f"Artifact: segmentation/{metrics['artifact']['version']} "
            f"(sha256 {metrics['artifact']['sha256'][:12]}...)\n",
        )
    return "\n".join(lines)


def _min_area_line(metrics: dict[str, Any]) -> str:
    analysis = metrics["min_area_analysis"]
    chosen = analysis["chosen_on_val"]
    if chosen == 0.0:
        return (
            "A minimum-area rule (empty masks under a fraction of the image) does not help on val."
        )
    test_row = next(r for r in analysis["test"] if r["min_area"] == chosen)
    base = next(r for r in analysis["test"] if r["min_area"] == 0.0)
    return (
        f"Not applied, analysis only: a rule 'no lesion under {chosen:.2%} of the image', chosen "
        f"on val, would give on test lesion Dice {test_row['lesion_dice']:.3f} (now "
        f"{base['lesion_dice']:.3f}) and normals given a lesion "
        f"{test_row['normal_with_lesion']:.3f} (now {base['normal_with_lesion']:.3f})."
    )


def _display_path(path: str) -> str:
    """`path` relative to the working directory when it lies below it (repo-relative in runs)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _sample_indices(class_names: list[str], per_class: int) -> list[int]:
    """Evenly spaced images of each class (deterministic), lesion classes first."""
    picks: list[int] = []
    for name in ("benign", "malignant", "normal"):
        idx = [i for i, c in enumerate(class_names) if c == name]
        if idx:
            step = max(1, len(idx) // per_class)
            picks += idx[::step][:per_class]
    return picks


def _mean(values: np.ndarray) -> float:
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()) if values.size else float("nan")


def _json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value
