"""timm's Hiera: drop whole mask units, as its masked-autoencoder pretraining does.

Hiera is hierarchical, yet built to run on a subset of its mask units: it groups its tokens by
mask unit (``mask_unit_size`` tokens, 8x8 of 4-pixel patches: 32x32 pixels), its early stages
attend within a unit, and its ``forward_features(x, mask)`` zeroes the dropped units' pixels
before the patch convolution and discards their tokens after the unroll. Its ``forward`` with a
mask returns features without the head, so this adapter does the same two things through hooks
(a mask for ``patch_embed``, a selection of the ``unroll`` output) while the model is called as
usual: the head pools the kept tokens, DDP around the model sees one call, and the sub pass costs
about ``1 - ratio`` of the main pass.

Each sample keeps ``num_keep(U, ratio)`` of its ``U`` mask units, at random. The unit is the
model's own (``unit=`` is ignored, as by the other token-dropping adapters). A model built with
``patch_drop_rate`` has its own unit dropping turned off in the sub pass, which masks instead.
"""

from __future__ import annotations

import torch
from timm.models.hiera import Hiera
from torch import nn

from ..masking import gather_tokens, num_keep, num_masked, random_keep_indices
from .registry import MaskAdapter, check_images, register_adapter


@register_adapter("hiera", priority=30, description="timm Hiera: drop whole mask units (32x32 pixels), as its MAE does")
class HieraAdapter(MaskAdapter):
    """Keeps ``num_keep(U, ratio)`` of each sample's ``U`` mask units: the others' pixels and tokens are dropped."""

    default_unit = None  # the model's mask unit

    def __init__(self, model: nn.Module, ratio: float, unit: int | None = None):
        super().__init__(model, ratio, unit)
        stride, size = model.patch_stride, model.mask_unit_size
        self.unit_pixels = (stride[0] * size[0], stride[1] * size[1])
        self._model_ref = [model]  # a list keeps the model from being registered as a submodule
        self._units = 0  # U of the running sub pass
        self._kept: torch.Tensor | None = None  # (B, K): the mask units the running sub pass keeps, ascending
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
        b, units = self._kept.shape[0], self._units
        keep = torch.zeros(b, units, dtype=torch.bool, device=self._kept.device).scatter_(1, self._kept, True)
        return args, {**kwargs, "mask": keep.view(b, 1, *self._model_ref[0].mask_spatial_shape)}  # zero the rest

    def _unroll_hook(self, module: nn.Module, args: tuple, x: torch.Tensor):
        if not self._active:
            return None
        # Unrolled tokens run unit-minor: token j * U + u is position j of unit u. Gathering the kept units in
        # ascending order keeps timm's own order (its boolean selection), with a shape known before the pass
        # (torch.compile cannot trace a boolean selection's).
        units, mu_size = self._units, self._model_ref[0].mu_size
        offsets = torch.arange(mu_size, device=x.device).view(1, -1, 1) * units  # (1, mu_size, 1)
        index = (offsets + self._kept.unsqueeze(1)).flatten(1)  # (B, mu_size * K)
        return gather_tokens(x, index)

    def forward(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        check_images(x, self.name)
        hiera = self._model_ref[0]
        grid = hiera.mask_spatial_shape
        expected = (grid[0] * self.unit_pixels[0], grid[1] * self.unit_pixels[1])
        if tuple(x.shape[-2:]) != expected:
            raise ValueError(
                f"hiera adapter: {type(hiera).__name__} was built for {expected[0]}x{expected[1]} images (its mask "
                f"units: a {grid[0]}x{grid[1]} grid), got {x.shape[-2]}x{x.shape[-1]}; resize the images or build "
                "the model with img_size= their size"
            )
        units = grid[0] * grid[1]
        if num_masked(units, self.ratio) == 0:
            raise ValueError(
                f"hiera adapter: a {expected[0]}x{expected[1]} image holds {units} of the model's mask units "
                f"({self.masked_unit()}), and ratio {self.ratio} drops none (a sample keeps at least one), "
                "so the sub branch would equal the main branch: raise the ratio, use larger images, or mask smaller "
                "blocks of pixels instead (wrap(model, adapter='pixels', unit=8))"
            )
        self._units = units
        self._kept = random_keep_indices(x.shape[0], units, num_keep(units, self.ratio), x.device).sort(1).values
        own_rate = hiera.patch_drop_rate
        if own_rate:
            hiera.patch_drop_rate = 0.0  # its own unit dropping would select again from the selected tokens
        try:
            return self.run_with_hooks_active(model, x)
        finally:
            if own_rate:
                hiera.patch_drop_rate = own_rate
            self._kept = None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def masked_unit(self) -> str:
        return "{}x{}-pixel mask units".format(*self.unit_pixels)
