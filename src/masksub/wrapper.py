"""``wrap``: a model that runs either as configured (main branch) or as its sub branch."""

from __future__ import annotations

import numbers
import weakref
from contextlib import ExitStack, nullcontext

import torch
from timm.models import group_modules, group_parameters
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .adapters import adapted_model
from .adapters.registry import check_options, resolve_target
from .drops import DropoutBranch, DropPathBranch, assign
from .masking import check_ratio

SUB_KINDS = ("mask", "dropout", "droppath")
METHOD_NAMES = {"mask": "MaskSub", "dropout": "DropSub", "droppath": "PathSub"}  # as the papers call them
# The models wrap() was given and not yet unwrapped, with their sub branch's kind: Step, given one of them,
# would train it without the sub branch (``masksub.wrap(model)`` called without keeping what it returns).
_WRAPPED: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()


class SubBranchModel(nn.Module):
    """The user's model plus a sub-branch strategy.

    ``forward(x)`` is the model exactly as built (main branch, evaluation,
    inference); ``forward(x, sub=True)`` is the sub branch. Keyword inputs pass
    through to the model (a text model's ``input_ids=..., attention_mask=...``). The model is kept
    as ``.model`` with its own parameter names, so ``.model.state_dict()`` loads
    into the plain timm model with ``strict=True``; extra parameters of the
    strategy (a mask token) live in ``.branch``.
    """

    def __init__(self, model: nn.Module, branch: nn.Module, sub_bn_stats: bool = True):
        super().__init__()
        self.model = model
        self.branch = branch
        self.sub_bn_stats = sub_bn_stats
        _WRAPPED[model] = self.sub_kind

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)  # parameters, buffers and submodules: .model, .branch
        except AttributeError:
            model = self._modules.get("model")
            if model is None or name.startswith("__") or not hasattr(model, name):
                raise
            # Not forwarded: what probes the wrapper with hasattr (DDP, Accelerate, timm) keeps seeing the wrapper.
            raise AttributeError(
                f"'{type(self).__name__}' object has no attribute {name!r}; the wrapped model has it: "
                f"use .model.{name} (the wrapper's .model is the plain {type(model).__name__})"
            ) from None

    @property
    def sub_kind(self) -> str:
        """``"mask"``, ``"dropout"`` or ``"droppath"``: what ``wrap``'s ``sub`` was (mask branches are named by
        their adapter)."""
        return self.branch.name if self.branch.name in SUB_KINDS else "mask"

    @property
    def sub_kept(self) -> torch.Tensor | None:
        """After a sub pass that dropped tokens of a token classifier (the text adapter's ``mode="drop"``): a
        (batch, length) bool tensor, True at the tokens it predicted; its logits are 0 at the others, which the
        distillation leaves out (``SubBranchLoss.sub_loss(..., kept=)``). None after any other sub pass."""
        return getattr(self.branch, "kept", None)

    @property
    def ratio(self) -> float:
        """The sub branch's mask ratio (MaskSub) or drop rate (DropSub, PathSub).

        Settable between steps (a schedule, say), checked as ``wrap`` checks it. A new mask ratio
        changes the masked shapes: a compiled wrapper recompiles for it.
        """
        return self.branch.p if hasattr(self.branch, "p") else self.branch.ratio

    @ratio.setter
    def ratio(self, value: float) -> None:
        setattr(self.branch, "p" if hasattr(self.branch, "p") else "ratio", check_ratio(value))

    def forward(self, *args, sub: bool = False, **kwargs):
        if not sub:
            return self.model(*args, **kwargs)
        if self.sub_bn_stats:
            return self.branch(self.model, *args, **kwargs)
        # BatchNorm with track_running_stats=False normalizes with batch statistics and leaves running_mean/var
        # and num_batches_tracked untouched. The layers are looked up at each pass: SyncBatchNorm.convert_sync_
        # batchnorm (or a freeze) after wrap() replaces them. An explicit try/finally: torch.compile before
        # torch 2.6 cannot trace a context manager without a graph break.
        frozen = [(m, "track_running_stats") for m in self.model.modules() if isinstance(m, _BatchNorm)]
        frozen = [site for site in frozen if site[0].track_running_stats]
        try:
            assign(frozen, False)
            return self.branch(self.model, *args, **kwargs)
        finally:
            assign(frozen, True)

    # timm's model interface, for what reads it from the model handed over: create_optimizer_v2 (no weight
    # decay lists, layer-wise lr decay) and resolve_data_config (input size, mean, std). Without these the
    # wrapper got ImageNet defaults, decay on position embeddings and one layer for layer decay, silently.

    @property
    def pretrained_cfg(self) -> dict:
        """The model's ``pretrained_cfg`` (timm's ``resolve_data_config(model=wrapped)`` reads it); for a model
        without one, the AttributeError makes ``hasattr`` False, as for the model itself."""
        return self.model.pretrained_cfg

    @property
    def default_cfg(self) -> dict:
        return self.pretrained_cfg

    def _base(self) -> tuple[nn.Module, str]:
        """The model whose names timm's helpers give (the base model under a PEFT wrapper), and its prefix."""
        base = adapted_model(self.model)
        if base is self.model:
            return base, "model."
        return base, "model." + next(name for name, m in self.model.named_modules() if m is base) + "."

    def named_added_parameters(self) -> dict[str, nn.Parameter]:
        """The parameters the sub branch put into the model, by their names in ``.model`` (a Hugging Face Swin's
        ``swin.embeddings.mask_token``, in a slot the model has for one); usually none."""
        added = getattr(self.branch, "added_parameters", None)
        ids = {id(p) for p in added()} if callable(added) else set()
        return {name: p for name, p in self.model.named_parameters() if id(p) in ids}

    def no_weight_decay(self) -> set[str]:
        """The model's no-weight-decay names, as the wrapper names them (``model.`` + name), and a mask token
        the sub branch put into the model."""
        base, prefix = self._base()
        inner = getattr(base, "no_weight_decay", None)
        names = {prefix + name for name in (inner() if callable(inner) else ())}
        return names | {"model." + name for name in self.named_added_parameters()}

    def group_matcher(self, coarse: bool = False):
        """The model's layer groups (timm's layer-wise lr decay) for the wrapper's names; the sub branch's own
        parameters (a mask token, new and trained from scratch) join the last group, the head's, at full lr.
        A model without ``group_matcher`` is one group, as timm treats it."""
        base, prefix = self._base()
        matcher = getattr(base, "group_matcher", None)
        if not callable(matcher):
            return lambda name: (0,)
        matcher = matcher(coarse=coarse)
        params = group_parameters(base, matcher, reverse=True)
        modules = group_modules(base, matcher, reverse=True)
        last = max(params.values(), default=0)

        def layer(name: str) -> tuple[int]:
            inner = name[len(prefix) :] if name.startswith(prefix) else None
            return (params.get(inner, modules.get(inner, last)),)

        return layer

    def sub_pass(self):
        """A context that keeps the sub branch's drop settings (DropSub, PathSub) in effect while open.

        Activation checkpointing (timm's ``set_grad_checkpointing``, Hugging Face's
        ``gradient_checkpointing_enable``) runs each checkpointed block's forward again in the backward,
        with the settings of that moment: the sub pass's backward must run inside this context. Masking
        needs nothing (its hooks sit before the blocks); it is a no-op then.
        """
        hold = getattr(self.branch, "hold", None)
        return hold() if hold is not None else nullcontext()

    def compile(self, *args, **kwargs) -> None:
        """Compile this wrapper in place (two graphs: main and sub); names stay unchanged.

        The wrapper's own ``forward`` is the compiled frame, so the sub branch's hooks and flags are traced
        and guarded inside it. Compiling only the inner model would share its graphs with every other
        compiled instance of the same class, and dynamo does not guard on module hooks: after a plain
        instance had been compiled, the sub pass would run that unmasked graph.
        """
        super().compile(*args, **kwargs)

    def unwrap(self) -> nn.Module:
        """Take the strategy off the model and return the plain model."""
        self.branch.remove()
        _WRAPPED.pop(self.model, None)
        return self.model


def wrapped_inside(model: nn.Module) -> tuple[str, str] | None:
    """``(module name, sub-branch kind)`` of a module in ``model`` that ``wrap()`` was given and that was not
    unwrapped, or None."""
    return next(((name or "the model", _WRAPPED[m]) for name, m in model.named_modules() if m in _WRAPPED), None)


def checkpointing_modules(model: nn.Module) -> list[str]:
    """Class names of the modules with activation checkpointing on (timm's ``grad_checkpointing``, Hugging
    Face's ``gradient_checkpointing``)."""
    flags = ("grad_checkpointing", "gradient_checkpointing")
    return sorted({type(m).__name__ for m in model.modules() if any(getattr(m, f, False) is True for f in flags)})


def check_one_backward(branch: nn.Module, model: nn.Module, where: str) -> None:
    """Refuse DropSub / PathSub under activation checkpointing where one backward serves both passes.

    A backward that recomputes the main and the sub pass's checkpointed blocks together cannot give
    each its own drop rates: the sub pass's gradients would come from blocks recomputed with the main
    pass's rates (or torch's checkpoint stops on the mismatch). ``where`` names the caller.
    """
    if not hasattr(branch, "hold") or not (flagged := checkpointing_modules(model)):
        return
    raise ValueError(
        f"activation checkpointing is on ({', '.join(flagged[:3])}) and sub='{branch.name}' sets drop rates that "
        f"{where} cannot keep while the backward recomputes the sub pass: use the memory-saving order "
        "(two backwards), sub='mask', or turn activation checkpointing off"
    )


class SubPassHold:
    """Keeps a DropSub / PathSub branch's rates in effect from the sub forward to the end of the backward
    that a framework runs itself on the returned loss (Hugging Face Trainer, Lightning), so that
    checkpointed blocks are recomputed with them. A no-op for masking branches."""

    def __init__(self):
        self._stack = ExitStack()

    def enter(self, branch: nn.Module) -> None:
        self.close()  # one that a backward never released (a loss that was not back-propagated); callers also
        # close at the start of each call, before its main pass
        hold = getattr(branch, "hold", None)
        if hold is not None:
            self._stack.enter_context(hold())

    def release_after_backward(self, loss: torch.Tensor) -> None:
        if not loss.requires_grad:
            self.close()
            return
        loss.register_hook(self._close_at_backward_end)

    def _close_at_backward_end(self, grad: torch.Tensor) -> torch.Tensor:
        torch.autograd.Variable._execution_engine.queue_callback(self.close)
        return grad

    def close(self) -> None:
        stack, self._stack = self._stack, ExitStack()
        stack.close()


def wrap(
    model: nn.Module,
    sub: str = "mask",
    ratio: float = 0.5,
    *,
    unit: int | None = None,
    adapter: str | None = None,
    sub_bn_stats: bool = True,
    **options,
) -> SubBranchModel:
    """Add a sub branch to ``model``.

    Args:
        model: any timm image model, a torchvision classifier, a Hugging Face text or image classifier, one
            with a registered adapter, or a module of yours holding one such backbone (masked there, see
            ``adapters.registry.resolve_target``).
        sub: ``"mask"`` (MaskSub), ``"dropout"`` (DropSub) or ``"droppath"`` (PathSub).
        ratio: fraction of the input masked (``mask``) or the drop probability
            (``dropout``/``droppath``), in [0, 1). Default 0.5, the paper's MaskSub value.
        unit: mask block size in pixels for the mask-token, pixel and Swin-dropping adapters (default 32); the adapters
            that drop single patch tokens (timm, torchvision and Hugging Face ViTs, CaiT,
            NaFlexViT, ConvViT, Gemma 4, SigLIP 2)
            and Hiera's mask units (its own 32x32 pixels) ignore it.
        adapter: force an adapter by name instead of choosing by model type (``"pixels"`` masks the input of a
            module of yours whose backbone would otherwise drop tokens; ``"swin_drop"`` drops a Swin's masked blocks
            (timm's or torchvision's) instead of giving them a mask token).
        sub_bn_stats: whether the sub pass updates BatchNorm running statistics
            (True, as in the paper) or normalizes with batch statistics only.
        **options: the mask adapter's own settings, e.g. the text adapter's ``tokenizer=``,
            ``mask_token_id=``, ``special_ids=`` and ``mode=``.
    """
    if isinstance(model, SubBranchModel):
        raise TypeError("model is already wrapped; call wrap() on the plain model")
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) or hasattr(model, "_orig_mod"):
        raise TypeError("wrap the plain model first, then DistributedDataParallel / torch.compile the wrapper")
    ratio = check_ratio(ratio)
    if unit is not None and (isinstance(unit, bool) or not isinstance(unit, numbers.Integral) or unit < 1):
        raise ValueError(f"unit must be a positive whole number of pixels (an int), got {unit!r}")
    unit = None if unit is None else int(unit)
    if (options or adapter is not None) and sub != "mask":
        given = ", ".join([*options, *(["adapter"] if adapter is not None else [])])
        raise TypeError(f"{given}: mask adapter options, but sub={sub!r} uses no mask adapter")
    if sub == "mask":
        # the base model under a PEFT wrapper, or the one backbone inside a model of the user's
        cls, target, where = resolve_target(model, adapter)
        check_options(cls, options)
        branch = cls(target, ratio, unit, **options)
        branch.target_name = where
    elif sub == "dropout":
        branch = DropoutBranch(model, ratio)
    elif sub == "droppath":
        branch = DropPathBranch(model, ratio)
    else:
        raise ValueError(f"unknown sub-branch kind {sub!r}; choose one of {', '.join(SUB_KINDS)}")
    return SubBranchModel(model, branch, sub_bn_stats=sub_bn_stats)
