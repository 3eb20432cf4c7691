"""The adapter contract and its registry.

An adapter knows how to run one model family's *masked* sub-branch forward. It
is an ``nn.Module`` (so a learnable mask token is a real, saved, trained
parameter) that never registers the user's model as a submodule: it only holds
hooks on it, which ``remove()`` takes off again.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import nn


class MaskAdapter(nn.Module):
    """Base class: subclass, implement ``supports`` and ``forward``, and register it.

    ``forward(model, x)`` returns the model's output on ``x`` with a fraction
    ``ratio`` of the input masked, per sample at random.
    """

    name: str = ""
    priority: int = 0
    description: str = ""
    default_unit: int | None = 32  # mask block size in pixels; None for adapters that take no unit
    generic: bool = False  # masks any model at its input (pixels): tried after a search for a backbone
    backbone: bool = False  # its hooks work on a module inside a model of the user's (a backbone under their head)
    target_name: str = ""  # set by wrap: the name of the module it hooks inside the model ("" for the model itself)

    def __init__(self, model: nn.Module, ratio: float, unit: int | None = None):
        super().__init__()
        self.ratio = ratio
        # An adapter that takes no unit (it drops or masks whole tokens) ignores one given: a loop over many
        # models, as the trainer's ``sub.unit``, passes the block size for the adapters that use it.
        self.unit = None if self.default_unit is None else (self.default_unit if unit is None else unit)
        self._active = False  # read by hooks an adapter places on the model

    def run_with_hooks_active(self, model: nn.Module, *args, **kwargs):
        """Run ``model`` with this adapter's hooks masking; they pass through otherwise."""
        self._active = True
        try:
            return model(*args, **kwargs)
        finally:
            self._active = False

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        raise NotImplementedError

    @classmethod
    def supports_backbone(cls, module: nn.Module) -> bool:
        """Whether ``module``, found inside a model of the user's, is one this adapter masks while the model
        around it is called."""
        return cls.backbone and cls.supports(module)

    @classmethod
    def delegates_to(cls, model: nn.Module) -> type[MaskAdapter] | None:
        """The adapter this one masks ``model`` with, where it wraps another (transformers' ``TimmWrapper``: the
        timm model's); asking for that adapter by name then gets this one."""
        return None

    @classmethod
    def why_not(cls, model: nn.Module) -> str:
        """Why a model of a family this adapter knows is not one it takes (``""`` where there is no such reason):
        appended to the error for ``adapter=<name>`` on it."""
        return ""

    def forward(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def remove(self) -> None:
        """Undo whatever the adapter did to the model (hooks, inserted modules)."""

    def added_parameters(self) -> list[nn.Parameter]:
        """Parameters the adapter put into the model itself (not into its own ``.branch``): a mask token in a
        slot the model has for one. They train with the model and leave it at ``remove()``."""
        return []

    def masked_unit(self) -> str:
        """What one masked element is, for logs: ``unit``-pixel blocks, or the model's patch tokens or tokens."""
        if self.unit is not None:
            return f"{self.unit}x{self.unit}-pixel blocks"
        patch = getattr(self, "patch_size", None)
        return f"{patch[0]}x{patch[1]}-pixel patch tokens" if patch else "tokens"

    def extra_repr(self) -> str:
        where = f" of {self.target_name}" if self.target_name else ""
        return f"ratio={self.ratio}, masks {self.masked_unit()}{where}"


_ADAPTERS: dict[str, type[MaskAdapter]] = {}


def register_adapter(name: str, priority: int = 50, description: str = "") -> Callable:
    """Class decorator that makes an adapter available to ``masksub.wrap``.

    Adapters are tried from the highest ``priority`` down; the first whose
    ``supports(model)`` is true is used. The built-in ones sit at 10-30, so a
    user adapter registered with the default priority wins over them.
    """

    def decorator(cls: type[MaskAdapter]) -> type[MaskAdapter]:
        if not (isinstance(cls, type) and issubclass(cls, MaskAdapter)):
            raise TypeError(f"@register_adapter expects a MaskAdapter subclass, got {cls!r}")
        cls.name, cls.priority = name, priority
        cls.description = description or (cls.__doc__ or "").strip().split("\n")[0]
        _ADAPTERS[name] = cls
        return cls

    return decorator


def list_adapters() -> list[str]:
    """Registered adapter names, in the order they are tried."""
    return [a.name for a in sorted(_ADAPTERS.values(), key=lambda a: -a.priority)]


def _families() -> str:
    return "\n".join(f"  - {a.name}: {a.description}" for a in sorted(_ADAPTERS.values(), key=lambda a: -a.priority))


def adapted_model(model: nn.Module) -> nn.Module:
    """The model an adapter hooks: under a PEFT wrapper (``peft``'s ``PeftModel`` and its tuners, which run
    the base model with LoRA or other layers injected into it) the base model, else ``model`` itself.

    The hooks sit on the base model's modules and fire when the PEFT wrapper runs it; without looking
    through, a LoRA-tuned ViT got the pixel adapter (no compute saved) instead of dropping tokens.
    """
    while type(model).__module__.startswith("peft."):
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model._modules.get("model")
        if not isinstance(inner, nn.Module) or inner is model:
            break
        model = inner
    return model


LIBRARIES = ("timm.", "torchvision.", "transformers.", "masksub.")  # their models are judged by their own type


def _backbones(model: nn.Module, adapters: list[type[MaskAdapter]]) -> list[tuple[str, nn.Module, type[MaskAdapter]]]:
    """The outermost modules inside ``model`` that one of ``adapters`` takes as a backbone, with their names."""
    found = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(f"{outer}.") for outer, _, _ in found):
            continue
        cls = next((a for a in adapters if a.supports_backbone(module)), None)
        if cls is not None:
            found.append((name, module, cls))
    return found


def resolve_target(model: nn.Module, name: str | None = None) -> tuple[type[MaskAdapter], nn.Module, str]:
    """The adapter class for ``model`` (the base model under a PEFT wrapper), the module it hooks and that module's
    name in ``model`` (``""``: the model itself).

    A model of the user's (not a timm, torchvision or transformers class) that no adapter takes as a whole but
    which holds one backbone an adapter takes (a timm ViT under the user's head, say) is masked there: the backbone
    drops tokens while the whole model is called. With two or more backbones it is masked at its input (pixels). An
    adapter asked for by ``name`` looks for its one backbone in any model (a Swin in transformers' ``TimmWrapper``
    with ``swin_drop``).
    """
    model = adapted_model(model)
    ordered = sorted(_ADAPTERS.values(), key=lambda a: -a.priority)
    own = not type(model).__module__.startswith(LIBRARIES)
    if name is not None:
        if name not in _ADAPTERS:
            raise ValueError(f"unknown adapter {name!r}; registered adapters:\n{_families()}")
        cls = _ADAPTERS[name]
        if cls.supports(model):
            return cls, model, ""
        delegate = next((a for a in ordered if a.delegates_to(model) is cls), None)
        if delegate is not None:
            return delegate, model, ""
        found = _backbones(model, [cls])  # asked for by name: inside a library's model too (a TimmWrapper's timm model)
        if len(found) == 1:
            return cls, found[0][1], found[0][0]
        inside = f"; it holds {len(found)} modules it does: {', '.join(n for n, _, _ in found)}" if found else ""
        raise ValueError(f"adapter {name!r} does not support {type(model).__name__}{cls.why_not(model)}{inside}")
    generic = None
    for cls in ordered:
        if cls.supports(model):
            if not cls.generic:
                return cls, model, ""
            generic = cls
            break
    found = _backbones(model, [a for a in ordered if not a.generic]) if own else []
    if len(found) == 1:
        return found[0][2], found[0][1], found[0][0]
    if generic is not None:
        return generic, model, ""
    raise TypeError(
        f"masksub has no mask adapter for {type(model).__name__}: it is not an image model it knows.\n"
        f"Supported families:\n{_families()}\n"
        "For another model, subclass masksub.MaskAdapter and decorate it with "
        "@masksub.register_adapter('name'), or use sub='dropout' / sub='droppath', which work for any model."
    )


def resolve_adapter(model: nn.Module, name: str | None = None) -> type[MaskAdapter]:
    """The adapter class for ``model`` (the base model under a PEFT wrapper): by ``name`` if given, else the
    first that supports it, or that supports its one backbone (see ``resolve_target``)."""
    return resolve_target(model, name)[0]


def check_options(cls: type[MaskAdapter], options: dict) -> None:
    """Adapter settings passed through ``wrap(**options)`` must be ones the adapter takes."""
    params = inspect.signature(cls.__init__).parameters
    accepted = [n for n, p in params.items() if p.kind is p.KEYWORD_ONLY]
    unknown = [k for k in options if k not in accepted]
    if unknown:
        takes = f"it takes {', '.join(accepted)}" if accepted else "it takes none"
        raise TypeError(f"the {cls.name!r} mask adapter has no option {', '.join(map(repr, unknown))}; {takes}")


def check_images(x: torch.Tensor, adapter: str) -> None:
    """Mask adapters take image batches (B, C, H, W); anything else is an error."""
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point():
        if isinstance(x, torch.Tensor):
            desc = f"a {x.ndim}-D {x.dtype} tensor of shape {tuple(x.shape)}"
        else:
            desc = repr(type(x))
        raise ValueError(
            f"the {adapter!r} mask adapter expects a float image batch (B, C, H, W), got {desc}; "
            "for token/text inputs register an adapter for that family"
        )


def check_patch_images(x: torch.Tensor, patch_size: tuple[int, int], adapter: str, pads: bool = False) -> None:
    """A token-dropping adapter takes image batches whose sides are multiples of the patch size, or any size
    where the model pads the image to one itself (``pads``: timm's ``dynamic_img_pad=True``)."""
    check_images(x, adapter)
    ph, pw = patch_size
    if not pads and (x.shape[-2] % ph or x.shape[-1] % pw):
        raise ValueError(
            f"image size {x.shape[-2]}x{x.shape[-1]} is not divisible by the patch size {ph}x{pw}; "
            "resize or crop the images to a multiple of the patch size"
        )
