"""The ``README.md`` of an exported folder: a Hugging Face model card saying what the model is, how it was trained and
evaluated (from the run's checkpoint and metrics) and how to load it."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import torch

from .config import Config

METHODS = {"mask": "MaskSub", "dropout": "DropSub", "droppath": "PathSub", "none": "plain training"}
PRETRAINING = {"dmjd": "DMJD masked image modelling", "single": "single-view masked image modelling"}


def model_card(
    cfg: Config,
    state: dict,
    checkpoint_path: Path,
    ema: bool,
    model: torch.nn.Module,
    config: dict,
    folder: Path,
    repo: str | None = None,
) -> str:
    """The card's Markdown, with YAML front matter for the Hub (no license: that is the owner's to state), of the
    exported ``config`` (config.json's content); its code loads the Hub repository ``repo`` if one is given."""
    s, d, o = cfg.sub, cfg.data, cfg.optim
    classes, args = config.get("label_names", []), {k: v for k, v in config["model_args"].items() if k != "in_chans"}
    position = state.get("position") or {}
    method = METHODS.get(s.kind, s.kind)
    if s.kind != "none":
        method += f", ratio {s.ratio:g}"
    if cfg.train.linprobe:
        method = "linear probe of a frozen encoder (its BatchNorm head folded into the linear layer)"
    if not classes:  # a pretraining run's encoder
        p = cfg.pretrain
        method = (
            f"{PRETRAINING.get(p.method, p.method)} ({p.target} targets, {p.corruption:g} of the patches corrupted)"
        )
    lr = f"lr {o.lr:g}" if o.lr is not None else f"base lr {o.base_lr:g} (per 256 images)"
    shown = ", ".join(map(str, classes[:10])) + (", ..." if len(classes) > 10 else "")
    details = [
        f"- **Architecture:** `{config['architecture']}` (timm) with "
        + (json.dumps(args) if args else "its default arguments"),
        f"- **Parameters:** {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M",
        f"- **Classes:** {len(classes)} ({shown})"
        if classes
        else f"- **Output:** {model.num_features} pooled features (a pretrained backbone, no classifier)",
        f"- **Input:** {d.in_chans}x{d.img_size}x{d.img_size}; the preprocessing is in `config.json`",
        f"- **Training:** {method}; recipe `{cfg.recipe}`, {position.get('epoch', '?')} of {cfg.sched.epochs} epochs "
        f"({position.get('global_step', '?')} optimizer steps), {o.name} at {lr}, batch {d.batch_size} per process, "
        f"seed {cfg.train.seed}",
        f"- **Weights:** the {'EMA' if ema else 'trained'} weights of `{checkpoint_path.name}`",
    ]
    if classes:
        details += [
            f"- **Data:** `{d.name}`, evaluated on its `{d.val_split}` split",
            f"- **Accuracy:** {_accuracy(checkpoint_path, position, ema)}",
        ]
    else:
        details += [
            f"- **Data:** `{d.name}`, its `{d.train_split}` split, without labels",
            "- **Accuracy:** none measured in pretraining: a linear probe (`masksub linprobe`) or finetuning judges it",
        ]
    ours = "import masksub  # registers its models with timm\n" if type(model).__module__.startswith("masksub") else ""
    image = f'transform(Image.open("image.png").convert("{"RGB" if d.in_chans == 3 else "L"}"))[None]'
    if classes:
        last = f"""probs = model({image}).softmax(-1)[0]
names = model.pretrained_cfg["label_names"]
print([(names[i], round(p.item(), 4)) for p, i in zip(*probs.topk(min(5, len(names))))])"""
    else:
        last = f"""features = model({image})  # (1, {model.num_features})
print(features.shape)"""
    source = f"hf-hub:{repo}" if repo else f"local-dir:{folder.name}"
    comment = f'  # or "local-dir:{folder.name}", the folder' if repo else '  # "hf-hub:<user>/<name>" once uploaded'
    usage = f"""```python
import torch
import timm
from PIL import Image
from timm.data import create_transform, resolve_data_config
{ours}
model = timm.create_model("{source}", pretrained=True).eval(){comment}
transform = create_transform(**resolve_data_config(model=model))
with torch.no_grad():
{textwrap.indent(last, "    ")}
```

timm before 1.0.26 opens a local folder's `model.safetensors` with `torch.load` and fails: there, add
`pretrained_cfg_overlay=dict(source="", file="{folder.name}/model.safetensors")` to `create_model`.
"""
    if not classes:
        usage += (
            f"\nFinetuned as a classifier by masksub: `masksub train --model.name {source} "
            "--model.kwargs '{pretrained: true}' --data.dir <images>` (the head is new).\n"
        )
    front = "---\ntags:\n- image-classification\n- timm\n- masksub\n"
    front += "library_name: timm\npipeline_tag: image-classification\n---\n"
    name = f"`{config['architecture']}`"
    if classes:
        intro = f"{name} for {len(classes)} classes, trained with masksub ({METHODS.get(s.kind, s.kind)})."
    else:
        intro = f"{name} pretrained with masksub ({PRETRAINING.get(cfg.pretrain.method, 'pretraining')})."
    return f"{front}# {folder.name}\n\n{intro}\n\n## Model details\n" + "\n".join(details) + f"\n\n## Usage\n{usage}"


def _accuracy(checkpoint_path: Path, position: dict, ema: bool) -> str:
    """The accuracy the run logged at this checkpoint's epoch (metrics.jsonl beside it), if it evaluated there."""
    metrics = checkpoint_path.parent / "metrics.jsonl"
    records = []
    if metrics.is_file():
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    here = (position.get("epoch"), position.get("global_step"))
    at = [r for r in records if (r.get("epoch"), r.get("step")) == here]
    top1 = at[-1].get("ema_top1" if ema else "top1") if at else None
    if top1 is None:
        return "not evaluated at this checkpoint (`masksub eval` measures it)"
    top5 = None if ema else at[-1].get("top5")
    return f"top-1 {top1:.2f}%" + (f", top-5 {top5:.2f}%" if top5 is not None else "") + " on the evaluation split"
