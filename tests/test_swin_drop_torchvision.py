"""torchvision's Swin and Swin V2 with ``adapter="swin_drop"``: the sub pass is the model, each window on its kept
tokens."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision.models.swin_transformer as tvs
from conftest import compiled_graphs, sub_flop_ratio
from swin_common import (
    UNIT,
    assert_backbone_masked,
    assert_same_grads,
    check_dropped_units_unseen,
    copies_masking_alike,
    spread_logit_scales,
    step_gradients,
    sub_pass,
)
from swin_common import images as _images
from swin_common import present as _present
from torch import nn

import masksub
from masksub.masking import num_keep


def _swin(seed: int = 0, v2: bool = False, window=(4, 4), **kw) -> tvs.SwinTransformer:
    torch.manual_seed(seed)
    extra = {"block": tvs.SwinTransformerBlockV2, "downsample_layer": tvs.PatchMergingV2} if v2 else {}
    settings = dict(stochastic_depth_prob=0.0, num_classes=5, **extra, **kw)
    return tvs.SwinTransformer([4, 4], 16, [2, 2], [1, 2], list(window), **settings)


def _wrap(model: nn.Module, ratio: float = 0.5) -> masksub.SubBranchModel:
    return masksub.wrap(model, ratio=ratio, unit=UNIT, adapter="swin_drop").train()


def _windows(m: torch.Tensor, window, shift) -> torch.Tensor:
    """A (B, H, W, 1) map laid out as torchvision's attention lays out its tokens: padded with zeros to whole
    windows, rolled where a side is longer than a window, partitioned: (B * nW, 1, 1, N)."""
    (wh, ww), (height, width) = window, m.shape[1:3]
    m = F.pad(m, (0, 0, 0, -width % ww, 0, -height % wh))
    size = m.shape[1:3]
    shift = [0 if w >= s else sh for w, s, sh in zip(window, size, shift)]
    m = torch.roll(m, (-shift[0], -shift[1]), (1, 2))
    return m.view(m.shape[0], size[0] // wh, wh, size[1] // ww, ww).permute(0, 1, 3, 2, 4).reshape(-1, 1, 1, wh * ww)


def _masked_windows_reference(model, x, kept):
    """The plain model, its window attention (torchvision's function) given the kept tokens' key mask with the
    position bias, and the mean over the kept tokens of the last stage."""
    unit_grid = (x.shape[-2] // UNIT, x.shape[-1] // UNIT)
    original = tvs.shifted_window_attention

    def attention(x, qkv_weight, proj_weight, relative_position_bias, window_size, num_heads, shift_size, **kw):
        present = _present(kept, unit_grid, x.shape[1] // unit_grid[0])  # 1.0 on kept tokens
        keys = _windows(present - 1.0, window_size, shift_size) * 1e300  # 0 kept and padding, -1e300 dropped
        bias = relative_position_bias + keys  # (B * nW, heads, N, N)
        return original(x, qkv_weight, proj_weight, bias, window_size, num_heads, shift_size, **kw)

    tvs.shifted_window_attention = attention
    try:
        features = model.norm(model.features(x))  # (B, h, w, C)
    finally:
        tvs.shifted_window_attention = original
    present = _present(kept, unit_grid, features.shape[1] // unit_grid[0]).bool()
    return model.head(torch.stack([f[p.squeeze(-1)].mean(0) for f, p in zip(features, present)]))


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
@pytest.mark.parametrize(
    "variant,window,size",
    [
        ("shifted", (4, 4), (64, 64)),
        ("padded", (3, 3), (64, 64)),  # 16x16 and 8x8 grids padded to windows of 3, then rolled
        ("one side shifted", (8, 4), (32, 64)),  # 8x16 and 4x8 grids: no shift along the height, padding at 4
        ("v2", (4, 4), (64, 64)),  # cosine attention, continuous position bias, post-norms, k without bias
        ("v2 padded", (3, 3), (64, 64)),
    ],
)
def test_the_sub_pass_is_the_model_with_every_window_attending_to_its_kept_tokens(variant, window, size, ratio):
    """Float64, against torchvision's attention given a key mask of the kept tokens: the same output;
    ``num_keep(U, ratio)`` whole units per sample; the main pass is the plain model's."""
    model = _swin(v2=variant.startswith("v2"), window=window).double()
    with torch.no_grad():  # biases start at zero (a padded window's zero tokens attend by their q, k, v biases)
        for name, p in model.named_parameters():
            if name.endswith("bias") or (".norm" in name and name.endswith("weight")):
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)
    spread_logit_scales(model)
    wrapped = _wrap(model, ratio)
    assert wrapped.branch.name == "swin_drop"
    x = _images(size=size).double()
    with torch.no_grad():
        out, kept = sub_pass(wrapped, model.features[1], x, model.features[0])
        units = (size[0] // UNIT) * (size[1] // UNIT)
        assert kept.shape == (3, num_keep(units, ratio))
        torch.testing.assert_close(out, _masked_windows_reference(model, x, kept), rtol=0, atol=1e-12)
        assert torch.equal(wrapped(x), model(x)), "the main pass is the plain model"


def test_whole_units_per_sample_and_the_pixels_of_dropped_ones_do_not_reach_the_sub_pass():
    model = _swin()
    check_dropped_units_unseen(_wrap(model), model.features[1], model.features[0])


def test_the_sub_pass_costs_about_half_and_compiles_into_two_graphs():
    swin_t = tvs.swin_t()
    assert 0.45 < sub_flop_ratio(masksub.wrap(swin_t, adapter="swin_drop").train(), torch.rand(1, 3, 224, 224)) < 0.55
    v2 = tvs.swin_v2_t()
    assert 0.45 < sub_flop_ratio(masksub.wrap(v2, adapter="swin_drop").train(), torch.rand(1, 3, 256, 256)) < 0.56
    assert compiled_graphs(_wrap(_swin(window=(3, 3))), _images(batch=4)) == 2


def test_two_backward_step_equals_summed_loss():
    def grads(memory_saving):
        model = _swin(v2=True)
        return step_gradients(model, _wrap(model), memory_saving, model.features[3][1].norm1)

    assert_same_grads(grads(False), grads(True))


def test_every_stage_block_and_merging_runs_through_its_own_call():
    """What FSDP (``fully_shard`` on each block or stage) needs to gather the weights: hooks on them run in the sub
    pass too, on the kept tokens."""
    model = _swin()
    seen = []
    for part in list(model.features)[1:] + [b for stage in (model.features[1], model.features[3]) for b in stage]:
        part.register_forward_pre_hook(lambda m, a: seen.append((type(m).__name__, a[0].shape[1])))
    _wrap(model)(_images(batch=2), sub=True)
    # 64 px, 16-px units: 8 of 16 units kept, 4x4 tokens each at the first stage and 2x2 at the second
    first, second = [("SwinTransformerBlock", 128)] * 2, [("SwinTransformerBlock", 32)] * 2
    assert seen == [("Sequential", 128), *first, ("PatchMerging", 128), ("Sequential", 32), *second]


def test_a_torchvision_swin_backbone_under_a_head_of_the_users():
    backbone = _swin()
    backbone.head = nn.Identity()
    mine = nn.Sequential(backbone, nn.Linear(32, 5))
    wrapped = masksub.wrap(mine, unit=UNIT, adapter="swin_drop").train()
    assert wrapped.branch.target_name == "0"
    assert_backbone_masked(wrapped, lambda x: mine[1](wrapped.branch.run_with_hooks_active(backbone, x)), mine)


def test_the_mask_token_stays_the_default_and_a_unit_that_splits_a_merged_token_is_refused():
    assert masksub.wrap(_swin(), unit=UNIT).branch.name == "masktoken"
    with pytest.raises(ValueError, match="unit 4 px is not a multiple of the last stage's token, 8x8 px"):
        masksub.wrap(_swin(), unit=4, adapter="swin_drop")
    with pytest.raises(ValueError, match="image size 72x64 is not divisible by the mask unit of 16 pixels"):
        _wrap(_swin())(torch.rand(2, 3, 72, 64), sub=True)


def test_unwrap_restores_and_a_copied_or_pickled_wrapped_model_masks_alike():
    wrapped = _wrap(_swin(v2=True))
    x = _images(batch=2)
    for other in copies_masking_alike(wrapped):
        features = other.model.features
        assert features.forward.args[0] is features and all(p.forward.args[0] is p for p in list(features)[1:])
    model = wrapped.unwrap()
    assert not any("forward" in vars(m) for m in model.modules())
    assert model.features(x).shape == (2, 8, 8, 32)
