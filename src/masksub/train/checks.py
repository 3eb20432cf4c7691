"""Checks of a whole configuration: values that cannot work, and settings that would do nothing.

``validate`` runs on every configuration ``load_config`` builds (and on a checkpoint's, before it is
evaluated or resumed); ``check_command_keys`` on a new run, against the command that runs it. Each check
names the key, the value and what to do instead.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util

import torch
from timm.optim import create_optimizer_v2, get_optimizer_info, list_optimizers

from .config import (
    SCHEDULERS,
    AugConfig,
    Config,
    ConfigError,
    DataConfig,
    OptimConfig,
    PretrainConfig,
    SchedConfig,
    SubConfig,
    TrainConfig,
)
from .sharding import MODES as FSDP_MODES
from .sources import source


def validate(cfg: Config, training: bool = True) -> None:
    """Refuse a configuration that cannot work. The checks of settings that would do nothing (does the
    optimizer take them, does anything read them) are for a new run: evaluating a checkpoint
    (``training=False``) or resuming a run leaves them out, so a run started before such a check was
    added can still be evaluated and continued as it began."""
    from ..masking import check_ratio

    choices = {
        "sub.kind": (cfg.sub.kind, ("mask", "dropout", "droppath", "none")),
        "data.corrupt": (cfg.data.corrupt, ("skip", "error")),
        "aug.preset": (cfg.aug.preset, ("none", "simple", "timm", "pretrain")),
        "aug.interpolation": (cfg.aug.interpolation, INTERPOLATIONS),
        "pretrain.method": (cfg.pretrain.method, ("dmjd", "single")),
        "pretrain.target": (cfg.pretrain.target, ("hog", "pixels")),
        "train.amp": (cfg.train.amp, (None, "bf16", "fp16")),
        "train.device": (cfg.train.device, ("auto", "cpu", "cuda")),
        "optim.clip_mode": (cfg.optim.clip_mode, ("norm", "value", "agc")),
        "train.fsdp": (cfg.train.fsdp, FSDP_MODES),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            hint = ""
            if key == "train.device" and str(value).startswith("cuda:"):  # under torchrun each process takes its own
                hint = f"; to run on GPU {value[5:]}, set train.device=cuda and CUDA_VISIBLE_DEVICES={value[5:]}"
            raise ConfigError(f"{key} must be one of {allowed}, got {value!r}{hint}")
    source(cfg.data.name)  # a name it reads, or an error saying which
    if cfg.train.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(
            "train.tensorboard writes TensorBoard event files, which needs the tensorboard package: "
            'pip install tensorboard (or "masksub[tensorboard]"), or set train.tensorboard false'
        )
    if cfg.train.wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError(
            f"train.wandb={cfg.train.wandb!r} logs the run to Weights & Biases, which needs the wandb package: "
            "pip install wandb (or \"masksub[wandb]\"), or set train.wandb to ''"
        )
    if cfg.data.name == "fashion_mnist":
        from ..data import SPLIT_NAMES

        for key, split in (("data.train_split", cfg.data.train_split), ("data.val_split", cfg.data.val_split)):
            if split not in SPLIT_NAMES:
                raise ConfigError(
                    f"{key}={split!r}: Fashion-MNIST has the splits 'train' and 'test' ('val', the default "
                    "data.val_split, is 'test')"
                )
    if cfg.data.in_chans not in (1, 3):
        raise ConfigError(f"data.in_chans must be 1 (grey) or 3 (RGB), got {cfg.data.in_chans}")
    for key, values in (("aug.mean", cfg.aug.mean), ("aug.std", cfg.aug.std)):
        if values is not None and len(values) not in (1, cfg.data.in_chans):
            raise ConfigError(
                f"{key} has {len(values)} values for data.in_chans={cfg.data.in_chans}: give one value per "
                "channel (or one for all)"
            )
    optimizers = list_optimizers()
    if cfg.optim.name.lower().removeprefix("lookahead_") not in optimizers:
        close = difflib.get_close_matches(cfg.optim.name.lower(), optimizers, n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(close)}?" if close else " (timm.optim.list_optimizers() lists them)"
        raise ConfigError(f"optim.name={cfg.optim.name!r} is not a timm optimizer{hint}")
    new_run = training and not cfg.train.resume
    if new_run:
        _check_betas(cfg.optim)
        _check_nesterov(cfg.optim)
    if cfg.sched.name not in SCHEDULERS:
        close = difflib.get_close_matches(cfg.sched.name, SCHEDULERS, n=2, cutoff=0.6)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise ConfigError(f"sched.name must be one of {SCHEDULERS} (timm schedulers), got {cfg.sched.name!r}{hint}")
    try:
        check_ratio(cfg.sub.ratio, "sub.ratio")
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None
    _check_ranges(cfg)
    if new_run:
        _check_unused(cfg)
    if cfg.model.checkpoint == "???":  # a recipe's marker for weights the user must supply
        raise ConfigError(
            f"recipe {cfg.recipe!r} finetunes pretrained weights: pass --model.checkpoint /path/to/weights.pth "
            "(a state dict, or one under 'model' / 'state_dict')"
        )
    if cfg.train.fsdp != "none":
        refused = {
            "train.amp=fp16": (cfg.train.amp == "fp16", "its grad scaler does not share the overflow check; use bf16"),
            "train.linprobe": (cfg.train.linprobe, "a linear probe trains one head; run it without FSDP"),
            "optim.clip_mode=agc": (cfg.optim.clip_mode == "agc", "it clips each parameter by its own, sharded norm"),
        }
        for key, (refuse, why) in refused.items():
            if refuse:
                raise ConfigError(f"{key} cannot run with train.fsdp={cfg.train.fsdp}: {why} (or set train.fsdp none)")
    if cfg.train.fsdp_sync_every_backward and cfg.train.fsdp == "none":
        raise ConfigError(
            "train.fsdp_sync_every_backward keeps FSDP's gradients sharded between backwards; without FSDP the "
            "gradients are whole on every process and it would only add all-reduces: set train.fsdp full_shard "
            "(or shard_grad_op), or leave it false"
        )
    if (cfg.optim.lr is None) == (cfg.optim.base_lr is None):
        raise ConfigError("set exactly one of optim.lr (absolute) and optim.base_lr (scaled by batch / 256)")


def _check_ranges(cfg: Config) -> None:
    """Counts, rates and probabilities within the values that mean something."""
    d, a, o, t, p = cfg.data, cfg.aug, cfg.optim, cfg.train, cfg.pretrain
    at_least = {  # key: (value, the least it may be); None (unset) passes
        "data.batch_size": (d.batch_size, 1),
        "data.eval_batch_size": (d.eval_batch_size, 1),
        "data.img_size": (d.img_size, 1),
        "data.train_subset": (d.train_subset, 1),  # unset: every image
        "data.eval_subset": (d.eval_subset, 1),
        "sched.epochs": (cfg.sched.epochs, 1),
        "train.accum_steps": (t.accum_steps, 1),
        "train.eval_every": (t.eval_every, 1),
        "train.max_steps": (t.max_steps, 1),
        "train.max_nonfinite": (t.max_nonfinite, 1),
        "data.workers": (d.workers, 0),
        "train.checkpoint_every": (t.checkpoint_every, 0),
        "sched.warmup_epochs": (cfg.sched.warmup_epochs, 0),
        "optim.weight_decay": (o.weight_decay, 0),
        "aug.repeated_aug": (a.repeated_aug, 0),
        "aug.mixup": (a.mixup, 0),
        "aug.color_jitter": (a.color_jitter, 0),
        "aug.cutmix": (a.cutmix, 0),
        "sub.main_weight": (cfg.sub.main_weight, 0),
        "sub.sub_weight": (cfg.sub.sub_weight, 0),
        "sub.unit": (cfg.sub.unit, 1),
        "sched.warmup_lr": (cfg.sched.warmup_lr, 0),  # below 0 the warm-up steps climb the loss
        "sched.min_lr": (cfg.sched.min_lr, 0),
        "sched.decay_milestones": (min(cfg.sched.decay_milestones, default=0), 0),
        "pretrain.views": (p.views, 2 if p.method == "dmjd" else 1),
        "pretrain.block": (p.block, 1),
        "pretrain.decoder_dim": (p.decoder_dim, 1),
        "pretrain.decoder_depth": (p.decoder_depth, 0),
        "pretrain.decoder_heads": (p.decoder_heads, 1),
        "pretrain.projector_dim": (p.projector_dim, 1),
        "pretrain.visible_weight": (p.visible_weight, 0),
    }
    for key, (value, least) in at_least.items():
        if value is not None and value < least:
            every = "; leave it unset for every image" if key.endswith("_subset") else ""
            if key == "pretrain.views":
                every = " for pretrain.method=dmjd (two views or more; method single is the one-view baseline)"
            raise ConfigError(f"{key} must be >= {least}, got {value}{every}")
    milestones = list(cfg.sched.decay_milestones)
    if milestones != sorted(milestones):
        raise ConfigError(f"sched.decay_milestones must be in increasing order (epochs), got {milestones}")
    if p.decoder_dim % p.decoder_heads:
        raise ConfigError(
            f"pretrain.decoder_dim={p.decoder_dim} does not split into pretrain.decoder_heads={p.decoder_heads} "
            "heads: choose a number of heads that divides the width"
        )
    if p.decoder_dim % 4:
        raise ConfigError(
            f"pretrain.decoder_dim={p.decoder_dim} must be a multiple of 4 (the decoder's 2-D sine-cosine position "
            "embedding splits it in four)"
        )
    above_zero = {
        "optim.lr": o.lr,
        "optim.base_lr": o.base_lr,
        "optim.clip_grad": o.clip_grad,
        "aug.crop_pct": a.crop_pct,
        "sched.decay_epochs": cfg.sched.decay_epochs,
        "sched.decay_rate": cfg.sched.decay_rate,
        "optim.layer_decay": o.layer_decay,
    }
    for key, value in {**above_zero, "sub.temperature": cfg.sub.temperature}.items():
        if value is not None and value <= 0:
            raise ConfigError(
                f"{key} must be > 0, got {value}" + ("; leave it unset for no clipping" if "clip" in key else "")
            )
    fractions = {
        "aug.hflip": a.hflip,
        "aug.re_prob": a.re_prob,
        "aug.mixup_prob": a.mixup_prob,
        "aug.switch_prob": a.switch_prob,
        "train.ema_decay": t.ema_decay,
        "optim.layer_decay": o.layer_decay,  # 1: no decay; above 1 the first layers would learn fastest
        "aug.bce_target_thresh": a.bce_target_thresh,
    }
    for key, value in fractions.items():
        if value is not None and not 0 <= value <= 1:
            raise ConfigError(f"{key} must be in [0, 1], got {value}")
    below_one = {  # at 1 nothing is left: a label smoothed to uniform, every unit or residual branch dropped
        "aug.smoothing": a.smoothing,
        "model.drop_rate": cfg.model.drop_rate,
        "model.drop_path_rate": cfg.model.drop_path_rate,
        "optim.momentum": o.momentum,  # at 1 and above the velocity never decays: SGD diverges
    }
    for key, value in below_one.items():
        if not 0 <= value < 1:
            raise ConfigError(f"{key} must be in [0, 1), got {value}")
    if cfg.sub.main_weight == 0 and cfg.sub.sub_weight == 0:
        raise ConfigError("sub.main_weight and sub.sub_weight are both 0: nothing would train; the paper uses 0.5, 0.5")
    if o.eps is not None and o.eps < 0:
        raise ConfigError(f"optim.eps must be >= 0, got {o.eps}")
    if len(a.scale) != 2 or not 0 < a.scale[0] <= a.scale[1] <= 1:
        raise ConfigError(f"aug.scale must be [min, max] area fractions, 0 < min <= max <= 1, got {list(a.scale)}")
    if a.std is not None and any(v <= 0 for v in a.std):
        raise ConfigError(f"aug.std must be > 0 (inputs are divided by it), got {list(a.std)}")


def _optimizer_info(o: OptimConfig):
    """timm's description of the optimizer (a lookahead_adamw: adamw's), or None for a name timm lacks (refused
    by validate, with close names)."""
    name = o.name.lower().split("_")[-1]
    return get_optimizer_info(name) if name in list_optimizers() else None


def _optimizer_moot(o: OptimConfig) -> list[tuple[list[str], str]]:
    """optim.betas, eps and momentum against what the optimizer takes: timm drops those it does not take,
    so a value set for another optimizer (betas for sgd, momentum for adamw) would do nothing."""
    if (info := _optimizer_info(o)) is None:
        return []
    takes = {"optim.betas": info.has_betas, "optim.eps": info.has_eps, "optim.momentum": info.has_momentum}
    set_ = {
        "optim.betas": o.betas is not None,
        "optim.eps": o.eps is not None,
        "optim.momentum": o.momentum != OptimConfig.momentum,
    }
    if not (unused := [k for k in takes if set_[k] and not takes[k]]):
        return []
    it = "it" if len(unused) == 1 else "them"
    return [
        (
            unused,
            f"optim.name={o.name} takes no {' or '.join(k.removeprefix('optim.') for k in unused)}: "
            f"{', '.join(unused)} would do nothing; leave {it} unset"
            + (" (momentum at its default, 0.9)" if "optim.momentum" in unused else ""),
        )
    ]


def _check_nesterov(o: OptimConfig) -> None:
    """timm's sgd (and nesterov, sgdw, nlars...) is SGD with Nesterov momentum, which torch refuses without
    momentum: say so before the run starts, with the way to plain SGD."""
    info = _optimizer_info(o)
    if info is None or not info.has_momentum or o.momentum != 0 or not (info.defaults or {}).get("nesterov"):
        return
    try:  # some Nesterov variants (sgdp) take momentum 0: only the ones that refuse it are refused
        create_optimizer_v2(torch.nn.Linear(1, 1), opt=o.name, lr=0.1, momentum=0.0)
    except ValueError:
        raise ConfigError(
            f"optim.name={o.name} uses Nesterov momentum, which needs optim.momentum > 0, got 0: for no momentum "
            "use a form without Nesterov (optim.name momentum for SGD, lars for LARS) with optim.momentum 0"
        ) from None
    except Exception:  # an optimizer that cannot be built here (apex's fusedsgd needs CUDA): left to the run
        return


def _check_betas(o: OptimConfig) -> None:
    """As many betas as the optimizer takes, each in [0, 1) (betas for one that takes none: ``_optimizer_moot``)."""
    info = _optimizer_info(o)
    if o.betas is None or info is None or not info.has_betas:
        return
    n = info.num_betas
    if len(o.betas) != n or not all(0 <= b < 1 for b in o.betas):
        example = "[0.9, 0.999]" if n == 2 else "[0.98, 0.92, 0.99]"
        raise ConfigError(f"optim.betas for {o.name} must be {n} values in [0, 1), e.g. {example}, got {list(o.betas)}")


PRETRAIN_UNUSED = {  # keys masksub pretrain does not read: DMJD computes its own losses, masks its own input,
    # and evaluates nothing (linear probe and finetuning judge it)
    "data": ("val_split", "eval_subset", "eval_batch_size", "label_key", "val_labels"),
    "aug": ("mixup", "cutmix", "mixup_prob", "switch_prob", "smoothing", "bce", "bce_target_thresh"),
    "train": ("ema", "ema_decay", "linprobe", "eval_every"),
}


def check_command_keys(cfg: Config, command: str) -> None:
    """Keys set away from their defaults that ``command`` does not read: they would do nothing. Pretraining
    leaves out the sub branch (``sub.kind none``, as its recipes say, or the default), labels and EMA;
    classification leaves out every ``pretrain`` key."""
    if command == "pretrain" and cfg.aug.preset != "pretrain":
        raise ConfigError(
            "masksub pretrain takes aug.preset pretrain (random-resized crops and flips of unnormalized images: "
            "DMJD normalizes the encoder's input itself and computes its targets from the raw pixels); "
            f"aug.preset {cfg.aug.preset} normalizes the images, which would be normalized twice: set "
            "--aug.preset pretrain"
        )
    if command == "pretrain":
        keys = {"sub": [f.name for f in dataclasses.fields(SubConfig)], **PRETRAIN_UNUSED}
        why = "it masks by pretrain.corruption and computes DMJD's own losses, without EMA or evaluation"
    else:
        keys = {"pretrain": [f.name for f in dataclasses.fields(PretrainConfig)]}
        why = "they configure masksub pretrain"
    default = Config()
    unused = [
        f"{section}.{name}"
        for section, names in keys.items()
        for name in names
        if _differs(getattr(cfg, section), getattr(default, section), name)
    ]
    if cfg.sub.kind == "none" and "sub.kind" in unused:  # the pretraining recipes say so
        unused.remove("sub.kind")
    if unused:
        them = "it" if len(unused) == 1 else "them"
        raise ConfigError(f"{', '.join(unused)} would do nothing in masksub {command} ({why}): leave {them} out")


def _check_unused(cfg: Config) -> None:
    """Settings that could not take effect: a policy timm does not know, model.kwargs another key overrides,
    and ``moot_settings``."""
    if cfg.aug.auto_augment:
        _check_auto_augment(cfg.aug.auto_augment)
    if clash := [k for k in OWN_MODEL_KWARGS if k in (cfg.model.kwargs or {})]:
        raise ConfigError(
            f"model.kwargs sets {', '.join(clash)}, which the trainer sets from "
            + ", ".join(OWN_MODEL_KWARGS[k] for k in clash)
            + " (the kwargs value would be overridden): set that instead and drop it from model.kwargs"
        )
    for _, message in moot_settings(cfg):
        raise ConfigError(message)


def moot_settings(cfg: Config) -> list[tuple[list[str], str]]:
    """Keys set away from their defaults that would do nothing, as (keys, message) pairs: a key whose switch
    is off (EMA decay without EMA, clip mode without clipping, mixup odds without mixup...), a setting the
    optimizer or scheduler does not take, timm-only aug keys with another preset."""
    a, default = cfg.aug, AugConfig()
    found = _optimizer_moot(cfg.optim)
    reader = cfg.data.name.partition("/")[0].lower()
    needs = {  # a key set away from its default, and the setting without which it does nothing
        "train.ema_decay": (cfg.train.ema_decay != TrainConfig.ema_decay and not cfg.train.ema, "train.ema true"),
        "optim.clip_mode": (
            cfg.optim.clip_mode != OptimConfig.clip_mode and cfg.optim.clip_grad is None,
            "optim.clip_grad",
        ),
        "sched.warmup_lr": (
            cfg.sched.warmup_lr != SchedConfig.warmup_lr and cfg.sched.warmup_epochs == 0,
            "sched.warmup_epochs above 0",
        ),
        **_scheduler_keys(cfg.sched),
        "aug.hflip": (a.hflip != default.hflip and a.preset == "none", "aug.preset simple, timm or pretrain"),
        **{
            f"data.{k}": (_differs(cfg.data, DataConfig(), k) and reader != "hfds", "data.name hfds/<name>")
            for k in ("image_key", "label_key")
        },
        "data.download": (cfg.data.download and reader != "torch", "data.name torch/<name>"),
        "data.val_labels": (
            cfg.data.val_labels is not None and reader not in ("folder", "tar"),
            "data.name folder or tar",
        ),
    }
    if cfg.optim.layer_decay is not None and cfg.train.linprobe:  # the head, the one layer trained, keeps the rate
        found.append(
            (
                ["optim.layer_decay"],
                "optim.layer_decay scales the learning rate of the layers below the head, and a linear probe "
                "(train.linprobe) trains the head alone: leave it unset",
            )
        )
    if unused := branch_keys_unused(cfg.sub.kind, [k for k in SUB_KEYS if _differs(cfg.sub, SubConfig(), k)]):
        found.append(
            (
                [f"sub.{k}" for k in unused],
                f"{', '.join(f'sub.{k}' for k in unused)} would do nothing with sub.kind {cfg.sub.kind} ("
                + ("plain training: no sub branch" if cfg.sub.kind == "none" else "it drops no input blocks")
                + f"): leave {'it' if len(unused) == 1 else 'them'} at the default, or choose another sub.kind",
            )
        )
    single = [k for k in SINGLE_VIEW_UNUSED if _differs(cfg.pretrain, PretrainConfig(), k)]
    if single and cfg.pretrain.method == "single":
        one = len(single) == 1
        found.append(
            (
                [f"pretrain.{k}" for k in single],
                f"{', '.join(f'pretrain.{k}' for k in single)} would do nothing with pretrain.method single (one "
                f"view, no visible branch): leave {'it' if one else 'them'} at the default, or use pretrain.method "
                "dmjd",
            )
        )
    for key, (unused, setting) in needs.items():
        if unused:
            found.append(
                ([key], f"{key} takes effect with {setting}, not set here: set it, or leave {key} at its default")
            )
    if a.bce_target_thresh is not None and not a.bce:
        found.append(
            (
                ["aug.bce_target_thresh"],
                "aug.bce_target_thresh takes effect with aug.bce true (binary cross-entropy), not with the softmax "
                "cross-entropy: set --aug.bce true, or leave it unset",
            )
        )
    odds = [] if a.mixup or a.cutmix else ["mixup_prob", "switch_prob"]
    if unused := [f"aug.{k}" for k in odds if getattr(a, k) != getattr(default, k)]:
        found.append(
            (
                unused,
                f"{', '.join(unused)} take{'s' * (len(unused) == 1)} effect with aug.mixup or aug.cutmix above "
                "0, and both are 0 here: set one of them, or leave the rest at the default",
            )
        )
    timm_only = TIMM_ONLY if a.preset != "timm" else ()  # the other presets' transforms take none of these
    if unused := [f"aug.{k}" for k in timm_only if _differs(a, default, k)]:
        one = len(unused) == 1
        found.append(
            (
                unused,
                f"{', '.join(unused)} take{'s' * one} effect with aug.preset timm (timm's transforms), not with "
                f"aug.preset {a.preset}: set --aug.preset timm, or leave {'it' if one else 'them'} at the default",
            )
        )
    return found


SINGLE_VIEW_UNUSED = ("views", "prediction", "visible_weight", "projector_dim")  # pretrain keys of 2+ views
SUB_KEYS = tuple(f.name for f in dataclasses.fields(SubConfig) if f.name != "kind")


def branch_keys_unused(kind: str, keys: list[str]) -> list[str]:
    """Of the ``sub.*`` key names ``keys``, those ``sub.kind=kind`` does not read: plain training reads none,
    DropSub and PathSub no mask unit or adapter."""
    if kind == "none":
        return list(keys)
    return [k for k in keys if k in ("unit", "adapter") and kind in ("dropout", "droppath")]


def _differs(section, default, name: str) -> bool:
    """Whether a config section's value of ``name`` is not the default's (a list equals the same tuple)."""
    return _plain(getattr(section, name)) != _plain(getattr(default, name))


def drop_moot_recipe_values(cfg: Config, recipe: Config, overridden: set[str]) -> None:
    """Puts back to their defaults the recipe's values that the overrides made moot (a recipe's warm-up rate
    after ``--sched.warmup_epochs 0``, its RandAugment policy after ``--aug.preset simple``): they would do
    nothing, and the user did not set them. A moot key the user set, or one the recipe alone leaves moot, is
    still refused by ``validate``."""
    inherent = {key for keys, _ in moot_settings(recipe) for key in keys}
    fresh = Config()
    for keys, _ in moot_settings(cfg):
        for key in keys:
            if key not in overridden and key not in inherent:
                section, name = key.split(".")
                setattr(getattr(cfg, section), name, getattr(getattr(fresh, section), name))


SCHEDULER_KEYS = {  # the keys of SchedConfig that only some schedulers read
    "min_lr": ("cosine", "tanh", "poly"),
    "decay_epochs": ("step",),
    "decay_milestones": ("multistep",),
    "decay_rate": ("step", "multistep", "poly"),
}


def _scheduler_keys(sched: SchedConfig) -> dict:
    """``_check_unused``'s entries for scheduler keys set away from their defaults that sched.name does not read."""
    default = SchedConfig()
    return {
        f"sched.{key}": (
            _differs(sched, default, key) and sched.name not in names,
            f"sched.name {' or '.join(names)}",
        )
        for key, names in SCHEDULER_KEYS.items()
    }


OWN_MODEL_KWARGS = {  # timm.create_model arguments the trainer passes from keys of their own
    "num_classes": "the data's classes",
    "in_chans": "data.in_chans",
    "drop_rate": "model.drop_rate",
    "drop_path_rate": "model.drop_path_rate",
}
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos", "random")  # timm's names
TIMM_ONLY = ("scale", "auto_augment", "color_jitter", "re_prob", "interpolation", "crop_pct")  # aug keys


def _plain(value):
    return tuple(value) if isinstance(value, list) else value


def _check_auto_augment(policy: str) -> None:
    """timm's parser of the policy string, run on a throwaway transform: its assertion becomes a clear error."""
    from timm.data import create_transform

    try:
        create_transform(32, is_training=True, auto_augment=policy)
    except (AssertionError, ValueError, KeyError, IndexError) as e:
        raise ConfigError(
            f"aug.auto_augment={policy!r} is not a timm augmentation policy ({e or type(e).__name__}); e.g. "
            "rand-m9-mstd0.5-inc1 (RandAugment), augmix-m5-w4-d2, 3a (3-Augment), original or v0 (AutoAugment)"
        ) from None
