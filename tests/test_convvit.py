"""ConvViT: kept tokens see nothing of masked pixels, as a MaskSub sub branch and as a DMJD encoder."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from conftest import TINY, tiny_images, tiny_model
from test_trainer import args
from timm.layers import resample_abs_pos_embed
from timm.optim import create_optimizer_v2

import masksub
from masksub.cli import main
from masksub.models import ConvViT
from masksub.pretrain import DMJD
from masksub.train import checkpoint, sharding

KW = TINY["convvit"][1]  # 64x64 images, 16-pixel tokens: a 4x4 grid


def _scramble_masked(x: torch.Tensor, keep: torch.Tensor, token: int = 16) -> torch.Tensor:
    """New random pixels in every token that ``keep`` (B, K) leaves out."""
    out = x.clone()
    grid_w = x.shape[-1] // token
    g = torch.Generator().manual_seed(5)
    for b in range(x.shape[0]):
        for t in set(range((x.shape[-2] // token) * grid_w)) - set(keep[b].tolist()):
            r, c = divmod(t, grid_w)
            noise = torch.rand(3, token, token, generator=g)
            out[b, :, r * token : (r + 1) * token, c * token : (c + 1) * token] = noise
    return out


def test_kept_tokens_see_nothing_of_masked_pixels():
    model = tiny_model("convvit").eval()
    x = tiny_images("convvit", batch=3)
    keep = torch.tensor([[0, 5, 10, 15], [3, 6, 9, 12], [1, 2, 7, 8]])
    y = _scramble_masked(x, keep)
    with torch.no_grad():
        assert torch.equal(model.forward_features(x, keep=keep), model.forward_features(y, keep=keep))
        assert not torch.allclose(model.forward_features(x), model.forward_features(y))  # unmasked, they do
        tokens, stages = model.forward_stages(x, keep=keep)
    assert tokens.shape == (3, 4, 32)
    assert [s.shape for s in stages] == [(3, 8, 16, 16), (3, 16, 8, 8)]


def test_sub_pass_of_the_adapter_sees_nothing_of_masked_pixels():
    wrapped = masksub.wrap(tiny_model("convvit"), ratio=0.5).eval()
    chosen = []
    wrapped.model.token_select.register_forward_hook(lambda m, a, out: chosen.append(out))
    x = tiny_images("convvit", batch=3)
    with torch.no_grad():
        torch.manual_seed(3)
        first = wrapped(x, sub=True)
        y = _scramble_masked(x, chosen[-1])
        torch.manual_seed(3)
        assert torch.equal(wrapped(y, sub=True), first)
        assert chosen[-1].shape == (3, masksub.num_keep(16, 0.5))


def test_ratio_zero_keeps_every_token_and_matches_the_main_pass():
    wrapped = masksub.wrap(tiny_model("convvit"), ratio=0.0).eval()
    x = tiny_images("convvit", batch=2)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x, sub=True), wrapped(x), rtol=1e-5, atol=1e-5)  # tokens reordered only


def test_sizes_and_no_weights_to_download():
    model = timm.create_model("convvit_base_patch16")
    assert [len(model.blocks1), len(model.blocks2), len(model.blocks3)] == [2, 2, 11]
    assert model.stage_dims == (256, 384, 768) and model.patch_size == 16 and model.grid_size == (14, 14)
    assert model.blocks1[0].mlp.fc1.out_channels == 8 * 256 and model.blocks3[0].mlp.fc1.out_features == 4 * 768
    assert "convvit_large_patch16" in timm.list_models("convvit*")
    with pytest.raises(ValueError, match="no published convvit_base_patch16 weights"):
        timm.create_model("convvit_base_patch16", pretrained=True)


def test_builds_on_the_meta_device_as_timm_models_do():
    """``with torch.device("meta")`` (deferred initialisation, sizing a model) stopped at the drop-path rates."""
    with torch.device("meta"):
        model = timm.create_model("convvit_base_patch16", drop_path_rate=0.1)
        wrapped = masksub.wrap(model, ratio=0.5)
    assert {p.device.type for p in wrapped.parameters()} == {"meta"}
    cpu = timm.create_model("convvit_base_patch16", drop_path_rate=0.1)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in cpu.parameters())
    assert model.blocks3[-1].drop_path1.drop_prob == pytest.approx(0.1)


def test_bad_sizes_get_clear_errors():
    model = tiny_model("convvit")
    with pytest.raises(ValueError, match=r"built for 64x64 images, got 32x32; build it with img_size=32"):
        model(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match="not divisible by the token size 16 px"):
        ConvViT(img_size=40, **{k: v for k, v in KW.items() if k != "img_size"})
    with pytest.raises(ValueError, match="one value per stage"):
        ConvViT(depth=(1, 1))
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        masksub.wrap(model)(torch.rand(1, 3, 60, 64), sub=True)


def test_layer_decay_follows_block_order_and_fixed_positions_stay():
    model = tiny_model("convvit", fixed_pos_embed=True)  # blocks: 1 + 1 + 2, plus the stem
    opt = create_optimizer_v2(model, "adamw", lr=1.0, layer_decay=0.5)
    scale = {id(p): g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    order = ["patch_embed1.0.weight", "blocks1.0.conv1.weight", "patch_embed2.0.weight", "blocks2.0.conv1.weight"]
    order += ["patch_embed3.0.weight", "token_proj.weight", "blocks3.1.attn.qkv.weight", "head.weight"]
    found = [scale[id(named[n])] for n in order]
    assert found == [0.5**5, 0.5**4, 0.5**3, 0.5**3, 0.5**2, 0.5**2, 0.5**1, 1.0]
    assert not model.pos_embed.requires_grad and id(model.pos_embed) not in scale


def test_fsdp_shards_every_block_of_the_three_stages():
    model = tiny_model("convvit")
    found = sharding.units(model)
    assert found == [*model.blocks1, *model.blocks2, *model.blocks3]


def test_dmjd_encoder_learns_and_its_tokens_see_only_their_view():
    torch.manual_seed(0)
    encoder = timm.create_model("convvit_base_patch16", **{**KW, "num_classes": 0})
    dmjd = DMJD(encoder, decoder_dim=16, decoder_depth=1, decoder_heads=2, projector_dim=16)
    assert [f.stride for f in dmjd.fuse] == [(4, 4), (2, 2)]  # each stage's map onto the 4x4 token grid
    x = tiny_images("convvit", batch=4) - 0.5
    keep = torch.tensor([[0, 5, 10, 15, 2, 7], [3, 6, 9, 12, 1, 4], [1, 2, 7, 8, 11, 14], [0, 1, 2, 3, 4, 5]])
    with torch.no_grad():
        a = dmjd.encode(x, keep)
        assert torch.equal(a, dmjd.encode(_scramble_masked(x, keep), keep))  # fusion included
    opt = torch.optim.AdamW(dmjd.parameters(), lr=3e-3)
    torch.manual_seed(1)
    losses = []
    for _ in range(150):
        out = dmjd(x.clamp(0, 1))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    # masks change every step and HOG of noise is unpredictable: it levels off near 0.56x (a ViT does the same)
    assert sum(losses[-10:]) / 10 < 0.7 * losses[0]
    assert all(p.grad is not None for n, p in dmjd.named_parameters() if n.startswith(("fuse", "encoder.blocks1")))


def test_pretrain_then_finetune_with_masksub_on_fashion_mnist(tmp_path, capsys):
    kwargs = {"img_size": 32, "patch_size": [2, 2, 1], "embed_dim": [8, 16, 32], "depth": [1, 1, 1], "num_heads": 2}
    common = {"data.train_subset": 128, "data.batch_size": 64, "data.workers": 0, "train.output": str(tmp_path)}
    pre = {**common, "model.kwargs": {**kwargs, "fixed_pos_embed": True}, "sched.epochs": 1, "train.name": "pre"}
    pre |= {"pretrain.decoder_dim": 16, "pretrain.decoder_depth": 1, "pretrain.decoder_heads": 2}
    pre |= {"pretrain.projector_dim": 16}
    assert main(["pretrain", "--recipe", "fashion_mnist_dmjd_convvit", *args(pre)]) == 0
    encoder = tmp_path / "pre" / "encoder.pt"
    state = torch.load(encoder, weights_only=True)
    assert "blocks1.0.attn.weight" in state and not any(k.startswith(("fuse", "decoder")) for k in state)

    capsys.readouterr()
    ft = {**common, "model.name": "convvit_base_patch16", "model.kwargs": kwargs, "model.checkpoint": str(encoder)}
    ft |= {"data.img_size": 32, "data.eval_subset": 100, "sched.epochs": 1, "sub.kind": "mask", "train.name": "ft"}
    assert main(["train", *args(ft)]) == 0
    assert "missing keys ['head.bias', 'head.weight']" in capsys.readouterr().out
    record = json.loads((tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["top1"] is not None and record["train_loss_sub"] > 0


def test_weights_from_another_image_size_load_with_resampled_positions(tmp_path):
    small = timm.create_model("convvit_base_patch16", **{**KW, "num_classes": 0})  # 64 px: 4x4 tokens
    torch.save(small.state_dict(), tmp_path / "encoder.pt")
    large = timm.create_model("convvit_base_patch16", **{**KW, "img_size": 96})  # 6x6 tokens
    missing, unexpected = checkpoint.load_pretrained(large, tmp_path / "encoder.pt")
    assert missing == ["head.bias", "head.weight"] and unexpected == []
    assert large.pos_embed.shape == (1, 36, 32)
    assert torch.equal(large.blocks1[0].attn.weight, small.blocks1[0].attn.weight)
    small.pos_embed.data.normal_()  # pretrained positions, not the sin-cos start
    torch.save(small.state_dict(), tmp_path / "encoder.pt")
    checkpoint.load_pretrained(large, tmp_path / "encoder.pt")
    expected = resample_abs_pos_embed(small.pos_embed.data, [6, 6], [4, 4], num_prefix_tokens=0)
    assert torch.equal(large.pos_embed.data, expected)
