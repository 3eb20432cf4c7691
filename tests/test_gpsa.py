"""timm's ConViT: the sub pass is the model on the kept tokens, each GPSA attention with their relative positions."""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import check_dropped_patch_pixels, compiled_graphs, sub_flop_ratio, tiny_images, tiny_model

import masksub
from masksub.masking import num_keep


def _kept(model, x, wrapped):
    """Run the sub pass; the patch indices (B, K) it kept, found by matching the tokens entering the first block
    against the tokens with their position embedding."""
    seen = []
    handle = model.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    out = wrapped(x, sub=True)
    handle.remove()
    full = model.patch_embed(x) + model.pos_embed
    match = (seen[0].unsqueeze(2) == full.unsqueeze(1)).all(-1)  # (B, K, N)
    assert (match.sum(-1) == 1).all()
    return out, match.int().argmax(-1)


def _positions(keep: torch.Tensor, width: int) -> torch.Tensor:
    """The GPSA table of the tokens ``keep`` (K,) on a grid ``width`` wide, built from their coordinates: for each
    pair (n, m), the column offset, the row offset and the squared distance from n to m. (1, K, K, 3)."""
    row, col = (keep // width).double(), (keep % width).double()
    dx, dy = col[None, :] - col[:, None], row[None, :] - row[:, None]
    return torch.stack((dx, dy, dx**2 + dy**2), -1)[None]


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
@pytest.mark.parametrize("pool", ["token", "avg"])
def test_the_sub_pass_is_the_model_on_the_kept_tokens_with_their_relative_positions(pool, ratio):
    """Each sample's kept tokens run alone through the blocks, each GPSA attention given a table of the kept tokens'
    relative positions made from their coordinates, the class token joining where the model adds it: the same
    output (float64), exact counts of distinct patches, and the main pass is the plain model's."""
    model = tiny_model("timm_convit", global_pool=pool).double()
    x = tiny_images("timm_convit", batch=3).double()
    try:
        with torch.no_grad():
            model(x[:1])
    except RuntimeError as e:  # the plain model itself: its GPSA position table stays float32
        pytest.skip(f"timm {timm.__version__}'s ConViT does not run in float64 ({e})")
    wrapped = masksub.wrap(model, ratio=ratio).train()
    assert wrapped.branch.name == "gpsa"
    with torch.no_grad():
        out, keep = _kept(model, x, wrapped)
        assert keep.shape == (3, num_keep(64, ratio)) and (keep.sort(1).values.diff(dim=1) > 0).all()
        full, rows = model.patch_embed(x) + model.pos_embed, []
        for i in range(3):
            tokens = full[i : i + 1, keep[i]]
            for u, block in enumerate(model.blocks):
                if u == model.local_up_to_layer:
                    tokens = torch.cat((model.cls_token, tokens), dim=1)
                if u < model.local_up_to_layer:  # a GPSA block
                    own, block.attn.rel_indices = block.attn.rel_indices, _positions(keep[i], 8)
                tokens = block(tokens)
                if u < model.local_up_to_layer:
                    block.attn.rel_indices = own
            rows.append(model.forward_head(model.norm(tokens)))
        torch.testing.assert_close(out, torch.cat(rows), rtol=0, atol=1e-12)
        assert all(b.attn.rel_indices.shape == (1, 64, 64, 3) for b in model.blocks[:2]), "the tables put back"
        assert torch.equal(wrapped(x), model(x)), "the main pass is the plain model"


def test_the_pixels_of_dropped_patches_do_not_reach_the_sub_pass():
    wrapped = masksub.wrap(tiny_model("timm_convit"), ratio=0.5).train()
    x = tiny_images("timm_convit", batch=2)
    with torch.no_grad():
        torch.manual_seed(3)
        out, keep = _kept(wrapped.model, x, wrapped)
        check_dropped_patch_pixels(wrapped, x, out, keep)


def test_the_sub_pass_costs_about_half_and_compiles_into_two_graphs():
    """Two graphs once the model has built its GPSA tables (its first call does: the plain model compiles into two
    graphs for one pass when compiled before it)."""
    x = tiny_images("timm_convit", batch=4)
    assert 0.4 < sub_flop_ratio(masksub.wrap(tiny_model("timm_convit"), ratio=0.5).train(), x) < 0.6
    model = tiny_model("timm_convit")
    model(x)
    assert compiled_graphs(masksub.wrap(model, ratio=0.5).train(), x) == 2


def test_the_mask_token_is_still_there_when_asked_for_and_unwrap_removes_the_hooks():
    assert masksub.wrap(tiny_model("timm_convit"), adapter="masktoken").branch.name == "masktoken"
    wrapped = masksub.wrap(tiny_model("timm_convit"))
    plain = wrapped.unwrap()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in plain.modules())
