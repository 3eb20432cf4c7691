"""ConvViT (ConvMAE's hybrid, DMJD's ConViT): masked convolutions, then the transformer on the kept tokens.

A hook on the model's ``token_select`` picks ``num_keep(N, ratio)`` of the N stage-3 tokens (16-pixel
patches) per sample; the model zeroes the other tokens' positions before each convolution block's
depthwise convolution and runs its transformer blocks on the kept tokens only, so the sub pass costs
less and the kept tokens carry nothing of the masked pixels.
"""

from __future__ import annotations

import torch
from torch import nn

from ..masking import num_keep, random_keep_indices
from ..models.convvit import ConvViT
from .registry import MaskAdapter, check_patch_images, register_adapter


@register_adapter("convvit", priority=30, description="masksub's ConvViT (convvit_*): masked convolution + kept tokens")
class ConvViTAdapter(MaskAdapter):
    """Keeps a random ``ratio`` of the stage-3 tokens per sample out of the convolutions and the transformer."""

    default_unit = None  # single patch tokens
    backbone = True  # also inside a model of the user's (a backbone under their head)

    def __init__(self, model: nn.Module, ratio: float, unit: int | None = None):
        super().__init__(model, ratio, unit)
        self.patch_size = (model.patch_size,) * 2
        self._handle = model.token_select.register_forward_hook(self._select_hook)

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return isinstance(model, ConvViT)

    def _select_hook(self, module: nn.Module, args: tuple, output) -> torch.Tensor | None:
        if not self._active:
            return None
        images = args[0]  # (B, C, H, W)
        n = (images.shape[-2] // self.patch_size[0]) * (images.shape[-1] // self.patch_size[1])
        return random_keep_indices(images.shape[0], n, num_keep(n, self.ratio), images.device)  # (B, K)

    def forward(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        check_patch_images(x, self.patch_size, self.name)
        return self.run_with_hooks_active(model, x)

    def remove(self) -> None:
        self._handle.remove()
