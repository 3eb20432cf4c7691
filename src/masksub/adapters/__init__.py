"""Mask adapters, one module per model family; importing this package registers them."""

from . import (  # noqa: F401  (registration side effect)
    cait,
    convvit,
    gemma4,
    gpsa,
    hf_masktoken,
    hf_relpos,
    hf_siglip2,
    hf_swin,
    hf_vit,
    hiera,
    masktoken,
    naflex,
    pixels,
    relpos,
    swin,
    text,
    timm_wrapper,
    tv_vit,
    vit,
    vlm_tower,
)
from .registry import MaskAdapter, adapted_model, list_adapters, register_adapter, resolve_adapter

__all__ = ["MaskAdapter", "adapted_model", "list_adapters", "register_adapter", "resolve_adapter"]
