"""WordNet gloss classification: plain vs MaskSub (mask token, dropped tokens) vs DropSub, a BERT from scratch.

    python benchmarks/text_accuracy.py --scale cpu            # BERT 2x128, 3 epochs on 16,000 glosses, 3 seeds: ~45 min
    python benchmarks/text_accuracy.py --scale gpu --jobs 6   # BERT 4x256, 10 epochs on all 112,659
    python benchmarks/text_accuracy.py --scale tiny           # seconds; the test suite

The data: WordNet 3.0's glosses (Debian's ``wordnet-base``: ``/usr/share/wordnet``, or ``--wordnet DIR``), each
synset's definition and examples, labelled with its lexicographer file, the 45 supersenses (``noun.animal``,
``verb.motion``, ``adj.all``...). A fixed shuffle holds 5,000 out for test. No pretrained weights can be fetched
offline, so each seed's BERT starts from random weights of its own, on a WordPiece vocabulary learned from the
training glosses: this measures MaskSub training a text classifier from scratch, not fine-tuning a pretrained one.

Every run is ``examples/text_classification.py`` (``MaskSubTrainer``, or the plain Trainer for ``none``) on the
same data, seed, model and schedule; only the sub branch differs. A plain run is also given the token mode's
compute: its epochs scaled by the ratio of their measured training times (per seed, the seed's runs one after
another; the median over seeds), so the table shows accuracy at equal epochs and at equal compute. Times are
comparable with ``--jobs 1`` on an otherwise idle machine; concurrent runs share it. Writes
results/text_accuracy_<scale>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import hardware

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "text_classification.py"
WORDNET = Path("/usr/share/wordnet")
PARTS = ("noun", "verb", "adj", "adv")
# lexnames(5WN): the lexicographer files, by number
SUPERSENSES = (  # noqa: SIM905
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
    "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location noun.motive "
    "noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process noun.quantity noun.relation "
    "noun.shape noun.state noun.substance noun.time verb.body verb.change verb.cognition verb.communication "
    "verb.competition verb.consumption verb.contact verb.creation verb.emotion verb.motion verb.perception "
    "verb.possession verb.social verb.stative verb.weather adj.ppl"
).split()
TEST = 5000
SCALES = {
    "tiny": dict(train=256, test=128, epochs=1, layers=1, width=32, heads=2, vocab=600, batch=32, lr=1e-3),
    "cpu": dict(train=16000, test=TEST, epochs=3, layers=2, width=128, heads=2, vocab=8000, batch=64, lr=1e-3),
    "gpu": dict(train=None, test=TEST, epochs=10, layers=4, width=256, heads=4, vocab=16000, batch=128, lr=5e-4),
}
MAX_LENGTH = 64  # tokens: 99.9% of the glosses fit (the median is 11 words)
# each run's arguments of the example: MaskSub at the paper's ratio, in the mask-token and the dropped-token modes;
# DropSub at 0.2 (our choice, as in accuracy.py: 0.5 dropout in every layer would leave the sub branch little)
SUBS = {
    "none": ("--sub", "none"),
    "mask": ("--sub", "mask", "--mode", "token", "--ratio", "0.5"),
    "mask_drop": ("--sub", "mask", "--mode", "drop", "--ratio", "0.5"),
    "dropout": ("--sub", "dropout", "--ratio", "0.2"),
}


def read_glosses(root: Path) -> list[tuple[str, str]]:
    """``(gloss, supersense)`` of every synset in WordNet's ``data.*`` files under ``root``, in file order."""
    missing = [f"data.{p}" for p in PARTS if not (root / f"data.{p}").is_file()]
    if missing:
        raise SystemExit(
            f"{root}: no WordNet data files ({', '.join(missing)}): install Debian's wordnet-base "
            "(apt-get install wordnet-base), or pass --wordnet DIR, a folder holding data.noun, data.verb..."
        )
    rows = []
    for part in PARTS:
        path = root / f"data.{part}"
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.startswith("  "):  # the license header
                    continue
                head, bar, gloss = line.partition(" | ")
                fields = head.split()
                if not bar or len(fields) < 2 or not fields[1].isdigit() or int(fields[1]) >= len(SUPERSENSES):
                    raise SystemExit(
                        f"{path}:{number}: not a WordNet synset line (offset, lexicographer file, ... | gloss)"
                    )
                rows.append((gloss.strip(), SUPERSENSES[int(fields[1])]))
    return rows


def write_split(rows: list[tuple[str, str]], train: int | None, test: int, folder: Path) -> dict:
    """The fixed shuffle's first ``test`` glosses as test.csv (less those of a supersense the training part lacks,
    at small scales), the next ``train`` (all: None) as train.csv."""
    rows = rows[:]
    random.Random(0).shuffle(rows)
    parts = {"train": rows[test:] if train is None else rows[test : test + train]}
    known = {label for _, label in parts["train"]}
    parts["test"] = [row for row in rows[:test] if row[1] in known]
    for name, part in parts.items():
        with (folder / f"{name}.csv").open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            writer.writerows(part)
    return {name: len(part) for name, part in parts.items()}


def build_tokenizer(folder: Path, vocab: int):
    """A lower-casing WordPiece tokenizer learned from train.csv (``[CLS] text [SEP]``, with a mask token)."""
    import transformers
    from tokenizers import BertWordPieceTokenizer
    from tokenizers.processors import TemplateProcessing

    with (folder / "train.csv").open(newline="", encoding="utf-8") as f:
        texts = [row["text"] for row in csv.DictReader(f)]
    learned = BertWordPieceTokenizer(lowercase=True)
    learned.train_from_iterator(texts, vocab_size=vocab, min_frequency=2, show_progress=False)
    cls, sep = learned.token_to_id("[CLS]"), learned.token_to_id("[SEP]")
    learned.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    special = dict(unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    return transformers.PreTrainedTokenizerFast(tokenizer_object=learned._tokenizer, **special)


def build_model(folder: Path, tokenizer, scale: dict, seed: int, head: str = "BertForSequenceClassification") -> None:
    """A BERT sequence classifier (or another ``head``) of random weights (seeded), saved with the tokenizer into
    ``folder``."""
    import torch
    import transformers

    config = transformers.BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=scale["width"],
        num_hidden_layers=scale["layers"],
        num_attention_heads=scale["heads"],
        intermediate_size=4 * scale["width"],
        max_position_embeddings=MAX_LENGTH,
        pad_token_id=tokenizer.pad_token_id,
        num_labels=len(SUPERSENSES),
    )
    torch.manual_seed(seed)
    getattr(transformers, head)(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def train(work: Path, name: str, seed: int, sub: str, epochs: float, scale: dict) -> dict:
    """One run of the example; its summary (accuracy, per-epoch history, training seconds) and wall time."""
    argv = ["--model", str(work / f"model-s{seed}"), "--train", str(work / "train.csv"), "--valid"]
    argv += [str(work / "test.csv"), *SUBS[sub], "--epochs", str(epochs), "--seed", str(seed)]
    argv += ["--batch-size", str(scale["batch"]), "--lr", str(scale["lr"]), "--max-length", str(MAX_LENGTH)]
    return {
        "name": name,
        "seed": seed,
        "epochs": epochs,
        **run_example(EXAMPLE, argv, work / "runs" / f"{name}-s{seed}"),
    }


def run_example(example: Path, argv: list[str], out: Path) -> dict:
    """``example`` run with ``argv`` into ``out``: the JSON summary it prints last, and its wall time."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(example), *argv, "--out", str(out)], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{example.name} {' '.join(argv)} failed:\n{proc.stderr[-3000:]}")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"wall_s": time.perf_counter() - start, **summary}


def table(runs: list[dict], names: list[str]) -> list[dict]:
    rows = []
    for name in names:
        done = [r for r in runs if r["name"] == name]
        accuracy = [100 * r["eval_accuracy"] for r in done]
        rows.append(
            {
                "name": name,
                "epochs": done[0]["epochs"],
                "seeds": len(done),
                "mean": statistics.mean(accuracy),
                "std": statistics.stdev(accuracy) if len(accuracy) > 1 else 0.0,
                "each": accuracy,
                "train_s": statistics.mean(r["train_seconds"] for r in done),
            }
        )
    return rows


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    curves(ax, runs, "eval_accuracy", "test accuracy (%)", 100)
    ax.set_title("WordNet supersense of each gloss")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def curves(ax, runs: list[dict], key: str, ylabel: str, factor: float = 1.0, names: list[str] | None = None) -> None:
    """Each run's ``key`` per epoch (its history) on ``ax``: a colour per run name (by its place in ``names``, so
    that panels agree; by first appearance without), a line style per seed."""
    import matplotlib.pyplot as plt

    names = names or list(dict.fromkeys(r["name"] for r in runs))
    colours = {name: plt.get_cmap("tab10")(i) for i, name in enumerate(names)}
    first = min(r["seed"] for r in runs)  # its lines name the run in the legend
    for r in runs:
        ax.plot(
            [h["epoch"] for h in r["history"]],
            [factor * h[key] for h in r["history"]],
            marker=".",
            color=colours[r["name"]],
            linestyle=("-", "--", ":", "-.")[r["seed"] % 4],
            label=r["name"] if r["seed"] == first else "_nolegend_",
        )
    ax.set(xlabel="epoch", ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scale", choices=tuple(SCALES), default="cpu")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--subs", default=",".join(SUBS), help=f"of {', '.join(SUBS)}")
    p.add_argument("--jobs", type=int, default=1, help="concurrent training processes")
    p.add_argument("--wordnet", type=Path, default=WORDNET, help="the folder of WordNet's data.noun, data.verb...")
    p.add_argument(
        "--work", type=Path, default=None, help="data, models and runs (default: results/text_accuracy_<scale>_runs)"
    )
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args()
    scale, seeds, subs = SCALES[args.scale], [int(s) for s in args.seeds.split(",")], args.subs.split(",")
    unknown = [s for s in subs if s not in SUBS]
    if unknown or "none" not in subs:
        raise SystemExit(f"--subs: {unknown or 'none'} {'unknown' if unknown else 'missing'}; of {', '.join(SUBS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or args.out / f"text_accuracy_{args.scale}_runs"
    work.mkdir(parents=True, exist_ok=True)
    sizes = write_split(read_glosses(args.wordnet), scale["train"], scale["test"], work)
    tokenizer = build_tokenizer(work, scale["vocab"])
    for seed in seeds:
        build_model(work / f"model-s{seed}", tokenizer, scale, seed)

    def run_all(plan: list[tuple[str, str, float]]) -> list[dict]:
        # a seed's runs one after another: a while of other work on the machine slows them alike
        jobs = [(name, seed, sub, epochs) for seed in seeds for name, sub, epochs in plan]
        with ThreadPoolExecutor(args.jobs) as pool:
            return list(pool.map(lambda job: train(work, job[0], job[1], job[2], job[3], scale), jobs))

    runs = run_all([(sub, sub, scale["epochs"]) for sub in subs])
    seconds = {(r["name"], r["seed"]): r["train_seconds"] for r in runs}
    cost = {sub: statistics.median(seconds[sub, s] / seconds["none", s] for s in seeds) for sub in subs}
    names = list(subs)
    if "mask" in subs:  # the plain model given the token mode's training time
        equal = round(scale["epochs"] * cost["mask"], 2)
        runs += run_all([("none_equal_time", "none", equal)])
        names.append("none_equal_time")
    rows = table(runs, names)
    stem = args.out / f"text_accuracy_{args.scale}"
    versions = {m: __import__(m).__version__ for m in ("torch", "transformers", "tokenizers")}
    command = "python benchmarks/text_accuracy.py " + " ".join(sys.argv[1:])
    machine = hardware()
    result = {
        "command": command,
        "hardware": machine,
        "versions": versions,
        "data": {"source": str(args.wordnet), **sizes, "classes": len(SUPERSENSES)},
        "scale": scale,
        "cost_vs_plain": cost,  # per seed, a run's training seconds over the plain run's; the median
        "table": rows,
        "runs": runs,
    }
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = [
        f"`{command}` on {machine}; {', '.join(f'{k} {v}' for k, v in versions.items())}",
        "",
        f"WordNet glosses, {sizes['train']:,} to train and {sizes['test']:,} to test, 45 supersenses; BERT "
        f"{scale['layers']}x{scale['width']} from random weights, batch {scale['batch']}, AdamW lr {scale['lr']}.",
        "",
        "| run | epochs | test accuracy (%), mean ± std | each seed | training time vs plain |",
        "|---|---|---|---|---|",
    ]
    plain = statistics.mean(seconds["none", s] for s in seeds)
    for row in rows:
        each = ", ".join(f"{a:.2f}" for a in row["each"])
        lines.append(
            f"| {row['name']} | {row['epochs']:g} | {row['mean']:.2f} ± {row['std']:.2f} | {each} | "
            f"{row['train_s'] / plain:.2f}x |"
        )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(runs, stem.with_suffix(".png"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
