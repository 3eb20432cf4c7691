"""Hierarchical and grid-bound transformers: a learnable mask token after patch embedding.

Swin/SwinV2 windows, SAM's window attention, NesT's nested blocks and similar
blocks need the full token grid, so tokens cannot be dropped.
Instead the patch-embedding output is replaced by a learnable mask token at
masked positions, in units of ``unit`` pixels (default 32: 8x8 tokens for
Swin's 4-pixel patches) so the mask survives patch merging. No compute is
saved.

The mask token is a 1-D ``(C,)`` parameter of this adapter, not of the timm
model: timm's checkpoint filters drop keys named ``mask_token`` and optimizer
weight-decay rules skip 1-D parameters, and the plain model's state dict stays
loadable into ``timm.create_model`` unchanged. ``place_token_in`` moves it into
a module of the caller's (transformers' ``TimmWrapper`` around the timm model),
where what trains and saves that module holds it.
"""

from __future__ import annotations

import math

import torch
from timm.layers import to_2tuple
from torch import nn

from ..masking import check_masks_some, random_unit_mask, unit_grid, upsample_mask
from .registry import MaskAdapter, check_images, register_adapter


def _patch_embedding(model: nn.Module) -> nn.Module | None:
    """The module that turns the image into the token grid: timm's ``patch_embed``, or the first stage of
    torchvision's ``SwinTransformer`` (``features[0]``: a strided convolution, then the channels moved last)."""
    embed = getattr(model, "patch_embed", None)
    if isinstance(embed, nn.Module):
        return embed
    kind = type(model)
    if kind.__module__ == "torchvision.models.swin_transformer" and kind.__name__ == "SwinTransformer":
        return model.features[0]
    return None


def _embed_patch_size(embed: nn.Module) -> tuple[int, int] | None:
    """The pixels one token covers: a ``patch_embed``'s ``patch_size``; torchvision's Swin stage, its stride."""
    if isinstance(embed, nn.Sequential):  # torchvision's: Conv2d, Permute, norm
        return tuple(embed[0].stride) if isinstance(embed[0], nn.Conv2d) else None
    patch = getattr(embed, "patch_size", None)
    return None if patch is None else tuple(to_2tuple(patch))


def tokens_per_unit(patch_size: tuple[int, int], unit: int) -> tuple[int, int]:
    """The tokens one ``unit``-pixel mask block covers along height and width, or an error naming a unit that
    fits the patch size."""
    ph, pw = patch_size
    if unit % ph or unit % pw:
        step = math.lcm(ph, pw)
        raise ValueError(
            f"mask unit {unit} px is not a multiple of the patch size {ph}x{pw}; "
            f"use a unit such as {step * max(1, 32 // step)}"
        )
    return unit // ph, unit // pw


def _probe_layout(model: nn.Module) -> tuple[str, int] | None:
    """Run the patch embedding on a blank image and read its output layout and width."""
    embed = _patch_embedding(model)
    patch = None if embed is None else _embed_patch_size(embed)
    if patch is None:
        return None
    if embed is getattr(model, "patch_embed", None):  # timm's: built for an image size
        img = getattr(embed, "img_size", None)
        if img is None:
            return None
        img = to_2tuple(img)
    else:  # torchvision's Swin takes any size
        img = (8 * patch[0], 8 * patch[1])
    chans = getattr(model, "in_chans", None) or next(
        (m.in_channels for m in embed.modules() if isinstance(m, nn.Conv2d)), 3
    )
    grid = (img[0] // patch[0], img[1] // patch[1])
    param = next(embed.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    # the embedding's own dtype: a float32 probe of a bf16 model failed, and Swin fell to the pixel adapter
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    was_training = embed.training
    embed.eval()
    try:
        with torch.no_grad():
            out = embed(torch.zeros(1, chans, *img, device=device, dtype=dtype))
    except Exception:  # an embedding that cannot run alone is not one this adapter can hook
        return None
    finally:
        embed.train(was_training)
    if not isinstance(out, torch.Tensor):
        return None
    if out.ndim == 4 and tuple(out.shape[1:3]) == grid:
        return "NHWC", out.shape[3]
    if out.ndim == 4 and tuple(out.shape[2:4]) == grid:
        return "NCHW", out.shape[1]
    if out.ndim == 3 and out.shape[1] == grid[0] * grid[1]:
        return "NLC", out.shape[2]
    return None


@register_adapter(
    "masktoken",
    priority=20,
    description="Swin, SwinV2 (timm's, torchvision's), SAM ViT, others with a patch_embed: mask token",
)
class MaskTokenAdapter(MaskAdapter):
    """Replaces ``ratio`` of the ``unit``-pixel blocks by a learnable token after ``patch_embed``."""

    backbone = True  # also inside a model of the user's (a backbone under their head)

    def __init__(self, model: nn.Module, ratio: float, unit: int | None = None):
        super().__init__(model, ratio, unit)
        unit = self.unit
        layout = _probe_layout(model)
        if layout is None:
            raise TypeError(f"cannot read the patch-embedding output layout of {type(model).__name__}")
        self.layout, dim = layout
        embed = _patch_embedding(model)
        self._embed_ref = [embed]  # a list keeps it from being registered as a submodule
        self._unit_tokens = self.unit_tokens  # checks the unit against the patch size now, not at the first step
        # on the model's device, in its dtype: a model moved to the GPU (or cast to bf16) before wrap() needs no
        # second move; a CPU token failed the first sub pass of a CUDA model
        param = next(embed.parameters(), None)
        like = {} if param is None or not param.is_floating_point() else {"device": param.device, "dtype": param.dtype}
        self.mask_token = nn.Parameter(torch.zeros(dim, **like))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self._token_host: tuple[nn.Module, str] | None = None  # where place_token_in moved the token
        self._handle = embed.register_forward_hook(self._mask_hook)

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return _patch_embedding(model) is not None and _probe_layout(model) is not None

    @property
    def patch_size(self) -> tuple[int, int]:
        """Read from the model on each use: timm's ``set_input_size(patch_size=...)`` changes it in place."""
        return _embed_patch_size(self._embed_ref[0])

    @property
    def unit_tokens(self) -> tuple[int, int]:
        """A mask unit's tokens along height and width."""
        return tokens_per_unit(self.patch_size, self.unit)

    def place_token_in(self, module: nn.Module, name: str = "mask_token") -> None:
        """Move the mask token out of this adapter into ``module``, as its parameter ``name``: the optimizer,
        DDP and checkpoints of ``module`` then hold it. ``remove()`` takes it out of ``module`` again."""
        if hasattr(module, name):
            raise ValueError(f"{type(module).__name__} already has an attribute {name!r} for the mask token")
        module.register_parameter(name, self._parameters.pop("mask_token"))
        self._token_host = (module, name)

    @property
    def token(self) -> nn.Parameter:
        """The mask token, here or where ``place_token_in`` put it."""
        return self.mask_token if self._token_host is None else getattr(*self._token_host)

    def added_parameters(self) -> list[nn.Parameter]:
        """The mask token, once ``place_token_in`` put it into a module of the caller's."""
        return [] if self._token_host is None else [self.token]

    def _mask_hook(self, module: nn.Module, args: tuple, x: torch.Tensor):
        if not self._active:
            return None
        batch = x.shape[0]
        gh, gw = {"NHWC": x.shape[1:3], "NCHW": x.shape[2:4]}.get(self.layout, self._nlc_grid)
        th, tw = unit_tokens = self._unit_tokens
        mask = random_unit_mask(batch, (gh // th, gw // tw), self.ratio, x.device)
        mask = upsample_mask(mask, unit_tokens)  # (B, gh, gw), True = masked
        token = self.token.to(x.dtype)
        if self.layout == "NHWC":  # (B, gh, gw, C)
            return torch.where(mask.unsqueeze(-1), token, x)
        if self.layout == "NLC":  # (B, gh * gw, C)
            return torch.where(mask.view(batch, -1, 1), token, x)
        return torch.where(mask.unsqueeze(1), token.view(1, -1, 1, 1), x)  # NCHW

    def forward(self, model: nn.Module, x: torch.Tensor, **kwargs) -> torch.Tensor:
        check_images(x, self.name)
        height, width = x.shape[-2:]
        grid = unit_grid(height, width, self.unit, f"{self.name} adapter")
        check_masks_some(grid, self.ratio, self.unit, (height, width), f"{self.name} adapter")
        self._unit_tokens = self.unit_tokens  # read once per pass, outside the hook
        self._nlc_grid = (height // self.patch_size[0], width // self.patch_size[1])  # NLC hides the grid
        return self.run_with_hooks_active(model, x, **kwargs)  # the full grid: the model's keywords still fit

    def remove(self) -> None:
        self._handle.remove()
        if self._token_host is not None:
            delattr(*self._token_host)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, layout={self.layout}"
