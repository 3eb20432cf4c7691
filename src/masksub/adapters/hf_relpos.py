"""Hugging Face BEiT and Data2VecVision classifiers: drop patch tokens, gather the relative position bias.

``BeitForImageClassification`` and ``Data2VecVisionForImageClassification`` embed an image as
``[class token, patch tokens]`` (absolute position embeddings added, where the configuration has them)
and add a relative position bias to each attention: a ``...RelativePositionBias`` module per layer, or
one shared by all layers, returns a (1, heads, N, N) bias over the full grid. As timm's BEiT (the
``relpos`` adapter), the sub pass keeps the class token and ``num_keep(N, ratio)`` patch tokens per
sample after the embeddings, and each bias module's output is gathered to the kept tokens' rows and
columns, a (B, heads, K, K) bias: every pair of kept tokens keeps the bias of its own relative position.
The mean pool (or the class token) and the classifier read the kept tokens; the sub pass costs about
``1 - ratio`` of the main pass.

The bias modules are called with the sequence length they serve (``dim_size``), in the sub pass the
shorter one: they get the full length instead (so ``interpolate_pos_encoding`` resizes nothing), and their
output is gathered. A backward that recomputes checkpointed layers (``gradient_checkpointing_enable``)
calls them again with that length: the last sub pass's tokens serve it, so each sub pass's backward must
come before the next sub pass (as in ``Step``, the Trainer and Lightning).
"""

from __future__ import annotations

import torch
from torch import nn

from ..masking import keep_patch_tokens
from .hf_vit import HFTokenDropAdapter
from .registry import register_adapter
from .relpos import bias_rows, kept_bias

BIASES = {"BeitRelativePositionBias", "Data2VecVisionRelativePositionBias"}


@register_adapter(
    "hf_relpos",
    priority=30,
    description="Hugging Face BEiT / Data2VecVision classifiers: drop patch tokens, gather the relative bias",
)
class HFRelPosAdapter(HFTokenDropAdapter):
    """Drops a random ``ratio`` of patch tokens per sample; each attention gets the kept tokens' relative bias."""

    embeddings_classes = {"BeitEmbeddings", "Data2VecVisionEmbeddings"}  # [class token, patches] + positions
    backbone_classes = {"BeitModel", "Data2VecVisionModel"}  # as a backbone under a head of the user's

    def __init__(self, model: nn.Module, ratio: float, unit: int | None = None):
        super().__init__(model, ratio, unit)  # the class token is the one prefix token
        self._index: torch.Tensor | None = None  # (B, 1 + K): the last sub pass's tokens, as bias rows
        self._gather: int | None = None  # the length the bias module being called serves, when shorter
        self._bias_handles = []
        for module in model.modules():
            if type(module).__name__ in BIASES:
                self._bias_handles += [
                    module.register_forward_pre_hook(self._full_length, with_kwargs=True),
                    module.register_forward_hook(self._gather_hook),
                ]

    def _drop_hook(self, module: nn.Module, args: tuple, output):
        if not self._active:
            return None
        tokens = output[0] if isinstance(output, tuple) else output  # Data2VecVision adds the patch grid
        tokens, keep = keep_patch_tokens(tokens, self.num_prefix_tokens, self.ratio)
        self._index = bias_rows(keep, self.num_prefix_tokens)
        return (tokens, *output[1:]) if isinstance(output, tuple) else tokens

    def _full_length(self, module: nn.Module, args: tuple, kwargs: dict):
        """A bias module called for a shorter sequence (the sub pass) builds the full grid's bias instead."""
        (height, width), length = args[0], kwargs.get("dim_size")
        full = height * width + 1
        self._gather = length if length is not None and length != full else None
        return None if self._gather is None else (args, {**kwargs, "dim_size": full})

    def _gather_hook(self, module: nn.Module, args: tuple, bias: torch.Tensor):
        length, self._gather = self._gather, None
        return None if length is None else kept_bias(bias, self._index, length, self.name)

    def forward(self, model: nn.Module, *args, **kwargs):
        for key in ("attention_mask", "bool_masked_pos"):
            if kwargs.get(key) is not None:
                raise ValueError(
                    f"hf_relpos adapter: a given {key} covers every patch token, and the sub pass drops some: leave "
                    f"{key} out of the sub pass, or use sub='dropout' / 'droppath'"
                )
        return super().forward(model, *args, **kwargs)

    def remove(self) -> None:
        super().remove()
        for handle in self._bias_handles:
            handle.remove()
        self._index = None
