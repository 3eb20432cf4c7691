"""Labels of a flat evaluation split from a file (``data.val_labels``): ImageNet's validation images come in one
folder or tar, with their classes listed elsewhere.

Two formats:

- a ``.csv`` file, with a header row or without: the first column names an image, the second its class (Kaggle's
  ``LOC_val_solution.csv``: ``ImageId,PredictionString``, whose class is the first word, boxes following);
- any other file: whitespace-separated text, each line ``<image> <class>`` (Caffe's ``val.txt``) or ``<class>``
  alone, the classes of the split's images in the order of their names (TF-slim's
  ``imagenet_2012_validation_synset_labels.txt``).

An image is named by its path in the split, its file name or its file name without the extension. A class is one
of the training split's class names, or, where no class name is a number, its index among them (Caffe's
``val.txt`` counts the sorted WordNet ids from 0). Every image must be labelled, and every line must label one.
"""

from __future__ import annotations

import csv
import os
from collections import defaultdict
from pathlib import Path

from .config import ConfigError


def read_labels(path: str | os.PathLike, images: list[str], classes: list[str], where: str) -> list[int]:
    """The label (index into ``classes``) of each of ``images`` (their paths in the split, ``/``-separated, in
    natural order), read from ``path``; ``where`` names the split in errors."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"data.val_labels: no such file {path}; name the file that labels {where}'s images")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"data.val_labels: cannot read {path} as text ({e})") from e
    keys = defaultdict(set)  # every name an image answers to -> the images answering to it
    for i, image in enumerate(images):
        base = image.rsplit("/", 1)[-1]
        for key in (image, base, os.path.splitext(base)[0]):
            keys[key].add(i)
    if path.suffix.lower() == ".csv":
        lines = [(n, row) for n, row in enumerate(csv.reader(text.splitlines()), 1) if any(c.strip() for c in row)]
        if lines and _name(lines[0][1][0]) not in keys:  # a header row (file,label; ImageId,PredictionString)
            lines = lines[1:]
        lines = [(n, (row[0].strip(), row[1].strip() if len(row) > 1 else "")) for n, row in lines]
    else:
        lines = [(n, tuple(line.split(None, 1))) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise ConfigError(f"data.val_labels: {path} lists no labels")
    lookup = _Classes(classes, path)
    if all(len(pair) == 1 for _, pair in lines):  # classes alone, in the images' order
        if len(lines) != len(images):
            raise ConfigError(
                f"data.val_labels: {path} lists {len(lines)} classes, one per line in the order of the images' "
                f"names, and {where} holds {len(images)} images; give the file of this split, or name each image "
                "on its line (<image> <class>)"
            )
        return [lookup(pair[0], n) for n, pair in lines]
    return _by_name(lines, images, keys, lookup, path, where)


def _name(written: str) -> str:
    return written.strip().replace("\\", "/").removeprefix("./")


def _by_name(lines, images: list[str], keys: dict, lookup, path: Path, where: str) -> list[int]:
    labels: list[int | None] = [None] * len(images)
    unknown = []
    for n, pair in lines:
        if len(pair) < 2 or not pair[1]:
            raise ConfigError(f"data.val_labels: {path}, line {n}: {pair[0]!r} has no class; write <image> <class>")
        name = _name(pair[0])
        found = keys.get(name, set())
        if len(found) > 1:
            raise ConfigError(
                f"data.val_labels: {path}, line {n}: {name!r} names {len(found)} images of {where}; "
                "name it by its path in the split"
            )
        if not found:
            unknown.append(name)
            continue
        i = next(iter(found))
        if labels[i] is not None:
            raise ConfigError(f"data.val_labels: {path}, line {n}: {images[i]} is labelled twice")
        labels[i] = lookup(pair[1], n)
    if unknown:
        raise ConfigError(
            f"data.val_labels: {path} labels {len(unknown)} image(s) that {where} lacks "
            f"({', '.join(unknown[:3])}{', ...' if len(unknown) > 3 else ''}); give the file of this split"
        )
    missing = [images[i] for i, label in enumerate(labels) if label is None]
    if missing:
        raise ConfigError(
            f"data.val_labels: {path} leaves {len(missing)} image(s) of {where} unlabelled "
            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); every image needs a line"
        )
    return labels


class _Classes:
    """A class as written in the file -> its index among the training split's classes."""

    def __init__(self, classes: list[str], path: Path):
        self.index = {c: i for i, c in enumerate(classes)}
        self.numbered = not any(c.strip().isdigit() for c in classes)  # numbers are indices, not names
        self.count, self.path, self.example = len(classes), path, ", ".join(classes[:3])

    def __call__(self, written: str, line: int) -> int:
        written = written.strip()
        if written in self.index:
            return self.index[written]
        first = written.split(None, 1)[0] if written else ""
        if first in self.index:  # the class then more (Kaggle's PredictionString: boxes)
            return self.index[first]
        if self.numbered and first.isdigit() and int(first) < self.count:
            return int(first)
        numbers = f" or an index below {self.count}" if self.numbered else ""
        raise ConfigError(
            f"data.val_labels: {self.path}, line {line}: class {written!r} is not one the training split has "
            f"(its {self.count} classes: {self.example}, ...){numbers}"
        )
