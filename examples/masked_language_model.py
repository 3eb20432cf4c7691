"""Pretrain a Hugging Face masked language model (BERT's objective) with MaskSub.

    python examples/masked_language_model.py --model bert-base-uncased --train train.txt --valid valid.txt
    python examples/masked_language_model.py ... --sub none          # the plain Trainer, same settings
    python examples/masked_language_model.py ... --mode drop         # the sub pass on the kept words only
    python examples/masked_language_model.py ... --scratch           # fresh weights of the model's configuration

Each text file holds one text per line (blank lines are skipped), cut to ``--max-length`` tokens. Training batches
are masked as BERT's pretraining masks them (transformers' ``DataCollatorForLanguageModeling``: ``--mlm-probability``
of the words become targets, 80% of those the mask token, 10% a random word, 10% left as they are). With ``--sub
mask`` each batch also runs a sub branch that sees ``--ratio`` of the other words masked as well (the targets' mask
tokens are special tokens, never masked again): replaced by the mask token (``--mode token``, the default), hidden
by the attention mask (``--mode attention``) or dropped from the sequence (``--mode drop``: the sub pass costs about
``1 - ratio`` of the main pass and predicts every target shown as the mask token), and learns the main branch's
distribution of each target. The validation texts are masked once, with seed 0, so that every run is scored on the
same targets. Reports the validation loss (the model's own), its perplexity and the share of targets the model
ranks first, and saves the model and its tokenizer (``save_pretrained``) under ``--out``/model, ready for
``text_classification.py --model``. ``--model`` is a model name on the Hugging Face hub or a local folder written
by ``save_pretrained``; its tokenizer needs a mask token.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import transformers
from fashion_mnist import check_args  # the argument checks of the image examples
from language_model import top_tokens
from text_classification import add_run_args, load_tokenizer, make_trainer, train_and_evaluate
from transformers import AutoConfig, AutoModelForMaskedLM, DataCollatorForLanguageModeling


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="hub name or local folder of a masked language model")
    p.add_argument("--train", required=True, type=Path, help="text file, one text per line")
    p.add_argument("--valid", required=True, type=Path, help="text file, one text per line")
    p.add_argument("--mlm-probability", type=float, default=0.15, help="the share of words that become targets")
    p.add_argument("--scratch", action="store_true", help="fresh weights (seeded by --seed) of --model's configuration")
    mode = (
        "--sub mask: the other words become the mask token, are hidden by the attention mask, or leave the "
        "sequence (the sub pass costs about 1 - ratio of the main pass)"
    )
    add_run_args(p, mode=("token", mode), batch_size=32, max_length=128, out="runs/masked_language_model")
    args = check_args(p, p.parse_args(argv), ("batch_size", "max_length"))
    if not 0 < args.mlm_probability < 1:
        p.error(f"--mlm-probability must lie in (0, 1), got {args.mlm_probability}")
    return args


def read_lines(path: Path) -> list[str]:
    """The non-blank lines of the text file at ``path``; else an exit naming what is wrong."""
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f"error: cannot read {path}: {e}") from None
    lines = [line for line in lines if line]
    if not lines:
        raise SystemExit(f"error: {path} holds no text: one text per line")
    return lines


class Texts(torch.utils.data.Dataset):
    """Token ids of one text per row (with the tokenizer's special tokens), cut to ``max_length``."""

    def __init__(self, tokenizer, texts: list[str], max_length: int):
        encoded = tokenizer(texts, truncation=True, max_length=max_length, return_special_tokens_mask=True)
        self.rows = [dict(zip(encoded, values)) for values in zip(*encoded.values())]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


class Masking:
    """Masks the rows it is given as BERT's pretraining does, at each call; rows that already carry their targets
    (``labels``: the validation set, masked once) are only padded, their labels with -100."""

    def __init__(self, tokenizer, probability: float):
        self.mlm = DataCollatorForLanguageModeling(tokenizer, mlm_probability=probability)
        self.padding = transformers.DataCollatorForTokenClassification(tokenizer)

    def __call__(self, rows: list[dict]) -> dict:
        return self.padding(rows) if "labels" in rows[0] else self.mlm(rows)

    def fixed(self, dataset: Texts, seed: int = 0) -> list[dict]:
        """``dataset``'s rows each masked once under ``seed``: the same targets in every run."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            masked = []
            for row in dataset.rows:
                batch = self.mlm([row])
                keep = batch["attention_mask"][0].bool()
                masked.append({k: v[0][keep].tolist() for k, v in batch.items()})
        return masked


def target_accuracy(pred) -> dict:
    """The share of targets (labels other than -100) that the model ranks first."""
    counted = pred.label_ids != -100
    return {"accuracy": float((pred.predictions[counted] == pred.label_ids[counted]).mean())}


def main(argv=None) -> dict:
    args = parse_args(argv)
    transformers.set_seed(args.seed)
    tokenizer = load_tokenizer(args.model)
    if tokenizer.mask_token_id is None:
        raise SystemExit(f"--model {args.model}: its tokenizer has no mask token, which masked language models need")
    if args.scratch:
        try:
            model = AutoModelForMaskedLM.from_config(AutoConfig.from_pretrained(args.model))
        except ValueError as e:
            raise SystemExit(f"error: --model {args.model} has no masked language model: {e}") from None
    else:
        model = AutoModelForMaskedLM.from_pretrained(args.model)
    masking = Masking(tokenizer, args.mlm_probability)
    train = Texts(tokenizer, read_lines(args.train), args.max_length)
    valid = masking.fixed(Texts(tokenizer, read_lines(args.valid), args.max_length))
    if not any(label != -100 for row in valid for label in row["labels"]):
        raise SystemExit(f"{args.valid}: masking left no target: raise --mlm-probability or give longer texts")
    trainer = make_trainer(
        args,
        model=model,
        train_dataset=train,
        eval_dataset=valid,
        processing_class=tokenizer,
        data_collator=masking,
        compute_metrics=target_accuracy,
        preprocess_logits_for_metrics=top_tokens,
    )
    metrics = train_and_evaluate(trainer, args.out)
    summary = {"sub": args.sub, "ratio": args.ratio, "mode": args.mode if args.sub == "mask" else None}
    summary.update({k: metrics[k] for k in ("eval_accuracy", "eval_loss")})
    summary["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 700.0))
    summary.update({k: metrics[k] for k in ("train_seconds", "history")})
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
