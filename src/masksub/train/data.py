"""Data sets, samplers and loaders for the trainer (the per-sample transforms: ``transforms.py``).

Every training sample is augmented under its own seed, derived from
``(seed, epoch, index)``. Augmentation therefore does not depend on the number
of workers or processes, and a run resumed in the middle of an epoch sees
exactly the images, crops and flips the uninterrupted run saw.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timm.data import Mixup
from timm.data.distributed_sampler import RepeatAugSampler
from timm.utils.misc import natural_key
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from .. import data as fmnist
from .config import Config, ConfigError
from .device_data import AUGMENTS, DeviceBatches
from .images import CorruptImageError, read_image
from .interrupt import loader_worker_init
from .labels import read_labels
from .sources import HfDataset, TarImages, TorchVision, source, spread_subset
from .transforms import build_transforms, mean_std

_logger = logging.getLogger("masksub")


class FashionMNIST(Dataset):
    """Fashion-MNIST from its IDX files, as PIL images (grey, or grey repeated to RGB)."""

    def __init__(self, split: str, data_dir: str | None, in_chans: int, subset: int | None = None):
        self.images, self.targets = fmnist.load_fashion_mnist(fmnist.SPLIT_NAMES[split], data_dir)
        if subset:
            self.images, self.targets = self.images[:subset], self.targets[:subset]
        self.mode = "RGB" if in_chans == 3 else "L"
        self.classes = list(fmnist.CLASSES)
        self.num_classes = len(self.classes)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        img = Image.fromarray(self.images[index].numpy(), mode="L")
        return (img.convert("RGB") if self.mode == "RGB" else img), int(self.targets[index])


EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".ppm", ".pgm")  # read with PIL


def walk_images(top: str):
    """``(folder, image file names)`` of every folder under ``top``, at any depth; hidden folders and files skipped."""
    for folder, subdirs, files in os.walk(top, followlinks=True):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        yield folder, [f for f in files if not f.startswith(".") and os.path.splitext(f)[1].lower() in EXTENSIONS]


def find_images(root: Path) -> tuple[list[tuple[str, str]], list[str]]:
    """``(path, class)`` of every image under ``root/<class>/``, at any depth (the class is the folder right
    under ``root``, as torchvision's ImageFolder has it), in natural order; and the images lying in ``root``.

    Hidden folders and files (``.ipynb_checkpoints``, macOS ``._*`` forks) are skipped. timm's folder reader
    labels an image by its innermost folder instead: ``train/cat/.ipynb_checkpoints/*`` became a class of its
    own, and ``cat/a/*`` and ``dog/a/*`` one class ``a``.
    """
    top, samples, loose = str(root), [], []
    for folder, images in walk_images(top):
        if folder == top:
            loose += images
        elif images:
            label = os.path.relpath(folder, top).split(os.sep, 1)[0]
            samples += [(os.path.join(folder, f), label) for f in images]
    samples.sort(key=lambda sample: natural_key(sample[0]))
    return samples, loose


class ImageFolder(Dataset):
    """``root/<class>/<image>`` (``find_images``); unreadable images are reported by path.

    ``subset`` keeps that many images spread evenly over the classes; ``class_map`` (class name -> label)
    labels the images as another split does, leaving out classes it lacks. ``labels`` (a file, ``read_labels``)
    labels a flat folder's images instead, by the classes of ``class_map``."""

    def __init__(
        self,
        root: Path,
        corrupt: str,
        in_chans: int,
        subset: int | None = None,
        class_map: dict | None = None,
        labels: str | None = None,
    ):
        if not root.is_dir():
            splits = sorted(p.name for p in root.parent.iterdir() if p.is_dir()) if root.parent.is_dir() else []
            there = f" ({root.parent} holds {', '.join(splits)}: name yours with data.train_split / data.val_split)"
            raise FileNotFoundError(
                f"image folder {root} does not exist{there if splits else ''}; data.dir must hold "
                "<split>/<class>/<image> folders (ImageNet layout), e.g. data.dir=/data/imagenet with train/ and val/"
            )
        found, loose = find_images(root)
        self.folders = sorted({c for _, c in found}, key=natural_key)  # the class folders found, mapped or not
        if class_map is None:
            class_map = {c: i for i, c in enumerate(self.folders)}
        if labels is not None:
            found = _flat(root, found, loose, labels, sorted(class_map, key=class_map.get))
        elif loose:
            flat = (
                ""
                if found
                else " (ImageNet's validation images come in one folder: sort them into class folders, or name the "
                "file of their classes as data.val_labels)"
            )
            raise FileNotFoundError(
                f"{root} holds {len(loose)} image file(s) outside a class folder (e.g. {loose[0]}); "
                f"put each image in <class>/ sub-folders (the folder name is the label){flat}"
            )
        else:
            found = [(path, class_map[c]) for path, c in found if c in class_map]
        if not found and not self.folders:
            raise FileNotFoundError(
                f"no images found under {root}: expected <class>/<image> sub-folders with files ending in "
                f"{', '.join(EXTENSIONS)} (any case)"
            )
        self.samples = [found[i] for i in spread_subset(len(found), subset)]
        self.corrupt, self.mode = corrupt, "RGB" if in_chans == 3 else "L"
        self.length = len(self.samples)
        self.class_to_idx: dict = dict(class_map)
        self.classes = sorted(self.class_to_idx, key=self.class_to_idx.get)  # the class folders, by label
        self.num_classes = len(self.class_to_idx) or None
        self.reported: set[str] = set()

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        if not 0 <= index < self.length:  # iteration ends here, and a wrong index is not taken for another
            raise IndexError(f"index {index} is out of range for {self.length} images")
        for attempt in range(self.length):
            path, target = self.samples[(index + attempt) % self.length]
            img = read_image(path, path, self.corrupt, self.reported)
            if img is not None:
                return img.convert(self.mode), int(target)
        raise CorruptImageError(f"no readable image in {self.length} files")


def _flat(root: Path, found: list, loose: list[str], labels: str, classes: list[str]) -> list[tuple[str, int]]:
    """``(path, label)`` of the images lying in ``root`` (a folder without class folders), labelled by the file
    ``labels`` (``data.val_labels``) with the indices of ``classes``."""
    if found:
        raise ConfigError(
            f"{root} holds class folders, which label its images; data.val_labels labels a folder of images without "
            "them: unset it"
        )
    if not loose:
        raise FileNotFoundError(f"no images found in {root}, which data.val_labels labels")
    images = sorted(loose, key=natural_key)
    return list(zip([str(root / f) for f in images], read_labels(labels, images, classes, str(root))))


class Augmented(Dataset):
    """Applies ``transform`` under a per-sample seed; keys are ``(epoch, index)`` or plain indices."""

    def __init__(self, base: Dataset, transform, seed: int):
        self.base, self.transform, self.seed = base, transform, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        img, target = self.base[index]
        sample_seed = (self.seed * 1_000_003 + epoch) * 10_000_019 + index
        # Seed locally and restore: in the main process (workers=0) the global streams must not move.
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed)
            random.seed(sample_seed)
            np.random.seed(sample_seed % 2**32)
            try:
                img = self.transform(img)
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)
        return img, target


class EpochSampler(Sampler):
    """Yields ``(epoch, index)`` keys from a per-epoch deterministic sampler, from a start offset."""

    def __init__(self, base: Sampler):
        self.base, self.epoch, self.start = base, 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start
        self.base.set_epoch(epoch)

    def __iter__(self):
        for i, index in enumerate(self.base):
            if i >= self.start:
                yield (self.epoch, int(index))

    def __len__(self) -> int:
        return len(self.base) - self.start


class ShardSampler(Sampler):
    """Evaluation shard of this rank, without the padding that would count samples twice."""

    def __init__(self, n: int, rank: int, world: int):
        self.indices = list(range(rank, n, world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def build_datasets(cfg: Config, evaluation: bool = True):
    """The training split and the evaluation split (None without ``evaluation``: pretraining reads no labels
    and evaluates nothing, so its data needs no evaluation split)."""
    d = cfg.data
    kind = source(d.name)
    if kind == "fashion_mnist":
        train = FashionMNIST(d.train_split, d.dir, d.in_chans, d.train_subset)
    elif kind == "folder":
        train = ImageFolder(_folder(cfg) / d.train_split, d.corrupt, d.in_chans, d.train_subset)
    else:  # pretraining reads no labels: a Hugging Face data set may have none
        train = _named(cfg, d.train_split, d.train_subset, labelled=evaluation)
    return train, build_eval_dataset(cfg, train.classes) if evaluation else None


def build_eval_dataset(cfg: Config, classes: list[str]) -> Dataset:
    """The evaluation split, labelled as ``classes`` (the training split's class names by label)."""
    d = cfg.data
    kind = source(d.name)
    if kind == "fashion_mnist":
        return FashionMNIST(d.val_split, d.dir, d.in_chans, d.eval_subset)
    if kind != "folder":
        return _named(cfg, d.val_split, d.eval_subset, classes)
    root = _folder(cfg) / d.val_split
    # labelled by the training split's class indices (each split alone would number its own folders)
    val = ImageFolder(root, d.corrupt, d.in_chans, d.eval_subset, {c: i for i, c in enumerate(classes)}, d.val_labels)
    extra = sorted(set(val.folders) - set(classes), key=natural_key)
    if extra:
        raise ConfigError(
            f"{root} has {len(extra)} class folder(s) the model has no output for "
            f"({', '.join(extra[:5])}{', ...' if len(extra) > 5 else ''}): {d.train_split}/ lacks them (or, for an "
            "exported model, its config.json's label_names); remove them, or add them to the training split"
        )
    return val


def _named(
    cfg: Config, split: str, subset: int | None, classes: list[str] | None = None, labelled: bool = True
) -> Dataset:
    """A split of a data set timm opens (``torch/...``, ``hfds/...``, ``tar``); ``classes`` given, the evaluation
    split."""
    d = cfg.data
    if source(d.name) == "torch":
        return TorchVision(d.name, d.dir, split, d.in_chans, subset, classes, d.download)
    if d.name == "tar":
        labels = d.val_labels if classes is not None else None
        return TarImages(d.dir, split, d.in_chans, subset, classes, d.corrupt, labels)
    label_key = d.label_key if labelled else None
    return HfDataset(d.name, d.dir, split, d.in_chans, subset, classes, d.image_key, label_key, d.corrupt)


def _folder(cfg: Config) -> Path:
    if not cfg.data.dir:
        raise ConfigError("data.name=folder needs data.dir (a folder with train/ and val/ class sub-folders)")
    return Path(cfg.data.dir).expanduser()


@dataclass
class Loaders:
    train: DataLoader
    val: DataLoader | None  # None for pretraining
    sampler: EpochSampler
    mixup: Mixup | None
    num_classes: int
    batches_per_epoch: int  # micro-batches of each process
    steps_per_epoch: int  # optimizer steps: the last one's window is shorter when accum_steps does not divide


def build_loaders(cfg: Config, model, train_set, val_set, rank: int, world: int, device: torch.device) -> Loaders:
    d, a = cfg.data, cfg.aug
    if a.repeated_aug:
        # timm (like DeiT) rounds each epoch down to a multiple of 256 images; below that, use them all.
        rounding = 256 if len(train_set) >= 256 * world else 0
        base = RepeatAugSampler(
            train_set, num_replicas=world, rank=rank, num_repeats=a.repeated_aug, selected_round=rounding
        )
    else:
        base = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=cfg.train.seed)
    sampler = EpochSampler(base)
    # An own generator: creating an iterator must not draw from the global stream (masks, dropout).
    loader_rng = torch.Generator().manual_seed(cfg.train.seed)
    # per-sample PIL transforms, training and evaluation (the on-device path has its own)
    transforms = None if _on_device(cfg) else build_transforms(cfg, model)
    val = None
    if val_set is not None:
        val = build_eval_loader(cfg, model, val_set, rank, world, device, loader_rng, transforms and transforms[1])
    if d.on_device and d.name == "fashion_mnist" and not _on_device(cfg):
        # a speed option: where it does not apply, the per-sample loader takes over. Said for another
        # augmentation preset only: other data sets (a Fashion-MNIST recipe's on folder data) never have it.
        _logger.warning(
            "data.on_device applies to data.name=fashion_mnist with aug.preset %s; aug.preset=%s uses the "
            "per-sample loader (data.workers=%d)",
            " / ".join(AUGMENTS),
            a.preset,
            d.workers,
        )
    if transforms is None:
        train = DeviceBatches(
            train_set.images,
            train_set.targets,
            sampler,
            d.batch_size,
            augment=a.preset,
            drop_last=True,
            **_device_settings(cfg, model, device),
        )
    else:
        train = DataLoader(
            Augmented(train_set, transforms[0], cfg.train.seed),
            batch_size=d.batch_size,
            sampler=sampler,
            drop_last=True,
            **_loader_settings(cfg, device, loader_rng),
        )
    return _finish(cfg, train_set, train, val, sampler, len(base))


def build_eval_loader(
    cfg: Config, model, val_set, rank: int, world: int, device: torch.device, generator=None, transform=None
):
    """Batches of ``val_set``, sharded over ``world`` processes, in order, without augmentation
    (``transform``: the evaluation transform of ``build_transforms``, when the caller made it already)."""
    sampler = ShardSampler(len(val_set), rank, world)
    if _on_device(cfg):
        settings = _device_settings(cfg, model, device)
        return DeviceBatches(
            val_set.images,
            val_set.targets,
            sampler,
            cfg.data.eval_batch_size,
            augment="none",
            drop_last=False,
            **settings,
        )
    generator = generator or torch.Generator().manual_seed(cfg.train.seed)
    return DataLoader(
        Augmented(val_set, transform or build_transforms(cfg, model)[1], 0),
        batch_size=cfg.data.eval_batch_size,
        sampler=sampler,
        **_loader_settings(cfg, device, generator),
    )


def _on_device(cfg: Config) -> bool:
    """Fashion-MNIST kept on the device and augmented there (a preset it implements)."""
    return cfg.data.on_device and cfg.data.name == "fashion_mnist" and cfg.aug.preset in AUGMENTS


def _loader_settings(cfg: Config, device: torch.device, generator: torch.Generator) -> dict:
    # loader_worker_init: a signal to the whole job (Ctrl-C, preemption) stops the run, not a worker
    return dict(
        num_workers=cfg.data.workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        generator=generator,
        worker_init_fn=loader_worker_init,
    )


def _device_settings(cfg: Config, model, device: torch.device) -> dict:
    d, a = cfg.data, cfg.aug
    mean, std = mean_std(cfg, model)
    if a.preset == "pretrain":  # unnormalized, as the per-sample path: HOG targets need the raw pixels
        mean, std = (0.0,) * d.in_chans, (1.0,) * d.in_chans
    return dict(
        img_size=d.img_size, in_chans=d.in_chans, mean=mean, std=std, hflip=a.hflip, seed=cfg.train.seed, device=device
    )


def _finish(cfg: Config, train_set, train, val, sampler, images: int) -> Loaders:
    """``images``: the training images of each process in an epoch (after sharding and repeated augmentation)."""
    d, a = cfg.data, cfg.aug
    batches, accum = images // d.batch_size, cfg.train.accum_steps
    if batches < accum:
        each = f" ({images} in each epoch and process)" if images != len(train_set) else ""
        need = f"{accum} full batches (train.accum_steps)" if accum > 1 else "one full batch"
        raise ConfigError(
            f"{len(train_set)} training images{each} make {batches} batches of {d.batch_size} (data.batch_size), "
            f"fewer than the {need} an optimizer step needs: "
            + (
                f"lower data.batch_size to {images // accum} or less, or use more images"
                if images >= accum
                else f"use {accum} images or more, with data.batch_size 1"
            )
        )
    num_classes = getattr(train_set, "num_classes", None) or 1000
    mixup = None
    if a.mixup > 0 or a.cutmix > 0:
        if d.batch_size % 2:
            raise ConfigError(f"mixup/cutmix needs an even data.batch_size, got {d.batch_size}")
        mixup = Mixup(
            mixup_alpha=a.mixup,
            cutmix_alpha=a.cutmix,
            prob=a.mixup_prob,
            switch_prob=a.switch_prob,
            label_smoothing=a.smoothing,
            num_classes=num_classes,
        )
    steps = -(-batches // cfg.train.accum_steps)
    return Loaders(train, val, sampler, mixup, num_classes, batches, steps)
