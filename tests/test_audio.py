"""Speech models (an audio encoder's features on placeholder tokens among the words, a decoder: Qwen2-Audio, Qwen3-ASR,
Voxtral, Audio Flamingo 3, GLM-ASR, Granite Speech and Plus): scored as their own loss scores them, masked words dropped
as hiding them computes, a frozen audio encoder run once a step."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    CLS,
    MASK,
    PAD,
    SEP,
    SPECIAL,
    assert_causal_step_gradients,
    dropped_and_hidden,
    needs_transformers_5,
    step_seeing_ids,
    wrap_text,
)
from speech import AUDIO, SPEECH_MODELS, speech_batch

import masksub
from masksub.language import CAUSAL, language_model
from masksub.masking import masked_counts

pytest.importorskip("transformers")

KINDS = list(SPEECH_MODELS)
FEATURES = "input_features"


def _step(model) -> masksub.Step:
    return masksub.Step(model, torch.optim.SGD(model.parameters(), lr=0.0), torch.nn.CrossEntropyLoss())


def _tower(model) -> torch.nn.Module:
    from masksub.adapters.frozen_encoder import audio_encoder

    return audio_encoder(model)


@needs_transformers_5
@pytest.mark.parametrize("mode", ["token", "attention", "drop"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_speech_model_is_scored_as_its_own_loss_scores_it(kind, mode):
    """A speech model's logits hold a prediction per input token, the audio's placeholders included, and its own loss
    shifts the labels: Step's main loss equals it, with the audio, and the gradient is the next-token loss and its
    distillation worked out by hand. The sub pass masks words, never an audio's placeholder (its features would be
    left without a place: the model fails then), or drops them; the audio tower trains from both passes."""
    model = SPEECH_MODELS[kind]().train()
    batch = speech_batch(kind)
    assert language_model(model)[0] == CAUSAL
    wrapped, out, seen = step_seeing_ids(model, batch, mode)
    with torch.no_grad():  # in training mode (nothing random; Granite Speech's batch norms read the batch)
        own = model(**batch).loss
    torch.testing.assert_close(out["loss_main"], own.detach(), rtol=1e-6, atol=1e-6)
    main_ids, sub_ids = seen[0], seen[-1]  # Granite Speech embeds its words twice a pass
    assert (main_ids == AUDIO).sum() == 0 or (main_ids == AUDIO).sum() == (sub_ids == AUDIO).sum()
    real = batch["attention_mask"].bool()
    words = real & ~torch.isin(batch["input_ids"], torch.tensor([*SPECIAL, AUDIO]))
    if mode == "drop":
        assert sub_ids.shape[1] < main_ids.shape[1]
    if mode == "token":  # Granite Speech embeds its placeholders as id 0
        hidden = sub_ids == MASK
        assert hidden.sum(1).tolist() == masked_counts(words.sum(1), 0.9).tolist() and not (hidden & ~words).any()

    grads = assert_causal_step_gradients(model, wrapped, batch, mode)
    tower = {id(p) for p in _tower(model).parameters()}
    assert any(id(p) in tower for n, p in model.named_parameters() if n in grads)  # the audio's


@needs_transformers_5
@pytest.mark.parametrize("kind", KINDS)
def test_drop_mode_on_a_speech_model_runs_its_audio_and_kept_words_as_hiding_the_others_does(kind):
    """The sub pass runs on the kept words and every audio placeholder (special: never masked), the audio's features
    placed at their placeholders as in the main pass, each token at its position in the whole sequence: each kept
    token's next-token logits are those of the whole sequence with the masked words hidden, and the audio reaches
    them."""
    model = SPEECH_MODELS[kind]().eval()
    wrapped = wrap_text(model, sub="mask", ratio=0.5, mode="drop")
    batch = {k: v for k, v in speech_batch(kind).items() if k != "labels"}
    ids, real = batch["input_ids"], batch["attention_mask"].bool()
    got, expected, mask, _ = dropped_and_hidden(wrapped, model, batch)
    kept = wrapped.sub_kept
    with torch.no_grad():
        torch.manual_seed(5)
        other_audio = wrapped(**{**batch, FEATURES: batch[FEATURES].flip(0)}, sub=True).logits
    assert (other_audio[kept] - got[kept]).abs().max() > 1e-3, "the audio reaches the sub pass"
    words = real & ~torch.isin(ids, torch.tensor([*SPECIAL, AUDIO]))
    assert mask.sum(1).tolist() == masked_counts(words.sum(1), 0.5).tolist() and not (mask & ~words).any()
    assert torch.equal(kept, real & ~mask) and kept[ids == AUDIO].all() and kept.shape[1] > kept.sum(1).max()
    torch.testing.assert_close(got[kept], expected[kept], rtol=1e-5, atol=1e-6)
    assert not got[~kept].any()
    assert (expected[kept] - model(**batch).logits[kept]).abs().max() > 1e-3, "hiding moved the logits"


def _first_layer(tower: torch.nn.Module) -> torch.nn.Module:
    """The first part of ``tower`` that it calls, one with weights (not a list of layers, nor a position table, which
    Whisper reads): its hooks run where the tower computes, not where its held output is given back."""
    lists = torch.nn.ModuleList, torch.nn.Embedding
    return next(m for m in tower.children() if not isinstance(m, lists) and any(True for _ in m.parameters()))


def _frozen_tower_step(kind: str, mode: str, cache: bool, monkeypatch) -> tuple[dict, int]:
    """One MaskSub step of ``kind`` in training mode with its audio tower frozen: the gradients and how many times
    the tower ran (``cache=False``: the frozen encoders' cache off, both passes running it)."""
    from masksub.adapters import frozen_encoder

    model = SPEECH_MODELS[kind]().train()
    tower = _tower(model)
    tower.requires_grad_(False)
    calls = []  # the tower's computation (its hooks run at each call, its forward given back or not)
    _first_layer(tower).register_forward_hook(lambda *a: calls.append(1))
    with monkeypatch.context() as patch:
        if not cache:
            patch.setattr(frozen_encoder.FrozenEncoderCache, "frozen", lambda self: False)
        wrapped = wrap_text(model, sub="mask", ratio=0.5, mode=mode)
        model.zero_grad()
        torch.manual_seed(3)
        _step(wrapped)(speech_batch(kind))
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, len(calls)


@needs_transformers_5
@pytest.mark.parametrize("kind, mode", [(kind, "drop") for kind in KINDS] + [("qwen2_audio", "attention")])
def test_a_frozen_audio_tower_runs_once_a_step_with_the_same_gradients(kind, mode, monkeypatch):
    """An audio tower with no trainable parameter and nothing random computes the same in both branches: the sub
    pass gets the main pass's output back (the tower computes once a step, not twice), the gradients are those of
    running it twice, and the projector after it still trains."""
    cached, once = _frozen_tower_step(kind, mode, cache=True, monkeypatch=monkeypatch)
    again, twice = _frozen_tower_step(kind, mode, cache=False, monkeypatch=monkeypatch)
    assert (once, twice) == (1, 2)
    assert cached.keys() == again.keys() and any("projector" in n for n in cached)
    for n in cached:
        torch.testing.assert_close(cached[n], again[n], rtol=1e-6, atol=1e-8, msg=n)


def test_an_audio_tower_that_skips_layers_at_random_runs_again():
    """Whisper's kin skip whole layers at random in training (``layerdrop``): a frozen tower that may is run again in
    the sub pass, as one with dropout is; in evaluation mode it draws nothing, and its output is given back."""
    model = SPEECH_MODELS["qwen2_audio"]().train()
    tower = _tower(model)
    tower.requires_grad_(False)
    calls = []
    _first_layer(tower).register_forward_hook(lambda *a: calls.append(1))
    wrapped = wrap_text(model, sub="mask", ratio=0.5, mode="attention")
    batch = {k: v for k, v in speech_batch("qwen2_audio").items() if k != "labels"}

    def passes() -> int:
        calls.clear()
        wrapped(**batch)
        wrapped(**batch, sub=True)
        return len(calls)

    assert passes() == 1
    tower.config.encoder_layerdrop = 0.5
    assert passes() == 2
    tower.eval()
    assert passes() == 1
    wrapped.unwrap()
    assert not tower._forward_hooks


def test_the_audio_placeholders_are_never_masked_and_a_streaming_speech_model_is_refused():
    """The audio's placeholder id comes from the model's configuration (``audio_token_id``): never masked, whatever
    the batch. Granite Speech's audio encoder is found under its own name. A speech model whose labels are laid out
    otherwise (Voxtral Realtime's streamed text, delayed after the audio) is refused by name."""
    import transformers as tf

    wrapped = masksub.wrap(SPEECH_MODELS["voxtral"](), sub="mask", ratio=0.5, mask_token_id=MASK, special_ids=[PAD])
    ids = torch.tensor([[CLS, *[AUDIO] * 6, *range(10, 20), SEP, PAD]])
    mask = wrapped.branch.token_mask(ids, (ids != PAD).long())
    assert mask.sum() == 5 and not mask[ids == AUDIO].any()
    assert type(_tower(SPEECH_MODELS["granite_speech"]())).__name__ == "GraniteSpeechCTCEncoder"
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64)
    config = tf.VoxtralRealtimeConfig(text_config=text, audio_config=dict(text, num_mel_bins=16))
    with pytest.raises(ValueError, match="VoxtralRealtimeForConditionalGeneration generates text, and is neither"):
        _step(tf.VoxtralRealtimeForConditionalGeneration(config))
