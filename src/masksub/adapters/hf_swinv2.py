"""Hugging Face's Swinv2 (``Swinv2ForImageClassification``, ``Swinv2Model``) for the ``hf_swin_drop`` adapter: its
layers on the kept tokens.

A ``Swinv2Layer`` fixes its window and shift when built (the window shrinks to a smaller configured grid, which then
does not shift), pads the grid to whole windows and then rolls it, and runs cosine attention with a continuous
position bias (k without a bias); it adds its shift mask to the scores twice, which the sub pass follows. It
normalizes after the attention and after the MLP (residual post-norm), and its patch merging normalizes after the
reduction. Its stages, not its layers, are recomputed under gradient checkpointing.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .windows import continuous_position_bias, cosine_scores, hf_layer_attention

MODEL = ("transformers.models.swinv2.modeling_swinv2", "Swinv2Model")  # the base model's module and class
# its layers' attention.self: q, k and v layers, the continuous bias MLP
PARTS = ("query", "key", "value", "logit_scale", "continuous_position_bias_mlp")


def _attend(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Swinv2's attention with ``mask`` (B * nW, heads, N, N) holding the position bias: (B * nW, heads, N, d)."""
    return attn.dropout(F.softmax(cosine_scores(q, k, attn.logit_scale) + mask, dim=-1)) @ v


def layer(module: nn.Module, method, x: torch.Tensor, *args, keep=None, grid=None, **kwargs) -> torch.Tensor:
    """A ``Swinv2Layer`` on the kept tokens ``x`` (B, K, C) at ``keep`` of the ``grid``. Without ``keep``, its own
    forward."""
    if keep is None:
        return method(module, x, *args, **kwargs)
    attn = module.attention.self
    out = hf_layer_attention(
        module,
        x,
        keep,
        grid,
        qkv=lambda t: torch.cat((attn.query(t), attn.key(t), attn.value(t)), -1),
        heads=attn.num_attention_heads,
        bias=continuous_position_bias(
            attn.continuous_position_bias_mlp,
            attn.relative_coords_table,
            attn.relative_position_index,
            attn.window_size,
            attn.num_attention_heads,
        ),
        attend=partial(_attend, attn),
        shift_mask_times=2,  # the model adds it twice
    )
    projection = module.attention.output
    x = x + module.drop_path(module.layernorm_before(projection.dropout(projection.dense(out))))
    return x + module.drop_path(module.layernorm_after(module.output(module.intermediate(x))))
