"""Check masksub's three sub branches on every timm model family installed here (or, with
``--text`` / ``--vision``, on every Hugging Face transformers sequence / image classification
architecture; with ``--torchvision``, on every torchvision classification model family).

For each family (timm module) it takes the model with the least compute (parameters x default
input pixels, counted on the meta device), builds it at random init with a 5-class head re-drawn
so the output depends on the input (at its default input size; a model above 512 px that takes other
sizes, as the VLM towers do, at 224x224), and for ``mask``, ``dropout`` and ``droppath``:

- ``wrap`` picks an adapter (or refuses with an error that is reported as is);
- in eval mode the wrapped model's main pass equals the plain model's output, bit for bit;
- the sub pass keeps the output shape and, for ``mask``, changes the output;
- a train-mode sub pass back-propagates finite gradients, and reaches the mask token if any;
- for ``dropout`` and ``droppath``, the train-mode sub pass differs from the main pass under the
  same seed (the raised rate reaches the computation); parameters other than biases that start at
  zero (ResNet's last BatchNorm weights, SwinV2 post-norms, NFNet gains) are redrawn first, since
  they silence residual branches at init;
- ``unwrap()`` gives back a model whose eval output equals the wrapped main pass.

With ``--text`` each architecture is built at random init from its default configuration shrunk
to 2 layers of width 32 (a multimodal one's text and vision parts too), and fed random token ids
after a start token; the mask adapter gets the configuration's special ids (pad, bos, eos, ...).
A last column checks the text adapter's ``mode="drop"``: refused, or its sub pass on the kept
tokens against the model with the same tokens hidden by the attention mask. ``--lm`` does the same for every
language model (the causal ones, ``AutoModelForCausalLM``, and the encoder-decoders, ``AutoModelForSeq2SeqLM``; for
a causal one, the drop check compares the positions the sub pass predicted), with its labels (the input ids, -100 on
the first four; an encoder-decoder's, a target of their own), and a column more: ``masksub.Step``'s main loss
against the model's own loss given the labels (or the refusal ``masksub.language`` gives, and whether the model's own
loss is its labels shifted, as a causal model's). ``--vlm`` does the same for the vision-language models
(``AutoModelForImageTextToText``) on text alone, their image placeholders unused. With ``--vision`` the
same shrinking applies to transformer configurations (CNN configurations, with lists of stage
widths, keep their defaults), zero-init parameters are redrawn as for timm models, and the input
is random pixels at the configuration's image size. With ``--torchvision`` each family
(torchvision module) is built as its smallest model, at its weights' crop size, its last linear
layer and zero-init parameters redrawn; GoogLeNet and Inception v3 without their auxiliary heads
(``aux_logits=False``), whose extra outputs no loss of the sub branch would train.

Each family runs in a process of its own with a time limit, so one model that runs out of memory
or hangs costs only its row. Writes a JSON and a markdown table.

    python scripts/check_families.py                       # all families: ~40 min on 2 CPU cores
    python scripts/check_families.py --families vision_transformer resnet swin_transformer
    python scripts/check_families.py --text --out text_families
    python scripts/check_families.py --lm --out lm_families
    python scripts/check_families.py --vlm --out vlm_families
    python scripts/check_families.py --vision --out vision_families
    python scripts/check_families.py --torchvision --out torchvision_families
    python scripts/check_families.py --vision --families siglip2 --out vision_families --update  # one row again
    python scripts/check_families.py --lm --window 4 --families mistral gemma2 --out lm_families_window4
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

KINDS = ("mask", "dropout", "droppath")
WINDOW: int | None = None  # --window: the sliding window a language model that has one is given (tokens)
# A model whose default input side is above MAX_SIDE, and that takes other sizes, is checked at SMALL_SIDE
# (a multiple of 14 and 16 pixels, the patch sizes of the VLM towers this is for).
MAX_SIDE, SMALL_SIDE = 512, 224
INSENSITIVE = "at init the output does not depend on the input"


def families() -> dict[str, list[str]]:
    import timm

    return {module: timm.list_models(module=module) for module in timm.list_modules()}


def text_families() -> dict[str, list[str]]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    return {t: [name] for t, name in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.items()}


def lm_families() -> dict[str, list[str]]:
    """Language models: the causal ones (``AutoModelForCausalLM``) and the encoder-decoders (``AutoModelForSeq2SeqLM``),
    by model type (a type with both: its causal one)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    )

    both = {**MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES, **MODEL_FOR_CAUSAL_LM_MAPPING_NAMES}
    return {t: [name] for t, name in both.items()}


def vlm_families() -> dict[str, list[str]]:
    """Vision-language models that generate text (``AutoModelForImageTextToText``), but those of ``lm_families``
    (Gemma 3's, GIT's: causal language models too), by model type."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    language_models = lm_families()
    return {t: [name] for t, name in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.items() if t not in language_models}


def torchvision_families() -> dict[str, list[str]]:
    import torchvision
    from torchvision.models import get_model_builder, list_models

    found: dict[str, list[str]] = {}
    for name in list_models(module=torchvision.models):  # classification models only
        found.setdefault(get_model_builder(name).__module__.rsplit(".", 1)[-1], []).append(name)
    return found


def vision_families() -> dict[str, list[str]]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    names = MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES.items()
    return {t: [name] if isinstance(name, str) else list(name) for t, name in names}


# Set where the configuration has them (directly or through its attribute_map): 2 layers, width 32.
SHRINK = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    intermediate_size=64,
    head_dim=16,
    embedding_size=32,
    pooler_hidden_size=32,
    rotary_dim=8,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=2,
    decoder_attention_heads=2,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    num_local_experts=2,
    num_experts=2,
    num_experts_per_tok=1,
    moe_intermediate_size=32,
    n_group=1,  # expert groups (DeepSeek V3, AXK1): the 2 experts in one
    topk_group=1,
)
UNSET = ("head_dim", "num_key_value_heads", "num_experts_per_tok")  # set where a configuration leaves them None
SPECIAL_KEYS = ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id", "mask_token_id")


# text model types whose default configuration leaves out what their released checkpoints use: DeBERTa v2's has no
# relative attention, which v2 and v3 checkpoints have (v3's settings here)
RELEASED = {
    "deberta-v2": dict(
        relative_attention=True, position_biased_input=False, pos_att_type=["p2c", "c2p"], position_buckets=256,
        share_att_key=True, norm_rel_ebd="layer_norm",
    ),
}  # fmt: skip
# hybrids whose 2 shrunk layers would hold no recurrent layer or no attention layer (their default is all attention,
# all Mamba, or starts with attention; or their layout is set by other keys than layer types): a recurrent layer, then
# an attention layer, as the released models mix them. Set when the configuration is made (some derive their layout)
MAMBA2 = dict(mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_chunk_size=8)  # heads across twice the width
HYBRID_LAYOUTS = {
    "lfm2": dict(layer_types=["conv", "full_attention"], full_attn_idxs=[1]),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"], num_dense_layers=1),
    "minimax": dict(layer_types=["linear_attention", "full_attention"]),
    "granitemoehybrid": dict(layer_types=["mamba", "attention"], **MAMBA2),
    "zamba2": dict(layers_block_type=["mamba", "hybrid"]),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1),
    "bamba": dict(attn_layer_indices=[1], **MAMBA2),
}
# Latent attention (DeepSeek V2/V3, MiniCPM3, Mistral 4...): its ranks and head parts within the small width.
LATENT = dict(q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)


def _shrink(config, only_transformers: bool) -> None:
    """2 layers of width 32 where ``config`` has those keys; head sizes and key/value heads it leaves unset set too,
    latent attention made small, and layer types cut to the 2 layers (the last a full attention layer where the
    model has one, as hybrid linear-attention models need one)."""
    if only_transformers and not isinstance(getattr(config, "hidden_size", None), int):
        return
    for key, value in SHRINK.items():
        unset = key in UNSET and hasattr(config, key) and getattr(config, key) is None
        if unset or isinstance(getattr(config, key, None), int):
            with contextlib.suppress(AttributeError):  # a derived value (a property without a setter)
                setattr(config, key, value)
    if getattr(config, "kv_lora_rank", None):
        for key, value in LATENT.items():
            setattr(config, key, value)
        rope = getattr(config, "rope_parameters", None) or {}
        config.head_dim = int(config.qk_rope_head_dim / rope.get("partial_rotary_factor", 1.0))
    types = getattr(config, "layer_types", None)
    if isinstance(types, list) and types and isinstance(types[0], str):
        last = "full_attention" if "full_attention" in types else types[-1]
        with contextlib.suppress(AttributeError):  # derived from other keys (Jamba's)
            config.layer_types = [types[0], last][: getattr(config, "num_hidden_layers", 2)]


def _fit_rope_sections(config) -> None:
    """A vision-language model's 3-D RoPE (Qwen2-VL, GLM-4V...) with its time, height and width sections (2:3:3 in
    every default) over the shrunk heads' rotary half: the modeling code's default is sized for the released heads."""
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and getattr(config, "num_attention_heads", None) and _rope_sections(config):
        head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        factor = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None) or 1.0)
        rope["mrope_section"] = _split(rope.get("mrope_section") or [2, 3, 3], int(head * factor) // 2)


def _rope_sections(config) -> bool:
    """Whether ``config``'s modeling code splits its rotary embedding into sections (``mrope_section``)."""
    module = type(config).__module__
    if ".configuration_" not in module:
        return False
    spec = importlib.util.find_spec(module.replace(".configuration_", ".modeling_"))
    return spec is not None and spec.origin is not None and "mrope_section" in Path(spec.origin).read_text()


def _split(sections: list[int], total: int) -> list[int]:
    """``sections`` scaled to sum to ``total``, each at least 1 where ``total`` allows, in proportion."""
    scaled = [max(1, section * total // sum(sections)) for section in sections]
    scaled[-1] += total - sum(scaled)
    return scaled


def shrunk_config(model_type: str, only_transformers: bool = False, parts: bool = False):
    """``model_type``'s default configuration with 5 labels, 2 layers of width 32 where it has those keys
    (with ``only_transformers``, only where it has a single hidden size: not CNN stage lists); with ``parts``, its
    sub-configurations (a multimodal model's text and vision parts) shrunk alike."""
    import transformers

    config = transformers.AutoConfig.for_model(model_type)
    _shrink(config, only_transformers)
    if model_type in HYBRID_LAYOUTS:  # made again with the shrunk sizes: their validation reads the layout with them
        shrunk = {k: getattr(config, k) for k in SHRINK if isinstance(getattr(config, k, None), int)}
        config = transformers.AutoConfig.for_model(model_type, **shrunk, **HYBRID_LAYOUTS[model_type])
    for name in getattr(config, "sub_configs", {}) if parts else ():
        part = getattr(config, name, None)
        if isinstance(part, transformers.PretrainedConfig):
            _shrink(part, only_transformers)
    config.num_labels = 5
    return config


def build_lm(model_type: str):
    """A random-init language model of ``model_type`` (causal, else an encoder-decoder), shrunk; its inputs, other
    inputs (with labels: the input ids, -100 on the first quarter, or an encoder-decoder's target) and wrap options."""
    import transformers

    causal = transformers.AutoModelForCausalLM
    names = lm_families()[model_type]
    auto = causal if names[0] in causal._model_mapping._model_mapping.values() else transformers.AutoModelForSeq2SeqLM
    return _labelled(*build_text(model_type, auto))


def build_vlm(model_type: str):
    """A random-init vision-language model of ``model_type``, shrunk (its text and vision parts), with a language
    model's inputs and labels as ``build_lm`` gives them: text alone, its image placeholders unused."""
    import transformers

    return _labelled(*build_text(model_type, transformers.AutoModelForImageTextToText, rope_sections=True))


def _labelled(model, inputs: dict, other: dict, options: dict):
    """The labels of a language model's batch: the input ids, -100 on the first four (an encoder-decoder's, a target
    of its own length)."""
    labels = inputs["input_ids"].clone()
    if getattr(model.config, "is_encoder_decoder", False):
        labels = labels[:, 2:12].flip(1)  # a target of its own length
    labels[:, :4] = -100
    return model, {**inputs, "labels": labels}, {**other, "labels": labels}, options


def build_text(model_type: str, auto=None, rope_sections: bool = False):
    """A random-init 5-class sequence classifier of ``model_type`` (or ``auto``'s model), shrunk (``rope_sections``:
    a 3-D RoPE's sections fitted to the shrunk heads); its inputs, other inputs and wrap options."""
    import torch
    import transformers

    config = shrunk_config(model_type, parts=True)
    if rope_sections:
        _fit_rope_sections(config.get_text_config())
    config.update(RELEASED.get(model_type, {}))
    if WINDOW is not None:  # a sliding window shorter than the input, where the language model has one
        text = config.get_text_config()
        key = "window_size" if text.model_type == "gpt_neo" else "sliding_window"  # GPT-Neo's local attention
        if isinstance(getattr(text, key, None), int):
            setattr(text, key, WINDOW)
    for part in {id(c): c for c in (config, config.get_text_config())}.values():
        if getattr(part, "pad_token_id", None) is None:
            part.pad_token_id = 0  # decoder classifiers find each sequence's last token through it
    if getattr(config, "is_encoder_decoder", False) and getattr(config, "decoder_start_token_id", None) is None:
        config.decoder_start_token_id = config.pad_token_id
    model = (auto or transformers.AutoModelForSequenceClassification).from_config(config)
    if hasattr(model, "set_default_language"):  # X-MOD: the language adapters of its first language
        model.set_default_language(config.languages[0])
    special = {v for k in SPECIAL_KEYS for v in [getattr(config, k, None)] if isinstance(v, int)}
    mask_id = getattr(config, "mask_token_id", None)
    mask_id = mask_id if isinstance(mask_id, int) else next(i for i in range(3, 100) if i not in special)
    vocab = min(getattr(config, "vocab_size", 1000) or 1000, 1000)
    special.add(vocab - 2)  # a start token ([CLS], <s>) that is never masked: the one encoders pool
    ids = torch.randint(0, vocab, (2, 16))
    ids[ids.unsqueeze(-1).eq(torch.tensor(sorted(special | {mask_id}))).any(-1)] = vocab - 1
    ids[:, 0] = vocab - 2
    eos = getattr(config, "eos_token_id", None)
    if isinstance(eos, int) and eos < (getattr(config, "vocab_size", None) or eos + 1):  # Canine hashes any id
        ids[:, -1] = config.eos_token_id  # encoder-decoder classifiers (BART, T5) pool at the end token
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    other = {**inputs, "input_ids": torch.cat([ids[:, :1], ids[:, 1:].roll(1, dims=1)], dim=1)}  # the same start
    return model, inputs, other, {"mask_token_id": mask_id, "special_ids": sorted(special)}


def build_vision(model_type: str):
    """A random-init 5-class image classifier of ``model_type``, shrunk; random pixels at its image size."""
    import torch
    import transformers

    config = shrunk_config(model_type, only_transformers=True)
    model = getattr(transformers, vision_families()[model_type][0])(config)  # DeiT maps to two classes
    redraw_zero_parameters(model)
    if model_type == "siglip2":  # patches, as its image processor gives them (NaFlex), a square grid each
        vision = config.vision_config
        n, side = vision.num_patches, int(vision.num_patches**0.5)
        grid = {
            "pixel_attention_mask": torch.ones(2, n, dtype=torch.long),
            "spatial_shapes": torch.tensor([[side] * 2] * 2),
        }
        shape = (2, n, vision.num_channels * vision.patch_size**2)
        return (
            model,
            {"pixel_values": torch.rand(shape) + 0.5, **grid},
            {"pixel_values": torch.rand(shape) + 0.5, **grid},
            {},
        )
    size = getattr(config, "image_size", 224)
    h, w = (size, size) if isinstance(size, int) else tuple(size)[-2:]
    shape = (2, getattr(config, "num_channels", 3), h, w)
    return model, {"pixel_values": torch.rand(shape) + 0.5}, {"pixel_values": torch.rand(shape) + 0.5}, {}


def input_size(model) -> tuple[int, int, int]:
    return tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))


SMALL_WORDS = ("test_", "atto", "femto", "pico", "nano", "tiny", "xxs", "xs", "mini", "small")


def smallest(names: list[str]) -> tuple[str, tuple[int, int, int]] | None:
    """The name with the least parameters x input pixels, counted on the meta device.

    Where the installed timm/torch cannot build on the meta device (timm 1.0.20 calls ``.item()``
    in ``__init__``), names are ranked by the size words in them and the first that builds wins.
    """
    import timm
    import torch

    best = None
    for name in names:
        try:
            with torch.device("meta"):
                model = timm.create_model(name)
        except Exception:  # a model that cannot be built from its defaults is not a candidate
            continue
        size = input_size(model)
        cost = sum(p.numel() for p in model.parameters()) * size[1] * size[2]
        if best is None or cost < best[0]:
            best = (cost, name, size)
    if best is not None:
        return best[1:]

    def rank(name: str) -> tuple[int, int]:
        return next((i for i, w in enumerate(SMALL_WORDS) if w in name), len(SMALL_WORDS)), len(name)

    for name in sorted(names, key=rank):
        try:
            size = input_size(timm.create_model(name))
        except Exception:
            continue
        return name, size
    return None


def reason(e: Exception) -> str:
    """An exception as a table cell: its type and the first line of its message."""
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"


def check_kind(model, x, kind: str, sensitive: bool, options: dict | None = None) -> str:
    import torch

    import masksub
    from masksub.drops import values_of
    from masksub.outputs import logits_of

    def run(m, **kw):
        return logits_of(m(**x, **kw) if isinstance(x, dict) else m(x, **kw))

    note = ""

    model.eval()
    with torch.no_grad():
        plain = run(model)
    wrapped = masksub.wrap(model, sub=kind, ratio=0.5, **(options or {}) if kind == "mask" else {})
    try:
        label = getattr(wrapped.branch, "name", type(wrapped.branch).__name__)
        wrapped.eval()
        with torch.no_grad():
            assert torch.equal(run(wrapped), plain), "main pass differs from the plain model"
            sub = run(wrapped, sub=True)
        assert sub.shape == plain.shape, f"sub output shape {tuple(sub.shape)} != {tuple(plain.shape)}"
        if kind == "mask" and sensitive:
            assert not torch.allclose(sub, plain), "masking did not change the output"
        wrapped.train()
        run(wrapped, sub=True).float().square().mean().backward()
        bad = [n for n, p in wrapped.named_parameters() if p.grad is not None and not p.grad.isfinite().all()]
        assert not bad, f"non-finite gradients in {bad[0]}"
        # the branch's parameters, and a mask token it put into the model
        for name, p in [*wrapped.branch.named_parameters(), *wrapped.named_added_parameters().items()]:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} gets no gradient"
        if kind != "mask" and sensitive:  # the raised rate must reach the computation
            if all(v == wrapped.ratio for v in values_of(wrapped.branch._sites)):  # VGG's, AlexNet's dropout: 0.5
                wrapped.ratio, note = 0.75, f" (checked at 0.75: the model's own {kind} rates are all 0.5)"
            with torch.no_grad():
                torch.manual_seed(0)
                main_train = run(wrapped)
                torch.manual_seed(0)
                assert not torch.equal(run(wrapped, sub=True), main_train), f"{kind} did not change the output"
        wrapped.eval()
        with torch.no_grad():
            main = run(wrapped)
    finally:
        model.zero_grad(set_to_none=True)
        restored = wrapped.unwrap()
    with torch.no_grad():
        assert torch.equal(run(restored.eval()), main), "unwrap() changed the model"
    if kind != "mask":
        return "ok" + note
    return f"ok ({label})" if sensitive else f"ok ({label}; the change is not checked: {INSENSITIVE})"


def check_text_drop(model, x: dict, options: dict) -> str:
    """``mode="drop"`` of the text adapter: refused, or its sub pass on the kept tokens equal to hiding the same
    tokens by the attention mask (the same draw), as it is for every architecture it takes but the decoders with
    recurrent layers, whose sub pass must equal each sequence's kept tokens run alone. Equal within float32's
    rounding and a thousandth of what hiding the tokens moved the logits (at init they are small: a fixed
    tolerance would miss an error as large as a few percent of the masking's effect)."""
    import torch

    import masksub
    from masksub.adapters.text_families import RECURRENT_DECODERS
    from masksub.outputs import logits_of

    try:
        wrapped = masksub.wrap(model, sub="mask", ratio=0.5, mode="drop", **options)
    except ValueError:
        return "refused"
    try:
        wrapped.eval()
        with torch.no_grad():
            torch.manual_seed(0)
            got = logits_of(wrapped(**x, sub=True))
            kept = wrapped.sub_kept  # a per-token head's (a causal language model's): the places it predicted
            torch.manual_seed(0)
            mask = wrapped.branch.token_mask(x["input_ids"], x["attention_mask"], x.get("token_type_ids"))
            hidden = logits_of(model(**{**x, "attention_mask": x["attention_mask"].masked_fill(mask, 0)}))
            plain = logits_of(model(**x))
    finally:
        wrapped.unwrap()
    # a decoder with recurrent layers, where hiding leaves the masked tokens' places in the recurrence: the kept
    # tokens run alone
    recurrent = model.config.get_text_config().model_type in RECURRENT_DECODERS
    reference = _kept_alone(model, x, mask, got) if recurrent else hidden
    if kept is not None:  # compared where the sub pass predicted
        got, hidden, plain, reference = got[kept], hidden[kept], plain[kept], reference[kept]
    moved = (hidden - plain).abs().max().item()
    off = (got - reference).abs().max().item()
    kept = int(x["input_ids"].shape[1] - mask.sum(1).min())
    equal = off <= 1e-6 * reference.abs().max().item() + 1e-3 * moved + 1e-9
    run = f"{kept} of {x['input_ids'].shape[1]} tokens run"
    if recurrent:
        apart = (got - hidden).abs().max().item()
        verdict = "ok: equal to the kept tokens alone" if equal else "DIFFERS from the kept tokens alone"
        return f"{verdict} ({off:.0e} off; hiding {apart:.0e} apart, it moved them {moved:.0e}; {run})"
    verdict = "ok: equal to hiding" if equal else "DIFFERS from hiding"
    return f"{verdict} ({off:.0e} off, hiding moved them {moved:.0e}; {run})"


def _kept_alone(model, x: dict, mask, like):
    """The logits of each sequence's kept tokens (not masked, not padding) run by themselves at their own positions:
    a sequence classifier's (``like``: (B, C)), or per token at the kept tokens' places, 0 elsewhere (B, L, C)."""
    import torch

    from masksub.outputs import logits_of

    alone = torch.zeros_like(like)
    with torch.no_grad():
        for row in range(len(mask)):
            keep = (x["attention_mask"][row].bool() & ~mask[row]).nonzero().squeeze(1)
            ids = x["input_ids"][row, keep][None]
            out = logits_of(model(input_ids=ids, position_ids=keep[None]))[0]
            if like.ndim == 2:
                alone[row] = out
            else:
                alone[row, keep] = out
    return alone


def check_lm_labels(model, x: dict) -> str:
    """``masksub.Step``'s main loss (cross-entropy) on a batch with labels, against the model's own loss given them:
    equal where masksub reads the labels as the model does (a causal model's shifted, an encoder-decoder's as the
    decoder's targets, its inputs made from them), or refused by name."""
    import warnings

    import torch

    import masksub
    from masksub.language import language_model

    model.eval()
    try:
        kind = language_model(model)[0]
    except ValueError as e:
        return f"refused: {reason(e).partition(': ')[2][:90]}{_shifted(model, x)}"
    try:
        with torch.no_grad():
            own = model(**x).loss
    except Exception as e:  # the model itself, without masksub
        return f"not compared: the model's own loss fails on this batch ({reason(e)})"
    if own is None:
        return "the model computes no loss of its own"
    step = masksub.Step(model, torch.optim.SGD(model.parameters(), lr=0.0), torch.nn.CrossEntropyLoss())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eval mode: no dropout draw to match
        got = step(x)["loss_main"]
    model.zero_grad(set_to_none=True)
    how = {"causal": "labels shifted", "seq2seq": "decoder inputs from the labels", None: "per position"}[kind]
    if torch.allclose(got, own.float(), rtol=1e-5, atol=1e-6):
        return f"ok: the model's own loss ({how})"
    return f"DIFFERS from the model's own loss ({got.item():.6f} vs {own.item():.6f}; {how})"


def _shifted(model, x: dict) -> str:
    """For a refused model: whether its own loss is the cross-entropy of its labels shifted one left, as a causal
    language model's (what would let masksub take it as one)."""
    import torch
    import torch.nn.functional as F

    try:
        with torch.no_grad():
            out = model(**x)
    except Exception as e:  # the model itself, without masksub
        return f"; its own loss fails on this batch ({reason(e)[:60]})"
    labels = x["labels"]
    if out.get("loss") is None or out.logits.shape[:2] != labels.shape:
        return "; its own loss is not the labels shifted"
    shifted = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())
    same = torch.allclose(shifted, out.loss.float(), rtol=1e-5, atol=1e-6)
    return f"; its own loss {'IS' if same else 'is not'} the labels shifted"


def check_hf_family(model_type: str, names: list[str], build) -> dict:
    """One transformers architecture, built by ``build`` (``build_text`` or ``build_vision``)."""
    import torch

    row = {"family": model_type, "model": names[0]}
    torch.manual_seed(0)
    try:
        model, x, other, options = build(model_type)
    except Exception as e:  # reported as the row: a configuration that does not shrink or build
        return {**row, "error": f"not built: {reason(e)}"}
    first = next(iter(x.values()))
    row["input"] = list(first.shape[2:]) if first.ndim == 4 else [first.shape[1]]
    if WINDOW is not None:
        from masksub.adapters.text_families import sliding_window

        row["window"] = sliding_window(model.config.get_text_config())
    labelled = x
    if build in (build_lm, build_vlm):  # the language model's labels: checked against its own loss, then inputs alone
        x, other = ({k: v for k, v in batch.items() if k != "labels"} for batch in (x, other))
        if getattr(model.config, "is_encoder_decoder", False):  # the same decoder inputs in each pass
            from masksub.language import SEQ2SEQ, align

            decoder = align(SEQ2SEQ, model, {}, labelled["labels"])[0]  # the decoder inputs alone
            x, other = {**x, **decoder}, {**other, **decoder}
    try:
        with torch.no_grad():
            sensitive = not torch.allclose(model.eval()(**x).logits, model(**other).logits)
    except Exception as e:  # the plain model, without masksub: the shrunk configuration does not run
        return {**row, "error": f"plain model failed: {reason(e)}"}
    if build in (build_lm, build_vlm):
        try:
            row["labels"] = check_lm_labels(model, labelled)
        except Exception as e:  # reported per row: this is the result being collected
            row["labels"] = reason(e)
    for kind in KINDS:
        try:
            row[kind] = check_kind(model, x, kind, sensitive, options)
        except Exception as e:  # reported per row: this is the result being collected
            row[kind] = reason(e)
    if build in (build_text, build_lm, build_vlm) and "mask" in row and row["mask"].startswith("ok"):
        try:
            row["drop"] = check_text_drop(model, x, options)
        except Exception as e:  # reported per row: this is the result being collected
            row["drop"] = reason(e)
    return row


def redraw_zero_parameters(model) -> None:
    """Zero-init gains (ResNet's last BatchNorm, SwinV2 post-norms, NFNet gains) silence residual branches
    at init, and with them the output's dependence on the input: draw them at random."""
    import torch

    for name, p in model.named_parameters():
        if p.numel() and not p.any() and not name.endswith("bias"):
            torch.nn.init.normal_(p, std=0.1)


def check_family(family: str, names: list[str]) -> dict:
    import timm
    import torch

    picked = smallest(names)
    if picked is None:
        return {"family": family, "model": "", "error": "no model builds from its defaults"}
    name, size = picked
    row = {"family": family, "model": name, "input": list(size)}
    torch.manual_seed(0)
    if max(size[1:]) > MAX_SIDE and not timm.models.get_pretrained_cfg(name).fixed_input_size:
        # VLM towers (546-768 px by default) run out of memory on a small machine; they take other sizes
        row["default_input"], size = list(size), (size[0], SMALL_SIDE, SMALL_SIDE)
        row["input"] = list(size)
        try:
            model = timm.create_model(name, num_classes=5, img_size=SMALL_SIDE)
        except TypeError:  # no img_size argument: the model takes any size as built
            model = timm.create_model(name, num_classes=5)
    else:
        model = timm.create_model(name, num_classes=5)
    return check_image_model(row, model, model.get_classifier(), size)


def check_image_model(row: dict, model, head, size) -> dict:
    """``row`` with the three sub branches' results on a random-init image ``model`` at ``size`` (C, H, W)."""
    import torch

    if isinstance(head, torch.nn.Linear):  # some heads start at zero or tiny: the output would not see the input
        torch.nn.init.normal_(head.weight, std=0.5)
    redraw_zero_parameters(model)
    x = torch.rand(2, *size) + 0.5  # no exact zeros: zeroed pixels are the ones masked
    with torch.no_grad():
        sensitive = not torch.allclose(model.eval()(x), model(torch.rand_like(x)))
    for kind in KINDS:
        try:
            row[kind] = check_kind(model, x, kind, sensitive)
        except Exception as e:  # reported per row: this is the result being collected
            row[kind] = reason(e)
    return row


def check_torchvision_family(family: str, names: list[str]) -> dict:
    """One torchvision family: its smallest model (parameters x crop pixels, as its weights' metadata gives them:
    nothing is built or downloaded)."""
    import torch
    from torchvision.models import get_model, get_model_weights

    def crop(name: str) -> int:
        return get_model_weights(name).DEFAULT.transforms().crop_size[0]

    costs = {n: get_model_weights(n).DEFAULT.meta["num_params"] * crop(n) ** 2 for n in names}
    name = min(costs, key=costs.get)
    size = crop(name)
    row = {"family": family, "model": name, "input": [3, size, size]}
    torch.manual_seed(0)
    aux = {"aux_logits": False, "init_weights": True} if family in ("googlenet", "inception") else {}
    model = get_model(name, num_classes=5, **aux)
    head = next((m for m in reversed(list(model.modules())) if isinstance(m, torch.nn.Linear)), None)  # the last
    return check_image_model(row, model, head, (3, size, size))


def run_one(family: str, timeout: float, hf: str | None = None) -> dict:
    cmd = [sys.executable, __file__, "--one", family, *([f"--{hf}"] if hf else [])]
    cmd += ["--window", str(WINDOW)] if WINDOW is not None else []
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"family": family, "error": f"took longer than {timeout:.0f} s"}
    if done.returncode == -9:
        return {"family": family, "error": "killed (SIGKILL): out of memory at its input size?"}
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        return {"family": family, "error": f"process failed (exit {done.returncode}): {tail}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _short(text: str, limit: int = 160) -> str:
    text = text.replace("|", "/")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def markdown(rows: list[dict], versions: str, command: str, earlier: str = "") -> str:
    """The table; ``earlier``: the commands of the table this run updates (its ``Command:`` line), kept before it."""
    # text: the adapter's mode="drop"; language models: their labels against their own loss
    kinds = [*(["labels"] if any("labels" in r for r in rows) else []), *KINDS]
    kinds += ["drop"] if any("drop" in r for r in rows) else []
    head = "| family | model | input | " + " | ".join(kinds) + " |"
    lines = [
        f"Checked with {versions} on {os.cpu_count()} CPU cores ({platform.platform()}).",
        "",
        f"Command: {earlier}; then `{command}`" if earlier else f"Command: `{command}`",
        "",
        head,
        "|---" * (3 + len(kinds)) + "|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['family']} | {r.get('model', '')} | | {r['error']} |" + " |" * (len(kinds) - 1))
            continue
        size = "x".join(map(str, r["input"][-2:])) if len(r["input"]) > 1 else f"{r['input'][0]} tokens"
        if "default_input" in r:
            size += " (default {}x{})".format(*r["default_input"][-2:])
        if r.get("window"):
            size += f", a window of {r['window']}"
        cells = [_short(r.get(k, "")) for k in kinds]
        lines.append(f"| {r['family']} | {r['model']} | {size} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--families", nargs="*", help="timm or torchvision module names, or transformers model types (default: all)"
    )
    hf = p.add_mutually_exclusive_group()
    hf.add_argument("--text", action="store_true", help="Hugging Face text classifiers instead of timm models")
    hf.add_argument("--lm", action="store_true", help="Hugging Face language models (causal, encoder-decoder)")
    hf.add_argument("--vlm", action="store_true", help="Hugging Face vision-language models, on text alone")
    hf.add_argument("--vision", action="store_true", help="Hugging Face image classifiers instead of timm models")
    hf.add_argument("--torchvision", action="store_true", help="torchvision classifiers instead of timm models")
    p.add_argument("--out", type=Path, default=Path("families"), help="writes OUT.json and OUT.md")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--timeout", type=float, default=600, help="seconds per family")
    p.add_argument(
        "--update",
        action="store_true",
        help="replace the checked families' rows in OUT's existing table and keep the others (same versions only)",
    )
    p.add_argument(
        "--window",
        type=int,
        help="with --text, --lm or --vlm: the sliding window of a language model that has one set to WINDOW tokens "
        "(shorter than the 16-token input, so that the drop check sees it)",
    )
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    global WINDOW
    WINDOW = args.window
    mode = "text" if args.text else "lm" if args.lm else "vlm" if args.vlm else "vision" if args.vision else None
    mode = "torchvision" if args.torchvision else mode
    if args.one:
        import torch

        torch.set_num_threads(1)
        if mode is None:
            print(json.dumps(check_family(args.one, families()[args.one])))
        elif mode == "torchvision":
            print(json.dumps(check_torchvision_family(args.one, torchvision_families()[args.one])))
        else:
            found, build = {
                "text": (text_families, build_text),
                "lm": (lm_families, build_lm),
                "vlm": (vlm_families, build_vlm),
                "vision": (vision_families, build_vision),
            }[mode]
            print(json.dumps(check_hf_family(args.one, found()[args.one], build)))
        return
    import timm
    import torch

    found = {None: families, "text": text_families, "lm": lm_families, "vlm": vlm_families, "vision": vision_families}
    found["torchvision"] = torchvision_families
    found = found[mode]()
    chosen = args.families or sorted(found)
    unknown = [f for f in chosen if f not in found]
    if unknown:
        p.error(f"unknown families {unknown}; installed ones: {', '.join(sorted(found))}")
    versions = f"timm {timm.__version__}, torch {torch.__version__}"
    if mode == "torchvision":
        import torchvision

        versions = f"torchvision {torchvision.__version__}, torch {torch.__version__}"
    elif mode:
        import transformers

        versions = f"transformers {transformers.__version__}, torch {torch.__version__}"
    old = None
    if args.update and args.out.with_suffix(".json").exists():
        old = json.loads(args.out.with_suffix(".json").read_text())
        if old["versions"] != versions:
            p.error(f"{args.out}.json was checked with {old['versions']}, this run with {versions}: check all families")
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = []
        for row in pool.map(lambda f: run_one(f, args.timeout, mode), chosen):
            print(row, flush=True)
            rows.append(row)
    command, earlier = "python scripts/check_families.py " + " ".join(sys.argv[1:]), ""
    if old is not None:
        checked = {r["family"]: r for r in rows}
        rows = [checked.pop(r["family"], r) for r in old["rows"]] + list(checked.values())
        md = args.out.with_suffix(".md").read_text()
        earlier = next((line.removeprefix("Command: ") for line in md.splitlines() if line.startswith("Command: ")), "")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"versions": versions, "rows": rows}, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(rows, versions, command, earlier))
    print(f"wrote {args.out.with_suffix('.md')} and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
