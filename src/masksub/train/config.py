"""Trainer configuration: dataclasses with defaults, YAML recipes that mirror them, dotted overrides.

    cfg = load_config("fashion_mnist_vit", ["--sub.ratio", "0.75", "--optim.lr=1e-3"])

An unknown key or a value of the wrong type is an error that names the key (and
close matches); the defaults are the default recipe: a small ViT with MaskSub on
Fashion-MNIST, a few minutes on a CPU.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..wrapper import METHOD_NAMES

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"  # also reachable as ./recipes in the repo
SECTIONS = ("model", "sub", "data", "aug", "optim", "sched", "train", "pretrain")
DEFAULT_RECIPE = "fashion_mnist_vit"
# timm's schedulers that step per update (the trainer's way); plateau needs a metric per epoch
SCHEDULERS = ("cosine", "tanh", "step", "multistep", "poly")
RUN_NAMES = {"none": "plain", **METHOD_NAMES}  # sub.kind as tables and listings name it


@dataclass
class ModelConfig:
    name: str = "vit_tiny_patch16_224"  # any timm model name
    kwargs: dict = field(default_factory=dict)  # extra timm.create_model arguments (img_size, depth, ...)
    checkpoint: str | None = None  # initial weights (MAE / CLIP finetuning); loaded non-strict, keys reported
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    grad_checkpointing: bool = False  # recompute each block's activations in the backward: less memory, more time


@dataclass
class SubConfig:
    kind: str = "mask"  # mask | dropout | droppath | none (plain training)
    ratio: float = 0.5
    unit: int = 32  # mask block in pixels (mask-token and pixel adapters)
    adapter: str | None = None  # mask adapter by name (swin_drop: a Swin drops its masked units); None: the model's
    main_weight: float = 0.5
    sub_weight: float = 0.5
    temperature: float = 1.0
    bn_stats: bool = True  # sub pass updates BatchNorm running statistics
    memory_saving: bool = True  # two backwards (False: one summed backward)


@dataclass
class DataConfig:
    # fashion_mnist | folder (ImageFolder layout: <dir>/<split>/<class>/*.jpg) | tar (<dir>/<split>.tar: <class>/*.jpg
    # inside, or a tar or folder of per-class tars) | torch/<name> (torchvision's:
    # cifar10, cifar100, mnist, imagenet...) | hfds/<name> (Hugging Face datasets: a Hub name or a local folder)
    name: str = "fashion_mnist"
    # fashion_mnist: IDX folder (default: $MASKSUB_FASHION_MNIST, Debian's path); torch/: torchvision's root;
    # hfds/: the datasets cache (default: Hugging Face's)
    dir: str | None = None
    train_split: str = "train"  # folder, tar: <dir>/<split>; fashion_mnist: train or test; torch/: train or another
    val_split: str = "val"  # fashion_mnist: val (= test), test or train; torch/: val (= test); hfds/: its own names
    image_key: str = "image"  # hfds/: the image column
    label_key: str = "label"  # hfds/: the label column (a ClassLabel, or strings or integers: their sorted values)
    download: bool = False  # torch/: download into data.dir when absent
    # folder, tar: a file of the classes of a flat val_split's images (ImageNet's validation images come in one
    # folder or tar): "<image> <class>" lines, a CSV of image,class, or one class per line in the images' order
    val_labels: str | None = None
    img_size: int = 28
    in_chans: int = 1
    batch_size: int = 128  # per process
    eval_batch_size: int = 500
    workers: int = 1
    train_subset: int | None = None  # first N training images only
    eval_subset: int | None = None
    corrupt: str = "skip"  # skip | error: what to do with an unreadable image (always reported by path)
    on_device: bool = False  # fashion_mnist: images kept on the device, batches augmented there (no workers);
    # aug.preset none, simple or pretrain (elsewhere the per-sample loader, with a warning)


@dataclass
class AugConfig:
    preset: str = "simple"  # none | simple (pad-crop, flip) | timm (RRC, RandAugment, 3-Augment) | pretrain (RRC, flip)
    hflip: float = 0.5
    scale: tuple = (0.08, 1.0)
    auto_augment: str | None = None  # e.g. rand-m9-mstd0.5-inc1, 3a
    color_jitter: float = 0.0
    re_prob: float = 0.0
    interpolation: str = "bicubic"  # nearest | bilinear | bicubic | box | hamming | lanczos | random (training)
    crop_pct: float = 0.875
    mean: tuple | None = None  # None: the data set's (Fashion-MNIST) or the model's
    std: tuple | None = None
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    switch_prob: float = 0.5
    smoothing: float = 0.0
    bce: bool = False  # binary cross-entropy (DeiT-III, ResNet strikes back)
    bce_target_thresh: float | None = None
    repeated_aug: int = 0  # repeats per sample (timm RepeatAugSampler); 0: off


@dataclass
class OptimConfig:
    name: str = "adamw"  # any timm optimizer name (adamw, lamb, sgd, lars...)
    lr: float | None = 1e-3  # absolute learning rate
    base_lr: float | None = None  # if set: lr = base_lr * global batch / 256
    weight_decay: float = 0.05
    betas: tuple | None = None  # None: the optimizer's; refused for one that takes none (sgd)
    eps: float | None = None  # None: the optimizer's
    momentum: float = 0.9  # for optimizers with momentum (sgd, lars, rmsprop...); another value refused elsewhere
    layer_decay: float | None = None
    clip_grad: float | None = None
    clip_mode: str = "norm"


@dataclass
class SchedConfig:
    name: str = "cosine"
    epochs: int = 2
    warmup_epochs: float = 0.5
    warmup_lr: float = 1e-5
    min_lr: float = 1e-5  # the floor of cosine, tanh and poly
    decay_epochs: float = 90.0  # step: the rate is multiplied by decay_rate every decay_epochs epochs
    decay_milestones: tuple = (90.0, 180.0, 270.0)  # multistep: the epochs at which it is multiplied by decay_rate
    decay_rate: float = 0.1  # step and multistep: the factor; poly: the power of (1 - progress)


@dataclass
class TrainConfig:
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    amp: str | None = None  # None | bf16 | fp16
    accum_steps: int = 1
    compile: bool = False
    channels_last: bool = False
    ema: bool = False
    ema_decay: float = 0.9998
    eval_every: int = 1  # epochs
    checkpoint_every: int = 0  # optimizer steps between 'last' checkpoints inside an epoch; 0: per epoch
    tensorboard: bool = False  # TensorBoard event files in <run>/tensorboard (needs the tensorboard package)
    wandb: str = ""  # a W&B project: log the run to Weights & Biases (needs wandb; WANDB_MODE etc. as W&B reads them)
    max_steps: int | None = None  # stop (with a checkpoint) after this many optimizer steps
    max_nonfinite: int = 20  # consecutive steps with a non-finite loss or gradient before the run stops
    output: str = "runs"
    name: str | None = None  # run folder name (default: recipe-sub-seed; recipe-model-sub-seed for another model)
    resume: str | None = None  # checkpoint file or run folder to continue
    linprobe: bool = False  # train only a BatchNorm (no affine) + linear head on the frozen model
    fsdp: str = "none"  # none | full_shard | shard_grad_op: shard with FSDP (fully_shard) under torchrun
    # FSDP: reduce-scatter at every backward, keeping gradients sharded between them (less memory, more traffic)
    fsdp_sync_every_backward: bool = False


@dataclass
class PretrainConfig:
    """DMJD (``masksub pretrain``); ignored by ``masksub train``."""

    method: str = "dmjd"  # dmjd | single (one view, no visible branch: MaskFeat / MAE style)
    views: int = 2
    corruption: float = 0.6
    prediction: float = 1.0
    block: int = 2  # mask unit in patch tokens
    target: str = "hog"  # hog | pixels
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    projector_dim: int = 512
    visible_weight: float = 1.0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    sub: SubConfig = field(default_factory=SubConfig)
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    recipe: str = DEFAULT_RECIPE

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class ConfigError(ValueError):
    """A recipe or override that does not fit the configuration."""


def _hint(cls: type, name: str):
    return typing.get_type_hints(cls)[name]


def all_keys() -> list[str]:
    """Every dotted key a recipe or override may set."""
    keys = ["recipe"]
    for section in SECTIONS:
        keys += [f"{section}.{f.name}" for f in dataclasses.fields(_hint(Config, section))]
    return keys


def _unknown(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, all_keys(), n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(close)}?" if close else "; `masksub keys` lists every key"
    return ConfigError(f"unknown config key {key!r}{hint}")


def _coerce(key: str, value: Any, hint) -> Any:
    """Check ``value`` against the field's type; accept ints for floats, lists for tuples."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if type(None) in args and key not in NAME_KEYS and str(value).strip().lower() == "none":
            return None  # --train.amp none, --optim.clip_grad none: as sub.kind none says "no sub branch"
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(key, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: got {value!r}")
    number = None
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif hint is float and isinstance(value, str) and NUMBER.fullmatch(value.strip()):
        number = float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
    if number is not None:
        if not math.isfinite(number):  # YAML's .inf / .nan, or 1e999: no key means anything by them
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        return number
    if hint is tuple and isinstance(value, (list, tuple)):  # every tuple key holds numbers
        try:
            return tuple(_coerce(key, v, float) for v in value)
        except ConfigError:
            raise ConfigError(f"{key} must be a list of finite numbers, got {list(value)!r}") from None
    if hint is tuple:
        raise ConfigError(f"{key} must be a list of numbers in brackets, e.g. [0.5, 1.0], got {value!r}")
    if hint is dict and isinstance(value, dict):
        _check_colons(key, value)
    if hint in (int, str, bool, dict) and isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    want = getattr(hint, "__name__", str(hint))
    raise ConfigError(f"{key} must be {want}, got {value!r} ({type(value).__name__})")


NAME_KEYS = ("model.checkpoint", "data.dir", "train.name", "train.resume")  # file and folder names: "none" is one
NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _check_colons(key: str, value: dict) -> None:
    """YAML reads ``{img_size:28}`` (no space after the colon) as a key 'img_size:28' without a value."""
    glued = [k for k, v in value.items() if v is None and isinstance(k, str) and re.fullmatch(r"\w+:\S+", k)]
    if glued:
        fixed = ", ".join(k.replace(":", ": ", 1) for k in glued)
        raise ConfigError(
            f"{key}: YAML read {', '.join(map(repr, glued))} as {'a key' if len(glued) == 1 else 'keys'} without "
            f"a value (it needs a space after each colon): write {{{fixed}}}"
        )


def _set(cfg: Config, key: str, value: Any) -> None:
    if key == "recipe":
        cfg.recipe = _coerce(key, value, str)
        return
    section, _, name = key.partition(".")
    if section not in SECTIONS or not name:
        raise _unknown(key)
    sub = getattr(cfg, section)
    field_name, _, subkey = name.partition(".")
    names = {f.name for f in dataclasses.fields(sub)}
    if field_name not in names:
        raise _unknown(key)
    hint = _hint(type(sub), field_name)
    if subkey:  # model.kwargs.depth: a free-form dict entry
        if hint is not dict:
            raise _unknown(key)
        getattr(sub, field_name)[subkey] = value
        return
    setattr(sub, field_name, _coerce(key, value, hint))


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key in SECTIONS:
            flat.update(_flatten(v, key + "."))
        else:
            flat[key] = v
    return flat


def flat_config(cfg: Config) -> dict[str, Any]:
    """Every dotted key and its value in ``cfg``, in declaration order."""
    return _flatten(cfg.to_dict())


def recipe_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    candidate = RECIPES_DIR / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    if path.suffix in (".yaml", ".yml"):
        raise ConfigError(f"recipe file {path} not found (from {Path.cwd()}); `masksub recipes` lists the bundled ones")
    names = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
    close = difflib.get_close_matches(name_or_path, names, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ConfigError(f"unknown recipe {name_or_path!r}: not a YAML file, nor one of: {', '.join(names)}.{hint}")


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def recipe_notes(name_or_path: str) -> list[str]:
    """The comment lines a recipe starts with: its launch command, then what it trains."""
    notes = []
    for line in recipe_path(name_or_path).read_text().splitlines():
        if not line.startswith("#"):
            break
        notes.append(line[1:].strip())
    return notes


def recipe_command(name_or_path: str) -> str | None:
    """The masksub command a recipe's first comment line launches it with (train, pretrain, linprobe), if any."""
    notes = recipe_notes(name_or_path)
    found = re.search(r"\bmasksub(?:\.cli)? (train|pretrain|linprobe)\b", notes[0] if notes else "")
    return found.group(1) if found else None


def check_recipe_command(name_or_path: str | None, command: str) -> None:
    """A pretraining recipe run by ``train`` or ``compare`` (a classifier trained from a config meant for
    something else), or another recipe by ``pretrain``, is refused with the command it is meant for."""
    meant = recipe_command(name_or_path or DEFAULT_RECIPE)
    if meant is not None and (meant == "pretrain") != (command == "pretrain"):
        kind = "pretraining" if meant == "pretrain" else "classification"
        raise ConfigError(
            f"recipe {Path(name_or_path or DEFAULT_RECIPE).stem!r} is a {kind} recipe, for masksub {meant}, not "
            f"masksub {command}; `masksub recipes` lists each recipe with its command"
        )


def recipe_summary(name_or_path: str) -> dict[str, str]:
    """One row of ``masksub recipes``: the command that runs the recipe, its model, size, epochs and method."""
    cfg = load_config(name_or_path, check=False)
    command = recipe_command(name_or_path) or "train"
    if command == "pretrain":
        pre = cfg.pretrain
        method = f"DMJD, {pre.views} views" if pre.method == "dmjd" else "single view (MaskFeat / MAE style)"
    elif command == "linprobe":
        method = "linear probe"
    else:
        method = RUN_NAMES.get(cfg.sub.kind, cfg.sub.kind) + ("" if cfg.sub.kind == "none" else f" {cfg.sub.ratio:g}")
    return {
        "recipe": Path(name_or_path).stem,
        "command": f"masksub {command}",
        "model": cfg.model.name + ("*" if set(cfg.model.kwargs) - {"img_size"} else ""),
        "data": f"{cfg.data.name} {cfg.data.img_size} px",
        "epochs": str(cfg.sched.epochs),
        "method": method,
    }


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``--a.b 1 --c.d=x`` -> {'a.b': 1, 'c.d': 'x'}; values are read as YAML scalars/lists."""
    out, i = {}, 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --section.key value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise ConfigError(f"override --{key} needs a value")
            value, i = args[i + 1], i + 1
        key = key.replace("-", "_")
        try:
            out[key] = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"cannot read the value of --{key}: {value!r} ({e})") from e
        i += 1
    return out


def load_config(recipe: str | None = None, overrides: list[str] | dict | None = None, check: bool = True) -> Config:
    """Defaults <- recipe YAML <- overrides, each key checked; the recipe's values that the overrides make moot
    go back to their defaults (``drop_moot_recipe_values``); ``check=False`` skips validating the whole."""
    cfg = Config()
    name = recipe or DEFAULT_RECIPE
    path = recipe_path(name)
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections")
    cfg.recipe = path.stem
    for key, value in _flatten(tree).items():
        try:
            _set(cfg, key, value)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    overrides = overrides or {}
    recipe_cfg = copy.deepcopy(cfg)
    apply_overrides(cfg, overrides, check=False)
    from .checks import drop_moot_recipe_values, validate  # the checks read these dataclasses

    if not cfg.train.resume:
        drop_moot_recipe_values(cfg, recipe_cfg, set(overrides))
    if check:
        validate(cfg)
    return cfg


def apply_overrides(cfg: Config, overrides: dict[str, Any], check: bool = True) -> Config:
    """Set dotted keys on ``cfg`` (each checked), then validate the whole (unless ``check`` is false)."""
    for key, value in overrides.items():
        _set(cfg, key, value)
    if check:
        from .checks import validate  # the checks read these dataclasses: imported when first needed

        validate(cfg)
    return cfg


def from_dict(tree: dict) -> Config:
    """Rebuild a saved (resolved) config."""
    cfg = Config()
    for key, value in _flatten(tree).items():
        _set(cfg, key, value)
    return cfg


def dump(cfg: Config, command: str | None = None) -> str:
    """The configuration as YAML; with ``command``, first a comment line that runs it as a recipe (its
    command is then checked, as a bundled recipe's is)."""
    data = cfg.to_dict()

    def plain(v):
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return list(v) if isinstance(v, tuple) else v

    head = f"# masksub {command} --recipe <this file>: the resolved configuration of a run\n" if command else ""
    return head + yaml.safe_dump(plain(data), sort_keys=False)
