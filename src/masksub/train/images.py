"""Decoding image files for the trainer's data sets: 16-bit greys scaled to 8 bits, unreadable files skipped
(reported once by name) or refused."""

from __future__ import annotations

import logging
import os

import numpy as np
from PIL import Image

_logger = logging.getLogger("masksub")


class CorruptImageError(RuntimeError):
    pass


_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def _eight_bit(img: Image.Image, path: str) -> Image.Image:
    """16-bit grey images (PNG, TIFF: medical, microscopy, remote sensing) scaled to 8 bits.

    PIL's ``convert("L" | "RGB")`` clips them at 255, which turns almost every pixel white. 32-bit
    integer and float pixels have no agreed range, so they are refused rather than guessed.
    """
    if img.mode in _SIXTEEN_BIT:
        return Image.fromarray((np.asarray(img).astype(np.uint32) >> 8).astype(np.uint8), mode="L")
    if img.mode in ("I", "F"):
        kind = "32-bit integer" if img.mode == "I" else "32-bit float"
        raise CorruptImageError(
            f"image {path} has {kind} pixels (PIL mode {img.mode}), whose range is not known; "
            "masksub reads 8-bit and 16-bit images: convert the data set to 8- or 16-bit PNG"
        )
    return img


def read_image(file, name: str, corrupt: str, reported: set[str]) -> Image.Image | None:
    """The image in ``file`` (a path, or an open binary file, closed here), decoded. An unreadable one gives None
    with ``corrupt="skip"`` (a warning naming it the first time, kept in ``reported``), and a CorruptImageError
    naming it with ``corrupt="error"``."""
    try:
        with open(file, "rb") if isinstance(file, (str, os.PathLike)) else file as f:
            img = Image.open(f)
            img.load()
    except Exception as e:  # PIL raises several types for broken files
        if corrupt == "error":
            raise CorruptImageError(f"cannot read image {name}: {e}; fix or remove it, or set data.corrupt=skip") from e
        if name not in reported:
            reported.add(name)
            _logger.warning("skipping unreadable image %s: %s", name, e)
        return None
    return _eight_bit(img, name)
