"""Hugging Face BEiT and Data2VecVision: the sub pass drops patch tokens and gathers the relative position bias."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import sub_flop_ratio
from test_hf_vision import TINY_VIT

import masksub
from masksub.adapters.hf_relpos import BIASES
from masksub.adapters.text_families import transformers_version
from masksub.masking import num_keep

TINY = dict(
    TINY_VIT,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    layer_scale_init_value=1.0,  # the blocks must matter (0.1 by default)
    drop_path_rate=0.0,  # the passes compare exactly in training mode
)
# name -> (classifier, configuration, its base model's attribute, extra settings): every place a bias comes from
VARIANTS = {
    "beit": ("BeitForImageClassification", "BeitConfig", "beit", dict(use_relative_position_bias=True)),
    "beit_shared_abs": (
        "BeitForImageClassification",
        "BeitConfig",
        "beit",
        dict(use_shared_relative_position_bias=True, use_absolute_position_embeddings=True, use_mean_pooling=False),
    ),
    "data2vec": (
        "Data2VecVisionForImageClassification",
        "Data2VecVisionConfig",
        "data2vec_vision",
        dict(use_relative_position_bias=True),
    ),
    "data2vec_shared": (
        "Data2VecVisionForImageClassification",
        "Data2VecVisionConfig",
        "data2vec_vision",
        dict(use_shared_relative_position_bias=True),
    ),
}


def _model(variant: str, attn: str = "sdpa") -> torch.nn.Module:
    name, config, _, extra = VARIANTS[variant]
    torch.manual_seed(0)
    model = getattr(transformers, name)(getattr(transformers, config)(**TINY, **extra, attn_implementation=attn))
    with torch.no_grad():  # the tables start at zero: the bias must matter
        for n, p in model.named_parameters():
            if "relative_position_bias_table" in n:
                p.normal_()
    return model.train()


def _attending_to(model, base: str, x: torch.Tensor, index: torch.Tensor, **kwargs) -> torch.Tensor:
    """The model on every token, each attention's keys outside ``index`` (B, 1 + K) cut off with -inf, pooled and
    classified from the kept tokens: what running on the kept tokens alone must give."""
    keys = torch.full((len(x), 1 + (x.shape[-1] // 4) ** 2), float("-inf"), dtype=x.dtype).scatter(1, index, 0.0)
    biases = [m for m in model.modules() if type(m).__name__ in BIASES]
    handles = [m.register_forward_hook(lambda m, a, bias: bias + keys[:, None, None, :]) for m in biases]
    try:
        tokens = getattr(model, base)(pixel_values=x, **kwargs).last_hidden_state
        kept = tokens.gather(1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        return model.classifier(getattr(model, base).pooler(kept))
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_the_sub_pass_is_the_model_attending_to_the_kept_tokens_only(variant, attn):
    """A bias gathered by rows only, or one left for the full grid, failed this."""
    model = _model(variant, attn).double()
    base = VARIANTS[variant][2]
    wrapped = masksub.wrap(model, ratio=0.5)
    assert wrapped.branch.name == "hf_relpos" and wrapped.branch.masked_unit() == "4x4-pixel patch tokens"
    x = torch.rand(3, 3, 32, 32, dtype=torch.double)
    with torch.no_grad():
        sub = wrapped(pixel_values=x, sub=True).logits
        index = wrapped.branch._index
        assert index.shape == (3, 1 + num_keep(64, 0.5)) and (index[:, 0] == 0).all()
        assert (index[:, 1:].sort(1).values.diff(1) > 0).all(), "distinct patch tokens"
        expected = _attending_to(wrapped.unwrap(), base, x, index)
        assert (expected - model(pixel_values=x).logits).abs().max() > 1e-3, "the dropped tokens must matter"
    tol = 1e-9 if attn == "sdpa" else 1e-6  # transformers' eager attention takes its softmax in float32
    torch.testing.assert_close(sub, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("variant", ["beit", "data2vec_shared"])
def test_images_of_another_size_with_interpolate_pos_encoding(variant):
    """48-pixel images on a model built for 32: the bias modules build the 12x12 grid's bias and resize it to
    the sequence length they are given. The sub pass gives them the full length, then gathers: a bias resized
    to the kept length instead failed this."""
    model = _model(variant).double()
    wrapped = masksub.wrap(model, ratio=0.5)
    x = torch.rand(2, 3, 48, 48, dtype=torch.double)
    with torch.no_grad():
        sub = wrapped(pixel_values=x, interpolate_pos_encoding=True, sub=True).logits
        index = wrapped.branch._index
        assert index.shape == (2, 1 + num_keep(144, 0.5))
        expected = _attending_to(wrapped.unwrap(), VARIANTS[variant][2], x, index, interpolate_pos_encoding=True)
    torch.testing.assert_close(sub, expected, rtol=1e-9, atol=1e-9)


def test_pixels_of_dropped_patches_never_reach_the_sub_pass():
    wrapped = masksub.wrap(_model("beit"), ratio=0.5)
    x = torch.rand(2, 3, 32, 32) + 0.5
    torch.manual_seed(3)
    with torch.no_grad():
        sub = wrapped(pixel_values=x, sub=True).logits
    kept = wrapped.branch._index[0, 1:] - 1
    dropped = next(i for i in range(64) if i not in kept)
    for patch, changes in ((dropped, False), (kept[0].item(), True)):
        other = x.clone()
        row, col = divmod(patch, 8)
        other[0, :, 4 * row : 4 * row + 4, 4 * col : 4 * col + 4] = 2.0
        torch.manual_seed(3)
        with torch.no_grad():
            again = wrapped(pixel_values=other, sub=True).logits
        assert torch.equal(again[1], sub[1]) and torch.equal(again[0], sub[0]) != changes


def _grads(variant: str, checkpointing: bool) -> dict:
    model = _model(variant)
    if checkpointing:
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    wrapped = masksub.wrap(model, ratio=0.4)
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.0)  # .grad holds the step's gradient
    step = masksub.Step(wrapped, opt, torch.nn.CrossEntropyLoss(), memory_saving=False)  # one backward of both
    torch.manual_seed(7)
    step({"pixel_values": torch.rand(4, 3, 32, 32), "labels": torch.arange(4) % 3})
    return {n: p.grad.clone() for n, p in wrapped.named_parameters() if p.grad is not None}


@pytest.mark.skipif(
    transformers_version() < (4, 53),
    reason="transformers < 4.53's BEiT adds no relative position bias under gradient checkpointing (its own model)",
)
@pytest.mark.parametrize("variant", ["beit", "data2vec_shared"])
def test_one_backward_recomputes_each_pass_with_its_own_bias_under_checkpointing(variant):
    expected, found = _grads(variant, False), _grads(variant, True)
    assert found.keys() == expected.keys() and any("relative_position" in n for n in found)
    for n, g in expected.items():
        torch.testing.assert_close(found[n], g, rtol=1e-5, atol=1e-7, msg=n)


def test_the_sub_pass_costs_about_half_and_compiles_into_two_graphs():
    from conftest import compiled_graphs

    x = torch.rand(4, 3, 32, 32)
    assert 0.4 < sub_flop_ratio(masksub.wrap(_model("beit"), ratio=0.5), {"pixel_values": x}) < 0.6
    if transformers_version() < (4, 50):
        pytest.skip("transformers < 4.50's BEiT caches its position index in a dict: the plain model recompiles")
    wrapped = masksub.wrap(_model("beit"), ratio=0.5)
    assert compiled_graphs(wrapped, x) == 2


class Net(torch.nn.Module):
    def __init__(self, backbone):
        super().__init__()
        self.backbone, self.head = backbone, torch.nn.Linear(32, 3)

    def forward(self, x):
        return self.head(self.backbone(pixel_values=x).pooler_output)


def test_a_beit_model_under_a_head_of_the_users_drops_tokens_and_bad_inputs_are_refused():
    base = _model("beit").beit
    wrapped = masksub.wrap(Net(base), ratio=0.5)
    assert (wrapped.branch.name, wrapped.branch.target_name) == ("hf_relpos", "backbone")
    lengths = []
    layers = base.layers if hasattr(base, "layers") else base.encoder.layer  # transformers 5, or before
    layers[0].register_forward_pre_hook(lambda m, a: lengths.append(a[0].shape[1]))
    wrapped(torch.rand(2, 3, 32, 32), sub=True)
    assert lengths == [1 + num_keep(64, 0.5)]

    wrapped = masksub.wrap(_model("beit"), ratio=0.5)
    with pytest.raises(ValueError, match="not divisible by the patch size 4x4"):
        wrapped(pixel_values=torch.rand(2, 3, 30, 32), sub=True)
    with pytest.raises(ValueError, match="a given bool_masked_pos covers every patch token"):
        wrapped(pixel_values=torch.rand(2, 3, 32, 32), bool_masked_pos=torch.zeros(2, 64, dtype=torch.bool), sub=True)
    assert masksub.wrap(_model("beit"), adapter="hf_masktoken", unit=8).branch.name == "hf_masktoken"
