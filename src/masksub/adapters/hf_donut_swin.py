"""Hugging Face's Donut-Swin (``DonutSwinForImageClassification``, ``DonutSwinModel``) for the ``hf_swin_drop``
adapter: its layers on the kept tokens.

A ``DonutSwinLayer`` is Swin's layer in transformers' earlier layout: separate query, key and value layers and an
output projection (``attention.self``, ``attention.output``), its own relative position bias table and eager
attention. It shrinks its window to a grid no larger than a window, pads the grid and then rolls it, and leaves its
MLP branch without stochastic depth, which the sub pass follows. Its stages are recomputed under gradient
checkpointing, not its layers.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .windows import hf_layer_attention

MODEL = ("transformers.models.donut.modeling_donut_swin", "DonutSwinModel")  # the base model's module and class
# its layers' attention.self: q, k and v layers, the bias table
PARTS = ("query", "key", "value", "relative_position_bias_table", "relative_position_index")


def _position_bias(attn: nn.Module) -> torch.Tensor:
    """The relative position bias (1, heads, N, N) from the attention's table."""
    area = attn.window_size[0] * attn.window_size[1]
    bias = attn.relative_position_bias_table[attn.relative_position_index.view(-1)].view(area, area, -1)
    return bias.permute(2, 0, 1).unsqueeze(0)


def _attend(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Donut-Swin's eager attention with ``mask`` (B * nW, heads, N, N) holding the position bias."""
    scores = q @ k.transpose(-1, -2) / attn.attention_head_size**0.5
    return attn.dropout(F.softmax(scores + mask, dim=-1)) @ v


def layer(module: nn.Module, method, x: torch.Tensor, *args, keep=None, grid=None, **kwargs):
    """A ``DonutSwinLayer`` on the kept tokens ``x`` (B, K, C) at ``keep`` of the ``grid``. Without ``keep``, its
    own forward (its stage passes its arguments by position)."""
    if keep is None:
        return method(module, x, *args, **kwargs)
    if not kwargs.get("always_partition", False):
        module.set_shift_and_window_size(grid)  # as its forward does: the window shrinks to a smaller grid
    attn = module.attention.self
    out = hf_layer_attention(
        module,
        module.layernorm_before(x),
        keep,
        grid,
        qkv=lambda t: torch.cat((attn.query(t), attn.key(t), attn.value(t)), -1),
        heads=attn.num_attention_heads,
        bias=_position_bias(attn),
        attend=partial(_attend, attn),
    )
    projection = module.attention.output
    x = x + module.drop_path(projection.dropout(projection.dense(out)))
    return x + module.output(module.intermediate(module.layernorm_after(x)))  # no stochastic depth here
