"""HOG targets for masked image modeling, computed in batch on the images' device.

Per colour channel of the *unnormalized* image: central-difference gradients, unsigned orientation
in [0, pi) hard-assigned to ``bins`` bins weighted by gradient magnitude, summed over ``cell`` x
``cell`` pixel cells; each cell's histogram is standardized (zero mean, unit variance over its
bins). A ``patch`` x ``patch`` token gets its cells' histograms: for 16-pixel patches, 8-pixel
cells and 9 bins, 3 channels x 2 x 2 cells x 9 bins = 108 values, laid out (channel, cell row,
cell column, bin). DMJD picks the cell for its encoder's patch size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class HOGTargets(nn.Module):
    def __init__(self, cell: int = 8, bins: int = 9, patch: int = 16, eps: float = 1e-6):
        super().__init__()
        if patch % cell:
            raise ValueError(f"patch size {patch} must be a multiple of the HOG cell size {cell}")
        self.cell, self.bins, self.patch, self.eps = cell, bins, patch, eps
        kernel = torch.tensor([[0.0, 0.0, 0.0], [-1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
        self.register_buffer("kernel", torch.stack([kernel, kernel.t()]).unsqueeze(1), persistent=False)

    def dim(self, channels: int = 3) -> int:
        return channels * (self.patch // self.cell) ** 2 * self.bins

    def cells(self, images: torch.Tensor) -> torch.Tensor:
        """Standardized cell histograms (B, C, bins, H / cell, W / cell)."""
        b, c, h, w = images.shape
        if h % self.patch or w % self.patch:
            raise ValueError(f"image size {h}x{w} is not divisible by the patch size {self.patch}")
        x = F.pad(images.float().reshape(b * c, 1, h, w), (1, 1, 1, 1), mode="replicate")
        grad = F.conv2d(x, self.kernel.to(x.dtype))  # (B*C, 2, H, W): d/dx, d/dy
        gx, gy = grad[:, 0], grad[:, 1]
        magnitude = torch.sqrt(gx * gx + gy * gy)
        angle = torch.remainder(torch.atan2(gy, gx), math.pi)  # unsigned orientation in [0, pi)
        index = (angle / math.pi * self.bins).long().clamp_(max=self.bins - 1)
        hist = torch.zeros(b * c, self.bins, h, w, device=images.device, dtype=magnitude.dtype)
        hist.scatter_(1, index.unsqueeze(1), magnitude.unsqueeze(1))
        hist = F.avg_pool2d(hist, self.cell) * self.cell**2  # sum over each cell
        hist = hist.view(b, c, self.bins, h // self.cell, w // self.cell)
        mean = hist.mean(dim=2, keepdim=True)
        std = hist.std(dim=2, unbiased=False, keepdim=True)
        return (hist - mean) / (std + self.eps)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) unnormalized images -> (B, N, dim) targets, patches in raster order."""
        hist = self.cells(images)  # (B, C, bins, h, w)
        b, c, bins, h, w = hist.shape
        k = self.patch // self.cell
        hist = hist.view(b, c, bins, h // k, k, w // k, k)  # (B, C, bins, ph, cr, pw, cc)
        hist = hist.permute(0, 3, 5, 1, 4, 6, 2)  # (B, ph, pw, C, cell row, cell col, bins)
        return hist.reshape(b, (h // k) * (w // k), c * k * k * bins)
