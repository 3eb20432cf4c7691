"""timm's ConViT (``convit_tiny`` ... ``convit_base``): drop patch tokens, gather the positional scores.

ConViT's first blocks use gated positional self-attention (GPSA): each head mixes the attention of the
tokens' contents with a positional attention computed from every pair's relative position on the full
grid (``rel_indices``: the offsets and squared distance, an (N, N, 3) table). The class token joins after
those blocks, and everything else works on any set of tokens. So the sub pass keeps ``num_keep(N, ratio)``
patch tokens per sample after the position embedding (the class token is not there yet), and each GPSA
attention gets the table rows and columns of the kept tokens, gathered per sample (a (B, K, K, 3) table) for
the one call and put back after it: every pair of kept tokens keeps its own relative position. The sub pass
costs about ``1 - ratio`` of the main pass.

(masksub's own ConViT, ConvMAE's hybrid that DMJD uses, is a different model: the ``convvit`` adapter.)
"""

from __future__ import annotations

import torch
from timm.models.convit import GPSA, ConVit
from torch import nn

from ..masking import keep_patch_tokens
from .cait import CaitAdapter
from .registry import register_adapter
from .relpos import gather_bias


@register_adapter("gpsa", priority=30, description="timm ConViT: drop patch tokens, gather the positional scores")
class GPSAAdapter(CaitAdapter):
    """Drops a random ``ratio`` of patch tokens per sample (where CaiT's adapter does: at the dropout after the
    position embedding, before the class token joins); each GPSA attention gets the kept tokens' positions."""

    num_prefix_tokens = 0  # where the tokens are dropped, the class token has not joined yet

    def __init__(self, model: nn.Module, ratio: float, unit: int | None = None):
        super().__init__(model, ratio, unit)
        self._keep: torch.Tensor | None = None  # (B, K): the patches the running sub pass keeps, of _patches
        self._patches = 0
        self._saved: dict[int, torch.Tensor] = {}  # id(attention) -> its full table, put back after the call
        self._handles = []
        for module in model.modules():
            if isinstance(module, GPSA):
                self._handles.append(module.register_forward_pre_hook(self._gather_hook))
                self._handles.append(module.register_forward_hook(self._restore_hook))

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return isinstance(model, ConVit)

    def _drop_hook(self, module: nn.Module, args: tuple, x: torch.Tensor):
        if not self._active:
            return None
        self._patches = x.shape[1]  # patch tokens only: the class token joins after the GPSA blocks
        x, self._keep = keep_patch_tokens(x, 0, self.ratio)
        return x

    def _gather_hook(self, module: GPSA, args: tuple) -> None:
        if not self._active:
            return
        full = module.rel_indices  # the full grid's table, or a placeholder before the model's first call
        if full.shape[1] != self._patches:
            full = module.get_rel_indices(self._patches)  # (1, N, N, 3), as the model's own call makes it
        self._saved[id(module)] = full  # put back after the call: the table the next main pass uses
        module.rel_indices = gather_bias(full.permute(0, 3, 1, 2), self._keep).permute(0, 2, 3, 1)  # (B, K, K, 3)

    def _restore_hook(self, module: GPSA, args: tuple, output: torch.Tensor) -> None:
        if id(module) in self._saved:
            module.rel_indices = self._saved.pop(id(module))

    def forward(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        try:
            return super().forward(model, x)
        finally:
            self._keep = None

    def remove(self) -> None:
        super().remove()
        for handle in self._handles:
            handle.remove()
