"""Hugging Face ViT-like image classifiers: drop patch tokens after the embeddings.

``ViTForImageClassification``, ``DeiTForImageClassification`` (and ``...WithTeacher``),
``Dinov2ForImageClassification``, ``Dinov2WithRegistersForImageClassification`` and
``ViTMSNForImageClassification`` embed an image as ``[prefix tokens..., patch tokens]`` with
the position embedding already added (prefix: the class token, DeiT's distillation token,
DINOv2's register tokens). A hook on the embeddings keeps every prefix token and
``num_keep(N, ratio)`` patch tokens per sample; the encoder and the head (class token, or class
token and mean of the patch tokens) run on the shorter sequence, so the sub pass costs about
``1 - ratio`` of the main pass, as with the timm ``vit`` adapter.

Other Hugging Face vision models (BEiT's relative position bias, Swin's windows, CNNs) keep the
full grid and get the ``pixels`` adapter.
"""

from __future__ import annotations

import torch
from torch import nn

from ..masking import keep_patch_tokens
from .registry import MaskAdapter, check_patch_images, register_adapter

# base model class -> its number of prefix tokens, from its config
PREFIX_TOKENS = {
    "ViTModel": lambda config: 1,
    "ViTMSNModel": lambda config: 1,
    "DeiTModel": lambda config: 2,
    "Dinov2Model": lambda config: 1,
    "Dinov2WithRegistersModel": lambda config: 1 + config.num_register_tokens,
}


def _base(model: nn.Module) -> nn.Module | None:
    base = getattr(model, "base_model", None)
    if not type(model).__module__.startswith("transformers.") or type(base).__name__ not in PREFIX_TOKENS:
        return None
    return base


@register_adapter(
    "hf_vit", priority=30, description="Hugging Face ViT / DeiT / DINOv2 / ViT-MSN classifiers: drop patch tokens"
)
class HFTokenDropAdapter(MaskAdapter):
    """Drops a random ``ratio`` of patch tokens per sample after the embeddings, keeps all prefix tokens."""

    default_unit = None

    def __init__(self, model: nn.Module, ratio: float, unit: int | None = None):
        if unit is not None:
            raise ValueError("the hf_vit adapter drops patch tokens: unit (a mask block size in pixels) does not apply")
        super().__init__(model, ratio, unit)
        base = _base(model)
        self.num_prefix_tokens = PREFIX_TOKENS[type(base).__name__](base.config)
        size = base.config.patch_size
        self.patch_size = (size, size) if isinstance(size, int) else tuple(size)
        self._handle = base.embeddings.register_forward_hook(self._drop_hook)

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return _base(model) is not None

    def _drop_hook(self, module: nn.Module, args: tuple, output: torch.Tensor):
        if not self._active:
            return None
        return keep_patch_tokens(output, self.num_prefix_tokens, self.ratio)[0]

    def forward(self, model: nn.Module, *args, **kwargs):
        x = kwargs.get("pixel_values", args[0] if args else None)
        check_patch_images(x, self.patch_size, self.name)
        return self.run_with_hooks_active(model, *args, **kwargs)

    def remove(self) -> None:
        self._handle.remove()

    def extra_repr(self) -> str:
        return f"ratio={self.ratio}, prefix_tokens={self.num_prefix_tokens}"
