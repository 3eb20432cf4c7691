"""ConvViT: the hybrid convolution + transformer encoder of ConvMAE, DMJD's ConViT backbone.

Two convolution stages (stride 4, then 2) and a transformer stage (stride 2 more: 16-pixel tokens):

    image (B, C, 224, 224) -> stage 1: 56x56, convolution blocks -> stage 2: 28x28, convolution blocks
      -> stage 3: 14x14 = 196 tokens + fixed-initialized sin-cos positions, ViT blocks -> norm -> mean -> head

A convolution block is a ViT block with a 5x5 depthwise convolution where attention would be and 1x1
convolutions where linear layers would be. **Masked convolution**: given the stage-3 tokens to keep
(``keep``, (B, K)), each convolution block zeroes the masked positions right before its depthwise
convolution, the only operation that mixes positions, and every patch embedding is a strided convolution
that stays inside one 16-pixel token; so the kept tokens never see masked pixels, and the transformer stage
runs on the K kept tokens only (the saving of MAE-style encoders). Both DMJD's pretraining (each view's
visible tokens) and MaskSub's sub branch (the ``convvit`` mask adapter) use it.

Built with ``timm.create_model("convvit_base_patch16")`` once ``masksub`` is imported. The sizes are those
of DMJD's ConViT-B / ConViT-L (8x MLPs in the convolution stages; ConvMAE's own base: ``mlp_ratio=(4, 4, 4)``).
There are no published weights here: pretrain with ``masksub pretrain --recipe dmjd_convvit_b``.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import (
    ConvMlp,
    DropPath,
    LayerNorm,
    LayerNorm2d,
    build_sincos2d_pos_embed,
    resample_abs_pos_embed,
    trunc_normal_,
)
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import Block
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..masking import gather_tokens, upsample_mask


class ConvBlock(nn.Module):
    """Norm, 1x1 conv, (mask), 5x5 depthwise conv, 1x1 conv, residual; then a 1x1-conv MLP, residual."""

    def __init__(self, dim: int, mlp_ratio: float, drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = LayerNorm2d(dim, eps=1e-6)
        self.conv1 = nn.Conv2d(dim, dim, 1)
        self.attn = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)  # where a ViT block has attention
        self.conv2 = nn.Conv2d(dim, dim, 1)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = LayerNorm2d(dim, eps=1e-6)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
        y = self.conv1(self.norm1(x))
        if visible is not None:  # (B, 1, H, W): 1 where kept, 0 where masked
            y = y * visible.to(y.dtype)
        x = x + self.drop_path1(self.conv2(self.attn(y)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


def _patch_embed(in_chans: int, dim: int, stride: int) -> nn.Sequential:
    """A strided convolution that sees one ``stride`` x ``stride`` cell only, then LayerNorm and GELU."""
    return nn.Sequential(nn.Conv2d(in_chans, dim, stride, stride=stride), LayerNorm2d(dim, eps=1e-6), nn.GELU())


class TokenSelect(nn.Module):
    """Where the stage-3 tokens to keep are chosen: ``None`` (all of them) unless a mask adapter's hook
    returns indices (B, K). ``forward_features(x, keep=...)`` passes them directly instead."""

    def forward(self, x: torch.Tensor) -> None:
        return None


class ConvViT(nn.Module):
    def __init__(
        self,
        img_size: int = 224,
        patch_size: tuple[int, int, int] = (4, 2, 2),  # per-stage strides; tokens are their product (16 px)
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: tuple[int, int, int] = (256, 384, 768),
        depth: tuple[int, int, int] = (2, 2, 11),
        num_heads: int = 12,
        mlp_ratio: tuple[float, float, float] = (8.0, 8.0, 4.0),
        global_pool: str = "avg",
        fixed_pos_embed: bool = False,  # True in pretraining (MAE / ConvMAE / DMJD); learned in finetuning
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        if not (len(patch_size) == len(embed_dim) == len(depth) == len(mlp_ratio) == 3):
            raise ValueError("patch_size, embed_dim, depth and mlp_ratio take one value per stage (3)")
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        self.img_size, self.in_chans, self.num_classes, self.global_pool = img_size, in_chans, num_classes, global_pool
        self.patch_size = math.prod(patch_size)
        if img_size % self.patch_size:
            raise ValueError(f"img_size {img_size} is not divisible by the token size {self.patch_size} px")
        self.grid_size = (img_size // self.patch_size,) * 2
        self.strides, self.stage_dims = tuple(patch_size), tuple(embed_dim)
        self.num_features = self.embed_dim = embed_dim[-1]
        self.num_prefix_tokens = 0
        self.grad_checkpointing = False
        rates = torch.linspace(0, drop_path_rate, sum(depth), device="cpu").tolist()  # also under torch.device("meta")
        d1, d2 = depth[0], depth[0] + depth[1]

        self.token_select = TokenSelect()
        self.patch_embed1 = _patch_embed(in_chans, embed_dim[0], patch_size[0])
        self.blocks1 = nn.ModuleList(ConvBlock(embed_dim[0], mlp_ratio[0], proj_drop_rate, r) for r in rates[:d1])
        self.patch_embed2 = _patch_embed(embed_dim[0], embed_dim[1], patch_size[1])
        self.blocks2 = nn.ModuleList(ConvBlock(embed_dim[1], mlp_ratio[1], proj_drop_rate, r) for r in rates[d1:d2])
        self.patch_embed3 = _patch_embed(embed_dim[1], embed_dim[2], patch_size[2])
        self.token_proj = nn.Linear(embed_dim[2], embed_dim[2])
        pos = build_sincos2d_pos_embed(list(self.grid_size), embed_dim[2]).unsqueeze(0)  # (1, N, D)
        self.pos_embed = nn.Parameter(pos, requires_grad=not fixed_pos_embed)
        norm = partial(LayerNorm, eps=1e-6)
        self.blocks3 = nn.Sequential(*[
            Block(embed_dim[2], num_heads, mlp_ratio[2], qkv_bias=True, proj_drop=proj_drop_rate,
                  attn_drop=attn_drop_rate, drop_path=r, norm_layer=norm)
            for r in rates[d2:]
        ])  # fmt: skip
        self.norm = norm(embed_dim[2])
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim[2], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    # timm's model contract ------------------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        """Layer ids for layer-wise lr decay: the stem, then every block in order (a patch embedding joins
        the block after it), the rest (norm, head) last. ``coarse``: one group per stage."""
        n1, n2 = len(self.blocks1), len(self.blocks2)
        first = {"patch_embed1": 0, "blocks1": 1, "patch_embed2": 1 + n1, "blocks2": 1 + n1}
        first |= {"patch_embed3": 1 + n1 + n2, "token_proj": 1 + n1 + n2, "blocks3": 1 + n1 + n2}
        stage = {"patch_embed1": 0, "blocks1": 1, "patch_embed2": 2, "blocks2": 2}
        stage |= {"patch_embed3": 3, "token_proj": 3, "blocks3": 3}

        def layer_id(name: str) -> float:
            head, _, rest = name.partition(".")
            head = "patch_embed1" if head == "pos_embed" else head  # the stem, as timm's ViTs group it
            if head not in first:
                return float("inf")
            if coarse:
                return float(stage[head])
            return float(first[head] + (int(rest.split(".")[0]) if head.startswith("blocks") else 0))

        return layer_id

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    # forward -------------------------------------------------------------------------------------------------
    def _visible_maps(self, keep: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Kept tokens (B, K) -> 1/0 maps at stage 1 and stage 2 resolution, (B, 1, H_s, W_s)."""
        gh, gw = self.grid_size
        tokens = keep.new_zeros(batch, gh * gw, dtype=torch.float32).scatter_(1, keep, 1.0).view(batch, gh, gw)
        stage2 = upsample_mask(tokens, self.strides[2])
        return upsample_mask(stage2, self.strides[1]).unsqueeze(1), stage2.unsqueeze(1)

    def _run(self, block: nn.Module, *args):
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward_stages(
        self, x: torch.Tensor, keep: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Stage-3 tokens before the final norm, (B, N or K, D), and the two convolution stages' maps.

        With ``keep`` (B, K) the tokens are the kept ones, row ``i`` being token ``keep[:, i]``.
        """
        batch, _, height, width = x.shape
        if (height, width) != (self.img_size, self.img_size):
            raise ValueError(
                f"ConvViT is built for {self.img_size}x{self.img_size} images, got {height}x{width}; "
                f"build it with img_size={height} (model.kwargs) or resize the images"
            )
        if keep is None:
            keep = self.token_select(x)  # a mask adapter's hook returns (B, K) in the sub pass
        visible1, visible2 = self._visible_maps(keep, batch) if keep is not None else (None, None)
        x = self.patch_embed1(x)  # (B, D1, H / 4, W / 4)
        for block in self.blocks1:
            x = self._run(block, x, visible1)
        stage1 = x
        x = self.patch_embed2(x)  # (B, D2, H / 8, W / 8)
        for block in self.blocks2:
            x = self._run(block, x, visible2)
        stage2 = x
        x = self.token_proj(self.patch_embed3(x).flatten(2).transpose(1, 2)) + self.pos_embed  # (B, N, D)
        if keep is not None:
            x = gather_tokens(x, keep)  # (B, K, D)
        for block in self.blocks3:
            x = self._run(block, x)
        return x, (stage1, stage2)

    def forward_features(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        return self.norm(self.forward_stages(x, keep)[0])

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state: dict, model: ConvViT) -> dict:
    """Weights saved at another image size: the position embedding is resampled to this model's grid
    (``masksub train --model.checkpoint`` applies it)."""
    pos = state.get("pos_embed")
    if pos is None or pos.shape == model.pos_embed.shape or pos.shape[-1] != model.embed_dim:
        return state
    side = math.isqrt(pos.shape[1])
    if side * side != pos.shape[1]:
        return state  # not a square grid: reported as a shape mismatch
    pos = resample_abs_pos_embed(pos, list(model.grid_size), [side, side], num_prefix_tokens=0)
    return {**state, "pos_embed": pos}


def _cfg(**kwargs) -> dict:
    return {
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 0.9,
        "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed1.0", "classifier": "head", **kwargs,
    }  # fmt: skip


default_cfgs = generate_default_cfgs({"convvit_base_patch16": _cfg(), "convvit_large_patch16": _cfg()})


def _create(variant: str, pretrained: bool, **kwargs) -> ConvViT:
    if pretrained and kwargs.get("pretrained_cfg") is None:  # a folder or Hub entry names its weights: loaded
        raise ValueError(
            f"masksub has no published {variant} weights; pretrain one (masksub pretrain --recipe "
            "dmjd_convvit_b) and load it with --model.checkpoint"
        )
    return build_model_with_cfg(ConvViT, variant, pretrained, **kwargs)


@register_model
def convvit_base_patch16(pretrained: bool = False, **kwargs) -> ConvViT:
    """DMJD's ConViT-B: widths 256 / 384 / 768, depths 2 / 2 / 11, 12 heads."""
    args = dict(embed_dim=(256, 384, 768), depth=(2, 2, 11), num_heads=12, mlp_ratio=(8.0, 8.0, 4.0))
    return _create("convvit_base_patch16", pretrained, **{**args, **kwargs})


@register_model
def convvit_large_patch16(pretrained: bool = False, **kwargs) -> ConvViT:
    """DMJD's ConViT-L: widths 384 / 768 / 1024, depths 2 / 2 / 23, 16 heads."""
    args = dict(embed_dim=(384, 768, 1024), depth=(2, 2, 23), num_heads=16, mlp_ratio=(8.0, 8.0, 4.0))
    return _create("convvit_large_patch16", pretrained, **{**args, **kwargs})
