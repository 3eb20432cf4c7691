"""timm's Gemma 4 vision tower: the sub pass is the model on the kept patches, each at its own position."""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import TINY, compiled_graphs, sub_flop_ratio, tiny_images, tiny_model
from test_adapters import _naflex_batch

import masksub
from masksub.masking import num_keep

pytest.importorskip("timm.models.gemma4_vit")


def _kept_positions(wrapped):
    """The (x, y) positions of the tokens each sub pass keeps, seen after the adapter's hook (registered later)."""
    seen = []
    wrapped.model.encoder.patch_embed.register_forward_hook(lambda m, a, out: seen.append(out[1].clone()) and None)
    return seen


def _patches(x, patch=4):
    """(B, C, H, W) -> NaFlex's (B, N, ph, pw, C) patches in row-major order and their (y, x) coordinates."""
    b, c, h, w = x.shape
    patches = x.view(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 3, 5, 1)
    ys, xs = torch.meshgrid(torch.arange(h // patch), torch.arange(w // patch), indexing="ij")
    return patches.reshape(b, -1, patch, patch, c), torch.stack((ys.flatten(), xs.flatten()), -1).expand(b, -1, -1)


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_the_sub_pass_is_the_model_given_the_kept_patches_with_their_coordinates(ratio):
    """Exact counts, and the logits of the model's own patch input (NaFlex style) holding the kept patches only:
    the kept tokens keep their position embedding and RoPE, and the pool averages them."""
    wrapped = masksub.wrap(tiny_model("gemma4"), ratio=ratio).train()
    seen = _kept_positions(wrapped)
    x = tiny_images("gemma4", batch=4)
    with torch.no_grad():
        out = wrapped(x, sub=True)
        kept = seen.pop().flip(-1)  # (B, K, 2): internal (x, y) -> NaFlex (y, x)
        assert kept.shape == (4, num_keep(64, ratio), 2)
        index = kept[..., 0] * 8 + kept[..., 1]
        assert (index.sort(1).values.diff(dim=1) > 0).all(), "distinct patches"
        patches, coord = _patches(x)
        patches = patches.gather(1, index[:, :, None, None, None].expand(-1, -1, 4, 4, 3))
        coord = coord.gather(1, index[..., None].expand(-1, -1, 2))
        expected = wrapped.model({"patches": patches, "patch_coord": coord})
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
@pytest.mark.parametrize("kind", ["classifier", "encoder"])
def test_padded_patch_batches_keep_exact_counts_of_each_samples_valid_patches(kind, ratio):
    """timm's NaFlex loader pads samples to one length: each keeps num_keep of its own valid patches (the classifier
    is handed the kept patches, the encoder's hook keeps them), and those are distinct patches of its own grid."""
    sizes = [(32, 32), (16, 48), (8, 20), (4, 8)]  # 64, 48, 10 and 2 valid patches of 4x4 pixels
    batch, _ = _naflex_batch(sizes)
    model = tiny_model("gemma4")
    if kind == "encoder":
        model = timm.create_model("gemma4_vit_167m_enc", **{**TINY["gemma4"][1], "num_classes": 0}, global_pool="avg")
    wrapped = masksub.wrap(model, ratio=ratio).train()
    seen = []
    embed = model.encoder.patch_embed if kind == "classifier" else model.patch_embed
    embed.register_forward_hook(lambda m, a, out: seen.append(out))
    torch.manual_seed(0)
    main = wrapped(batch)
    torch.manual_seed(0)
    assert torch.equal(main, wrapped.model(batch)), "the main pass is the plain model on the dict"
    for _ in range(3):
        with torch.no_grad():
            sub = wrapped(batch, sub=True)
        assert sub.shape == main.shape and sub.isfinite().all()
        _, positions, padding = seen[-1]
        assert positions.shape[1] == num_keep(64, ratio)
        valid = ~padding
        assert valid.sum(1).tolist() == [num_keep(n, ratio) for n in (64, 48, 10, 2)]
        for i, (h, w) in enumerate(sizes):  # distinct patches of the sample's own grid
            xy = positions[i][valid[i]]
            assert (xy[:, 0] < w // 4).all() and (xy[:, 1] < h // 4).all()
            assert len({tuple(p) for p in xy.tolist()}) == len(xy)


def test_the_sub_pass_costs_about_half_and_compiles_into_two_graphs():
    x = tiny_images("gemma4", batch=4)
    assert 0.45 < sub_flop_ratio(masksub.wrap(tiny_model("gemma4"), ratio=0.5).train(), x) < 0.65
    assert compiled_graphs(masksub.wrap(tiny_model("gemma4"), ratio=0.5).train(), x) == 2


def test_pools_that_need_every_token_and_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="encoder_pool='soft' bins the tokens .* encoder_pool=''"):
        masksub.wrap(tiny_model("gemma4", encoder_pool="soft"))
    with pytest.raises(ValueError, match="global_pool='' returns one output per patch token.* global_pool='avg'"):
        masksub.wrap(tiny_model("gemma4", global_pool=""))
    wrapped = masksub.wrap(tiny_model("gemma4")).train()
    with pytest.raises(ValueError, match="not divisible by the patch size 4x4"):
        wrapped(torch.rand(2, 3, 30, 32), sub=True)
    patches, coord = _patches(tiny_images("gemma4", batch=2))
    with pytest.raises(ValueError, match="not images with coordinates"):
        wrapped(tiny_images("gemma4", batch=2), patch_coord=coord, sub=True)
    with pytest.raises(ValueError, match="without patch_coord"):
        wrapped(patches, sub=True)
    wrapped.unwrap()
    assert not wrapped.model.encoder.patch_embed._forward_hooks
