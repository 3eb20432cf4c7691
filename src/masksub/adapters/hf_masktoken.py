"""Hugging Face classifiers whose blocks need the full token grid: the model's own mask-token slot.

``SwinForImageClassification``, ``Swinv2...``, ``DonutSwin...`` (windows), ``FocalNet...``, and, when
this adapter is named, ``BeitForImageClassification`` and ``Data2VecVision...`` (whose own adapter,
``hf_relpos``, drops tokens and gathers their relative position bias) embed an image with
an ``embeddings`` module that takes ``bool_masked_pos`` and replaces the masked patch embeddings by
its ``mask_token``: the masking their masked-image-modeling heads pretrain with, at the place each
model puts it (Swin after the patch norm, BEiT before the class token, both before the position
embedding). The classifiers build that slot empty (``mask_token = None``) and never pass a mask.
This adapter fills the slot with a learnable ``(1, 1, C)`` token where it is empty, and passes a
mask of ``unit``-pixel blocks (default 32, as timm's ``masktoken`` adapter) to the embeddings in
the sub pass. No compute is saved.

The token is a parameter of the model, under the name its masked-image-modeling model gives it
(``swin.embeddings.mask_token``), so whatever trains and saves the model holds it: the
``transformers.Trainer``'s optimizer, DDP, its checkpoints and their resumption.
``unwrap()`` empties the slot again (a token that was there before ``wrap`` stays).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from ..masking import check_masks_some, random_unit_mask, unit_grid, upsample_mask
from .masktoken import tokens_per_unit
from .registry import MaskAdapter, check_images, register_adapter


def _embeddings(model: nn.Module) -> nn.Module | None:
    """The image classifier's embeddings module with a ``mask_token`` slot that takes ``bool_masked_pos``."""
    if not type(model).__module__.startswith("transformers.") or "ForImageClassification" not in type(model).__name__:
        return None
    for module in model.modules():
        embeddings = getattr(module, "embeddings", None)
        if isinstance(embeddings, nn.Module) and hasattr(embeddings, "mask_token"):
            takes = inspect.signature(embeddings.forward).parameters
            if "bool_masked_pos" in takes and any(isinstance(m, nn.Conv2d) for m in embeddings.modules()):
                return embeddings
    return None


@register_adapter(
    "hf_masktoken",
    priority=20,
    description="Hugging Face Swin, SwinV2, FocalNet classifiers: the model's mask token",
)
class HFMaskTokenAdapter(MaskAdapter):
    """Replaces ``ratio`` of the ``unit``-pixel blocks by the embeddings' ``mask_token`` (made if absent)."""

    def __init__(self, model: nn.Module, ratio: float, unit: int | None = None):
        super().__init__(model, ratio, unit)
        embeddings = _embeddings(model)
        conv = next(m for m in embeddings.modules() if isinstance(m, nn.Conv2d))  # the patch projection
        self.patch_size = tuple(conv.stride)
        self._embed_ref = [embeddings]  # a list keeps it from being registered as a submodule
        self._unit_tokens = tokens_per_unit(self.patch_size, self.unit)  # once: the patch size stays
        self._made_token = embeddings.mask_token is None
        if self._made_token:
            weight = conv.weight
            token = torch.zeros(1, 1, conv.out_channels, device=weight.device, dtype=weight.dtype)
            embeddings.mask_token = nn.Parameter(nn.init.trunc_normal_(token, std=0.02))
        self._handle = embeddings.register_forward_pre_hook(self._mask_hook, with_kwargs=True)

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return _embeddings(model) is not None

    @property
    def mask_token(self) -> nn.Parameter:
        return self._embed_ref[0].mask_token

    def added_parameters(self) -> list[nn.Parameter]:
        """The mask token, where the slot was empty."""
        return [self.mask_token] if self._made_token else []

    def _mask_hook(self, module: nn.Module, args: tuple, kwargs: dict):
        if not self._active:
            return None
        x = args[0] if args else kwargs["pixel_values"]
        mask = upsample_mask(random_unit_mask(x.shape[0], self._grid, self.ratio, x.device), self._unit_tokens)
        mask = mask.flatten(1)  # (B, tokens), row-major as the patch embedding flattens its grid; True = masked
        if len(args) > 1:  # passed by position
            return (args[0], mask, *args[2:]), kwargs
        return args, {**kwargs, "bool_masked_pos": mask}

    def forward(self, model: nn.Module, *args, **kwargs):
        x = kwargs.get("pixel_values", args[0] if args else None)
        check_images(x, self.name)
        self._grid = unit_grid(x.shape[-2], x.shape[-1], self.unit, f"{self.name} adapter")
        check_masks_some(self._grid, self.ratio, self.unit, tuple(x.shape[-2:]), f"{self.name} adapter")
        return self.run_with_hooks_active(model, *args, **kwargs)

    def remove(self) -> None:
        self._handle.remove()
        if self._made_token:
            self._embed_ref[0].mask_token = None
