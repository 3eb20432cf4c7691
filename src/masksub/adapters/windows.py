"""Shifted-window attention and patch merging on the kept tokens of a grid: the parts of ``swin_drop`` that timm's
and torchvision's Swin share (each lays out its windows its own way: timm rolls the grid and then pads it,
torchvision pads it and then rolls it).

A sample's kept tokens ``x`` (B, K, D) sit at the places ``keep`` (B, K) of its (H, W) grid, row-major. One
scatter puts them into the model's windows, laid end to end; each window's attention reads the kept tokens of
that window only, and one gather reads them back. No roll, pad or partition copies, static shapes.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..masking import gather_tokens


def scatter_tokens(x: torch.Tensor, keep: torch.Tensor, length: int) -> torch.Tensor:
    """The kept tokens ``x`` (B, K, D) at their places ``keep`` (B, K) of a (B, length, D) sequence of zeros."""
    return x.new_zeros(x.shape[0], length, x.shape[-1]).scatter(1, keep.unsqueeze(-1).expand_as(x), x)


def cosine_scores(q: torch.Tensor, k: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """SwinV2's attention scores: cosine similarities of q and k times the learned scale (its log clamped at
    log 100)."""
    scale = torch.clamp(logit_scale.view(-1, 1, 1), max=math.log(100.0)).exp()  # per head
    return F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1) * scale


def continuous_position_bias(
    mlp: nn.Module, coords: torch.Tensor, index: torch.Tensor, window: tuple[int, int], heads: int
) -> torch.Tensor:
    """SwinV2's relative position bias (1, heads, N, N): its MLP of the log-spaced offsets ``coords``, read at the
    window's pairs ``index``, through ``16 * sigmoid``."""
    area = window[0] * window[1]
    bias = mlp(coords).view(-1, heads)[index.view(-1)].view(area, area, -1).permute(2, 0, 1)
    return 16 * torch.sigmoid(bias).unsqueeze(0)


def window_slots(
    keep: torch.Tensor, grid: tuple[int, int], window: tuple[int, int], shift: tuple[int, int], pad_first: bool
):
    """Where the model's window partition puts each kept token: its slot (B, K) in a sample's windows laid end to end
    (window-major, then row-major in the window) after the cyclic shift and the padding, and the slots (nW * N,) that
    hold padding. ``pad_first``: the grid is padded to whole windows and then rolled (torchvision), else rolled and
    then padded (timm)."""
    height, width = grid
    (wh, ww), (sh, sw) = window, shift
    down, across = -(-height // wh), -(-width // ww)  # windows along each side, the padding included
    rh, rw = (down * wh, across * ww) if pad_first else (height, width)  # what the roll wraps around
    row, col = (keep // width - sh) % rh, (keep % width - sw) % rw  # torch.roll by -shift moves r to r - sh
    slots = ((row // wh) * across + col // ww) * (wh * ww) + (row % wh) * ww + col % ww
    every = torch.arange(down * across * wh * ww, device=keep.device)
    window_of, within = every // (wh * ww), every % (wh * ww)
    row, col = (window_of // across) * wh + within // ww, (window_of % across) * ww + within % ww
    if pad_first:  # where each slot's token was before the roll
        row, col = (row + sh) % rh, (col + sw) % rw
    return slots, (row >= height) | (col >= width)


def window_attention(
    x: torch.Tensor,
    keep: torch.Tensor,
    grid: tuple[int, int],
    window: tuple[int, int],
    shift: tuple[int, int],
    *,
    qkv: Callable[[torch.Tensor], torch.Tensor],
    heads: int,
    bias: torch.Tensor,
    shifted: torch.Tensor | None,
    attend: Callable[..., torch.Tensor],
    pad_first: bool,
) -> torch.Tensor:
    """Window attention on the kept tokens ``x`` (B, K, C): each query attends to the kept tokens of its window, and
    to the window's padding, which the model fills with zero tokens. ``qkv`` maps tokens to their q, k and v (..., 3A),
    ``bias`` is the relative position bias (1, heads, N, N), ``shifted`` the shifted regions' mask (nW, N, N) or None,
    ``attend(q, k, v, mask)`` the model's attention with an additive mask (B * nW, heads, N, N). Returns (B, K, A),
    before the output projection."""
    batch = x.shape[0]
    (wh, ww), area = window, window[0] * window[1]
    slots, padded = window_slots(keep, grid, window, shift, pad_first)
    tokens = qkv(x)  # (B, K, 3A)
    windows = scatter_tokens(tokens, slots, len(padded))  # (B, nW * N, 3A)
    present = scatter_tokens(torch.ones_like(slots, dtype=tokens.dtype).unsqueeze(-1), slots, len(padded))
    if grid[0] % wh or grid[1] % ww:  # the padding's zero tokens attend and are attended to
        pad = padded.to(tokens.dtype).unsqueeze(-1)
        present = present + pad
        windows = windows + pad * qkv(x.new_zeros(x.shape[-1]))  # a zero token's q, k and v
    q, k, v = windows.view(-1, area, 3, heads, tokens.shape[-1] // (3 * heads)).permute(2, 0, 3, 1, 4).unbind(0)
    keys = present.view(batch, -1, 1, 1, area)  # (B, nW, 1, 1, N)
    # a large finite value (not -inf), also where an attention takes its softmax in float32: a window without kept
    # tokens then gives finite, unused outputs and gradients
    low = max(torch.finfo(q.dtype).min, torch.finfo(torch.float32).min) / 2
    mask = (1.0 - keys) * low + bias.to(q.dtype).unsqueeze(0)
    if shifted is not None:  # tokens of different shifted regions do not attend to each other
        mask = mask + shifted.to(q.dtype).view(1, -1, 1, area, area)
    out = attend(q, k, v, mask.flatten(0, 1)).transpose(1, 2).reshape(batch, len(padded), -1)  # (B, nW * N, A)
    return gather_tokens(out, slots)


def hf_layer_attention(
    layer: nn.Module,
    x: torch.Tensor,
    keep: torch.Tensor,
    grid: tuple[int, int],
    *,
    qkv: Callable[[torch.Tensor], torch.Tensor],
    heads: int,
    bias: torch.Tensor,
    attend: Callable[..., torch.Tensor],
    shift_mask_times: int = 1,
) -> torch.Tensor:
    """``window_attention`` as a Hugging Face Swin layer lays out its windows: its square window and shift as they
    are set, the grid padded to whole windows and then rolled, and its shift mask for the padded grid (added
    ``shift_mask_times`` times, as the model adds it)."""
    window, shift = int(layer.window_size), int(layer.shift_size)
    padded = tuple(-(-g // window) * window for g in grid)
    shifted = layer.get_attn_mask(*padded, dtype=x.dtype, device=x.device)
    return window_attention(
        x,
        keep,
        grid,
        (window, window),
        (shift, shift),
        qkv=qkv,
        heads=heads,
        bias=bias,
        shifted=None if shifted is None else shift_mask_times * shifted,
        attend=attend,
        pad_first=True,
    )


def merged_tokens(x: torch.Tensor, keep: torch.Tensor, grid: tuple[int, int], kept: torch.Tensor) -> torch.Tensor:
    """Patch merging's input: each 2x2 group of the kept tokens ``x`` (B, K, C) concatenated in timm's and
    torchvision's order ((0, 0), (1, 0), (0, 1), (1, 1)), for the merged tokens ``kept`` (B, K / 4) of the next grid:
    (B, K / 4, 4C)."""
    height, width = grid
    full = scatter_tokens(x, keep, height * width).view(x.shape[0], height // 2, 2, width // 2, 2, -1)
    full = full.permute(0, 1, 3, 4, 2, 5).flatten(3).flatten(1, 2)  # (B, H/2 * W/2, 4C)
    return gather_tokens(full, kept)


def merge(module: nn.Module, method, x: torch.Tensor, *args, keep=None, to=None, grid=None, norm_after: bool = False):
    """A patch merging (its ``norm`` and ``reduction``) of the kept tokens ``x`` (B, K, C) at ``keep`` of the ``grid``
    into the tokens ``to`` of the next grid; SwinV2's normalizes after the reduction. Without ``keep``, its own
    forward."""
    if keep is None:
        return method(module, x, *args)
    full = merged_tokens(x, keep, grid, to)
    return module.norm(module.reduction(full)) if norm_after else module.reduction(module.norm(full))
