"""Mask generation shared by every adapter and by DMJD: one rounding rule, per-sample random subsets.

The rule, used everywhere: of ``n`` units (patch tokens, 32x32 blocks, ...) a sub
branch with ``ratio`` keeps ``max(1, floor((1 - ratio) * n))`` and masks the rest.
This is timm's ``PatchDropout`` rule, evaluated without float error (timm's
``int(20 * (1 - 0.9))`` gives 1; the rule here gives 2).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch


def check_ratio(ratio: float, what: str = "ratio") -> float:
    """Validate a sub-branch ratio: the fraction of the input removed, in [0, 1)."""
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real):  # NumPy's float32 too
        raise TypeError(f"{what} must be a number in [0, 1), got {ratio!r} ({type(ratio).__name__})")
    if not 0.0 <= float(ratio) < 1.0 or math.isnan(ratio):
        raise ValueError(
            f"{what} must be in [0, 1) (the fraction of the input removed), got {ratio}; the paper's default is 0.5"
        )
    return float(ratio)


def num_keep(n: int, ratio: float) -> int:
    """Units kept out of ``n`` when a fraction ``ratio`` is removed (at least one, none of none)."""
    if n < 0:
        raise ValueError(f"the number of units must be >= 0, got {n}")
    return min(n, max(1, math.floor(round((1.0 - ratio) * n, 6))))


def num_masked(n: int, ratio: float) -> int:
    """Units removed out of ``n``: ``n - num_keep(n, ratio)``."""
    return n - num_keep(n, ratio)


def masked_counts(n: torch.Tensor, ratio: float) -> torch.Tensor:
    """``num_masked(n_i, ratio)`` for every entry of ``n`` (a tensor of unit counts); 0 where ``n_i == 0``."""
    keep = torch.floor(torch.round((1.0 - ratio) * n.double() * 1e6) / 1e6).clamp(min=1)
    return (n.double() - keep).clamp(min=0).long()


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


def upsample_mask(mask: torch.Tensor, scale: int | tuple[int, int]) -> torch.Tensor:
    """Repeat a (B, gh, gw) unit mask ``scale`` times along both grid axes (or ``(sh, sw)`` times)."""
    sh, sw = (scale, scale) if isinstance(scale, int) else scale
    if sh != 1:
        mask = mask.repeat_interleave(sh, dim=1)
    return mask.repeat_interleave(sw, dim=2) if sw != 1 else mask


def unit_grid(height: int, width: int, unit: int, what: str) -> tuple[int, int]:
    """Grid of ``unit``-sized blocks over an image, or a clear error if it does not tile."""
    if height % unit or width % unit:
        raise ValueError(
            f"{what}: image size {height}x{width} is not divisible by the mask unit of {unit} pixels; "
            f"choose a unit that divides both sides (wrap(..., unit=...)) or resize the images"
        )
    return height // unit, width // unit


def check_masks_some(grid: tuple[int, int], ratio: float, unit: int, size: tuple[int, int], what: str) -> None:
    """A clear error where ``ratio`` of a grid of ``unit``-pixel blocks masks no block: a one-block grid (a 32-pixel
    image and the default 32-pixel unit) keeps its one block, and the sub branch would be the main branch."""
    n = grid[0] * grid[1]
    if ratio > 0 and num_masked(n, ratio) == 0:
        raise ValueError(
            f"{what}: a {size[0]}x{size[1]} image holds {n} mask unit{'s' * (n != 1)} of {unit} pixels, and ratio "
            f"{ratio} masks none of {'them' if n != 1 else 'it'} (a sample keeps at least one unit), so the sub branch "
            f"would equal the main branch; use a smaller unit, {max(1, unit // 2)} say (wrap's unit=, MaskSubTrainer's "
            "mask_options={'unit': ...}, masksub train's --sub.unit)"
        )


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` (B, K) of each sample's tokens ``x`` (B, N, D) -> (B, K, D)."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def keep_patch_tokens(
    x: torch.Tensor, num_prefix_tokens: int, ratio: float, keep: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every prefix token and ``num_keep(N, ratio)`` random patch tokens per sample (or the given ``keep``).

    ``x`` (B, P + N, D) -> ((B, P + K, D), keep (B, K)); row ``i`` of the kept patches is patch ``keep[:, i]``.
    """
    prefix, patches = x[:, :num_prefix_tokens], x[:, num_prefix_tokens:]
    if keep is None:
        batch, n, _ = patches.shape
        keep = random_keep_indices(batch, n, num_keep(n, ratio), x.device)
    return torch.cat((prefix, gather_tokens(patches, keep)), dim=1), keep


def keep_valid_patch_tokens(
    x: torch.Tensor, num_prefix_tokens: int, ratio: float, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """As ``keep_patch_tokens`` for padded sequences: sample ``i`` keeps ``num_keep(n_i, ratio)`` of its ``n_i``
    valid patch tokens (``valid`` (B, N), True on real patches), at random.

    The kept length stays ``K = num_keep(N, ratio)`` for the whole batch; a sample keeps padding tokens after
    its valid ones to fill it (``K - num_keep(n_i) <= N - n_i`` always holds), and they stay padding: the
    caller gathers ``valid`` with the returned indices.
    """
    prefix, patches = x[:, :num_prefix_tokens], x[:, num_prefix_tokens:]
    keep = valid_keep_indices(valid, ratio)
    return torch.cat((prefix, gather_tokens(patches, keep)), dim=1), keep


def valid_keep_indices(valid: torch.Tensor, ratio: float) -> torch.Tensor:
    """The indices (B, K) that ``keep_valid_patch_tokens`` keeps of ``valid`` (B, N): ``num_keep(n_i, ratio)`` valid
    positions per sample at random, then padding to fill ``K = num_keep(N, ratio)``."""
    batch, n = valid.shape
    valid = valid.bool()
    counts = valid.sum(dim=1)
    noise = torch.rand(batch, n, device=valid.device)
    rank = noise.masked_fill(~valid, 2.0).argsort(dim=1).argsort(dim=1)  # valid tokens rank first
    chosen = valid & (rank < (counts - masked_counts(counts, ratio)).unsqueeze(1))
    order = noise + torch.where(chosen, 0.0, torch.where(valid, 2.0, 1.0))  # chosen, padding, the other valid
    return order.argsort(dim=1)[:, : num_keep(n, ratio)]


def units_to_tokens(units: torch.Tensor, unit_grid_w: int, block: int | tuple[int, int]) -> torch.Tensor:
    """Unit indices (B, K) on a grid ``unit_grid_w`` wide -> the (B, K * bh * bw) token indices they cover, where a
    unit is ``block`` tokens square (or ``(bh, bw)`` tokens high and wide)."""
    bh, bw = (block, block) if isinstance(block, int) else block
    row, col = units // unit_grid_w, units % unit_grid_w  # (B, K)
    rows = (row * bh).unsqueeze(-1) + torch.arange(bh, device=units.device)  # (B, K, bh)
    cols = (col * bw).unsqueeze(-1) + torch.arange(bw, device=units.device)  # (B, K, bw)
    tokens = rows.unsqueeze(-1) * (unit_grid_w * bw) + cols.unsqueeze(-2)  # (B, K, bh, bw)
    return tokens.flatten(1)


@dataclass
class ViewMasks:
    """Per-sample masks of ``V`` views over ``N`` patch tokens."""

    visible: torch.Tensor  # (B, V, K) token indices, ascending: raster order, as targets are laid out
    masked: torch.Tensor  # (B, V, N) bool, True where the view hides the token


def disjoint_views(
    batch: int,
    grid: tuple[int, int],
    views: int = 2,
    corruption: float = 0.6,
    prediction: float = 1.0,
    block: int = 1,
    device: torch.device | str = "cpu",
) -> ViewMasks:
    """DMJD masks: every view hides ``corruption`` of the units; together they hide ``prediction``.

    Units are ``block`` x ``block`` patch tokens (2 = 32x32 pixels for 16-pixel patches; 1 = single
    patches). Each view keeps ``K = num_keep(n, corruption)`` units visible. With ``prediction=1`` the
    views' visible sets are disjoint, which needs ``views * K <= n`` (for 2 views: corruption >= 0.5).
    With ``prediction < 1`` (2 views only) view 2 hides ``prediction - corruption`` of the units view 1
    shows, so the visible sets overlap and the masked sets together cover about ``prediction`` of the
    image; that needs ``prediction <= 2 * corruption``.
    """
    corruption = check_ratio(corruption, "corruption rate")
    if isinstance(prediction, bool) or not isinstance(prediction, numbers.Real):
        raise TypeError(f"prediction rate must be a number in (corruption, 1], got {prediction!r}")
    if not (corruption < prediction <= 1.0):
        raise ValueError(f"prediction rate must be in (corruption, 1] = ({corruption}, 1], got {prediction}")
    gh, gw = grid
    if gh % block or gw % block:
        raise ValueError(f"token grid {gh}x{gw} is not divisible by the mask block of {block} tokens")
    ugh, ugw = gh // block, gw // block
    n = ugh * ugw
    keep = num_keep(n, corruption)
    perm = torch.rand(batch, n, device=device).argsort(dim=1)  # (B, n) random unit order per sample
    if prediction == 1.0:
        if views * keep > n:
            raise ValueError(
                f"{views} views keeping {keep} of {n} units each cannot have disjoint visible sets "
                f"(views x (1 - corruption) > 1); raise the corruption rate to at least {1 - 1 / views:.3f} "
                "or use fewer views"
            )
        units = [perm[:, v * keep : (v + 1) * keep] for v in range(views)]
    else:
        if views != 2:
            raise ValueError("a prediction rate below 1 is defined for 2 views only; use prediction=1.0")
        if prediction - corruption > corruption + 1e-9:  # view 2 can hide only units view 1 shows
            raise ValueError(
                f"2 views hiding {corruption} of the image each hide at most {2 * corruption:g} of it together, "
                f"not the prediction rate {prediction}: lower it to {2 * corruption:g} or raise the corruption "
                f"rate to {prediction / 2:g}"
            )
        hidden_again = min(keep, round((prediction - corruption) * n))
        first = perm[:, :keep]
        second = torch.cat([first[:, hidden_again:], perm[:, keep : keep + hidden_again]], dim=1)
        units = [first, second]
    visible = torch.stack([units_to_tokens(u, ugw, block).sort(dim=1).values for u in units], dim=1)
    masked = torch.ones(batch, views, gh * gw, dtype=torch.bool, device=device)
    masked.scatter_(2, visible, False)
    return ViewMasks(visible=visible, masked=masked)
