"""What a checkpoint must share with the run that resumes it: the settings its states carry, the classes its
labels mean, the processes whose random streams it holds and the batches its position counts."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .config import Config, ConfigError, SchedConfig, from_dict

# The keys a resume must keep: the model and data it was built for, and the settings the optimizer's and the
# scheduler's states bring back themselves (a new value would be written into the run's configuration, not used).
SAME_KEYS = (
    ("model.name", "model.kwargs", "data.name", "data.in_chans", "sub.kind", "data.batch_size")
    + ("train.accum_steps", "optim.name", "train.fsdp")
    + tuple(f"optim.{k}" for k in ("lr", "base_lr", "weight_decay", "betas", "eps", "momentum", "layer_decay"))
    + tuple(f"sched.{f.name}" for f in dataclasses.fields(SchedConfig))
)


def weights_file(path: str | Path) -> Path:
    """The checkpoint file of a resume path (a run folder: its last.pt)."""
    path = Path(path)
    return path / "last.pt" if path.is_dir() else path


def check_config(saved: dict, cfg: Config) -> None:
    """``saved``: the checkpoint's configuration; ``cfg`` the resuming run's."""
    saved_cfg, diffs = from_dict(saved), []
    for key in SAME_KEYS:
        section, name = key.split(".")
        old, new = getattr(getattr(saved_cfg, section), name), getattr(getattr(cfg, section), name)
        if old != new:
            diffs.append(f"{key}: checkpoint {old!r}, now {new!r}")
    if diffs:
        raise ConfigError(
            "cannot resume: the checkpoint was made with another configuration:\n  "
            + "\n  ".join(diffs)
            + "\nresume without overriding these keys; to train on from its weights with new settings, start "
            f"a new run with --model.checkpoint {weights_file(cfg.train.resume)}"
        )


def check_classes(saved: list[str], classes: list[str], path: str) -> None:
    """The training split's class names, by label, against those the checkpoint was trained on."""
    if saved == classes:
        return
    gone, new = sorted(set(saved) - set(classes)), sorted(set(classes) - set(saved))
    what = "; ".join(
        f"{label}: {', '.join(names[:5])}{', ...' if len(names) > 5 else ''}"
        for label, names in (("gone", gone), ("new", new))
        if names
    )
    raise ConfigError(
        f"cannot resume from {path}: the training split's classes are not the ones the "
        f"checkpoint was trained on ({what or 'the same names, labelled in another order'}); resume with "
        "the data the run started with, or start a new run with --model.checkpoint <run>/last.pt"
    )


def check_position(state: dict, world: int, batches_per_epoch: int, path: str) -> None:
    """The processes and the batches per epoch and process of the run that wrote ``state``, against this run's:
    each process's random streams and the position inside the epoch only continue the same run."""
    weights = weights_file(path)
    if (n := len(state["rng"])) != world:
        raise ConfigError(
            f"cannot resume from {path}: it was written by {n} process{'es' * (n > 1)}, this run has "
            f"{world}; resume with {n} (the exact continuation needs each process's random "
            f"streams), or start a new run from its weights with --model.checkpoint {weights}"
        )
    batches = state["position"].get("batches_per_epoch", batches_per_epoch)
    if batches != batches_per_epoch:  # the data changed: the schedule and the position would not fit
        raise ConfigError(
            f"cannot resume from {path}: it was trained on {batches} batches per epoch and process, this run "
            f"has {batches_per_epoch} (the training images or data.train_subset changed); resume "
            f"with the data the run started with, or start a new run from its weights with "
            f"--model.checkpoint {weights}"
        )
