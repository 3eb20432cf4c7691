"""Hiera (timm's, and Hugging Face's classifier): drop whole mask units, as its masked-autoencoder pretraining does.

Hiera is hierarchical, yet built to run on a subset of its mask units: it groups its tokens by
mask unit (``mask_unit_size`` tokens, 8x8 of 4-pixel patches: 32x32 pixels), its early stages
attend within a unit, and its masked path zeroes the dropped units' pixels before the patch
convolution and discards their tokens after the unroll. A classifier does not take that path
(timm's ``forward`` with a mask returns features without the head; Hugging Face's classifier
never masks), so these adapters do the same two things through hooks while the model is called as
usual: the head pools the kept tokens, DDP around the model sees one call, and the sub pass costs
about ``1 - ratio`` of the main pass.

Each sample keeps ``num_keep(U, ratio)`` of its ``U`` mask units, at random. The unit is the
model's own (``unit=`` is ignored, as by the other token-dropping adapters).
"""

from __future__ import annotations

import torch
from timm.models.hiera import Hiera
from torch import nn

from ..masking import gather_tokens, num_keep, num_masked, random_keep_indices, upsample_mask
from .registry import MaskAdapter, check_images, register_adapter


class _MaskUnitDropping(MaskAdapter):
    """What both Hiera adapters share: the size checks and the kept units of the running sub pass."""

    default_unit = None  # the model's mask unit

    def __init__(self, model: nn.Module, ratio: float, unit_pixels: tuple[int, int], grid: tuple[int, int]):
        super().__init__(model, ratio)
        self.unit_pixels, self.grid = unit_pixels, grid
        self._kept: torch.Tensor | None = None  # (B, K): the mask units the running sub pass keeps, ascending
        self._handles = []

    def draw_kept(self, x: torch.Tensor, model_name: str) -> None:
        """Check the images and draw each sample's kept units for the sub pass."""
        check_images(x, self.name)
        (gh, gw), (uh, uw) = self.grid, self.unit_pixels
        if tuple(x.shape[-2:]) != (gh * uh, gw * uw):
            raise ValueError(
                f"{self.name} adapter: {model_name} was built for {gh * uh}x{gw * uw} images (its mask units: a "
                f"{gh}x{gw} grid), got {x.shape[-2]}x{x.shape[-1]}; resize the images or build the model for their size"
            )
        units = gh * gw
        if num_masked(units, self.ratio) == 0:
            raise ValueError(
                f"{self.name} adapter: a {gh * uh}x{gw * uw} image holds {units} of the model's mask units "
                f"({self.masked_unit()}), and ratio {self.ratio} drops none (a sample keeps at least one), "
                "so the sub branch would equal the main branch: raise the ratio, use larger images, or mask smaller "
                "blocks of pixels instead (wrap(model, adapter='pixels', unit=8))"
            )
        self._kept = random_keep_indices(x.shape[0], units, num_keep(units, self.ratio), x.device).sort(1).values

    def keep_mask(self) -> torch.Tensor:
        """(B, U) bool of the running sub pass, True on the kept units."""
        b, units = self._kept.shape[0], self.grid[0] * self.grid[1]
        return torch.zeros(b, units, dtype=torch.bool, device=self._kept.device).scatter_(1, self._kept, True)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def masked_unit(self) -> str:
        return "{}x{}-pixel mask units".format(*self.unit_pixels)


@register_adapter("hiera", priority=30, description="timm Hiera: drop whole mask units (32x32 pixels), as its MAE does")
class HieraAdapter(_MaskUnitDropping):
    """Keeps ``num_keep(U, ratio)`` of each sample's ``U`` mask units: the others' pixels and tokens are dropped.

    A model built with ``patch_drop_rate`` has its own unit dropping turned off in the sub pass, which drops instead.
    """

    backbone = True  # also inside a model of the user's (a backbone under their head)

    def __init__(self, model: nn.Module, ratio: float, unit: int | None = None):
        stride, size = model.patch_stride, model.mask_unit_size
        super().__init__(model, ratio, (stride[0] * size[0], stride[1] * size[1]), tuple(model.mask_spatial_shape))
        self._model_ref = [model]  # a list keeps the model from being registered as a submodule
        self._handles = [
            model.patch_embed.register_forward_pre_hook(self._embed_hook, with_kwargs=True),
            model.unroll.register_forward_hook(self._unroll_hook),
        ]

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return isinstance(model, Hiera) and len(model.mask_spatial_shape) == 2

    def _embed_hook(self, module: nn.Module, args: tuple, kwargs: dict):
        if not self._active:
            return None
        return args, {**kwargs, "mask": self.keep_mask().view(-1, 1, *self.grid)}  # timm zeroes the others' pixels

    def _unroll_hook(self, module: nn.Module, args: tuple, x: torch.Tensor):
        if not self._active:
            return None
        # Unrolled tokens run unit-minor: token j * U + u is position j of unit u. Gathering the kept units in
        # ascending order keeps timm's own order (its boolean selection), with a shape known before the pass
        # (torch.compile cannot trace a boolean selection's).
        units, mu_size = self.grid[0] * self.grid[1], self._model_ref[0].mu_size
        offsets = torch.arange(mu_size, device=x.device).view(1, -1, 1) * units  # (1, mu_size, 1)
        index = (offsets + self._kept.unsqueeze(1)).flatten(1)  # (B, mu_size * K)
        return gather_tokens(x, index)

    def forward(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        hiera = self._model_ref[0]
        self.draw_kept(x, type(hiera).__name__)
        own_rate = hiera.patch_drop_rate
        if own_rate:
            hiera.patch_drop_rate = 0.0  # its own unit dropping would select again from the selected tokens
        try:
            return self.run_with_hooks_active(model, x)
        finally:
            if own_rate:
                hiera.patch_drop_rate = own_rate
            self._kept = None


def _hf_patch_embeddings(model: nn.Module) -> nn.Module | None:
    """A Hugging Face ``HieraForImageClassification``'s patch embeddings, which return the kept-unit mask."""
    if type(model).__name__ != "HieraForImageClassification" or not type(model).__module__.startswith("transformers."):
        return None
    return getattr(getattr(getattr(model, "hiera", None), "embeddings", None), "patch_embeddings", None)


@register_adapter("hf_hiera", priority=30, description="Hugging Face HieraForImageClassification: drop mask units")
class HFHieraAdapter(_MaskUnitDropping):
    """The same for Hugging Face's classifier: its model discards the units its patch embeddings report as dropped
    (the path its MAE model takes), so the hooks zero their pixels and report them."""

    def __init__(self, model: nn.Module, ratio: float, unit: int | None = None):
        config = model.config
        stride, size = config.patch_stride, config.masked_unit_size
        embed = _hf_patch_embeddings(model)
        super().__init__(model, ratio, (stride[0] * size[0], stride[1] * size[1]), tuple(embed.mask_spatial_shape))
        self._handles = [
            embed.register_forward_pre_hook(self._zero_hook, with_kwargs=True),
            embed.register_forward_hook(self._report_hook),
        ]

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return _hf_patch_embeddings(model) is not None

    def _zero_hook(self, module: nn.Module, args: tuple, kwargs: dict):
        if not self._active:
            return None
        x = args[0] if args else kwargs["pixel_values"]
        keep = upsample_mask(self.keep_mask().view(-1, *self.grid), self.unit_pixels).unsqueeze(1)  # (B, 1, H, W)
        x = x * keep.to(x.dtype)
        return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "pixel_values": x})

    def _report_hook(self, module: nn.Module, args: tuple, output: tuple):
        if not self._active:
            return None
        embeddings, _, _ = output
        return embeddings, self.keep_mask(), None  # the model keeps these units' tokens, in its own order

    def forward(self, model: nn.Module, *args, **kwargs):
        x = kwargs.get("pixel_values", args[0] if args else None)
        self.draw_kept(x, "HieraForImageClassification")
        try:
            return self.run_with_hooks_active(model, *args, **kwargs)
        finally:
            self._kept = None
