"""MaskSub as a timm ``TrainingTask``, for users of timm's own ``train.py``.

The task returns the summed loss, so timm's loop calls backward once: the same
gradients as ``masksub.Step``, but both graphs are alive together (about 1.5x
activation memory for a ViT at ratio 0.5, 2x for Swin and CNNs) and under DDP
the single backward all-reduces once. Prefer ``masksub.Step`` in your own loop
when memory is tight; use this task to keep timm's script.

timm's task API is young and has changed between releases: this module needs
timm >= 1.0.31 (the rest of masksub works with timm >= 1.0.20).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import timm
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .loss import SubBranchLoss
from .wrapper import SubBranchModel, check_one_backward

MIN_TIMM = "1.0.31"  # the first with ClassificationTask(model, criterion, criterion_kwargs, ...)


def _task_api_error() -> ImportError:
    return ImportError(
        f"masksub.task needs timm's TrainingTask API as of timm {MIN_TIMM}, found timm {timm.__version__}: "
        f"`pip install -U 'timm>={MIN_TIMM}'` (masksub.wrap and masksub.Step work with timm >= 1.0.20)"
    )


try:
    from timm.task import ClassificationTask, MultiLabelClassificationEvaluator
except ImportError as e:  # timm < 1.0.23 has no timm.task
    raise _task_api_error() from e
if "criterion_kwargs" not in inspect.signature(ClassificationTask.__init__).parameters:
    raise _task_api_error()  # timm 1.0.23 to 1.0.30: ClassificationTask had no criterion_kwargs


class MaskSubTask(ClassificationTask):
    """Classification with a masked (or dropout/drop-path) sub branch.

    ``model`` must come from ``masksub.wrap``. Checkpoints hold the plain
    model's ``state_dict`` (loadable into ``timm.create_model``); the sub
    branch's own parameters (a mask token) go to the task state.
    """

    def __init__(
        self,
        model: SubBranchModel,
        criterion: Callable | None = None,
        criterion_kwargs: dict[str, Any] | None = None,
        main_weight: float = 0.5,
        sub_weight: float = 0.5,
        temperature: float = 1.0,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        verbose: bool = True,
    ):
        if not isinstance(model, SubBranchModel):
            raise TypeError("MaskSubTask needs a model from masksub.wrap(...)")
        super().__init__(model, criterion, criterion_kwargs, device=device, dtype=dtype, verbose=verbose)
        self.sub_loss = SubBranchLoss(self.criterion, main_weight, sub_weight, temperature)
        self._wrapper = [model]  # a list: not a second registration of the same module
        self.eval_model = model.model

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        module = self.trainable_module
        wrapped = self._wrapper[0]
        if torch.is_grad_enabled():
            check_one_backward(wrapped.branch, wrapped.model, "MaskSubTask (one backward of the summed loss)")
        # Unsynced main forward: under DDP, buffers are broadcast before it and not again before the sub
        # forward, which would overwrite in place index buffers the main graph saved (Swin's relative
        # position index); the one backward still all-reduces once.
        with module.no_sync() if isinstance(module, DistributedDataParallel) else nullcontext():
            main = module(input)
        sub = module(input, sub=True)
        loss_main = self.sub_loss.main_loss(main, target)
        loss_sub = self.sub_loss.sub_loss(sub, main, target)
        loss = self.sub_loss.main_weight * loss_main + self.sub_loss.sub_weight * loss_sub
        return {"loss": loss, "output": main, "loss_main": loss_main.detach(), "loss_sub": loss_sub.detach()}

    def compile(self, backend: str = "inductor", mode: str | None = None, **compile_kwargs) -> nn.Module:
        """Compile the wrapper for training and the plain model for evaluation and checkpoints.

        ``ClassificationTask.compile`` would make the compiled wrapper the eval model, so checkpoints
        would hold ``model.``-prefixed keys that ``timm.create_model`` cannot load.
        """
        self.eval_model = torch.compile(self._wrapper[0].model, backend=backend, mode=mode, **compile_kwargs)
        self.trainable_module = torch.compile(self.trainable_module, backend=backend, mode=mode, **compile_kwargs)
        return self.eval_model

    def get_eval_model(self, module: nn.Module | None = None, ema: bool = False) -> nn.Module | None:
        """The plain model inside whatever holds the wrapper (an EMA copy, DDP, torch.compile)."""
        resolved = super().get_eval_model(module=module, ema=ema)
        current = resolved
        while current is not None and not isinstance(current, SubBranchModel):
            inner = getattr(current, "module", None)  # an EMA copy, DDP
            current = getattr(current, "_orig_mod", None) if inner is None else inner  # torch.compile
        return resolved if current is None else current.model

    def get_clip_parameters(self, exclude_head: bool = False):
        """The parameters to clip; ``exclude_head`` leaves out the model's last two (its head), as timm does for
        AGC, not the last two of the wrapper (the head's bias and the mask token)."""
        wrapped = self._wrapper[0]
        params = list(wrapped.model.parameters())
        return (params[:-2] if exclude_head else params) + list(wrapped.branch.parameters())

    def get_task_state(self, module: nn.Module | None = None, ema: bool = False) -> dict[str, Any]:
        return {"branch": self._wrapper[0].branch.state_dict()} if not ema else {}

    def load_task_state(self, state, strict: bool = True, module: nn.Module | None = None, ema: bool = False) -> None:
        if state and not ema:
            self._wrapper[0].branch.load_state_dict(state["branch"], strict=strict)


class MaskSubMultiLabelTask(MaskSubTask):
    """``MaskSubTask`` for multi-label targets, as timm's ``MultiLabelClassificationTask``: dense float targets
    (B, classes), a multi-label criterion (binary cross-entropy by default, or ``criterion_kwargs``'
    ``loss_type``), whose sigmoid teacher the sub branch learns, and timm's multi-label evaluator (mAP, F1
    at ``threshold``)."""

    multi_label = True

    def __init__(
        self,
        model: SubBranchModel,
        criterion: Callable | None = None,
        criterion_kwargs: dict[str, Any] | None = None,
        threshold: float = 0.5,
        **kwargs,
    ):
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold (a sigmoid probability) must be in (0, 1), got {threshold}")
        super().__init__(model, criterion, criterion_kwargs, **kwargs)
        if self.sub_loss.teacher != "sigmoid":
            raise ValueError(
                f"{type(self.criterion).__name__} is a single-label criterion (softmax teacher); a multi-label task "
                "needs a multi-label one: leave criterion out, or use BCEWithLogitsLoss or a timm multi-label loss"
            )
        self.threshold = threshold

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        if target.ndim != 2 or not target.is_floating_point():
            raise ValueError(
                f"multi-label training takes dense float targets (batch, classes), got {target.dtype} of shape "
                f"{tuple(target.shape)}"
            )
        return super().forward(input, target)

    def create_evaluator(self, **kwargs):
        return MultiLabelClassificationEvaluator(device=self.device, threshold=self.threshold, **kwargs)
