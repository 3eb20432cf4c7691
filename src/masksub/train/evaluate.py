"""``masksub eval``: top-1/top-5 of a checkpoint's plain and EMA weights on its evaluation set."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from timm.data import create_transform, resolve_data_config

from ..data import CLASSES, SPLIT_NAMES
from ..step import AMP_DTYPES
from . import checkpoint, hub
from .accuracy import evaluate
from .build import build_model, create_model, resolve_device
from .checks import validate
from .config import Config, ConfigError, apply_overrides, from_dict
from .data import build_datasets, build_eval_dataset, build_eval_loader
from .trainer import Trainer, counted

# What the weights in a checkpoint are of: an override builds another model, which the weights do not fit
# (a size-mismatch traceback) or, worse, fit in part.
MODEL_KEYS = ("model.name", "model.kwargs", "data.in_chans", "sub.kind", "train.linprobe")
# What evaluation reads besides the weights: the data, the evaluation transform, the device and precision.
EVAL_KEYS = ("data.", "aug.preset", "aug.interpolation", "aug.crop_pct", "aug.mean", "aug.std")
EVAL_KEYS += ("train.device", "train.amp", "train.channels_last")
TRAINING_DATA_KEYS = ("data.train_subset", "data.batch_size")  # data keys of the training batches only


def evaluate_checkpoint(
    path: Path, overrides: dict | None = None, report: Callable[[str], None] | None = None, per_class: bool = False
) -> dict[str, dict]:
    """Top-1/top-5 of the plain weights (and EMA weights, if kept); ``report`` gets a line saying
    which checkpoint is evaluated on which images. ``per_class`` adds each result's ``"confusion"`` matrix and
    ``"classes"``. ``hf-hub:<repo>`` is an exported folder on the Hugging Face Hub."""
    path = hub.local_folder(path)
    if is_export(path):  # its own keys and checks
        return evaluate_export(path, overrides or {}, report, per_class)
    if fixed := [key for key in MODEL_KEYS if key in (overrides or {})]:
        raise ConfigError(
            f"{', '.join(fixed)}: the checkpoint sets {'it' if len(fixed) == 1 else 'them'} (its weights are of the "
            "model its run trained); evaluate without; data keys such as data.dir or data.eval_subset may change"
        )
    if idle := [key for key in overrides or {} if not key.startswith(EVAL_KEYS) or key in TRAINING_DATA_KEYS]:
        raise ConfigError(
            f"{', '.join(idle)} would do nothing in masksub eval, which evaluates the checkpoint's weights: it reads "
            "the data.* keys but train_subset and batch_size (eval_subset, eval_batch_size), the evaluation "
            "transform (aug.preset, interpolation, crop_pct, mean, std), "
            "train.device, train.amp and train.channels_last"
        )
    cfg, state = load_run(path, overrides or {}, "eval")
    device = resolve_device(cfg.train.device)
    classes = state.get("classes")
    if classes is None:  # a checkpoint without its class list: the training split gives it
        classes = build_datasets(cfg)[0].classes
    val_set = build_eval_dataset(cfg, classes)  # the training split is not needed, nor read
    model = trained_model(cfg, state, len(classes) or 1000).to(device)
    # as the run evaluated each epoch: its autocast precision and memory format (train.amp null: full precision)
    amp, channels_last = AMP_DTYPES.get(cfg.train.amp), cfg.train.channels_last
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if report is not None:
        steps = (state.get("position") or {}).get("global_step")
        when = f" after {counted(steps, 'training step')}" if steps is not None else ""
        report(f"{path}{when}: {_evaluated(cfg, val_set, device)}")
    loader = build_eval_loader(cfg, model, val_set, 0, 1, device)
    confusion = len(classes) if per_class else 0
    results = {"weights": evaluate(model, loader, device, amp, channels_last, confusion=confusion)}
    if state.get("ema"):
        ema_model = trained_model(cfg, state, len(classes) or 1000, ema=True).to(device)
        if channels_last:
            ema_model = ema_model.to(memory_format=torch.channels_last)
        results["ema weights"] = evaluate(ema_model, loader, device, amp, channels_last, confusion=confusion)
    if per_class:
        for result in results.values():
            result["classes"] = list(classes)
    return results


def is_export(path: Path) -> bool:
    """A folder of ``masksub export`` (or timm's Hub layout): config.json beside the weights, no run checkpoint."""
    return path.is_dir() and (path / "config.json").is_file() and not (path / "last.pt").exists()


def load_export(path: Path, purpose: str) -> tuple[torch.nn.Module, list[str], dict]:
    """An exported folder's classifier (in evaluation mode), its class names (config.json's label_names; none if it
    names none) and timm's data config of it (input size, crop, interpolation, mean and std); a backbone is refused,
    having nothing to ``purpose``."""
    model = create_model(f"local-dir:{path}", pretrained=True).eval()
    if not model.num_classes:
        raise ConfigError(f"{path} is a backbone without a classifier (a pretraining run's): nothing to {purpose}")
    return model, list(model.pretrained_cfg.get("label_names") or []), resolve_data_config(model=model)


def _evaluated(cfg, val_set, device: torch.device) -> str:
    """Which images are evaluated, where and how precisely: the report's line."""
    d = cfg.data
    if d.name == "fashion_mnist":
        split = f"the Fashion-MNIST {SPLIT_NAMES[d.val_split]} split"
    else:
        split = getattr(val_set, "description", None) or str(Path(d.dir) / d.val_split)
    limited = d.eval_subset is not None and len(val_set) >= d.eval_subset  # not when it asks for more than all
    subset = f" (data.eval_subset {d.eval_subset}; --data.eval_subset null for all)" if limited else ""
    precision = f", {cfg.train.amp} autocast" if cfg.train.amp is not None else ""
    return f"{len(val_set):,} images of {split}{subset}, on {device}{precision}"


# What evaluating an exported folder reads besides it: its config.json sets the input and the preprocessing.
EXPORT_KEYS = ("data.", "train.device", "train.amp", "train.channels_last")
EXPORT_FIXED = ("data.img_size", "data.in_chans", "data.on_device", *TRAINING_DATA_KEYS)


def evaluate_export(
    path: Path, overrides: dict, report: Callable[[str], None] | None = None, per_class: bool = False
) -> dict[str, dict]:
    """Top-1/top-5 of an exported folder (``masksub export``'s, or any timm folder whose config.json names its
    classes) on the data the ``data.*`` overrides choose (default: the Fashion-MNIST test split), with the folder's
    own preprocessing; the data's labels matched to the model's outputs by class name."""
    if idle := [key for key in overrides if not key.startswith(EXPORT_KEYS) or key in EXPORT_FIXED]:
        raise ConfigError(
            f"{', '.join(idle)}: {path} is an exported model, whose config.json sets its input and preprocessing; "
            "masksub eval of it reads the data.* keys but img_size, in_chans, on_device, train_subset and batch_size, "
            "and train.device, train.amp and train.channels_last"
        )
    model, classes, data = load_export(path, "evaluate")
    if len(classes) != model.num_classes:
        raise ConfigError(
            f"{path}/config.json names {len(classes)} classes (label_names) for {model.num_classes} outputs: the "
            "data's labels cannot be matched to the model's; add the class names, in output order"
        )
    chans, size = data["input_size"][0], data["input_size"][-1]
    cfg = apply_overrides(Config(), {**overrides, "data.in_chans": chans, "data.img_size": size}, check=False)
    cfg.data.on_device = False  # the folder's own transform, in the loader
    validate(cfg, training=False)
    if cfg.data.name == "fashion_mnist" and classes != list(CLASSES):
        raise ConfigError(
            f"{path} classifies into {', '.join(classes[:4])}{', ...' if len(classes) > 4 else ''}, not the "
            "Fashion-MNIST classes: evaluate it on its own data (--data.name, --data.dir, --data.val_split)"
        )
    device = resolve_device(cfg.train.device)
    val_set = build_eval_dataset(cfg, classes)
    if report is not None:
        report(f"{path} ({model.pretrained_cfg.get('architecture')}): {_evaluated(cfg, val_set, device)}")
    model, amp, channels_last = model.to(device), AMP_DTYPES.get(cfg.train.amp), cfg.train.channels_last
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    loader = build_eval_loader(cfg, model, val_set, 0, 1, device, transform=create_transform(**data))
    result = evaluate(model, loader, device, amp, channels_last, confusion=len(classes) if per_class else 0)
    if per_class:
        result["classes"] = classes
    return {"weights": result}


def load_run(path: Path, overrides: dict, command: str, pretraining: bool = False) -> tuple:
    """The configuration (with ``overrides``) and the state of a classification run's checkpoint (or, with
    ``pretraining``, of a pretraining run's)."""
    state = checkpoint.load(path)
    if "config" not in state or "model" not in state:
        raise checkpoint.CheckpointError(
            f"{path} is not a masksub training checkpoint (no config/model entries): masksub {command} reads a run's "
            "last.pt or best.pt (or its folder); weights alone (an encoder.pt, a timm or hub file) have no run "
            "settings to go with: train from them with masksub linprobe or masksub train --model.checkpoint"
        )
    if checkpoint.run_command(state) == "pretrain" and not pretraining:
        raise checkpoint.CheckpointError(
            f"{path} is a pretraining checkpoint: judge its encoder.pt with masksub linprobe or masksub train"
        )
    cfg = apply_overrides(from_dict(state["config"]), overrides, check=False)  # e.g. another data.dir
    cfg.model.checkpoint = None  # the checkpoint holds every weight: no file or hub weights are read
    cfg.model.kwargs = {k: v for k, v in cfg.model.kwargs.items() if k != "pretrained"}
    validate(cfg, training=False)
    return cfg, state


def trained_model(cfg, state: dict, num_classes: int, ema: bool = False) -> torch.nn.Module:
    """The plain model of a run (a linear probe's with its BatchNorm head) holding the checkpoint's weights, or
    with ``ema`` its EMA weights; of a pretraining run, its encoder (``num_classes`` 0), as its encoder.pt holds it."""
    if checkpoint.run_command(state) == "pretrain":
        encoder = build_model(cfg, 0)
        encoder.load_state_dict({k[8:]: v for k, v in state["model"].items() if k.startswith("encoder.")})
        return encoder
    model = build_model(cfg, num_classes)
    weights = state["model"]
    if cfg.train.linprobe:
        Trainer._linear_probe_head(model)
    if ema:
        if not state.get("ema"):
            raise checkpoint.CheckpointError(
                "the checkpoint holds no EMA weights (its run had train.ema false): leave out --ema"
            )
        weights = {k.removeprefix("module."): v for k, v in state["ema"].items()}
    elif cfg.sub.kind != "none":  # the wrapper's keys: model.* (the plain model) and branch.* (mask token)
        weights = {k.removeprefix("model."): v for k, v in weights.items() if not k.startswith("branch.")}
    model.load_state_dict(weights)
    return model
