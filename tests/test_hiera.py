"""timm's Hiera: the sub pass drops whole mask units (pixels and tokens), as its MAE pretraining does.

Exact counts at every ratio, the adapter's resolution, main-pass equality and the memory-saving step's
gradients run with every family (tests/test_adapters.py, test_model.py, test_step.py); here is what is
Hiera's own.
"""

from __future__ import annotations

import pytest
import torch
from conftest import compiled_graphs, sub_flop_ratio, tiny_images, tiny_model

import masksub


def _kept_units(wrapped, x, seed):
    """The sub-pass logits under ``seed`` and the (B, 2, 3) mask units it kept."""
    kept = []
    hook = wrapped.model.blocks[0].register_forward_pre_hook(lambda m, a: kept.append(wrapped.branch._kept.clone()))
    torch.manual_seed(seed)
    with torch.no_grad():
        out = wrapped(x, sub=True)
    hook.remove()
    mask = torch.zeros(x.shape[0], 6, dtype=torch.bool).scatter_(1, kept[0], True)
    return out, mask.view(x.shape[0], 2, 3)


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_the_sub_pass_is_timms_own_masked_forward_with_the_head(ratio):
    """timm's ``forward_features(x, mask)`` (its MAE path) and then the head, with the units the sub pass kept:
    the same tokens in the same order, so the early stages' mask-unit attention attends within units."""
    wrapped = masksub.wrap(tiny_model("hiera"), ratio=ratio).train()
    x = tiny_images("hiera", batch=4)
    out, kept = _kept_units(wrapped, x, seed=5)
    with torch.no_grad():
        expected = wrapped.model.forward_head(wrapped.model.forward_features(x, mask=kept.flatten(1)))
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_kept_tokens_carry_nothing_of_the_dropped_units_pixels():
    """New pixels in the dropped units leave the sub pass's output as it was; in a kept unit they change it. The
    patch convolution (7x7 at stride 4) reaches 3 pixels into the neighbouring units: those are zeroed first."""
    wrapped = masksub.wrap(tiny_model("hiera"), ratio=0.5).train()
    x = tiny_images("hiera", batch=4)
    out, kept = _kept_units(wrapped, x, seed=3)
    pixels = kept.repeat_interleave(32, 1).repeat_interleave(32, 2).unsqueeze(1).expand_as(x)  # (B, 3, 64, 96)
    assert (~kept).flatten(1).sum(1).tolist() == [3] * 4
    noise = torch.rand_like(x) * 5
    again, kept_again = _kept_units(wrapped, torch.where(pixels, x, noise), seed=3)
    assert torch.equal(kept_again, kept)
    torch.testing.assert_close(again, out, rtol=1e-5, atol=1e-6)
    changed, _ = _kept_units(wrapped, torch.where(pixels, noise, x), seed=3)
    assert (changed - out).abs().amax(-1).min() > 1e-4, "every sample's output must depend on its kept units"


def test_the_sub_pass_costs_about_half_at_ratio_half():
    """FLOPs of forward and backward (the patch convolution runs on the whole image, so a little over half)."""
    wrapped = masksub.wrap(tiny_model("hiera"), ratio=0.5).train()
    assert 0.45 < sub_flop_ratio(wrapped, tiny_images("hiera", batch=4)) < 0.65


def test_the_models_own_unit_dropping_is_off_in_the_sub_pass_and_restored():
    model = tiny_model("hiera", patch_drop_rate=0.25)
    wrapped = masksub.wrap(model, ratio=0.5).train()
    lengths = []
    model.blocks[0].register_forward_pre_hook(lambda m, a: lengths.append(a[0].shape[1]))
    x = tiny_images("hiera", batch=2)
    wrapped(x, sub=True)  # 3 of 6 units kept, not 3 and then 25% of those
    wrapped(x)  # the main pass: the model's own patch dropout, 4 of 6 units
    assert lengths == [3 * 64, 4 * 64] and model.patch_drop_rate == 0.25


def test_images_of_another_size_or_of_one_mask_unit_are_refused():
    wrapped = masksub.wrap(tiny_model("hiera")).train()
    with pytest.raises(ValueError, match="built for 64x96 images .* got 64x64"):
        wrapped(torch.rand(2, 3, 64, 64), sub=True)
    one = masksub.wrap(tiny_model("hiera", img_size=32)).train()
    with pytest.raises(ValueError, match="holds 1 of the model's mask units .* adapter='pixels'"):
        one(torch.rand(2, 3, 32, 32), sub=True)
    with pytest.raises(ValueError, match=r"image batch \(B, C, H, W\)"):
        wrapped(torch.randint(0, 100, (2, 16)), sub=True)


def test_unwrap_leaves_no_hook():
    model = tiny_model("hiera")
    wrapped = masksub.wrap(model, ratio=0.5)
    x = tiny_images("hiera", batch=2)
    expected = model.eval()(x)
    wrapped.unwrap()
    assert not model.patch_embed._forward_pre_hooks and not model.unroll._forward_hooks
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_the_wrapper_compiles_into_two_graphs_without_breaks():
    """The kept units are gathered with shapes known before the pass: timm's boolean selection does not trace."""
    wrapped = masksub.wrap(tiny_model("hiera"), ratio=0.5).train()
    assert compiled_graphs(wrapped, tiny_images("hiera", batch=4)) == 2


def _hf_hiera(**extra):
    import transformers

    torch.manual_seed(0)
    config = transformers.HieraConfig(
        image_size=[64, 96], embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], num_labels=3, **extra
    )
    return transformers.HieraForImageClassification(config).train()


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_hugging_face_hiera_sub_pass_is_its_own_mae_path_with_the_classifier(ratio):
    """The classifier's sub pass equals Hugging Face's MAE-mode HieraModel (same weights) given noise that keeps
    the same units, then the classifier: exact counts, the dropped units' pixels zeroed, tokens in its order."""
    import transformers

    from masksub.masking import num_keep

    model = _hf_hiera()
    wrapped = masksub.wrap(model, ratio=ratio)
    assert wrapped.branch.name == "hf_hiera" and wrapped.branch.masked_unit() == "32x32-pixel mask units"
    kept, lengths = [], []
    model.hiera.encoder.register_forward_pre_hook(
        lambda m, a, kw: kept.append(wrapped.branch._kept.clone()) or lengths.append(a[0].shape[1]), with_kwargs=True
    )
    x = tiny_images("hiera", batch=4)
    with torch.no_grad():
        out = wrapped(pixel_values=x, sub=True).logits
    keep = num_keep(6, ratio)
    assert kept[0].shape == (4, keep) and lengths == [keep * 64]
    mae_config = transformers.HieraConfig(**{**model.config.to_dict(), "mask_ratio": 1 - keep / 6 - 1e-6})
    mae = transformers.HieraModel(mae_config, is_mae=True).train()
    mae.load_state_dict(model.hiera.state_dict())
    noise = torch.ones(4, 6).scatter_(1, kept[0], 0.0)  # the lowest noise is kept
    with torch.no_grad():
        expected = model.classifier(mae(x, noise=noise).pooler_output)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_hugging_face_hiera_trains_in_step_at_about_half_the_flops():
    wrapped = masksub.wrap(_hf_hiera(), ratio=0.5)
    x = tiny_images("hiera", batch=4)
    assert 0.45 < sub_flop_ratio(wrapped, {"pixel_values": x}) < 0.65
    before = {n: p.detach().clone() for n, p in wrapped.named_parameters()}
    step = masksub.Step(wrapped, torch.optim.SGD(wrapped.parameters(), lr=0.1), torch.nn.CrossEntropyLoss())
    step({"pixel_values": x, "labels": torch.tensor([0, 1, 2, 0])})
    assert all(not torch.equal(before[n], p) for n, p in wrapped.named_parameters() if n.endswith("classifier.weight"))
    with pytest.raises(ValueError, match="built for 64x96 images .* got 64x64"):
        wrapped(pixel_values=torch.rand(2, 3, 64, 64), sub=True)
    wrapped.unwrap()
    assert not wrapped.model.hiera.embeddings.patch_embeddings._forward_hooks


def test_hugging_face_hiera_trains_in_the_trainer_with_the_sub_pass_on_half_the_units(tmp_path):
    """MaskSubTrainer picks hf_hiera by itself; each step runs the full grid once and half the units once."""
    from test_hf import Rows, _args

    from masksub.hf import MaskSubTrainer

    model = _hf_hiera()
    lengths = []
    model.hiera.encoder.register_forward_pre_hook(lambda m, a: lengths.append(a[0].shape[1]) and None)
    data = {"pixel_values": tiny_images("hiera", batch=8), "labels": torch.arange(8) % 3}
    trainer = MaskSubTrainer(model=model, args=_args(tmp_path, learning_rate=1e-3), train_dataset=Rows(data))
    assert trainer.sub_branch.name == "hf_hiera"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.train()
    steps = trainer.state.global_step
    assert steps >= 1 and sorted(set(lengths)) == [3 * 64, 6 * 64] and lengths.count(3 * 64) == steps
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
