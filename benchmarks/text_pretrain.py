"""BERT training: masked-language-model pretraining, plain vs MaskSub, each then fine-tuned the same way.

    python benchmarks/text_pretrain.py --scale cpu            # BERT 2x128, 16,000 glosses, 3 seeds: ~53 min
    python benchmarks/text_pretrain.py --scale gpu --jobs 6   # BERT 4x256, all 112,659 training glosses
    python benchmarks/text_pretrain.py --scale tiny           # seconds; the test suite

The data are ``text_accuracy.py``'s: WordNet 3.0's glosses, 5,000 held out by a fixed shuffle. Each seed's BERT
(random weights on a WordPiece vocabulary learned from the training glosses) is pretrained with BERT's objective
(``examples/masked_language_model.py``: 15% of the words become targets, 80-10-10) on the training glosses' text,
without their labels: plain, with MaskSub at ratio 0.5 (the other words masked by the mask token, or dropped from
the sequence), and plain at the token mode's measured compute (its epochs scaled by the per-seed ratio of training
times; the median over seeds). The held-out glosses, masked once, score each pretraining (the model's own loss and
the share of targets ranked first). Then every pretrained model, and the seed's model without pretraining, is
fine-tuned plain on the first ``tune`` training glosses' supersenses (``examples/text_classification.py``, the
same schedule for all) and tested on the held-out glosses (those of the supersenses it saw). A seed's runs go one
after another; times compare with ``--jobs 1`` on an otherwise idle machine. Writes
results/text_pretrain_<scale>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import hardware
from text_accuracy import (
    EXAMPLE,
    MAX_LENGTH,
    SUPERSENSES,
    WORDNET,
    build_model,
    build_tokenizer,
    curves,
    read_glosses,
    run_example,
    write_split,
)

PRETRAIN_EXAMPLE = EXAMPLE.parent / "masked_language_model.py"
SCALES = {
    "tiny": dict(train=256, tune=128, test=128, epochs=1, tune_epochs=1, layers=1, width=32, heads=2, vocab=600),
    "cpu": dict(train=16000, tune=4000, test=5000, epochs=1, tune_epochs=3, layers=2, width=128, heads=2, vocab=8000),
    "gpu": dict(train=None, tune=16000, test=5000, epochs=10, tune_epochs=5, layers=4, width=256, heads=4, vocab=16000),
}
SETTINGS = {"tiny": dict(batch=32, lr=1e-3), "cpu": dict(batch=64, lr=1e-3), "gpu": dict(batch=128, lr=5e-4)}
MLM_PROBABILITY = 0.15  # BERT's
# each pretraining's arguments of the example: MaskSub at the paper's ratio, by the mask token and by dropping
PRETRAININGS = {
    "none": ("--sub", "none"),
    "mask": ("--sub", "mask", "--mode", "token", "--ratio", "0.5"),
    "mask_drop": ("--sub", "mask", "--mode", "drop", "--ratio", "0.5"),
}
SCRATCH = "no_pretraining"  # the row of the models fine-tuned from their random weights


def write_texts(work: Path) -> None:
    """train.txt and test.txt: the glosses of train.csv and test.csv, one per line, without their labels."""
    for split in ("train", "test"):
        with (work / f"{split}.csv").open(newline="", encoding="utf-8") as f:
            texts = [row["text"] for row in csv.DictReader(f)]
        (work / f"{split}.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")


def write_tuning_split(work: Path, size: int) -> dict:
    """tune.csv: the first ``size`` rows of train.csv (all where it has fewer), the labelled glosses to fine-tune
    on; tune_test.csv: test.csv less the glosses of a supersense tune.csv lacks (at small scales). Their row counts."""
    parts = {}
    for split in ("train", "test"):
        with (work / f"{split}.csv").open(newline="", encoding="utf-8") as f:
            parts[split] = list(csv.reader(f))
    header, tuning = parts["train"][0], parts["train"][1 : size + 1]
    known = {label for _, label in tuning}
    testing = [row for row in parts["test"][1:] if row[1] in known]
    for name, rows in (("tune", tuning), ("tune_test", testing)):
        with (work / f"{name}.csv").open("w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([header, *rows])
    return {"tune": len(tuning), "tune_test": len(testing)}


def pretrain(work: Path, name: str, seed: int, sub: str, epochs: float, scale: dict) -> dict:
    """One pretraining of the seed's model; its summary (the held-out masked-LM loss and accuracy, per-epoch
    history, training seconds)."""
    argv = ["--model", str(work / f"model-s{seed}"), "--train", str(work / "train.txt"), "--valid"]
    argv += [str(work / "test.txt"), *PRETRAININGS[sub], "--epochs", str(epochs), "--seed", str(seed)]
    argv += ["--mlm-probability", str(MLM_PROBABILITY), "--max-length", str(MAX_LENGTH), *_settings(scale)]
    out = work / "pretrained" / f"{name}-s{seed}"
    return {"name": name, "seed": seed, "epochs": epochs, **run_example(PRETRAIN_EXAMPLE, argv, out)}


def tune(work: Path, name: str, seed: int, scale: dict) -> dict:
    """The plain fine-tuning of the model pretrained as ``name`` (``SCRATCH``: not pretrained); its summary."""
    model = work / f"model-s{seed}" if name == SCRATCH else work / "pretrained" / f"{name}-s{seed}" / "model"
    argv = ["--model", str(model), "--train", str(work / "tune.csv"), "--valid", str(work / "tune_test.csv")]
    argv += ["--sub", "none", "--epochs", str(scale["tune_epochs"]), "--seed", str(seed)]
    argv += ["--max-length", str(MAX_LENGTH), *_settings(scale)]
    out = work / "tuned" / f"{name}-s{seed}"
    return {"name": name, "seed": seed, "epochs": scale["tune_epochs"], **run_example(EXAMPLE, argv, out)}


def _settings(scale: dict) -> list[str]:
    return ["--batch-size", str(scale["batch"]), "--lr", str(scale["lr"])]


def summarize(runs: list[dict], key: str) -> dict[str, dict]:
    """Per run name: the mean and spread over seeds of ``key`` (in percent for accuracies)."""
    out = {}
    for name in dict.fromkeys(r["name"] for r in runs):
        values = [r[key] * (100 if "accuracy" in key else 1) for r in runs if r["name"] == name]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        out[name] = {"mean": statistics.mean(values), "std": std, "each": values}
    return out


def plot(pretrained: list[dict], tuned: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["name"] for r in tuned))  # one colour per pretraining in both panels
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    curves(left, pretrained, "eval_loss", "held-out masked-LM loss", names=names)
    left.set_title("pretraining (BERT's objective)")
    curves(right, tuned, "eval_accuracy", "test accuracy (%)", 100, names=names)
    right.set_title("plain fine-tuning on supersenses")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scale", choices=tuple(SCALES), default="cpu")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--jobs", type=int, default=1, help="concurrent training processes")
    p.add_argument("--wordnet", type=Path, default=WORDNET, help="the folder of WordNet's data.noun, data.verb...")
    p.add_argument(
        "--work", type=Path, default=None, help="data, models and runs (default: results/text_pretrain_<scale>_runs)"
    )
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args()
    scale = {**SCALES[args.scale], **SETTINGS[args.scale]}
    seeds = [int(s) for s in args.seeds.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or args.out / f"text_pretrain_{args.scale}_runs"
    work.mkdir(parents=True, exist_ok=True)
    sizes = write_split(read_glosses(args.wordnet), scale["train"], scale["test"], work)
    sizes.update(write_tuning_split(work, scale["tune"]))
    write_texts(work)
    tokenizer = build_tokenizer(work, scale["vocab"])
    for seed in seeds:
        build_model(work / f"model-s{seed}", tokenizer, scale, seed, head="BertForMaskedLM")

    def run_all(jobs: list, run) -> list[dict]:
        with ThreadPoolExecutor(args.jobs) as pool:
            return list(pool.map(lambda job: run(*job), jobs))

    # a seed's runs one after another: a while of other work on the machine slows them alike
    jobs = [(work, sub, seed, sub, scale["epochs"], scale) for seed in seeds for sub in PRETRAININGS]
    pretrained = run_all(jobs, pretrain)
    seconds = {(r["name"], r["seed"]): r["train_seconds"] for r in pretrained}
    cost = {sub: statistics.median(seconds[sub, s] / seconds["none", s] for s in seeds) for sub in PRETRAININGS}
    equal = round(scale["epochs"] * cost["mask"], 2)  # the plain pretraining given the token mode's time
    pretrained += run_all([(work, "none_equal_time", s, "none", equal, scale) for s in seeds], pretrain)
    names = [SCRATCH, *dict.fromkeys(r["name"] for r in pretrained)]
    tuned = run_all([(work, name, seed, scale) for seed in seeds for name in names], tune)
    mlm_loss, mlm_accuracy = summarize(pretrained, "eval_loss"), summarize(pretrained, "eval_accuracy")
    accuracy = summarize(tuned, "eval_accuracy")
    plain = statistics.mean(seconds["none", s] for s in seeds)
    rows = []
    for name in names:
        done = [r for r in pretrained if r["name"] == name]
        row = {"name": name, "pretrain_epochs": done[0]["epochs"] if done else 0, "tuned_accuracy": accuracy[name]}
        if done:
            time_ratio = statistics.mean(r["train_seconds"] for r in done) / plain
            row.update(mlm_loss=mlm_loss[name], mlm_accuracy=mlm_accuracy[name], pretrain_time_vs_plain=time_ratio)
        rows.append(row)
    versions = {m: __import__(m).__version__ for m in ("torch", "transformers", "tokenizers")}
    command = "python benchmarks/text_pretrain.py " + " ".join(sys.argv[1:])
    machine = hardware()
    stem = args.out / f"text_pretrain_{args.scale}"
    result = {
        "command": command,
        "hardware": machine,
        "versions": versions,
        "data": {"source": str(args.wordnet), **sizes, "classes": len(SUPERSENSES)},
        "scale": scale,
        "mlm_probability": MLM_PROBABILITY,
        "cost_vs_plain": cost,  # per seed, a pretraining's training seconds over the plain one's; the median
        "table": rows,
        "pretrained": pretrained,
        "tuned": tuned,
    }
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = [
        f"`{command}` on {machine}; {', '.join(f'{k} {v}' for k, v in versions.items())}",
        "",
        f"BERT {scale['layers']}x{scale['width']} from random weights, pretrained with BERT's objective "
        f"({MLM_PROBABILITY:.0%} of the words as targets) on {sizes['train']:,} WordNet glosses for "
        f"{scale['epochs']} epochs, then fine-tuned plain for {scale['tune_epochs']} epochs on {sizes['tune']:,} "
        f"of them labelled by supersense and tested on {sizes['tune_test']:,} held out (the {sizes['test']:,} held "
        f"out score the pretraining); batch {scale['batch']}, "
        f"AdamW lr {scale['lr']}; seeds {args.seeds}.",
        "",
        "| pretraining | epochs | held-out MLM loss | held-out MLM accuracy (%) | pretraining time vs plain | "
        "fine-tuned test accuracy (%), mean ± std | each seed |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        tuned_each = ", ".join(f"{a:.2f}" for a in row["tuned_accuracy"]["each"])
        tuned_cell = f"{row['tuned_accuracy']['mean']:.2f} ± {row['tuned_accuracy']['std']:.2f}"
        if "mlm_loss" in row:
            loss, acc = row["mlm_loss"], row["mlm_accuracy"]
            cells = f"{loss['mean']:.3f} ± {loss['std']:.3f} | {acc['mean']:.2f} ± {acc['std']:.2f} | "
            cells += f"{row['pretrain_time_vs_plain']:.2f}x"
        else:
            cells = "- | - | -"
        lines.append(f"| {row['name']} | {row['pretrain_epochs']:g} | {cells} | {tuned_cell} | {tuned_each} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(pretrained, tuned, stem.with_suffix(".png"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
