"""Hugging Face ViT-like image classifiers: drop patch tokens after the embeddings.

``ViTForImageClassification``, ``DeiTForImageClassification`` (and ``...WithTeacher``),
``Dinov2ForImageClassification``, ``Dinov2WithRegistersForImageClassification``,
``ViTMSNForImageClassification``, ``IJepaForImageClassification`` and the vision towers of
``CLIPForImageClassification``, ``MetaClip2ForImageClassification`` and
``SiglipForImageClassification`` embed an image as ``[prefix tokens..., patch tokens]`` with the
position embedding already added (prefix: the class token, DeiT's distillation token, DINOv2's
register tokens; none for SigLIP and I-JEPA). A hook on the embeddings keeps every prefix token
and ``num_keep(N, ratio)`` patch tokens per sample; the encoder and the head (class token, mean of
the patch tokens, or attention pooling) run on the shorter sequence, so the sub pass costs about
``1 - ratio`` of the main pass, as with the timm ``vit`` adapter.

AIMv2's vision tower (``Aimv2VisionModel``, under a head of the user's) embeds patches with positions and no prefix,
and pools them by attention, as SigLIP's does. DINOv3's ViT (``DINOv3ViTModel``, also under a head of the user's:
it has no classifier of its own) adds no position embedding to its tokens: its layers rotate the patch tokens'
queries and keys by the patch grid's RoPE angles, which a second hook gathers at the kept patches (its class and
register tokens are not rotated).

BEiT and Data2VecVision drop tokens with their relative position bias gathered (``hf_relpos``). Other
Hugging Face vision models keep the full grid: Swin's windows get a mask token (``hf_masktoken``), CNNs the
``pixels`` adapter.
"""

from __future__ import annotations

import torch
from torch import nn

from ..masking import keep_patch_tokens
from .registry import MaskAdapter, check_patch_images, register_adapter

# Embeddings whose output is [prefix..., patches] + positions, feeding encoders that take any length.
EMBEDDINGS = {
    "ViTEmbeddings",
    "ViTMSNEmbeddings",
    "DeiTEmbeddings",
    "Dinov2Embeddings",
    "Dinov2WithRegistersEmbeddings",
    "IJepaEmbeddings",
    "CLIPVisionEmbeddings",
    "MetaClip2VisionEmbeddings",
    "SiglipVisionEmbeddings",
    "DINOv3ViTEmbeddings",
    "Aimv2VisionEmbeddings",
}
PREFIX_TOKENS = ("cls_token", "class_embedding", "distillation_token")  # one token each, where present
# Their base models, as a backbone under a head of the user's (which pools: the class token, pooler_output, a mean)
BACKBONES = {
    "ViTModel",
    "ViTMSNModel",
    "DeiTModel",
    "Dinov2Model",
    "Dinov2WithRegistersModel",
    "IJepaModel",
    "CLIPVisionModel",
    "MetaClip2VisionModel",
    "SiglipVisionModel",
    "DINOv3ViTModel",
    "Aimv2VisionModel",
}


def is_hf_image_classifier(model: nn.Module) -> bool:
    """A transformers image classifier: a head that reads the token grid back (masked image modeling) needs every
    token, a classifier's head pools."""
    kind = type(model)
    return kind.__module__.startswith("transformers.") and "ForImageClassification" in kind.__name__


def _prefix_tokens(embeddings: nn.Module) -> int:
    registers = getattr(embeddings, "register_tokens", None)
    return sum(hasattr(embeddings, name) for name in PREFIX_TOKENS) + (0 if registers is None else registers.shape[1])


@register_adapter(
    "hf_vit", priority=30, description="Hugging Face ViT / DeiT / DINOv2 / CLIP / SigLIP classifiers: drop patch tokens"
)
class HFTokenDropAdapter(MaskAdapter):
    """Drops a random ``ratio`` of patch tokens per sample after the embeddings, keeps all prefix tokens."""

    default_unit = None  # single patch tokens
    backbone = True  # also a base model (ViTModel, Dinov2Model, ...) inside a model of the user's
    embeddings_classes, backbone_classes = EMBEDDINGS, BACKBONES  # class names, which subclasses replace

    def __init__(self, model: nn.Module, ratio: float, unit: int | None = None):
        super().__init__(model, ratio, unit)
        embeddings = self._embeddings(model, backbone=True)
        self.num_prefix_tokens = _prefix_tokens(embeddings)
        conv = next(m for m in embeddings.modules() if isinstance(m, nn.Conv2d))  # the patch projection
        self.patch_size = tuple(conv.stride)
        self._keep: torch.Tensor | None = None  # the patches the embeddings' hook kept, for the RoPE angles
        self._handles = [embeddings.register_forward_hook(self._drop_hook)]
        rope = next((m for m in model.modules() if type(m).__name__ == "DINOv3ViTRopePositionEmbedding"), None)
        if rope is not None:  # DINOv3: each layer rotates the patch tokens by the grid's angles (N, d)
            self._handles.append(rope.register_forward_hook(self._rope_hook))

    @classmethod
    def _embeddings(cls, model: nn.Module, backbone: bool = False) -> nn.Module | None:
        """The embeddings module of a classifier of this family (or, with ``backbone``, of its base model)."""
        kind = type(model)
        backbone = backbone and kind.__module__.startswith("transformers.") and kind.__name__ in cls.backbone_classes
        if not (is_hf_image_classifier(model) or backbone):
            return None
        return next((m for m in model.modules() if type(m).__name__ in cls.embeddings_classes), None)

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return cls._embeddings(model) is not None

    @classmethod
    def supports_backbone(cls, module: nn.Module) -> bool:
        return cls._embeddings(module, backbone=True) is not None

    def _drop_hook(self, module: nn.Module, args: tuple, output: torch.Tensor):
        if not self._active:
            return None
        tokens, self._keep = keep_patch_tokens(output, self.num_prefix_tokens, self.ratio)
        return tokens

    def _rope_hook(self, module: nn.Module, args: tuple, output: tuple[torch.Tensor, torch.Tensor]):
        """The cosines and sines (N, d) of the kept patches: (B, 1, K, d), one row per sample, broadcast over the
        heads."""
        if not self._active:
            return None
        keep, self._keep = self._keep, None
        return tuple(t[keep].unsqueeze(1) for t in output)

    def forward(self, model: nn.Module, *args, **kwargs):
        x = kwargs.get("pixel_values", args[0] if args else None)
        check_patch_images(x, self.patch_size, self.name)
        return self.run_with_hooks_active(model, *args, **kwargs)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, prefix_tokens={self.num_prefix_tokens}"
