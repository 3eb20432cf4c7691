"""Models and optimizers that Hugging Face Accelerate (``accelerator.prepare``) or Lightning Fabric
(``fabric.setup``) hand back, as ``Step`` meets them.

Their optimizer wrappers run ``scaler.step`` and ``scaler.update`` inside their own ``step()`` when
training in fp16. ``Step`` then uses that scaler and unscales the inner optimizer's gradients once,
before clipping; the wrapper's step finds them unscaled and does not unscale again. Fabric also wants
every backward to go through ``fabric.backward`` (its precision scales the loss there), which ``Step``
calls when given ``backward=fabric.backward``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from .wrapper import SubBranchModel

OPTIMIZER_WRAPPERS = ("AcceleratedOptimizer", "_FabricOptimizer")


def wrapper_kind(obj) -> str | None:
    """``"AcceleratedOptimizer"``, ``"_FabricOptimizer"`` or ``"_FabricModule"`` for what those libraries wrap (by
    class name, so neither needs to be installed; Fabric subclasses its wrapper per optimizer class), else None."""
    return _kind_of_class(type(obj))


@functools.cache  # asked on every micro-batch (no_sync) and update (clipping)
def _kind_of_class(cls: type) -> str | None:
    names = {c.__name__ for c in cls.__mro__}
    return next((kind for kind in (*OPTIMIZER_WRAPPERS, "_FabricModule") if kind in names), None)


def sub_branch_model(model: nn.Module) -> SubBranchModel | None:
    """The ``masksub.wrap``-ed model inside any wrapper (DDP, FSDP, ``torch.compile``, Accelerate, Fabric),
    or None for a plain model."""
    found = [m for m in model.modules() if isinstance(m, SubBranchModel)]
    if len(found) > 1:
        raise ValueError(f"Step trains one masksub.wrap-ed model, and this model holds {len(found)}")
    return found[0] if found else None


def inner_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside an Accelerate or Fabric wrapper, or the optimizer itself."""
    return optimizer.optimizer if wrapper_kind(optimizer) in OPTIMIZER_WRAPPERS else optimizer


def wrapper_scaler(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    amp_dtype: torch.dtype | None,
    backward: Callable | None,
) -> torch.amp.GradScaler | None:
    """The fp16 grad scaler that a wrapped optimizer steps itself (None for any other optimizer), after checking
    that the rest of ``Step``'s configuration agrees with the wrappers."""
    kind = wrapper_kind(optimizer)
    if wrapper_kind(model) == "_FabricModule" and backward is None:
        raise ValueError(
            "a model set up by Lightning Fabric back-propagates with fabric.backward: pass it to Step, "
            "Step(..., backward=fabric.backward)"
        )
    if kind == "AcceleratedOptimizer":
        if optimizer.gradient_state.num_steps > 1:
            raise ValueError(
                f"Accelerator(gradient_accumulation_steps={optimizer.gradient_state.num_steps}) accumulates in "
                "accelerator.backward, which Step does not call: leave it at 1 and pass Step(accum_steps=N)"
            )
        found = optimizer.scaler
    elif kind == "_FabricOptimizer":
        found = getattr(optimizer._strategy.precision, "scaler", None)
    else:
        return None
    if found is None:
        return None
    if scaler is not None and scaler is not found:
        raise ValueError(f"the optimizer prepared for fp16 ({kind}) brings its own grad scaler: leave out scaler=")
    if amp_dtype is torch.bfloat16:
        raise ValueError(f"the optimizer was prepared for fp16 ({kind}) and Step was given amp='bf16': choose one")
    return found
