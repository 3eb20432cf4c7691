"""Decoders with recurrent layers (gated delta nets, Mamba 1 and 2, lightning attention, short convolutions) beside
their attention: ``mode="drop"`` runs each sequence's kept tokens alone, at their own positions."""

from __future__ import annotations

import pytest
import torch
from conftest import CLS, PAD, SEP, assert_causal_step_gradients, dropped_and_hidden, kept_length, lm_labels, wrap_text
from test_text import _decoder_batch

from masksub.adapters.text_families import RECURRENT_DECODERS
from masksub.masking import masked_counts

LAYERS = ["linear_attention", "full_attention", "linear_attention", "full_attention"]
DELTA_NET = dict(layer_types=LAYERS, linear_num_value_heads=2, linear_num_key_heads=2, linear_key_head_dim=8)
DELTA_NET |= dict(linear_value_head_dim=8)
EXPERTS = dict(num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts_per_tok=2)
# Mamba 2's heads span twice the width; chunks of 8 tokens, shorter than the batch: its scan crosses chunks
MAMBA2 = dict(mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_n_groups=1, mamba_chunk_size=8)
SHORT_CONVOLUTIONS = dict(layer_types=["conv", "full_attention", "conv", "full_attention"])
CONFIGS = {  # model type: its tiny configuration (4 layers, recurrent and attention ones), beyond SMALL
    "qwen3_5_text": DELTA_NET,
    "qwen3_5_moe_text": DELTA_NET | EXPERTS,
    "qwen3_next": DELTA_NET | EXPERTS,
    "olmo_hybrid": DELTA_NET,
    "kimi_linear": dict(
        layer_types=LAYERS, mlp_layer_types=["dense", "sparse", "dense", "sparse"], linear_head_dim=8,
        linear_num_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
        num_experts=4, num_experts_per_token=2, moe_intermediate_size=32,
    ),
    "falcon_h1": MAMBA2 | dict(mamba_d_ssm=64),
    "nemotron_h": dict(
        layers_block_type=["linear_attention", "full_attention", "linear_attention", "mlp"], mamba_num_heads=4,
        mamba_head_dim=16, ssm_state_size=8, n_groups=1, chunk_size=8,
    ),
    "granitemoehybrid": MAMBA2 | dict(layer_types=["mamba", "attention", "mamba", "attention"], num_local_experts=4)
    | dict(shared_intermediate_size=32),
    "bamba": MAMBA2 | dict(attn_layer_indices=[1, 3]),
    "jamba": dict(
        attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1, num_experts=4,
        mamba_dt_rank=8, mamba_d_state=8,
    ),
    "zamba2": dict(
        layers_block_type=["mamba", "hybrid", "mamba", "hybrid"], mamba_d_state=8, n_mamba_heads=4, mamba_headdim=16,
        attention_head_dim=16, num_mem_blocks=1, chunk_size=8,
    ),
    "minimax": dict(layer_types=LAYERS, block_size=8, num_local_experts=4, num_experts_per_tok=2),  # lightning blocks
    "lfm2": SHORT_CONVOLUTIONS | dict(full_attn_idxs=[1, 3]),
    "lfm2_moe": SHORT_CONVOLUTIONS | dict(num_experts=4, num_experts_per_tok=2, num_dense_layers=1)
    | dict(moe_intermediate_size=32),
}  # fmt: skip
SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2)
SMALL |= dict(num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
SMALL |= dict(pad_token_id=PAD, bos_token_id=CLS, eos_token_id=SEP)


def _config(kind: str, **overrides):
    import transformers

    if kind not in transformers.CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has no {kind}")
    return transformers.AutoConfig.for_model(kind, **{**SMALL, **CONFIGS[kind], **overrides})


def _model(kind: str, auto: str = "AutoModelForCausalLM", **overrides) -> torch.nn.Module:
    """The tiny ``kind`` model with ``auto``'s head (3 labels), drawn under seed 0, in eval mode."""
    import transformers

    config = _config(kind, num_labels=3, **overrides)
    if type(config) not in getattr(transformers, auto)._model_mapping:
        pytest.skip(f"transformers {transformers.__version__} has no {kind} head of {auto}")
    torch.manual_seed(0)
    return getattr(transformers, auto).from_config(config).eval()


def _alone(model, batch, mask, row: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``row``'s kept tokens (neither masked nor padding) and the model's logits given them alone, unpadded,
    at their own positions."""
    keep = (batch["attention_mask"][row].bool() & ~mask[row]).nonzero().squeeze(1)
    with torch.no_grad():
        return keep, model(input_ids=batch["input_ids"][row, keep][None], position_ids=keep[None]).logits[0]


# each hybrid, and MiniMax with its full-attention layers sliding (as its configuration's window makes them; its layer
# types do not say so): the window counts the kept tokens, as it does when they run alone
LM_CASES = [(kind, {}) for kind in RECURRENT_DECODERS] + [("minimax", dict(sliding_window=4))]


@pytest.mark.parametrize("left", [False, True], ids=["right_padded", "left_padded"])
@pytest.mark.parametrize(("kind", "overrides"), LM_CASES, ids=lambda c: c if isinstance(c, str) else "".join(c))
def test_drop_mode_on_a_hybrid_language_model_runs_each_sequences_kept_tokens_alone(kind, overrides, left):
    """A causal language model with recurrent layers: at each kept token the sub pass's next-token logits are those
    of the sequence's kept tokens run by themselves (its recurrence and convolutions never see a masked token), 0
    elsewhere, which ``sub_kept`` leaves out. Hiding the tokens by the attention mask computes something else."""
    model = _model(kind, **overrides)
    wrapped = wrap_text(model, mode="drop", ratio=0.5)
    batch = _decoder_batch(left)
    got, hidden, mask, lengths = dropped_and_hidden(wrapped, model, batch)
    real = batch["attention_mask"].bool()
    assert mask.sum(1).tolist() == masked_counts(real.sum(1), 0.5).tolist()
    kept = wrapped.sub_kept
    assert torch.equal(kept, real & ~mask) and not got[~kept].any()
    assert lengths == [kept_length(batch["attention_mask"], mask), 20] and lengths[0] < 20
    for row in range(len(mask)):
        keep, alone = _alone(model, batch, mask, row)
        torch.testing.assert_close(got[row, keep], alone, rtol=1e-5, atol=1e-6)
    assert (got[kept] - hidden[kept]).abs().max() > 1e-4, "hiding leaves the masked tokens' places in the recurrence"
    with torch.no_grad():
        assert torch.equal(wrapped(**batch).logits, model(**batch).logits), "the main pass is the plain model's"


HEADS = {"sequence": "AutoModelForSequenceClassification", "token": "AutoModelForTokenClassification"}


def _classifiers() -> list[tuple[str, str]]:
    """The (model type, head) pairs of the hybrids with a sequence or token classifier in the installed transformers."""
    import transformers

    have = {head: set(getattr(transformers, auto)._model_mapping) for head, auto in HEADS.items()}
    mapping = transformers.CONFIG_MAPPING
    return [(k, h) for k in RECURRENT_DECODERS for h in HEADS if k in mapping and mapping[k] in have[h]]


CLASSIFIERS = _classifiers()


@pytest.mark.parametrize(("kind", "head"), CLASSIFIERS, ids=lambda c: c if isinstance(c, str) else None)
def test_drop_mode_on_a_hybrid_classifier_reads_the_kept_tokens_run_alone(kind, head):
    """A sequence classifier reads the last token that is not padding, never masked: its logits are those of the
    kept tokens run alone. A token classifier's logits go back to the kept tokens' places."""
    model = _model(kind, HEADS[head])
    wrapped = wrap_text(model, mode="drop", ratio=0.5)
    batch = _decoder_batch(left=False)
    got, _, mask, lengths = dropped_and_hidden(wrapped, model, batch)
    words = batch["attention_mask"].sum(1)
    assert lengths[0] < 20
    for row in range(len(mask)):
        keep, alone = _alone(model, batch, mask, row)
        if head == "sequence":
            assert keep[-1] == words[row] - 1, "the token the classifier reads stays"
            torch.testing.assert_close(got[row], alone, rtol=1e-5, atol=1e-6)
        else:
            torch.testing.assert_close(got[row, keep], alone, rtol=1e-5, atol=1e-6)
    expected = masked_counts(words - int(head == "sequence"), 0.5)
    assert mask.sum(1).tolist() == expected.tolist()


@pytest.mark.parametrize("kind", ["qwen3_5_text", "nemotron_h", "lfm2"])
def test_step_gradients_on_a_hybrid_in_drop_mode_are_the_summed_losses(kind):
    """``Step``'s gradients on a gated delta net, Mamba 2 or short-convolution hybrid in drop mode equal the
    next-token loss and its distillation worked out by hand over the kept tokens."""
    model = _model(kind)
    batch = lm_labels(_decoder_batch(left=False))
    grads = assert_causal_step_gradients(model, wrap_text(model, mode="drop", ratio=0.5), batch, "drop")
    recurrent = [n for n in grads if any(k in n for k in ("linear_attn", "mixer", "conv"))]
    assert recurrent and all(grads[n].abs().sum() > 0 for n in recurrent), "the recurrent layers learn"
