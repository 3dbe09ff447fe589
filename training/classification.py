"""The classification task: a normal / benign / malignant classifier, as an engine plug-in.

    python -m training classify --preset effnet-lite0 --data-path D \
        --split-file training/splits/busi.json --output-dir runs/classification/effnet-lite0 \
        --model-dir models

The recipe is training.runner.run_task's: data (the grouped split), model, loss, optimiser, the
epoch loop with model selection on the validation split only, then one evaluation of the chosen
checkpoint on the test split, report, TorchScript export (checked equal to eager) and publishing.
This module holds what is the classifier's own: presets, augmentation, data set, loss, optimiser,
metrics and its report section (`ClassificationTask`).

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
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from shared.labels import CLASS_NAMES, TASK_CLASSIFICATION
from shared.models import build_model
from shared.postprocessing import softmax
from shared.preprocessing import Preprocessing
from training import cli, engine, plots
from training.augment import Augmentation
from training.data import LoadedSplit
from training.losses import class_weights
from training.metrics import classification_metrics, confusion_matrix
from training.report import fmt
from training.runner import Evaluation, Run, run_task

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
    artifact under `segmenter_dir` (a model directory), exactly as the service would
    (shared.inference: its model.pt, one image per forward)."""
    from shared.inference import RUNTIME_TORCHSCRIPT, load_artifact, predict
    from shared.store import resolve_artifact

    info = resolve_artifact(Path(segmenter_dir), "segmentation")
    model = load_artifact(info, runtime=RUNTIME_TORCHSCRIPT)
    masks = [finding.mask for finding in predict(model, images, batch_size=1)]
    log.info("predicted %d masks with segmenter %s %s", len(masks), info.name, info.version)
    return masks  # type: ignore[return-value]


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


def _probs(logits: torch.Tensor) -> np.ndarray:
    return softmax(logits.double().numpy())


def _or_zero(value: float | None) -> float:
    return 0.0 if value is None else float(value)


# --- the plug-in ------------------------------------------------------------------------------

# Targets of the classification figures on the test split (report.md says met or missed).
TARGETS = {"accuracy": 0.88, "macro_f1": 0.85, "macro_auc": 0.95, "malignant_recall": 0.85}


class ClassificationTask:
    """Predicts class logits (len(CLASS_NAMES)) from the image and, with --mask-channel, a fourth
    lesion-mask channel; weighted, label-smoothed cross-entropy; accuracy, macro-F1, macro AUC."""

    kind = TASK_CLASSIFICATION
    command = "classify"
    presets = PRESETS
    default_output = "runs/classification/{preset}"
    smoke_per_class = 3
    validation_split = True

    def resolve_preset(self, args: argparse.Namespace) -> Preset:
        preset = get_preset(args.preset)
        overrides = cli.recipe_overrides(args)
        size = overrides.pop("image_size", None)
        if size:
            overrides.update(resize=size, crop=size)
        if args.smoke:
            overrides.update(epochs=args.epochs or 1, batch_size=4, resize=64, crop=64)
        if args.no_pretrained or args.smoke:
            overrides["pretrained"] = False
        return replace(preset, **overrides)

    def preprocessing(self, preset: Preset) -> Preprocessing:
        return Preprocessing(resize=preset.resize, crop=preset.crop)

    def datasets(self, run: Run) -> tuple[Dataset, Dataset]:
        args, data = run.args, run.data
        masks = _mask_channels(args, data)
        augmentation = Augmentation(run.preset.augmentation, run.preset.resize)
        sets = {
            s: ClassificationDataset(
                data[s].images,
                data[s].labels,
                run.preprocessing,
                augmentation if s == "train" else None,
                masks[s],
            )
            for s in data
        }
        run.state.update(sets=sets, masks=masks)
        return sets["train"], sets["val"]

    def build_model(self, run: Run) -> nn.Module:
        kwargs: dict[str, Any] = dict(
            num_classes=len(CLASS_NAMES),
            in_channels=_in_channels(run.args),
            pretrained=run.preset.pretrained,
        )
        if run.preset.drop_rate is not None:
            kwargs["drop_rate"] = run.preset.drop_rate
        return build_model(run.preset.architecture, **kwargs)

    def build_loss(self, run: Run) -> nn.Module:
        labels = run.data["train"].labels
        weight = (
            class_weights(labels, len(CLASS_NAMES), mean_one=True)
            if run.preset.class_weighted
            else None
        )
        return nn.CrossEntropyLoss(weight=weight, label_smoothing=run.preset.label_smoothing)

    def build_optimizer(
        self, run: Run, model: nn.Module, steps_per_epoch: int
    ) -> tuple[torch.optim.Optimizer, Any, str]:
        optimizer = build_optimizer(run.preset, model, run.preset.lr)
        scheduler, step_every = build_scheduler(
            run.preset, optimizer, run.preset.epochs, steps_per_epoch
        )
        return optimizer, scheduler, step_every

    def selection(self, preset: Preset) -> engine.Selection:
        return engine.Selection(preset.select_on)

    def validate(self, out: engine.EvalOutput, data: LoadedSplit) -> dict[str, float]:
        m = classification_metrics(
            out.targets.numpy(), _probs(out.outputs), CLASS_NAMES, n_resamples=0
        )
        return {
            "val_accuracy": m["accuracy"],
            "val_macro_f1": _or_zero(m["macro_f1"]),
            "val_macro_auc": _or_zero(m["macro_auc"]),
        }

    def evaluate(self, run: Run, model: nn.Module) -> Evaluation:
        args, sets = run.args, run.state["sets"]
        results: dict[str, Any] = {}
        outputs = {}
        for split in ("val", "test"):
            out = engine.evaluate(
                model,
                None,
                run.eval_loader(sets[split]),
                desc=split,
                progress=run.progress,
                device=run.device,
            )
            outputs[split] = (out.targets.numpy(), _probs(out.outputs))
            results[split] = r = classification_metrics(
                *outputs[split], CLASS_NAMES, n_resamples=args.bootstrap, seed=args.seed
            )
            log.info(
                "%s: accuracy %s macro-F1 %s macro-AUC %s malignant sensitivity %s",
                split,
                *(
                    fmt(v)
                    for v in (
                        r["accuracy"],
                        r["macro_f1"],
                        r["macro_auc"],
                        r["per_class"]["malignant"]["recall"],
                    )
                ),
            )
        _write_plots(run.output_dir, outputs, run.data["test"], run.state["masks"]["test"])
        in_channels = _in_channels(args)
        preset = run.preset
        return Evaluation(
            served=model,
            example=sets["test"][0][0][None],
            name=f"{preset.architecture}-cls" + ("-mask" if in_channels == 4 else ""),
            architecture=preset.architecture,
            output={"type": "logits", "shape": [len(CLASS_NAMES)]},
            metrics={"validation": _headline(results["val"]), "test": _headline(results["test"])},
            splits={"validation": results["val"], "test": results["test"]},
            training={
                "pretrained_loaded": bool(getattr(model, "pretrained_loaded", False)),
                "mask_channel": args.mask_channel,
            },
            input_channels=in_channels,
            input=(
                {
                    "mask_channel": "channel 4: lesion mask (0/1) predicted by the segmentation "
                    "artifact, resized like the image"
                }
                if in_channels == 4
                else {}
            ),
        )

    def report_section(self, document: dict[str, Any]) -> list[str]:
        return classification_report_section(document)


CLASSIFICATION = ClassificationTask()


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Train, evaluate, export and publish (`python -m training classify`); returns metrics.json."""
    return run_task(CLASSIFICATION, args)


def _in_channels(args: argparse.Namespace) -> int:
    return 3 if args.mask_channel == "none" else 4


def _mask_channels(
    args: argparse.Namespace, data: dict[str, LoadedSplit]
) -> dict[str, list[np.ndarray] | None]:
    """The fourth channel per split: none, ground-truth masks, or (val and test) masks predicted
    by the segmentation artifact --segmenter, the only masks the service could ever have."""
    if args.mask_channel == "none":
        return dict.fromkeys(data)
    masks: dict[str, list[np.ndarray] | None] = {s: data[s].masks for s in data}
    if args.mask_channel == "ground-truth":
        log.warning(
            "ground-truth masks at evaluation leak the label (normal masks are empty): these "
            "numbers measure the leak, not the model"
        )
        return masks
    if not args.segmenter:
        raise SystemExit("--mask-channel predicted needs --segmenter MODEL_DIR")
    for split in ("val", "test"):
        masks[split] = predict_masks(args.segmenter, data[split].images)
    return masks


def _headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """The numbers worth carrying in an artifact's manifest."""
    keys = ("n", "accuracy", "macro_f1", "macro_auc", "per_class", "confusion_matrix", "ci95")
    return {k: metrics[k] for k in keys if k in metrics}


def _write_plots(
    output_dir: Path,
    outputs: dict[str, tuple[np.ndarray, np.ndarray]],
    test: LoadedSplit,
    test_masks: list[np.ndarray] | None,
) -> None:
    for split, (y, p) in outputs.items():
        plots.plot_confusion_matrix(
            confusion_matrix(y, p.argmax(1), len(CLASS_NAMES)),
            CLASS_NAMES,
            output_dir / f"confusion_{split}.png",
            title=f"confusion matrix ({split})",
        )
        plots.plot_roc_curves(
            y, p, CLASS_NAMES, output_dir / f"roc_{split}.png", title=f"ROC one vs rest ({split})"
        )
    y, p = outputs["test"]
    # A fixed, class-balanced pick of test images (the first four of each class), errors in red.
    pick = [i for c in range(len(CLASS_NAMES)) for i in np.flatnonzero(y == c)[:4]]
    plots.plot_prediction_grid(
        [test.images[i] for i in pick],
        [CLASS_NAMES[y[i]] for i in pick],
        [CLASS_NAMES[int(p[i].argmax())] for i in pick],
        [float(p[i].max()) for i in pick],
        output_dir / "samples_test.png",
        masks=[test_masks[i] for i in pick] if test_masks is not None else None,
    )


def headline_rows(metrics: dict[str, Any]) -> list[tuple[str, str, float | None]]:
    """(label, formatted value with CI, raw value) for the target metrics of one split."""
    ci = metrics.get("ci95", {})
    malignant = metrics["per_class"]["malignant"]
    return [
        ("accuracy", fmt(metrics["accuracy"], ci.get("accuracy")), metrics["accuracy"]),
        ("macro-F1", fmt(metrics["macro_f1"], ci.get("macro_f1")), metrics["macro_f1"]),
        (
            "macro one-vs-rest AUC",
            fmt(metrics["macro_auc"], ci.get("macro_auc")),
            metrics["macro_auc"],
        ),
        (
            "malignant sensitivity",
            fmt(malignant["recall"], ci.get("malignant_recall")),
            malignant["recall"],
        ),
    ]


def classification_report_section(document: dict[str, Any]) -> list[str]:
    """The test table against the targets, per-class numbers, the confusion matrix."""
    cfg = document["training"]
    names = document["class_names"]
    lines = [
        f"Architecture `{cfg['architecture']}`, input {cfg['crop'] or cfg['resize']} px, "
        f"ImageNet weights loaded: {cfg['pretrained_loaded']}, mask channel: "
        f"{cfg['mask_channel']}.",
        "",
    ]
    if cfg["mask_channel"] == "ground-truth":
        lines += [
            "**Ground-truth mask channel: these numbers include the label leak** (normal "
            "images have empty masks) and do not describe a deployable model.",
            "",
        ]
    test, val = document["test"], document["validation"]
    lines += [
        f"## Test split (n = {test['n']}, evaluated once), 95% bootstrap intervals",
        "",
        "| metric | test | target | met | validation |",
        "|---|---|---|---|---|",
    ]
    target_keys = ("accuracy", "macro_f1", "macro_auc", "malignant_recall")
    for (label, text, raw), key, (_, vtext, _) in zip(
        headline_rows(test), target_keys, headline_rows(val), strict=True
    ):
        met = "yes" if raw is not None and raw >= TARGETS[key] else "no"
        lines.append(f"| {label} | {text} | >= {TARGETS[key]:.2f} | {met} | {vtext} |")
    lines += [
        "",
        "Per class (test):",
        "",
        "| class | precision | recall | F1 | AUC | n |",
        "|---|---|---|---|---|---|",
    ]
    for name in names:
        pc = test["per_class"][name]
        lines.append(
            f"| {name} | {fmt(pc['precision'])} | {fmt(pc['recall'])} | "
            f"{fmt(pc['f1'])} | {fmt(pc['auc'])} | {pc['support']} |"
        )
    lines += [
        "",
        "Confusion matrix (test; rows true, columns predicted):",
        "",
        "| | " + " | ".join(names) + " |",
        "|---" * (len(names) + 1) + "|",
    ]
    for name, row in zip(names, test["confusion_matrix"], strict=True):
        lines.append(f"| **{name}** | " + " | ".join(str(v) for v in row) + " |")
    lines += [
        "",
        "Plots: `confusion_test.png`, `roc_test.png`, `loss_curves.png`, `samples_test.png` "
        "(and the `_val` versions).",
        "",
    ]
    if test["accuracy"] is not None and test["accuracy"] > 0.95 and not cfg.get("smoke"):
        lines += ["**Accuracy above 0.95: check for leakage before believing it.**", ""]
    return lines


# --- command line ----------------------------------------------------------------------------


def get_args_parser() -> argparse.ArgumentParser:
    parser = cli.training_parser(
        "python -m training classify",
        "Train, evaluate, export and publish a breast-ultrasound classifier.",
        presets=PRESETS,
        default_preset="effnet-lite0",
        default_output=CLASSIFICATION.default_output.format(preset="<preset>"),
        split_help="grouped split file from `python -m training split`; when it does not exist, "
        "a split is made and saved there (or into --output-dir if not given) (default: none)",
    )
    parser.add_argument(
        "--split-seed", type=int, default=0, help="seed of a split made on the fly (default: 0)"
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
    parser.add_argument(
        "--test-only",
        action="store_true",
        help="skip training; evaluate, report and export the run's best.pt (default: off)",
    )
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return cli.parse(get_args_parser(), argv, "classify")
