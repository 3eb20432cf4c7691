"""timm's BEiT and vit_relpos: the sub pass drops patch tokens and each attention gets the kept tokens' bias."""

from __future__ import annotations

import copy
import pickle

import pytest
import timm
import torch
from conftest import VIT, compiled_graphs, sub_flop_ratio, tiny_images, tiny_model

import masksub
from masksub.adapters.relpos import _bias_sources, gather_bias
from masksub.masking import num_keep

# (timm model, kwargs): every place a relative bias comes from, with and without a class token
VARIANTS = {
    "beit": ("beit_base_patch16_224", {}),  # a table in each attention, class token, mean pool
    "beit_shared": ("beit_base_patch16_224", dict(use_rel_pos_bias=False, use_shared_rel_pos_bias=True)),
    "beit_abs_token": ("beit_base_patch16_224", dict(use_abs_pos_emb=True, global_pool="token")),
    "vit_relpos": ("vit_relpos_small_patch16_224", {}),  # an MLP per attention, no class token
    "vit_relpos_cls": ("vit_relpos_medium_patch16_cls_224", {}),  # class token, token pool
    "vit_relpos_bias": ("vit_relpos_small_patch16_rpn_224", {}),  # a table per attention, post-norm blocks
    "vit_srelpos": ("vit_srelpos_small_patch16_224", {}),  # one MLP shared by all blocks
}


def _model(variant: str, fused: bool = True) -> torch.nn.Module:
    name, kwargs = VARIANTS[variant]
    torch.manual_seed(0)
    model = timm.create_model(name, **{**VIT, **kwargs}).double()
    with torch.no_grad():  # tables start at zero, heads and layer scales near it: the bias and the blocks must matter
        for n, p in model.named_parameters():
            if "relative_position_bias_table" in n or n.startswith("head."):
                p.normal_()
            elif "gamma" in n:
                p.fill_(1.0)
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused
        if isinstance(m, torch.nn.Dropout):  # vit_relpos's bias MLP drops 1/8 of its hidden units in training
            m.p = 0.0
    return model


def _attending_to(model: torch.nn.Module, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The model on every token, each attention's keys outside ``index`` (B, P + K) (rows of the bias) cut off
    with -inf, its output read at the kept tokens: what running on the kept tokens alone must give."""
    keys = torch.full(index.shape[:1] + (model.num_prefix_tokens + model.patch_embed.num_patches,), float("-inf"))
    cut = keys.double().scatter(1, index, 0.0)[:, None, None, :]  # (B, 1, 1, N)
    per_block, shared = _bias_sources(model)
    handles = []
    for _, owner, method in per_block or [(None, *shared[0])]:
        if method:
            setattr(owner, method, (lambda f: lambda: f() + cut)(getattr(owner, method)))
        else:
            handles.append(owner.register_forward_hook(lambda m, a, bias: bias + cut))
    try:
        tokens = model.forward_features(x)
        return model.forward_head(tokens.gather(1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])))
    finally:
        for handle in handles:
            handle.remove()
        for _, owner, method in per_block or [(None, *shared[0])]:
            if method:
                delattr(owner, method)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_the_sub_pass_is_the_model_attending_to_the_kept_tokens_only(variant, fused):
    """Tokens dropped, the bias gathered: each kept token attends to the kept ones with the bias of its own
    relative position. A bias gathered by rows only, or its class-token row skipped, failed this."""
    model = _model(variant, fused)
    wrapped = masksub.wrap(model, ratio=0.5).train()
    assert wrapped.branch.name == "relpos"
    x = tiny_images("vit", batch=3).double()
    with torch.no_grad():
        sub = wrapped(x, sub=True)
        index = wrapped.branch._index
        prefix = model.num_prefix_tokens
        assert index.shape == (3, prefix + num_keep(64, 0.5))
        assert (index[:, :prefix] == torch.arange(prefix)).all(), "the class token is always kept"
        expected = _attending_to(wrapped.unwrap(), x, index)
        assert (expected - model(x)).abs().max() > 1e-3, "the dropped tokens must matter to the model"
    torch.testing.assert_close(sub, expected, rtol=1e-9, atol=1e-9)


def test_gather_bias_takes_rows_and_columns_per_sample():
    bias = torch.randn(1, 2, 5, 5)
    index = torch.tensor([[0, 3, 1], [4, 2, 0]])
    got = gather_bias(bias, index)
    for b in range(2):
        torch.testing.assert_close(got[b], bias[0][:, index[b]][:, :, index[b]], rtol=0, atol=0)
    torch.testing.assert_close(gather_bias(bias[0], index), got, rtol=0, atol=0)  # a bias without a batch dim


@pytest.mark.parametrize("name", ["beit", "vit_relpos"])
def test_pixels_of_dropped_patches_never_reach_the_sub_pass(name):
    wrapped = masksub.wrap(tiny_model(name), ratio=0.5).train()
    x = tiny_images(name, batch=2)
    torch.manual_seed(3)
    with torch.no_grad():
        sub = wrapped(x, sub=True)
    kept = wrapped.branch._index[:, wrapped.model.num_prefix_tokens :] - wrapped.model.num_prefix_tokens
    dropped = next(i for i in range(64) if i not in kept[0])
    for patch, changes in ((dropped, False), (kept[0, 0].item(), True)):
        other = x.clone()
        row, col = divmod(patch, 8)
        other[0, :, 4 * row : 4 * row + 4, 4 * col : 4 * col + 4] = 2.0
        torch.manual_seed(3)
        with torch.no_grad():
            again = wrapped(other, sub=True)
        assert torch.equal(again[1], sub[1])
        assert torch.equal(again[0], sub[0]) != changes


@pytest.mark.parametrize("name", ["beit", "vit_relpos"])
def test_the_sub_pass_costs_about_half_and_compiles_into_two_graphs(name):
    x = tiny_images(name, batch=4)
    assert 0.4 < sub_flop_ratio(masksub.wrap(tiny_model(name), ratio=0.5).train(), x) < 0.6
    assert compiled_graphs(masksub.wrap(tiny_model(name), ratio=0.5).train(), x) == 2


def test_a_recomputed_block_of_a_sub_pass_that_is_not_the_last_one_is_refused():
    """With activation checkpointing, the backward runs each block of a sub pass again, with the kept tokens of
    the last sub pass: one of another length is refused, naming the fix."""
    model = tiny_model("beit")
    model.set_grad_checkpointing(True)
    wrapped = masksub.wrap(model, ratio=0.5).train()
    x = tiny_images("beit", batch=2)
    first = wrapped(x, sub=True)
    wrapped.ratio = 0.25
    wrapped(x, sub=True)
    with pytest.raises(RuntimeError, match="got 33 tokens .* last sub pass kept 49: run each sub pass's backward"):
        first.sum().backward()


def test_unwrap_leaves_the_plain_model():
    model = tiny_model("beit", use_shared_rel_pos_bias=True)
    x = tiny_images("beit", batch=2)
    with torch.no_grad():
        before = model(x)
    wrapped = masksub.wrap(model, ratio=0.5).train()
    wrapped(x, sub=True)
    plain = wrapped.unwrap().eval()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in plain.modules())
    assert not any("_get_rel_pos_bias" in vars(m) for m in plain.modules())
    with torch.no_grad():
        assert torch.equal(plain(x), before)


def test_a_copied_or_pickled_wrapped_model_masks_alike_with_its_own_adapter():
    """EMA deep-copies the model, and torch.save(model) pickles it: each copy's attention asks its own adapter for
    the bias, and the original class's method computes it (a pickled bound method came back as the override)."""
    wrapped = masksub.wrap(tiny_model("beit"), ratio=0.5).train()
    x = tiny_images("beit", batch=2)
    for other in (copy.deepcopy(wrapped), pickle.loads(pickle.dumps(wrapped))):
        torch.manual_seed(5)
        expected = wrapped(x, sub=True)
        torch.manual_seed(5)
        assert torch.equal(other(x, sub=True), expected)
        assert other.branch._index is not wrapped.branch._index
        assert torch.equal(other(x), wrapped(x))
