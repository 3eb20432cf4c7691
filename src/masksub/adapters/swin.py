"""Swin Transformer and SwinV2, timm's and torchvision's, opt-in (``adapter="swin_drop"``): drop whole mask units,
not mask them.

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
still runs over whole windows. Shapes are static, with no host synchronization. Every stage, block and patch
merging runs through its own call in the sub pass too, so hooks on them (FSDP's) run as in the main pass.

This file holds timm's parts and the adapter; ``windows`` the attention and merging the families share;
``tv_swin`` torchvision's parts; ``hf_swin``, ``hf_swinv2`` and ``hf_donut_swin`` Hugging Face's, as the adapter
``hf_swin_drop``.

This is a different sub branch from the mask token's (a masked region is absent rather than present as a
learned token), as in masked-image-modeling methods that drop tokens from Swin's windows: use it where the
sub pass's cost matters more than following the paper's Swin recipe.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import to_2tuple
from timm.models._manipulate import checkpoint
from timm.models.swin_transformer import SwinTransformer
from timm.models.swin_transformer_v2 import PatchMerging as PatchMergingV2
from timm.models.swin_transformer_v2 import SwinTransformerV2, SwinTransformerV2Block
from timm.models.swin_transformer_v2_cr import SwinTransformerV2Cr, SwinTransformerV2CrBlock
from torch import nn

from ..masking import check_masks_some, gather_tokens, num_keep, random_keep_indices, unit_grid, units_to_tokens
from . import tv_swin
from .registry import MaskAdapter, check_images, register_adapter
from .windows import continuous_position_bias, cosine_scores, merge, window_attention


def _qkv(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The window attention's q, k and v of tokens ``x`` (..., C): its ``qkv`` layer, or SwinV2's with its q and v
    biases (and k's zeros)."""
    if getattr(attn, "q_bias", None) is None:
        return attn.qkv(x)
    bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
    return attn.qkv(x) + bias if attn.qkv_bias_separate else F.linear(x, attn.qkv.weight, bias)


def _position_bias(attn: nn.Module) -> torch.Tensor:
    """The window attention's relative position bias (1, heads, N, N): Swin's table, or SwinV2's continuous one
    (SwinV2-Cr's, its meta MLP's)."""
    if hasattr(attn, "meta_mlp"):
        return attn._relative_positional_encodings()
    if not hasattr(attn, "cpb_mlp"):
        return attn._get_rel_pos_bias()
    coords, index = attn.relative_coords_table, attn.relative_position_index
    return continuous_position_bias(attn.cpb_mlp, coords, index, attn.window_size, attn.num_heads)


def _attend(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention as the model's window attention computes it, with ``mask`` (B * nW, heads, N, N) holding the
    position bias: scaled dot products (fused where the model has the fused kernel on; timm's Swin leaves it off),
    or SwinV2's cosine similarities times its learned scale."""
    if getattr(attn, "fused_attn", False):
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=attn.attn_drop.p if attn.training else 0.0
        )
    if hasattr(attn, "logit_scale"):
        scores = cosine_scores(q, k, attn.logit_scale)
    else:
        scores = (q * attn.scale) @ k.transpose(-2, -1)
    return attn.attn_drop(F.softmax(scores + mask, dim=-1)) @ v


def _window_attention(block: nn.Module, x: torch.Tensor, keep: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``block``'s (shifted) window attention on its kept tokens ``x`` (B, K, C), at ``keep`` (B, K) of a ``grid``:
    each query attends to the kept tokens of its window only. Returns (B, K, C) after the output projection."""
    attn, (wh, ww) = block.attn, block.window_size
    if getattr(block, "dynamic_mask", False):
        shifted = block.get_attn_mask(x.new_zeros(1, -(-grid[0] // wh) * wh, -(-grid[1] // ww) * ww, 1))
    else:
        shifted = block.attn_mask
    out = window_attention(
        x,
        keep,
        grid,
        (wh, ww),
        tuple(block.shift_size),
        qkv=partial(_qkv, attn),
        heads=attn.num_heads,
        bias=_position_bias(attn),
        shifted=shifted,
        attend=partial(_attend, attn),
        pad_first=False,
    )
    return attn.proj_drop(attn.proj(out))


def _block(block: nn.Module, method, x: torch.Tensor, keep=None, grid=None) -> torch.Tensor:
    """A Swin block on the kept tokens ``x`` (B, K, C) at ``keep`` of the ``grid``: pre-norm, or SwinV2's residual
    post-norm (SwinV2-Cr's then its main-branch norm, an identity in most blocks). Without ``keep``, the block's own
    forward."""
    if keep is None:
        return method(block, x)
    if isinstance(block, (SwinTransformerV2Block, SwinTransformerV2CrBlock)):
        x = x + block.drop_path1(block.norm1(_window_attention(block, x, keep, grid)))
        x = x + block.drop_path2(block.norm2(block.mlp(x)))
        return block.norm3(x) if isinstance(block, SwinTransformerV2CrBlock) else x
    x = x + block.drop_path1(_window_attention(block, block.norm1(x), keep, grid))
    return x + block.drop_path2(block.mlp(block.norm2(x)))


def _stage(stage: nn.Module, method, x: torch.Tensor, keep=None, to=None, grid=None) -> torch.Tensor:
    """A ``SwinTransformerStage`` on the kept tokens ``x`` (B, K, C) at ``keep`` of the ``grid``: its patch merging
    into the tokens ``to`` of the next grid, then its blocks, each through its own call. Without ``keep``, the
    stage's own forward."""
    if keep is None:
        return method(stage, x)
    if not isinstance(stage.downsample, nn.Identity):
        x = stage.downsample(x, keep=keep, to=to, grid=grid)
        grid = (grid[0] // 2, grid[1] // 2)
    for block in stage.blocks:
        if stage.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint(partial(block, keep=to, grid=grid), x)  # positional: reentrant checkpoints take no kwargs
        else:
            x = block(x, keep=to, grid=grid)
    return x


def _timm(model: nn.Module) -> bool:
    return isinstance(model, (SwinTransformer, SwinTransformerV2, SwinTransformerV2Cr))


def _timm_stages(model: nn.Module) -> nn.Module:
    return model.stages if isinstance(model, SwinTransformerV2Cr) else model.layers


def _pooled(model: nn.Module) -> bool:
    """Whether a timm Swin pools its tokens (SwinV2-Cr's in its head)."""
    if isinstance(model, SwinTransformerV2Cr):
        return not model.head.global_pool.is_identity()
    return model.global_pool != ""


@register_adapter(
    "swin_drop",
    priority=15,  # below masktoken's: only where asked for (adapter="swin_drop")
    description="Swin / SwinV2 (timm's, torchvision's), opt-in: drops whole mask units; windows attend to kept tokens",
)
class SwinDropAdapter(MaskAdapter):
    """Drops a random ``ratio`` of the ``unit``-pixel blocks per sample; windows attend to the kept tokens only."""

    backbone = True  # also inside a model of the user's (a Swin with num_classes=0 under their head)

    def __init__(self, model: nn.Module, ratio: float, unit: int | None = None):
        super().__init__(model, ratio, unit)
        self._model_ref = [model]  # a list keeps the model from being registered as a submodule
        self.unit_tokens  # noqa: B018 -- checks the unit against the model now, not at the first step
        # The class's functions, not bound methods: a pickled model then unpickles to the same overrides. Every
        # stage, merging and block runs through its own call in the sub pass too, so hooks on them (FSDP's
        # gathering of their weights) run as in the main pass.
        self._install(model)

    def _install(self, model: nn.Module) -> None:
        if _timm(model):
            model.forward_features = partial(self._features, model, type(model).forward_features)
            for stage in _timm_stages(model):
                stage.forward = partial(_stage, stage, type(stage).forward)
        else:
            model.features.forward = partial(self._features, model.features, type(model.features).forward)
            for stage in tv_swin.stages(model):
                stage.forward = partial(tv_swin.stage, stage, type(stage).forward)
        for merging in self._mergings():
            v2 = isinstance(merging, (PatchMergingV2, tv_swin.PatchMergingV2))  # normalizes after the reduction
            merging.forward = partial(merge, merging, type(merging).forward, norm_after=v2)
        for block in self._blocks():
            block.forward = partial(_block if _timm(model) else tv_swin.block, block, type(block).forward)

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return (_timm(model) and _pooled(model)) or tv_swin.is_torchvision_swin(model)

    @classmethod
    def why_not(cls, model: nn.Module) -> str:
        if _timm(model) and not _pooled(model):
            return (
                ": built with global_pool='', it returns one output per token, and the sub pass keeps fewer "
                "tokens; pool it ('avg'), or use adapter='masktoken' (the default for it)"
            )
        return ""

    def _uninstall(self, model: nn.Module) -> None:
        if _timm(model):  # the class's methods again
            vars(model).pop("forward_features", None)
        else:
            vars(model.features).pop("forward", None)

    def _parts(self) -> list[tuple[nn.Module, bool]]:
        """What runs after the patch embedding, in order, each with whether it merges patches (timm's stages begin
        with it, Hugging Face's end with it, torchvision's are separate parts)."""
        model = self._model_ref[0]
        if _timm(model):
            return [(stage, not isinstance(stage.downsample, nn.Identity)) for stage in _timm_stages(model)]
        return [(part, isinstance(part, tv_swin.MERGINGS)) for part in list(model.features)[1:]]

    def _mergings(self) -> list[nn.Module]:
        model = self._model_ref[0]
        if _timm(model):
            return [stage.downsample for stage, merges in self._parts() if merges]
        return [part for part, merges in self._parts() if merges]

    def _blocks(self) -> list[nn.Module]:
        model = self._model_ref[0]
        if _timm(model):
            return [block for stage in _timm_stages(model) for block in stage.blocks]
        return [block for stage in tv_swin.stages(model) for block in stage]

    @property
    def patch_size(self) -> tuple[int, int]:
        model = self._model_ref[0]
        return tuple(to_2tuple(model.patch_embed.patch_size)) if _timm(model) else tv_swin.patch_size(model)

    @property
    def token_size(self) -> tuple[int, int]:
        """The pixels one token of the last stage covers: the patch size doubled at each patch merging."""
        merges = sum(merging for _, merging in self._parts())
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

    def _features(self, module: nn.Module, method, x: torch.Tensor) -> torch.Tensor:
        """timm's ``forward_features`` or torchvision's ``features``: in the sub pass, the kept tokens of the last
        stage as a (B, 1, K, C) grid (SwinV2-Cr's: (B, C, 1, K)), which the model's pool averages (or takes the
        maximum of)."""
        if not self._active:
            return method(module, x)
        model = self._model_ref[0]
        if isinstance(model, SwinTransformerV2Cr):  # channels first between its stages, no final norm
            x = model.patch_embed(x)  # (B, C, H, W)
            return self._run_parts(x.flatten(2).transpose(1, 2), x.shape[2:]).transpose(1, 2).unsqueeze(2)
        x = model.patch_embed(x) if _timm(model) else module[0](x)  # (B, H, W, C)
        x = self._run_parts(x.flatten(1, 2), x.shape[1:3])
        return (model.norm(x) if _timm(model) else x).unsqueeze(1)  # torchvision's model applies its norm itself

    def _run_parts(self, x: torch.Tensor, grid: tuple[int, int], **kwargs) -> torch.Tensor:
        """The sub pass from the patch embedding's tokens ``x`` (B, H * W, C) of a ``grid``: drop the masked units'
        tokens and run the parts on the kept ones, each part through its own call (with ``kwargs``). Returns the
        last stage's kept tokens (B, K, C)."""
        (height, width), (uh, uw), merged = grid, self.unit_tokens, 1
        grid_w = width // uw
        units = (height // uh) * grid_w
        kept = random_keep_indices(x.shape[0], units, num_keep(units, self.ratio), x.device)
        keep = units_to_tokens(kept, grid_w, (uh, uw))
        x = gather_tokens(x, keep)
        for part, merges in self._parts():
            previous = keep
            if merges:
                merged *= 2
                keep = units_to_tokens(kept, grid_w, (uh // merged, uw // merged))
            x = part(x, keep=previous, to=keep, grid=(height, width), **kwargs)
            if merges:
                height, width = height // 2, width // 2
        return x

    def check_input(self, x: torch.Tensor) -> None:
        """An image batch whose sides are whole units, at least one of which the ratio masks, or an error."""
        check_images(x, self.name)
        grid = unit_grid(x.shape[-2], x.shape[-1], self.unit, f"{self.name} adapter")
        check_masks_some(grid, self.ratio, self.unit, tuple(x.shape[-2:]), f"{self.name} adapter")

    def forward(self, model: nn.Module, *args, **kwargs):
        """The model's call, its images by position or as ``pixel_values`` (Hugging Face's models, and
        transformers' ``TimmWrapper`` around a timm Swin)."""
        self.check_input(kwargs.get("pixel_values", args[0] if args else None))
        return self.run_with_hooks_active(model, *args, **kwargs)

    def remove(self) -> None:
        self._uninstall(self._model_ref[0])
        for module in [part for part, _ in self._parts()] + self._mergings() + self._blocks():
            vars(module).pop("forward", None)
