"""Language models' labels: the target their logits are scored against, as each model's own loss reads its labels.

A Hugging Face batch's ``labels`` mean different things by head, and ``Step``, Lightning's ``TrainingStep`` and
``MaskSubTrainer`` take them off the batch (so the model computes no loss of its own):

- a causal language model (``AutoModelForCausalLM``: Llama, GPT-2, Qwen, Gemma...) takes the input ids as labels
  (-100 where no loss counts: a prompt, padding), and its logits at position ``i`` predict token ``i + 1``: the
  target is the labels shifted one to the left, -100 at the end, as its own loss shifts them. A batch's
  ``shift_labels`` (already shifted, as transformers' context parallelism gives them) are the target as they are.
  The heads whose own loss scores each position against its own label (``UNSHIFTED``: XLM's, XLNet's, and the
  decoders of encoder-decoders, BART's, Marian's, Whisper's...) are left as they are;
- an encoder-decoder (T5, BART, Marian, Pegasus...) takes the decoder's targets as labels, and makes the decoder's
  inputs from them (shifted right, after its start token) where the batch has none: so does this, with the model's
  own ``prepare_decoder_input_ids_from_labels``. The text adapter masks the encoder's input only;
- every other head (sequence and token classifiers, masked language models...) scores each prediction against its
  own label, as before.

Vision-language models whose logits hold one prediction per input token, the image's placeholder tokens among them
(``CAUSAL_VLMS``: LLaVA, Qwen2-VL, Idefics 3...), and speech models whose audio fills placeholder tokens so
(``CAUSAL_AUDIO_LMS``: Qwen2-Audio, Voxtral...) have their labels read as a causal language model's. Other models
that generate text (BLIP-2, whose logits begin with its query tokens; GIT, with its image tokens; streaming speech
models...) lay out their labels each its own way, and are refused rather than trained on a target their own loss
would not read.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .loss import IGNORE_INDEX

CAUSAL, SEQ2SEQ = "causal", "seq2seq"
# causal language-model heads whose own loss reads the label of each position unshifted: XLM's and XLNet's, and the
# decoders of encoder-decoders (given inputs already shifted, as their encoder-decoder gives them); found by
# ``scripts/check_families.py --lm``, which checks every language model against its own loss
UNSHIFTED = ("XLMWithLMHeadModel", "XLNetLMHeadModel", "CpmAntForCausalLM", "TrOCRForCausalLM", "WhisperForCausalLM")
UNSHIFTED += ("BartForCausalLM", "MBartForCausalLM", "MvpForCausalLM", "PLBartForCausalLM", "BigBirdPegasusForCausalLM")
UNSHIFTED += ("BlenderbotForCausalLM", "BlenderbotSmallForCausalLM", "MarianForCausalLM", "PegasusForCausalLM")
# vision-language models (AutoModelForImageTextToText) whose logits hold one prediction per input token (an image's
# placeholders included) and whose own loss shifts the labels as a causal language model's does: found by
# ``scripts/check_families.py --vlm`` on text alone (transformers 5.25.0); LLaVA's, Qwen2-VL's, Qwen2.5-VL's and
# GLM-4V's tested with images
CAUSAL_VLMS = (
    "Apertus1p5ForConditionalGeneration",
    "AriaForConditionalGeneration",
    "AyaVisionForConditionalGeneration",
    "Cohere2VisionForConditionalGeneration",
    "Cosmos3EdgeForConditionalGeneration",
    "Cosmos3OmniForConditionalGeneration",
    "DeepseekVLForConditionalGeneration",
    "DeepseekVLHybridForConditionalGeneration",
    "Exaone4_5_ForConditionalGeneration",
    "FastVlmForConditionalGeneration",
    "Glm46VForConditionalGeneration",
    "Glm4vForConditionalGeneration",
    "Glm4vMoeForConditionalGeneration",
    "Glm5NextForConditionalGeneration",
    "GlmOcrForConditionalGeneration",
    "GraniteDoclingForConditionalGeneration",
    "HYV4VLForConditionalGeneration",
    "HunYuanVLForConditionalGeneration",
    "HyperCLOVAXVisionV2ForConditionalGeneration",
    "Idefics2ForConditionalGeneration",
    "Idefics3ForConditionalGeneration",
    "Inkling2ForConditionalGeneration",
    "Inkling2LoopForConditionalGeneration",
    "InternVLForConditionalGeneration",
    "JanusForConditionalGeneration",
    "Kimi_K25ForConditionalGeneration",
    "Kosmos2_5ForConditionalGeneration",
    "Lfm2VlForConditionalGeneration",
    "Lfm3VlForConditionalGeneration",
    "LightOnOcrForConditionalGeneration",
    "Llama4ForConditionalGeneration",
    "LlavaForConditionalGeneration",
    "LlavaNextForConditionalGeneration",
    "LlavaNextVideoForConditionalGeneration",
    "LlavaOnevision15ForConditionalGeneration",
    "LlavaOnevisionForConditionalGeneration",
    "MiniCPMOcrForConditionalGeneration",
    "MiniCPMV4_6ForConditionalGeneration",
    "MiniCPMV4_7ForConditionalGeneration",
    "MiniMaxM3SparseForConditionalGeneration",
    "Mistral3ForConditionalGeneration",
    "Mistral4ForCausalLM",
    "MistralLarge4ForConditionalGeneration",
    "Molmo2ForConditionalGeneration",
    "MuseGlimmerForConditionalGeneration",
    "MuseSparkForConditionalGeneration",
    "NemotronH_Omni_Reasoning_V3",
    "Ovis2ForConditionalGeneration",
    "Ovis2_5ForConditionalGeneration",
    "PaddleOCRVLForConditionalGeneration",
    "PaliGemmaForConditionalGeneration",
    "QianfanOCRForConditionalGeneration",
    "Qwen2VLForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration",
    "Qwen3VLForConditionalGeneration",
    "Qwen3VLMoeForConditionalGeneration",
    "SmolVLMForConditionalGeneration",
    "UnlimitedOcrForConditionalGeneration",
    "VideoLlama3ForConditionalGeneration",
    "VideoLlavaForConditionalGeneration",
    "VipLlavaForConditionalGeneration",
)
# speech models whose audio encoder's features fill the audio's placeholder tokens among the words, whose logits hold
# one prediction per input token and whose own loss shifts the labels as a causal language model's does (each tested
# with audio: tests/test_audio.py)
CAUSAL_AUDIO_LMS = ("AudioFlamingo3ForConditionalGeneration", "GlmAsrForConditionalGeneration")
CAUSAL_AUDIO_LMS += ("GraniteSpeechForConditionalGeneration", "GraniteSpeechPlusForConditionalGeneration")
CAUSAL_AUDIO_LMS += ("Qwen2AudioForConditionalGeneration", "Qwen3ASRForConditionalGeneration")
CAUSAL_AUDIO_LMS += ("VoxtralForConditionalGeneration",)
# causal language models whose logits hold more than the labels' positions (GIT's: its image tokens first)
OWN_LAYOUT = ("GitForCausalLM",)
# encoder-decoders whose forward, given labels, also hides the decoder's padding
DECODER_PADDING_MASKED = ("EncoderDecoderModel",)


def hugging_face_model(model: nn.Module) -> nn.Module | None:
    """The outermost Hugging Face model inside ``model`` (wrapped by masksub, PEFT, DDP, FSDP, ``torch.compile``,
    Accelerate or Fabric), or None."""
    if "transformers" not in sys.modules:  # never imported: no model of its can be here
        return None
    from transformers import PreTrainedModel

    return next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)


@functools.cache
def _causal_heads() -> frozenset[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
    causal = {n for name in names for n in ((name,) if isinstance(name, str) else name)}
    return frozenset((causal | set(CAUSAL_VLMS) | set(CAUSAL_AUDIO_LMS)) - set(UNSHIFTED))


@functools.cache
def _masked_heads() -> frozenset[str]:
    """Masked language models' classes (BERT's pretraining head...): each position scored against its own label.
    transformers 4 says they can generate (they have ``prepare_inputs_for_generation``)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    names = MODEL_FOR_MASKED_LM_MAPPING_NAMES.values()
    return frozenset(n for name in names for n in ((name,) if isinstance(name, str) else name))


def _classes(hf: nn.Module) -> set[str]:
    """The names of the transformers classes ``hf`` is an instance of (a subclass of your own is its base's kind)."""
    return {c.__name__ for c in type(hf).__mro__ if c.__module__.startswith("transformers.")}


def is_causal_lm(hf: nn.Module) -> bool:
    """Whether the Hugging Face model ``hf`` is a causal language model whose own loss shifts its labels."""
    return bool(_classes(hf) & _causal_heads())


def language_model(model: nn.Module) -> tuple[str | None, nn.Module | None]:
    """``(kind, hf)``: ``"causal"`` or ``"seq2seq"`` for a language model whose labels are laid out so (see the module
    doc), None for a model whose predictions each meet their own label; ``hf`` the Hugging Face model. An error for a
    model that generates text by another layout."""
    hf = hugging_face_model(model)
    if hf is None:
        return None, None
    if getattr(hf.config, "is_encoder_decoder", False):
        return SEQ2SEQ, hf
    classes = _classes(hf)
    if classes & set(OWN_LAYOUT):
        raise ValueError(
            f"{type(hf).__name__}'s logits hold more positions than its labels (its image tokens first), laid out its "
            "own way, so masksub cannot score them as its loss would: compute the loss yourself"
        )
    if is_causal_lm(hf):
        return CAUSAL, hf
    if hf.can_generate() and not classes & (set(UNSHIFTED) | _masked_heads()):
        raise ValueError(
            f"{type(hf).__name__} generates text, and is neither a causal language model (AutoModelForCausalLM, or a "
            "vision-language or speech model of masksub.language.CAUSAL_VLMS or CAUSAL_AUDIO_LMS, whose labels masksub "
            "shifts as the model's own loss does) nor an encoder-decoder: how its labels meet its logits is its own (a "
            "vision-language model's image or query tokens, a streaming speech model's delays, say), so masksub cannot "
            "score them as its loss would. Train its language model (AutoModelForCausalLM) with masksub, or compute "
            "the loss yourself"
        )
    return None, hf


def shift_right(hf: nn.Module, labels: torch.Tensor) -> torch.Tensor:
    """The decoder's inputs from ``labels`` for an encoder-decoder without ``prepare_decoder_input_ids_from_labels``
    (M2M100, NLLB, SeamlessM4T, Florence-2...), as their forwards make them: the decoder's start token (the decoder's
    configuration's, where it has one), then the labels but the last, -100 read as padding."""
    config = hf.config
    # a composite configuration's decoder ids sit in its text part (Florence-2's); another's view of its "text
    # configuration" may hold defaults the model does not read (M2M100's), so only a real part is asked first
    decoder = config.get_text_config(decoder=True) if getattr(config, "sub_configs", None) else config

    def first(name: str) -> int | None:  # the decoder configuration's id, else the whole configuration's
        return next((getattr(c, name) for c in (decoder, config) if getattr(c, name, None) is not None), None)

    start, pad = first("decoder_start_token_id"), first("pad_token_id")
    if start is None or pad is None:
        raise ValueError(
            f"{type(hf).__name__} is an encoder-decoder whose configuration names no decoder_start_token_id or "
            "pad_token_id, and the batch has no decoder_input_ids: add them (the labels shifted right, after the "
            "decoder's start token)"
        )
    shifted = torch.cat([labels.new_full((*labels.shape[:-1], 1), start), labels[..., :-1]], dim=-1)
    return shifted.masked_fill(shifted == IGNORE_INDEX, pad)


def labelled_tokens(kind: str | None, batch: Mapping) -> torch.Tensor | None:
    """How many of a batch's predictions a language model's own loss scores (labels other than -100, a causal
    model's first one left out as its shift leaves it), or None for a batch without labels."""
    if kind == CAUSAL and "shift_labels" in batch:
        return batch["shift_labels"].ne(IGNORE_INDEX).sum()
    labels = batch.get("labels")
    if not isinstance(labels, torch.Tensor):
        return None
    return (labels[..., 1:] if kind == CAUSAL else labels).ne(IGNORE_INDEX).sum()


def align(kind: str | None, hf: nn.Module | None, x, target: torch.Tensor | None):
    """``(inputs, target)`` for a batch whose labels ``split_labels`` took off: a causal language model's target
    shifted left (or its ``shift_labels``), an encoder-decoder's decoder inputs made from the labels where the batch
    has none; other models' unchanged."""
    if kind == CAUSAL:
        if isinstance(x, Mapping) and "shift_labels" in x:
            return {k: v for k, v in x.items() if k != "shift_labels"}, x["shift_labels"]
        return x, None if target is None else F.pad(target[..., 1:], (0, 1), value=IGNORE_INDEX)
    if kind == SEQ2SEQ and target is not None and isinstance(x, Mapping):
        if "decoder_input_ids" in x or "decoder_inputs_embeds" in x:
            return x, target
        prepare = getattr(hf, "prepare_decoder_input_ids_from_labels", None)
        decoder = shift_right(hf, target) if prepare is None else prepare(labels=target)
        if _classes(hf) & set(DECODER_PADDING_MASKED) and "decoder_attention_mask" not in x:
            x = {**x, "decoder_attention_mask": (decoder != hf.config.pad_token_id).to(decoder.dtype)}
        return {**x, "decoder_input_ids": decoder}, target
    return x, target


# a mixture-of-experts output's router losses, each with the names of the weight its model multiplies it by (looked
# up on its configuration, which TRL's router_aux_loss_coef sets, then on the model): load balancing (Mixtral, Qwen
# MoE, OLMoE, JetMoE's own name for it...; an encoder-decoder's, NLLB-MoE's and Switch Transformers', per stack) and
# router z-losses (Switch Transformers')
ROUTER_LOSSES = {
    "aux_loss": ("router_aux_loss_coef", "aux_loss_coef"),
    "encoder_aux_loss": ("router_aux_loss_coef",),
    "decoder_aux_loss": ("router_aux_loss_coef",),
    "encoder_z_loss": ("router_z_loss_coef",),
    "decoder_z_loss": ("router_z_loss_coef",),
}


def _router_weight(hf: nn.Module, names: tuple[str, ...], field: str) -> float:
    config = hf.config
    for source in (config, config.get_text_config(), hf):
        for name in names:
            if getattr(source, name, None) is not None:
                return float(getattr(source, name))
    raise ValueError(
        f"{type(hf).__name__}'s output holds a router loss ({field}) that its own loss adds to the cross-entropy, but "
        f"masksub finds no weight for it ({' or '.join(names)}) on the model or its configuration: turn the router "
        "losses off (config.output_router_logits=False), or compute the loss yourself"
    )


def router_loss(model: nn.Module, output) -> torch.Tensor | None:
    """The router losses a Hugging Face mixture-of-experts model's own loss adds to its cross-entropy (load
    balancing, router z-losses), read from its ``output`` and weighed as it weighs them; None where the output holds
    none (not a mixture of experts, or ``output_router_logits`` off). ``Step``, ``TrainingStep`` and
    ``MaskSubTrainer`` add it to the main branch's loss, which is then the model's own loss: they score the logits
    themselves, and would otherwise leave the experts' balance untrained. A per-batch mean, as the model computes it:
    it weighs each accumulated micro-batch alike, also where its cross-entropy is weighed by labelled tokens."""
    if not isinstance(output, Mapping):
        return None
    terms = [(field, output.get(field)) for field in ROUTER_LOSSES]
    terms = [(field, value) for field, value in terms if isinstance(value, torch.Tensor)]
    if not terms:
        return None
    hf = hugging_face_model(model)
    if hf is None:
        return None
    return sum(_router_weight(hf, ROUTER_LOSSES[field], field) * value.float() for field, value in terms)
