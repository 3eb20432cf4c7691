"""transformers' ``TimmWrapper`` models: timm checkpoints loaded with ``AutoModelForImageClassification``.

``AutoModelForImageClassification.from_pretrained("timm/...")`` returns a ``TimmWrapperForImageClassification``
that holds the timm model as ``timm_model`` and calls it on ``pixel_values``. This adapter masks
with the adapter of the timm model inside (``vit`` drops tokens, ``masktoken`` for Swin and
friends, ``pixels`` for CNNs) while the call goes through the wrapper, and through
DistributedDataParallel around it, as every pass must.

Another adapter of the timm model asked for by name (``adapter="swin_drop"`` for a Swin) masks it as a backbone
inside the wrapper, called through the wrapper; asking for its own adapter by name gets this one.

A mask token (``masktoken``: Swin and friends) becomes a parameter of the timm model inside,
``timm_model.mask_token``, not of the sub branch: as with the Hugging Face classifiers' own token slot
(``hf_masktoken``), what trains and saves the transformers model holds it (the ``transformers.Trainer``'s
optimizer, DDP, its checkpoints and their resumption; the wrapper's key mapping adds ``timm_model.`` to
every key it loads, so the token must live there). ``unwrap()`` takes it out again.
"""

from __future__ import annotations

from torch import nn

from .registry import MaskAdapter, register_adapter, resolve_adapter


def _inner_adapter(model: nn.Module) -> type[MaskAdapter] | None:
    timm_model = getattr(model, "timm_model", None)
    if not type(model).__name__.startswith("TimmWrapper") or timm_model is None:
        return None
    try:
        inner = resolve_adapter(timm_model)
    except TypeError:  # a timm model no adapter takes
        return None
    # naflexvit swaps an attribute of the model it is handed, which here is the wrapper: not delegable
    return None if inner.name == "naflexvit" else inner


@register_adapter("timm_wrapper", priority=35, description="transformers' TimmWrapper models: the timm model's adapter")
class TimmWrapperAdapter(MaskAdapter):
    """Masks the wrapped timm model with its own adapter, calling the wrapper."""

    def __init__(self, model: nn.Module, ratio: float, unit: int | None = None):
        super().__init__(model, ratio, unit)
        self.inner = _inner_adapter(model)(model.timm_model, ratio, unit)
        self.unit = self.inner.unit
        if isinstance(getattr(self.inner, "mask_token", None), nn.Parameter):
            self.inner.place_token_in(model.timm_model)

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return _inner_adapter(model) is not None

    @classmethod
    def delegates_to(cls, model: nn.Module) -> type[MaskAdapter] | None:
        return _inner_adapter(model)

    def forward(self, model: nn.Module, *args, **kwargs):
        if "pixel_values" in kwargs:
            images, rest = kwargs.pop("pixel_values"), args
        else:
            images, rest = args[0], args[1:]
        self.inner.ratio = self.ratio
        # The inner adapter checks and masks ``images`` (or arms its hooks) and calls this with the images.
        return self.inner(lambda masked: model(masked, *rest, **kwargs), images)

    def remove(self) -> None:
        self.inner.remove()

    def added_parameters(self) -> list[nn.Parameter]:
        return self.inner.added_parameters()

    def masked_unit(self) -> str:
        return self.inner.masked_unit()

    def extra_repr(self) -> str:
        return f"inner={self.inner.name}"
