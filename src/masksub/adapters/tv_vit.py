"""torchvision's ViT (``torchvision.models.vit_b_16`` and kin): drop patch tokens before the encoder's blocks.

torchvision's ``VisionTransformer`` embeds the image as ``[class token, patch tokens]``, and its encoder adds
the position embedding and dropout before running its blocks (``encoder.layers``) on any length. A hook on
the blocks' input keeps the class token and ``num_keep(N, ratio)`` patch tokens per sample; the blocks, the
final norm and the head (which reads the class token) run on the shorter sequence, so the sub pass costs
about ``1 - ratio`` of the main pass, as with timm's ViTs.
"""

from __future__ import annotations

import torch
from torch import nn

from ..masking import keep_patch_tokens
from .registry import MaskAdapter, check_patch_images, register_adapter


@register_adapter("tv_vit", priority=30, description="torchvision VisionTransformer (vit_b_16...): drop patch tokens")
class TorchvisionTokenDropAdapter(MaskAdapter):
    """Drops a random ``ratio`` of patch tokens per sample at the encoder blocks' input, keeps the class token."""

    backbone = True  # also inside a model of the user's (a backbone under their head)

    default_unit = None  # single patch tokens
    num_prefix_tokens = 1  # the class token

    def __init__(self, model: nn.Module, ratio: float, unit: int | None = None):
        super().__init__(model, ratio, unit)
        self._model_ref = [model]  # a list keeps the model from being registered as a submodule
        self._handle = model.encoder.layers.register_forward_pre_hook(self._drop_hook)

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        kind = type(model)
        return kind.__module__ == "torchvision.models.vision_transformer" and kind.__name__ == "VisionTransformer"

    @property
    def patch_size(self) -> tuple[int, int]:
        size = self._model_ref[0].patch_size
        return size, size

    def _drop_hook(self, module: nn.Module, args: tuple):
        if not self._active:
            return None
        return (keep_patch_tokens(args[0], self.num_prefix_tokens, self.ratio)[0],)

    def forward(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        check_patch_images(x, self.patch_size, self.name)  # the model itself checks the exact image size
        return self.run_with_hooks_active(model, x)

    def remove(self) -> None:
        self._handle.remove()
