"""``masksub export``: a run's trained model as timm writes one for the Hub (``model.safetensors`` and
``config.json`` with the class names and the evaluation preprocessing, and a model card), which
``timm.create_model("local-dir:...")`` and transformers' ``AutoModelForImageClassification`` load without masksub;
a pretraining run's encoder as a backbone without a classifier."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import safetensors.torch
import torch
from timm.models._hub import filter_pretrained_cfg

from . import checkpoint, hub
from .build import create_model
from .config import Config, ConfigError
from .data import build_datasets
from .evaluate import load_run, trained_model
from .model_card import model_card
from .onnx_export import check_installed, write_onnx
from .transforms import mean_std


def export_checkpoint(
    path: Path,
    out: Path,
    ema: bool = False,
    onnx: bool = False,
    report: Callable[[str], None] = print,
    push_to: str | None = None,
    private: bool = False,
) -> Path:
    """Write the plain model of the run checkpoint ``path`` (its EMA weights with ``ema``) into the new folder
    ``out``, checked by loading it back with timm; a linear probe's BatchNorm head is folded into its linear layer.
    ``onnx`` adds ``model.onnx`` (``onnx_export``); ``README.md`` is a model card (``model_card``). ``push_to``
    uploads the folder to that Hub model repository (``hub``; a new one private with ``private``)."""
    path, out = Path(path), Path(out).expanduser()
    if private and not push_to:
        raise ConfigError("--private is for the repository --push-to-hub creates: add --push-to-hub <user>/<name>")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} exists and is not an empty folder: masksub export writes a new one; name another")
    if onnx:
        check_installed()
    if push_to:
        hub.check_push(push_to)
    cfg, state = load_run(path, {}, "export", pretraining=True)
    pretrained = checkpoint.run_command(state) == "pretrain"  # its encoder: a backbone, no classes
    if pretrained and ema:
        raise ConfigError("a pretraining run keeps no EMA weights: leave out --ema")
    classes = [] if pretrained else state.get("classes") or build_datasets(cfg)[0].classes  # older: the split's
    model = trained_model(cfg, state, len(classes), ema)
    if cfg.train.linprobe:
        model.head = fold_probe_head(model.head)
    model.eval()
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"  # renamed into place once written and checked
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        config = _write(model, cfg, tmp, classes, data_config(cfg, model))
        checkpoint_file = path / "last.pt" if path.is_dir() else path
        (tmp / "README.md").write_text(model_card(cfg, state, checkpoint_file, ema, model, config, out, push_to))
        _check(model, tmp, cfg)
        if onnx:
            size = (cfg.data.in_chans, cfg.data.img_size, cfg.data.img_size)
            exporter = write_onnx(model, tmp / "model.onnx", size, "logits" if classes else "features")
        os.replace(tmp, out)
    except OSError as e:  # a full disk, no permission, a folder filled meanwhile
        raise checkpoint.CheckpointWriteError(f"cannot write {out}: {e.strerror or e}; nothing was written") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ours = type(model).__module__.startswith("masksub")  # masksub's ConViT: timm knows it once masksub is imported
    needs = "import masksub (which registers it with timm), then " if ours else ""
    files = "model.safetensors, config.json, README.md" + (f", model.onnx by the {exporter} exporter" if onnx else "")
    what = f"{len(classes)} classes" if classes else "a pretrained backbone without a classifier"
    auto = "AutoModelForImageClassification" if classes else "AutoModel"
    report(
        f"wrote {out} ({files}): {cfg.model.name}, the {'EMA' if ema else 'trained'} weights "
        f"of {path}, {what}, {cfg.data.in_chans}x{cfg.data.img_size}x{cfg.data.img_size} input. "
        f"Load it with {needs}timm.create_model('local-dir:{out}', pretrained=True) (its preprocessing: "
        f"timm.data.resolve_data_config(model=model)) or transformers' (>= 4.53) {auto}.from_pretrained('{out}')"
        + (
            ""
            if classes
            else f"; finetune it with masksub train --model.name local-dir:{out} --model.kwargs '{{pretrained: true}}'"
            + (f" (or hf-hub:{push_to} once pushed)" if push_to else "")
        )
    )
    if push_to:
        hub.push(out, push_to, private, path, report)
    return out


def data_config(cfg: Config, model: torch.nn.Module) -> dict:
    """The run's evaluation transform in timm's terms: resize, centre crop, normalize."""
    a, d = cfg.aug, cfg.data
    mean, std = mean_std(cfg, model)
    timm_preset = a.preset == "timm"  # the others resize to the size and crop it whole, bilinear
    interpolation = ("bicubic" if a.interpolation == "random" else a.interpolation) if timm_preset else "bilinear"
    return {
        "input_size": (d.in_chans, d.img_size, d.img_size),
        "mean": mean,
        "std": std,
        "crop_pct": a.crop_pct if timm_preset else 1.0,
        "crop_mode": "center",
        "interpolation": interpolation,
    }


def fold_probe_head(head: torch.nn.Sequential) -> torch.nn.Linear:
    """A linear probe's head (BatchNorm without affine, then the linear classifier) as one linear layer: the
    same outputs in evaluation mode, and the plain model's layout."""
    norm, linear = head
    with torch.no_grad():
        scale = torch.rsqrt(norm.running_var.double() + norm.eps)
        weight = linear.weight.double() * scale
        bias = linear.bias.double() - weight @ norm.running_mean.double()
        folded = torch.nn.Linear(linear.in_features, linear.out_features, device=linear.weight.device)
        folded.weight.copy_(weight)
        folded.bias.copy_(bias)
    return folded


# Arguments of timm.create_model that load weights or configuration, not the architecture: a local folder's own.
NOT_ARCHITECTURE = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir")
# What timm's configuration says of the weights it publishes (their tag, license, classes, test sizes), not of these.
SOURCE_WEIGHTS = ("tag", "license", "notes", "paper_ids", "paper_name", "origin_url", "pool_size", "test_input_size")
SOURCE_WEIGHTS += ("test_crop_pct", "test_pool_size", "label_names", "label_descriptions", "label_offset")


def _write(model: torch.nn.Module, cfg: Config, folder: Path, classes: list[str], preprocessing: dict) -> dict:
    """``model.safetensors`` and ``config.json`` in timm's layout for the Hub (what ``save_for_hf`` writes, written
    here so every timm release this package takes reads it the same way)."""
    folder.mkdir(parents=True)
    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    safetensors.torch.save_file(weights, folder / "model.safetensors")
    source = {k: v for k, v in model.pretrained_cfg.items() if k != "state_dict"}
    pretrained = filter_pretrained_cfg(source, remove_source=True, remove_null=True)
    for key in SOURCE_WEIGHTS:
        pretrained.pop(key, None)
    pretrained.update(preprocessing, num_classes=model.num_classes, custom_load=False)
    args = _architecture(model, cfg)
    config = {
        "architecture": pretrained.pop("architecture", cfg.model.name),
        "num_classes": model.num_classes,
        "num_features": model.num_features,
        **({"label_names": list(classes)} if classes else {}),  # none: a pretrained backbone
        # not num_classes (the top level's): transformers' timm wrapper passes it next to these, twice a TypeError
        "model_args": args,
        "pretrained_cfg": pretrained,
    }
    if isinstance(getattr(model, "global_pool", None), str) and model.global_pool:
        config["global_pool"] = model.global_pool
    try:
        text = json.dumps(config, indent=2)
    except TypeError as e:
        raise ConfigError(f"model.kwargs of {cfg.model.name} cannot be written as JSON ({e})") from None
    (folder / "config.json").write_text(text)
    mask = os.umask(0)
    os.umask(mask)
    for file in folder.iterdir():  # safetensors writes its file for its owner alone; share it as other files are
        file.chmod(0o666 & ~mask)
    return config


def _architecture(model: torch.nn.Module, cfg: Config) -> dict:
    """The arguments that rebuild the model's architecture: those timm's factory recorded, else (timm before it
    recorded them) the run's ``model.kwargs`` over those of the exported folder it started from."""
    recorded = getattr(model, "_model_args", None)
    if recorded is None:
        name, recorded = cfg.model.name, dict(cfg.model.kwargs)
        if name.startswith("local-dir:") and (Path(name[10:]) / "config.json").is_file():
            recorded = {**json.loads((Path(name[10:]) / "config.json").read_text()).get("model_args", {}), **recorded}
    args = {k: v for k, v in recorded.items() if k not in NOT_ARCHITECTURE and "drop" not in k and k != "num_classes"}
    return {**args, "in_chans": cfg.data.in_chans}


def _check(model: torch.nn.Module, folder: Path, cfg: Config) -> None:
    """The folder, loaded by timm, computes what the run's model computes."""
    try:
        loaded = create_model(f"local-dir:{folder}", pretrained=True).eval()
    except Exception as e:  # an argument missing from config.json: weights of other shapes, say
        raise ConfigError(
            f"timm cannot rebuild {cfg.model.name} from the exported config.json ({type(e).__name__}: {str(e)[:300]}); "
            "nothing was written"
        ) from None
    d = cfg.data
    x = torch.randn(2, d.in_chans, d.img_size, d.img_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = model(x), loaded(x)
    if want.shape != got.shape or not torch.allclose(want, got, rtol=1e-4, atol=1e-5 * want.abs().max().item()):
        raise ConfigError(
            f"timm rebuilds {cfg.model.name} from the exported config.json into another model (outputs differ): an "
            "argument of it is not recorded there; nothing was written"
        )
