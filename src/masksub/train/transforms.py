"""Per-sample transforms of the trainer's presets (none, simple, timm, pretrain) and the normalization
they use."""

from __future__ import annotations

from PIL import Image, ImageOps
from timm.data import auto_augment, create_transform, resolve_data_config
from torchvision import transforms as T

from .. import data as fmnist
from .config import Config

FASHION_MNIST = ("fashion_mnist", "torch/fashion_mnist")  # its statistics; its 28 pixels need no resize (timm reads
# torch/ names in any case)


def mean_std(cfg: Config, model) -> tuple[tuple, tuple]:
    """Per-channel normalization: ``aug.mean``/``aug.std``, else the data set's (Fashion-MNIST, its IDX files' or
    torchvision's), else the model's (each of the two on its own: one set alone keeps the other's default).

    A single value applies to every channel; grey input (``data.in_chans=1``) to a model whose
    pretrained configuration gives RGB statistics is normalized with their average.
    """
    chans = cfg.data.in_chans
    mean, std = cfg.aug.mean, cfg.aug.std
    if mean is None or std is None:
        if cfg.data.name.lower() in FASHION_MNIST:
            default = (fmnist.MEAN,), (fmnist.STD,)
        else:
            resolved = resolve_data_config({}, model=model)
            default = tuple(resolved["mean"]), tuple(resolved["std"])
            if chans == 1:
                default = tuple((sum(v) / len(v),) for v in default)
        mean, std = mean or default[0], std or default[1]
    mean, std = tuple(mean), tuple(std)
    return (mean * chans if len(mean) == 1 else mean), (std * chans if len(std) == 1 else std)


def build_transforms(cfg: Config, model):
    mean, std = mean_std(cfg, model)
    size, a = cfg.data.img_size, cfg.aug
    if a.preset == "none":
        plain = T.Compose(
            ([T.Resize(size)] if size != 28 or cfg.data.name.lower() not in FASHION_MNIST else [])
            + [T.CenterCrop(size), T.ToTensor(), T.Normalize(mean, std)]
        )
        return plain, plain
    if a.preset == "pretrain":  # MAE-style crops; no normalization: HOG targets need the raw pixels
        train = T.Compose(
            [
                T.RandomResizedCrop(size, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                T.RandomHorizontalFlip(a.hflip),
                T.ToTensor(),
            ]
        )
        return train, T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor()])
    if a.preset == "simple":
        resize = [T.Resize(size)] if cfg.data.name.lower() not in FASHION_MNIST or size != 28 else []
        tail = [T.ToTensor(), T.Normalize(mean, std)]
        train = T.Compose(
            resize + [T.RandomCrop(size, padding=max(1, size // 8)), T.RandomHorizontalFlip(a.hflip)] + tail
        )
        return train, T.Compose(resize + [T.CenterCrop(size)] + tail)
    input_size = (cfg.data.in_chans, size, size)
    train = create_transform(
        input_size,
        is_training=True,
        scale=tuple(a.scale),
        hflip=a.hflip,
        color_jitter=a.color_jitter,
        auto_augment=a.auto_augment,
        interpolation=a.interpolation,
        re_prob=a.re_prob,
        mean=mean,
        std=std,
    )
    # 'random' picks one per training image; evaluation resizes one way (bicubic, as timm evaluates then)
    interpolation = "bicubic" if a.interpolation == "random" else a.interpolation
    evaluate = create_transform(
        input_size, is_training=False, interpolation=interpolation, crop_pct=a.crop_pct, mean=mean, std=std
    )
    return _mend_posterize(train), evaluate


def _posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize, whose strongest level keeps 0 bits: a black image, as Pillow gave before 13.0,
    which refuses 0 ("bits must be between or equal to 1 and 8")."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _mend_posterize(transform):
    """Swaps ``_posterize`` into the RandAugment / AutoAugment / AugMix ops of ``transform``.

    With Pillow >= 13, rand-m9-mstd0.5-inc1 (Swin, MAE finetuning) failed on about 1 image in 500 (and
    the v0 policy on 1 in 30): a batch of 128 about one time in four. Only this transform changes, not timm.
    """
    for t in getattr(transform, "transforms", [transform]):
        ops = list(getattr(t, "ops", []))
        for policy in getattr(t, "policy", []):  # AutoAugment: sub-policies of ops
            ops += list(policy)
        for op in ops:
            if getattr(op, "aug_fn", None) is auto_augment.posterize:
                op.aug_fn = _posterize
    return transform
