"""Hugging Face SigLIP 2 (``Siglip2ForImageClassification``, NaFlex): drop patch tokens after the embeddings.

SigLIP 2 takes each image as a sequence of patches, padded to one length for the batch, as its
image processor makes them: ``pixel_values`` (B, N, C*P*P), ``pixel_attention_mask`` (B, N), 1
on the image's own patches, and ``spatial_shapes`` (B, 2), their grid. The embeddings resize the
position embedding to each image's grid and add it by sequence index; the encoder, the
attention-pooling head and the classifier's mean read the attention mask. So a hook on the
embeddings keeps, per sample, ``num_keep(n_i, ratio)`` of its ``n_i`` patches (each with its
position already added), padding to ``num_keep(N, ratio)`` as the batch requires, and the adapter
gives the model the kept tokens' attention mask: everything after the embeddings runs on the kept
tokens, and the sub pass costs about ``1 - ratio`` of the main pass.
"""

from __future__ import annotations

import torch
from torch import nn

from ..masking import gather_tokens, valid_keep_indices
from .hf_vit import is_hf_image_classifier
from .registry import MaskAdapter, register_adapter

INPUTS = ("pixel_values", "pixel_attention_mask", "spatial_shapes")  # the classifier's positional order


def _embeddings(model: nn.Module) -> nn.Module | None:
    if not is_hf_image_classifier(model):
        return None
    return next((m for m in model.modules() if type(m).__name__ == "Siglip2VisionEmbeddings"), None)


@register_adapter("hf_siglip2", priority=30, description="Hugging Face SigLIP 2 classifiers: drop patch tokens")
class HFSiglip2Adapter(MaskAdapter):
    """Drops a random ``ratio`` of each sample's own patches; the attention mask follows the kept tokens."""

    default_unit = None  # single patch tokens

    def __init__(self, model: nn.Module, ratio: float, unit: int | None = None):
        super().__init__(model, ratio, unit)
        embeddings = _embeddings(model)
        self.patch_size = (embeddings.patch_size, embeddings.patch_size)
        self._keep: torch.Tensor | None = None  # (B, K): the positions the running sub pass keeps
        self._handle = embeddings.register_forward_hook(self._drop_hook)

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return _embeddings(model) is not None

    def _drop_hook(self, module: nn.Module, args: tuple, output: torch.Tensor):
        if not self._active:
            return None
        return gather_tokens(output, self._keep)

    def forward(self, model: nn.Module, *args, **kwargs):
        if len(args) > len(INPUTS):
            raise TypeError(f"hf_siglip2 adapter: pass at most {', '.join(INPUTS)} by position, the rest by name")
        kwargs = {**dict(zip(INPUTS, args)), **kwargs}
        pixels, mask = kwargs.get("pixel_values"), kwargs.get("pixel_attention_mask")
        if not isinstance(pixels, torch.Tensor) or pixels.ndim != 3:
            raise ValueError(
                "hf_siglip2 adapter: SigLIP 2 takes patches, pixel_values (B, N, C*P*P) with pixel_attention_mask and "
                f"spatial_shapes, as its image processor (Siglip2ImageProcessor) gives them; got "
                f"{tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__}"
            )
        valid = torch.ones(pixels.shape[:2], dtype=torch.bool, device=pixels.device) if mask is None else mask.bool()
        self._keep = valid_keep_indices(valid, self.ratio)
        if mask is not None:
            kwargs["pixel_attention_mask"] = mask.gather(1, self._keep)
        try:
            return self.run_with_hooks_active(model, **kwargs)
        finally:
            self._keep = None

    def remove(self) -> None:
        self._handle.remove()
