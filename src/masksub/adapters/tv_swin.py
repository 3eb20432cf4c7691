"""torchvision's Swin and Swin V2 (``swin_t`` ... ``swin_v2_b``) for the ``swin_drop`` adapter: its blocks, window
attention and patch merging on the kept tokens.

torchvision's model is ``features`` (the patch embedding, then each stage's blocks and a patch merging), a norm, a
mean pool and the head. Its window attention pads the grid to whole windows, shifts only along a side longer than a
window, and then rolls the padded grid; Swin V2's has cosine attention and a continuous position bias and leaves k
without a bias, and its blocks and mergings normalize after, not before.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.swin_transformer import (
    PatchMerging,
    PatchMergingV2,
    ShiftedWindowAttentionV2,
    SwinTransformer,
    SwinTransformerBlock,
    SwinTransformerBlockV2,
)

from .windows import cosine_scores, window_attention

MERGINGS = (PatchMerging, PatchMergingV2)


def _shift_mask(size: tuple[int, int], window: tuple[int, int], shift: tuple[int, int], like: torch.Tensor):
    """(nW, N, N): -100 between tokens of different shifted regions, on the padded grid ``size``, as torchvision's
    attention builds it (its slices also where one side does not shift)."""
    (height, width), (wh, ww), (sh, sw) = size, window, shift
    labels = like.new_zeros(height, width)
    for i, rows in enumerate(((0, -wh), (-wh, -sh), (-sh, None))):
        for j, cols in enumerate(((0, -ww), (-ww, -sw), (-sw, None))):
            labels[rows[0] : rows[1], cols[0] : cols[1]] = 3 * i + j
    labels = labels.view(height // wh, wh, width // ww, ww).permute(0, 2, 1, 3).reshape(-1, wh * ww)
    return (labels.unsqueeze(1) != labels.unsqueeze(2)).to(like.dtype) * -100.0


def _attend(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """torchvision's attention with ``mask`` holding the position bias: scaled dot products, or V2's cosine
    similarities times its learned scale."""
    if isinstance(attn, ShiftedWindowAttentionV2):
        scores = cosine_scores(q, k, attn.logit_scale)
    else:
        scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    return F.dropout(F.softmax(scores + mask, dim=-1), p=attn.attention_dropout, training=attn.training) @ v


def _window_attention(attn: nn.Module, x: torch.Tensor, keep: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``ShiftedWindowAttention(V2)`` on the kept tokens ``x`` (B, K, C) at ``keep`` of a ``grid``."""
    window = tuple(attn.window_size)
    size = tuple(-(-g // w) * w for g, w in zip(grid, window))  # padded to whole windows
    shift = tuple(0 if w >= s else sh for w, s, sh in zip(window, size, attn.shift_size))
    bias = attn.qkv.bias
    if bias is not None and isinstance(attn, ShiftedWindowAttentionV2):  # V2 uses no bias for k
        third = bias.numel() // 3
        bias = torch.cat((bias[:third], torch.zeros_like(bias[third : 2 * third]), bias[2 * third :]))
    out = window_attention(
        x,
        keep,
        grid,
        window,
        shift,
        qkv=partial(F.linear, weight=attn.qkv.weight, bias=bias),
        heads=attn.num_heads,
        bias=attn.get_relative_position_bias(),
        shifted=_shift_mask(size, window, shift, x) if sum(shift) > 0 else None,
        attend=partial(_attend, attn),
        pad_first=True,
    )
    return F.dropout(attn.proj(out), p=attn.dropout, training=attn.training)


def block(module: nn.Module, method, x: torch.Tensor, keep=None, grid=None) -> torch.Tensor:
    """A block on the kept tokens ``x`` (B, K, C) at ``keep`` of the ``grid`` (pre-norm, or V2's residual
    post-norm). Without ``keep``, the block's own forward."""
    if keep is None:
        return method(module, x)
    if isinstance(module, SwinTransformerBlockV2):
        x = x + module.stochastic_depth(module.norm1(_window_attention(module.attn, x, keep, grid)))
        return x + module.stochastic_depth(module.norm2(module.mlp(x)))
    x = x + module.stochastic_depth(_window_attention(module.attn, module.norm1(x), keep, grid))
    return x + module.stochastic_depth(module.mlp(module.norm2(x)))


def stage(module: nn.Module, method, x: torch.Tensor, keep=None, to=None, grid=None) -> torch.Tensor:
    """A stage's blocks on the kept tokens ``x`` (B, K, C) at ``keep`` of the ``grid``, each through its own call.
    Without ``keep``, the stage's own forward."""
    if keep is None:
        return method(module, x)
    for child in module:
        x = child(x, keep=keep, grid=grid)
    return x


def is_torchvision_swin(model: nn.Module) -> bool:
    return isinstance(model, SwinTransformer) and all(
        isinstance(b, SwinTransformerBlock) for stage in stages(model) for b in stage
    )


def stages(model: nn.Module) -> list[nn.Module]:
    """The stages' block containers in ``features`` (every part after the patch embedding that is no merging)."""
    return [p for p in list(model.features)[1:] if not isinstance(p, MERGINGS)]


def patch_size(model: nn.Module) -> tuple[int, int]:
    return tuple(model.features[0][0].stride)
