"""DMJD building blocks: disjoint multi-view masks and HOG targets."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from masksub.masking import disjoint_views, num_keep
from masksub.pretrain import HOGTargets


@pytest.mark.parametrize("block", [1, 2])
@pytest.mark.parametrize("corruption, views", [(0.6, 2), (0.5, 2), (0.75, 4), (0.7, 3)])
def test_disjoint_views_counts_disjointness_coverage(block, corruption, views):
    grid = (14, 14)
    m = disjoint_views(16, grid, views=views, corruption=corruption, block=block)
    n_units = (14 // block) ** 2
    visible_tokens = num_keep(n_units, corruption) * block**2
    assert m.visible.shape == (16, views, visible_tokens)
    assert (m.masked.sum(-1) == 196 - visible_tokens).all(), "exact masked count per view"
    shown = (~m.masked).sum(1)  # (B, N): in how many views each token is visible
    assert shown.max() <= 1, "visible sets must be disjoint"
    # Prediction rate 1: every token is hidden in some view (union coverage 1), and exactly the
    # tokens no view shows are hidden in all of them.
    assert m.masked.any(1).all()
    assert (m.masked.all(1).sum(-1) == 196 - views * visible_tokens).all()
    assert (torch.diff(m.visible, dim=-1) > 0).all(), "visible indices ascending (raster order)"
    # Block alignment: each block x block unit is wholly masked or wholly visible.
    units = m.masked.view(16, views, 14 // block, block, 14 // block, block)
    assert (units.all(dim=(3, 5)) | ~units.any(dim=(3, 5))).all()
    assert any(not torch.equal(m.masked[0], m.masked[i]) for i in range(1, 16)), "per-sample randomness"


def test_two_views_cover_the_whole_image_at_prediction_one():
    m = disjoint_views(8, (14, 14), views=2, corruption=0.6, prediction=1.0, block=2)
    hidden_in_some_view = m.masked.any(1)
    visible_in_some_view = (~m.masked).any(1)
    assert hidden_in_some_view.all(), "prediction rate 1: every token is predicted by some view"
    assert visible_in_some_view.float().mean() < 0.8


def test_prediction_below_one_overlaps_visible_sets():
    n = 49
    m = disjoint_views(8, (14, 14), views=2, corruption=0.6, prediction=0.9, block=2)
    keep = num_keep(n, 0.6)
    again = min(keep, round(0.3 * n))
    both_visible_units = (~m.masked).all(1).sum(-1) // 4
    assert (both_visible_units == keep - again).all()
    coverage_units = m.masked.any(1).sum(-1) // 4
    assert (coverage_units == n - (keep - again)).all()


def test_seeded_reproducibility():
    torch.manual_seed(3)
    a = disjoint_views(4, (14, 14), block=2)
    torch.manual_seed(3)
    b = disjoint_views(4, (14, 14), block=2)
    assert torch.equal(a.visible, b.visible)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(corruption=0.4), "cannot have disjoint visible sets"),
        (dict(corruption=0.6, views=3), "cannot have disjoint visible sets"),
        (dict(corruption=0.6, prediction=0.9, views=3), "2 views only"),
        (dict(corruption=0.6, prediction=0.5), "prediction rate must be in"),
        (dict(corruption=0.3, prediction=0.9), "hide at most 0.6 of it together"),
        (dict(corruption=1.0), r"\[0, 1\)"),
        (dict(block=3), "not divisible by the mask block"),
    ],
)
def test_invalid_combinations_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        disjoint_views(2, (14, 14), **kwargs)


def _edge_image(angle_deg: float, size: int = 32) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size) - size / 2 + 0.5, torch.arange(size) - size / 2 + 0.5, indexing="ij")
    a = math.radians(angle_deg)
    return ((xx * math.cos(a) + yy * math.sin(a)) > 0).float().expand(1, 3, size, size)


@pytest.mark.parametrize("angle, expected_bin", [(0, 0), (90, 4), (45, 2), (135, 6)])
def test_hog_edge_orientation(angle, expected_bin):
    cells = HOGTargets().cells(_edge_image(angle))[0, 0]  # (bins, 4, 4)
    energy = cells.abs().sum(0)
    edge_cells = energy > 0
    assert edge_cells.any() and not edge_cells.all(), "flat cells stay zero, edge cells respond"
    assert (cells.argmax(0)[edge_cells] == expected_bin).all()


def _hog_numpy(img: np.ndarray, cell=8, bins=9) -> np.ndarray:
    """Independent reference: loops over pixels and cells, one channel (H, W) -> (bins, H/cell, W/cell)."""
    h, w = img.shape
    p = np.pad(img, 1, mode="edge")
    out = np.zeros((bins, h // cell, w // cell))
    for i in range(h):
        for j in range(w):
            gx = p[i + 1, j + 2] - p[i + 1, j]
            gy = p[i + 2, j + 1] - p[i, j + 1]
            theta = math.atan2(gy, gx) % math.pi
            out[min(int(theta / math.pi * bins), bins - 1), i // cell, j // cell] += math.hypot(gx, gy)
    mean, std = out.mean(0, keepdims=True), out.std(0, keepdims=True)
    return (out - mean) / (std + 1e-6)


def test_hog_matches_independent_computation_and_layout():
    g = torch.Generator().manual_seed(0)
    img = torch.rand(1, 3, 32, 32, generator=g) * 255
    hog = HOGTargets()
    cells = hog.cells(img)[0]  # (C, bins, 4, 4)
    for c in range(3):
        np.testing.assert_allclose(cells[c].numpy(), _hog_numpy(img[0, c].double().numpy()), rtol=1e-4, atol=1e-4)
    targets = hog(img)  # (1, 4 patches, 108)
    assert targets.shape == (1, 4, hog.dim(3)) == (1, 4, 108)
    # Patch (row 0, col 1) holds cells rows 0-1, cols 2-3 of every channel, in (channel, row, col, bin) order.
    expected = cells[:, :, 0:2, 2:4].permute(0, 2, 3, 1).reshape(-1)
    assert torch.equal(targets[0, 1], expected)
