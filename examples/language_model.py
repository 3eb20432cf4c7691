"""Fine-tune a Hugging Face causal language model on prompts and responses with MaskSub.

    python examples/language_model.py --model Qwen/Qwen2.5-0.5B --train train.csv --valid valid.csv
    python examples/language_model.py ... --sub none          # the plain Trainer, same settings
    python examples/language_model.py ... --mode drop         # the sub pass on the kept words only

Each CSV file has a header with the columns ``prompt`` and ``response``. A row is the prompt's tokens (with the
tokenizer's start token, where it adds one) followed by the response's and the end token, cut to ``--max-length``;
the loss counts the response and its end token only (the prompt's labels are -100), as supervised fine-tuning
does. With ``--sub mask`` each training batch also runs a sub branch that sees ``--ratio`` of every row's words,
prompt and response alike, hidden by the attention mask (``--mode attention``, the default: decoders' tokenizers
have no mask token) or dropped from the sequence (``--mode drop``, for the decoders it takes: the sub pass costs
about ``1 - ratio`` of the main pass), and learns the main branch's distribution of each response token. Reports
the validation loss (the model's own), its perplexity, and the share of response tokens the model ranks first.
``--model`` is a model name on the Hugging Face hub or a local folder written by ``save_pretrained``; a tokenizer
without a padding token pads with its end token.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import transformers
from fashion_mnist import check_args  # the argument checks of the image examples
from text_classification import add_run_args, csv_rows, load_tokenizer, make_trainer
from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="hub name or local folder of a pretrained causal language model")
    p.add_argument("--train", required=True, type=Path, help="CSV with columns prompt,response")
    p.add_argument("--valid", required=True, type=Path, help="CSV with columns prompt,response")
    mode = (
        "--sub mask: masked words are hidden by the attention mask, leave the sequence (the sub pass costs about "
        "1 - ratio of the main pass), or become the mask token (a tokenizer that has one)"
    )
    add_run_args(p, mode=("attention", mode), batch_size=8, max_length=256, out="runs/language_model")
    return check_args(p, p.parse_args(argv), ("batch_size", "max_length"))


class Pairs(torch.utils.data.Dataset):
    """Rows of prompt then response tokens, labelled on the response (and its end token) only."""

    def __init__(self, tokenizer, path: Path, max_length: int):
        rows, _ = csv_rows(path, "prompt", "response")
        prompts = tokenizer([r["prompt"] for r in rows])["input_ids"]
        responses = tokenizer([r["response"] for r in rows], add_special_tokens=False)["input_ids"]
        self.rows = []
        for prompt, response in zip(prompts, responses):
            ids = (prompt + response + [tokenizer.eos_token_id])[:max_length]
            labels = ([-100] * len(prompt) + response + [tokenizer.eos_token_id])[:max_length]
            self.rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
        if not any(label != -100 for row in self.rows for label in row["labels"]):
            raise SystemExit(f"{path}: no response token is left within --max-length {max_length}: raise it")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


def top_tokens(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The token each position ranks first (kept instead of the logits, which span the vocabulary)."""
    return logits.argmax(-1)


def next_token_accuracy(pred) -> dict:
    """The share of labelled tokens that the position before them ranks first."""
    predicted, labels = pred.predictions[:, :-1], pred.label_ids[:, 1:]
    counted = labels != -100
    return {"accuracy": float((predicted[counted] == labels[counted]).mean())}


def main(argv=None) -> dict:
    args = parse_args(argv)
    transformers.set_seed(args.seed)
    tokenizer = load_tokenizer(args.model)  # pads with the end token where it has no padding token
    if tokenizer.eos_token_id is None:
        raise SystemExit(f"--model {args.model}: its tokenizer has no end token, which ends each response")
    train = Pairs(tokenizer, args.train, args.max_length)
    valid = Pairs(tokenizer, args.valid, args.max_length)
    model = AutoModelForCausalLM.from_pretrained(args.model)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    trainer = make_trainer(
        args,
        model=model,
        train_dataset=train,
        eval_dataset=valid,
        processing_class=tokenizer,
        data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100),  # pads the labels with -100
        compute_metrics=next_token_accuracy,
        preprocess_logits_for_metrics=top_tokens,
    )
    trainer.train()
    metrics = trainer.evaluate()
    trainer.save_model(str(Path(args.out) / "model"))
    summary = {"sub": args.sub, "ratio": args.ratio, "mode": args.mode if args.sub == "mask" else None}
    summary.update({k: metrics[k] for k in ("eval_accuracy", "eval_loss")})
    summary["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 700.0))
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
