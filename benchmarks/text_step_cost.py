"""Seconds per optimizer step and peak memory of text classifiers: plain vs MaskSub with each text mask mode.

The models are built at random initialization from the configurations of real checkpoints (no download):
``bert-base-uncased`` (a BERT-family encoder, pooled from the first token), DeBERTa-v3-base (relative positions,
given per sample from the kept tokens' positions in the drop mode), ModernBERT-base (RoPE, local attention
windows kept by position in the drop mode) and SmolLM2-135M (a Llama decoder, pooled from the last token) at the
CPU scale, Qwen2.5-0.5B besides at the GPU scale. Each takes batches of
random token ids whose lengths vary from half the padded length to all of it (right padding), as a padded
dataset gives them. Variants, timed in alternating rounds in one process (``benchmarks/common.py``):

- ``plain``: ``masksub.Step`` on the model alone;
- ``masksub:attention``: MaskSub at ratio 0.5, masked tokens hidden by the attention mask (full length);
- ``masksub:drop``: MaskSub at ratio 0.5, masked tokens dropped from the sequence (``mode="drop"``).

``--task token`` times token classifiers of the same configurations instead (a label per token, padding
labelled -100): there the drop mode's sub pass predicts the kept tokens only, and the distillation leaves the
dropped ones out. ``--task lm`` times the decoders' causal language models (supervised fine-tuning: the labels
are the input ids, -100 on a prompt of the first quarter of the padded length and on the padding; each labelled
next token distilled over the vocabulary). ``--task mlm`` times the encoders' masked language models (BERT's
pretraining: 15% of the words become targets, shown as the mask token, a special token the sub branch never masks
again; each target distilled over the vocabulary; the drop mode keeps every target). ``--task vlm`` times a
vision-language model's supervised fine-tuning, SmolVLM-256M's configuration (a 512-pixel image a sample, its 64
tokens before the words; everything trained): the image's tokens stay in the drop mode's sub pass, and its vision
tower runs in both branches.

Also the FLOP-ideal cost of each MaskSub mode, (main + sub FLOPs) / main FLOPs, forward and backward, from
``torch.utils.flop_counter``. Writes ``text_step_cost_<scale>.json`` and ``.md`` with the command, versions and
hardware.

    python benchmarks/text_step_cost.py --scale cpu --out benchmarks/results
    python benchmarks/text_step_cost.py --scale cpu --task token --out benchmarks/results  # text_step_cost_cpu_token
    python benchmarks/text_step_cost.py --scale cpu --task lm --out benchmarks/results  # text_step_cost_cpu_lm
    python benchmarks/text_step_cost.py --scale cpu --task mlm --out benchmarks/results  # text_step_cost_cpu_mlm
    python benchmarks/text_step_cost.py --scale cpu --task vlm --out benchmarks/results  # text_step_cost_cpu_vlm
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from common import alternating_step_times, hardware
from step_cost import peak_memory
from torch.utils.flop_counter import FlopCounterMode

import masksub

# DeBERTa v3's attention: relative positions (log buckets), no absolute ones
DEBERTA_V3 = dict(
    relative_attention=True, position_buckets=256, norm_rel_ebd="layer_norm", share_att_key=True,
    pos_att_type=["p2c", "c2p"], position_biased_input=False, layer_norm_eps=1e-7, type_vocab_size=0,
)  # fmt: skip
TINY = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
# name -> (model type, configuration of the checkpoint the name gives)
CONFIGS = {
    "bert-base-uncased": ("bert", {}),
    "SmolLM2-135M": (
        "llama",
        dict(
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            vocab_size=49152,
            max_position_embeddings=8192,
            tie_word_embeddings=True,
            rope_theta=100000.0,
        ),
    ),  # fmt: skip
    "Qwen2.5-0.5B": (
        "qwen2",
        dict(
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            vocab_size=151936,
            max_position_embeddings=32768,
            tie_word_embeddings=True,
        ),
    ),  # fmt: skip
    # not a released checkpoint: SmolLM2-135M's sizes (28 layers of 576, its vocabulary) in Qwen3.5's layout, 3 gated
    # delta nets to each attention layer (heads of 64), the decoders with recurrent layers' case (--task lm)
    "hybrid-135M": (
        "qwen3_5_text",
        dict(
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=28,
            num_attention_heads=9,
            num_key_value_heads=3,
            head_dim=64,
            linear_num_key_heads=9,
            linear_num_value_heads=9,
            linear_key_head_dim=64,
            linear_value_head_dim=64,
            vocab_size=49152,
            tie_word_embeddings=True,
        ),
    ),  # fmt: skip
    "deberta-v3-base": (  # the configuration's defaults are v2-xlarge's: base's sizes given
        "deberta-v2",
        dict(
            DEBERTA_V3,
            vocab_size=128100,
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            intermediate_size=3072,
            max_position_embeddings=512,
        ),
    ),  # fmt: skip
    "ModernBERT-base": ("modernbert", {}),  # its configuration's defaults: 22 layers, local windows of 128 tokens
    # a vision-language model (--task vlm): a SigLIP-B/16 tower at 512 pixels, its 1,024 patches shuffled into 64
    # tokens (scale factor 4), on SmolLM2-135M
    "SmolVLM-256M": (
        "smolvlm",
        dict(
            vision_config=dict(
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
                image_size=512,
                patch_size=16,
            ),
            scale_factor=4,
            image_token_id=49190,
            text_config=None,  # SmolLM2-135M's, with a vocabulary of 49,280: made in make_model
        ),
    ),  # fmt: skip
    "tiny-bert": ("bert", TINY),
    "tiny-deberta": ("deberta-v2", dict(DEBERTA_V3, **TINY, intermediate_size=64, position_buckets=8)),
    "tiny-llama": (
        "llama",
        dict(TINY, intermediate_size=64),
    ),
    "tiny-smolvlm": (  # 16-pixel images of 4-pixel patches, shuffled into 4 tokens
        "smolvlm",
        dict(
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
            | dict(image_size=16, patch_size=4),
            scale_factor=2,
            image_token_id=63,
            text_config=dict(TINY, intermediate_size=64, model_type="llama"),
        ),
    ),
}
VLM_TEXT = {"SmolVLM-256M": dict(CONFIGS["SmolLM2-135M"][1], vocab_size=49280, model_type="llama")}
# scale -> (models, batch, padded length, warm-up steps, rounds, steps per round, device)
SCALES = {
    "gpu": (
        ("bert-base-uncased", "deberta-v3-base", "ModernBERT-base", "SmolLM2-135M", "Qwen2.5-0.5B", "SmolVLM-256M"),
        *(32, 512, 5, 5, 5, "cuda"),
    ),
    "cpu": (
        ("bert-base-uncased", "deberta-v3-base", "ModernBERT-base", "SmolLM2-135M", "SmolVLM-256M"),
        *(8, 128, 1, 4, 2, "cpu"),
    ),
    "tiny": (("tiny-bert", "tiny-deberta", "tiny-llama", "tiny-smolvlm"), 4, 16, 1, 2, 1, "cpu"),
}
VLM_BATCH = {"gpu": 16, "cpu": 4, "tiny": 4}  # --task vlm: a 512-pixel image a sample costs more than its words
PAD, SPECIAL = 0, (0, 1, 2)  # padding and two more special ids, never masked
MASK = 3  # --task mlm: the mask token, special there (its batches' words start after it)
MLM_PROBABILITY = 0.15  # BERT's
MODES = ("attention", "drop")


HEADS = {
    "sequence": transformers.AutoModelForSequenceClassification,
    "token": transformers.AutoModelForTokenClassification,
    "lm": transformers.AutoModelForCausalLM,  # the decoders only
    "mlm": transformers.AutoModelForMaskedLM,  # the encoders only
    "vlm": transformers.AutoModelForImageTextToText,  # the vision-language models only
}
HEAD_NAMES = {"sequence": "sequence classifiers", "token": "token classifiers", "lm": "causal language models"}
HEAD_NAMES |= {"mlm": "masked language models", "vlm": "a vision-language model's causal language model"}


def special_ids(task: str) -> tuple[int, ...]:
    return (*SPECIAL, MASK) if task == "mlm" else SPECIAL


def is_vlm(name: str) -> bool:
    return CONFIGS[name][0] == "smolvlm"


def make_model(name: str, device: torch.device, task: str = "sequence", frozen: bool = False) -> torch.nn.Module:
    """A random-init model of the configuration ``name`` with the head of ``task``, in training mode (``frozen``:
    a vision-language model's vision tower frozen)."""
    kind, overrides = CONFIGS[name]
    if is_vlm(name):  # the padding id is the language model's
        text = dict(overrides["text_config"] or VLM_TEXT[name], pad_token_id=PAD)
        config = transformers.AutoConfig.for_model(kind, **{**overrides, "text_config": text})
    else:
        config = transformers.AutoConfig.for_model(kind, **overrides, num_labels=2, pad_token_id=PAD)
    torch.manual_seed(0)
    model = HEADS[task].from_config(config).to(device).train()
    if frozen:
        masksub.adapters.frozen_encoder.image_encoder(model).requires_grad_(False)
    return model


def make_batch(batch: int, length: int, vocab: int, device: torch.device, task: str = "sequence") -> dict:
    """Random words, lengths from ``length // 2`` to ``length`` (right padding), and labels: one per text, one per
    token (padding labelled -100), a language model's (the input ids; -100 on the padding and a prompt of
    ``length // 4`` tokens), or a masked language model's (``MLM_PROBABILITY`` of the words become targets, shown as
    the mask token; -100 elsewhere)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(len(special_ids(task)), vocab, (batch, length), generator=g)
    lengths = torch.linspace(length // 2, length, batch).long()
    real = torch.arange(length) < lengths.unsqueeze(1)
    ids = ids.masked_fill(~real, PAD)
    labels = torch.randint(0, 2, (batch, length) if task == "token" else (batch,), generator=g)
    if task == "token":
        labels = labels.masked_fill(~real, -100)
    elif task == "lm":
        labels = ids.masked_fill(~real | (torch.arange(length) < length // 4), -100)
    elif task == "mlm":
        targets = real & (torch.rand(ids.shape, generator=g) < MLM_PROBABILITY)
        labels, ids = ids.masked_fill(~targets, -100), ids.masked_fill(targets, MASK)
    return {"input_ids": ids.to(device), "attention_mask": real.long().to(device), "labels": labels.to(device)}


def make_vlm_batch(batch: int, words: int, config, device: torch.device) -> dict:
    """Supervised fine-tuning of a vision-language model on one image a sample: the image's placeholder tokens
    first, then ``words // 2`` to ``words`` random words (right padding); the labels are the input ids, -100 on the
    image, on a prompt of ``words // 4`` words and on the padding; random pixels."""
    image = config.image_token_id
    vision = config.vision_config
    placeholders = (vision.image_size // vision.patch_size) ** 2 // config.scale_factor**2
    g = torch.Generator().manual_seed(0)
    text = make_batch(batch, words, image, device="cpu", task="lm")  # words below the image's id
    ids = torch.cat([torch.full((batch, placeholders), image), text["input_ids"]], 1)
    real = torch.cat([torch.ones(batch, placeholders, dtype=torch.long), text["attention_mask"]], 1)
    labels = torch.cat([torch.full((batch, placeholders), -100), text["labels"]], 1)
    pixels = torch.randn(batch, 1, 3, vision.image_size, vision.image_size, generator=g)
    batch = {"input_ids": ids, "attention_mask": real, "labels": labels, "pixel_values": pixels}
    return {k: v.to(device) for k, v in batch.items()}


def flop_ideal(model: torch.nn.Module, batch: dict, mode: str, task: str) -> float:
    """(main + sub) / main forward+backward FLOPs of MaskSub with ``mode``."""
    wrapped = masksub.wrap(model, ratio=0.5, mode=mode, special_ids=special_ids(task))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    flops = []
    for sub in (False, True):
        with FlopCounterMode(display=False) as counter:
            wrapped(**inputs, sub=sub).logits.float().sum().backward()
        flops.append(counter.get_total_flops())
    wrapped.unwrap()
    model.zero_grad(set_to_none=True)
    return (flops[0] + flops[1]) / flops[0]


def bench(name: str, args, device: torch.device) -> dict:
    _, batch_size, length, warmup, rounds, calls, _ = SCALES[args.scale]
    batch_size, length = args.batch or batch_size, args.length or length
    model = make_model(name, device, args.task, args.frozen_vision)
    if args.task == "vlm":
        batch_size = args.batch or VLM_BATCH[args.scale]
        batch = make_vlm_batch(batch_size, length, model.config, device)
        length = batch["input_ids"].shape[1]  # the image's tokens and the words
    else:
        batch = make_batch(batch_size, length, model.config.vocab_size, device, args.task)
    row = {"batch": batch_size, "length": length, "params_m": sum(p.numel() for p in model.parameters()) / 1e6}
    row["flop_ideal"] = {
        mode: flop_ideal(make_model(name, device, args.task, args.frozen_vision), batch, mode, args.task)
        for mode in MODES
    }
    steps, peaks = {}, {}
    for variant in ("plain", *(f"masksub:{mode}" for mode in MODES)):
        model = make_model(name, device, args.task, args.frozen_vision)
        mode = variant.partition(":")[2]
        net = masksub.wrap(model, ratio=0.5, mode=mode, special_ids=special_ids(args.task)) if mode else model
        opt = torch.optim.AdamW(net.parameters(), lr=1e-5)
        step = masksub.Step(net, opt, torch.nn.CrossEntropyLoss(), amp=None if args.amp == "none" else "bf16")
        steps[variant] = lambda step=step: step(batch)
        steps[variant]()  # one step first: the optimizer state exists before the peak is read
        peaks[variant] = peak_memory(lambda x, y, step=steps[variant]: step(), net, opt, batch["input_ids"], None, 1)
    times = {v: [] for v in steps}
    for _ in range(rounds):  # alternating rounds; the median of each round's steps
        for v, s in alternating_step_times(steps, device.type == "cuda", warmup=warmup, rounds=1, calls=calls).items():
            times[v].append(s)
        warmup = 0
    for v, ts in times.items():
        row[v] = {
            "s_per_step": statistics.fmean(ts),
            "spread": statistics.stdev(ts) if len(ts) > 1 else 0.0,
            "peak_gib": peaks[v],
        }
        print(f"{name:20s} {v:20s} {statistics.fmean(ts) * 1000:9.1f} ms/step", flush=True)
    return row


def markdown(data: dict) -> str:
    meta = data["meta"]
    frozen = ""
    if meta.get("frozen_vision"):
        again = "" if meta.get("encoder_reuse", True) else ", run again in the sub pass"
        frozen = f" (its vision tower frozen{again})"
    lines = [
        f"torch {meta['torch']}, transformers {meta['transformers']}; {meta['precision']}; {meta['hardware']}, "
        f"{meta['date']}.",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Heads: {HEAD_NAMES[meta.get('task', 'sequence')]}{frozen}.",
        "",
        "Peak memory: tensor memory (parameters, optimizer state, gradients, activations) at its peak over a step"
        " (a CPU: the profiler's allocation and free events; a GPU: the CUDA allocator's peak).",
        "",
        "| model | params (M) | batch x length | plain ms | attention / plain | its FLOP-ideal | drop / plain "
        "| its FLOP-ideal | plain peak GiB | attention / plain peak | drop / plain peak |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in data["models"].items():
        plain = row["plain"]
        ratio = {m: row[f"masksub:{m}"]["s_per_step"] / plain["s_per_step"] for m in MODES}
        peak = {m: row[f"masksub:{m}"]["peak_gib"] / plain["peak_gib"] for m in MODES}
        lines.append(
            f"| {name} | {row['params_m']:.0f} | {row['batch']} x {row['length']} | "
            f"{plain['s_per_step'] * 1000:.1f} ± {plain['spread'] * 1000:.1f} | {ratio['attention']:.3f} | "
            f"{row['flop_ideal']['attention']:.3f} | {ratio['drop']:.3f} | {row['flop_ideal']['drop']:.3f} | "
            f"{plain['peak_gib']:.2f} | {peak['attention']:.3f} | {peak['drop']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scale", choices=tuple(SCALES), default="cpu")
    p.add_argument("--models", default=None, help=f"comma-separated, of {', '.join(CONFIGS)}")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--length", type=int, default=None, help="padded length (--task vlm: of the words)")
    p.add_argument("--amp", default="bf16", choices=("bf16", "none"))
    p.add_argument(
        "--task", default="sequence", choices=tuple(HEADS), help="a label per text or token, next tokens, or targets"
    )
    p.add_argument(
        "--frozen-vision", action="store_true", help="--task vlm: the vision tower frozen (no gradient, computed once)"
    )
    p.add_argument(
        "--no-encoder-reuse",
        action="store_true",
        help="with --frozen-vision: the sub pass runs the frozen tower again (what reusing its output saves)",
    )
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()
    names, *_, device = SCALES[args.scale]
    decoders = masksub.adapters.text_families.DROP_DECODERS
    if args.task == "lm" and not args.models:  # the decoders have causal language models
        names = tuple(n for n in names if CONFIGS[n][0] in decoders)
    if args.task == "mlm" and not args.models:  # the encoders masked language models
        names = tuple(n for n in names if CONFIGS[n][0] not in decoders)
    if not args.models:  # --task vlm: the vision-language models alone; the other tasks: none of them
        names = tuple(n for n in names if is_vlm(n) == (args.task == "vlm"))
    names = args.models.split(",") if args.models else names
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        sys.exit(f"unknown model {', '.join(unknown)}; known: {', '.join(CONFIGS)}")
    other = [n for n in names if is_vlm(n) != (args.task == "vlm")]
    if other:
        vlms = ", ".join(n for n in CONFIGS if is_vlm(n))
        sys.exit(f"--task {args.task} does not take {', '.join(other)}: --task vlm takes {vlms}, the others the rest")
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("--scale gpu needs CUDA; on this machine use --scale cpu (or --scale tiny)")
    device = torch.device(device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.frozen_vision and args.task != "vlm":
        sys.exit("--frozen-vision freezes a vision-language model's vision tower: it goes with --task vlm")
    if args.no_encoder_reuse and not args.frozen_vision:
        sys.exit("--no-encoder-reuse runs a frozen vision tower again in the sub pass: it goes with --frozen-vision")
    if args.no_encoder_reuse:
        masksub.adapters.frozen_encoder.FrozenEncoderCache.frozen = lambda self: False
    frozen = ("_frozen" if args.frozen_vision else "") + ("_rerun" if args.no_encoder_reuse else "")
    task = "" if args.task == "sequence" else "_" + args.task + frozen
    path = out / f"text_step_cost_{args.scale}{task}.json"
    data = {
        "meta": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "precision": "fp32, AdamW" if args.amp == "none" else "bf16 autocast, AdamW",
            "hardware": hardware(device.type),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": "python " + " ".join(sys.argv),
            "task": args.task,
            "frozen_vision": args.frozen_vision,
            "encoder_reuse": not args.no_encoder_reuse,
        },
        "models": {},
    }
    for name in names:
        data["models"][name] = bench(name, args, device)
        path.write_text(json.dumps(data, indent=2))  # after each model: a cut-off run keeps what it measured
        path.with_suffix(".md").write_text(markdown(data))
    print(markdown(data))


if __name__ == "__main__":
    main()
