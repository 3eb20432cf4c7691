"""`masksub pretrain` -> `linprobe` -> `train` (finetune with MaskSub), end to end on Fashion-MNIST."""

from __future__ import annotations

import json

import torch
from test_trainer import args

from masksub.cli import main
from masksub.train import checkpoint

KW = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}
PRE = {
    "model.kwargs": KW,
    "data.train_subset": 256,
    "data.batch_size": 64,
    "data.workers": 0,
    "sched.epochs": 2,
    "pretrain.decoder_dim": 32,
    "pretrain.decoder_depth": 1,
    "pretrain.decoder_heads": 2,
    "pretrain.projector_dim": 32,
}


def test_pretrain_linprobe_finetune(tmp_path, capsys):
    assert main(["pretrain", *args(PRE, **{"train.output": str(tmp_path), "train.name": "pre"})]) == 0
    run = tmp_path / "pre"
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert records[0]["train_loss_visible"] > 0 and records[0]["train_loss_masked"] > 0
    encoder = torch.load(run / "encoder.pt", weights_only=True)
    assert "pos_embed" in encoder and not any(k.startswith(("decoder", "projector")) for k in encoder)
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run / "encoder.pt")]) == 2  # weights alone: no run settings
    assert "train from them with masksub linprobe or masksub train --model.checkpoint" in capsys.readouterr().err
    # The run's config.yaml, used as a recipe, is a pretraining recipe: masksub train refuses it, as a bundled one
    assert main(["train", "--recipe", str(run / "config.yaml")]) == 2
    assert "recipe 'config' is a pretraining recipe, for masksub pretrain" in capsys.readouterr().err

    common = {
        "model.kwargs": KW,
        "data.img_size": 32,
        "data.train_subset": 256,
        "data.eval_subset": 200,
        "data.batch_size": 64,
        "data.workers": 0,
        "sched.epochs": 1,
        "train.output": str(tmp_path),
    }
    capsys.readouterr()
    assert main(["linprobe", "--checkpoint", str(run / "encoder.pt"), *args(common, **{"train.name": "lin"})]) == 0
    head = KW["embed_dim"] * 10 + 10  # the linear classifier; BatchNorm without affine has no parameters
    assert f"M parameters ({head:,} trained); no sub branch" in capsys.readouterr().out
    lin = checkpoint.load(tmp_path / "lin" / "last.pt")
    assert lin["model"]["blocks.0.attn.qkv.weight"].equal(encoder["blocks.0.attn.qkv.weight"]), "encoder frozen"
    assert "head.0.running_mean" in lin["model"]  # BatchNorm without affine before the linear head

    capsys.readouterr()
    ft = {**common, "model.checkpoint": str(run / "encoder.pt"), "train.name": "ft", "sub.kind": "mask"}
    assert main(["train", *args(ft)]) == 0
    out = capsys.readouterr().out
    assert "loaded" in out and "missing keys ['head.bias', 'head.weight']" in out
    assert json.loads((tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()[-1])["top1"] > 0

    # The run's last.pt (of any epoch: encoder.pt is written at the end only) gives the same encoder.
    assert main(["linprobe", "--checkpoint", str(run / "last.pt"), *args(common, **{"train.name": "lin2"})]) == 0
    assert "missing keys ['head.bias', 'head.weight']" in capsys.readouterr().out
    lin2 = checkpoint.load(tmp_path / "lin2" / "last.pt")
    assert all(lin2["model"][k].equal(v) for k, v in encoder.items()), "the encoder of last.pt is encoder.pt's"


def test_pretrain_single_view_baseline_and_exact_resume(tmp_path, capsys):
    # no projector_dim: one view has no visible branch to project (refused as doing nothing)
    single = {**{k: v for k, v in PRE.items() if k != "pretrain.projector_dim"}, "train.output": str(tmp_path)}
    assert main(["pretrain", "--method", "single", *args(single)]) == 0
    run, header = tmp_path / "fashion_mnist_dmjd-single-s0", capsys.readouterr().out.splitlines()
    assert header[0] == f"run folder {run}"  # the default name carries the method, not the (absent) sub branch
    assert "(encoder); single pretraining on HOG targets, decoder and heads" in header[1]
    assert "1 warm-up epoch\n" in "\n".join(header[:3]) + "\n"  # the recipe's warm-up, in the singular
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["train_loss_visible"] == 0

    assert main(["pretrain", *args(single, **{"train.name": "full"})]) == 0
    assert main(["pretrain", *args(single, **{"train.name": "part", "train.max_steps": 3})]) == 0
    assert f"continue with masksub pretrain --resume {tmp_path / 'part'}" in capsys.readouterr().out
    assert main(["pretrain", "--recipe", "fashion_mnist_vit", *args(single)]) == 2  # a classification recipe
    assert "recipe 'fashion_mnist_vit' is a classification recipe, for masksub train, not masksub pretrain" in (
        capsys.readouterr().err
    )
    assert main(["train", "--resume", str(tmp_path / "part")]) == 2  # the wrong command names the right one
    assert "is a masksub pretrain run: continue it with masksub pretrain --resume" in capsys.readouterr().err
    assert main(["pretrain", "--resume", str(tmp_path / "part")]) == 0
    a, b = checkpoint.load(tmp_path / "full" / "last.pt"), checkpoint.load(tmp_path / "part" / "last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_pretrain_with_on_device_data_resumes_exactly(tmp_path):
    """The pretrain preset's random-resized crops on the device: the same batches after a resume."""
    dev = {**PRE, "train.output": str(tmp_path), "data.on_device": True, "aug.preset": "pretrain"}
    assert main(["pretrain", *args(dev, **{"train.name": "full"})]) == 0
    assert main(["pretrain", *args(dev, **{"train.name": "part", "train.max_steps": 3})]) == 0
    assert main(["pretrain", "--resume", str(tmp_path / "part")]) == 0
    a, b = checkpoint.load(tmp_path / "full" / "last.pt"), checkpoint.load(tmp_path / "part" / "last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    records = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and records[-1]["train_loss_visible"] > 0


def test_pretrain_settings_that_cannot_work_get_a_clear_error(tmp_path, capsys):
    bad = {**PRE, "train.output": str(tmp_path)}
    assert main(["pretrain", *args(bad, **{"pretrain.corruption": 0.2})]) == 2  # 2 views x 3 of 4 units
    err = capsys.readouterr().err
    assert "pretrain.views / corruption" in err and "raise the corruption rate to at least 0.500" in err
    assert main(["pretrain", *args(bad, **{"model.name": "resnet18", "model.kwargs": {}})]) == 2
    assert "model.name=resnet18: DMJD needs a timm VisionTransformer or a ConvViT" in capsys.readouterr().err
    for key, value, message in [
        ("pretrain.views", 1, "pretrain.views must be >= 2, got 1 for pretrain.method=dmjd"),  # was trained as given
        ("pretrain.block", 0, "pretrain.block must be >= 1, got 0"),  # was a ZeroDivisionError
        ("pretrain.decoder_heads", 5, "pretrain.decoder_dim=32 does not split into pretrain.decoder_heads=5"),
        ("pretrain.decoder_dim", 30, "pretrain.decoder_dim=30 must be a multiple of 4 (the decoder's 2-D sine"),
        ("pretrain.projector_dim", 0, "pretrain.projector_dim must be >= 1, got 0"),
        ("pretrain.visible_weight", -1, "pretrain.visible_weight must be >= 0, got -1"),
        ("sub.ratio", 0.75, "sub.ratio would do nothing in masksub pretrain (it masks by pretrain.corruption"),
        ("train.ema", True, "train.ema would do nothing in masksub pretrain"),  # no EMA copy was kept
        ("aug.mixup", 0.8, "aug.mixup would do nothing in masksub pretrain"),
        ("data.eval_subset", 100, "data.eval_subset would do nothing in masksub pretrain (it masks by pretrain.corr"),
        ("train.eval_every", 2, "or evaluation): leave it out"),
        ("aug.preset", "timm", "aug.preset timm normalizes the images, which would be normalized twice"),  # was so
    ]:
        assert main(["pretrain", *args(bad, **{key: value})]) == 2
        assert message in capsys.readouterr().err
    single = {"pretrain.method": "single", "pretrain.prediction": 0.9, "pretrain.views": 3}  # were ignored
    assert main(["pretrain", *args(bad, **single)]) == 2
    err = capsys.readouterr().err
    assert (
        "pretrain.views, pretrain.prediction, pretrain.projector_dim would do nothing with pretrain.method single"
        in err
    )
    assert main(["pretrain", *args(bad, **{"pretrain.corruption": 0.3, "pretrain.prediction": 0.9})]) == 2
    assert "hide at most 0.6 of it together, not the prediction rate 0.9" in capsys.readouterr().err
    assert not any(tmp_path.iterdir()), "nothing is written for a run that cannot start"


def test_pretraining_on_a_folder_needs_no_evaluation_split(tmp_path, capsys):
    """Unlabelled images under train/ alone: pretraining reads no val/ (it was refused for its absence)."""
    from PIL import Image

    for i in range(8):
        (tmp_path / "imgs" / "train" / "all").mkdir(parents=True, exist_ok=True)
        pixels = (torch.rand(36, 40, generator=torch.Generator().manual_seed(i)) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(tmp_path / "imgs" / "train" / "all" / f"{i}.png")
    more = {"data.name": "folder", "data.dir": str(tmp_path / "imgs"), "data.img_size": 32, "data.batch_size": 4}
    assert main(["pretrain", *args({**PRE, **more, "train.output": str(tmp_path), "train.name": "p"})]) == 0
    out = capsys.readouterr().out
    assert "data folder: 8 training images; batch 4, 2 steps per epoch, 2 epochs;" in out
    assert (tmp_path / "p" / "encoder.pt").is_file()
