"""Fine-tune a Hugging Face text classifier with MaskSub in the Trainer, and print its accuracy.

    python examples/text_classification.py --model bert-base-uncased --train train.csv --valid valid.csv
    python examples/text_classification.py ... --sub none           # the plain Trainer, same settings

Each CSV file has a header with the columns ``text`` and ``label`` (any label strings). ``--model``
is a model name on the Hugging Face hub or a local folder written by ``save_pretrained``. With
``--sub mask`` each training batch also runs a sub branch that sees ``--ratio`` of every sentence's
words replaced by the mask token and learns the main branch's prediction.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

from masksub.hf import MaskSubTrainer


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="hub name or local folder of a sequence-classification model")
    p.add_argument("--train", required=True, type=Path, help="CSV with columns text,label")
    p.add_argument("--valid", required=True, type=Path, help="CSV with columns text,label")
    p.add_argument("--sub", default="mask", choices=["mask", "dropout", "none"])
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--max-steps", type=int, default=-1, help="stop after this many optimizer steps (-1: epochs)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/text_classification")
    return p.parse_args(argv)


def read_csv(path: Path) -> tuple[list[str], list[str]]:
    if not path.is_file():
        raise SystemExit(f"{path}: no such file; pass a CSV with a header row and the columns text,label")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"text", "label"} <= set(reader.fieldnames):
            raise SystemExit(f"{path}: the header must name the columns text and label, got {reader.fieldnames}")
        rows = list(reader)
    if not rows:
        raise SystemExit(f"{path}: no rows below the header")
    return [r["text"] for r in rows], [r["label"] for r in rows]


class Encoded(torch.utils.data.Dataset):
    """Tokenized sentences and label ids; padding is left to the collator (per batch)."""

    def __init__(self, tokenizer, texts: list[str], labels: list[int], max_length: int):
        self.enc = tokenizer(texts, truncation=True, max_length=max_length)
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {**{k: v[i] for k, v in self.enc.items()}, "labels": self.labels[i]}


def accuracy(pred) -> dict:
    return {"accuracy": float((np.argmax(pred.predictions, axis=-1) == pred.label_ids).mean())}


def main(argv=None) -> dict:
    args = parse_args(argv)
    train_texts, train_labels = read_csv(args.train)
    valid_texts, valid_labels = read_csv(args.valid)
    names = sorted(set(train_labels))
    unknown = sorted(set(valid_labels) - set(names))
    if unknown:
        raise SystemExit(f"{args.valid}: labels {unknown} do not occur in {args.train}")
    ids = {name: i for i, name in enumerate(names)}
    transformers.set_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForSequenceClassification.from_pretrained(
        args.model, num_labels=len(names), id2label=dict(enumerate(names)), label2id=ids
    )
    train = Encoded(tokenizer, train_texts, [ids[y] for y in train_labels], args.max_length)
    valid = Encoded(tokenizer, valid_texts, [ids[y] for y in valid_labels], args.max_length)
    training = transformers.TrainingArguments(
        output_dir=args.out,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        learning_rate=args.lr,
        eval_strategy="epoch",
        save_strategy="no",
        report_to=[],
        seed=args.seed,
    )
    common = dict(
        model=model,
        args=training,
        train_dataset=train,
        eval_dataset=valid,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=accuracy,
    )
    if args.sub == "none":
        trainer = transformers.Trainer(**common)
    else:
        trainer = MaskSubTrainer(**common, sub=args.sub, ratio=args.ratio)
    trainer.train()
    metrics = trainer.evaluate()
    trainer.save_model(str(Path(args.out) / "model"))
    summary = {"sub": args.sub, "ratio": args.ratio, **{k: metrics[k] for k in ("eval_accuracy", "eval_loss")}}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
