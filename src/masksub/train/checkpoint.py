"""Checkpoints: written atomically, loaded with ``weights_only=True``, RNG states included.

A checkpoint is first written to a temporary file in the same folder, flushed
to disk, then renamed over the old one: a process killed mid-write leaves the
previous checkpoint whole.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import re
import tempfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import safetensors.torch
import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or is not the kind asked for."""


class CheckpointWriteError(OSError):
    """A checkpoint that could not be written (disk full, no permission...); the previous file is untouched."""


def save_atomic(obj: dict, path: str | os.PathLike) -> None:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _write_error(path, e) from e
    try:
        with os.fdopen(fd, "wb") as f, _checksums():
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's file is private (0600); a checkpoint is like any file written
        os.replace(tmp, path)
        _fsync_dir(path.parent)  # the rename itself survives a power cut
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, Exception):  # not KeyboardInterrupt / SystemExit
            raise _write_error(path, e) from e
        raise


def link_atomic(source: str | os.PathLike, path: str | os.PathLike) -> bool:
    """``path`` becomes another name of the file ``source`` (a hard link, renamed over ``path``): a copy that
    costs no writing. False where the file system has no hard links; ``path`` is then unchanged."""
    source, path = Path(source), Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.link.tmp")
    try:
        tmp.unlink(missing_ok=True)
        os.link(source, tmp)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        return False
    _fsync_dir(path.parent)
    return True


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform that cannot open folders (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse to sync a folder; the rename is done either way
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_error(path: Path, error: BaseException) -> CheckpointWriteError:
    # torch.save reports a failed write (ENOSPC...) as a RuntimeError about a zip position, with
    # the OSError that says why as its context: name that one.
    cause = error
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__context__
    reason = cause.strerror if cause is not None and cause.strerror else str(cause or error)
    kept = f"the previous {path.name} is whole and unchanged" if path.is_file() else f"no earlier {path.name} exists"
    out = CheckpointWriteError(f"cannot write checkpoint {path}: {reason} ({kept})")
    out.errno = getattr(cause, "errno", None)
    return out


def load(path: str | os.PathLike) -> dict:
    """A ``torch.save`` file (zip or legacy format) or a ``.safetensors`` file, on the CPU, tensors only."""
    path = Path(path)
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found; pass a checkpoint file or a run folder with last.pt")
    with open(path, "rb") as f:
        head = f.read(4)
    if path.suffix == ".safetensors":
        try:
            return safetensors.torch.load_file(path)
        except Exception as e:
            raise CheckpointError(f"cannot load checkpoint {path}: not a readable safetensors file ({e})") from e
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save's zip, or its legacy pickle
        raise CheckpointError(
            f"cannot load checkpoint {path}: it is not a PyTorch checkpoint (a torch.save or .safetensors file)"
        )
    if head.startswith(b"PK"):
        verify_zip(path)
    try:
        # Memory-mapped: the processes of a node resuming one file share its pages instead of each
        # reading a copy. Files in torch's legacy (pre-zip) format cannot be mapped: read those whole.
        with _safe_globals():
            return torch.load(path, map_location="cpu", weights_only=True, mmap=head.startswith(b"PK"))
    except Exception as e:
        found = re.search(r"WeightsUnpickler error: ([^\n]*)", str(e))
        if found:
            raise CheckpointError(
                f"cannot load checkpoint {path}: it holds Python objects that loading with weights_only=True "
                f"refuses ({found.group(1)[:200]}); if you trust the file, save its weights alone, e.g. "
                f"torch.save(torch.load(path, weights_only=False)['model'], 'weights.pt'), and pass that"
            ) from e
        raise CheckpointError(f"cannot load checkpoint {path}: {e}") from e


def verify_zip(path: Path) -> None:
    """Checks a ``torch.save`` file's records against the CRC-32 checksums it holds: ``torch.load`` reads
    a file with a damaged byte as if it were whole (the tensors silently take the damaged values). A
    file written without checksums (``torch.serialization.set_crc32_options(False)``: all of them 0) is
    taken as it is. One more read of the file, mostly from the page cache."""
    damaged = (
        f"cannot load checkpoint {path}: it is damaged or incomplete (a copy or download cut short, a disk "
        "error); use another copy, or the run folder's other checkpoint (best.pt, last.pt)"
    )
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
            if not any(r.CRC for r in records):
                return
            for record in records:
                with archive.open(record) as f:  # raises at the end of a record whose CRC-32 differs
                    while f.read(1 << 24):
                        pass
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
        raise CheckpointError(f"{damaged}: {e}") from e


@contextlib.contextmanager
def _checksums():
    """CRC-32 checksums in the file while it is written (``load`` checks them), whatever the process set."""
    options = getattr(torch.serialization, "get_crc32_options", None)
    if options is None or options():
        yield
        return
    torch.serialization.set_crc32_options(True)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(False)


def _safe_globals():
    """Allows what timm's train.py, DeiT and MAE put beside the weights: their argparse.Namespace."""
    allow = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
    if allow is not None:
        return allow([argparse.Namespace])
    torch.serialization.add_safe_globals([argparse.Namespace])  # torch 2.4: for the whole process
    return contextlib.nullcontext()


def rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "gauss": (has_gauss, cached)},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], *n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def run_command(state: dict) -> str:
    """The masksub command whose run wrote ``state``: "train" (linprobe runs too) or "pretrain"."""
    if "command" in state:
        return state["command"]
    return "pretrain" if any(k.startswith("decoder") for k in state.get("model", {})) else "train"  # DMJD's


def load_pretrained(model: torch.nn.Module, path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """Initial weights (MAE, CLIP, our own runs) into ``model``; returns (missing, unexpected) keys.

    A masksub pretraining checkpoint (``last.pt``) gives its encoder, as ``encoder.pt`` does.

    Accepts a raw state dict or one under 'model' / 'state_dict' / 'model_state'; timm's
    checkpoint filter of the model's family converts foreign layouts (e.g. MAE, OpenAI CLIP),
    and a classifier head of another size is left at its initialization.
    """
    state = load(path)
    if isinstance(state.get("config"), dict) and run_command(state) == "pretrain":
        # a masksub pretraining checkpoint (last.pt of any epoch): its encoder, as encoder.pt holds it
        state = {k.removeprefix("encoder."): v for k, v in state["model"].items() if k.startswith("encoder.")}
    for key in ("model_state", "model", "state_dict"):
        if isinstance(state.get(key), dict):
            state = state[key]
            break
    state = {k.removeprefix("module.").removeprefix("model."): v for k, v in state.items()}
    module = __import__(type(model).__module__, fromlist=["checkpoint_filter_fn"])
    filter_fn = getattr(module, "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            state = filter_fn(state, model)
        except Exception as e:  # timm's converters assume the family's own layout (a reshape of pos_embed, say)
            raise CheckpointError(
                f"{path} does not convert to the {type(model).__name__} being trained: timm's "
                f"{module.__name__}.checkpoint_filter_fn failed ({type(e).__name__}: {e}); the file holds the weights "
                "of another model or size: set model.name and model.kwargs to the checkpoint's"
            ) from None
    own = model.state_dict()
    mismatched = {k: tuple(v.shape) for k, v in state.items() if k in own and own[k].shape != v.shape}
    fits = [k for k in state if k in own and k not in mismatched]
    # a run from scratch, silently (a head's bias of as many classes fits any model of that many)
    if state and all(_is_classifier(model, k) for k in fits):
        raise CheckpointError(_nothing_fits(path, model, state, own, mismatched, fits))
    for k in mismatched:  # e.g. a 1000-class head loaded into a 10-class model
        del state[k]
    result = model.load_state_dict(state, strict=False)
    return sorted(result.missing_keys), sorted(result.unexpected_keys) + [f"{k} (shape)" for k in mismatched]


def _is_classifier(model: torch.nn.Module, key: str) -> bool:
    """Whether ``key`` belongs to the classifier head (timm's ``pretrained_cfg['classifier']``)."""
    heads = getattr(model, "pretrained_cfg", None) or {}
    heads = heads.get("classifier") or ("head", "fc", "classifier")
    return any(key.startswith(f"{head}.") for head in ((heads,) if isinstance(heads, str) else heads))


def _nothing_fits(path, model: torch.nn.Module, state: dict, own: dict, mismatched: dict, fits: list) -> str:
    text = f"none of the {len(state)} tensors in {path} fits the {type(model).__name__} being trained"
    if fits:
        text += f", the classifier's {', '.join(fits)} aside"
    if mismatched:
        k = next(iter(mismatched))
        text += f" ({len(mismatched)} differ in shape, e.g. {k}: {mismatched[k]} there, {tuple(own[k].shape)} here)"
    else:
        text += f" (no name matches: {next(iter(state))} there, {next(iter(own))} here)"
    return text + "; they are the weights of another model or size: set model.name and model.kwargs to the checkpoint's"
