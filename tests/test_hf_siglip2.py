"""Hugging Face SigLIP 2 (NaFlex patches, padded batches): the sub pass keeps num_keep of each sample's own patches,
each with its position, and the attention, the pooling head and the classifier's mean see those only."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import sub_flop_ratio
from test_hf import Rows, _args

import masksub
from masksub.hf import MaskSubTrainer
from masksub.masking import num_keep

if not hasattr(transformers, "Siglip2Config"):  # transformers >= 4.49
    pytest.skip(f"transformers {transformers.__version__} has no SigLIP 2", allow_module_level=True)

COUNTS = [64, 60, 10, 2]  # each sample's own patches of 4x4 pixels, padded to 64
GRIDS = [[8, 8], [5, 12], [2, 5], [1, 2]]


def _siglip2():
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_patches=64, patch_size=4
    )
    config = transformers.Siglip2Config(vision_config=vision, text_config=dict(vocab_size=49408))
    config.num_labels = 3
    torch.manual_seed(0)
    return transformers.Siglip2ForImageClassification(config).train()


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.arange(64) < torch.tensor(COUNTS)[:, None]).int()
    pixels = (torch.rand(4, 64, 48, generator=g) * 2 - 1) * mask[..., None]  # the processor pads with zeros
    return {"pixel_values": pixels, "pixel_attention_mask": mask, "spatial_shapes": torch.tensor(GRIDS)}


def _observe(model):
    """Hooks that record the embedded tokens (registered before wrap: all of them), the tokens entering the encoder
    and the attention mask the vision model gets."""
    seen = {"embedded": [], "entering": [], "mask": []}
    vision = model.vision_model
    vision.embeddings.register_forward_hook(lambda m, a, out: seen["embedded"].append(out) and None)
    vision.encoder.layers[0].register_forward_pre_hook(lambda m, a: seen["entering"].append(a[0]) and None)
    vision.register_forward_pre_hook(
        lambda m, a, kw: seen["mask"].append(kw.get("pixel_attention_mask")) and None, with_kwargs=True
    )
    return seen


def _kept_positions(seen, padding):
    """(B, K) original sequence positions of the tokens that entered the encoder, from exact token matches (a padding
    token matches every padding position: they are all alike, and this gives the first)."""
    full, kept = seen["embedded"].pop(), seen["entering"].pop()
    match = (kept.unsqueeze(2) == full.unsqueeze(1)).all(-1)  # (B, K, N)
    real = match & ~padding.unsqueeze(1)
    assert (real.sum(-1) <= 1).all() and (match.sum(-1) >= 1).all(), "each token entering is one embedded token"
    assert ((real.sum(-1) == 1) | (match & padding.unsqueeze(1)).any(-1)).all()
    return match.float().argmax(-1)


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_each_sample_keeps_num_keep_of_its_own_patches_with_their_positions(ratio):
    model = _siglip2()
    seen = _observe(model)
    wrapped = masksub.wrap(model, ratio=ratio)
    assert wrapped.branch.name == "hf_siglip2" and wrapped.branch.masked_unit() == "4x4-pixel patch tokens"
    batch = _batch()
    torch.manual_seed(0)
    main = wrapped(**batch).logits
    torch.manual_seed(0)
    assert torch.equal(main, model(**batch).logits), "the main pass is the plain model"
    seen["embedded"].clear(), seen["entering"].clear(), seen["mask"].clear()
    with torch.no_grad():
        wrapped(**batch, sub=True)
    kept_mask = seen["mask"].pop()
    positions = _kept_positions(seen, batch["pixel_attention_mask"] == 0)
    assert positions.shape == (4, num_keep(64, ratio)) and kept_mask.shape == positions.shape
    assert kept_mask.sum(1).tolist() == [num_keep(n, ratio) for n in COUNTS]
    original = batch["pixel_attention_mask"].gather(1, positions)
    assert torch.equal(kept_mask, original), "the mask the model gets flags the kept tokens as they were"
    for row, flags in zip(positions, kept_mask):
        assert len(set(row[flags.bool()].tolist())) == int(flags.sum()), "distinct patches"


def test_the_logits_ignore_the_dropped_patches_and_see_the_kept_ones():
    """Under one seed (the same kept patches), new pixels in dropped patches or padding leave the sub pass's logits
    as they were; in a kept patch, they change them. Pooling over the full mask would see the dropped tokens."""
    model = _siglip2()
    seen = _observe(model)
    wrapped = masksub.wrap(model, ratio=0.5)
    batch = _batch()

    def sub(pixels):
        torch.manual_seed(5)
        with torch.no_grad():
            return wrapped(**{**batch, "pixel_values": pixels}, sub=True).logits

    before = sub(batch["pixel_values"])
    kept = torch.zeros(4, 64, dtype=torch.bool).scatter_(
        1, _kept_positions(seen, batch["pixel_attention_mask"] == 0), True
    )
    kept &= batch["pixel_attention_mask"].bool()
    noise = torch.rand(4, 64, 48)
    dropped = batch["pixel_values"] + noise * (~kept)[..., None]
    torch.testing.assert_close(sub(dropped), before, rtol=0, atol=0)
    assert not torch.allclose(sub(batch["pixel_values"] + noise * kept[..., None]), before)


def test_the_trainer_trains_siglip2_on_processor_batches_at_about_half_the_flops(tmp_path):
    import numpy as np

    processor = transformers.Siglip2ImageProcessor(patch_size=4, max_num_patches=64)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in [(32, 32), (20, 48), (64, 16), (24, 40)]]
    data = {**processor(images=images * 2, return_tensors="pt"), "labels": torch.arange(8) % 3}
    model = _siglip2()
    lengths = []
    model.vision_model.encoder.register_forward_pre_hook(
        lambda m, a, kw: lengths.append(kw["inputs_embeds"].shape[1]), with_kwargs=True
    )
    trainer = MaskSubTrainer(model=model, args=_args(tmp_path, learning_rate=1e-3), train_dataset=Rows(data))
    assert trainer.sub_branch.name == "hf_siglip2"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.train()
    assert sorted(set(lengths)) == [32, 64]
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    wrapped = masksub.wrap(_siglip2(), ratio=0.5)
    assert 0.4 < sub_flop_ratio(wrapped, {k: v[:4] for k, v in data.items() if k != "labels"}) < 0.65


def test_images_instead_of_patches_are_refused_and_unwrap_leaves_no_hook():
    wrapped = masksub.wrap(_siglip2())
    with pytest.raises(ValueError, match=r"takes patches, pixel_values \(B, N, C\*P\*P\) .* got \(2, 3, 32, 32\)"):
        wrapped(pixel_values=torch.rand(2, 3, 32, 32), spatial_shapes=torch.tensor([[8, 8]] * 2), sub=True)
    out = wrapped(*_batch().values(), sub=True).logits  # by position, in the classifier's order
    assert out.shape == (4, 3)
    wrapped.unwrap()
    assert not wrapped.model.vision_model.embeddings._forward_hooks
