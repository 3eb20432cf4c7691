"""Gradient sync and gradient norms for a model under DDP or FSDP, or alone.

The two-backward step needs the first backward to keep its gradients local (``no_sync``) and the
clip to see the whole model's gradient norm also when FSDP shards the gradients.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .prepared import wrapper_kind


@functools.cache  # asked on every micro-batch (no_sync) and update (clipping)
def fsdp1_class():
    """``FullyShardedDataParallel``, or None in a torch built without distributed support."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # a torch built without distributed support
        return None
    return FullyShardedDataParallel


def engine(model: nn.Module) -> nn.Module:
    """The module that reduces gradients across processes: the model itself, or the one (DDP, FSDP) inside the
    wrapper that Lightning Fabric's ``fabric.setup`` returns or inside ``torch.compile(DDP(...))``, the order
    PyTorch documents (and Accelerate's, with a dynamo backend)."""
    while True:
        if wrapper_kind(model) == "_FabricModule":
            model = model._forward_module
        elif "_orig_mod" in model._modules:  # torch.compile's OptimizedModule (FSDP1 forwards any getattr inward)
            model = model._modules["_orig_mod"]
        else:
            return model


def _full(norm: torch.Tensor) -> torch.Tensor:
    """A norm of gradients that ``fully_shard`` keeps as DTensor shards is a DTensor: its value over all shards."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """The global 2-norm of the parameters' gradients (what norm clipping measures), on their device."""
    norms = [torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float32) for p in params if p.grad is not None]
    return _full(torch.linalg.vector_norm(torch.stack(norms))) if norms else torch.zeros(())


def clip_grad_norm(model: nn.Module, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip the gradients' global 2-norm to ``max_norm``; return the norm before clipping, also for
    gradients sharded by FSDP (``FullyShardedDataParallel`` reduces it across shards; ``fully_shard``'s
    DTensor gradients give a DTensor norm)."""
    fsdp1, model = fsdp1_class(), engine(model)
    if fsdp1 is not None and isinstance(model, fsdp1):
        return model.clip_grad_norm_(max_norm)
    return _full(torch.nn.utils.clip_grad_norm_(params, max_norm))


@contextmanager
def _without_gradient_sync(model: nn.Module) -> Iterator[None]:
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def no_sync(model: nn.Module):
    """A context whose backwards accumulate gradients without reducing them across processes:
    ``no_sync()`` of DistributedDataParallel and FullyShardedDataParallel, or ``fully_shard``'s
    ``set_requires_gradient_sync(False)``; a no-op for a model that does not reduce gradients."""
    fsdp1, model = fsdp1_class(), engine(model)
    if isinstance(model, DistributedDataParallel) or (fsdp1 is not None and isinstance(model, fsdp1)):
        return model.no_sync()
    if callable(getattr(model, "set_requires_gradient_sync", None)):
        return _without_gradient_sync(model)
    return nullcontext()


def _reducing_group(model: nn.Module) -> tuple[bool, object]:
    """``(reduces, group)``: whether the model reduces gradients across processes, and over which group (DDP's
    own; None, the default group, for FSDP, as its sharded grad scaler reduces its overflow check)."""
    fsdp1, model = fsdp1_class(), engine(model)
    if isinstance(model, DistributedDataParallel):
        return True, model.process_group
    sharded = (fsdp1 is not None and isinstance(model, fsdp1)) or callable(
        getattr(model, "set_requires_gradient_sync", None)
    )
    return sharded, None


def processes(model: nn.Module) -> int:
    """How many processes' gradients the model averages: its group's size under DDP or FSDP, else 1."""
    reduces, group = _reducing_group(model)
    return torch.distributed.get_world_size(group) if reduces else 1


def all_processes(flag: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """``flag`` (a boolean tensor) and-ed over the processes the model reduces gradients across: one scalar
    all-reduce under DDP (its process group) or FSDP (the default group); the flag itself for a model that
    reduces nothing."""
    reduces, group = _reducing_group(model)
    if not reduces:
        return flag
    agreed = flag.to(torch.uint8)
    torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MIN, group=group)
    return agreed.bool()
