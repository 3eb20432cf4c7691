"""Fashion-MNIST held on the training device and augmented there, a batch at a time.

For small images the per-sample PIL pipeline and worker processes cost more than the model; with
``data.on_device=true`` the whole data set (47 MB) sits on the device and each batch is cropped,
flipped, resized and normalized in a few tensor operations. Batch ``b`` of epoch ``e`` is augmented
under a generator seeded by ``(seed, e, b)``, so a resumed run sees exactly the same batches.

Augmentations (the trainer's ``aug.preset``): ``none``; ``simple``, a zero-padded random crop and a
flip; ``pretrain``, a random-resized crop (scale 0.2-1, aspect 3/4-4/3, torchvision's sampling rule)
and a flip, resampled bilinearly with torchvision's ``roi_align`` (the per-sample PIL path resamples
bicubically).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.data import Sampler
from torchvision.ops import roi_align

AUGMENTS = ("none", "simple", "pretrain")


def random_resized_boxes(
    n: int,
    height: int,
    width: int,
    g: torch.Generator,
    device: torch.device,
    scale: tuple = (0.2, 1.0),
    ratio: tuple = (3 / 4, 4 / 3),
    tries: int = 10,
) -> torch.Tensor:
    """``n`` crop boxes ``(top, left, h, w)`` drawn as torchvision's ``RandomResizedCrop`` draws one.

    Each sample takes the first of ``tries`` draws (area fraction uniform in ``scale``, log aspect
    ratio uniform in ``ratio``) that fits the image, else the centred crop of the whole image with
    the aspect ratio clamped to ``ratio``.
    """
    area = height * width
    frac = torch.empty(n, tries, device=device).uniform_(*scale, generator=g)
    aspect = torch.empty(n, tries, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=g).exp()
    w = torch.sqrt(area * frac * aspect).round()
    h = torch.sqrt(area * frac / aspect).round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.int().argmax(1, keepdim=True)  # index of the first draw that fits (0 if none)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    if width / height < ratio[0]:
        fw, fh = width, round(width / ratio[0])
    elif width / height > ratio[1]:
        fw, fh = round(height * ratio[1]), height
    else:
        fw, fh = width, height
    none_fits = ~fits.any(1)
    w, h = torch.where(none_fits, fw, w), torch.where(none_fits, fh, h)
    u = torch.rand(n, 2, device=device, generator=g)
    top = torch.where(none_fits, (height - fh) // 2, (u[:, 0] * (height - h + 1)).floor())
    left = torch.where(none_fits, (width - fw) // 2, (u[:, 1] * (width - w + 1)).floor())
    return torch.stack([top, left, h, w], 1)


def crop_resize(x: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Sample ``i``'s box ``(top, left, h, w)`` of ``x`` (B, C, H, W), resized to ``size`` x ``size``.

    Bilinear at pixel centres (as ``F.interpolate(align_corners=False)``), averaging several samples
    per output pixel where the box shrinks.
    """
    top, left, h, w = boxes.to(x.dtype).unbind(1)
    index = torch.arange(x.shape[0], device=x.device, dtype=x.dtype)
    rois = torch.stack([index, left, top, left + w, top + h], 1)  # (batch index, x1, y1, x2, y2)
    return roi_align(x, rois, output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)


class DeviceBatches:
    """Iterates ``(x, y)`` batches of ``sampler``'s indices from uint8 images kept on ``device``."""

    def __init__(
        self,
        images: torch.Tensor,  # (N, H, W) uint8
        labels: torch.Tensor,  # (N,)
        sampler: Sampler,
        batch_size: int,
        *,
        img_size: int,
        in_chans: int,
        mean: tuple,
        std: tuple,
        augment: str,
        hflip: float,
        seed: int,
        device: torch.device,
        drop_last: bool,
    ):
        if augment not in AUGMENTS:
            raise ValueError(f"augment must be one of {AUGMENTS}, got {augment!r}")
        self.images = images.to(device).unsqueeze(1)  # (N, 1, H, W)
        self.labels = labels.to(device)
        self.sampler, self.batch_size, self.drop_last = sampler, batch_size, drop_last
        self.img_size, self.in_chans, self.augment, self.hflip, self.seed = img_size, in_chans, augment, hflip, seed
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1)
        self.device = device

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        keys = list(self.sampler)
        if not keys:
            return
        epoch = keys[0][0] if isinstance(keys[0], tuple) else 0
        index = torch.tensor([k[1] if isinstance(k, tuple) else k for k in keys], device=self.device)
        first = getattr(self.sampler, "start", 0) // self.batch_size  # absolute batch number after a resume
        for b in range(len(self)):
            idx = index[b * self.batch_size : (b + 1) * self.batch_size]
            x = self.images[idx].float() / 255.0  # (B, 1, H, W)
            if self.augment != "none":
                g = torch.Generator(device=self.device)
                g.manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + first + b)
                x = self._crop(x, g) if self.augment == "simple" else self._resized_crop(x, g)
                x = self._flip(x, g)
            if x.shape[-1] != self.img_size:
                x = F.interpolate(x, size=self.img_size, mode="bilinear", antialias=True, align_corners=False)
            if self.in_chans == 3:
                x = x.expand(-1, 3, -1, -1)
            yield (x - self.mean) / self.std, self.labels[idx]

    def _crop(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Zero-padded random crop (padding size // 8), per sample."""
        b, _, h, w = x.shape
        pad = max(1, h // 8)
        padded = F.pad(x, (pad, pad, pad, pad))  # (B, 1, H + 2p, W + 2p)
        oy = torch.randint(0, 2 * pad + 1, (b, 1), generator=g, device=x.device)
        ox = torch.randint(0, 2 * pad + 1, (b, 1), generator=g, device=x.device)
        rows = (oy + torch.arange(h, device=x.device)).unsqueeze(-1)  # (B, H, 1)
        cols = (ox + torch.arange(w, device=x.device)).unsqueeze(1)  # (B, 1, W)
        return padded[torch.arange(b, device=x.device).view(b, 1, 1), 0, rows, cols].unsqueeze(1)  # (B, 1, H, W)

    def _resized_crop(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return crop_resize(x, random_resized_boxes(x.shape[0], x.shape[2], x.shape[3], g, x.device), self.img_size)

    def _flip(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        flip = torch.rand(x.shape[0], generator=g, device=x.device) < self.hflip
        return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
