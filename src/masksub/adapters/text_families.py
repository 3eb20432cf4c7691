"""Which Hugging Face text classifiers the text adapter's ``mode="drop"`` takes, and where their parts are.

``mode="drop"`` runs a model on the kept tokens only, which computes what hiding the masked tokens computes only
where nothing in the model counts tokens by index in a way the drop would change. The tables below name the model
types where that holds, each with the way the adapter reaches it (``text.py``); the checks refuse the
configurations of those types where it does not (a causal XLM, BigBird's block-sparse attention, I-BERT's
integer-only mode...), naming why and what to use instead.
"""

from __future__ import annotations

import inspect

from torch import nn

from ..language import is_causal_lm

# model types whose encoder takes any length after its embeddings (absolute positions added there, masks made from
# the embeddings' output) and whose sequence classifier reads the first token: they can drop masked tokens (BigBird in
# full attention, I-BERT outside its integer-only mode: ``drop_embeddings`` refuses the others)
DROP_MODELS = (
    *("bert", "roberta", "xlm-roberta", "camembert", "electra", "distilbert", "albert", "data2vec-text", "ernie"),
    *("roberta-prelayernorm", "xlm-roberta-xl", "megatron-bert", "mobilebert", "rembert", "squeezebert", "layoutlm"),
    *("markuplm", "roc_bert", "xmod", "deberta-v2", "mpnet", "roformer", "big_bird", "ibert", "luke", "tapas"),
)
# of those, the ones whose attention adds a bias by the distance of two tokens, counted by index in their code: in the
# sub pass their layers get the bias of the kept tokens' own positions (DeBERTa-v2 and v3's disentangled attention
# by a relative position per query and key, MPNet's bias by bucket, RoFormer's rotary sines and cosines)
RELATIVE_MODELS = ("deberta-v2", "mpnet", "roformer")
# decoder model types whose sequence classifier reads the last token that is not padding (found from input_ids) and
# whose attention is causal over position ids (RoPE or learned): they can drop masked tokens from the input ids (the
# last rows: decoders with no sequence classifier in transformers 5.25, whose causal language model drops them)
DROP_DECODERS = (
    *("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3_text"),
    *("phi", "phi3", "phimoe", "olmo", "olmo2", "olmo3", "glm", "glm4", "gpt2", "gpt_neox", "gpt_oss", "starcoder2"),
    *("stablelm", "smollm3", "exaone4", "helium", "arcee", "seed_oss", "gptj", "opt", "bloom", "falcon"),
    *("ministral", "ministral3", "nemotron", "persimmon", "diffllama", "jetmoe", "hunyuan_v1_dense", "hunyuan_v1_moe"),
    *("deepseek_v2", "deepseek_v3", "minicpm3", "mistral4", "modernbert-decoder", "gpt_neo", "gpt_bigcode"),
    *("biogpt", "ctrl", "openai-gpt", "gpt-sw3", "gemma3", "axk1", "axk2"),
    *("cohere", "cohere2", "cohere2_moe", "exaone", "exaone_moe", "ernie4_5", "ernie4_5_moe", "glm4_moe"),
    *("glm4_moe_lite", "apertus", "bitnet", "codegen", "flex_olmo", "aria_text", "cwm", "afmoe", "gpt_neox_japanese"),
    *("deepseek_v32", "glm_moe_dsa", "granite", "granitemoe", "granitemoeshared", "olmoe", "internlm3"),
    *("minimax_m2", "jais2", "hyperclovax", "nanochat", "iquestcoder", "minicpm5_moe", "hy_v3", "param2moe"),
    *("mellum", "kolibri1", "sarvam_mla", "sarvam_moe", "solar_open", "vaultgemma", "xglm", "youtu"),
    "llama4_text",  # chunked attention, its masks made from the kept tokens' indices; no-RoPE layers' scale by index
)
# decoders with recurrent layers beside (or instead of some of) their causal attention: gated delta nets (Qwen3.5,
# Qwen3-Next, OLMo hybrid), Kimi's delta attention, Mamba 1 and 2 (Falcon-H1, Nemotron-H, Granite 4 hybrids, Bamba,
# Jamba, Zamba 2), MiniMax's lightning attention, LFM2's short convolutions. Hiding a token by the attention mask
# cannot take it out of their recurrence (its input there is zeroed, but the layer's decay and convolution still span
# its place), so on these mode "drop" does not compute what hiding computes: it runs each sequence's kept tokens
# alone, at their own positions, as if the masked ones were not in the text (tested equal to each sequence's kept
# tokens run by themselves, and different from hiding); their heads read as DROP_DECODERS' do
RECURRENT_DECODERS = ("qwen3_5_text", "qwen3_5_moe_text", "qwen3_next", "olmo_hybrid", "kimi_linear", "falcon_h1")
RECURRENT_DECODERS += ("nemotron_h", "granitemoehybrid", "bamba", "jamba", "zamba2", "minimax", "lfm2", "lfm2_moe")
# vision-language models whose language model is one of those decoders, given the position ids as it is, and whose
# images (and videos) reach it as features scattered onto their placeholder tokens (which are special: always kept),
# attending causally as words do: their causal language model drops masked words as the decoder's does (each tested
# with images; LLaVA-NeXT-Video, LLaVA-OneVision and Video-LLaVA with videos too)
DROP_VLMS = ("llava", "llava_next", "llava_next_video", "llava_onevision", "mistral3", "internvl", "idefics3")
DROP_VLMS += ("smolvlm", "aya_vision", "cohere2_vision", "llama4", "video_llava")
# speech models whose language model is one of those decoders, given the position ids as it is, and whose audio
# reaches it as an audio encoder's features scattered onto their placeholder tokens (special: always kept), attending
# causally as words do: their causal language model drops masked words as the decoder's does (each tested with audio)
DROP_AUDIO_LMS = ("qwen2_audio", "voxtral", "audioflamingo3", "glmasr", "granite_speech", "granite_speech_plus")
DROP_AUDIO_LMS += ("qwen3_asr",)
# vision-language models whose own forward makes their 3-D positions (time, height, width) from the attention mask's
# tokens, given ``mm_token_type_ids`` and the images' grids (else positions by index, as a decoder's): given the
# kept tokens alone, it makes the positions hiding the others gives (tested with images; Qwen2-VL with videos too)
MROPE_VLMS = ("qwen2_vl", "qwen2_5_vl", "glm4v")
# vision-language models whose image and prompt (``token_type_ids`` 0) attend each other both ways, the rest causally,
# on one of those decoders (PaliGemma's prefix): the token types are gathered with the kept tokens, and the masks of
# their sliding-window layers keep the prefix's two ways (tested with images)
PREFIX_VLMS = ("paligemma",)
# decoders whose positions count the real tokens of the attention mask (OPT's learned positions, BLOOM's ALiBi), so
# hidden tokens do not count in mode "attention" either: they get no position ids unless the batch gives them
MASK_POSITION_DECODERS = ("opt", "bloom")
# encoder sequence classifiers that rotate by position ids and read the first token or a mean over the attention
# mask: they get the kept token ids with their position ids, their sliding-window layers a mask by those positions
DROP_ROPE_ENCODERS = ("modernbert", "eurobert", "ultrabert", "nomic_bert", "gte", "jina_embeddings_v3", "esmc")
DROP_ROPE_ENCODERS += ("modernvbert", "ultravbert")  # ModernBERT's and Ultrabert's classifiers of images and text
# encoder classifiers that embed absolute positions by position ids and read the first token (XLM's and FlauBERT's
# sequence summary "first"): the kept token ids with their position ids and language ids
DROP_POSITION_ENCODERS = ("xlm", "flaubert")
DROP_ID_ENCODERS = DROP_ROPE_ENCODERS + DROP_POSITION_ENCODERS  # bidirectional: no token is held back
MASKED_KERNELS = ("sdpa", "eager")  # the attention implementations that read the mask a layer is given
# the heads mode "drop" takes: one prediction per sequence (from the token a classifier reads; a multiple-choice head's
# per choice, each choice a sequence), or one per token (the kept tokens' predictions go back to their places, and the
# loss leaves the dropped ones out: ``kept``): a token classifier's, and a masked language model's (whose targets, the
# mask tokens its collator put in, are special tokens: never dropped). A decoder's causal language model (its
# next-token prediction per token) is taken too, judged by its transformers classes (``is_causal_lm``): GPT-2's is an
# LMHeadModel
PER_TOKEN_HEADS = ("ForTokenClassification", "ForMaskedLM")
DROP_HEADS = ("ForSequenceClassification", "ForMultipleChoice", *PER_TOKEN_HEADS)


def predicts_per_token(model: nn.Module) -> bool:
    """Whether ``model`` (wrapped by PEFT or not) predicts per token: a token classifier, a masked language model, or
    a causal language model (the next token)."""
    return type(model).__name__.endswith(PER_TOKEN_HEADS) or is_causal_lm(classifier_of(model))


def layer_types(config) -> list[str] | None:
    """Each layer's attention kind where the config names them (GPT-Neo's ``attention_layers``: local ones slide)."""
    if config.model_type == "gpt_neo":
        return ["sliding_attention" if kind == "local" else "full_attention" for kind in config.attention_layers]
    return getattr(config, "layer_types", None)


def sliding_window(config) -> int | None:
    """The window of a model's sliding-window attention layers (all of them, or those its layer types name), or
    None where it has none."""
    window = config.window_size if config.model_type == "gpt_neo" else getattr(config, "sliding_window", None)
    types = layer_types(config)
    if window is None or (types is not None and "sliding_attention" not in types):
        return None
    return int(window)


def chunk_size(config) -> int | None:
    """The chunk of a model's chunked attention layers (Llama 4's: a token sees those of its own chunk up to it, the
    chunks counted from the first token that is not padding), or None where it has none."""
    chunk, types = getattr(config, "attention_chunk_size", None), layer_types(config)
    return None if chunk is None or types is None or "chunked_attention" not in types else int(chunk)


def classifier_of(model: nn.Module) -> nn.Module:
    """The Hugging Face classifier inside ``model`` (wrapped by PEFT or not)."""
    from transformers import PreTrainedModel

    return next((m for m in model.modules() if isinstance(m, PreTrainedModel)), model)


def text_model(model: nn.Module, config) -> nn.Module:
    """The transformer of ``model`` (wrapped by PEFT or not) that runs on ``config``, its text config: the
    classifier's own base model, or the language model inside a multimodal classifier (Gemma 3's)."""
    from transformers import PreTrainedModel

    found = (m for m in model.modules() if isinstance(m, PreTrainedModel) and m.config is config)
    return next(found, classifier_of(model)).base_model


def sliding_layers(model: nn.Module, config) -> list[nn.Module]:
    """The layers of ``model`` that attend within a sliding window or a chunk: those its layer types name so, or all
    of a model with a window and no layer types (Mistral's, Phi-3's). An error where its layers are not found."""
    chunked = chunk_size(config) is not None
    if sliding_window(config) is None and not chunked:
        return []
    name, base = "h" if config.model_type == "gpt_neo" else "layers", text_model(model, config)
    layers = getattr(base, name, getattr(getattr(base, "model", None), name, None))  # Llama 4's: under its model
    types = layer_types(config)
    if not isinstance(layers, nn.ModuleList) or (types is not None and len(types) < len(layers)):
        raise ValueError(
            f"mode='drop' on {type(model).__name__}: its sliding-window attention must keep its window by position, "
            "and its layers are not where they are looked for (its transformer's layers, one per layer type); use "
            "mode='attention' (the same masking at the main pass's cost)"
        )
    return [
        layer
        for layer, kind in zip(layers, types or ["sliding_attention"] * len(layers))
        if kind == ("chunked_attention" if chunked else "sliding_attention")
    ]


def position_ids_target(model: nn.Module) -> nn.Module | None:
    """The transformer to hand position ids to where the sequence classifier inside ``model`` (wrapped by PEFT or
    not) takes none and runs its transformer without (Falcon's): position ids given to it would be dropped."""
    classifier = classifier_of(model)
    return None if "position_ids" in inspect.signature(classifier.forward).parameters else classifier.base_model


def transformers_version() -> tuple[int, ...]:
    import transformers

    return tuple(int(n) for n in transformers.__version__.split(".")[:2])


def drop_embeddings(model: nn.Module) -> nn.Module | None:
    """The embeddings module of a BERT-family classifier that ``mode="drop"`` takes, None for a decoder or ModernBERT
    classifier it takes, or an error naming the ones it does."""
    kind = getattr(getattr(model, "config", None), "model_type", None)
    if kind in DROP_VLMS + DROP_AUDIO_LMS + PREFIX_VLMS:  # by its language model's type
        text = model.config.get_text_config().model_type
        kind = text if text in DROP_DECODERS and is_causal_lm(classifier_of(model)) else kind
    decoder = kind in DROP_DECODERS + RECURRENT_DECODERS + MROPE_VLMS
    causal_lm = is_causal_lm(classifier_of(model)) and decoder  # a decoder's, not BERT's as a decoder
    classifier = type(model).__name__.endswith(DROP_HEADS) or causal_lm
    embeddings = getattr(getattr(model, "base_model", None), "embeddings", None)
    by_ids, bert = decoder or kind in DROP_ID_ENCODERS, kind in DROP_MODELS and embeddings is not None
    takes = classifier and (by_ids or bert)
    if takes and (version := transformers_version()) < (5,):
        raise ValueError(
            f"mode='drop' on {type(model).__name__} needs transformers >= 5, where it computes what hiding the tokens "
            "computes (tested; under 4.48.3 decoders and RoPE encoders compute other logits and the BERT family "
            f"fails), and this is {'.'.join(map(str, version))}: upgrade transformers, or use mode='attention' (the "
            "same masking, at the main pass's cost)"
        )
    if classifier and kind in CONFIGURATION_CHECKS:
        CONFIGURATION_CHECKS[kind](model)
    if classifier and by_ids:
        return None
    if not classifier or kind not in DROP_MODELS or embeddings is None:
        raise ValueError(
            f"mode='drop' shortens the sequence, which needs a sequence, multiple-choice or token classifier or a "
            f"masked language model of "
            f"{', '.join(DROP_MODELS + DROP_POSITION_ENCODERS)} (absolute positions), of "
            f"{', '.join(DROP_ROPE_ENCODERS)} (RoPE), or one of these or a causal language model (ForCausalLM) of "
            f"{', '.join(DROP_DECODERS)} (causal attention over position ids) or {', '.join(RECURRENT_DECODERS)} "
            "(recurrent layers: the kept tokens run alone), of "
            f"{', '.join(DROP_VLMS + PREFIX_VLMS)} (vision-language) or {', '.join(DROP_AUDIO_LMS)} (speech) on one "
            f"of those decoders or of {', '.join(MROPE_VLMS)} (their images or audio kept); {type(model).__name__} is "
            "not one: "
            "use mode='attention' (the same masking, at the main pass's cost) or mode='token'"
        )
    return embeddings


def check_integer_only(model: nn.Module) -> None:
    """An error for an I-BERT classifier in its integer-only mode, whose activation ranges are taken over the whole
    sequence in training: hidden tokens count there, dropped ones would not."""
    if model.config.quant_mode:
        raise ValueError(
            f"mode='drop' on {type(model).__name__}: its configuration sets quant_mode, whose activation ranges are "
            "taken over the whole sequence in training (hidden tokens count there, dropped ones would not), so its "
            "sub pass would compute other logits than hiding the tokens; use mode='attention', or quant_mode=False"
        )


def check_roformer_head(model: nn.Module) -> None:
    """RoFormer's multiple-choice head reads a sequence summary (its other heads the first token or every token)."""
    if type(model).__name__.endswith("ForMultipleChoice"):
        check_summary(model)


def check_full_attention(model: nn.Module) -> None:
    """An error for a BigBird classifier in block-sparse attention, whose blocks, sliding windows and random keys
    count by index (dropping tokens would change which tokens meet); its full attention takes kept tokens."""
    kind = model.base_model.attention_type
    if kind != "original_full":
        raise ValueError(
            f"mode='drop' on {type(model).__name__}: its attention is {kind!r}, whose blocks, windows and random "
            "keys count tokens by index, so dropping some would change which tokens meet; mode='drop' takes BigBird "
            "in full attention: model.base_model.set_attention_type('original_full') (what BigBird itself switches "
            f"to for sequences of at most {(5 + 2 * model.config.num_random_blocks) * model.config.block_size} "
            "tokens), or use mode='attention'"
        )


def check_summary(model: nn.Module) -> None:
    """An error for a classifier that reads a sequence summary (XLM's and FlauBERT's heads, RoFormer's
    multiple-choice head) on which dropping tokens would not compute what hiding them does: a summary read elsewhere
    than from the first token (the last position, a mean over the padded length or attention over it), or a causal
    XLM (its attention masks by index, not by the attention mask)."""
    config = model.config
    token = type(model).__name__.endswith(PER_TOKEN_HEADS)
    summary = None if token else getattr(config, "summary_type", "last")  # RoFormer's head reads "last" unless set
    if getattr(config, "causal", False) or summary not in (None, "first"):
        what = f"reads its sequence summary by summary_type={summary!r} (over positions the drop changes)"
        if getattr(config, "causal", False):
            what = "is causal (its attention does not hide masked tokens)"
        raise ValueError(
            f"mode='drop' on {type(model).__name__}: its configuration {what}; mode='drop' takes a head that reads "
            "the first token (summary_type='first', XLM's and FlauBERT's default) of a model that is not causal: use "
            "mode='attention' or mode='token'"
        )


# model types of which mode="drop" takes some configurations only: the check that refuses the others, naming why
CONFIGURATION_CHECKS = {
    "xlm": check_summary,
    "flaubert": check_summary,
    "roformer": check_roformer_head,
    "big_bird": check_full_attention,
    "ibert": check_integer_only,
}
