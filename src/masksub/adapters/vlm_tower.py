"""timm's Qwen3 and DeepSeek vision towers (``qwen3_vit_*``, ``deepseek_vit_*``): drop patch tokens.

Both towers embed the patches as a grid, add each token's position (Qwen3: a learned table resampled to
the grid; both: 2D RoPE), and then run plain pre-norm blocks over the tokens; the classifiers pool by a
mean. Only the last step of the encoder's ``forward_features`` (the tokens reshaped back to the full
(B, H, W, C) grid) is tied to the grid. So in the sub pass the encoder's ``forward_features`` keeps
``num_keep(N, ratio)`` tokens per sample after the position embedding, gives the blocks the RoPE rows of
the kept tokens (a (B, 1, K, D) table), checkpoints the blocks where the model does, applies the final
norm where there is one, and returns the kept tokens as a (B, 1, K, C) grid: the mean pools then average
the kept tokens. The sub pass costs about ``1 - ratio`` of the main pass, with static shapes and no host
synchronization.

Qwen3's VLM projector (``merge``: the encoder's default, the classifiers' ``encoder_pool='merge'``)
concatenates each ``k x k`` block of tokens (``merge_size``, 2) into one. There the sub pass keeps whole
blocks, ``num_keep(U, ratio)`` of the ``U`` blocks per sample, and hands the projector the kept blocks side
by side (a (B, k, M * k, C) grid), so each kept block merges as it does in the main pass.

Taken: the classifiers (``global_pool='avg'``, ``encoder_pool`` ``''`` or Qwen3's ``'merge'``) and the
encoders built with ``global_pool='avg'`` or Qwen3's ``'merge'``, also as a backbone under a head of the
user's. DeepSeek's projector (``align``) pads the grid to a multiple of its 3 x 3 blocks before it merges
them, and a pool of ``''`` returns one output per token: such models keep the pixel adapter.
"""

from __future__ import annotations

import contextlib
import importlib
from functools import partial

import torch
from timm.layers import apply_keep_indices_nlc, to_2tuple
from timm.models._manipulate import checkpoint
from torch import nn

from ..masking import gather_tokens, num_keep, num_masked, random_keep_indices, units_to_tokens
from .registry import MaskAdapter, check_patch_images, register_adapter


def _tower_classes(suffix: str) -> tuple[type, ...]:
    """timm's ``Qwen3Vit{suffix}`` and ``DeepseekVit{suffix}``, those this timm has."""
    found = []
    for module, prefix in (("qwen3_vit", "Qwen3Vit"), ("deepseek_vit", "DeepseekVit")):
        with contextlib.suppress(ImportError, AttributeError):  # a timm without this tower
            found.append(getattr(importlib.import_module(f"timm.models.{module}"), prefix + suffix))
    return tuple(found)


CLASSIFIERS, ENCODERS = _tower_classes("Classifier"), _tower_classes("Encoder")


def _encoder(model: nn.Module) -> nn.Module:
    return model.encoder if isinstance(model, CLASSIFIERS) else model


def _pools(model: nn.Module) -> list[tuple[str, str, tuple[str, ...]]]:
    """(setting, value, the values the sub pass follows) for each pool of ``model`` set to another value."""
    merge = ("merge",) if hasattr(_encoder(model), "merge_size") else ()  # Qwen3's projector merges whole blocks
    pools = [("global_pool", model.global_pool, ("avg",) if isinstance(model, CLASSIFIERS) else ("avg", *merge))]
    if isinstance(model, CLASSIFIERS):
        pools.insert(0, ("encoder_pool", model.encoder_pool, ("", *merge)))
    return [pool for pool in pools if pool[1] not in pool[2]]


@register_adapter("vlm_tower", priority=30, description="timm Qwen3 / DeepSeek vision towers: drop patch tokens")
class VLMTowerAdapter(MaskAdapter):
    """Drops a random ``ratio`` of the patch tokens (or of Qwen3's merge blocks) per sample, each kept token with its
    position and RoPE rows."""

    default_unit = None  # single patch tokens
    backbone = True  # also inside a model of the user's (a backbone under their head)

    def __init__(self, model: nn.Module, ratio: float, unit: int | None = None):
        super().__init__(model, ratio, unit)
        encoder = _encoder(model)
        self._encoder_ref = [encoder]  # a list keeps the model from being registered as a submodule
        # the class's function, not the bound method: a pickled model then unpickles to the same override
        encoder.forward_features = partial(self._features, encoder, type(encoder).forward_features)

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return isinstance(model, CLASSIFIERS + ENCODERS) and not _pools(model)

    @classmethod
    def why_not(cls, model: nn.Module) -> str:
        if not isinstance(model, CLASSIFIERS + ENCODERS) or not _pools(model):
            return ""
        key, value, needed = _pools(model)[0]
        what = "returns one output per patch token" if value == "" else "pads the grid before it merges tokens"
        return (
            f": built with {key}={value!r}, it {what}, and the sub pass keeps fewer tokens; build it with "
            f"{key}={needed[0]!r}, or use adapter='pixels' (the default for it) or sub='dropout' / sub='droppath'"
        )

    @property
    def patch_size(self) -> tuple[int, int]:
        """Read from the model on each use."""
        return tuple(to_2tuple(self._encoder_ref[0].patch_embed.patch_size))

    @property
    def merge_size(self) -> int | None:
        """The side of the token blocks Qwen3's projector merges, which the sub pass keeps whole; None without one."""
        merger = getattr(self._encoder_ref[0], "merger", None)
        return None if merger is None else merger.merge_size

    def masked_unit(self) -> str:
        if self.merge_size is None:
            return super().masked_unit()
        return "{}x{}-pixel merge blocks".format(*(p * self.merge_size for p in self.patch_size))

    def _keep(self, grid: tuple[int, int], batch: int, device: torch.device) -> torch.Tensor:
        """The patch tokens (B, K) the sub pass keeps: single tokens, or the tokens of whole merge blocks, each
        block's tokens together in row-major order."""
        height, width = grid
        k = self.merge_size
        if k is None:
            return random_keep_indices(batch, height * width, num_keep(height * width, self.ratio), device)
        blocks = (height // k) * (width // k)
        if num_masked(blocks, self.ratio) == 0:
            raise ValueError(
                f"{self.name} adapter: the image holds {blocks} of the projector's {self.masked_unit()}, and ratio "
                f"{self.ratio} drops none (a sample keeps at least one), so the sub branch would equal the main "
                "branch: raise the ratio or use larger images"
            )
        return units_to_tokens(random_keep_indices(batch, blocks, num_keep(blocks, self.ratio), device), width // k, k)

    def _features(self, encoder: nn.Module, method, x: torch.Tensor) -> torch.Tensor:
        if not self._active:
            return method(encoder, x)
        x = encoder.patch_embed(x)  # (B, H, W, C)
        keep = self._keep(x.shape[1:3], x.shape[0], x.device)
        x, rope = encoder._pos_embed(x)  # (B, N, C) with their positions, (N, D)
        x = gather_tokens(x, keep)
        rope = apply_keep_indices_nlc(x, rope, keep).unsqueeze(1)  # (B, 1, K, D): broadcast over the heads
        for block in encoder.blocks:
            if encoder.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(block, x, rope=rope)
            else:
                x = block(x, rope=rope)
        norm = getattr(encoder, "norm", None)  # DeepSeek's encoder ends in a norm, Qwen3's does not
        x = x if norm is None else norm(x)
        k = self.merge_size
        if k is None:
            return x.unsqueeze(1)  # (B, 1, K, C): the kept tokens as a 1 x K grid
        batch, length, width = x.shape  # blocks side by side, (B, k, M * k, C): the projector merges each one
        return x.view(batch, length // (k * k), k, k, width).transpose(1, 2).reshape(batch, k, -1, width)

    def forward(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        pads = getattr(self._encoder_ref[0].patch_embed, "dynamic_img_pad", False)
        k = self.merge_size or 1  # Qwen3's projector needs whole blocks
        check_patch_images(x, tuple(p * k for p in self.patch_size), self.name, pads)
        return self.run_with_hooks_active(model, x)

    def remove(self) -> None:
        encoder = self._encoder_ref[0]
        if "forward_features" in vars(encoder):
            del encoder.forward_features  # the class's method again
