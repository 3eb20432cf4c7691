"""DMJD: an encoder on each view's visible tokens, an MAE-style decoder for the masked tokens, and the
visible-distillation branch that regresses the visible tokens' own targets.

    model = DMJD(timm.create_model("vit_base_patch16_224", num_classes=0))
    losses = model(images)            # images in [0, 1], unnormalized: HOG needs the raw pixels
    losses["loss"].backward()

The encoder is a timm ``VisionTransformer`` (the MaskFeat-style plain ViT: visible tokens dropped after
the position embedding) or masksub's ``ConvViT`` (``convvit_base_patch16``, the paper's ConViT: masked
convolutions, then the transformer on the visible tokens; as in ConvMAE, its two convolution stages'
maps, taken to the token grid by strided convolutions, are added to the visible tokens before the final
norm). ``method="single"`` is the single-view baseline (MaskFeat / MAE style: one view, no visible
branch) with the same code. The encoder keeps its own names, so its state dict loads into
``timm.create_model`` for finetuning.
"""

from __future__ import annotations

import math
import numbers
import warnings

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import HybridEmbed, build_sincos2d_pos_embed
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from ..adapters.vit import TokenDropAdapter
from ..masking import disjoint_views, gather_tokens
from ..models.convvit import ConvViT
from .hog import HOGTargets


def _projector(dim: int, hidden: int) -> nn.Sequential:
    """Linear + LayerNorm + GELU twice, then Linear + LayerNorm without affine."""
    return nn.Sequential(
        nn.Linear(dim, hidden), nn.LayerNorm(hidden), nn.GELU(),
        nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.GELU(),
        nn.Linear(hidden, hidden), nn.LayerNorm(hidden, elementwise_affine=False),
    )  # fmt: skip


def _check_int(name: str, value, least: int, note: str = "") -> int:
    """``value`` as an int (NumPy's integers too), or a clear error."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
        raise ValueError(f"{name} must be an integer >= {least}{note}, got {value!r}")
    return int(value)


def _per_channel(name: str, values, default: tuple, chans: int) -> tuple:
    """One normalization value per input channel: one value for all; the default RGB one averaged for grey."""
    if values is None:
        values = (sum(default) / len(default),) if chans == 1 else default
    values = tuple(float(v) for v in values)
    if not all(math.isfinite(v) for v in values) or (name == "std" and min(values) <= 0):
        raise ValueError(f"{name} must hold finite numbers{' > 0' if name == 'std' else ''}, got {values}")
    if len(values) == 1:
        return values * chans
    if len(values) != chans:
        raise ValueError(
            f"{name} has {len(values)} values for an encoder of {chans} input channel(s): give one per "
            "channel, or one for all"
        )
    return values


class DMJD(nn.Module):
    def __init__(
        self,
        encoder: VisionTransformer | ConvViT,
        method: str = "dmjd",  # dmjd | single
        views: int = 2,
        corruption: float = 0.6,
        prediction: float = 1.0,
        block: int = 2,  # mask unit in patch tokens (2 = 32 px for 16-px patches)
        target: str = "hog",  # hog | pixels (per-patch normalized pixels, MAE style)
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        projector_dim: int = 512,
        visible_weight: float = 1.0,
        mean: tuple | None = None,  # per input channel (one value: every channel); None: ImageNet's
        std: tuple | None = None,  # (for a grey encoder, the average of ImageNet's three)
    ):
        super().__init__()
        if not isinstance(encoder, (VisionTransformer, ConvViT)):
            raise TypeError(
                f"DMJD needs a timm VisionTransformer or a ConvViT (convvit_*) encoder, got {type(encoder).__name__}"
            )
        if isinstance(getattr(encoder, "patch_embed", None), HybridEmbed):
            raise TypeError(
                f"DMJD hides image patches from the encoder, and {type(encoder).__name__}'s CNN backbone (a hybrid "
                "ViT) sees the whole image before any token is dropped: the masked pixels would leak into the visible "
                "tokens. Use a plain ViT (patch embedding) or a ConvViT (convvit_*), which mask inside the convolutions"
            )
        if method not in ("dmjd", "single"):
            raise ValueError(f"method must be 'dmjd' or 'single', got {method!r}")
        views = _check_int("views", views, 1, " (the paper's DMJD uses 2)")
        block = _check_int("block", block, 1, " (the mask unit, in patch tokens)")
        decoder_depth = _check_int("decoder_depth", decoder_depth, 0)
        decoder_dim, decoder_heads, projector_dim = (
            _check_int(name, value, 1)
            for name, value in (
                ("decoder_dim", decoder_dim),
                ("decoder_heads", decoder_heads),
                ("projector_dim", projector_dim),
            )
        )
        if decoder_dim % decoder_heads or decoder_dim % 4:
            raise ValueError(
                f"decoder_dim={decoder_dim} must split into decoder_heads={decoder_heads} heads and be a multiple of 4 "
                "(its 2-D sine-cosine position embedding): the paper's decoder is 512 wide with 16 heads"
            )
        if isinstance(visible_weight, bool) or not isinstance(visible_weight, numbers.Real):
            raise TypeError(f"visible_weight must be a finite number >= 0, got {visible_weight!r}")
        if not 0 <= visible_weight < math.inf:
            raise ValueError(f"visible_weight must be a finite number >= 0, got {visible_weight!r}")
        self.encoder = encoder
        self.method, self.views = method, (views if method == "dmjd" else 1)
        self.corruption, self.prediction, self.block = corruption, prediction, block
        dim = encoder.embed_dim
        if isinstance(encoder, ConvViT):
            self.drop = None
            self.patch, self.grid, chans = encoder.patch_size, encoder.grid_size, encoder.in_chans
            # each convolution stage's map -> the token grid: a strided convolution within one token
            later = (encoder.strides[1] * encoder.strides[2], encoder.strides[2])
            self.fuse = nn.ModuleList(nn.Conv2d(c, dim, k, stride=k) for c, k in zip(encoder.stage_dims, later))
        else:
            self.drop = TokenDropAdapter(encoder, ratio=corruption)  # shares the MaskSub ViT token dropping
            ph, pw = encoder.patch_embed.patch_size
            if ph != pw:  # targets, HOG cells and mask blocks are all laid out on square patches
                raise ValueError(
                    f"DMJD needs square patches, the encoder's are {ph}x{pw}: build it with patch_size={ph} or {pw}"
                )
            self.patch = ph
            self.grid = tuple(encoder.patch_embed.grid_size)
            chans = encoder.patch_embed.proj.in_channels
        if target == "hog":
            # 8-pixel cells (the paper's, for 16-pixel patches), else the largest of 4 to 7 pixels that tiles the
            # patch (7 for ViT-L/14 and ViT-H/14), else one cell per patch (patches of 8 pixels or fewer too)
            cell = max((c for c in range(4, 9) if self.patch % c == 0), default=self.patch)
            self.targets = HOGTargets(cell=cell, patch=self.patch)
            target_dim = self.targets.dim(chans)
        elif target == "pixels":
            self.targets, target_dim = None, self.patch**2 * chans
        else:
            raise ValueError(f"target must be 'hog' or 'pixels', got {target!r}")
        self.make_masks(1, "cpu")  # refuse a (corruption, prediction, views, block) that cannot work, now
        self.corruption, self.prediction = float(corruption), float(prediction)  # NumPy's: Python floats
        self.in_chans = chans
        self._range_checked = False  # the first batch's values are checked once (one host sync)
        mean, std = (
            _per_channel("mean", mean, IMAGENET_DEFAULT_MEAN, chans),
            _per_channel("std", std, IMAGENET_DEFAULT_STD, chans),
        )
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.decoder_embed = nn.Linear(dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(decoder_dim))
        nn.init.normal_(self.mask_token, std=0.02)
        pos = build_sincos2d_pos_embed(list(self.grid), decoder_dim)  # fixed, (N, decoder_dim)
        self.register_buffer("decoder_pos", pos.unsqueeze(0), persistent=False)
        self.decoder = nn.Sequential(*[Block(decoder_dim, decoder_heads, qkv_bias=True) for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, target_dim)
        self.visible_weight = visible_weight if method == "dmjd" else 0.0
        if self.visible_weight:
            self.projector = _projector(dim, projector_dim)
            self.predictor = nn.Linear(projector_dim, target_dim)

    def make_targets(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, N, target_dim), patches in raster order."""
        if self.targets is not None:
            return self.targets(images)
        p = self.patch
        patches = F.unfold(images, p, stride=p).transpose(1, 2)  # (B, N, C * p * p)
        mean, var = patches.mean(-1, keepdim=True), patches.var(-1, keepdim=True)
        return (patches - mean) / (var + 1e-6).sqrt()

    def make_masks(self, batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Visible token indices (B, V, K), ascending, and masks (B, V, N), True where hidden."""
        prediction = self.prediction if self.views > 1 else 1.0  # one view: the plain random mask
        m = disjoint_views(batch, self.grid, self.views, self.corruption, prediction, self.block, device)
        return m.visible, m.masked

    def encode(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The encoder's output tokens for the patches ``keep`` (B, K) of ``x``: (B, K, D), in ``keep``'s order."""
        if self.drop is not None:
            tokens = self.drop.run_kept(self.encoder.forward_features, x, keep)  # (B, P + K, D)
            return tokens[:, self.encoder.num_prefix_tokens :]
        tokens, stages = self.encoder.forward_stages(x, keep)  # (B, K, D), the convolution stages' maps
        for fuse, stage in zip(self.fuse, stages):
            tokens = tokens + gather_tokens(fuse(stage).flatten(2).transpose(1, 2), keep)  # (B, N, D) -> (B, K, D)
        return self.encoder.norm(tokens)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        size = (self.grid[0] * self.patch, self.grid[1] * self.patch)
        if images.ndim != 4 or images.shape[1] != self.in_chans or tuple(images.shape[2:]) != size:
            raise ValueError(
                f"DMJD's encoder takes images (batch, {self.in_chans}, {size[0]}, {size[1]}), got "
                f"{tuple(images.shape)}: build the encoder for your image size and channels (img_size=, in_chans=)"
            )
        if not self._range_checked and not torch.compiler.is_compiling():
            self._range_checked = True
            low, high = torch.aminmax(images.detach().float())
            if low < -1e-3 or high > 1 + 1e-3:
                warnings.warn(
                    f"DMJD takes images in [0, 1], unnormalized (it normalizes the encoder's input itself and "
                    f"computes its targets from the raw pixels); this batch spans [{low:.3g}, {high:.3g}]: pass "
                    "the images before normalization (ToTensor without Normalize), as floats in [0, 1]",
                    stacklevel=2,
                )
        b = images.shape[0]
        visible, masked = self.make_masks(b, images.device)  # (B, V, K), (B, V, N)
        v, k = visible.shape[1:]
        targets = self.make_targets(images)  # (B, N, T)
        x = ((images - self.mean) / self.std).repeat_interleave(v, dim=0)  # (B*V, C, H, W), views adjacent
        keep = visible.flatten(0, 1)  # (B*V, K)
        patches = self.encode(x, keep)  # (B*V, K, D), row i = patch keep[:, i]

        # Invisible branch: decode the full grid, score the masked tokens of every view.
        dec = self.decoder_embed(patches)
        full = self.mask_token.to(dec.dtype).expand(b * v, masked.shape[-1], -1).clone()  # (B*V, N, Dd)
        full.scatter_(1, keep.unsqueeze(-1).expand_as(dec), dec)
        pred = self.decoder_pred(self.decoder_norm(self.decoder(full + self.decoder_pos)))  # (B*V, N, T)
        all_targets = targets.repeat_interleave(v, dim=0)  # (B*V, N, T)
        hidden = masked.flatten(0, 1)  # (B*V, N)
        per_token = (pred.float() - all_targets).pow(2).mean(-1)
        loss_masked = (per_token * hidden).sum() / hidden.sum()
        out = {"loss_masked": loss_masked, "loss": loss_masked}

        # Visible branch: each visible token regresses its own patch's target (same indices, same order).
        if self.visible_weight:
            vis_pred = self.predictor(self.projector(patches))  # (B*V, K, T)
            vis_target = gather_tokens(all_targets, keep)  # (B*V, K, T)
            loss_visible = F.smooth_l1_loss(vis_pred.float(), vis_target, beta=2.0)
            out["loss_visible"] = loss_visible
            out["loss"] = loss_masked + self.visible_weight * loss_visible
        return out

    def adaptive_lr(self, base_lr: float, images_per_step: int) -> float:
        """``base_lr * images * (prediction / corruption) / 256``: images, not views. One view predicts what it
        hides: the rate is then ``base_lr * images / 256``."""
        rate = self.prediction if self.views > 1 else self.corruption
        return base_lr * images_per_step * (rate / self.corruption) / 256
