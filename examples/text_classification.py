"""Fine-tune a Hugging Face text classifier, tagger, multiple-choice or question-answering model with MaskSub.

    python examples/text_classification.py --model bert-base-uncased --train train.csv --valid valid.csv
    python examples/text_classification.py ... --sub none           # the plain Trainer, same settings
    python examples/text_classification.py --task token --model bert-base-cased \
        --train train.conll --valid valid.conll                      # tagging (NER, POS...), one tag per word
    python examples/text_classification.py --task choice --model roberta-base \
        --train train.csv --valid valid.csv                          # multiple choice (SWAG, RACE...)
    python examples/text_classification.py --task qa --model bert-base-uncased \
        --train train.csv --valid valid.csv                          # extractive question answering (SQuAD)

``--task sequence`` (default): each CSV file has a header with the columns ``text`` and ``label``
(any label strings). ``--task token``: CoNLL-style files, one word per line with its tag in the
last column, a blank line between sentences (``-DOCSTART-`` lines are skipped); the first piece of
each word carries its tag, the other pieces and the special tokens are labelled -100, and the
accuracy is over words (for entity-level F1 use ``seqeval`` on the predictions). ``--task choice``:
CSV files with the columns ``text`` (the context or question), ``choice0``, ``choice1``... (two or
more: the answers, each read after the text) and ``label`` (the index of the right one); each choice
is masked as a sentence of its own. ``--task qa``: CSV files with the columns ``question``,
``context`` and ``answer`` (a span of the context, its first occurrence); the model predicts the
answer's first and last token in the context (the [CLS] token where truncation cut the answer off),
and the accuracy counts answers whose both ends it finds. ``--model`` is a
model name on the Hugging Face hub or a local folder written by ``save_pretrained``. With ``--sub
mask`` each training batch also runs a sub branch that sees ``--ratio`` of every sentence's words
replaced by the mask token (``--mode token``), hidden by the attention mask (``--mode attention``,
for tokenizers without a mask token) or dropped from the sequence (``--mode drop``: the sub pass
costs about ``1 - ratio`` of the main pass) and learns the main branch's prediction (per token for
``--task token``; with ``--mode drop``, per kept token). A decoder's tokenizer without a padding token
pads with its end token, and the model's config gets that padding id, so its classifier finds each
text's last token:

    python examples/text_classification.py --model Qwen/Qwen2.5-0.5B --mode drop --train ... --valid ...
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from fashion_mnist import check_args  # the argument checks of the image examples
from transformers import (
    AutoModelForMultipleChoice,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    DataCollatorForTokenClassification,
    DataCollatorWithPadding,
)

from masksub.hf import MaskSubTrainer


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--task",
        default="sequence",
        choices=["sequence", "token", "choice", "qa"],
        help="a label per text or per word, the index of a text's right choice, or an answer's span in a context",
    )
    p.add_argument("--model", required=True, help="hub name or local folder of a pretrained model")
    p.add_argument("--train", required=True, type=Path, help="CSV with columns text,label; CoNLL for --task token")
    p.add_argument("--valid", required=True, type=Path, help="CSV with columns text,label; CoNLL for --task token")
    mode = (
        "--sub mask: masked words become the mask token, are hidden by the attention mask, or leave the sequence "
        "(sequence classifiers it takes: the sub pass costs about 1 - ratio of the main pass)"
    )
    add_run_args(p, mode=("token", mode), batch_size=32, max_length=128, out="runs/text_classification")
    return check_args(p, p.parse_args(argv), ("batch_size", "max_length"))


def add_run_args(p, mode: tuple[str, str], batch_size: int, max_length: int, out: str) -> None:
    """The sub branch's and the Trainer's arguments, shared with ``language_model.py``; ``mode``: the default of
    ``--mode`` and its help."""
    p.add_argument("--sub", default="mask", choices=["mask", "dropout", "none"])
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--mode", default=mode[0], choices=["token", "attention", "drop"], help=mode[1])
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--max-steps", type=int, default=-1, help="stop after this many optimizer steps (-1: epochs)")
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--max-length", type=int, default=max_length)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=out)


def load_tokenizer(name: str):
    """``name``'s tokenizer; one without a padding token pads with its end token (decoders': Llama, Qwen...)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:  # not on the hub, not reachable, or no tokenizer there
        raise SystemExit(f"error: cannot load the tokenizer of --model {name}: {e}") from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def make_trainer(args, **common) -> transformers.Trainer:
    """The Trainer of ``args`` (``--sub none``: the plain one, else ``MaskSubTrainer``) with ``common``'s model,
    data, collator and metrics."""
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
    if args.sub == "none":
        return transformers.Trainer(args=training, **common)
    options = {"mask_options": {"mode": args.mode}} if args.sub == "mask" else {}
    return MaskSubTrainer(args=training, **common, sub=args.sub, ratio=args.ratio, **options)


def csv_rows(path: Path, *columns: str) -> tuple[list[dict], list[str]]:
    """The rows of the CSV file at ``path`` and its header, which must name ``columns``; else an exit naming what
    is wrong."""
    names = f"{', '.join(columns[:-1])} and {columns[-1]}"
    if not path.is_file():
        raise SystemExit(f"{path}: no such file; pass a CSV with a header row and the columns {names}")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        if not set(columns) <= set(header):
            raise SystemExit(f"{path}: the header must name the columns {names}, got {header}")
        rows = list(reader)
    if not rows:
        raise SystemExit(f"{path}: no rows below the header")
    return rows, header


def read_csv(path: Path) -> tuple[list[str], list[str]]:
    rows, _ = csv_rows(path, "text", "label")
    return [r["text"] for r in rows], [r["label"] for r in rows]


def read_choices(path: Path) -> tuple[list[tuple[str, list[str]]], list[int]]:
    """Each row's text with its choices (columns choice0, choice1... two or more), and the index of its right one."""
    rows, header = csv_rows(path, "text", "choice0", "choice1", "label")
    count = next(i for i in range(len(header) + 1) if f"choice{i}" not in header)
    labels = []
    for n, row in enumerate(rows, start=2):
        if not row["label"].strip().isdigit() or int(row["label"]) >= count:
            raise SystemExit(
                f"{path}:{n}: label must be the index of the right choice, 0 to {count - 1}, got {row['label']!r}"
            )
        labels.append(int(row["label"]))
    return [(r["text"], [r[f"choice{i}"] for i in range(count)]) for r in rows], labels


def read_answers(path: Path) -> tuple[list[tuple[str, str]], list[tuple[int, int]]]:
    """Each row's question and context, and its answer's span in the context in characters (first occurrence)."""
    rows, _ = csv_rows(path, "question", "context", "answer")
    spans = []
    for n, row in enumerate(rows, start=2):
        start = row["context"].find(row["answer"]) if row["answer"] else -1
        if start < 0:
            raise SystemExit(f"{path}:{n}: the answer {row['answer']!r} is not a span of the context")
        spans.append((start, start + len(row["answer"])))
    return [(r["question"], r["context"]) for r in rows], spans


def read_conll(path: Path) -> tuple[list[list[str]], list[list[str]]]:
    """Sentences as word lists and their tags: one ``word ... tag`` line per word, blank lines between."""
    if not path.is_file():
        raise SystemExit(f"{path}: no such file; pass a CoNLL-style file: one 'word tag' line per word")
    sentences, tags, words, labels = [], [], [], []
    for n, line in enumerate([*path.read_text(encoding="utf-8").splitlines(), ""], start=1):
        parts = line.split()
        if parts and parts[0] != "-DOCSTART-":
            if len(parts) < 2:
                raise SystemExit(f"{path}:{n}: expected a word and its tag, got {line!r}")
            words.append(parts[0])
            labels.append(parts[-1])
        elif words:
            sentences.append(words)
            tags.append(labels)
            words, labels = [], []
    if not sentences:
        raise SystemExit(f"{path}: no sentences; expected 'word tag' lines, a blank line between sentences")
    return sentences, tags


class Encoded(torch.utils.data.Dataset):
    """Tokenized texts and their label ids (one per text, or one per token); padding is left to the collator."""

    def __init__(self, tokenizer, texts: list, labels: list, max_length: int, words: bool = False):
        if texts and isinstance(texts[0], tuple):  # multiple choice: a (text, choice) pair per choice, then per row
            pairs = [(text, choice) for text, choices in texts for choice in choices]
            flat = tokenizer(*map(list, zip(*pairs)), truncation=True, max_length=max_length)
            count = len(texts[0][1])
            self.enc = {k: [v[i : i + count] for i in range(0, len(v), count)] for k, v in flat.items()}
        else:
            self.enc = tokenizer(texts, truncation=True, max_length=max_length, is_split_into_words=words)
        self.labels = [self.align(i, tags) for i, tags in enumerate(labels)] if words else labels

    def align(self, i: int, tags: list[int]) -> list[int]:
        """The first piece of each word carries its tag; later pieces and special tokens get -100."""
        row, previous = [], None
        for word in self.enc.word_ids(i):
            row.append(-100 if word is None or word == previous else tags[word])
            previous = word
        return row

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {**{k: v[i] for k, v in self.enc.items()}, "labels": self.labels[i]}


class Answers(torch.utils.data.Dataset):
    """Tokenized (question, context) pairs, the context truncated, with their answer's first and last token (0, the
    [CLS] token, for both where truncation cut the answer off)."""

    def __init__(self, tokenizer, pairs: list[tuple[str, str]], spans: list[tuple[int, int]], max_length: int):
        questions, contexts = map(list, zip(*pairs))
        enc = tokenizer(
            questions, contexts, truncation="only_second", max_length=max_length, return_offsets_mapping=True
        )
        offsets = enc.pop("offset_mapping")
        self.positions = [self.tokens(enc.sequence_ids(i), offsets[i], span) for i, span in enumerate(spans)]
        self.enc = enc

    @staticmethod
    def tokens(sequence: list, offsets: list, span: tuple[int, int]) -> tuple[int, int]:
        """The first and last context token of the character span ``span``, or (0, 0) where it is not all there."""
        inside = [i for i, (a, b) in enumerate(offsets) if sequence[i] == 1 and a < span[1] and b > span[0]]
        whole = inside and offsets[inside[0]][0] <= span[0] and offsets[inside[-1]][1] >= span[1]
        return (inside[0], inside[-1]) if whole else (0, 0)

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> dict:
        start, end = self.positions[i]
        return {**{k: v[i] for k, v in self.enc.items()}, "start_positions": start, "end_positions": end}


def span_accuracy(pred) -> dict:
    """The share of answers whose first and last token the model scores highest."""
    (start, end), (true_start, true_end) = pred.predictions, pred.label_ids
    hit = (start.argmax(-1) == true_start) & (end.argmax(-1) == true_end)
    return {"accuracy": float(hit.mean())}


def accuracy(pred) -> dict:
    """Accuracy over texts (of their label or their right choice), or over the tagged words (positions labelled -100
    are left out)."""
    labels = pred.label_ids
    kept = labels != -100
    return {"accuracy": float((np.argmax(pred.predictions, axis=-1)[kept] == labels[kept]).mean())}


def read(args, path: Path) -> tuple[list, list]:
    """Texts and label strings: one label per text, or per word with --task token; with --task choice, texts with
    their choices and the index of the right one."""
    return {"token": read_conll, "choice": read_choices, "qa": read_answers}.get(args.task, read_csv)(path)


def choice_collator():
    """transformers' collator of multiple-choice batches, (batch, choices, length), where it has one."""
    try:
        from transformers import DataCollatorForMultipleChoice
    except ImportError:  # transformers 4.48 has none
        return lambda tokenizer: sys.exit(
            f"--task choice pads batches with transformers' DataCollatorForMultipleChoice, which transformers "
            f"{transformers.__version__} lacks: upgrade transformers"
        )
    return DataCollatorForMultipleChoice


def main(argv=None) -> dict:
    args = parse_args(argv)
    train_texts, train_labels = read(args, args.train)
    valid_texts, valid_labels = read(args, args.valid)
    token, indexed = args.task == "token", args.task in ("choice", "qa")  # choice: indices, qa: spans
    flat = (lambda rows: [y for row in rows for y in row]) if token else (lambda rows: rows)
    names = sorted(set(flat(train_labels)))
    unknown = sorted(set(flat(valid_labels)) - set(names))
    if unknown and not indexed:
        raise SystemExit(f"{args.valid}: labels {unknown} do not occur in {args.train}")
    ids = {name: i for i, name in enumerate(names)}
    to_ids = (lambda rows: [[ids[y] for y in row] for row in rows]) if token else (lambda rows: [ids[y] for y in rows])
    if indexed:  # the right choice's index, or the answer's span
        to_ids = list
    transformers.set_seed(args.seed)
    tokenizer = load_tokenizer(args.model)
    if args.task in ("token", "qa") and not tokenizer.is_fast:
        raise SystemExit(
            f"--task {args.task} aligns its labels to word pieces, which needs a fast tokenizer; {args.model} has none"
        )
    auto = AutoModelForTokenClassification if token else AutoModelForSequenceClassification
    labels = dict(num_labels=len(names), id2label=dict(enumerate(names)), label2id=ids)
    if indexed:  # one score per choice, or per position for the answer's start and end
        auto, labels = AutoModelForMultipleChoice if args.task == "choice" else AutoModelForQuestionAnswering, {}
    # a head trained for other labels is replaced by a new one of the right size (transformers warns)
    model = auto.from_pretrained(args.model, **labels, ignore_mismatched_sizes=True)
    if model.config.get_text_config().pad_token_id is None:  # a decoder classifier reads the last non-padding token
        model.config.get_text_config().pad_token_id = tokenizer.pad_token_id
    dataset = Answers if args.task == "qa" else functools.partial(Encoded, words=token)
    train = dataset(tokenizer, train_texts, to_ids(train_labels), args.max_length)
    valid = dataset(tokenizer, valid_texts, to_ids(valid_labels), args.max_length)
    collator = {"token": DataCollatorForTokenClassification, "choice": choice_collator()}.get(
        args.task, DataCollatorWithPadding
    )
    trainer = make_trainer(
        args,
        model=model,
        train_dataset=train,
        eval_dataset=valid,
        processing_class=tokenizer,
        data_collator=collator(tokenizer),
        compute_metrics=span_accuracy if args.task == "qa" else accuracy,
    )
    metrics = train_and_evaluate(trainer, args.out)
    summary = {
        "task": args.task,
        "sub": args.sub,
        "ratio": args.ratio,
        "mode": args.mode if args.sub == "mask" else None,
    }
    summary.update({k: metrics[k] for k in ("eval_accuracy", "eval_loss", "train_seconds", "history")})
    print(json.dumps(summary))
    return summary


def train_and_evaluate(trainer: transformers.Trainer, out: str) -> dict:
    """Trains, evaluates and saves the model (and tokenizer) into ``out``/model: the final evaluation's metrics, with
    the training seconds and each epoch's evaluation (``history``)."""
    trained = trainer.train()
    history = [  # each epoch's evaluation
        {"epoch": round(h["epoch"], 4), "eval_accuracy": h["eval_accuracy"], "eval_loss": h["eval_loss"]}
        for h in trainer.state.log_history
        if "eval_accuracy" in h
    ]
    metrics = trainer.evaluate()
    trainer.save_model(str(Path(out) / "model"))
    return {**metrics, "train_seconds": trained.metrics["train_runtime"], "history": history}


if __name__ == "__main__":
    main()
