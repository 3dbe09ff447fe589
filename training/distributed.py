"""Data-parallel training under `torchrun`: the few helpers a training loop needs, and nothing
when it runs as a plain process.

    torchrun --nproc-per-node N -m training fit ...    # N processes, one per GPU (or CPU share)

torchrun starts N copies of the same command and tells each its place through the environment
(RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT). Under it:

* the first call of any helper below joins the group (`init_from_env`): nccl with one GPU per
  process when CUDA is there, gloo on CPU otherwise; the group is left at exit. So the jobs need
  no start-up code of their own, and outside torchrun every helper is the identity;
* `sampler(dataset, seed)` gives each rank its own 1/N of every epoch (the same shuffle on all
  ranks, so the shards are disjoint), and `per_rank_batch(B)` splits the recipe's batch B over
  the ranks: the global batch, the number of steps per epoch and the lr schedule stay the
  recipe's, whatever N is;
* `wrap(model)` puts a copy of the model on this rank's device inside DistributedDataParallel,
  which averages the gradients over the ranks in every backward (and starts every rank from rank
  0's weights); `unwrap(net, into)` copies the trained weights back into the plain CPU model;
* `is_main()` is true on rank 0 only: it alone logs at INFO, evaluates, writes reports and
  checkpoints, and publishes. `rank_seed(seed)` gives the other ranks their own random streams
  (dropout, augmentation); rank 0 keeps `seed`, so its stream is a plain run's;
* `barrier()` waits for every rank; `mean(value)` averages a number over the ranks (the epoch's
  loss each rank measured on its own shard).
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import logging
import os
from collections.abc import Iterable, Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, DistributedSampler

log = logging.getLogger(__name__)

# Rank r > 0 seeds its own streams with seed + RANK_SEED_STRIDE * r: far from the small offsets
# the jobs already add to a seed (cross-validation adds the fold number).
RANK_SEED_STRIDE = 1000
# Rank 0 evaluates a fold while the others wait in the next fold's first collective: allow for
# a long evaluation before a wait counts as a hang.
TIMEOUT = timedelta(minutes=60)


def launched_by_torchrun() -> bool:
    """True when torchrun (torch.distributed.run) started this process."""
    return all(name in os.environ for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))


def is_active() -> bool:
    """True when this process is one of a torchrun group (joining it on the first call)."""
    if launched_by_torchrun():
        init_from_env()
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_active() else 0


def world_size() -> int:
    return dist.get_world_size() if is_active() else 1


def is_main() -> bool:
    """Rank 0, or a plain process: the one that logs, evaluates, writes and publishes."""
    return rank() == 0


def device() -> torch.device:
    """This rank's GPU under nccl, else the CPU (plain processes always train on the CPU)."""
    if is_active() and dist.get_backend() == "nccl":
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device("cpu")


def init_from_env() -> bool:
    """Join the process group torchrun describes in the environment; returns whether this is a
    distributed run. A no-op outside torchrun and when already joined.

    Raises RuntimeError (from torch) when the rendezvous fails or times out.
    """
    if dist.is_initialized() or not launched_by_torchrun():
        return dist.is_initialized()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        local_rank = int(os.environ["LOCAL_RANK"])
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs: "
                "start at most one process per GPU (--nproc-per-node)"
            )
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, timeout=TIMEOUT)
    atexit.register(cleanup)
    if dist.get_rank() > 0:
        # One voice in the log: the other ranks report only warnings and errors.
        logging.getLogger().setLevel(logging.WARNING)
    log.info("distributed run: %d processes, backend %s", world_size(), backend)
    return True


def cleanup() -> None:
    """Leave the process group (a no-op when not in one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group() -> Iterator[bool]:
    """`with process_group() as distributed:` joins torchrun's group, if any, and leaves it."""
    try:
        yield init_from_env()
    finally:
        cleanup()


def barrier() -> None:
    """Wait until every rank gets here (a no-op when not distributed)."""
    if is_active():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[device().index])
        else:
            dist.barrier()


def rank_seed(seed: int) -> int:
    """This rank's seed: `seed` on rank 0 (and in a plain run), a distinct one on the others."""
    return seed + RANK_SEED_STRIDE * rank()


def per_rank_batch(batch_size: int) -> int:
    """The batch each rank loads so that the ranks together make one batch of `batch_size`.

    Raises ValueError when `batch_size` does not split evenly over the ranks.
    """
    n = world_size()
    if batch_size % n:
        raise ValueError(
            f"batch size {batch_size} does not split over {n} processes: pass --batch-size "
            f"a multiple of {n} (it is the global batch; each process takes batch / {n})"
        )
    return batch_size // n


def sampler(dataset: Dataset, seed: int) -> DistributedSampler | None:
    """This rank's shard of a shuffled epoch, or None outside a distributed run (the loader
    then shuffles by itself, as it always has). Call `set_epoch(sampler, epoch)` every epoch."""
    if not is_active():
        return None
    return DistributedSampler(
        dataset, num_replicas=world_size(), rank=rank(), shuffle=True, seed=seed, drop_last=True
    )


def set_epoch(sampler: DistributedSampler | None, epoch: int) -> None:
    """A new shuffle per epoch, the same on every rank."""
    if sampler is not None:
        sampler.set_epoch(epoch)


def wrap(model: nn.Module) -> nn.Module:
    """`model` itself outside a distributed run; else a copy on this rank's device inside
    DistributedDataParallel (with synchronised batch norm on GPUs, so that the batch statistics
    are those of the global batch, as in a plain run). Train the result; `unwrap` it after."""
    if not is_active():
        return model
    net = copy.deepcopy(model).to(device())
    if device().type == "cuda":
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
        return DistributedDataParallel(net, device_ids=[device().index])
    return DistributedDataParallel(net)


def module(net: nn.Module) -> nn.Module:
    """The model inside `net` (what checkpoints hold: the same keys as the plain model)."""
    return net.module if isinstance(net, DistributedDataParallel) else net


def unwrap(net: nn.Module, into: nn.Module) -> nn.Module:
    """`into` (the plain CPU model `net` was made from) with the trained weights of `net`.

    SyncBatchNorm keeps BatchNorm's parameter and buffer names, so the state dict loads strictly.
    """
    if net is into:
        return into
    state = {k: v.detach().cpu() for k, v in module(net).state_dict().items()}
    into.load_state_dict(state)
    return into


def to_device(value: Any, device: torch.device | None) -> Any:
    """`value` (a tensor, or lists / tuples / dicts of them) on `device`; as is when None."""
    if device is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, list | tuple):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


class OnDevice:
    """A loader whose batches (tensors, or tuples / dicts of them) arrive on `target`."""

    def __init__(self, loader: Iterable, target: torch.device) -> None:
        self.loader = loader
        self.target = target

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            yield to_device(batch, self.target)


def on_device(loader: Iterable) -> Iterable:
    """`loader` itself on the CPU; batches moved to this rank's GPU under nccl."""
    target = device()
    return loader if target.type == "cpu" else OnDevice(loader, target)


def mean(value: float) -> float:
    """The mean of `value` over the ranks (`value` itself when not distributed)."""
    if not is_active():
        return value
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=device())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return float(tensor.item()) / world_size()
