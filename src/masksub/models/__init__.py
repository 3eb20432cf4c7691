"""Models masksub adds to timm's registry (importing this package registers them)."""

from .convvit import ConvViT

__all__ = ["ConvViT"]
