"""CNNs (ResNet, ConvNeXt, RegNet, EfficientNet...) and any other 4-D image model, Hugging Face
vision models included (images passed as ``pixel_values=``) but the ViT-like ones ``hf_vit`` takes.

Zeroes the input pixels of ``num_masked`` random ``unit`` x ``unit`` blocks per
sample before the model sees the batch. Valid for every image model, saves no
compute, touches nothing inside the model. Where ``unit`` does not divide a side
(Inception at 299 px, EfficientNet-B3 at 300), the grid covers the image and its
last row and column of blocks are cut at the edge: they count as blocks.
"""

from __future__ import annotations

import torch
from torch import nn

from ..masking import check_masks_some, random_unit_mask, upsample_mask
from .registry import MaskAdapter, check_images, register_adapter


@register_adapter("pixels", priority=10, description="CNNs and any model with a Conv2d: zero input-pixel blocks")
class PixelMaskAdapter(MaskAdapter):
    """Zeroes a random ``ratio`` of ``unit``-pixel input blocks per sample."""

    generic = True  # a model of the user's is searched for a backbone first

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return any(isinstance(m, nn.Conv2d) for m in model.modules())

    def forward(self, model: nn.Module, *args, **kwargs):
        # The images come first, or as ``pixel_values=`` (Hugging Face vision models); the rest passes through.
        by_name = len(args) == 0 and "pixel_values" in kwargs  # (dynamo cannot trace `not` of a tuple)
        x = kwargs["pixel_values"] if by_name else (args[0] if args else None)
        check_images(x, self.name)
        height, width = x.shape[-2:]
        unit = self.unit  # the grid rounds up: edge blocks are cut to the image (positive sizes: dynamic shapes)
        grid = ((height + unit - 1) // unit, (width + unit - 1) // unit)
        check_masks_some(grid, self.ratio, unit, (height, width), f"{self.name} adapter")
        mask = upsample_mask(random_unit_mask(x.shape[0], grid, self.ratio, x.device), unit)
        mask = mask[:, :height, :width]  # (B, H, W)
        x = torch.where(mask.unsqueeze(1), 0.0, x)  # keeps x's memory format: masked_fill made channels-last NCHW
        if by_name:
            return model(**{**kwargs, "pixel_values": x})
        return model(x, *args[1:], **kwargs)
