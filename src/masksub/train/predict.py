"""``masksub predict``: the top classes of image files by a run's model or an exported folder, printed or written
as a CSV file."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from timm.data import create_transform
from timm.utils.misc import natural_key
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..step import AMP_DTYPES
from . import hub
from .build import resolve_device
from .checkpoint import CheckpointError
from .config import ConfigError
from .data import EXTENSIONS, walk_images
from .evaluate import is_export, load_export, load_run, trained_model
from .images import read_image
from .interrupt import loader_worker_init
from .runlog import write_output
from .transforms import build_transforms


def predict(
    source: Path,
    inputs: list[str],
    topk: int = 5,
    out: Path | None = None,
    batch_size: int = 64,
    ema: bool = False,
    report: Callable[[str], None] = print,
) -> list[dict]:
    """Each readable image's ``topk`` classes with their softmax probabilities, by the model of ``source`` (a run's
    checkpoint or folder, or a folder ``masksub export`` wrote), applying its evaluation transform; unreadable images
    are skipped with a warning. ``out`` gets them as a CSV file (written whole, then renamed into place); without
    it, ``report`` gets one line per image. ``hf-hub:<repo>`` is an exported folder on the Hugging Face Hub."""
    if topk < 1 or batch_size < 1:
        raise ConfigError(f"--topk and --batch-size must be at least 1, got {topk} and {batch_size}")
    model, transform, classes, mode, device, amp = _load(hub.local_folder(source).expanduser(), ema)
    files = find_inputs(inputs)
    k = min(topk, len(classes))
    images = _Images(files, transform, mode)
    rows = []
    workers = min(4, os.cpu_count() or 1)  # Ctrl-C: the main process stops, its workers say nothing
    loader = DataLoader(images, batch_size=batch_size, num_workers=workers, worker_init_fn=loader_worker_init)
    bar = tqdm(total=len(files), desc="predict", unit="img", leave=False, disable=out is None, dynamic_ncols=True)
    with torch.no_grad(), bar:
        for x, index, readable in loader:
            bar.update(len(x))
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                logits = model(x.to(device))
            probs, top = logits.float().softmax(1).topk(k, dim=1)
            for i, p, t, ok in zip(index.tolist(), probs.tolist(), top.tolist(), readable.tolist(), strict=True):
                if ok:
                    rows.append({"image": files[i], "classes": [classes[c] for c in t], "probs": p})
    skipped = len(files) - len(rows)
    if out is not None:
        _write_csv(Path(out).expanduser(), rows, k)
        report(f"wrote the top {k} classes of {len(rows):,} images to {out}" + _skipped(skipped))
    else:
        for row in rows:
            report(f"{row['image']}: " + ", ".join(f"{c} {p:.1%}" for c, p in zip(row["classes"], row["probs"])))
        if skipped:
            report(_skipped(skipped).strip("; "))
    return rows


def _skipped(count: int) -> str:
    return f"; {count} unreadable image(s) skipped (named in the warnings)" if count else ""


def find_inputs(inputs: list[str]) -> list[str]:
    """The image files named, and those under the folders named (hidden ones skipped), each folder's in natural
    order."""
    files = []
    for given in inputs:
        path = Path(given).expanduser()
        if path.is_file():
            files.append(str(path))
        elif path.is_dir():
            found = [os.path.join(folder, name) for folder, names in walk_images(str(path)) for name in names]
            if not found:
                raise FileNotFoundError(f"no images under {path} (files ending in {', '.join(EXTENSIONS)}, any case)")
            files += sorted(found, key=natural_key)
        else:
            raise FileNotFoundError(f"{path}: no such file or folder; name image files or folders of them")
    return files


def _load(source: Path, ema: bool) -> tuple:
    """The model, its evaluation transform, class names, PIL mode, device and autocast type of ``source``."""
    if is_export(source):
        if ema:
            raise ConfigError(f"{source} is an exported model, which holds one set of weights: drop --ema")
        model, names, data = load_export(source, "predict")
        names = names or [str(i) for i in range(model.num_classes)]
        device = resolve_device("auto")
        mode = "RGB" if data["input_size"][0] == 3 else "L"
        return model.to(device), create_transform(**data), names, mode, device, None
    cfg, state = load_run(source, {}, "predict")
    classes = state.get("classes")
    if not classes:
        raise CheckpointError(f"{source} keeps no class names (an older checkpoint): evaluate it with masksub eval")
    model = trained_model(cfg, state, len(classes), ema)
    device = resolve_device(cfg.train.device)
    mode = "RGB" if cfg.data.in_chans == 3 else "L"
    transform = build_transforms(cfg, model)[1]
    return model.eval().to(device), transform, list(classes), mode, device, AMP_DTYPES.get(cfg.train.amp)


class _Images(Dataset):
    def __init__(self, files: list[str], transform, mode: str):
        self.files, self.transform, self.mode = files, transform, mode
        self.reported: set[str] = set()

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        img = read_image(self.files[index], self.files[index], "skip", self.reported)
        if img is None:  # skipped (warned): a blank stands in within the batch, and its row is left out
            return torch.zeros_like(self.transform(Image.new(self.mode, (64, 64)))), index, False
        return self.transform(img.convert(self.mode)), index, True


def _write_csv(path: Path, rows: list[dict], k: int) -> None:
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["image", *[f"{name}_{i}" for i in range(1, k + 1) for name in ("class", "prob")]])
    for row in rows:
        writer.writerow([row["image"], *[v for c, p in zip(row["classes"], row["probs"]) for v in (c, f"{p:.6f}")]])
    write_output(path, text.getvalue())
