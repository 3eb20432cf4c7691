"""Mask adapters, one module per model family; importing this package registers them."""

from . import cait, convvit, hf_masktoken, hf_vit, hiera, masktoken, naflex, pixels, text, timm_wrapper, tv_vit, vit  # noqa: F401  (registration side effect)
from .registry import MaskAdapter, adapted_model, list_adapters, register_adapter, resolve_adapter

__all__ = ["MaskAdapter", "adapted_model", "list_adapters", "register_adapter", "resolve_adapter"]
