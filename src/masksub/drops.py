"""DropSub and PathSub: the sub branch raises dropout or drop-path to ``p`` everywhere.

Both work for any model. The values the model was built with are saved before
the sub pass and restored exactly after it, whatever they were.
"""

from __future__ import annotations

import numbers
import re
from contextlib import contextmanager

import torch
from timm.layers import DropPath
from torch import nn
from torch.nn.modules.dropout import _DropoutNd

_DROP_PATH_ATTR = re.compile(r"drop_path\d*$")
# Float attributes that modules pass as a rate to F.dropout / an attention function's dropout.
DROPOUT_RATE_ATTRS = (
    "drop_rate",
    "dropout",
    "dropout_p",
    "dropout_prob",
    "attention_dropout",
    "attn_dropout",
    "activation_dropout",
    "hidden_dropout",
    "residual_dropout",  # Starcoder2, Seed-OSS
    "resid_pdrop",  # DBRX
    "attn_dropout_p",  # MPT
    "embedding_dropout",  # Starcoder2
    "attn_drop",  # X-CLIP's prompt attention (elsewhere an nn.Dropout, a site already)
    "attention_probs_dropout_prob",  # Data2VecVision's SDPA path reads it from its configuration
)


# Module attributes that are a dropout rate also as the int 0: MPT's attention rate is its configuration's
# ``attn_pdrop: int = 0`` unless set. Not every name: LeViT's residual layers hold ``drop_rate = 0``, a drop-path
# rate. A typed Hugging Face configuration refuses a float where it holds an int: its fields take floats only.
INT_ZERO_RATE_ATTRS = ("attn_dropout_p",)


def _is_rate(value, integer_zero: bool = False) -> bool:
    """A dropout rate: a float in [0, 1), or with ``integer_zero`` also the int 0."""
    if integer_zero and type(value) is int and value == 0:
        return True
    return isinstance(value, float) and 0.0 <= value < 1.0


# The forwards set and restore their sites with values_of / assign in an explicit try/finally, not a context
# manager: torch.compile before torch 2.6 cannot trace a generator or class context manager without a graph
# break (fullgraph fails).
def values_of(sites: list[tuple[object, str]]) -> list:
    return [getattr(obj, attr) for obj, attr in sites]


def assign(sites: list[tuple[object, str]], values) -> None:
    """``setattr`` each site to its value (one value for all: a scalar)."""
    values = values if isinstance(values, list) else [values] * len(sites)
    for (obj, attr), value in zip(sites, values):
        setattr(obj, attr, value)


@contextmanager
def _set_attrs(sites: list[tuple[object, str]], value: float):
    saved = values_of(sites)
    try:
        assign(sites, value)
        yield
    finally:
        assign(sites, saved)


class DropoutBranch(nn.Module):
    """Sub branch with dropout probability ``p`` in every dropout site.

    Sites: every ``nn.Dropout*`` module (timm's fused attention reads
    ``attn_drop.p`` too) and every float rate attribute a module passes to a
    functional dropout (``DROPOUT_RATE_ATTRS``): timm CNN heads' ``drop_rate``,
    Hugging Face attention layers' ``attention_dropout`` (Llama, Mistral...) or
    ``dropout_prob`` (BERT's SDPA path in transformers 4.x), and the ``dropout``
    / ``activation_dropout`` of BART, OPT, BioGPT and their kin, Starcoder2's ``residual_dropout``,
    MPT's ``attn_dropout_p``, DBRX's ``resid_pdrop`` and the others transformers reads; the same names
    (float values) on a Hugging Face ``model.config``, which Falcon, Bloom and Data2VecVision read in
    their forward.
    In-place dropout modules run out of place in the sub pass: at ``p=0`` in
    place is harmless, at ``p>0`` it overwrites tensors autograd needs (TNT's
    ``Dropout(inplace=True)`` after a softmax).
    """

    name = "dropout"

    def __init__(self, model: nn.Module, p: float):
        super().__init__()
        self.p = p
        self._sites = [(m, "p") for m in model.modules() if isinstance(m, _DropoutNd)]
        for attr in DROPOUT_RATE_ATTRS:
            int_zero = attr in INT_ZERO_RATE_ATTRS
            self._sites += [(m, attr) for m in model.modules() if _is_rate(getattr(m, attr, None), int_zero)]
        config = getattr(model, "config", None)  # Falcon and Bloom read config.hidden_dropout in forward
        if config is not None and not isinstance(config, nn.Module):
            self._sites += [(config, a) for a in DROPOUT_RATE_ATTRS if _is_rate(getattr(config, a, None))]
        self._inplace = [(m, "inplace") for m in model.modules() if isinstance(m, _DropoutNd) and m.inplace]
        if not self._sites:
            raise ValueError(
                f"{type(model).__name__} has no dropout layer or dropout rate attribute, so sub='dropout' "
                "would change nothing; use sub='mask' or sub='droppath'"
            )

    def forward(self, model: nn.Module, *args, **kwargs):
        saved, inplace = values_of(self._sites), values_of(self._inplace)
        try:  # hold(), traceable by torch.compile before 2.6
            assign(self._sites, self.p)
            assign(self._inplace, False)
            return model(*args, **kwargs)
        finally:
            assign(self._sites, saved)
            assign(self._inplace, inplace)

    @contextmanager
    def hold(self):
        """The sub branch's dropout in effect while open (a backward that recomputes checkpointed blocks)."""
        with _set_attrs(self._sites, self.p), _set_attrs(self._inplace, False):
            yield

    def remove(self) -> None:
        pass

    def extra_repr(self) -> str:
        return f"p={self.p}, sites={len(self._sites)}"


def _drop_path_rate_attr(module: nn.Module) -> str | None:
    """The attribute holding a drop-path module's rate, which its forward reads, or None for other modules.

    timm's ``DropPath``; a model's own drop-path class with a ``drop_prob`` (Hugging Face's ``SwinDropPath``,
    ``ConvNextDropPath``, ``BeitDropPath``... : every one of transformers'); torchvision's ``StochasticDepth``
    (its Swin, ConvNeXt, EfficientNet, MaxViT), whose rate is ``p``.
    """
    if isinstance(module, DropPath):
        return "drop_prob"
    name = type(module).__name__
    for suffix, attr in (("DropPath", "drop_prob"), ("StochasticDepth", "p")):
        rate = getattr(module, attr, None)
        if name.endswith(suffix) and isinstance(rate, numbers.Real) and 0 <= rate < 1:
            return attr
    return None


class DropPathBranch(nn.Module):
    """Sub branch with stochastic-depth rate ``p`` in every residual branch.

    Sites: timm ``DropPath`` modules, a model's own ``*DropPath`` modules with a ``drop_prob`` (every
    Hugging Face vision model's) and torchvision's ``StochasticDepth`` (rate ``p``; its ``mode="batch"``
    drops a block for the whole batch, as the model does in training). A timm model built with
    ``drop_path_rate=0`` holds ``nn.Identity`` (or ``None``, as ResNet does) where a ``DropPath`` would be;
    those attributes, named ``drop_path``/``drop_path1``/..., get a ``DropPath(0.0)``, which is an identity
    in the main pass and has no state, and ``remove()`` puts back what was there.
    """

    name = "droppath"

    def __init__(self, model: nn.Module, p: float):
        super().__init__()
        self.p = p
        self._inserted: list[tuple[nn.Module, str, nn.Module | None]] = []
        for module in list(model.modules()):
            # ResNet keeps a plain ``None`` attribute; most others an Identity submodule.
            candidates = {k: v for k, v in vars(module).items() if v is None} | dict(module._modules)
            for attr, value in candidates.items():
                if _DROP_PATH_ATTR.match(attr) and (value is None or isinstance(value, nn.Identity)):
                    self._inserted.append((module, attr, value))
                    setattr(module, attr, DropPath(0.0))
        self._sites = [(m, attr) for m in model.modules() if (attr := _drop_path_rate_attr(m)) is not None]
        self._checked = False  # whether a sub pass has run at least one site
        if not self._sites:
            raise ValueError(
                f"{type(model).__name__} has no residual drop-path sites masksub can find "
                "(timm DropPath modules, torchvision StochasticDepth modules or drop_path attributes); "
                "use sub='mask' or sub='dropout', or give the model timm DropPath layers"
            )

    def forward(self, model: nn.Module, *args, **kwargs):
        saved = values_of(self._sites)
        try:  # hold(), traceable by torch.compile before 2.6
            assign(self._sites, self.p)
            # Hooks cannot be registered in a compiled trace: there, the check is left to an eager sub pass
            # (masksub train runs one before it compiles).
            if self._checked or torch.compiler.is_compiling():
                return model(*args, **kwargs)
            return self._first_forward(model, *args, **kwargs)
        finally:
            assign(self._sites, saved)

    def hold(self):
        """The sub branch's drop-path rate in effect while open (a backward that recomputes checkpointed blocks)."""
        return _set_attrs(self._sites, self.p)

    def _first_forward(self, model: nn.Module, *args, **kwargs):
        # A block without an identity shortcut keeps its drop_path attribute but never calls it
        # (timm's EfficientNet and GhostNet blocks where the stride or width changes): PathSub would be
        # a silent no-op if no site runs, so the first sub pass counts them.
        ran = []
        handles = [m.register_forward_pre_hook(lambda *_: ran.append(1)) for m, _ in self._sites]
        try:
            out = model(*args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
        if not ran:
            raise ValueError(
                f"none of the {len(self._sites)} drop-path sites of {type(model).__name__} ran in the sub pass: its "
                "blocks have no residual shortcut to drop at this size; use sub='mask' or sub='dropout'"
            )
        self._checked = True
        return out

    def remove(self) -> None:
        for module, attr, original in self._inserted:
            setattr(module, attr, original)
        self._inserted.clear()

    def extra_repr(self) -> str:
        return f"p={self.p}, sites={len(self._sites)}, inserted={len(self._inserted)}"
