"""timm's Qwen3 and DeepSeek vision towers: the sub pass is the model on the kept tokens, each at its own position."""

from __future__ import annotations

import copy
import pickle

import pytest
import timm
import torch
from conftest import TINY, VIT, check_dropped_patch_pixels, compiled_graphs, sub_flop_ratio, tiny_images, tiny_model

import masksub
from masksub.masking import num_keep

pytest.importorskip("timm.models.qwen3_vit")
pytest.importorskip("timm.models.deepseek_vit")

ENCODERS = {"qwen3": "qwen3_vit_88m_enc", "deepseek": "deepseek_vit_412m_enc"}


def _tower(name: str, kind: str) -> torch.nn.Module:
    if kind == "classifier":
        return tiny_model(name).double()
    torch.manual_seed(0)
    kwargs = {k: v for k, v in TINY[name][1].items() if k != "num_classes"}
    return timm.create_model(ENCODERS[name], **kwargs, global_pool="avg").double()


def _kept_indices(encoder, x, wrapped):
    """Run the sub pass; the patch indices (B, K) it kept, found by matching the tokens entering the first block
    against the tokens with their positions."""
    seen = []
    handle = encoder.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    out = wrapped(x, sub=True)
    handle.remove()
    full = encoder._pos_embed(encoder.patch_embed(x))[0]
    match = (seen[0].unsqueeze(2) == full.unsqueeze(1)).all(-1)  # (B, K, N)
    assert (match.sum(-1) == 1).all()
    return out, match.int().argmax(-1)


def _alone(encoder, x, keep):
    """Each sample's kept tokens run alone through the blocks, with their own rows of the model's (unbatched) RoPE
    table: (1, K, C) per sample."""
    full, rope = encoder._pos_embed(encoder.patch_embed(x))
    for i in range(len(x)):
        tokens = full[i : i + 1, keep[i]]
        for block in encoder.blocks:
            tokens = block(tokens, rope=rope[keep[i]])
        yield tokens


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
@pytest.mark.parametrize("kind", ["classifier", "encoder"])
@pytest.mark.parametrize("name", ["qwen3", "deepseek"])
def test_the_sub_pass_is_the_model_on_the_kept_tokens_with_their_positions(name, kind, ratio):
    """Each sample, run alone through the blocks on its kept tokens with their own rows of the 2D RoPE table
    (the table the model makes, unbatched): the same output, and exactly num_keep distinct patches kept."""
    model = _tower(name, kind)
    wrapped = masksub.wrap(model, ratio=ratio).train()
    assert wrapped.branch.name == "vlm_tower"
    encoder = model.encoder if kind == "classifier" else model
    x = tiny_images(name, batch=3).double()
    with torch.no_grad():
        out, keep = _kept_indices(encoder, x, wrapped)
        assert keep.shape == (3, num_keep(64, ratio))
        assert (keep.sort(1).values.diff(dim=1) > 0).all(), "distinct patches"
        rows = []
        for tokens in _alone(encoder, x, keep):
            tokens = encoder.norm(tokens) if hasattr(encoder, "norm") else tokens
            rows.append(model.forward_head(tokens) if kind == "classifier" else tokens.mean(1))
        torch.testing.assert_close(out, torch.cat(rows), rtol=0, atol=1e-12)
        assert torch.equal(wrapped(x), model(x)), "the main pass is the plain model"


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
@pytest.mark.parametrize("kind", ["classifier", "encoder"])
def test_qwen3s_projector_merges_each_kept_block_as_in_the_main_pass(kind, ratio):
    """With the VLM projector (merge_size 2), the sub pass keeps num_keep of the 16 blocks of 2x2 tokens, whole;
    each sample's kept tokens, run alone through the blocks with their RoPE rows, then each block merged by the
    projector on its own 2x2 grid, give the same output (the classifier's mean of them, or the encoder's tokens)."""
    torch.manual_seed(0)
    if kind == "classifier":
        model = tiny_model("qwen3", encoder_pool="merge").double()
    else:
        model = timm.create_model(ENCODERS["qwen3"], **{**TINY["qwen3"][1], "num_classes": 0}).double()
    wrapped = masksub.wrap(model, ratio=ratio).train()
    assert wrapped.branch.name == "vlm_tower" and "masks 8x8-pixel merge blocks" in repr(wrapped.branch)
    encoder = getattr(model, "encoder", model)
    x = tiny_images("qwen3", batch=3).double()
    with torch.no_grad():
        out, keep = _kept_indices(encoder, x, wrapped)
        blocks = keep // 16 * 4 + keep % 8 // 2  # the 2x2 block (of a 4x4 grid of them) each kept token is in
        per_block = blocks.view(3, -1, 4)
        assert (per_block == per_block[..., :1]).all(), "whole blocks, each block's tokens together"
        assert len({b for b in per_block[0, :, 0].tolist()}) == per_block.shape[1] == num_keep(16, ratio)
        rows = []
        for tokens in _alone(encoder, x, keep):
            merged = torch.cat([encoder.merger(t.view(1, 2, 2, -1)) for t in tokens.view(-1, 4, tokens.shape[-1])], 1)
            rows.append(model.forward_head(merged) if kind == "classifier" else merged)
        torch.testing.assert_close(out, torch.cat(rows), rtol=0, atol=1e-12)
        assert torch.equal(wrapped(x), model(x)), "the main pass is the plain model"
    with pytest.raises(ValueError, match="not divisible by the patch size 8x8"):
        wrapped(torch.rand(2, 3, 36, 32, dtype=torch.float64), sub=True)
    with pytest.raises(ValueError, match=f"holds 1 of the projector's 8x8-pixel merge blocks, and ratio {ratio} drops"):
        wrapped(torch.rand(2, 3, 8, 8, dtype=torch.float64), sub=True)


@pytest.mark.parametrize("name", ["qwen3", "deepseek"])
def test_the_pixels_of_dropped_patches_do_not_reach_the_sub_pass(name):
    wrapped = masksub.wrap(tiny_model(name), ratio=0.5).train()
    x = tiny_images(name, batch=2)
    with torch.no_grad():
        torch.manual_seed(3)
        out, keep = _kept_indices(wrapped.model.encoder, x, wrapped)
        check_dropped_patch_pixels(wrapped, x, out, keep)


@pytest.mark.parametrize("name", ["qwen3", "qwen3_merge", "deepseek"])
def test_the_sub_pass_costs_about_half_and_compiles_into_two_graphs(name):
    x = tiny_images(name, batch=4)
    assert 0.45 < sub_flop_ratio(masksub.wrap(tiny_model(name), ratio=0.5).train(), x) < 0.6
    assert compiled_graphs(masksub.wrap(tiny_model(name), ratio=0.5).train(), x) == 2


def test_summed_loss_under_activation_checkpointing_recomputes_each_pass_with_its_own_tokens():
    """The sub pass checkpoints its blocks where the model does: the backward runs each block again, for the
    main pass's 64 tokens and the sub pass's 32, and the gradients are those without checkpointing."""

    def grads(checkpointing):
        model = tiny_model("qwen3")
        model.set_grad_checkpointing(checkpointing)
        wrapped = masksub.wrap(model, ratio=0.5).train()
        x = tiny_images("qwen3", batch=4)
        torch.manual_seed(0)
        main = wrapped(x)
        sub = wrapped(x, sub=True)
        lengths = []
        model.encoder.blocks[1].register_forward_pre_hook(lambda m, a: lengths.append(a[0].shape[1]))
        (main.logsumexp(-1).sum() + (sub * main.detach().softmax(-1)).sum()).backward()
        assert sorted(lengths) == ([32, 64] if checkpointing else [])
        return {n: p.grad for n, p in model.named_parameters()}

    expected, found = grads(False), grads(True)
    for n, g in expected.items():
        torch.testing.assert_close(found[n], g, rtol=1e-5, atol=1e-7, msg=n)


def test_deepseek_pads_any_image_size_in_the_sub_pass_and_qwen3_refuses_one_off_the_patch_grid():
    wrapped = masksub.wrap(tiny_model("deepseek", dynamic_img_pad=True), ratio=0.5).train()
    lengths = []
    wrapped.model.encoder.blocks[0].register_forward_pre_hook(lambda m, a: lengths.append(a[0].shape[1]))
    x = torch.rand(2, 3, 30, 34)  # 8x9 patches of 4 pixels after padding
    assert wrapped(x).shape == wrapped(x, sub=True).shape == (2, 5)
    assert lengths == [72, num_keep(72, 0.5)]
    with pytest.raises(ValueError, match="30x32 is not divisible by the patch size 4x4"):
        masksub.wrap(tiny_model("qwen3")).train()(torch.rand(2, 3, 30, 32), sub=True)


@pytest.mark.parametrize(
    "name,settings",
    [
        ("qwen3", {"global_pool": ""}),
        ("deepseek", {"global_pool": ""}),
        ("deepseek", {"encoder_pool": "align", "out_features": 16}),
    ],
)
def test_pools_over_the_full_grid_keep_the_pixel_adapter_and_say_why_when_asked_for_tokens(name, settings):
    model = tiny_model(name, **settings)
    assert masksub.wrap(model).branch.name == "pixels"
    key, value = next(iter(settings.items()))
    needed = "avg" if key == "global_pool" else ""  # the first setting the message names
    with pytest.raises(ValueError, match=f"built with {key}={value!r}.*build it with {key}={needed!r}"):
        masksub.wrap(model, adapter="vlm_tower")


def test_unwrap_restores_and_a_copied_or_pickled_wrapped_model_masks_alike_with_its_own_adapter():
    wrapped = masksub.wrap(tiny_model("qwen3"), ratio=0.5).train()
    x = tiny_images("qwen3", batch=2)
    for other in (copy.deepcopy(wrapped), pickle.loads(pickle.dumps(wrapped))):
        torch.manual_seed(5)
        expected = wrapped(x, sub=True)
        torch.manual_seed(5)
        assert torch.equal(other(x, sub=True), expected)
        assert other.model.encoder.forward_features.args[0] is other.model.encoder
        assert torch.equal(other(x), wrapped(x))
    encoder = wrapped.model.encoder
    wrapped.unwrap()
    assert "forward_features" not in vars(encoder)
    assert encoder.forward_features(x).shape == (2, 8, 8, VIT["embed_dim"])
