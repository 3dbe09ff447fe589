"""The training loop every task shares: seeding, threads, the device, one epoch, evaluation,
the epoch loop with model selection, history and checkpoints that make a run resumable.

The task-specific parts (what a model predicts, its loss, its metrics, its report section) live
in a small plug-in per kind (training.runner.Task); the jobs call these. The API is small:

    seed_everything(seed)
    configure_threads(n)
    resolve_device(name) -> torch.device   ("auto": the rank's GPU, else CUDA, else the CPU)
    train_one_epoch(model, loss_fn, optimizer, loader, epoch, ...) -> mean loss
    evaluate(model, loss_fn, loader) -> EvalOutput(loss, outputs, targets)
    fit(model, loss_fn, optimizer, loader, epochs=..., ...) -> FitResult   (THE epoch loop)
    log_epoch(epoch, epochs, **values)
    History: per-epoch values (train_loss, val_loss, val_<metric>, lr, seconds)
    save_checkpoint(path, ...), load_checkpoint(path, model, optimizer, scheduler) -> Checkpoint

A batch is a `(inputs, targets)` pair (anything else in the tuple is ignored); targets may be a
tensor or a tuple of tensors, so the same loop serves a classifier (class indices), a segmenter
(masks) and the joint network ((class indices, masks)).

A run folder holds `checkpoint.pt` (the last finished epoch: weights, optimiser, scheduler, random
state, history; what `--resume` reads) and `best.pt` (the weights of the epoch the run keeps).
"""

from __future__ import annotations

import logging
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from training import distributed
from training.distributed import to_device

log = logging.getLogger(__name__)

LossFn = Callable[[Any, Any], torch.Tensor]
CHECKPOINT_NAME = "checkpoint.pt"
BEST_NAME = "best.pt"


def warmup_cosine(
    total_steps: int, warmup_steps: int, floor: float = 0.0
) -> Callable[[int], float]:
    """LR factor per step: linear warmup to 1, then cosine down to `floor` at `total_steps`."""
    total = max(1, total_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total - warmup_steps))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU) so a run is repeatable on the same machine."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def configure_threads(n: int | None) -> int:
    """Use `n` intra-op threads (None or <= 0: leave torch's default) and flush denormals.

    Flushing denormals avoids the large CPU slowdowns tiny activations can cause late in
    training. Returns the number of threads torch now uses.
    """
    if n is not None and n > 0:
        torch.set_num_threads(n)
        os.environ.setdefault("OMP_NUM_THREADS", str(n))
    torch.set_flush_denormal(True)
    return torch.get_num_threads()


def resolve_device(name: str = "auto") -> torch.device:
    """The device a run trains on. Under torchrun it is always the rank's own (its GPU under
    nccl, else the CPU); otherwise "auto" picks CUDA when available, else the CPU.

    Raises ValueError for a name torch does not know, or for CUDA on a machine without it.
    """
    if distributed.is_active():
        own = distributed.device()
        if name not in ("auto", str(own), own.type):
            log.warning("--device %s ignored under torchrun: this rank uses %s", name, own)
        return own
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def model_device(model: nn.Module) -> torch.device:
    """The device of `model`'s first parameter (the CPU for a model without parameters)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights on the CPU (what the saved .pt files hold, whatever it trained on)."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def _split_batch(batch: Any) -> tuple[Any, Any]:
    if isinstance(batch, dict):
        return batch["input"], batch["target"]
    return batch[0], batch[1]


def _batch_size(inputs: torch.Tensor) -> int:
    return int(inputs.shape[0])


def _cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.cpu()
    return type(value)(_cpu(v) for v in value)


def _concat(parts: list[Any]) -> Any:
    """Concatenate per-batch tensors (or tuples of tensors, element-wise) along the batch axis."""
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts)
    return tuple(_concat(list(column)) for column in zip(*parts, strict=True))


def _progress(loader: Iterable, desc: str, enabled: bool) -> Iterable:
    # In a log file (not a terminal) a bar redrawn every batch is noise: redraw rarely there.
    interactive = sys.stderr.isatty()
    return tqdm(
        loader,
        desc=desc,
        leave=False,
        disable=not enabled,
        mininterval=0.5 if interactive else 30.0,
        dynamic_ncols=True,
    )


def train_one_epoch(
    model: nn.Module,
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    loader: Iterable,
    epoch: int,
    *,
    step_scheduler: Any | None = None,
    max_grad_norm: float | None = None,
    progress: bool = True,
    device: torch.device | None = None,
) -> float:
    """One pass over `loader`; returns the mean loss per sample.

    `step_scheduler` is stepped after every batch (for per-iteration schedules such as warmup +
    cosine); an epoch-wise scheduler is stepped by the caller. With `device`, every batch is
    moved there first.
    """
    model.train()
    total, count = 0.0, 0
    bar = _progress(loader, f"epoch {epoch} train", progress)
    for batch in bar:
        inputs, targets = to_device(_split_batch(batch), device)
        outputs = model(inputs)
        loss = loss_fn(outputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm is not None:
            nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        if step_scheduler is not None:
            step_scheduler.step()
        n = _batch_size(inputs)
        total += float(loss.detach()) * n
        count += n
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{total / count:.4f}", refresh=False)
    return total / max(count, 1)


@dataclass
class EvalOutput:
    """Mean loss plus every output and target of a pass, concatenated along the batch axis (a
    tuple of such tensors where the model returns, or the targets are, tuples), on the CPU."""

    loss: float
    outputs: Any
    targets: Any


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loss_fn: LossFn | None,
    loader: Iterable,
    *,
    desc: str = "eval",
    progress: bool = True,
    device: torch.device | None = None,
) -> EvalOutput:
    """Run `model` in eval mode over `loader` (batches moved to `device` when given); the loss is
    NaN when `loss_fn` is None."""
    model.eval()
    outputs, targets = [], []
    total, count = 0.0, 0
    for batch in _progress(loader, desc, progress):
        inputs, target = to_device(_split_batch(batch), device)
        output = model(inputs)
        if loss_fn is not None:
            total += float(loss_fn(output, target)) * _batch_size(inputs)
        count += _batch_size(inputs)
        outputs.append(_cpu(output.float() if isinstance(output, torch.Tensor) else output))
        targets.append(_cpu(target))
    loss = total / max(count, 1) if loss_fn is not None else float("nan")
    return EvalOutput(loss=loss, outputs=_concat(outputs), targets=_concat(targets))


def log_epoch(epoch: int, epochs: int, seconds: float | None = None, **values: float) -> None:
    """One line per epoch: `epoch 3/30 train_loss=0.4123 val_loss=0.5012 ... (41.2 s)`."""
    parts = [f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()]
    tail = f" ({seconds:.1f} s)" if seconds is not None else ""
    log.info("epoch %d/%d %s%s", epoch, epochs, " ".join(parts), tail)


@dataclass
class History:
    """Per-epoch values of a run, e.g. train_loss, val_loss, val_macro_f1, lr, seconds."""

    epochs: list[dict[str, float]] = field(default_factory=list)

    def append(self, epoch: int, **values: float) -> None:
        self.epochs.append({"epoch": epoch, **{k: float(v) for k, v in values.items()}})

    def column(self, name: str) -> list[float]:
        return [row.get(name, float("nan")) for row in self.epochs]

    def to_dict(self) -> dict[str, Any]:
        return {"epochs": list(self.epochs)}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> History:
        return cls(epochs=list((data or {}).get("epochs", [])))


@dataclass
class Checkpoint:
    """What load_checkpoint restored besides the module/optimizer/scheduler states."""

    epoch: int
    best_metric: float | None
    history: History
    extra: dict[str, Any]


def save_checkpoint(
    path: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
    epoch: int,
    best_metric: float | None,
    history: History,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write a resumable checkpoint (written to a temp file, then renamed: never half-written).

    `epoch` is the last completed epoch (1-based); a resumed run starts at epoch + 1. `extra` is
    for JSON-like run information (args, preset name, the best epoch, ...).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "epoch": epoch,
        "best_metric": best_metric,
        "history": history.to_dict(),
        "extra": extra or {},
        "rng": {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
        },
    }
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def resume_point(*checkpoints: Path) -> Path | None:
    """The first of `checkpoints` a stopped run left behind (a rerun continues from it), or
    None: the run starts afresh."""
    return next((Path(path) for path in checkpoints if Path(path).is_file()), None)


def load_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    *,
    restore_rng: bool = True,
) -> Checkpoint:
    """Restore the states saved by save_checkpoint into the given objects.

    Raises FileNotFoundError if `path` does not exist, and torch's errors (RuntimeError) when the
    model does not match the checkpoint.
    """
    # weights_only=False: the checkpoint holds RNG states and history; only load your own files.
    state = torch.load(Path(path), map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    if optimizer is not None and state.get("optimizer") is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng and "rng" in state:
        random.setstate(state["rng"]["python"])
        np.random.set_state(state["rng"]["numpy"])
        torch.set_rng_state(state["rng"]["torch"])
    log.info("resumed from %s at epoch %d", Path(path).name, state["epoch"])
    return Checkpoint(
        epoch=int(state["epoch"]),
        best_metric=state.get("best_metric"),
        history=History.from_dict(state.get("history")),
        extra=dict(state.get("extra") or {}),
    )


@dataclass(frozen=True)
class Selection:
    """Which epoch's weights a run keeps: the one with the best `metric` (a history column such
    as "val_macro_f1"; "val_loss" and other losses are lower-is-better), or the last epoch when
    `metric` is None. Model selection reads the validation split only."""

    metric: str | None = None

    @property
    def higher_is_better(self) -> bool:
        return not (self.metric or "").endswith("loss")

    def is_better(self, value: float, best: float | None) -> bool:
        if self.metric is None or best is None:
            return True
        return value > best if self.higher_is_better else value < best

    def describe(self) -> str:
        if self.metric is None:
            return "the last epoch"
        return f"best {self.metric} ({'max' if self.higher_is_better else 'min'})"


@dataclass
class FitResult:
    """What `fit` hands back: the history, the kept epoch and its metric, the training time."""

    history: History
    best_epoch: int
    best_metric: float | None
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


def fit(
    model: nn.Module,
    loss_fn: nn.Module | LossFn,
    optimizer: torch.optim.Optimizer,
    loader: Iterable,
    *,
    epochs: int,
    scheduler: Any | None = None,
    step_every: str = "step",
    validate: Callable[[nn.Module], dict[str, float]] | None = None,
    selection: Selection = Selection(),
    checkpoint: Path | None = None,
    best: Path | None = None,
    resume: Path | None = None,
    extra: dict[str, Any] | None = None,
    before_epoch: Callable[[int], None] | None = None,
    progress: bool = True,
    device: torch.device | None = None,
) -> FitResult:
    """THE epoch loop: train, validate, keep the selected epoch's weights, checkpoint, log.

    `model` is what trains (a plain module, or the DistributedDataParallel wrapper of
    training.distributed.wrap; checkpoints hold the plain module's weights). The scheduler is
    stepped after every batch (`step_every="step"`) or every epoch ("epoch"). `validate(model)`
    returns the epoch's validation values (val_loss, val_<metric>, ...); `selection` picks the
    epoch whose weights go to `best` (rewritten whenever it improves; every epoch when it keeps the
    last). `checkpoint` is written after every epoch; `resume` (a checkpoint path) continues from
    it: every rank loads the weights, only rank 0 its own random state. `before_epoch(epoch)`
    reseeds per-epoch randomness (augmentation, the distributed sampler). Under torchrun the epoch
    loss is the mean over the ranks and rank 0 alone writes files.
    """
    plain = distributed.module(model)
    history, best_metric, best_epoch, start = History(), None, 0, 1
    saved_extra: dict[str, Any] = {}
    if resume is not None:
        state = load_checkpoint(
            Path(resume), plain, optimizer, scheduler, restore_rng=distributed.is_main()
        )
        history, best_metric, start = state.history, state.best_metric, state.epoch + 1
        best_epoch = int(state.extra.get("best_epoch", 0))
        saved_extra = state.extra
    for epoch in range(start, epochs + 1):
        if before_epoch is not None:
            before_epoch(epoch)
        with Timer() as timer:
            train_loss = train_one_epoch(
                model,
                loss_fn,
                optimizer,
                loader,
                epoch,
                step_scheduler=scheduler if step_every == "step" else None,
                progress=progress and distributed.is_main(),
                device=device,
            )
            if scheduler is not None and step_every == "epoch":
                scheduler.step()
            train_loss = distributed.mean(train_loss)  # each rank measured its own shard
            values = {"train_loss": train_loss, **(validate(model) if validate else {})}
        values["lr"] = optimizer.param_groups[0]["lr"]
        history.append(epoch, **values, seconds=timer.seconds)
        metric = values.get(selection.metric) if selection.metric else None
        if selection.is_better(metric, best_metric):
            best_metric, best_epoch = metric, epoch
            if best is not None and distributed.is_main():
                torch.save(plain.state_dict(), best)
            if selection.metric is not None:
                log.info("new best %s=%.4f at epoch %d", selection.metric, metric, epoch)
        shown = {**values, "best_epoch": best_epoch} if selection.metric else values
        log_epoch(epoch, epochs, timer.seconds, **shown)
        if checkpoint is not None and distributed.is_main():
            save_checkpoint(
                checkpoint,
                model=plain,
                optimizer=optimizer,
                scheduler=scheduler,
                epoch=epoch,
                best_metric=best_metric,
                history=history,
                extra={**saved_extra, **(extra or {}), "best_epoch": best_epoch},
            )
    seconds = float(sum(history.column("seconds")))
    return FitResult(history, best_epoch, best_metric, seconds, {**saved_extra, **(extra or {})})


class Timer:
    """`with Timer() as t: ...; t.seconds`: wall time of a block."""

    def __enter__(self) -> Timer:
        self._start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._start


def setup_logging(log_file: Path | None = None, level: int = logging.INFO) -> None:
    """Log lines to stderr (and `log_file` when given) as `time level name: message`."""
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=handlers,
        force=True,
    )
