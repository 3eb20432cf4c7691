"""The DMJD model: it learns, its visible branch pairs each token with its own patch's target."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from torch import nn

from masksub.masking import gather_tokens
from masksub.pretrain.model import DMJD

ENC = dict(img_size=32, patch_size=8, embed_dim=32, num_heads=2, num_classes=0)


def tiny(method="dmjd", depth=2, **kw) -> DMJD:
    torch.manual_seed(0)
    enc = timm.create_model("vit_tiny_patch16_224", depth=depth, **ENC)
    return DMJD(enc, method=method, decoder_dim=32, decoder_depth=1, decoder_heads=2, projector_dim=32, **kw)


@pytest.mark.parametrize("method, target", [("dmjd", "hog"), ("single", "hog"), ("dmjd", "pixels")])
def test_overfits_a_fixed_batch(method, target):
    model = tiny(method, target=target)
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(1)
    first = model(x)
    assert ("loss_visible" in first) == (method == "dmjd")
    for _ in range(200):
        out = model(x)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert out["loss"].item() < 0.4 * first["loss"].item()  # masks change every step: not to zero


class PatchOracle(nn.Module):
    """Predicts, for each token, the target of the patch whose embedding it carries."""

    def __init__(self, patch_tokens: torch.Tensor, targets: torch.Tensor):
        super().__init__()
        self.patch_tokens, self.targets = patch_tokens, targets  # (B, N, D), (B, N, T)

    def forward(self, tokens):  # (B * V, K, D): views of a sample are adjacent rows
        v = tokens.shape[0] // self.patch_tokens.shape[0]
        ref = self.patch_tokens.repeat_interleave(v, 0)
        which = (tokens.unsqueeze(2) == ref.unsqueeze(1)).all(-1).float().argmax(-1)  # (B*V, K)
        return gather_tokens(self.targets.repeat_interleave(v, 0), which)


def test_visible_branch_pairs_tokens_with_their_own_patches():
    model = tiny(depth=0).eval()
    model.encoder.norm = nn.Identity()  # encoder output = patch embedding + position, per patch
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    targets = model.make_targets(x)
    full = model.encoder._pos_embed(model.encoder.patch_embed((x - model.mean) / model.std))
    patch_tokens = full[:, model.encoder.num_prefix_tokens :]
    model.projector = nn.Identity()
    model.predictor = PatchOracle(patch_tokens, targets)

    # Keep indices in a shuffled order: the order of the encoder's tokens, not raster order.
    g = torch.Generator().manual_seed(1)
    keep = torch.stack([torch.randperm(16, generator=g)[:4] for _ in range(4)]).view(2, 2, 4)
    masked = torch.ones(2, 2, 16, dtype=torch.bool).scatter_(2, keep, False)
    model.make_masks = lambda b, device: (keep, masked)
    assert not (torch.diff(keep, dim=-1) > 0).all(), "the test needs a non-raster order"
    assert model(x)["loss_visible"].item() == 0.0

    # The pairing that compares tokens in keep order with targets in raster order is wrong here.
    preds = model.predictor(
        model.drop.run_kept(
            model.encoder.forward_features, ((x - model.mean) / model.std).repeat_interleave(2, 0), keep.flatten(0, 1)
        )[:, 1:]
    )
    raster = gather_tokens(targets.repeat_interleave(2, 0), keep.flatten(0, 1).sort(-1).values)
    assert torch.nn.functional.smooth_l1_loss(preds, raster, beta=2.0).item() > 0.1


def test_encoder_loads_into_timm_and_adaptive_lr():
    model = tiny()
    plain = timm.create_model("vit_tiny_patch16_224", depth=2, **ENC)
    plain.load_state_dict(model.encoder.state_dict(), strict=True)
    assert model.adaptive_lr(6e-4, 512) == pytest.approx(6e-4 * 512 * (1.0 / 0.6) / 256)
    assert tiny("single").adaptive_lr(6e-4, 512) == pytest.approx(6e-4 * 2)
    # one view predicts the corruption rate it hides, whatever prediction rate two views would have had
    assert tiny(views=1).adaptive_lr(6e-4, 512) == pytest.approx(6e-4 * 2)


@pytest.mark.parametrize("patch,cell", [(16, 8), (14, 7), (12, 6), (8, 8), (9, 9), (4, 4)])
def test_hog_cells_tile_every_patch_size(patch, cell):
    """8-pixel HOG cells for 16-pixel patches; a patch 8 does not divide (ViT-L/14, ViT-H/14) was refused with no
    way around it, and now gets the largest cell of 4 to 8 pixels that tiles it, else one cell per patch."""
    enc = timm.create_model("vit_tiny_patch16_224", depth=1, **{**ENC, "img_size": 2 * patch, "patch_size": patch})
    model = DMJD(enc, decoder_dim=32, decoder_depth=1, decoder_heads=2, projector_dim=32, block=1, corruption=0.5)
    assert model.targets.cell == cell and model.targets.dim(3) == 3 * (patch // cell) ** 2 * 9
    loss = model(torch.rand(2, 3, 2 * patch, 2 * patch))["loss"]
    loss.backward()
    assert torch.isfinite(loss)


def test_rejects_non_vit_encoder_and_bad_settings():
    with pytest.raises(TypeError, match="VisionTransformer"):
        DMJD(timm.create_model("resnet10t"))
    # non-square patches: the targets were cut as squares of the first side, and the size check asked for
    # images of another size than the encoder's own
    rect = timm.create_model("vit_tiny_patch16_224", depth=1, **{**ENC, "patch_size": (8, 4)})
    with pytest.raises(ValueError, match="DMJD needs square patches, the encoder's are 8x4"):
        DMJD(rect, decoder_dim=32, decoder_depth=1, decoder_heads=2)
    # a hybrid ViT's CNN backbone sees the masked pixels: before, it trained on 1-pixel "patches"
    hybrid = timm.create_model("vit_tiny_r_s16_p8_224", img_size=128, depth=1, num_classes=0)
    with pytest.raises(TypeError, match="the masked pixels would leak into the visible tokens"):
        DMJD(hybrid, decoder_dim=32, decoder_depth=1, decoder_heads=2)
    with pytest.raises(ValueError, match="method"):
        tiny("mae")
    with pytest.raises(ValueError, match="disjoint"):  # 2 views x 3 of 4 units visible
        tiny(corruption=0.2)
    with pytest.raises(ValueError, match="views must be an integer >= 1"):  # was torch.stack's error
        tiny(views=0)


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(views=True), r"views must be an integer >= 1 \(the paper's DMJD uses 2\), got True"),
        (dict(block=0), r"block must be an integer >= 1 \(the mask unit, in patch tokens\), got 0"),  # was % by zero
        (dict(block=1.5), "block must be an integer >= 1"),
        (dict(decoder_depth=-1), "decoder_depth must be an integer >= 0, got -1"),  # was an empty decoder
        (dict(projector_dim=0), "projector_dim must be an integer >= 1, got 0"),
        (dict(decoder_heads=3), "decoder_dim=32 must split into decoder_heads=3 heads"),  # were timm's asserts
        (
            dict(decoder_dim=30, decoder_heads=2),
            "decoder_dim=30 must split into decoder_heads=2 heads and be a multiple",
        ),
        (dict(visible_weight=-1.0), "visible_weight must be a finite number >= 0, got -1.0"),  # trained on -loss
        (dict(visible_weight=float("nan")), "visible_weight must be a finite number >= 0, got nan"),
        (dict(std=[0.0]), r"std must hold finite numbers > 0, got \(0.0,\)"),  # was a NaN loss
        (dict(mean=[float("inf")]), r"mean must hold finite numbers, got \(inf,\)"),
    ],
)
def test_settings_that_cannot_train_are_refused(kw, message):
    enc = timm.create_model("vit_tiny_patch16_224", depth=1, **ENC)
    settings = {**dict(decoder_dim=32, decoder_depth=1, decoder_heads=2, projector_dim=32), **kw}
    with pytest.raises(ValueError, match=message):
        DMJD(enc, **settings)


def test_numpy_numbers_are_numbers_and_strings_are_not():
    """NumPy's integers were refused as not integers; a string weight or rate failed inside a comparison."""
    enc = timm.create_model("vit_tiny_patch16_224", depth=1, **ENC)
    sizes = dict(decoder_dim=np.int64(32), decoder_depth=np.int64(1), decoder_heads=np.int64(2))
    model = DMJD(enc, views=np.int64(2), corruption=np.float32(0.75), projector_dim=np.int32(32), **sizes)
    assert (type(model.views), type(model.corruption)) == (int, float)
    assert model(torch.rand(2, 3, 32, 32))["loss"].isfinite()
    for kw, message in [
        (dict(visible_weight="1"), "visible_weight must be a finite number >= 0, got '1'"),
        (dict(prediction="1"), r"prediction rate must be a number in \(corruption, 1\], got '1'"),
    ]:
        with pytest.raises(TypeError, match=message):
            DMJD(enc, decoder_dim=32, decoder_depth=1, decoder_heads=2, projector_dim=32, **kw)


@pytest.mark.parametrize("shape", [(2, 1, 32, 32), (2, 3, 24, 24), (3, 32, 32)])
def test_images_the_encoder_does_not_take_are_named(shape):
    """A grey batch for an RGB encoder failed inside the HOG targets ('size of tensor a (27) must match...')."""
    with pytest.raises(ValueError, match=r"DMJD's encoder takes images \(batch, 3, 32, 32\), got "):
        tiny()(torch.rand(*shape))


def test_a_grey_encoder_is_normalized_per_its_channel():
    """The default (ImageNet RGB) statistics were broadcast onto grey images: three channels for a one-channel
    encoder, a convolution error."""
    torch.manual_seed(0)
    enc = timm.create_model("vit_tiny_patch16_224", depth=1, **{**ENC, "in_chans": 1})
    kw = dict(decoder_dim=32, decoder_depth=1, decoder_heads=2, projector_dim=32, block=1)
    model = DMJD(enc, **kw)
    assert model.mean.flatten().tolist() == pytest.approx([0.449]) and model.std.numel() == 1
    assert torch.isfinite(model(torch.rand(2, 1, 32, 32))["loss"])
    assert DMJD(enc, mean=[0.5], std=[0.25], **kw).std.flatten().tolist() == [0.25]
    assert tiny(mean=[0.5], std=[0.25]).mean.flatten().tolist() == [0.5, 0.5, 0.5]
    with pytest.raises(ValueError, match=r"mean has 3 values for an encoder of 1 input channel\(s\)"):
        DMJD(enc, mean=(0.1, 0.2, 0.3), **kw)


def test_normalized_images_are_warned_of_once():
    """Normalized images (values below 0) were taken as raw pixels: the encoder saw them normalized twice."""
    import warnings

    model = tiny()
    mean, std = (
        torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1),
        torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1),
    )
    with pytest.warns(UserWarning, match=r"DMJD takes images in \[0, 1\], unnormalized .* this batch spans \[-"):
        model((torch.rand(2, 3, 32, 32) - mean) / std)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(torch.rand(2, 3, 32, 32) * 255)  # checked on the first batch only: no second host sync
        tiny()(torch.rand(2, 3, 32, 32))  # raw pixels: no warning
