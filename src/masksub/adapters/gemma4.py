"""timm's Gemma 4 vision tower (``Gemma4VitClassifier``, ``Gemma4VitEncoder``): drop patch tokens.

Gemma 4's tower takes any set of patches: each token carries its own (x, y) position, into a
learned 2D table and into 2D RoPE, and its blocks attend over whatever tokens they get (its
NaFlex-style input, patches with coordinates, is built for that). The classifier pools by a mean
over the tokens. So the sub pass keeps ``num_keep(N, ratio)`` patch tokens per sample: a hook
on the patch embedding gathers the kept tokens with their positions (and padding flags), and the
blocks and the pool run on them; the sub pass costs about ``1 - ratio`` of the main pass, with
static shapes and no host synchronization for image batches.

Padded patch batches (a dict with ``patch_valid``, as timm's NaFlex loader gives them) keep
``num_keep(n_i, ratio)`` of each sample's ``n_i`` valid patches. The classifier's head averages
with the batch's ``patch_valid``, so there the adapter hands the model the kept patches,
coordinates and flags themselves, the input the model's own path takes.

The native VLM pooler (``global_pool='soft'``) bins tokens into cells of the full grid, and a
model returning one output per token (``global_pool=''``) would return fewer: both are refused.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from timm.layers import to_2tuple
from torch import nn

from ..masking import gather_tokens, keep_patch_tokens, keep_valid_patch_tokens, valid_keep_indices
from .registry import MaskAdapter, check_patch_images, register_adapter

try:
    from timm.models.gemma4_vit import Gemma4VitClassifier, Gemma4VitEncoder
except ImportError:  # a timm without Gemma 4
    Gemma4VitClassifier = Gemma4VitEncoder = None


def _gather(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Rows ``keep`` (B, K) of ``x`` (B, N, ...) -> (B, K, ...)."""
    return gather_tokens(x.flatten(2) if x.ndim > 2 else x.unsqueeze(-1), keep).view(*keep.shape, *x.shape[2:])


@register_adapter("gemma4", priority=30, description="timm Gemma 4 vision tower: drop patch tokens")
class Gemma4Adapter(MaskAdapter):
    """Drops a random ``ratio`` of the patch tokens per sample; each kept token keeps its own position."""

    default_unit = None  # single patch tokens
    backbone = True  # also inside a model of the user's (a backbone under their head)

    def __init__(self, model: nn.Module, ratio: float, unit: int | None = None):
        super().__init__(model, ratio, unit)
        self._model_ref = [model]  # a list keeps the model from being registered as a submodule
        self.classifier = isinstance(model, Gemma4VitClassifier)
        encoder = model.encoder if self.classifier else model
        pools = (
            [("encoder_pool", model.encoder_pool, ("", "none")), ("global_pool", model.global_pool, ("avg",))]
            if self.classifier
            else [("global_pool", model.global_pool, ("avg",))]
        )
        for key, value, allowed in pools:
            if value not in allowed:
                raise ValueError(
                    f"gemma4 adapter: {type(model).__name__} built with {key}={value!r} "
                    + (
                        "bins the tokens into cells of the full grid (the VLM soft-token pool)"
                        if value == "soft"
                        else "returns one output per patch token, and the sub pass keeps fewer"
                    )
                    + f", so it cannot drop tokens: build it with {key}={allowed[0]!r}, or use sub='dropout' or "
                    "sub='droppath'"
                )
        self._embed_ref = [encoder.patch_embed]
        self._handle = encoder.patch_embed.register_forward_hook(self._drop_hook)

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return Gemma4VitClassifier is not None and isinstance(model, (Gemma4VitClassifier, Gemma4VitEncoder))

    @property
    def patch_size(self) -> tuple[int, int]:
        return tuple(to_2tuple(self._embed_ref[0].patch_size))

    def _drop_hook(self, module: nn.Module, args: tuple, output: tuple):
        if not self._active:
            return None
        x, position_ids, padding = output  # (B, N, D), (B, N, 2), (B, N) True on padding, or None
        if padding is None:
            x, keep = keep_patch_tokens(x, 0, self.ratio)
        else:
            x, keep = keep_valid_patch_tokens(x, 0, self.ratio, ~padding)
            padding = padding.gather(1, keep)
        return x, _gather(position_ids, keep), padding

    def forward(self, model: nn.Module, x, patch_coord: torch.Tensor | None = None, patch_valid=None) -> torch.Tensor:
        patches = x.get("patches") if isinstance(x, Mapping) else x
        if isinstance(x, Mapping):
            patch_coord = x.get("patch_coord", patch_coord)
            patch_valid = x.get("patch_valid", patch_valid)
        if patches.ndim == 4:  # an image batch: the hook drops the embedded tokens
            if patch_coord is not None or patch_valid is not None:
                raise ValueError(
                    "gemma4 adapter: give an image batch alone, or patches with their patch_coord and patch_valid "
                    "(as timm's NaFlex loader does), not images with coordinates"
                )
            check_patch_images(patches, self.patch_size, self.name)
            return self.run_with_hooks_active(model, patches)
        if patch_coord is None:
            raise ValueError(
                "gemma4 adapter: patches given without patch_coord; pass the batch as timm's NaFlex loader gives "
                "it (a dict with patches, patch_coord and patch_valid)"
            )
        if not self.classifier:  # the encoder pools with the flags the hook gathers
            return self.run_with_hooks_active(model, patches, patch_coord=patch_coord, patch_valid=patch_valid)
        # The classifier's head averages with the batch's own patch_valid: give it the kept patches themselves.
        valid = ~(patch_coord == -1).all(-1) if patch_valid is None else patch_valid.bool()  # the model's rule
        keep = valid_keep_indices(valid, self.ratio)
        kept = {"patches": _gather(patches, keep), "patch_coord": _gather(patch_coord, keep)}
        return model({**kept, "patch_valid": valid.gather(1, keep)})

    def remove(self) -> None:
        self._handle.remove()
