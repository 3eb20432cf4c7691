"""``torchrun`` support: process group from the environment, rank-0 helpers, metric reduction,
and counters of DDP's gradient all-reduces and FSDP's gradient reduce-scatters."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init(device_kind: str) -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment (or run alone)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistInfo()
    if not dist.is_initialized():
        backend = "nccl" if device_kind == "cuda" else "gloo"
        dist.init_process_group(backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def sum_tensor(values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over processes (no-op alone)."""
    if dist.is_available() and dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values)
    return values


def max_int(value: int, device: torch.device) -> int:
    """The largest of the processes' values (the value itself alone)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor(value, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


@dataclass
class AllReduceCount:
    rounds: int = 0  # synced backwards: each one all-reduces every gradient bucket once
    elements: int = 0  # gradient elements sent


def count_allreduces(model: torch.nn.parallel.DistributedDataParallel) -> AllReduceCount:
    """Count a DDP model's gradient all-reduces from now on: check that a custom step syncs once.

    Registers a communication hook that counts each bucket and then reduces it as DDP does by
    default (``allreduce_hook``: divide by the world size, all-reduce). On torch 2.11 a gloo process
    whose DDP model has a Python hook can deadlock when its process group is destroyed (README,
    "Tested versions"): end such a process with :func:`exit_without_teardown`.
    """
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    count = AllReduceCount()

    def hook(group, bucket):
        count.rounds += bucket.index() == 0
        count.elements += bucket.buffer().numel()
        return allreduce_hook(group, bucket)

    model.register_comm_hook(None, hook)
    return count


class ReduceScatterCount(TorchDispatchMode):
    """While active, counts the reduce-scatter collectives dispatched (FSDP's gradient reductions) and
    the elements they reduce: check that a custom step under FSDP reduces each gradient once.

        with ReduceScatterCount() as count:
            step(x, y)
        count.rounds, count.elements
    """

    def __init__(self):
        super().__init__()
        self.rounds = 0
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "reduce_scatter" in func.name():
            self.rounds += 1
            self.elements += sum(a.numel() for a in args[1:2] if isinstance(a, torch.Tensor))  # the input
        return func(*args, **(kwargs or {}))


def exit_without_teardown() -> None:
    """End a process once its results are written, skipping destructors: on torch 2.11 a gloo process
    group's destructor can deadlock, joining a backend thread that waits for the GIL it holds."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
