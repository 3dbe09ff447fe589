"""One training job for every kind of model: a small task plug-in on a shared engine.

    run_task(task, args)        the recipe: data -> train_model -> task.evaluate -> finish_run
    train_model(task, run, ...) THE training of a plug-in's model on run.data: data sets, model,
                                loss, optimiser -> engine.fit (distributed under torchrun), the
                                kept epoch's weights; run_task, the cross-validation driver
                                (training.crossval) and the sites job call it
    finish_run(task, run, ev)   the one run-finishing step: TorchScript export (checked equal to
                                eager), publish (training.export), metrics.json, report.md

A `Task` is what a kind of model adds (training.classification.CLASSIFICATION,
training.segmentation.SEGMENTATION, training.joint.JOINT): its presets, what it predicts (the
data sets and the model), its loss and optimiser, the per-epoch validation values and the
checkpoint selection, the final evaluation (metrics, plots, what is exported) and its report
section. The engine owns everything else: the split, the loop, checkpoints and `--resume`, the
device and torchrun, the metrics.json layout, the report frame, export and publishing. A task
without a validation split (`validation_split = False`, the joint task) trains on every image and
keeps its last epoch: its figures come from cross-validation (training.crossval). A new task is
one module with its plug-in and presets, plus its command in training.__main__.

Under torchrun (training.distributed) every process trains: every rank starts from rank 0's
weights, draws its own dropout and augmentation, loads batch / N of each global batch from its
own shard, and DistributedDataParallel averages the gradients; rank 0 alone writes checkpoints,
evaluates, reports and publishes. Outside torchrun each of those helpers is the identity.

metrics.json, one layout for every task:

    task, preset, description, command, class_names
    training        the recipe (preset fields after the flags) and the run: seed, threads, device,
                    smoke, selection, best_epoch, epochs_run, train_seconds, seconds_per_epoch,
                    eval_seconds, train_images, split_file, ...
    history         {"epochs": [{"epoch", "train_loss", "val_loss", "val_<metric>", "lr",
                    "seconds"}, ...]}
    validation, test   the task's figures per split (with 95% bootstrap intervals)
    <task fields>   e.g. threshold, inference, min_area_analysis (segmentation)
    data_fingerprint   what trained it
    artifact        {"task", "version", "path", "sha256"} when published, else null
    torchscript     the exported file when not published
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from shared.labels import CLASS_NAMES
from shared.preprocessing import Preprocessing
from shared.store import new_version_name, sha256_file
from training import distributed, engine, export, plots, report
from training.data import (
    SPLITS,
    LoadedSplit,
    data_fingerprint,
    load_split_images,
    resolve_split,
    scan_dataset,
    subset_per_class,
)

log = logging.getLogger(__name__)

EVAL_BATCH = 64


@dataclass
class Evaluation:
    """What a task's final evaluation hands the finishing step."""

    served: nn.Module  # what is exported and published (may wrap the model, e.g. flip averaging)
    example: torch.Tensor  # one model input, for the export check
    name: str  # the artifact's name
    architecture: str
    output: dict[str, Any]  # the manifest's "output"
    metrics: dict[str, Any]  # the manifest's "metrics" (the headline figures)
    splits: dict[str, Any] = field(default_factory=dict)  # metrics.json "validation", "test"
    extra: dict[str, Any] = field(default_factory=dict)  # the task's own metrics.json fields
    training: dict[str, Any] = field(default_factory=dict)  # added to "training"
    input: dict[str, Any] = field(default_factory=dict)  # added to the manifest's "input"
    input_channels: int | None = None
    class_names: tuple[str, ...] | None = CLASS_NAMES
    intended_use: str | None = None  # the manifest's; None: training.export.INTENDED_USE


@dataclass
class Run:
    """A run under way: its flags, recipe, folders, device, data and (after fit) its result."""

    args: argparse.Namespace
    preset: Any
    output_dir: Path
    device: torch.device
    threads: int
    preprocessing: Preprocessing
    data: dict[str, LoadedSplit] = field(default_factory=dict)
    split_file: Path | None = None
    seed: int = 0  # of the training under way (a cross-validation fold adds its number)
    fit: engine.FitResult | None = None
    eval_seconds: float = 0.0
    state: dict[str, Any] = field(default_factory=dict)  # the task's own, between its steps

    @property
    def progress(self) -> bool:
        return not self.args.no_progress

    def eval_loader(self, dataset: Dataset) -> DataLoader:
        return DataLoader(dataset, batch_size=EVAL_BATCH, num_workers=self.args.workers)


class Task(Protocol):
    """The plug-in of one kind of model. Everything it does not define is the engine's.

    One hook is optional: `train_loader(run, dataset, sampler) -> DataLoader`, the training
    batches (default: `default_train_loader`); a task defines it to keep the batches its
    published recipes were trained with.
    """

    kind: str  # the manifest task: shared.labels.TASKS
    command: str  # `python -m training <command>`
    presets: dict[str, Any]
    default_output: str  # e.g. "runs/classification/{preset}"
    smoke_per_class: int  # images per class and split in a --smoke run
    # True: a grouped train/val/test split, the epoch kept by `selection` on val; False: every
    # image trains, the last epoch is kept, and the figures come from cross-validation.
    validation_split: bool

    def resolve_preset(self, args: argparse.Namespace) -> Any:
        """The named preset with the command line's overrides (and --smoke's) applied."""

    def preprocessing(self, preset: Any) -> Preprocessing:
        """THE preprocessing the model is trained and served with."""

    def datasets(self, run: Run) -> tuple[Dataset, Dataset | None]:
        """(augmented train set, val set or None without a validation split) of (input,
        target) pairs, from run.data; augmentation seeded with run.seed."""

    def build_model(self, run: Run) -> nn.Module:
        """The network, initialised as the preset says."""

    def build_loss(self, run: Run) -> nn.Module:
        """The training loss (the same is reported on val)."""

    def build_optimizer(
        self, run: Run, model: nn.Module, steps_per_epoch: int
    ) -> tuple[torch.optim.Optimizer, Any, str]:
        """(optimiser, scheduler, "step" | "epoch": when the scheduler steps)."""

    def selection(self, preset: Any) -> engine.Selection:
        """Which epoch's weights the run keeps (a val_* history column, or the last)."""

    def validate(self, out: engine.EvalOutput, data: LoadedSplit) -> dict[str, float]:
        """The val_<metric> values of one validation pass (the engine adds val_loss)."""

    def evaluate(self, run: Run, model: nn.Module) -> Evaluation:
        """The final evaluation of the kept weights: val and test figures, plots, what ships."""

    def report_section(self, document: dict[str, Any]) -> list[str]:
        """The task's part of report.md (Markdown lines), from metrics.json alone."""


# --- the recipe ------------------------------------------------------------------------------


def start_run(task: Task, args: argparse.Namespace) -> Run:
    """Resolve the recipe and the run folder; set up logging, threads, seeds and the device."""
    preset = task.resolve_preset(args)
    output_dir = Path(args.output_dir or task.default_output.format(preset=args.preset))
    output_dir.mkdir(parents=True, exist_ok=True)
    engine.setup_logging(output_dir / "train.log")
    threads = engine.configure_threads(args.threads)
    engine.seed_everything(args.seed)
    device = engine.resolve_device(args.device)
    log.info("preset %s: %s", args.preset, json.dumps(_recipe(preset), default=str))
    log.info("%d torch threads, device %s, output %s", threads, device, output_dir)
    return Run(args, preset, output_dir, device, threads, task.preprocessing(preset))


def load_splits(run: Run, smoke_per_class: int) -> None:
    """The grouped split (made and saved when the split file is absent), decoded into memory."""
    args = run.args
    split_file = getattr(args, "split_file", None)
    _, by_split, run.split_file = resolve_split(
        args.data_path,
        split_file,
        fallback=split_file or run.output_dir / "split.json",
        seed=getattr(args, "split_seed", 0),
    )
    per_class = args.max_per_class or (smoke_per_class if args.smoke else None)
    if per_class:  # a few of each class keeps every code path alive
        by_split = {s: subset_per_class(v, per_class) for s, v in by_split.items()}
    started = time.perf_counter()
    run.data = {s: load_split_images(by_split[s]) for s in SPLITS}
    log.info(
        "split %s: %s loaded in %.1f s",
        run.split_file,
        {s: np.bincount(run.data[s].labels, minlength=len(CLASS_NAMES)).tolist() for s in SPLITS},
        time.perf_counter() - started,
    )


def load_all(run: Run, smoke_per_class: int) -> None:
    """Every image of the data folder as run.data["train"] (a task without a validation split
    trains on them all), decoded into memory."""
    args = run.args
    samples = scan_dataset(args.data_path)
    per_class = args.max_per_class or (smoke_per_class if args.smoke else None)
    if per_class:  # a few of each class keeps every code path alive
        samples = subset_per_class(samples, per_class)
    run.data = {"train": load_split_images(samples)}


def default_train_loader(run: Run, dataset: Dataset, sampler: Sampler | None) -> DataLoader:
    """Shuffled training batches (this rank's shard of them under torchrun). The shuffle has its
    own generator seeded with run.seed: the order of epochs does not depend on how many random
    numbers the model's initialisation drew."""
    batch_size = run.preset.batch_size
    return DataLoader(
        dataset,
        batch_size=distributed.per_rank_batch(batch_size),
        shuffle=sampler is None,
        sampler=sampler,
        drop_last=len(dataset) > batch_size,
        generator=torch.Generator().manual_seed(run.seed),
        num_workers=run.args.workers,
    )


def train_model(
    task: Task,
    run: Run,
    *,
    seed: int,
    checkpoint: Path | None = None,
    best: Path | None = None,
    resume: Path | None = None,
) -> tuple[nn.Module, engine.FitResult]:
    """Train the task's model on run.data["train"] (validating on run.data["val"] when the task
    has a validation split): seeded with `seed`, distributed under torchrun, `checkpoint` written
    after every epoch (rank 0), the selected epoch's weights in `best`, continuing from `resume`.

    Returns the model holding the kept epoch's weights (eval mode, on run.device) and the fit's
    result.
    """
    engine.seed_everything(seed)
    run.seed = seed
    train_set, val_set = task.datasets(run)
    model = task.build_model(run)
    if distributed.rank() > 0:
        engine.seed_everything(distributed.rank_seed(seed))
    net = distributed.wrap(model) if distributed.is_active() else model.to(run.device)
    sampler = distributed.sampler(train_set, seed)
    make_loader = getattr(task, "train_loader", None) or default_train_loader
    train_loader = make_loader(run, train_set, sampler)
    loss_fn = task.build_loss(run).to(run.device)
    optimizer, scheduler, step_every = task.build_optimizer(run, net, max(1, len(train_loader)))
    selection = task.selection(run.preset)
    validate = None
    if val_set is not None:
        val_loader = run.eval_loader(val_set)

        def validate(net: nn.Module) -> dict[str, float]:
            val = engine.evaluate(
                net, loss_fn, val_loader, desc="val", progress=run.progress, device=run.device
            )
            return {"val_loss": val.loss, **task.validate(val, run.data["val"])}

    def before_epoch(epoch: int) -> None:
        if hasattr(train_set, "set_epoch"):
            train_set.set_epoch(epoch)  # reseeds augmentation: a resumed run draws the same
        distributed.set_epoch(sampler, epoch)

    fit = engine.fit(
        net,
        loss_fn,
        optimizer,
        train_loader,
        epochs=run.preset.epochs,
        scheduler=scheduler,
        step_every=step_every,
        validate=validate,
        selection=selection,
        checkpoint=checkpoint,
        best=best,
        resume=resume,
        extra={"preset": run.args.preset},
        before_epoch=before_epoch,
        progress=run.progress,
        device=run.device,
    )
    distributed.unwrap(net, into=model)
    if best is not None and selection.metric is not None:
        distributed.barrier()  # rank 0 wrote the kept weights
        kept = kept_weights(best.parent)
        model.load_state_dict(torch.load(kept, map_location=run.device, weights_only=True))
    return model.to(run.device).eval(), fit


def run_task(task: Task, args: argparse.Namespace) -> dict[str, Any]:
    """Train (selecting on val when the task has a validation split), evaluate once, report,
    export and publish; returns the metrics.json document (under torchrun, rank 0's; the other
    ranks return {"rank": r} once trained)."""
    run = start_run(task, args)
    if task.validation_split:
        load_splits(run, task.smoke_per_class)
    else:
        load_all(run, task.smoke_per_class)
    if getattr(args, "test_only", False):
        run.seed = args.seed
        task.datasets(run)  # the task's evaluation sets
        model = task.build_model(run).to(run.device)
        run.fit = restore_run(run.output_dir, model)
    else:
        model, run.fit = train_model(
            task,
            run,
            seed=args.seed,
            checkpoint=run.output_dir / engine.CHECKPOINT_NAME,
            best=run.output_dir / engine.BEST_NAME,
            resume=args.resume,
        )
    if not distributed.is_main():
        return {"rank": distributed.rank()}  # rank 0 evaluates, exports and publishes
    model.eval()
    log.info(
        "training took %.1f s; evaluating the weights of epoch %d (%s)",
        run.fit.seconds,
        run.fit.best_epoch,
        task.selection(run.preset).describe(),
    )
    with engine.Timer() as timer:
        evaluation = task.evaluate(run, model)
    run.eval_seconds = timer.seconds
    return finish_run(task, run, evaluation)


def kept_weights(output_dir: Path) -> Path:
    """The run folder's best.pt, or the segmentation job's best_model.pt of before the engine
    (a run resumed from such a folder that did not improve on it)."""
    best = output_dir / engine.BEST_NAME
    legacy = output_dir / "best_model.pt"
    return legacy if not best.is_file() and legacy.is_file() else best


def restore_run(output_dir: Path, model: nn.Module) -> engine.FitResult:
    """--test-only: the kept weights (best.pt) and the history of a finished run folder.

    Raises FileNotFoundError when the folder holds no weights.
    """
    device = engine.model_device(model)
    model.load_state_dict(
        torch.load(kept_weights(output_dir), map_location=device, weights_only=True)
    )
    checkpoint = output_dir / engine.CHECKPOINT_NAME
    if not checkpoint.is_file():
        return engine.FitResult(engine.History(), 0, None, 0.0)
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    history = engine.History.from_dict(state.get("history"))
    extra = dict(state.get("extra") or {})
    seconds = float(sum(history.column("seconds")))
    return engine.FitResult(
        history, int(extra.get("best_epoch", 0)), state.get("best_metric"), seconds, extra
    )


# --- the one finishing step ----------------------------------------------------------------------


def finish_run(task: Task, run: Run, evaluation: Evaluation) -> dict[str, Any]:
    """Export, publish (with --model-dir), then write metrics.json, the loss curves and
    report.md. Rank 0 alone does this under torchrun. Returns the metrics.json document."""
    args, fit = run.args, run.fit
    assert fit is not None
    used = sorted((s for split in run.data.values() for s in split.samples), key=lambda s: s.key)
    fingerprint = data_fingerprint(used)
    if run.split_file is not None:
        fingerprint["split_file"] = display_path(run.split_file)
    document = run_document(task, run, evaluation, fingerprint)
    artifact, torchscript = export_and_publish(
        evaluation, task.kind, document, run.preprocessing, args
    )
    if artifact is None:
        path = run.output_dir / "model.pt"
        torch.jit.save(torchscript, str(path))
        log.info("no --model-dir: TorchScript saved to %s only", path)
        document["torchscript"] = str(path)
    document["artifact"] = artifact
    write_outputs(task, run.output_dir, document)
    return document


def run_document(
    task: Task, run: Run, evaluation: Evaluation, fingerprint: dict[str, Any]
) -> dict[str, Any]:
    """The metrics.json document (see the module docstring) before export."""
    args, fit = run.args, run.fit
    assert fit is not None
    epochs_run = len(fit.history.epochs)
    training = {
        **_recipe(run.preset),
        "seed": args.seed,
        "threads": run.threads,
        "device": str(run.device),
        "world_size": distributed.world_size(),
        "smoke": bool(args.smoke),
        "selection": task.selection(run.preset).describe(),
        "best_epoch": fit.best_epoch,
        "epochs_run": epochs_run,
        "train_seconds": round(fit.seconds, 1),
        "seconds_per_epoch": round(fit.seconds / max(1, epochs_run), 1),
        "eval_seconds": round(run.eval_seconds, 1),
        "train_images": len(run.data["train"].samples) if "train" in run.data else None,
        **evaluation.training,
    }
    if run.split_file is not None:
        training["split_file"] = display_path(run.split_file)
        training["split_sha256"] = sha256_file(run.split_file)
    return {
        "task": task.kind,
        "preset": args.preset,
        "description": _description(run.preset),
        "command": getattr(args, "command_line", None),
        "class_names": list(evaluation.class_names or ()),
        "training": training,
        "split_sizes": {k: len(v.samples) for k, v in run.data.items()},
        "history": fit.history.to_dict(),
        **evaluation.splits,
        **evaluation.extra,
        "data_fingerprint": fingerprint,
    }


def export_and_publish(
    evaluation: Evaluation,
    kind: str,
    document: dict[str, Any],
    preprocessing: Preprocessing,
    args: argparse.Namespace,
) -> tuple[dict[str, Any] | None, torch.jit.ScriptModule]:
    """TorchScript of the served model (on the CPU, checked equal to eager); published as
    `<model-dir>/<task>/<version>` when --model-dir is given. Returns (artifact fields or None,
    the TorchScript module)."""
    served = evaluation.served.cpu().eval()
    example = evaluation.example.cpu()
    scripted = export.export_torchscript(served, example, n_random=1 if args.smoke else 3)
    model_dir = getattr(args, "model_dir", None)
    if model_dir is None:
        return None, scripted
    metadata = export.build_metadata(
        task=kind,
        name=evaluation.name,
        architecture=evaluation.architecture,
        preprocessing=preprocessing,
        input_channels=evaluation.input_channels,
        output=evaluation.output,
        metrics=evaluation.metrics,
        training={
            **document["training"],
            "preset": document["preset"],
            "command": document["command"],
            "history": document["history"],
        },
        data_fingerprint=document["data_fingerprint"],
        class_names=evaluation.class_names,
        intended_use=evaluation.intended_use or export.INTENDED_USE,
    )
    metadata["input"].update(evaluation.input)
    version = getattr(args, "version", None) or new_version_name()
    info = export.publish(Path(model_dir), kind, version, scripted, metadata)
    artifact = {"task": kind, "version": version, "path": str(info.path), "sha256": info.sha256}
    return artifact, scripted


def write_outputs(task: Task, output_dir: Path, document: dict[str, Any]) -> None:
    """metrics.json, loss_curves.png and report.md (the frame plus the task's section)."""
    history = engine.History.from_dict(document["history"])
    if history.epochs:
        columns = [k for k in history.epochs[-1] if k.startswith("val_") and k != "val_loss"]
        plots.plot_loss_curves(history, output_dir / "loss_curves.png", extra=columns[:3])
    (output_dir / "metrics.json").write_text(
        json.dumps(json_ready(document), indent=1, sort_keys=True) + "\n"
    )
    text = report.render_run_report(document, task.report_section(document))
    (output_dir / "report.md").write_text(text)
    log.info("wrote %s", output_dir)


# --- helpers -------------------------------------------------------------------------------------


def _recipe(preset: Any) -> dict[str, Any]:
    fields = asdict(preset) if is_dataclass(preset) else dict(preset)
    return {k: v for k, v in fields.items() if k not in ("description", "notes", "extra")}


def _description(preset: Any) -> str:
    return getattr(preset, "description", "") or getattr(preset, "notes", "")


def display_path(path: Path | str) -> str:
    """`path` relative to the working directory when it lies below it (repo-relative in runs)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def json_ready(value: Any) -> Any:
    """`value` with NumPy scalars as Python numbers, tuples as lists and NaN as null."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value
