"""Tiny speech models of the families the text adapter knows (an audio encoder whose features fill their placeholder
tokens among the words, a decoder), and their batches: the audio as each model's feature extractor gives it."""

from __future__ import annotations

import torch
from conftest import CLS, LANGUAGE_MODELS, PAD, lm_labels, text_batch

AUDIO = 63  # a speech model's audio placeholder: a token id its configuration names, never masked
FRAMES, MELS = 16, 16  # an audio's log-mel features: 16 frames of 16 bins
# placeholders an audio: Whisper's kin halve the frames by a strided convolution and Qwen2-Audio's and Audio Flamingo
# 3's by a pool (4), Voxtral's projector takes 2 frames a token (4), GLM-ASR's 4 (2); Granite Speech's Q-Former
# (and Granite Speech Plus's) gives a query per 2 frames (8); Qwen3-ASR's three strided convolutions take chunks of
# 100 frames, its only size, to 13 tokens
PLACEHOLDERS = {"qwen2_audio": 4, "voxtral": 4, "audioflamingo3": 4, "glmasr": 2, "granite_speech": 8}
PLACEHOLDERS |= {"granite_speech_plus": 8, "qwen3_asr": 13}
LONG = {"qwen3_asr": 100}  # frames an audio, where not FRAMES
# placeholders of an audio half as long, its frames padded: Whisper's kin's half; Qwen3-ASR's 50 frames give 7
HALF = {"qwen2_audio": 2, "audioflamingo3": 2, "glmasr": 1, "qwen3_asr": 7}
FRAME_MASKS = {"qwen2_audio": "feature_attention_mask"}  # the others' input_features_mask
WHISPER = dict(num_mel_bins=MELS, max_source_positions=FRAMES // 2, dropout=0.0, attention_dropout=0.0)
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)


def _speech_model(kind: str, text: str, **audio) -> torch.nn.Module:
    """A tiny ``kind`` speech model: its audio encoder configured by ``audio``, a ``text`` decoder."""
    import transformers as tf

    text_config = tf.AutoConfig.for_model(text, **LANGUAGE_MODELS["llama"][1], pad_token_id=PAD, bos_token_id=CLS)
    config = tf.AutoConfig.for_model(kind, text_config=text_config.to_dict(), **audio)
    config.audio_token_id = AUDIO
    if kind == "qwen2_audio":
        config.audio_token_index = AUDIO
    torch.manual_seed(0)
    return tf.AutoModelForSeq2SeqLM.from_config(config)  # the auto class of every one of them in transformers 5.25


SPEECH_MODELS = {
    "qwen2_audio": lambda: _speech_model(
        "qwen2_audio",
        "qwen2",
        audio_config=dict(
            model_type="qwen2_audio_encoder", d_model=32, encoder_layers=1, encoder_attention_heads=2,
            encoder_ffn_dim=64, **WHISPER,
        ),
    ),
    "voxtral": lambda: _speech_model(
        "voxtral", "llama", audio_config=dict(model_type="voxtral_encoder", **TINY, **WHISPER)
    ),
    "audioflamingo3": lambda: _speech_model(
        "audioflamingo3", "qwen2", audio_config=dict(model_type="audioflamingo3_encoder", **TINY, **WHISPER)
    ),
    "glmasr": lambda: _speech_model(
        "glmasr",
        "llama",
        audio_config=dict(
            model_type="glmasr_encoder", **TINY, num_key_value_heads=2, num_mel_bins=MELS, max_position_embeddings=64
        ),
    ),
}  # fmt: skip
GRANITE = dict(
    encoder_config=dict(
        input_dim=MELS,
        num_layers=1,
        hidden_dim=32,
        feedforward_mult=2,
        num_heads=2,
        dim_head=16,
        output_dim=8,
        context_size=8,
        max_pos_emb=16,
        conv_kernel_size=3,
        dropout=0.0,
    ),
    projector_config=dict(
        model_type="blip_2_qformer",
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        encoder_hidden_size=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    ),
    window_size=4,
    downsample_rate=2,
)  # a conformer encoder of the frames (its batch norms read the batch in training), a Q-Former projector
SPEECH_MODELS["granite_speech"] = lambda: _speech_model("granite_speech", "granite", **GRANITE)
SPEECH_MODELS["granite_speech_plus"] = lambda: _speech_model("granite_speech_plus", "granite", **GRANITE)
QWEN3_ASR = dict(d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64, num_mel_bins=MELS)
QWEN3_ASR.update(downsample_hidden_size=8, output_dim=32, dropout=0.0, attention_dropout=0.0)


def _qwen3_asr() -> torch.nn.Module:
    """Qwen3-ASR, its audio tower's weights drawn at a scale by their fan-in: at its own init (std 0.02) the features
    of any two audios differ by about 1e-6, and the audio could not be seen to reach the logits."""
    model = _speech_model("qwen3_asr", "qwen3", audio_config=QWEN3_ASR)
    with torch.no_grad():
        for m in model.model.audio_tower.modules():
            if isinstance(m, torch.nn.Conv2d | torch.nn.Linear):
                m.weight.normal_(std=m.weight[0].numel() ** -0.5)
    return model


SPEECH_MODELS["qwen3_asr"] = _qwen3_asr


def speech_batch(kind: str) -> dict[str, torch.Tensor]:
    """A supervised fine-tuning batch of 4 (a transcription, say): [CLS], an audio's placeholders, then words; no label
    on the prompt (the audio's tokens among it) or the padding; the audio as the model's feature extractor gives it
    (Granite Speech's frames first), with the mask of its frames where the model takes one (Qwen2-Audio's, Audio
    Flamingo 3's, GLM-ASR's and Qwen3-ASR's last audio is half as long, its frames padded, with fewer placeholders)."""
    n = PLACEHOLDERS[kind]
    batch = text_batch(batch=4, length=12 + n)
    ids = batch["input_ids"]
    ids[ids >= AUDIO] = 4  # words' ids: not the audio's
    ids[:, 1 : 1 + n] = AUDIO
    batch = lm_labels(batch, prompt=n + 2)
    g = torch.Generator().manual_seed(7)
    if kind.startswith("granite_speech"):
        return {**batch, "input_features": torch.randn(4, FRAMES, MELS, generator=g)}
    length = LONG.get(kind, FRAMES)
    audio = {"input_features": torch.randn(4, MELS, length, generator=g)}
    if kind in HALF:  # the last audio half as long, its second half padding: fewer placeholders
        frames = torch.ones(4, length, dtype=torch.long)
        frames[-1, length // 2 :] = 0
        audio[FRAME_MASKS.get(kind, "input_features_mask")] = frames
        ids[-1, 1 + HALF[kind] : 1 + n] = 4  # words in the other placeholders' place (in the prompt)
    return {**batch, **audio}
