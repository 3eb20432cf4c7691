"""masksub: masked sub-branch self-distillation (MaskSub, DropSub, PathSub) and DMJD pretraining.

masksub train                                  # default recipe: small ViT + MaskSub on Fashion-MNIST
masksub train --recipe deit3_vit_s_400 --data.dir /data/imagenet --sub.ratio 0.5
masksub eval --checkpoint runs/fashion_mnist_vit-mask-s0/best.pt
masksub export --checkpoint runs/fashion_mnist_vit-mask-s0/best.pt --out exported/fashion_mnist_vit
masksub predict --checkpoint runs/fashion_mnist_vit-mask-s0/best.pt photos/ --out predictions.csv
masksub compare --subs none,mask --seeds 0,1,2 --sched.epochs 5
masksub pretrain                               # DMJD on Fashion-MNIST; --method single: the baseline
masksub linprobe --checkpoint runs/fashion_mnist_dmjd-dmjd-s0/encoder.pt
torchrun --nproc_per_node 8 -m masksub.cli train --recipe swin_t
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import warnings
from pathlib import Path

from .data import CorruptDataError
from .train import checkpoint
from .train.checks import check_command_keys, validate
from .train.config import (
    ConfigError,
    apply_overrides,
    check_recipe_command,
    flat_config,
    from_dict,
    list_recipes,
    load_config,
    parse_overrides,
    recipe_notes,
    recipe_path,
    recipe_summary,
)
from .train.data import CorruptImageError
from .train.hub import HubPushError
from .train.interrupt import Interrupted
from .train.runlog import resume_command, write_output
from .train.trainer import NonFiniteLossError, Trainer

OVERRIDES = (
    "Any configuration key is set as --section.key value, after the recipe's values: --sub.ratio 0.75 "
    "--optim.lr 2e-3 --model.kwargs '{img_size: 64}'. `masksub keys` lists every key; `masksub recipes` the recipes."
)


DRY_RUN = (
    "build the run (data, model, optimizer), time 3 optimizer steps after a warm-up one and say what an epoch and "
    "the run would take and the memory they need; nothing is written"
)


def _seeds(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds must be comma-separated integers, e.g. 0,1,2; got {text!r}") from None


def _version() -> str:
    import timm
    import torch

    from . import __version__

    return f"masksub {__version__} (torch {torch.__version__}, timm {timm.__version__})"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="masksub", description=__doc__, formatter_class=argparse.RawTextHelpFormatter, allow_abbrev=False
    )
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="command", required=True)
    train = sub.add_parser(
        "train", allow_abbrev=False, help="train a recipe (dotted overrides: --section.key value)", epilog=OVERRIDES
    )
    train.add_argument("--recipe", default=None, help="recipe name (see `masksub recipes`) or YAML path")
    train.add_argument("--resume", default=None, help="checkpoint file or run folder to continue exactly")
    train.add_argument("--dry-run", action="store_true", help=DRY_RUN)
    ev = sub.add_parser(
        "eval",
        allow_abbrev=False,
        help="evaluate a checkpoint: top-1/top-5 of the plain and EMA weights",
        epilog="The run's configuration applies; --section.key value changes a key of it, e.g. --data.dir "
        "/data/elsewhere, --data.eval_subset null (every image), --data.eval_batch_size 100, --train.device cpu.",
    )
    ev.add_argument(
        "--checkpoint",
        required=True,
        help="a checkpoint of masksub train (best.pt, last.pt, a run folder), or a folder of masksub export (its "
        "own preprocessing; --data.* keys choose the data, Fashion-MNIST's test split by default), also one on the "
        "Hugging Face Hub as hf-hub:<user>/<name>",
    )
    ev.add_argument("--per-class", action="store_true", help="each class's accuracy, worst first, and the confusions")
    ev.add_argument(
        "--confusion", default=None, help="write the confusion matrix as this CSV file (EMA weights: <name>_ema.csv)"
    )
    ex = sub.add_parser(
        "export",
        allow_abbrev=False,
        help="write a run's model as a timm folder (weights, config.json, model card) that timm and transformers load",
        epilog="timm.create_model('local-dir:OUT', pretrained=True) loads it with its class names and evaluation "
        "preprocessing (timm.data.resolve_data_config(model=model)); so does transformers' "
        "AutoModelForImageClassification.from_pretrained('OUT').",
    )
    ex.add_argument("--checkpoint", required=True, help="a checkpoint of masksub train or linprobe, or its run folder")
    ex.add_argument("--out", required=True, help="the folder to write (new, or empty)")
    ex.add_argument("--ema", action="store_true", help="the EMA weights (a run with train.ema true)")
    ex.add_argument(
        "--onnx", action="store_true", help="also model.onnx, checked with ONNX Runtime (pip install masksub[onnx])"
    )
    ex.add_argument(
        "--push-to-hub",
        default=None,
        metavar="REPO",
        help="then upload the folder to this Hugging Face Hub model repository (<user or org>/<name>; `hf auth login` "
        "or HF_TOKEN first); timm.create_model('hf-hub:REPO', pretrained=True) loads it",
    )
    ex.add_argument(
        "--private",
        action="store_true",
        help="with --push-to-hub: a new repository is private (an existing one keeps its visibility)",
    )
    pr = sub.add_parser(
        "predict",
        allow_abbrev=False,
        help="the top classes of image files by a run's model or an exported one: printed, or a CSV file",
        epilog="Images are transformed as the run evaluated (an exported folder: as its config.json says); unreadable "
        "ones are skipped with a warning. The CSV has the columns image, class_1, prob_1, ..., class_K, prob_K "
        "(softmax probabilities).",
    )
    pr.add_argument("inputs", nargs="+", help="image files, or folders searched for images at any depth")
    pr.add_argument(
        "--checkpoint",
        required=True,
        help="a run's checkpoint or folder, or a folder of masksub export (or hf-hub:<user>/<name>, one on the Hub)",
    )
    pr.add_argument("--topk", type=int, default=5, help="classes per image (at most the model's)")
    pr.add_argument("--out", default=None, help="a CSV file to write (default: one line per image on the screen)")
    pr.add_argument("--batch-size", type=int, default=64)
    pr.add_argument("--ema", action="store_true", help="the run's EMA weights")
    cmp = sub.add_parser(
        "compare",
        allow_abbrev=False,
        help="train plain and with sub branches over seeds; table + plot",
        epilog=OVERRIDES,
    )
    cmp.add_argument("--recipe", default=None)
    cmp.add_argument("--subs", default="none,mask,dropout,droppath", help="comma-separated: none,mask,dropout,droppath")
    cmp.add_argument("--seeds", type=_seeds, default="0,1,2", help="comma-separated integers")
    cmp.add_argument("--output", default="runs/compare")
    pre = sub.add_parser(
        "pretrain", allow_abbrev=False, help="DMJD pretraining (dotted overrides as for train)", epilog=OVERRIDES
    )
    pre.add_argument("--recipe", default="fashion_mnist_dmjd")
    pre.add_argument("--method", choices=("dmjd", "single"), default=None, help="single: one view, no visible branch")
    pre.add_argument("--resume", default=None)
    pre.add_argument("--dry-run", action="store_true", help=DRY_RUN)
    lin = sub.add_parser("linprobe", allow_abbrev=False, help="linear probe of a pretrained encoder", epilog=OVERRIDES)
    lin.add_argument("--checkpoint", required=True, help="encoder weights (encoder.pt from masksub pretrain)")
    lin.add_argument("--recipe", default="fashion_mnist_linprobe")
    rec = sub.add_parser("recipes", help="list the bundled recipes, or show one's launch command and notes")
    rec.add_argument("name", nargs="?", default=None, help="a recipe name or YAML path: its file, command and notes")
    keys = sub.add_parser("keys", help="list every config key with its value in a recipe (default: the default one)")
    keys.add_argument("--recipe", default=None, help="recipe name or YAML path")
    return p


_python_format_warning = warnings.formatwarning


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """masksub's own warnings as one line, as its errors; others as Python prints them."""
    if Path(filename).resolve().is_relative_to(Path(__file__).resolve().parent):
        return f"masksub: warning: {message}\n"
    return _python_format_warning(message, category, filename, lineno, line)


def _say(command: str, text: str) -> None:
    """One line on stderr, written at once (processes of a torchrun job do not interleave), naming the
    process when there are several."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    who = f" (process {os.environ.get('RANK', '0')} of {world})" if world > 1 else ""
    sys.stderr.write(f"masksub {command}{who}: {text}\n")
    sys.stderr.flush()


def _message(error: BaseException) -> str:
    """The error's own message: one raised in a DataLoader worker carries the worker's whole traceback
    (torch re-raises it so), whose last line holds the message."""
    text = str(error)
    if not (text.startswith("Caught ") and "\nOriginal Traceback" in text):
        return text
    where = text.split("\n", 1)[0].partition(" in ")[2].rstrip(".")  # "DataLoader worker process 0"
    last = text.rstrip().rsplit("\n", 1)[-1]
    _, found, message = last.partition(f"{type(error).__name__}: ")
    return f"{message if found else last} (in {where})"


def _resumable_config(resume: str, command: str) -> dict:
    """The configuration of the run ``resume`` names, checked to be one ``command`` continues. The checkpoint
    is let go here: held through the run, its memory map would keep the replaced file's disk space."""
    state = checkpoint.load(resume)
    saved = state.get("config")
    if not isinstance(saved, dict):
        raise checkpoint.CheckpointError(
            f"{resume} is not a masksub run checkpoint (it has no configuration) and cannot be "
            f"resumed; to start from its weights, pass --model.checkpoint {resume}"
        )
    if (wrote := checkpoint.run_command(state)) != command:
        raise checkpoint.CheckpointError(
            f"{resume} is a masksub {wrote} run: continue it with {resume_command(wrote, resume)}"
        )
    return saved


def _print_recipes(name: str | None) -> None:
    if name is not None:
        print(recipe_path(name).resolve())
        print("\n".join(recipe_notes(name)))
        return
    rows = [recipe_summary(r) for r in list_recipes()]
    rows.insert(0, {key: key for key in rows[0]})
    widths = {key: max(len(row[key]) for row in rows) for key in rows[0]}
    for row in rows:
        print("  ".join(f"{row[k]:<{w}}" for k, w in widths.items()).rstrip())
    print("\n* built with model.kwargs (depth, width, init, pooling, ...): `masksub keys --recipe NAME` lists them all")
    print("`masksub recipes NAME`: the recipe's file, launch command and notes")


def main(argv: list[str] | None = None) -> int:
    with _one_line_warnings():
        try:
            return _main(argv)
        except BrokenPipeError:  # `masksub recipes | head`: the reader has gone; end quietly, as a shell tool does
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's exit flush would fail again
            return 128 + getattr(signal, "SIGPIPE", 13)  # (Windows has no SIGPIPE)


@contextlib.contextmanager
def _one_line_warnings():
    """masksub's warnings, and what its logger reports (images skipped), as ``masksub: warning: ...``."""
    before = warnings.formatwarning
    warnings.formatwarning = _format_warning
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("masksub: warning: %(message)s"))
    logger = logging.getLogger("masksub")
    logger.addHandler(handler)
    try:
        yield
    finally:
        warnings.formatwarning = before
        logger.removeHandler(handler)


def _main(argv: list[str] | None) -> int:
    args, rest = _parser().parse_known_args(argv)
    try:
        if args.command == "recipes":
            _print_recipes(args.name)
        elif args.command == "keys":
            values = flat_config(load_config(args.recipe, parse_overrides(rest), check=False))  # "???": to fill in
            width = max(map(len, values))
            print("\n".join(f"{key:<{width}}  {value!r}" for key, value in values.items()))
        elif args.command in ("train", "pretrain", "linprobe"):
            overrides = parse_overrides(rest)
            if args.command == "pretrain" and args.method:
                overrides["pretrain.method"] = args.method
            if args.command == "linprobe":
                linprobe = {"model.checkpoint": args.checkpoint, "train.linprobe": True, "sub.kind": "none"}
                overrides = {**linprobe, **overrides}
            # --train.resume X is --resume X: the run's own configuration, not the recipe's, then any overrides
            resume = getattr(args, "resume", None) or overrides.pop("train.resume", None)
            if resume and getattr(args, "dry_run", False):
                raise ConfigError("--dry-run times a new run: leave out --resume")
            if resume:
                saved = _resumable_config(resume, args.command)
                overrides = {"train.max_steps": None, **overrides, "train.resume": resume}
                cfg = apply_overrides(from_dict(saved), overrides)
            else:
                check_recipe_command(args.recipe, args.command)
                cfg = load_config(args.recipe, overrides, check=False)
                check_command_keys(cfg, args.command)  # first: "would do nothing in masksub pretrain" says most
                validate(cfg)
            trainer_cls = Trainer
            if args.command == "pretrain":
                from .pretrain.trainer import PretrainTrainer as trainer_cls
            if getattr(args, "dry_run", False):
                trainer = trainer_cls(cfg, dry_run=True)
                trainer.log(trainer.rehearse())
                return 0
            result = trainer_cls(cfg).fit()
            if args.command == "pretrain" and result["records"]:
                last = result["records"][-1]["train_loss"]
                loss = "n/a" if last is None else f"{last:.4f}"
                print(f"done: loss {loss}; encoder weights {result['folder'] / 'encoder.pt'}")
            elif result["records"]:
                last = result["records"][-1]
                acc = f"test top-1 {last['top1']:.2f}%" if last.get("top1") is not None else "no evaluation yet"
                print(f"done: {acc}; run folder {result['folder']} (metrics.jsonl, summary.csv, curves.png, *.pt)")
        elif args.command == "eval":
            from .train.accuracy import accuracy_text, confusion_csv, per_class_text
            from .train.evaluate import evaluate_checkpoint

            per_class = args.per_class or args.confusion is not None
            results = evaluate_checkpoint(Path(args.checkpoint), parse_overrides(rest), print, per_class)
            for name, metrics in results.items():
                print(f"{name}: {accuracy_text(metrics, sep='  ')}")
                if args.per_class:
                    print(per_class_text(metrics["confusion"], metrics["classes"]))
                if args.confusion is not None:
                    path = Path(args.confusion)
                    path = path if name == "weights" else path.with_name(f"{path.stem}_ema{path.suffix}")
                    write_output(path, confusion_csv(metrics["confusion"], metrics["classes"]))
                    print(f"  confusion matrix of the {name}: {path}")
        elif args.command == "export":
            from .train.export import export_checkpoint

            if rest:
                raise ConfigError(f"masksub export takes no {' '.join(rest)}: see masksub export --help")
            push = {"push_to": args.push_to_hub, "private": args.private}
            export_checkpoint(Path(args.checkpoint), Path(args.out), args.ema, args.onnx, **push)
        elif args.command == "predict":
            from .train.predict import predict

            if rest:
                raise ConfigError(f"masksub predict takes no {' '.join(rest)}: see masksub predict --help")
            predict(Path(args.checkpoint), args.inputs, args.topk, args.out, args.batch_size, args.ema)
        elif args.command == "compare":
            from .train.compare import compare

            kinds = [k.strip() for k in args.subs.split(",") if k.strip()]
            check_recipe_command(args.recipe, "compare")
            compare(args.recipe, kinds, args.seeds, parse_overrides(rest), args.output)
    except (
        ConfigError,
        FileNotFoundError,
        CorruptDataError,
        CorruptImageError,
        NonFiniteLossError,
        checkpoint.CheckpointError,
        checkpoint.CheckpointWriteError,
        HubPushError,
    ) as e:
        _say(args.command, f"error: {_message(e)}")
        return 2
    except Interrupted as e:
        _say(args.command, str(e))
        return 128 + e.signum  # as the shell reports a process ended by that signal
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (reading data, evaluating), or a second one
        _say(args.command, "stopped at once by Ctrl-C (files written before are kept)")
        return 128 + signal.SIGINT
    return 0


if __name__ == "__main__":
    sys.exit(main())
