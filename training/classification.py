"""Train, evaluate, export and publish a normal / benign / malignant classifier.

    python -m training classify --preset effnet-lite0 --data-path D \
        --split-file training/splits/busi.json --output-dir runs/classification/effnet-lite0 \
        --model-dir models

`main(args)` reads as the recipe: data (the grouped split), model, loss, optimiser, the epoch loop
with model selection on the validation split only, then one evaluation of the chosen checkpoint on
the test split, reports, TorchScript export (checked equal to eager) and publishing.

Images go through THE preprocessing (shared.preprocessing.Preprocessing) exactly as the service
applies it; training-time augmentation works on the decoded uint8 image before it, train split only.

Mask channel (`--mask-channel`): the seed fed the lesion mask as a fourth input channel. Its trap:
BUSI's normal images have empty masks, so a ground-truth mask tells the network "normal" or "not
normal" outright and inflates every number. `ground-truth` is therefore for measuring that leak
only; an honest evaluation uses `predicted`, where validation and test images carry masks predicted
by a segmentation artifact (`--segmenter`), the only masks the service could ever have.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from shared.artifacts import new_version_name, sha256_file
from shared.labels import CLASS_NAMES, TASK_CLASSIFICATION
from shared.models import build_model
from shared.postprocessing import softmax
from shared.preprocessing import Preprocessing
from training import engine, export, plots, report
from training.data import (
    SPLITS,
    data_fingerprint,
    load_image,
    load_mask,
    resolve_split,
    subset_per_class,
)
from training.metrics import classification_metrics

log = logging.getLogger(__name__)

MASK_CHANNEL_CHOICES = ("none", "ground-truth", "predicted")


# --- presets ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preset:
    """Everything that defines a recipe; command-line flags may override a few fields."""

    architecture: str
    pretrained: bool
    resize: int
    crop: int | None
    augmentation: str  # a key of AUGMENTATIONS
    optimizer: str  # "sgd" | "adamw"
    lr: float
    weight_decay: float
    scheduler: str  # "step" | "cosine"
    epochs: int
    batch_size: int = 32
    momentum: float = 0.9
    nesterov: bool = False
    step_size: int = 10
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    class_weighted: bool = False
    select_on: str = "val_macro_f1"  # or "val_loss"
    drop_rate: float | None = None
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    # The seed's recipe, reproduced as written.
    "seed-resnet18": Preset(
        architecture="resnet18",
        pretrained=True,  # torchvision ImageNet weights when reachable; offline: from scratch
        resize=256,
        crop=224,
        augmentation="seed",
        optimizer="sgd",
        lr=1e-3,
        momentum=0.9,
        nesterov=True,
        weight_decay=1e-5,
        scheduler="step",
        step_size=10,
        gamma=0.1,
        epochs=30,
        select_on="val_loss",
        notes="the seed's recipe: ResNet-18, 256/224, flips + rotation 10, CE, SGD Nesterov",
    ),
    # The shipped classifier: ImageNet EfficientNet-Lite0, fine-tuned at 160 px on two CPU cores.
    "effnet-lite0": Preset(
        architecture="efficientnet_lite0",
        pretrained=True,
        resize=160,
        crop=160,
        augmentation="strong",
        optimizer="adamw",
        lr=1e-3,
        weight_decay=0.05,
        scheduler="cosine",
        warmup_epochs=1.0,
        epochs=20,
        label_smoothing=0.1,
        class_weighted=True,
        drop_rate=0.3,
        select_on="val_macro_f1",
        notes="ImageNet Lite0, 160 px, crop/flip/rotate/brightness-contrast, weighted CE + "
        "label smoothing, AdamW + warmup/cosine, best epoch on val macro-F1",
    ),
}


def get_preset(name: str) -> Preset:
    """The preset called `name`. Raises ValueError listing the valid ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}") from None


# --- augmentation (train split only, on the uint8 image before the preprocessing) -------------


class Augmentation:
    """Random transforms of a (H, W) uint8 image and, jointly, of its (H, W) uint8 mask.

    Works on uint8 so that what follows is THE preprocessing, unchanged. Randomness comes from
    torch's global generator, seeded by engine.seed_everything.
    """

    def __init__(self, kind: str, size: int) -> None:
        from torchvision.transforms import v2

        if kind == "seed":
            ops = [v2.RandomHorizontalFlip(), v2.RandomVerticalFlip(), v2.RandomRotation(10)]
        elif kind == "strong":
            # Horizontal flips only: the skin line is always at the top of an ultrasound frame.
            ops = [
                v2.RandomResizedCrop(size, scale=(0.6, 1.0), ratio=(0.8, 1.25), antialias=True),
                v2.RandomHorizontalFlip(),
                v2.RandomRotation(10),
                v2.ColorJitter(brightness=0.25, contrast=0.25),
            ]
        elif kind == "none":
            ops = []
        else:
            raise ValueError(f"unknown augmentation {kind!r}; valid: seed, strong, none")
        self.kind = kind
        self.transform = v2.Compose(ops)

    def __call__(
        self, image: np.ndarray, mask: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        from torchvision import tv_tensors

        img = tv_tensors.Image(torch.from_numpy(image)[None])
        if mask is None:
            return self.transform(img)[0].numpy(), None
        out_img, out_mask = self.transform(img, tv_tensors.Mask(torch.from_numpy(mask)[None]))
        return out_img[0].numpy(), out_mask[0].numpy()


# --- data ------------------------------------------------------------------------------------


class ClassificationDataset(Dataset):
    """Decoded images held in memory -> (C, S, S) float32 tensors and class indices.

    With `masks`, a fourth channel holds the mask resized like the image, as 0.0 / 1.0.
    """

    def __init__(
        self,
        images: list[np.ndarray],
        labels: list[int],
        preprocessing: Preprocessing,
        augmentation: Augmentation | None = None,
        masks: list[np.ndarray] | None = None,
    ) -> None:
        self.images, self.labels, self.masks = images, labels, masks
        self.preprocessing, self.augmentation = preprocessing, augmentation

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        mask = self.masks[index] if self.masks is not None else None
        if self.augmentation is not None:
            image, mask = self.augmentation(image, mask)
        x = self.preprocessing(image)
        if mask is not None:
            m = (self.preprocessing.resize_image(mask) > 127).astype(np.float32)
            x = np.concatenate([x, m[None]], axis=0)
        return torch.from_numpy(x), self.labels[index]


def predict_masks(segmenter_dir: Path, images: list[np.ndarray]) -> list[np.ndarray]:
    """Lesion masks (uint8 0/255, image size) predicted by the newest verified segmentation
    artifact under `segmenter_dir` (a model directory), exactly as the service would."""
    from shared.artifacts import resolve_artifact
    from shared.postprocessing import probability_to_mask, sigmoid

    info = resolve_artifact(Path(segmenter_dir), "segmentation")
    model = torch.jit.load(str(info.model_path), map_location="cpu").eval()
    pre = Preprocessing.from_metadata(info.metadata["preprocessing"])
    threshold = float(info.metadata["output"].get("threshold", 0.5))
    masks = []
    with torch.no_grad():
        for image in images:
            logits = model(torch.from_numpy(pre(image))[None])[0, 0].numpy()
            masks.append(probability_to_mask(sigmoid(logits), threshold, *image.shape))
    log.info("predicted %d masks with segmenter %s %s", len(masks), info.name, info.version)
    return masks


# --- training pieces -------------------------------------------------------------------------


def build_optimizer(preset: Preset, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    # No weight decay on norms and biases (standard for AdamW fine-tuning).
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": preset.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if preset.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=preset.momentum, nesterov=preset.nesterov)
    if preset.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"unknown optimizer {preset.optimizer!r}")


def build_scheduler(
    preset: Preset, optimizer: torch.optim.Optimizer, epochs: int, steps_per_epoch: int
) -> tuple[Any, str]:
    """(scheduler, "epoch" | "step"): when the caller steps it."""
    if preset.scheduler == "step":
        sched = torch.optim.lr_scheduler.StepLR(optimizer, preset.step_size, preset.gamma)
        return sched, "epoch"
    if preset.scheduler == "cosine":
        warmup = int(round(preset.warmup_epochs * steps_per_epoch))
        factor = engine.warmup_cosine(epochs * steps_per_epoch, warmup)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor), "step"
    raise ValueError(f"unknown scheduler {preset.scheduler!r}")


def class_weights(labels: list[int], num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights normalised to mean 1 (a rare class counts more)."""
    counts = np.bincount(np.asarray(labels), minlength=num_classes).astype(np.float64)
    weights = counts.sum() / (num_classes * np.maximum(counts, 1))
    return torch.tensor(weights / weights.mean(), dtype=torch.float32)


def _probs(logits: torch.Tensor) -> np.ndarray:
    return softmax(logits.double().numpy())


def _or_zero(value: float | None) -> float:
    return 0.0 if value is None else float(value)


def _is_better(value: float, best: float | None, select_on: str) -> bool:
    if best is None:
        return True
    return value < best if select_on == "val_loss" else value > best


# --- the recipe ------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    preset = get_preset(args.preset)
    overrides = {k: getattr(args, k) for k in ("epochs", "batch_size", "lr") if getattr(args, k)}
    if args.image_size:
        overrides.update(resize=args.image_size, crop=args.image_size)
    if args.smoke:
        overrides.update(epochs=args.epochs or 1, batch_size=4, resize=64, crop=64)
    if args.no_pretrained or args.smoke:
        overrides["pretrained"] = False
    preset = replace(preset, **overrides)
    output_dir = Path(args.output_dir or f"runs/classification/{args.preset}")
    output_dir.mkdir(parents=True, exist_ok=True)
    engine.setup_logging(output_dir / "train.log")
    threads = engine.configure_threads(args.threads)
    engine.seed_everything(args.seed)
    log.info(
        "preset %s (%s); %d threads; output %s", args.preset, preset.notes, threads, output_dir
    )

    # Data: the grouped split, decoded once and held in memory (623 x 256 x 256 bytes).
    samples, by_split, split_path = resolve_split(
        args.data_path,
        args.split_file,
        fallback=args.split_file or output_dir / "split.json",
        seed=args.split_seed,
    )
    if args.smoke or args.max_per_class:
        n = args.max_per_class or 3
        by_split = {s: subset_per_class(v, n) for s, v in by_split.items()}
    images = {s: [load_image(x) for x in by_split[s]] for s in SPLITS}
    labels = {s: [x.label for x in by_split[s]] for s in SPLITS}
    log.info(
        "split %s: %s",
        split_path,
        {s: np.bincount(labels[s], minlength=3).tolist() for s in SPLITS},
    )

    masks: dict[str, list[np.ndarray] | None] = dict.fromkeys(SPLITS)
    if args.mask_channel != "none":
        gt = {
            s: [load_mask(x, im.shape) for x, im in zip(by_split[s], images[s], strict=True)]
            for s in SPLITS
        }
        masks["train"] = gt["train"]
        if args.mask_channel == "ground-truth":
            log.warning(
                "ground-truth masks at evaluation leak the label (normal masks are "
                "empty): these numbers measure the leak, not the model"
            )
            masks["val"], masks["test"] = gt["val"], gt["test"]
        else:
            if not args.segmenter:
                raise SystemExit("--mask-channel predicted needs --segmenter MODEL_DIR")
            masks["val"] = predict_masks(args.segmenter, images["val"])
            masks["test"] = predict_masks(args.segmenter, images["test"])
    in_channels = 3 if args.mask_channel == "none" else 4

    preprocessing = Preprocessing(resize=preset.resize, crop=preset.crop)
    augmentation = Augmentation(preset.augmentation, preset.resize)
    datasets = {
        "train": ClassificationDataset(
            images["train"], labels["train"], preprocessing, augmentation, masks["train"]
        ),
        "val": ClassificationDataset(
            images["val"], labels["val"], preprocessing, None, masks["val"]
        ),
        "test": ClassificationDataset(
            images["test"], labels["test"], preprocessing, None, masks["test"]
        ),
    }
    generator = torch.Generator().manual_seed(args.seed)
    train_loader = DataLoader(
        datasets["train"],
        batch_size=preset.batch_size,
        shuffle=True,
        drop_last=len(datasets["train"]) > preset.batch_size,
        generator=generator,
        num_workers=args.workers,
    )
    eval_loaders = {
        s: DataLoader(datasets[s], batch_size=64, num_workers=args.workers) for s in ("val", "test")
    }

    # Model, loss, optimiser.
    model_kwargs: dict[str, Any] = dict(
        num_classes=len(CLASS_NAMES), in_channels=in_channels, pretrained=preset.pretrained
    )
    if preset.drop_rate is not None:
        model_kwargs["drop_rate"] = preset.drop_rate
    model = build_model(preset.architecture, **model_kwargs)
    pretrained_loaded = bool(getattr(model, "pretrained_loaded", False))
    weight = class_weights(labels["train"], len(CLASS_NAMES)) if preset.class_weighted else None
    loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=preset.label_smoothing)
    optimizer = build_optimizer(preset, model, preset.lr)
    scheduler, step_every = build_scheduler(preset, optimizer, preset.epochs, len(train_loader))

    checkpoint_path = output_dir / "checkpoint.pt"
    best_path = output_dir / "best.pt"
    history, best, best_epoch, start_epoch = engine.History(), None, 0, 1
    resume = args.resume or (checkpoint_path if args.test_only else None)
    if resume:
        state = engine.load_checkpoint(Path(resume), model, optimizer, scheduler)
        history, best = state.history, state.best_metric
        best_epoch, start_epoch = state.extra.get("best_epoch", 0), state.epoch + 1
        pretrained_loaded = state.extra.get("pretrained_loaded", pretrained_loaded)

    # The epoch loop: model selection on the validation split only.
    for epoch in range(start_epoch, preset.epochs + 1) if not args.test_only else ():
        with engine.Timer() as timer:
            train_loss = engine.train_one_epoch(
                model,
                loss_fn,
                optimizer,
                train_loader,
                epoch,
                step_scheduler=scheduler if step_every == "step" else None,
                progress=not args.no_progress,
            )
            if step_every == "epoch":
                scheduler.step()
            val = engine.evaluate(
                model, loss_fn, eval_loaders["val"], desc="val", progress=not args.no_progress
            )
        val_metrics = classification_metrics(
            val.targets.numpy(), _probs(val.outputs), CLASS_NAMES, n_resamples=0
        )
        values = {
            "train_loss": train_loss,
            "val_loss": val.loss,
            "val_accuracy": val_metrics["accuracy"],
            "val_macro_f1": _or_zero(val_metrics["macro_f1"]),
            "val_macro_auc": _or_zero(val_metrics["macro_auc"]),
            "lr": optimizer.param_groups[0]["lr"],
            "seconds": timer.seconds,
        }
        history.append(epoch, **values)
        engine.log_epoch(
            epoch,
            preset.epochs,
            seconds=timer.seconds,
            **{k: v for k, v in values.items() if k != "seconds"},
        )
        if _is_better(values[preset.select_on], best, preset.select_on):
            best, best_epoch = values[preset.select_on], epoch
            torch.save(model.state_dict(), best_path)
            log.info("new best %s=%.4f at epoch %d", preset.select_on, best, epoch)
        engine.save_checkpoint(
            checkpoint_path,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            epoch=epoch,
            best_metric=best,
            history=history,
            extra={
                "best_epoch": best_epoch,
                "preset": args.preset,
                "pretrained_loaded": pretrained_loaded,
            },
        )
    train_seconds = sum(history.column("seconds"))

    # The chosen checkpoint, evaluated once on val and test.
    if best_path.exists():
        model.load_state_dict(torch.load(best_path, map_location="cpu", weights_only=True))
    log.info("evaluating epoch %d (best %s) on val and test", best_epoch, preset.select_on)
    results: dict[str, Any] = {}
    outputs = {}
    for split in ("val", "test"):
        out = engine.evaluate(
            model, None, eval_loaders[split], desc=split, progress=not args.no_progress
        )
        outputs[split] = (out.targets.numpy(), _probs(out.outputs))
        results[split] = classification_metrics(
            *outputs[split], CLASS_NAMES, n_resamples=args.bootstrap, seed=args.seed
        )
        r = results[split]
        log.info(
            "%s: accuracy %s macro-F1 %s macro-AUC %s malignant sensitivity %s",
            split,
            *(
                _num(v)
                for v in (
                    r["accuracy"],
                    r["macro_f1"],
                    r["macro_auc"],
                    r["per_class"]["malignant"]["recall"],
                )
            ),
        )

    config = {
        "preset": args.preset,
        **{k: v for k, v in asdict(preset).items() if k not in ("extra",)},
        "pretrained_loaded": pretrained_loaded,
        "mask_channel": args.mask_channel,
        "seed": args.seed,
        "threads": threads,
        "smoke": bool(args.smoke),
        "best_epoch": best_epoch,
        "epochs_run": len(history.epochs),
        "train_seconds": round(train_seconds, 1),
        "split_file": str(split_path),
        "split_sha256": sha256_file(split_path),
    }
    fingerprint = {**data_fingerprint(samples), "split_file": str(split_path)}
    document = {
        "task": TASK_CLASSIFICATION,
        "class_names": list(CLASS_NAMES),
        "validation": results["val"],
        "test": results["test"],
        "history": history.to_dict(),
        "training": config,
        "data_fingerprint": fingerprint,
    }
    (output_dir / "metrics.json").write_text(json.dumps(document, indent=1) + "\n")
    _write_plots(output_dir, history, outputs, images["test"], labels["test"], masks["test"])
    report.write_classification_report(
        output_dir / "report.md", document, command=getattr(args, "command_line", None)
    )

    # Export (checked equal to eager) and publish.
    size = preprocessing.output_size
    example = torch.from_numpy(datasets["test"][0][0].numpy())[None]
    scripted = export.export_torchscript(model, example, n_random=1 if args.smoke else 3)
    if args.model_dir:
        metadata = export.build_metadata(
            task=TASK_CLASSIFICATION,
            name=f"{preset.architecture}-cls" + ("-mask" if in_channels == 4 else ""),
            architecture=preset.architecture,
            preprocessing=preprocessing,
            input_channels=in_channels,
            output={"type": "logits", "shape": [len(CLASS_NAMES)]},
            metrics={"validation": _headline(results["val"]), "test": _headline(results["test"])},
            training=config,
            data_fingerprint=fingerprint,
            class_names=CLASS_NAMES,
        )
        if in_channels == 4:
            metadata["input"]["mask_channel"] = (
                "channel 4: lesion mask (0/1) predicted by the segmentation artifact, resized "
                "like the image"
            )
        version = args.version or new_version_name()
        info = export.publish(
            Path(args.model_dir), TASK_CLASSIFICATION, version, scripted, metadata
        )
        document["published"] = {"path": str(info.path), "version": version, "sha256": info.sha256}
        (output_dir / "metrics.json").write_text(json.dumps(document, indent=1) + "\n")
    log.info(
        "done in %.0f s (training %.0f s); input %dx%d",
        time.perf_counter() - started,
        train_seconds,
        size,
        size,
    )
    return document


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """The numbers worth carrying in an artifact's manifest."""
    keys = ("n", "accuracy", "macro_f1", "macro_auc", "per_class", "confusion_matrix", "ci95")
    return {k: metrics[k] for k in keys if k in metrics}


def _write_plots(output_dir, history, outputs, test_images, test_labels, test_masks) -> None:
    for split, (y, p) in outputs.items():
        from training.metrics import confusion_matrix

        plots.plot_confusion_matrix(
            confusion_matrix(y, p.argmax(1), len(CLASS_NAMES)),
            CLASS_NAMES,
            output_dir / f"confusion_{split}.png",
            title=f"confusion matrix ({split})",
        )
        plots.plot_roc_curves(
            y, p, CLASS_NAMES, output_dir / f"roc_{split}.png", title=f"ROC one vs rest ({split})"
        )
    plots.plot_loss_curves(
        history, output_dir / "loss_curves.png", extra=("val_accuracy", "val_macro_f1")
    )
    y, p = outputs["test"]
    # A fixed, class-balanced pick of test images (the first four of each class), errors in red.
    pick = [i for c in range(len(CLASS_NAMES)) for i in np.flatnonzero(y == c)[:4]]
    plots.plot_prediction_grid(
        [test_images[i] for i in pick],
        [CLASS_NAMES[y[i]] for i in pick],
        [CLASS_NAMES[int(p[i].argmax())] for i in pick],
        [float(p[i].max()) for i in pick],
        output_dir / "samples_test.png",
        masks=[test_masks[i] for i in pick] if test_masks is not None else None,
    )


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training classify",
        description="Train, evaluate, export and publish a breast-ultrasound classifier.",
        add_help=add_help,
    )
    parser.add_argument(
        "--preset",
        default="effnet-lite0",
        choices=sorted(PRESETS),
        help="recipe (default: effnet-lite0)",
    )
    parser.add_argument(
        "--data-path",
        type=Path,
        required=True,
        help="folder in BUSI layout (<class>/<name>.png + masks); required",
    )
    parser.add_argument(
        "--split-file",
        type=Path,
        default=None,
        help="grouped split file from `python -m training split`; when it does not exist, "
        "a split is made and saved there (or into --output-dir if not given) (default: none)",
    )
    parser.add_argument(
        "--split-seed", type=int, default=0, help="seed of a split made on the fly (default: 0)"
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help="run folder: checkpoints, metrics, report, plots "
        "(default: runs/classification/<preset>)",
    )
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="publish the TorchScript artifact into this model directory as "
        "<model-dir>/classification/<version>/ (default: none, don't publish)",
    )
    parser.add_argument(
        "--version",
        default=None,
        help="artifact version name (default: UTC time, e.g. 20260101T120000Z)",
    )
    parser.add_argument(
        "--epochs", type=int, default=None, help="number of epochs (default: the preset's)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=None, help="training batch size (default: the preset's)"
    )
    parser.add_argument(
        "--lr", type=float, default=None, help="peak learning rate (default: the preset's)"
    )
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="resize and crop side in pixels (default: the preset's)",
    )
    parser.add_argument(
        "--no-pretrained",
        action="store_true",
        help="start from random weights (default: the preset's choice)",
    )
    parser.add_argument(
        "--mask-channel",
        default="none",
        choices=MASK_CHANNEL_CHOICES,
        help="append a lesion mask as a 4th channel; ground-truth leaks the label "
        "(normal masks are empty) and is for measuring that leak; predicted uses "
        "--segmenter at evaluation (default: none)",
    )
    parser.add_argument(
        "--segmenter",
        type=Path,
        default=None,
        help="model directory holding the segmentation artifact whose masks "
        "--mask-channel predicted uses (default: none)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument(
        "--threads", type=int, default=2, help="torch intra-op threads (default: 2)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help="data-loader worker processes (default: 0, load in the main process)",
    )
    parser.add_argument(
        "--bootstrap",
        type=int,
        default=2000,
        help="bootstrap resamples for the 95%% intervals (default: 2000)",
    )
    parser.add_argument(
        "--max-per-class",
        type=int,
        default=None,
        help="use at most this many images per class and split (default: all)",
    )
    parser.add_argument(
        "--resume",
        type=Path,
        default=None,
        help="checkpoint to resume from, e.g. <output-dir>/checkpoint.pt (default: none)",
    )
    parser.add_argument(
        "--test-only",
        action="store_true",
        help="skip training; evaluate the run's best checkpoint (default: off)",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a run of seconds: 3 images per class and split, 1 epoch, 64 px, no "
        "pretrained weights, 200 bootstrap resamples (default: off)",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bars (default: show them)"
    )
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = get_args_parser().parse_args(argv)
    if args.smoke and args.bootstrap == 2000:
        args.bootstrap = 200
    return args
