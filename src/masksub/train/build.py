"""What a configuration builds before training: the device, the timm model (with its initial weights), the
criterion and the learning-rate schedule."""

from __future__ import annotations

import difflib
import re
import warnings
from pathlib import Path

import timm
import torch
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.scheduler import create_scheduler_v2

from . import checkpoint
from .config import Config, ConfigError


def resolve_device(kind: str) -> torch.device:
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is available; use train.device=cpu")
    return torch.device(kind)


def timm_at_least(version: str) -> bool:
    return tuple(int(n) for n in re.findall(r"\d+", timm.__version__)[:3]) >= tuple(map(int, version.split(".")))


# timm reads a local-dir: folder's model.safetensors from 1.0.26; before, its local-dir loader opens every weight file
# with torch.load (an UnpicklingError), while its file loader reads safetensors.
LOCAL_DIR_SAFETENSORS = timm_at_least("1.0.26")


def create_model(name: str, **kwargs) -> torch.nn.Module:
    """``timm.create_model``, reading a ``local-dir:`` folder's ``model.safetensors`` (an export's weights) under
    every timm: before timm 1.0.26 through timm's file loader, which drops a classifier of another size as the
    folder loader does."""
    weights = Path(name[10:]) / "model.safetensors"
    if name.startswith("local-dir:") and kwargs.get("pretrained") and not LOCAL_DIR_SAFETENSORS and weights.is_file():
        overlay = {**(kwargs.get("pretrained_cfg_overlay") or {}), "source": "", "file": str(weights)}
        kwargs = {**kwargs, "pretrained_cfg_overlay": overlay}
    return timm.create_model(name, **kwargs)


def build_model(cfg: Config, num_classes: int, log=print, initial_weights: bool = True) -> torch.nn.Module:
    """The timm model of ``cfg.model``; with ``model.checkpoint`` loaded into it unless ``initial_weights``
    is false (a resumed run: its checkpoint holds every weight, and the file may be gone)."""
    m = cfg.model
    kwargs = dict(m.kwargs, num_classes=num_classes, in_chans=cfg.data.in_chans)
    kwargs.update(drop_rate=m.drop_rate, drop_path_rate=m.drop_path_rate)
    try:
        model = create_model(m.name, **kwargs)
    except Exception as e:
        if isinstance(e, RuntimeError) and "Unknown model" in str(e):
            # a name's longer forms first (convvit_base: convvit_base_patch16), then names spelt alike
            longer = [name for name in timm.list_models(f"{m.name}*") if name != m.name][:3]
            close = longer or difflib.get_close_matches(m.name, timm.list_models(), n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else "; timm.list_models('*pattern*') lists them"
            raise ConfigError(f"model.name={m.name!r} is not a timm model{hint}") from None
        if isinstance(e, TypeError) and "unexpected keyword" in str(e):
            raise ConfigError(
                f"{m.name} does not take one of model.kwargs {sorted(m.kwargs)} ({e}); model.kwargs come from the "
                f"recipe ({cfg.recipe}) unless given, and fit its model: set --model.kwargs to this model's own "
                "('{}' for none), or use a recipe made for it (masksub recipes lists them)"
            ) from None
        if m.kwargs.get("pretrained"):  # the hub's weights, which timm fetches: not on an offline machine
            raise ConfigError(
                f"{m.name}: timm could not fetch its pretrained weights ({type(e).__name__}: {str(e)[:300]}); "
                "without a connection, download them where there is one and pass the file as model.checkpoint "
                "(no pretrained in model.kwargs)"
            ) from None
        if isinstance(e, (AssertionError, ValueError)):  # the model's own check of its arguments
            settings = {**m.kwargs, "in_chans": cfg.data.in_chans, "num_classes": num_classes}
            raise ConfigError(
                f"{m.name} cannot be built with {settings} (model.kwargs, data.in_chans, the data's classes): "
                f"{e or type(e).__name__}"
            ) from None
        raise
    embed = getattr(model, "patch_embed", None)  # timm's PatchEmbed: ViT, DeiT, Swin, EVA, ...
    size = getattr(embed, "img_size", None)
    if size is not None and getattr(embed, "strict_img_size", False) and tuple(size) != (cfg.data.img_size,) * 2:
        raise ConfigError(
            f"{m.name} is built for {size[0]}x{size[1]} images but data.img_size={cfg.data.img_size}; set "
            f"model.kwargs img_size: {cfg.data.img_size} (or data.img_size {size[0]})"
        )
    if m.grad_checkpointing:
        try:
            model.set_grad_checkpointing(True)
        except (AttributeError, NotImplementedError, AssertionError) as e:
            raise ConfigError(f"{m.name} has no activation checkpointing (model.grad_checkpointing): {e!r}") from None
    if m.checkpoint and initial_weights:
        missing, unexpected = checkpoint.load_pretrained(model, m.checkpoint)
        log(f"loaded {m.checkpoint}: {len(missing)} missing keys {missing[:8]}")
        if unexpected:
            log(f"  {len(unexpected)} unexpected keys {unexpected[:8]}")
    return model


def build_criterion(cfg: Config, mixup: bool):
    a = cfg.aug
    if a.bce:
        return BinaryCrossEntropy(smoothing=0.0 if mixup else a.smoothing, target_threshold=a.bce_target_thresh)
    if mixup:
        return SoftTargetCrossEntropy()  # mixup already smoothed the targets
    return LabelSmoothingCrossEntropy(a.smoothing) if a.smoothing > 0 else torch.nn.CrossEntropyLoss()


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, steps_per_epoch: int, peak_lr: float, warn: bool):
    """timm's scheduler of ``cfg.sched``, stepped per optimizer step; with ``warn``, a warning for a schedule
    that cannot do what it says (a warm-up as long as the run, decays past its end, a floor above the peak)."""
    sched = cfg.sched
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=sched.name,
        num_epochs=sched.epochs,
        warmup_epochs=sched.warmup_epochs,
        warmup_lr=sched.warmup_lr,
        min_lr=sched.min_lr,
        decay_epochs=sched.decay_epochs,
        decay_milestones=list(sched.decay_milestones),
        decay_rate=sched.decay_rate,
        step_on_epochs=False,
        updates_per_epoch=steps_per_epoch,
    )
    if not warn:
        return scheduler
    if sched.warmup_epochs >= sched.epochs:
        warnings.warn(
            f"sched.warmup_epochs={sched.warmup_epochs} is not shorter than sched.epochs={sched.epochs}: the "
            "learning rate never reaches its peak; lower sched.warmup_epochs",
            stacklevel=3,
        )
    decays = {"step": [sched.decay_epochs], "multistep": list(sched.decay_milestones)}.get(sched.name)
    if decays is not None and min(decays, default=sched.epochs) >= sched.epochs:
        key = "decay_epochs" if sched.name == "step" else "decay_milestones"
        value = getattr(sched, key)
        shown = "[" + ", ".join(f"{v:g}" for v in value) + "]" if isinstance(value, (list, tuple)) else f"{value:g}"
        warnings.warn(
            f"sched.{key}={shown} is not within sched.epochs={sched.epochs}: the {sched.name} schedule never "
            f"lowers the learning rate; set sched.{key}",
            stacklevel=3,
        )
    if sched.min_lr > peak_lr and sched.name in ("cosine", "tanh", "poly"):
        warnings.warn(
            f"sched.min_lr={sched.min_lr:g} is above the peak learning rate {peak_lr:.3g}: the {sched.name} "
            "schedule would raise the rate as it goes; lower sched.min_lr",
            stacklevel=3,
        )
    return scheduler
