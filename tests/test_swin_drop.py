"""timm's Swin, SwinV2 and SwinV2-Cr with ``adapter="swin_drop"``: the sub pass is the model, each window on its kept
tokens."""

from __future__ import annotations

from functools import partial

import pytest
import timm
import torch
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
from masksub.train.build import timm_at_least

SWIN = dict(img_size=64, depths=(2, 2), num_heads=(1, 2), embed_dim=16, window_size=4, num_classes=5)


# Earlier timm builds no SwinV2 or SwinV2-Cr whose grid its windows do not divide, and no max-pooled Swin.
NEEDS_TIMM_1_0_31 = pytest.mark.skipif(not timm_at_least("1.0.31"), reason="timm < 1.0.31 cannot build this model")

NAMES = {"swin": "swin_tiny_patch4_window7_224", "v2": "swinv2_tiny_window8_256", "cr": "swinv2_cr_tiny_ns_224"}


def _swin(seed: int = 0, family: str = "swin", **overrides) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(NAMES[family], **{**SWIN, "drop_path_rate": 0.0, **overrides})


def _stages(model: nn.Module) -> nn.Module:
    return model.stages if hasattr(model, "stages") else model.layers  # SwinV2-Cr's, or Swin's and SwinV2's


def _wrap(model: nn.Module, ratio: float = 0.5, **kw) -> masksub.SubBranchModel:
    return masksub.wrap(model, ratio=ratio, unit=UNIT, adapter="swin_drop", **kw).train()


def _embed(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The patch embedding's tokens as a (B, H, W, C) grid (SwinV2-Cr's is channels first)."""
    tokens = model.patch_embed(x)
    return tokens.permute(0, 2, 3, 1) if hasattr(model, "stages") else tokens


class _Windows(nn.Module):
    """Stands in for a block's attention: returns its input windows (and keeps them)."""

    def forward(self, x, mask=None):
        self.seen = x
        return x


def _masked_windows_reference(model, x, kept, pool):
    """The plain model with every window attention's keys limited to the kept tokens (the model's own shift, padding
    and partition of a map of them), and the pool over the kept tokens of the last stage."""
    unit_grid = (x.shape[-2] // UNIT, x.shape[-1] // UNIT)
    restore = []
    for s, stage in enumerate(_stages(model)):
        present = _present(kept, unit_grid, UNIT // 4 >> s)
        for block in stage.blocks:
            own, block.attn = block.attn, _Windows()
            attend = getattr(block, "_attn", getattr(block, "_shifted_window_attn", None))
            attend(present - 1.0)  # 0 on kept tokens and padding, -1 on dropped ones, laid out in windows
            keys = block.attn.seen.transpose(1, 2) * 1e300  # (B * nW, 1, N)
            block.attn = own

            def forward(windows, mask=None, keys=keys, attn=own):
                extra = keys.expand(-1, windows.shape[1], -1)
                if mask is not None:  # (nW, N, N), the shifted regions'
                    extra = extra + mask.repeat(windows.shape[0] // mask.shape[0], 1, 1)
                return type(attn).forward(attn, windows, mask=extra)

            own.forward = forward
            restore.append(own)
    try:
        features = model.forward_features(x)  # (B, h, w, C), SwinV2-Cr's (B, C, h, w)
    finally:
        for attn in restore:
            del attn.forward
    if hasattr(model, "stages"):
        features = features.permute(0, 2, 3, 1)
    present = _present(kept, unit_grid, UNIT // 4 >> (len(_stages(model)) - 1)).bool()  # the last stage's map
    tokens = [f[p.squeeze(-1)] for f, p in zip(features, present)]
    pooled = torch.stack([t.mean(0) if pool == "avg" else t.amax(0) for t in tokens])
    return model.head.fc(pooled)


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
@pytest.mark.parametrize(
    "variant,settings,size",
    [
        ("shifted", {}, (64, 64)),
        ("padded", {"window_size": 3}, (64, 64)),  # 16x16 and 8x8 grids padded to windows of 3
        ("fused", {}, (64, 64)),  # timm's Swin leaves the fused kernel off by default
        ("v2", {}, (64, 64)),  # SwinV2: cosine attention, continuous position bias, post-norm, q and v biases
        pytest.param("v2 padded", {"window_size": 3}, (64, 64), marks=NEEDS_TIMM_1_0_31),
        pytest.param("max pool", {"global_pool": "max"}, (64, 64), marks=NEEDS_TIMM_1_0_31),
        ("dynamic size", {"dynamic_img_size": True, "strict_img_size": False}, (48, 80)),  # masks built per call
        ("cr", {}, (64, 64)),  # SwinV2-Cr: roll then pad, a meta MLP's position bias, channels first between stages
        pytest.param("cr padded", {"window_size": 3}, (64, 64), marks=NEEDS_TIMM_1_0_31),
        ("cr extra norms", {"extra_norm_stage": True}, (64, 64)),  # a main-branch norm ends each stage
        ("cr max pool", {"global_pool": "max"}, (64, 64)),
    ],
)
def test_the_sub_pass_is_the_model_with_every_window_attending_to_its_kept_tokens(variant, settings, size, ratio):
    """Float64, against the plain model whose window attentions get a key mask of the kept tokens: the same output;
    ``num_keep(U, ratio)`` whole units per sample; the main pass is the plain model's."""
    model = _swin(family=variant.split()[0] if variant.startswith(("v2", "cr")) else "swin", **settings).double()
    with torch.no_grad():  # biases start at zero (a padded window's zero tokens attend by their q, k, v biases)
        for name, p in model.named_parameters():  # and SwinV2's post-norms at zero, which would silence its blocks
            if name.endswith(("bias", "q_bias", "v_bias")) or (".norm" in name and name.endswith("weight")):
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)
    spread_logit_scales(model)
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = variant == "fused"
        if isinstance(m, nn.Dropout):  # SwinV2-Cr's meta MLP drops its hidden features in training
            m.p = 0.0
    wrapped = _wrap(model, ratio)
    assert wrapped.branch.name == "swin_drop"
    x = _images(size=size).double()
    with torch.no_grad():
        out, kept = sub_pass(wrapped, _stages(model)[0], x, partial(_embed, model))
        units = (size[0] // UNIT) * (size[1] // UNIT)
        assert kept.shape == (3, num_keep(units, ratio))
        expected = _masked_windows_reference(model, x, kept, settings.get("global_pool", "avg"))
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
        assert torch.equal(wrapped(x), model(x)), "the main pass is the plain model"


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5, 0.7, 0.9])
def test_exact_counts_of_whole_units(ratio):
    model = _swin()
    wrapped = _wrap(model, ratio)
    with torch.no_grad():
        _, kept = sub_pass(wrapped, model.layers[0], _images(batch=4), model.patch_embed)
    assert kept.shape == (4, num_keep(16, ratio))


@pytest.mark.parametrize("family", ["swin", "cr"])
def test_the_pixels_of_dropped_units_do_not_reach_the_sub_pass(family):
    model = _swin(family=family)
    check_dropped_units_unseen(_wrap(model), _stages(model)[0], partial(_embed, model))


def test_the_sub_pass_costs_about_half_and_compiles_into_two_graphs():
    """The projections and MLPs run on the kept tokens; attention runs over whole windows (a small share at
    Swin-T's size, a larger one in this tiny model)."""
    assert 0.45 < sub_flop_ratio(_wrap(_swin()), _images(batch=4)) < 0.62
    swin_t = timm.create_model("swin_tiny_patch4_window7_224")
    assert 0.45 < sub_flop_ratio(masksub.wrap(swin_t, adapter="swin_drop").train(), torch.rand(1, 3, 224, 224)) < 0.55
    v2 = timm.create_model("swinv2_tiny_window8_256")
    assert 0.45 < sub_flop_ratio(masksub.wrap(v2, adapter="swin_drop").train(), torch.rand(1, 3, 256, 256)) < 0.56
    cr = timm.create_model("swinv2_cr_tiny_ns_224")
    assert 0.45 < sub_flop_ratio(masksub.wrap(cr, adapter="swin_drop").train(), torch.rand(1, 3, 224, 224)) < 0.56
    assert compiled_graphs(_wrap(_swin(family="cr")), _images(batch=4)) == 2
    assert compiled_graphs(_wrap(_swin()), _images(batch=4)) == 2


@pytest.mark.parametrize("family", ["swin", "cr"])
def test_two_backward_step_equals_summed_loss_and_checkpointing_changes_no_gradient(family):
    def grads(memory_saving, checkpointing):
        model = _swin(family=family)
        model.set_grad_checkpointing(checkpointing)
        norm = _stages(model)[1].blocks[1].norm1
        return step_gradients(model, _wrap(model), memory_saving, norm, recomputed=checkpointing)

    assert_same_grads(grads(False, False), grads(True, False), grads(True, True))


@pytest.mark.parametrize("family,name", [("swin", "SwinTransformer"), ("cr", "SwinTransformerV2Cr")])
def test_every_stage_merging_and_block_runs_through_its_own_call(family, name):
    """What FSDP (``fully_shard`` on each block or stage) needs to gather the weights: hooks on them run in the sub
    pass too, on the kept tokens."""
    model = _swin(family=family)
    seen = []
    stages = _stages(model)
    for module in [*stages, stages[1].downsample, *stages[0].blocks, *stages[1].blocks]:
        module.register_forward_pre_hook(lambda m, a: seen.append((type(m).__name__, a[0].shape[1])))
    _wrap(model)(_images(batch=2), sub=True)
    # 64 px, 16-px units: 8 of 16 units kept, 4x4 tokens each at the first stage and 2x2 at the second
    first, second = [(f"{name}Block", 128)] * 2, [(f"{name}Block", 32)] * 2
    stage = f"{name}Stage"
    assert seen == [(stage, 128), *first, (stage, 128), ("PatchMerging", 128), *second]


@pytest.mark.parametrize("family", ["swin", "cr"])
def test_a_swin_backbone_under_a_head_of_the_users(family):
    backbone = _swin(family=family, num_classes=0)
    mine = nn.Sequential(backbone, nn.Linear(backbone.num_features, 5))
    wrapped = masksub.wrap(mine, unit=UNIT, adapter="swin_drop").train()
    assert wrapped.branch.target_name == "0"
    assert_backbone_masked(wrapped, lambda x: mine[1](wrapped.branch.run_with_hooks_active(backbone, x)), mine)


def test_swin_keeps_the_mask_token_unless_asked_and_bad_settings_are_refused():
    assert (
        masksub.wrap(_swin(), unit=UNIT).branch.name
        == masksub.wrap(_swin(family="v2"), unit=UNIT).branch.name
        == masksub.wrap(_swin(family="cr"), unit=UNIT).branch.name
        == ("masktoken")
    )
    with pytest.raises(ValueError, match="unit 4 px is not a multiple of the last stage's token, 8x8 px"):
        masksub.wrap(_swin(), unit=4, adapter="swin_drop")
    for family in ("swin", "cr"):
        with pytest.raises(ValueError, match="built with global_pool='', it returns one output per token"):
            masksub.wrap(_swin(family=family, global_pool="", num_classes=0), adapter="swin_drop")
    wrapped = _wrap(_swin(dynamic_img_size=True, strict_img_size=False))
    with pytest.raises(ValueError, match="image size 72x64 is not divisible by the mask unit of 16 pixels"):
        wrapped(torch.rand(2, 3, 72, 64), sub=True)
    with pytest.raises(ValueError, match="holds 1 mask unit of 16 pixels, and ratio 0.5 masks none"):
        wrapped(torch.rand(2, 3, 16, 16), sub=True)
    with pytest.raises(ValueError, match="does not support VisionTransformer"):
        masksub.wrap(timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1), adapter="swin_drop")


@pytest.mark.parametrize("family,features", [("swin", (2, 8, 8, 32)), ("cr", (2, 32, 8, 8))])
def test_unwrap_restores_and_a_copied_or_pickled_wrapped_model_masks_alike(family, features):
    wrapped = _wrap(_swin(family=family))
    x = _images(batch=2)
    for other in copies_masking_alike(wrapped):
        assert other.model.forward_features.args[0] is other.model
        assert all(stage.forward.args[0] is stage for stage in _stages(other.model))
        assert all(b.forward.args[0] is b for stage in _stages(other.model) for b in stage.blocks)
    model = wrapped.unwrap()
    assert "forward_features" not in vars(model) and not any("forward" in vars(m) for m in model.modules())
    assert model.forward_features(x).shape == features
