"""ViT-like token models: drop patch tokens after the position embedding.

timm's ``VisionTransformer`` (DeiT, DeiT-III, CLIP/SigLIP ViTs, register tokens,
token/avg/map pooling, distilled DeiT) and ``Eva`` (EVA-02 and the RoPE ViTs)
build ``[prefix tokens..., patch tokens]`` in ``_pos_embed`` and then call
``patch_drop``. A hook on that call keeps every prefix token and
``num_keep(N, ratio)`` patch tokens per sample; the model's own blocks, norm and
head then run on the shorter sequence, so the sub pass really costs less.

Families whose blocks need the full token grid (window attention, convolutions
over the grid: SAM, XCiT, Swin...) are not instances of these classes and fall
through to the mask-token adapter; BEiT and ``vit_relpos`` (relative position
bias) have their own (``relpos``).
"""

from __future__ import annotations

import torch
from timm.layers import HybridEmbed, to_2tuple
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..masking import keep_patch_tokens
from .registry import MaskAdapter, check_patch_images, register_adapter


class _NoPatchDrop(nn.Module):
    """Stands in for Eva's ``patch_drop = None``: returns ``(x, None)`` as timm expects."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return x, None


@register_adapter("vit", priority=30, description="timm VisionTransformer / DeiT / CLIP ViT / Eva: drop patch tokens")
class TokenDropAdapter(MaskAdapter):
    """Drops a random ``ratio`` of patch tokens per sample, keeps all prefix tokens."""

    backbone = True  # also inside a model of the user's (a backbone under their head)

    default_unit = None  # single patch tokens

    def __init__(self, model: nn.Module, ratio: float, unit: int | None = None):
        super().__init__(model, ratio, unit)
        self.num_prefix_tokens = model.num_prefix_tokens
        self.returns_indices = isinstance(model, Eva)  # Eva gathers its RoPE with the indices
        self._keep: torch.Tensor | None = None  # given indices (DMJD views) instead of random ones
        self._model_ref = [model]  # a list keeps the model from being registered as a submodule
        self._inserted = model.patch_drop is None
        if self._inserted:
            model.patch_drop = _NoPatchDrop()
        self._handle = model.patch_drop.register_forward_hook(self._drop_hook)

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return isinstance(model, (VisionTransformer, Eva))

    @property
    def patch_size(self) -> tuple[int, int]:
        """The pixels one patch token covers, read from the model on each use (timm's ``set_input_size(
        patch_size=...)`` changes it in place). A hybrid ViT's patches are taken on its CNN backbone's feature
        map: they cover the backbone's stride times their own size (32x32 pixels for ``vit_small_r26_s32``)."""
        embed = self._model_ref[0].patch_embed
        ratio = getattr(embed, "feat_ratio", None)
        return tuple(to_2tuple(ratio(as_scalar=False) if callable(ratio) else embed.patch_size))

    def _drop_hook(self, module: nn.Module, args: tuple, output):
        if not self._active:
            return None
        # Drop from the full sequence: a model's own patch dropout is replaced in the sub pass.
        x, keep = keep_patch_tokens(args[0], self.num_prefix_tokens, self.ratio, self._keep)  # (B, P + K, D)
        return (x, keep) if self.returns_indices else x

    def forward(self, model: nn.Module, x: torch.Tensor, **kwargs) -> torch.Tensor:
        if kwargs.get("attn_mask") is not None:
            raise ValueError(
                "the vit adapter drops patch tokens, and a given attn_mask covers all of them: leave attn_mask "
                "out of the sub pass, or use sub='dropout' / 'droppath'"
            )
        embed = self._model_ref[0].patch_embed
        # sizes the model takes as they are: it pads the image, or its CNN backbone (a hybrid) takes any size
        any_size = getattr(embed, "dynamic_img_pad", False) or isinstance(embed, HybridEmbed)
        check_patch_images(x, self.patch_size, self.name, any_size)
        return self.run_with_hooks_active(model, x, **kwargs)  # is_causal, attn_mask=None: as given

    def run_kept(self, fn, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """``fn(x)`` (the model or its ``forward_features``) keeping exactly the patch tokens ``keep`` (B, K).

        The output's patch tokens follow ``keep``'s order: row ``i`` is patch ``keep[:, i]``.
        """
        self._keep = keep
        try:
            return self.run_with_hooks_active(fn, x)
        finally:
            self._keep = None

    def remove(self) -> None:
        self._handle.remove()
        if self._inserted:
            self._model_ref[0].patch_drop = None
