"""Mask generation shared by every adapter: one rounding rule, per-sample random subsets.

The rule, used everywhere: of ``n`` units (patch tokens, 32x32 blocks, ...) a sub
branch with ``ratio`` keeps ``max(1, floor((1 - ratio) * n))`` and masks the rest.
This is timm's ``PatchDropout`` rule, evaluated without float error (timm's
``int(20 * (1 - 0.9))`` gives 1; the rule here gives 2).
"""

from __future__ import annotations

import math

import torch


def check_ratio(ratio: float, what: str = "ratio") -> float:
    """Validate a sub-branch ratio: the fraction of the input removed, in [0, 1)."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise TypeError(f"{what} must be a number in [0, 1), got {ratio!r} ({type(ratio).__name__})")
    if not 0.0 <= float(ratio) < 1.0 or math.isnan(ratio):
        raise ValueError(
            f"{what} must be in [0, 1) (the fraction of the input removed), got {ratio}; the paper's default is 0.5"
        )
    return float(ratio)


def num_keep(n: int, ratio: float) -> int:
    """Units kept out of ``n`` when a fraction ``ratio`` is removed (at least one)."""
    return max(1, math.floor(round((1.0 - ratio) * n, 6)))


def num_masked(n: int, ratio: float) -> int:
    """Units removed out of ``n``: ``n - num_keep(n, ratio)``."""
    return n - num_keep(n, ratio)


def random_keep_indices(batch: int, n: int, keep: int, device: torch.device) -> torch.Tensor:
    """Indices of ``keep`` of ``n`` units, a fresh random subset per sample: (B, keep)."""
    noise = torch.rand(batch, n, device=device)
    return noise.argsort(dim=1)[:, :keep]


def random_unit_mask(batch: int, grid: tuple[int, int], ratio: float, device: torch.device) -> torch.Tensor:
    """Boolean (B, gh, gw) mask, True where masked, exactly ``num_masked`` per sample."""
    gh, gw = grid
    n = gh * gw
    keep = num_keep(n, ratio)
    noise = torch.rand(batch, n, device=device)
    masked_idx = noise.argsort(dim=1)[:, keep:]  # (B, n - keep)
    mask = torch.zeros(batch, n, dtype=torch.bool, device=device)
    mask.scatter_(1, masked_idx, True)
    return mask.view(batch, gh, gw)


def upsample_mask(mask: torch.Tensor, scale: int) -> torch.Tensor:
    """Repeat a (B, gh, gw) unit mask ``scale`` times along both grid axes."""
    if scale == 1:
        return mask
    return mask.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)


def unit_grid(height: int, width: int, unit: int, what: str) -> tuple[int, int]:
    """Grid of ``unit``-sized blocks over an image, or a clear error if it does not tile."""
    if height % unit or width % unit:
        raise ValueError(
            f"{what}: image size {height}x{width} is not divisible by the mask unit of {unit} pixels; "
            f"choose a unit that divides both sides (wrap(..., unit=...)) or resize the images"
        )
    return height // unit, width // unit
