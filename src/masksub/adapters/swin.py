"""timm's Swin Transformer and SwinV2, opt-in (``adapter="swin_drop"``): drop whole mask units, not mask them.

Swin's default adapter (``masktoken``, as the paper does it) puts a learnable token at the masked positions:
the sub pass then costs as much as the main pass. This one leaves the masked units out. Each sample keeps
``num_keep(U, ratio)`` of its ``U`` units of ``unit`` pixels (default 32: one token of Swin-T's last stage, so
every patch merging merges either four kept tokens or four dropped ones), and in the sub pass:

- the projections, MLPs, norms and patch mergings run on the kept tokens only;
- each window's attention (shifted or not, with its relative position bias) reads the kept tokens of that
  window only: the dropped ones are left out of its keys, as the main pass leaves out the tokens of another
  shifted region. A window holding no kept token produces nothing that is used;
- the final norm and the pool (a mean by default) take the kept tokens.

So kept tokens never see dropped ones: the sub pass equals the model run with every window's attention
masked to the kept tokens (tested in float64), and the pixels of a dropped unit do not reach it. The
projections and MLPs, most of Swin's compute, cost about ``1 - ratio``; the attention itself, a small share,
still runs over whole windows. Shapes are static, with no host synchronization.

This is a different sub branch from the mask token's (a masked region is absent rather than present as a
learned token), as in masked-image-modeling methods that drop tokens from Swin's windows: use it where the
sub pass's cost matters more than following the paper's Swin recipe.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import to_2tuple
from timm.models._manipulate import checkpoint
from timm.models.swin_transformer import SwinTransformer
from timm.models.swin_transformer_v2 import PatchMerging as PatchMergingV2
from timm.models.swin_transformer_v2 import SwinTransformerV2, SwinTransformerV2Block
from torch import nn

from ..masking import check_masks_some, gather_tokens, num_keep, random_keep_indices, unit_grid, units_to_tokens
from .registry import MaskAdapter, check_images, register_adapter


def _scatter(x: torch.Tensor, keep: torch.Tensor, length: int) -> torch.Tensor:
    """The kept tokens ``x`` (B, K, D) at their places ``keep`` (B, K) of a (B, length, D) sequence of zeros."""
    return x.new_zeros(x.shape[0], length, x.shape[-1]).scatter(1, keep.unsqueeze(-1).expand_as(x), x)


def _window_slots(keep: torch.Tensor, grid: tuple[int, int], window: tuple[int, int], shift: tuple[int, int]):
    """Where the model's window partition puts each kept token: its slot (B, K) in a sample's windows laid end to end
    (window-major, then row-major in the window) after the cyclic shift and the padding, and the slots (nW * N,) that
    hold padding. One scatter then builds the windows, and one gather reads the kept tokens back."""
    height, width = grid
    (wh, ww), (sh, sw) = window, shift
    across = -(-width // ww)  # windows along the width, the padding included
    row, col = (keep // width - sh) % height, (keep % width - sw) % width  # torch.roll by -shift moves r to r - sh
    slots = ((row // wh) * across + col // ww) * (wh * ww) + (row % wh) * ww + col % ww
    every = torch.arange(-(-height // wh) * across * wh * ww, device=keep.device)
    window_of, within = every // (wh * ww), every % (wh * ww)
    padded = ((window_of // across) * wh + within // ww >= height) | ((window_of % across) * ww + within % ww >= width)
    return slots, padded


def _qkv(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The window attention's q, k and v of tokens ``x`` (..., C): its ``qkv`` layer, or SwinV2's with its q and v
    biases (and k's zeros)."""
    if getattr(attn, "q_bias", None) is None:
        return attn.qkv(x)
    bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
    return attn.qkv(x) + bias if attn.qkv_bias_separate else F.linear(x, attn.qkv.weight, bias)


def _position_bias(attn: nn.Module) -> torch.Tensor:
    """The window attention's relative position bias (1, heads, N, N): Swin's table, or SwinV2's continuous one
    (an MLP of the log-spaced offsets, through ``16 * sigmoid``)."""
    if not hasattr(attn, "cpb_mlp"):
        return attn._get_rel_pos_bias()
    area = attn.window_size[0] * attn.window_size[1]
    table = attn.cpb_mlp(attn.relative_coords_table).view(-1, attn.num_heads)
    bias = table[attn.relative_position_index.view(-1)].view(area, area, -1).permute(2, 0, 1)
    return 16 * torch.sigmoid(bias).unsqueeze(0)


def _attend(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention as the model's window attention computes it, with ``mask`` (B * nW, heads, N, N) holding the
    position bias: scaled dot products (fused where the model has the fused kernel on; timm's Swin leaves it off),
    or SwinV2's cosine similarities times its learned scale."""
    if getattr(attn, "fused_attn", False):
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=attn.attn_drop.p if attn.training else 0.0
        )
    if hasattr(attn, "logit_scale"):
        scale = torch.clamp(attn.logit_scale, max=math.log(1.0 / 0.01)).exp()
        scores = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1) * scale
    else:
        scores = (q * attn.scale) @ k.transpose(-2, -1)
    return attn.attn_drop(attn.softmax(scores + mask)) @ v


def _window_attention(block: nn.Module, x: torch.Tensor, keep: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``block``'s (shifted) window attention on its kept tokens ``x`` (B, K, C), at ``keep`` (B, K) of a ``grid``:
    each query attends to the kept tokens of its window only. Returns (B, K, C) after the output projection."""
    attn = block.attn
    batch = x.shape[0]
    (wh, ww), area = block.window_size, block.window_size[0] * block.window_size[1]
    slots, padded = _window_slots(keep, grid, (wh, ww), tuple(block.shift_size))
    qkv = _qkv(attn, x)  # (B, K, 3A)
    windows = _scatter(qkv, slots, len(padded))  # (B, nW * N, 3A)
    present = _scatter(torch.ones_like(slots, dtype=qkv.dtype).unsqueeze(-1), slots, len(padded))  # (B, nW * N, 1)
    if grid[0] % wh or grid[1] % ww:  # the model pads the grid with zero tokens, which attend and are attended to
        pad = padded.to(qkv.dtype).unsqueeze(-1)
        present = present + pad
        windows = windows + pad * _qkv(attn, x.new_zeros(x.shape[-1]))  # a zero token's q, k and v
    heads = attn.num_heads
    q, k, v = windows.view(-1, area, 3, heads, qkv.shape[-1] // (3 * heads)).permute(2, 0, 3, 1, 4).unbind(0)
    keys = present.view(batch, -1, 1, 1, area)  # (B, nW, 1, 1, N)
    # a large finite value (not -inf): a window without kept tokens then gives finite, unused outputs
    mask = (1.0 - keys) * (torch.finfo(q.dtype).min / 2) + _position_bias(attn).to(q.dtype).unsqueeze(0)
    if getattr(block, "dynamic_mask", False):
        shifted = block.get_attn_mask(x.new_zeros(1, -(-grid[0] // wh) * wh, -(-grid[1] // ww) * ww, 1))
    else:
        shifted = block.attn_mask
    if shifted is not None:  # (nW, N, N): tokens of different shifted regions do not attend to each other
        mask = mask + shifted.to(q.dtype).view(1, -1, 1, area, area)
    out = _attend(attn, q, k, v, mask.flatten(0, 1)).transpose(1, 2).reshape(batch, len(padded), -1)  # (B, nW * N, A)
    return attn.proj_drop(attn.proj(gather_tokens(out, slots)))


def _block(block: nn.Module, x: torch.Tensor, keep: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """A Swin block on the kept tokens ``x`` (B, K, C): pre-norm, or SwinV2's residual post-norm."""
    if isinstance(block, SwinTransformerV2Block):
        x = x + block.drop_path1(block.norm1(_window_attention(block, x, keep, grid)))
        return x + block.drop_path2(block.norm2(block.mlp(x)))
    x = x + block.drop_path1(_window_attention(block, block.norm1(x), keep, grid))
    return x + block.drop_path2(block.mlp(block.norm2(x)))


def _merge(merging: nn.Module, x: torch.Tensor, keep: torch.Tensor, grid: tuple[int, int], kept: torch.Tensor):
    """``PatchMerging`` of the kept tokens: each 2x2 group of kept tokens (in the model's channel order) into the
    merged token ``kept`` (B, K / 4) of the next grid."""
    height, width = grid
    full = _scatter(x, keep, height * width).view(x.shape[0], height // 2, 2, width // 2, 2, -1)
    full = full.permute(0, 1, 3, 4, 2, 5).flatten(3).flatten(1, 2)  # (B, H/2 * W/2, 4C)
    full = gather_tokens(full, kept)
    if isinstance(merging, PatchMergingV2):  # SwinV2 normalizes after the reduction
        return merging.norm(merging.reduction(full))
    return merging.reduction(merging.norm(full))


def _stage(stage: nn.Module, method, x: torch.Tensor, keep=None, to=None, grid=None) -> torch.Tensor:
    """A ``SwinTransformerStage`` on the kept tokens ``x`` (B, K, C) at ``keep`` of the ``grid``: its patch merging
    into the tokens ``to`` of the next grid, then its blocks. Without ``keep``, the stage's own forward."""
    if keep is None:
        return method(stage, x)
    if not isinstance(stage.downsample, nn.Identity):
        x = _merge(stage.downsample, x, keep, grid, to)
        grid = (grid[0] // 2, grid[1] // 2)
    for block in stage.blocks:
        if stage.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint(_block, block, x, to, grid)
        else:
            x = _block(block, x, to, grid)
    return x


@register_adapter(
    "swin_drop",
    priority=15,  # below masktoken's: only where asked for (adapter="swin_drop")
    description="timm Swin / SwinV2, opt-in: drops whole mask units; each window attends to its kept tokens",
)
class SwinDropAdapter(MaskAdapter):
    """Drops a random ``ratio`` of the ``unit``-pixel blocks per sample; windows attend to the kept tokens only."""

    backbone = True  # also inside a model of the user's (a Swin with num_classes=0 under their head)

    def __init__(self, model: nn.Module, ratio: float, unit: int | None = None):
        super().__init__(model, ratio, unit)
        self._model_ref = [model]  # a list keeps the model from being registered as a submodule
        self.unit_tokens  # noqa: B018 -- checks the unit against the model now, not at the first step
        # the class's function, not the bound method: a pickled model then unpickles to the same override
        model.forward_features = partial(self._features, model, type(model).forward_features)
        for stage in model.layers:
            stage.forward = partial(_stage, stage, type(stage).forward)

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return isinstance(model, (SwinTransformer, SwinTransformerV2)) and model.global_pool != ""

    @classmethod
    def why_not(cls, model: nn.Module) -> str:
        if isinstance(model, (SwinTransformer, SwinTransformerV2)) and model.global_pool == "":
            return (
                ": built with global_pool='', it returns one output per token, and the sub pass keeps fewer "
                "tokens; pool it ('avg'), or use adapter='masktoken' (the default for it)"
            )
        return ""

    @property
    def patch_size(self) -> tuple[int, int]:
        return tuple(to_2tuple(self._model_ref[0].patch_embed.patch_size))

    @property
    def token_size(self) -> tuple[int, int]:
        """The pixels one token of the last stage covers: the patch size doubled at each patch merging."""
        merges = sum(not isinstance(stage.downsample, nn.Identity) for stage in self._model_ref[0].layers)
        return tuple(p * 2**merges for p in self.patch_size)

    @property
    def unit_tokens(self) -> tuple[int, int]:
        """A mask unit's tokens along height and width at the first stage, or an error naming units that fit."""
        (th, tw), (ph, pw) = self.token_size, self.patch_size
        if self.unit % th or self.unit % tw:
            raise ValueError(
                f"swin_drop adapter: mask unit {self.unit} px is not a multiple of the last stage's token, "
                f"{th}x{tw} px (patch {ph}x{pw}, doubled at each patch merging), so a merged token would hold kept "
                f"and dropped tokens; use a multiple of {max(th, tw)} (wrap's unit=, --sub.unit)"
            )
        return self.unit // ph, self.unit // pw

    def _features(self, model: nn.Module, method, x: torch.Tensor) -> torch.Tensor:
        if not self._active:
            return method(model, x)
        x = model.patch_embed(x)  # (B, H, W, C)
        batch, height, width, _ = x.shape
        (uh, uw), merged = self.unit_tokens, 1
        grid_w = width // uw
        units = (height // uh) * grid_w
        kept = random_keep_indices(batch, units, num_keep(units, self.ratio), x.device)
        keep = units_to_tokens(kept, grid_w, (uh, uw))
        x = gather_tokens(x.flatten(1, 2), keep)
        for stage in model.layers:
            previous, merges = keep, not isinstance(stage.downsample, nn.Identity)
            if merges:
                merged *= 2
                keep = units_to_tokens(kept, grid_w, (uh // merged, uw // merged))
            # through the stage's own call: hooks on it (FSDP's gathering of its weights) run as in the main pass
            x = stage(x, keep=previous, to=keep, grid=(height, width))
            if merges:
                height, width = height // 2, width // 2
        return model.norm(x).unsqueeze(1)  # (B, 1, K, C): the kept tokens as a 1 x K grid for the pool

    def forward(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        check_images(x, self.name)
        grid = unit_grid(x.shape[-2], x.shape[-1], self.unit, f"{self.name} adapter")
        check_masks_some(grid, self.ratio, self.unit, tuple(x.shape[-2:]), f"{self.name} adapter")
        return self.run_with_hooks_active(model, x)

    def remove(self) -> None:
        model = self._model_ref[0]
        vars(model).pop("forward_features", None)  # the class's methods again
        for stage in model.layers:
            vars(stage).pop("forward", None)
