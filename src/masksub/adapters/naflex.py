"""timm's NaFlexVit: drop patch tokens through the model's own patch-dropout slot.

NaFlexVit calls ``patch_drop`` only in training mode, and from the indices it
returns it gathers what goes with the tokens (RoPE tables, the valid-patch mask
and the attention mask built from it). During the sub pass this adapter puts its
own dropper in that slot (the model's own patch dropout, if any, is replaced),
keeping every prefix token and ``num_keep(N, ratio)`` patch tokens per sample,
and marks the top-level module as training so the slot is used in any mode;
both are put back afterwards.

Inputs are image batches (B, C, H, W) or NaFlex's patch dicts (``patches``, ``patch_coord``,
``patch_valid``, as timm's NaFlex loader gives them): there each sample keeps ``num_keep(n_i, ratio)``
of its own ``n_i`` valid patches, and the padding it keeps to fill the batch's length stays masked
out of attention and pooling.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..masking import keep_patch_tokens, keep_valid_patch_tokens
from .registry import MaskAdapter, check_patch_images, register_adapter

try:
    from timm.models.naflexvit import NaFlexVit
except ImportError:  # a timm without NaFlexVit
    NaFlexVit = None


class KeepTokens(nn.Module):
    """Stands in for ``PatchDropoutWithIndices``: (B, P + N, D) -> ((B, P + K, D), keep (B, K))."""

    def __init__(self, num_prefix_tokens: int, ratio: float):
        super().__init__()
        self.num_prefix_tokens, self.ratio = num_prefix_tokens, ratio
        self.valid: torch.Tensor | None = None  # the batch's patch_valid (B, N), for padded NaFlex batches

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.valid is None:
            return keep_patch_tokens(x, self.num_prefix_tokens, self.ratio)
        return keep_valid_patch_tokens(x, self.num_prefix_tokens, self.ratio, self.valid)


@register_adapter("naflexvit", priority=30, description="timm NaFlexVit: drop patch tokens")
class NaFlexTokenDropAdapter(MaskAdapter):
    """Drops a random ``ratio`` of patch tokens per sample, keeps all prefix tokens."""

    default_unit = None  # single patch tokens
    backbone = True  # also inside a model of the user's (a backbone under their head)

    def __init__(self, model: nn.Module, ratio: float, unit: int | None = None):
        super().__init__(model, ratio, unit)
        self.patch_size = tuple(model.embeds.patch_size)
        self.drop_module = KeepTokens(model.num_prefix_tokens, ratio)
        self._model_ref = [model]  # the NaFlexVit itself (under a PEFT wrapper, forward gets the wrapper)
        if model.patch_drop is None:
            # A plain None attribute would move into ``_modules`` at the first swap, changing the model's
            # structure under torch.compile's guards (a recompile of both graphs); register the empty slot now.
            del model.patch_drop
            model.register_module("patch_drop", None)

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return NaFlexVit is not None and isinstance(model, NaFlexVit)

    def forward(self, model: nn.Module, x, **kwargs) -> torch.Tensor:
        if kwargs.get("attn_mask") is not None:
            raise ValueError(
                "the naflexvit adapter drops patch tokens, and a given attn_mask covers all of them: pass "
                "patch_valid instead (the model builds the mask from it after the drop)"
            )
        valid = x.get("patch_valid") if isinstance(x, Mapping) else kwargs.get("patch_valid")
        if not isinstance(x, Mapping) and kwargs.get("patch_coord") is None:  # an image batch, not patches
            check_patch_images(x, self.patch_size, self.name, self._model_ref[0].embeds.dynamic_img_pad)
        self.drop_module.ratio = self.ratio  # a ratio set since (a schedule: wrapped.ratio = ...)
        self.drop_module.valid = valid
        vit = self._model_ref[0]
        saved_drop, saved_training = vit.patch_drop, vit.training
        vit.patch_drop, vit.training = self.drop_module, True  # the top-level flag only: it gates the slot
        try:
            return model(x, **kwargs)
        finally:
            vit.patch_drop, vit.training = saved_drop, saved_training
            self.drop_module.valid = None
