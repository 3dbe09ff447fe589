"""Run by tests/training/test_distributed.py under torchrun (2 CPU processes, gloo): exercises the
helpers of training/distributed.py on a tiny model and writes what each rank saw to argv[1].

Not a test module itself (pytest collects test_*.py only).
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import TensorDataset

from training import distributed


def gathered(value: torch.Tensor) -> list[torch.Tensor]:
    out = [torch.zeros_like(value) for _ in range(distributed.world_size())]
    dist.all_gather(out, value.contiguous())
    return out


def main(out_path: str) -> None:
    assert distributed.init_from_env()
    rank = distributed.rank()
    torch.manual_seed(100 + rank)  # each rank builds different weights: wrap must unify them
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    own_first = model[0].weight.detach().clone()
    net = distributed.wrap(model)
    after_wrap = [w.tolist() for w in gathered(distributed.module(net)[0].weight.detach())]

    data = TensorDataset(torch.arange(12, dtype=torch.float32)[:, None].repeat(1, 4))
    sampler = distributed.sampler(data, seed=0)
    distributed.set_epoch(sampler, 1)
    shard = list(sampler)
    shards = [t.tolist() for t in gathered(torch.tensor(shard))]

    # One step on this rank's shard: DDP's gradient must be the mean of the ranks' own gradients.
    x = data.tensors[0][shard[: distributed.per_rank_batch(4)]]
    reference = distributed.unwrap(net, into=nn.Sequential(nn.Linear(4, 8), nn.ReLU(),
                                                           nn.Linear(8, 2)))  # fmt: skip
    reference(x).square().mean().backward()
    local = reference[0].weight.grad.detach().clone()
    net(x).square().mean().backward()
    ddp_grad = distributed.module(net)[0].weight.grad.detach()
    mean_of_locals = torch.stack(gathered(local)).mean(dim=0)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    optimizer.step()
    after_step = [w.tolist() for w in gathered(distributed.module(net)[0].weight.detach())]

    result = {
        "rank": rank,
        "world_size": distributed.world_size(),
        "differed_before_wrap": not torch.equal(own_first, distributed.module(net)[0].weight)
        if rank
        else None,
        "after_wrap_equal": all(w == after_wrap[0] for w in after_wrap),
        "shards": shards,
        "grad_is_mean_of_ranks": torch.allclose(ddp_grad, mean_of_locals, atol=1e-6),
        "grad_differs_from_local": not torch.allclose(ddp_grad, local, atol=1e-6),
        "after_step_equal": all(w == after_step[0] for w in after_step),
        "mean_of_ranks": distributed.mean(float(rank + 1)),
        "per_rank_batch": distributed.per_rank_batch(4),
    }
    results = [None] * distributed.world_size()
    dist.all_gather_object(results, result)
    distributed.barrier()
    if distributed.is_main():
        with open(out_path, "w") as out:
            json.dump(results, out)


if __name__ == "__main__":
    main(sys.argv[1])
    distributed.cleanup()
    # Skip the interpreter's teardown once the work is written and the group is left: with torch
    # 2.14.1 on CPU, gloo's threads torn down at exit abort a rank now and then ("terminate called
    # without an active exception", about 1 run in 10, after the output is complete).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
