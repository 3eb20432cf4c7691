"""What the ``swin_drop`` tests of timm's, torchvision's and Hugging Face's Swin share: 64-pixel images, 16-pixel
units (4x4 tokens of the first stage at patch 4), the kept units read from the first stage's input, and checks."""

from __future__ import annotations

from collections.abc import Callable

import torch

UNIT = 16


def images(batch: int = 3, size: tuple[int, int] = (64, 64)) -> torch.Tensor:
    return torch.rand(batch, 3, *size, generator=torch.Generator().manual_seed(1)) + 0.5


def spread_logit_scales(model: torch.nn.Module) -> None:
    """SwinV2's per-head logit scales (all log 10 when built) set apart, the last one above the clamp at log 100."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("logit_scale"):
                p.copy_(torch.linspace(1.0, 5.0, p.numel()).view_as(p))


def sub_pass(wrapped, first_stage: torch.nn.Module, x: torch.Tensor, embed: Callable, patch: int = 4):
    """The sub pass's logits and the units (B, U) it kept: ``first_stage``'s input tokens matched against the patch
    embedding's, ``embed(x)`` (B, H, W, C), which must cover whole units."""
    seen = []
    handle = first_stage.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    out = wrapped(x, sub=True)
    handle.remove()
    full = embed(x)
    width = full.shape[2]
    match = (seen[0].unsqueeze(2) == full.flatten(1, 2).unsqueeze(1)).all(-1)  # (B, K, N)
    assert (match.sum(-1) == 1).all(), "each kept token is one patch's"
    tokens = match.int().argmax(-1)
    side = UNIT // patch
    units = (tokens // width // side) * (width // side) + tokens % width // side
    kept = [u.unique() for u in units]
    assert all(len(k) * side * side == tokens.shape[1] for k in kept), "whole units are kept"
    return getattr(out, "logits", out), torch.stack(kept)


def present(kept: torch.Tensor, unit_grid: tuple[int, int], side: int) -> torch.Tensor:
    """(B, H, W, 1): 1.0 on the tokens of the kept units, ``side`` tokens a unit."""
    batch = kept.shape[0]
    units = torch.zeros(batch, unit_grid[0] * unit_grid[1], dtype=torch.float64).scatter(1, kept, 1.0)
    units = units.view(batch, *unit_grid)
    return units.repeat_interleave(side, 1).repeat_interleave(side, 2).unsqueeze(-1)


def assert_same_grads(expected: dict, *found: dict) -> None:
    for grads in found:
        assert grads.keys() == expected.keys()
        for n, g in expected.items():
            torch.testing.assert_close(grads[n], g, rtol=1e-5, atol=1e-7, msg=n)


def assert_backbone_masked(wrapped, backbone_sub_pass: Callable, plain: Callable) -> None:
    """A model of the user's around a Swin backbone: its sub pass is its head on the backbone's sub pass (same seed),
    its main pass the plain model's."""
    x = images()
    torch.manual_seed(4)
    out = wrapped(x, sub=True)
    torch.manual_seed(4)
    assert torch.equal(out, backbone_sub_pass(x))
    assert torch.equal(wrapped(x), plain(x))


def check_dropped_units_unseen(wrapped, first_stage: torch.nn.Module, embed: Callable) -> None:
    """Two images under seed 3: ``num_keep`` whole units each, and new pixels in the dropped units leave the sub pass's
    logits unchanged, bit for bit, where new pixels in the kept ones change them."""
    from conftest import check_dropped_patch_pixels

    from masksub.masking import num_keep

    x = images(batch=2)
    with torch.no_grad():
        torch.manual_seed(3)
        out, kept = sub_pass(wrapped, first_stage, x, embed)
        assert kept.shape == (2, num_keep(16, wrapped.branch.ratio))

        def logits(x, sub):
            output = wrapped(x, sub=sub)
            return getattr(output, "logits", output)

        check_dropped_patch_pixels(logits, x, out, kept, patch=UNIT)


def copies_masking_alike(wrapped) -> list:
    """A deep copy and a pickled copy of ``wrapped``, checked to give its sub pass under the same seed."""
    import copy
    import pickle

    x, copies = images(batch=2), [copy.deepcopy(wrapped), pickle.loads(pickle.dumps(wrapped))]
    for other in copies:
        torch.manual_seed(5)
        expected = wrapped(x, sub=True)
        torch.manual_seed(5)
        found = other(x, sub=True)
        assert torch.equal(getattr(found, "logits", found), getattr(expected, "logits", expected))
    return copies


def step_gradients(model, wrapped, memory_saving: bool, norm=None, recomputed: bool = False) -> dict:
    """The model's gradients after one ``Step`` (learning rate 0) on 4 images under seed 100. With ``norm`` (in a
    second-stage block): it saw the main pass's 64 tokens and the sub pass's 32, each again in the backward where
    the blocks are ``recomputed`` (activation checkpointing)."""
    from torch import nn

    import masksub

    opt = torch.optim.SGD(wrapped.parameters(), lr=0.0)
    step = masksub.Step(wrapped, opt, nn.CrossEntropyLoss(), memory_saving=memory_saving)
    seen = []
    if norm is not None:
        norm.register_forward_pre_hook(lambda m, a: seen.append(a[0][0, ..., 0].numel()))
    torch.manual_seed(100)
    step(images(batch=4), torch.arange(4) % 5)
    if norm is not None:
        assert seen == ([64, 64, 32, 32] if recomputed else [64, 32])
    return {n: p.grad for n, p in model.named_parameters()}
