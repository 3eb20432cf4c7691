"""timm's BEiT (BEiT, BEiT v2) and ``vit_relpos`` / ``vit_srelpos``: drop patch tokens, gather the relative bias.

These ViTs add a relative position bias to each attention: an (N, N) table per head over the full token
grid (the class token's rows and columns included), built inside the attention or once for all blocks.
Everything else (the blocks' MLPs and norms, the mean or class-token pool) works on any set of tokens. So
the sub pass keeps ``num_keep(N, ratio)`` patch tokens per sample, as for a plain ViT, and each attention
adds the bias of the kept tokens only: rows and columns gathered per sample, a (B, heads, K, K) bias.
Every pair of kept tokens keeps the bias of its own relative position; the sub pass costs about
``1 - ratio`` of the main pass.

The tokens are dropped after BEiT's absolute position embedding (its ``pos_drop``), or after
``vit_relpos``'s patch embedding, before the class token joins. The per-block biases are gathered where
the attention asks for them, for the sequence it gets: a backward that recomputes checkpointed blocks
(``set_grad_checkpointing``) runs the main and the sub pass's attention again with their own bias. A
recomputed sub-pass block takes the kept tokens of the last sub pass, so each sub pass's backward must
come before the next sub pass (as in ``Step``, the Trainer and Lightning); a recomputed block of another
length is refused.
"""

from __future__ import annotations

from functools import partial

import torch
from timm.layers import to_2tuple
from timm.models.beit import Beit
from timm.models.vision_transformer_relpos import VisionTransformerRelPos
from torch import nn

from ..masking import keep_patch_tokens
from .registry import MaskAdapter, check_patch_images, register_adapter


def gather_bias(bias: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows and columns ``index`` (B, K) of an attention bias (H, N, N) or (1 or B, H, N, N) -> (B, H, K, K)."""
    batch, k = index.shape
    n = bias.shape[-1]
    flat = bias.reshape(-1, bias.shape[-3], n * n).expand(batch, -1, -1)
    pairs = (index.unsqueeze(2) * n + index.unsqueeze(1)).view(batch, 1, k * k)
    return flat.gather(2, pairs.expand(-1, flat.shape[1], -1)).view(batch, -1, k, k)


def bias_rows(keep: torch.Tensor, prefix: int) -> torch.Tensor:
    """The bias rows (B, P + K) of every prefix token and the kept patches ``keep`` (B, K) (patch ``i`` is row
    ``P + i``)."""
    first = torch.arange(prefix, device=keep.device).expand(keep.shape[0], -1)
    return torch.cat((first, keep + prefix), dim=1)


def kept_bias(bias: torch.Tensor, index: torch.Tensor | None, length: int, adapter: str) -> torch.Tensor:
    """``bias`` gathered to the tokens ``index`` (B, P + K) of the last sub pass, for an attention over ``length``
    tokens; an error where that sub pass kept another count (its backward did not come before the next one)."""
    if index is None or index.shape[1] != length:
        raise RuntimeError(
            f"{adapter} adapter: an attention got {length} tokens and its relative bias covers {bias.shape[-1]}, "
            "but the last sub pass kept "
            + ("none" if index is None else str(index.shape[1]))
            + ": run each sub pass's backward before the next sub pass"
        )
    return gather_bias(bias, index)


def _bias_sources(model: nn.Module) -> tuple[list[tuple[nn.Module, nn.Module, str]], list[tuple[nn.Module, str]]]:
    """The model's per-block biases as (attention, module with the bias method, method name) and its shared ones
    as (module, method name, or "" for a module whose call returns the bias)."""
    per_block, shared = [], []
    if isinstance(model, Beit):
        if model.rel_pos_bias is not None:
            shared.append((model.rel_pos_bias, ""))
        for block in model.blocks:
            if block.attn.relative_position_bias_table is not None:
                per_block.append((block.attn, block.attn, "_get_rel_pos_bias"))
    else:
        if model.shared_rel_pos is not None:
            shared.append((model.shared_rel_pos, "get_bias"))
        for block in model.blocks:
            if block.attn.rel_pos is not None:
                per_block.append((block.attn, block.attn.rel_pos, "get_bias"))
    return per_block, shared


@register_adapter(
    "relpos", priority=30, description="timm BEiT / BEiT v2 / vit_relpos: drop patch tokens, gather the relative bias"
)
class RelPosAdapter(MaskAdapter):
    """Drops a random ``ratio`` of patch tokens per sample; each attention gets the kept tokens' relative bias."""

    default_unit = None  # single patch tokens
    backbone = True  # also inside a model of the user's (a backbone under their head)

    def __init__(self, model: nn.Module, ratio: float, unit: int | None = None):
        super().__init__(model, ratio, unit)
        self._model_ref = [model]  # a list keeps the model from being registered as a submodule
        self.bias_prefix = model.num_prefix_tokens  # the bias's first rows and columns: the class token
        beit = isinstance(model, Beit)
        # BEiT drops after its position embedding, the class token in; vit_relpos before the token joins
        self.num_prefix_tokens = self.bias_prefix if beit else 0
        self._index: torch.Tensor | None = None  # (B, P + K): the last sub pass's tokens, as bias rows
        self._length: int | None = None  # the sequence length of the attention being run
        self._handles = [self.drop_module.register_forward_hook(self._drop_hook)]
        self._methods: list[tuple[nn.Module, str]] = []
        per_block, shared = _bias_sources(model)
        for attn, owner, method in per_block:
            self._handles.append(attn.register_forward_pre_hook(self._length_hook))
            self._override(owner, method, per_block=True)
        for owner, method in shared:
            if method:
                self._override(owner, method, per_block=False)
            else:
                self._handles.append(owner.register_forward_hook(self._shared_hook))

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return isinstance(model, (Beit, VisionTransformerRelPos))

    @property
    def patch_size(self) -> tuple[int, int]:
        """Read from the model on each use: timm's ``set_input_size(patch_size=...)`` changes it in place."""
        return tuple(to_2tuple(self._model_ref[0].patch_embed.patch_size))

    @property
    def drop_module(self) -> nn.Module:
        """Where the tokens are dropped: BEiT's dropout after the position embedding, or the norm that ends
        ``vit_relpos``'s patch embedding (its input: the patch tokens, before the class token joins)."""
        model = self._model_ref[0]
        return model.pos_drop if isinstance(model, Beit) else model.patch_embed.norm

    def _override(self, owner: nn.Module, method: str, per_block: bool) -> None:
        # the class's function, not the bound method: a pickled model then unpickles to the same override
        setattr(owner, method, partial(self._bias, owner, getattr(type(owner), method), per_block))
        self._methods.append((owner, method))

    def _drop_hook(self, module: nn.Module, args: tuple, x: torch.Tensor):
        if not self._active:
            return None
        x, keep = keep_patch_tokens(args[0], self.num_prefix_tokens, self.ratio)
        self._index = bias_rows(keep, self.bias_prefix)
        return x

    def _length_hook(self, module: nn.Module, args: tuple) -> None:
        self._length = args[0].shape[1]

    def _bias(self, owner: nn.Module, method, per_block: bool) -> torch.Tensor:
        bias = method(owner)
        if per_block:  # also while a backward recomputes a checkpointed block: the sequence tells which pass
            return bias if self._length == bias.shape[-1] else kept_bias(bias, self._index, self._length, self.name)
        return gather_bias(bias, self._index) if self._active else bias  # shared: made once, before the blocks

    def _shared_hook(self, module: nn.Module, args: tuple, bias: torch.Tensor):
        return gather_bias(bias, self._index) if self._active else None

    def forward(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        check_patch_images(x, self.patch_size, self.name)
        return self.run_with_hooks_active(model, x)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        for owner, method in self._methods:
            delattr(owner, method)  # the class's method again
        self._index = None
