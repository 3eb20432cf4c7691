"""timm's CaiT: drop patch tokens before its self-attention blocks.

CaiT adds a fixed position embedding to the patch tokens, runs its self-attention blocks (talking
heads mix heads, not positions) on the patch tokens alone, and only then lets a class token attend
to them in its class-attention blocks. Nothing is tied to the full grid, so, as for a ViT, a hook
after the position embedding (on ``pos_drop``) keeps ``num_keep(N, ratio)`` patch tokens per
sample and the model runs on the shorter sequence: the sub pass costs about ``1 - ratio``.
"""

from __future__ import annotations

import torch
from timm.layers import to_2tuple
from timm.models.cait import Cait
from torch import nn

from ..masking import keep_patch_tokens
from .registry import MaskAdapter, check_patch_images, register_adapter


@register_adapter("cait", priority=30, description="timm CaiT: drop patch tokens before the self-attention blocks")
class CaitAdapter(MaskAdapter):
    """Drops a random ``ratio`` of the patch tokens per sample; the class token joins later, as always."""

    default_unit = None  # single patch tokens
    backbone = True  # also inside a model of the user's (a backbone under their head)

    def __init__(self, model: nn.Module, ratio: float, unit: int | None = None):
        super().__init__(model, ratio, unit)
        self._model_ref = [model]  # a list keeps the model from being registered as a submodule
        self._handle = model.pos_drop.register_forward_hook(self._drop_hook)

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return isinstance(model, Cait)

    @property
    def patch_size(self) -> tuple[int, int]:
        return tuple(to_2tuple(self._model_ref[0].patch_embed.patch_size))

    @property
    def drop_module(self) -> nn.Module:
        """Where the tokens are dropped: the dropout after the position embedding (no prefix tokens yet)."""
        return self._model_ref[0].pos_drop

    def _drop_hook(self, module: nn.Module, args: tuple, x: torch.Tensor):
        if not self._active:
            return None
        return keep_patch_tokens(x, 0, self.ratio)[0]

    def forward(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        check_patch_images(x, self.patch_size, self.name)
        return self.run_with_hooks_active(model, x)

    def remove(self) -> None:
        self._handle.remove()
