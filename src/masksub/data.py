"""Fashion-MNIST from its IDX files, without torchvision's downloader.

Looked for in ``data_dir``, then ``$MASKSUB_FASHION_MNIST``, then
``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist``).
Files may be gzipped (``*.gz``) or not.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np
import torch

ENV_VAR = "MASKSUB_FASHION_MNIST"
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
TORCHVISION_LAYOUT = Path("FashionMNIST", "raw")  # torchvision.datasets.FashionMNIST(root) keeps the files there
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
SPLIT_NAMES = {"train": "train", "test": "test", "val": "test"}  # data.*_split values; "val" (the default) is test
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
MEAN, STD = 0.2860, 0.3530  # of the training images, in [0, 1]


class CorruptDataError(ValueError):
    """A data file that exists but cannot be read as what it should be."""


_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _find_file(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def find_fashion_mnist(data_dir: str | os.PathLike | None = None) -> Path:
    """The first folder holding all four Fashion-MNIST IDX files, or an error saying how to get them."""
    # An explicit folder is the only place looked at (itself, or torchvision's FashionMNIST/raw inside it, which
    # its downloader writes): silently reading other data would mislead.
    given = [Path(data_dir)] if data_dir else [Path(p) for p in (os.environ.get(ENV_VAR),) if p]
    candidates = [path for p in given for path in (p.expanduser(), p.expanduser() / TORCHVISION_LAYOUT)]
    candidates += [] if data_dir else [SYSTEM_DIR]
    for folder in candidates:
        if all(_find_file(folder, stem) for pair in FILES.values() for stem in pair):
            return folder
    tried = ", ".join(str(p) for p in candidates)
    raise FileNotFoundError(
        f"Fashion-MNIST IDX files not found (looked in: {tried}). Install them with "
        "`sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu, to /usr/share/datasets/fashion-mnist), "
        f"or put train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz] and "
        f"t10k-labels-idx1-ubyte[.gz] in a folder and pass it as data_dir or set ${ENV_VAR}."
    )


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (optionally gzipped), checking its header against its size."""
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:  # zlib.error: a damaged compressed stream
        raise CorruptDataError(
            f"cannot read IDX file {path}: {e}; the file is corrupt, re-install or re-download it"
        ) from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise CorruptDataError(f"{path} is not an IDX file (bad magic number); re-install or re-download it")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise CorruptDataError(f"{path}: truncated IDX header; re-install or re-download it")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise CorruptDataError(
            f"{path}: header says shape {shape} ({expected} bytes) but the file has {len(raw)} bytes; "
            "the file is truncated or corrupt, re-install or re-download it"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def load_fashion_mnist(split: str = "train", data_dir: str | os.PathLike | None = None):
    """Images (N, 28, 28) uint8 and labels (N,) int64 as tensors."""
    if split not in FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = find_fashion_mnist(data_dir)
    images_path, labels_path = (_find_file(folder, stem) for stem in FILES[split])
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise CorruptDataError(
            f"{images_path} / {labels_path}: expected images (N, H, W) and N labels, "
            f"got {images.shape} and {labels.shape}"
        )
    if labels.max(initial=0) >= len(CLASSES):
        raise CorruptDataError(f"{labels_path}: labels outside 0..{len(CLASSES) - 1}")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))
