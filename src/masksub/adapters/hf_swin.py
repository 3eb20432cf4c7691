"""Hugging Face's Swin, Swinv2 and Donut-Swin (``SwinForImageClassification``, ``SwinModel``, ``Swinv2...``,
``DonutSwin...``), opt-in (``adapter="hf_swin_drop"``): drop whole mask units, each window attending to its kept
tokens, as ``swin_drop`` does for timm's and torchvision's.

Hugging Face's encoder runs its stages on (B, H * W, C) sequences with the grid's size beside them; a stage runs its
layers and then its patch merging. A Swin layer shrinks its window to the grid where the grid is no larger than a
window (and then does not shift), pads the grid to whole windows and then rolls it, and calls the model's attention
function (eager or SDPA) with its position bias and shift mask: the sub pass calls that function too, with the kept
tokens' key mask added. Swinv2's layers are in ``hf_swinv2``, Donut-Swin's in ``hf_donut_swin``. The encoder
returns the kept tokens of the last stage, which the model's norm and mean pool read as usual. Its hidden states and
attention weights are not returned in the sub pass. Stages and layers are recomputed in the backward where the
model's own forward recomputes them.
"""

from __future__ import annotations

import sys
from functools import partial

import torch
from torch import nn

from . import hf_donut_swin, hf_swinv2
from .registry import register_adapter
from .swin import SwinDropAdapter
from .windows import hf_layer_attention, merge


def _swin_model(model: nn.Module) -> nn.Module | None:
    """The ``SwinModel``, ``Swinv2Model`` or ``DonutSwinModel`` of a Hugging Face Swin classifier, or the model
    itself, where its layers have the layout this adapter knows (Swin's separate q, k, v and output projections);
    else None."""
    swin = _body(model)
    family = _family(swin)
    if family is not None:
        attention = swin.encoder.layers[0].blocks[0].attention
        parts = all(hasattr(getattr(attention, "self", None), p) for p in family.PARTS)
        return swin if parts and hasattr(attention, "output") else None
    if type(swin).__module__ != "transformers.models.swin.modeling_swin" or type(swin).__name__ != "SwinModel":
        return None
    attention = swin.encoder.layers[0].blocks[0].attention
    return swin if all(hasattr(attention, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")) else None


def _family(swin: nn.Module):
    """The module of this package with the layers of a ``Swinv2Model`` or ``DonutSwinModel``, else None."""
    return next(
        (f for f in (hf_swinv2, hf_donut_swin) if (type(swin).__module__, type(swin).__name__) == f.MODEL), None
    )


def _body(model: nn.Module) -> nn.Module:
    """A classifier's Swin model (its ``swin``, ``swinv2`` or ``donut``), or the model itself."""
    bodies = (getattr(model, name, None) for name in ("swin", "swinv2", "donut"))
    return next((body for body in bodies if isinstance(body, nn.Module)), model)


def _checkpointed(module: nn.Module, run, x: torch.Tensor) -> torch.Tensor:
    """``run(x)``, recomputed in the backward where the model has gradient checkpointing on for ``module``, as its
    own forward is."""
    if getattr(module, "gradient_checkpointing", False) and module.training and torch.is_grad_enabled():
        return module._gradient_checkpointing_func(run, x)
    return run(x)


def _attend(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The model's attention function (its ``_attn_implementation``) with the additive ``mask``: (B * nW, heads,
    N, d)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.swin.modeling_swin import eager_attention_forward

    interface = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, eager_attention_forward)
    dropout = attn.attention_dropout if attn.training else 0.0
    out, _ = interface(attn, q, k, v, mask, dropout=dropout, scaling=attn.scaling)
    return out.transpose(1, 2)


def _layer(layer: nn.Module, method, x: torch.Tensor, *args, keep=None, grid=None, always_partition=False, **kwargs):
    """A ``SwinLayer`` on the kept tokens ``x`` (B, K, C) at ``keep`` of the ``grid``, recomputed in the backward
    where the model has gradient checkpointing on, as its own forward is. Without ``keep``, its own forward."""
    if keep is None:
        return method(layer, x, *args, always_partition=always_partition, **kwargs)
    return _checkpointed(layer, partial(_kept, layer, keep=keep, grid=grid, always_partition=always_partition), x)


def _kept(layer: nn.Module, x: torch.Tensor, keep: torch.Tensor, grid: tuple[int, int], always_partition: bool):
    if not always_partition:
        layer.set_shift_and_window_size(grid)  # as its forward does: the window shrinks to a smaller grid
    attn = layer.attention
    out = hf_layer_attention(
        layer,
        layer.layernorm_before(x),
        keep,
        grid,
        qkv=lambda t: torch.cat((attn.q_proj(t), attn.k_proj(t), attn.v_proj(t)), -1),
        heads=attn.num_attention_heads,
        bias=attn.relative_position_bias(),
        attend=partial(_attend, attn),
    )
    x = x + layer.drop_path(layer.dropout(attn.o_proj(out)))
    return x + layer.dropout(layer.mlp(layer.layernorm_after(x)))


def _stage(stage: nn.Module, method, x: torch.Tensor, *args, keep=None, to=None, grid=None, **kwargs):
    """A ``SwinStage`` (``Swinv2Stage``, ``DonutSwinStage``) on the kept tokens ``x`` (B, K, C) at ``keep`` of the
    ``grid``: its layers, then its patch merging into the tokens ``to`` of the next grid, each through its own call.
    Without ``keep``, its own forward."""
    if keep is None:
        return method(stage, x, *args, **kwargs)
    return _checkpointed(stage, partial(_kept_stage, stage, keep=keep, to=to, grid=grid, **kwargs), x)


def _kept_stage(stage: nn.Module, x: torch.Tensor, keep, to, grid, **kwargs):
    for layer in stage.blocks:
        x = layer(x, keep=keep, grid=grid, **kwargs)
    return x if stage.downsample is None else stage.downsample(x, keep=keep, to=to, grid=grid)


@register_adapter(
    "hf_swin_drop",
    priority=14,  # below hf_masktoken's: only where asked for (adapter="hf_swin_drop")
    description="Hugging Face Swin, Swinv2, Donut-Swin, opt-in: drops whole mask units; windows attend to kept tokens",
)
class HFSwinDropAdapter(SwinDropAdapter):
    """Drops a random ``ratio`` of the ``unit``-pixel blocks per sample; windows attend to the kept tokens only."""

    backbone = True  # also a SwinModel inside a model of the user's

    def _install(self, model: nn.Module) -> None:
        encoder = _swin_model(model).encoder
        encoder.forward = partial(self._encoder, encoder, type(encoder).forward)
        for stage in encoder.layers:
            stage.forward = partial(_stage, stage, type(stage).forward)
        swin = _swin_model(model)
        family = _family(swin)
        v2 = family is hf_swinv2  # its merging normalizes after the reduction
        for merging in self._mergings():
            merging.forward = partial(merge, merging, type(merging).forward, norm_after=v2)
        for layer in self._blocks():
            layer.forward = partial(_layer if family is None else family.layer, layer, type(layer).forward)

    def _uninstall(self, model: nn.Module) -> None:
        vars(_swin_model(model).encoder).pop("forward", None)

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return _swin_model(model) is not None

    @classmethod
    def why_not(cls, model: nn.Module) -> str:
        swin = _body(model)
        if _swin_model(model) is not None:
            return ""
        if type(swin).__name__ == "SwinModel":
            missing = "no q_proj, k_proj, v_proj and o_proj"
        elif type(swin).__name__ == "Swinv2Model":
            missing = "another layout than self.query, key, value, logit_scale and continuous_position_bias_mlp"
        elif type(swin).__name__ == "DonutSwinModel":
            missing = "another layout than self.query, key, value and relative_position_bias_table"
        else:
            return ""
        return (
            f": its layers' attention has {missing}, the layout of the transformers releases this adapter knows; "
            "use a transformers release with it, or adapter='hf_masktoken'"
        )

    def _parts(self) -> list[tuple[nn.Module, bool]]:
        return [(stage, stage.downsample is not None) for stage in _swin_model(self._model_ref[0]).encoder.layers]

    def _mergings(self) -> list[nn.Module]:
        return [stage.downsample for stage, merges in self._parts() if merges]

    def _blocks(self) -> list[nn.Module]:
        return [layer for stage, _ in self._parts() for layer in stage.blocks]

    @property
    def patch_size(self) -> tuple[int, int]:
        return tuple(_swin_model(self._model_ref[0]).embeddings.patch_embeddings.projection.stride)

    def _encoder(self, encoder: nn.Module, method, x: torch.Tensor, input_dimensions, *args, **kwargs):
        """The encoder; in the sub pass, on the kept tokens of the embeddings ``x`` (B, H * W, C): returns the last
        stage's kept tokens as its ``last_hidden_state`` (B, K, C)."""
        if not self._active:
            return method(encoder, x, input_dimensions, *args, **kwargs)
        output = getattr(sys.modules[type(encoder).__module__], f"{type(encoder).__name__}Output")  # SwinEncoderOutput
        if _family(_swin_model(self._model_ref[0])) is hf_swinv2:  # its layers fix their windows when built
            return output(last_hidden_state=self._run_parts(x, input_dimensions))
        always_partition = kwargs.get("always_partition", False)
        return output(last_hidden_state=self._run_parts(x, input_dimensions, always_partition=always_partition))
