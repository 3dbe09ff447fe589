"""The training loop pieces every task shares: seeding, threads, one epoch, evaluation, history,
checkpoints that make a run resumable.

Task modules (classification, segmentation) keep their own `main(args)` that reads as the recipe
and call these. The API is deliberately small:

    seed_everything(seed)
    configure_threads(n)
    train_one_epoch(model, loss_fn, optimizer, loader, epoch, ...) -> mean loss
    evaluate(model, loss_fn, loader) -> EvalOutput(loss, outputs, targets)
    log_epoch(epoch, epochs, **values)
    History: per-epoch values (train_loss, val_loss and anything else)
    save_checkpoint(path, ...), load_checkpoint(path, model, optimizer, scheduler) -> Checkpoint

A batch is a `(inputs, targets)` pair (anything else in the tuple is ignored), so the same loop
serves a classifier (targets: class indices) and a segmenter (targets: masks).
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

log = logging.getLogger(__name__)

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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


def _split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, dict):
        return batch["input"], batch["target"]
    return batch[0], batch[1]


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
) -> float:
    """One pass over `loader`; returns the mean loss per sample.

    `step_scheduler` is stepped after every batch (for per-iteration schedules such as warmup +
    cosine); an epoch-wise scheduler is stepped by the caller.
    """
    model.train()
    total, count = 0.0, 0
    bar = _progress(loader, f"epoch {epoch} train", progress)
    for batch in bar:
        inputs, targets = _split_batch(batch)
        outputs = model(inputs)
        loss = loss_fn(outputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm is not None:
            nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        if step_scheduler is not None:
            step_scheduler.step()
        n = inputs.shape[0]
        total += float(loss.detach()) * n
        count += n
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{total / count:.4f}", refresh=False)
    return total / max(count, 1)


@dataclass
class EvalOutput:
    """Mean loss plus every output and target of a pass, concatenated along the batch axis."""

    loss: float
    outputs: torch.Tensor
    targets: torch.Tensor


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loss_fn: LossFn | None,
    loader: Iterable,
    *,
    desc: str = "eval",
    progress: bool = True,
) -> EvalOutput:
    """Run `model` in eval mode over `loader`; the loss is NaN when `loss_fn` is None."""
    model.eval()
    outputs, targets = [], []
    total, count = 0.0, 0
    for batch in _progress(loader, desc, progress):
        inputs, target = _split_batch(batch)
        output = model(inputs)
        if loss_fn is not None:
            total += float(loss_fn(output, target)) * inputs.shape[0]
        count += inputs.shape[0]
        outputs.append(output.float().cpu())
        targets.append(target.cpu())
    loss = total / max(count, 1) if loss_fn is not None else float("nan")
    return EvalOutput(loss=loss, outputs=torch.cat(outputs), targets=torch.cat(targets))


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
