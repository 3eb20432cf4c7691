"""Fashion-MNIST held on the training device and augmented there, a batch at a time.

For small images the per-sample PIL pipeline and worker processes cost more than the model; with
``data.on_device=true`` the whole data set (47 MB) sits on the device and each batch is cropped,
flipped, resized and normalized in a few tensor operations. Batch ``b`` of epoch ``e`` is augmented
under a generator seeded by ``(seed, e, b)``, so a resumed run sees exactly the same batches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import Sampler


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
        augment: bool,
        hflip: float,
        seed: int,
        device: torch.device,
        drop_last: bool,
    ):
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
            if self.augment:
                g = torch.Generator(device=self.device)
                g.manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + first + b)
                x = self._crop_flip(x, g)
            if x.shape[-1] != self.img_size:
                x = F.interpolate(x, size=self.img_size, mode="bilinear", antialias=True, align_corners=False)
            if self.in_chans == 3:
                x = x.expand(-1, 3, -1, -1)
            yield (x - self.mean) / self.std, self.labels[idx]

    def _crop_flip(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Zero-padded random crop (padding size // 8) and horizontal flip, per sample."""
        b, _, h, w = x.shape
        pad = max(1, h // 8)
        padded = F.pad(x, (pad, pad, pad, pad))  # (B, 1, H + 2p, W + 2p)
        oy = torch.randint(0, 2 * pad + 1, (b, 1), generator=g, device=x.device)
        ox = torch.randint(0, 2 * pad + 1, (b, 1), generator=g, device=x.device)
        rows = (oy + torch.arange(h, device=x.device)).unsqueeze(-1)  # (B, H, 1)
        cols = (ox + torch.arange(w, device=x.device)).unsqueeze(1)  # (B, 1, W)
        x = padded[torch.arange(b, device=x.device).view(b, 1, 1), 0, rows, cols].unsqueeze(1)  # (B, 1, H, W)
        flip = torch.rand(b, generator=g, device=x.device) < self.hflip
        return torch.where(flip.view(b, 1, 1, 1), x.flip(-1), x)
