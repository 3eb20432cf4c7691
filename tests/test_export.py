"""``masksub export``: a run's model as a timm folder, loaded back by timm and transformers without masksub, scoring
what the run scored with timm's own transform of the exported preprocessing."""

from __future__ import annotations

import ast
import errno
import importlib.util
import json

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
import transformers
from PIL import Image
from test_trainer import TINY, args
from timm.data import create_transform, resolve_data_config

from masksub.cli import main
from masksub.data import CLASSES, load_fashion_mnist
from masksub.train import checkpoint
from masksub.train.build import LOCAL_DIR_SAFETENSORS, build_model, timm_at_least
from masksub.train.config import load_config
from masksub.train.data import build_eval_dataset
from masksub.train.evaluate import load_run, trained_model
from masksub.train.export import _architecture, data_config, fold_probe_head
from masksub.train.onnx_export import MIN_TIMM
from masksub.train.transforms import build_transforms


def _train(tmp_path, name, **more) -> tuple:
    settings = {"train.output": str(tmp_path), "train.name": name, "sched.epochs": 1, **more}
    assert main(["train", *args(TINY, **settings)]) == 0
    records = [json.loads(r) for r in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return tmp_path / name, records[-1]


def _export(run, out, *more) -> int:
    return main(["export", "--checkpoint", str(run), "--out", str(out), *more])


ONNX = ["--onnx"] if timm_at_least(MIN_TIMM) else []  # older timm: --onnx is refused (tested below)
needs_onnx = pytest.mark.skipif(not ONNX, reason=f"masksub export --onnx needs timm >= {MIN_TIMM}")
# What the model card says to add under timm < 1.0.26, whose local-dir loader opens model.safetensors with torch.load
OLD_TIMM = 'pretrained_cfg_overlay=dict(source="", file="{}/model.safetensors")'


def _timm_load(folder):
    """The exported folder as timm alone loads it (as the model card says, under any timm)."""
    if LOCAL_DIR_SAFETENSORS:
        return timm.create_model(f"local-dir:{folder}", pretrained=True)
    overlay = dict(source="", file=str(folder / "model.safetensors"))
    return timm.create_model(f"local-dir:{folder}", pretrained=True, pretrained_cfg_overlay=overlay)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A MaskSub run with EMA weights, on the timm preset (resize, crop_pct, bicubic: a transform to rebuild)."""
    folder = tmp_path_factory.mktemp("export")
    aug = {"aug.preset": "timm", "aug.crop_pct": 0.9, "aug.scale": [0.5, 1.0], "aug.mean": [0.3], "aug.std": [0.4]}
    return _train(folder, "mask", **{"train.ema": True, "train.ema_decay": 0.9, **aug})


def test_timm_loads_the_run_model_and_its_transform_scores_what_the_run_scored(run, tmp_path, capsys):
    folder, last = run
    assert _export(folder, tmp_path / "out") == 0
    assert "timm.create_model('local-dir:" in capsys.readouterr().out
    loaded = _timm_load(tmp_path / "out").eval()
    cfg, state = load_run(folder / "last.pt", {}, "test")
    model = trained_model(cfg, state, 10).eval()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert loaded.pretrained_cfg["label_names"] == list(CLASSES)
    data = resolve_data_config(model=loaded)
    size = tuple(data["input_size"])  # a list from JSON under older timm
    assert data["crop_pct"] == 0.9 and data["interpolation"] == "bicubic" and size == (1, 28, 28)
    transform = create_transform(**data)  # timm's own evaluation transform, from the folder alone
    images = build_eval_dataset(cfg, list(CLASSES))
    batch = torch.stack([transform(images[i][0]) for i in range(len(images))])
    labels = torch.tensor([images[i][1] for i in range(len(images))])
    with torch.no_grad():
        correct = (loaded(batch).argmax(1) == labels).sum().item()
    assert len(images) == 200 and correct / 2 == pytest.approx(last["top1"], abs=1e-6)


@pytest.mark.parametrize("preset", ["none", "simple", "timm"])
@pytest.mark.parametrize("size", [28, 36])
def test_timm_transform_of_the_exported_config_is_the_run_evaluation_transform(preset, size):
    more = {"aug.crop_pct": 0.8, "aug.interpolation": "random"} if preset == "timm" else {}
    cfg = load_config(None, {"aug.preset": preset, "data.img_size": size, "model.kwargs": {"img_size": size}, **more})
    model = build_model(cfg, 10)
    ours = build_transforms(cfg, model)[1]
    theirs = create_transform(**resolve_data_config(data_config(cfg, model)))
    images = build_eval_dataset(cfg, list(CLASSES))
    for i in (0, 1, 2):
        assert torch.equal(theirs(images[i][0]), ours(images[i][0])), (preset, size, i)


def test_the_ema_weights_are_exported(run, tmp_path):
    folder, _ = run
    assert _export(folder, tmp_path / "ema", "--ema") == 0
    state = checkpoint.load(folder / "last.pt")
    loaded = _timm_load(tmp_path / "ema")
    ema = {k.removeprefix("module."): v for k, v in state["ema"].items()}
    assert all(torch.equal(v, ema[k]) for k, v in loaded.state_dict().items())
    assert not all(torch.equal(v, state["model"][f"model.{k}"]) for k, v in loaded.state_dict().items())


@pytest.mark.skipif(
    tuple(int(n) for n in transformers.__version__.split(".")[:2]) < (4, 53),
    reason="transformers < 4.53's TimmWrapper ignores config.json's model_args: builds the named variant's defaults",
)
def test_transformers_loads_the_export(run, tmp_path):
    from transformers import AutoModelForImageClassification

    assert _export(run[0], tmp_path / "ema", "--ema") == 0
    loaded = _timm_load(tmp_path / "ema")
    hf = AutoModelForImageClassification.from_pretrained(tmp_path / "ema").eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(hf(x).logits, loaded.eval()(x))
    assert hf.config.id2label[9] == CLASSES[9]


def test_a_linear_probe_head_is_folded_into_one_linear_layer(tmp_path):
    norm = torch.nn.BatchNorm1d(8, affine=False).eval()
    norm.running_mean.normal_(0, 3)
    norm.running_var.uniform_(0.1, 5)
    head = torch.nn.Sequential(norm, torch.nn.Linear(8, 4))
    x = torch.randn(16, 8)
    folded = fold_probe_head(head)
    assert isinstance(folded, torch.nn.Linear)
    torch.testing.assert_close(folded(x), head(x), rtol=1e-5, atol=1e-5)
    folder, last = _train(tmp_path, "probe", **{"train.linprobe": True, "sub.kind": "none"})
    assert _export(folder, tmp_path / "out") == 0
    loaded = _timm_load(tmp_path / "out").eval()
    cfg, state = load_run(folder / "last.pt", {}, "test")
    probe = trained_model(cfg, state, 10).eval()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), probe(x), rtol=1e-4, atol=1e-4)
    assert isinstance(loaded.head, torch.nn.Linear)


def test_what_export_refuses_leaves_nothing_behind(run, tmp_path, capsys, monkeypatch):
    folder, _ = run
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    assert _export(folder, tmp_path / "taken") == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["keep.txt"]
    assert _export(folder, tmp_path / "x", "--sub.ratio", "0.3") == 2
    assert "masksub export takes no --sub.ratio 0.3: see masksub export --help" in capsys.readouterr().err
    plain, _ = _train(tmp_path, "plain", **{"sub.kind": "none"})
    assert _export(plain, tmp_path / "x", "--ema") == 2
    assert "holds no EMA weights" in capsys.readouterr().err
    torch.save({"pos_embed": torch.zeros(1)}, tmp_path / "weights.pt")
    assert _export(tmp_path / "weights.pt", tmp_path / "x") == 2
    assert "is not a masksub training checkpoint" in capsys.readouterr().err
    # a model timm rebuilds into another one: refused after the check, the folder never appears
    create = timm.create_model

    def another_model(*a, **k):
        model = create(*a, **k)
        torch.nn.init.zeros_(model.head.weight)
        return model

    monkeypatch.setattr(timm, "create_model", another_model)
    assert _export(folder, tmp_path / "x") == 2
    assert "outputs differ" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain", "taken", "weights.pt"]


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("resnet10t", {}),
        ("swin_tiny_patch4_window7_224", {"patch_size": 2, "window_size": 7, "embed_dim": 16, "depths": [1, 1]}),
        ("convvit_base_patch16", {"img_size": 32, "embed_dim": [16, 32, 64], "depth": [1, 1, 1], "num_heads": 2}),
    ],
)
def test_other_families_export_and_load_back(name, kwargs, tmp_path):
    """A CNN, a Swin built smaller than its name says, and masksub's own ConViT (registered with timm on import),
    as timm folders and ONNX files."""
    if name.startswith("swin"):
        kwargs = {**kwargs, "img_size": 28, "num_heads": [1, 2]}
    size = kwargs.get("img_size", 28)
    more = {"model.name": name, "model.kwargs": kwargs, "sub.kind": "none", "data.img_size": size}
    data = {"data.batch_size": 32, "data.train_subset": 64, "data.eval_subset": 32}
    folder, _ = _train(tmp_path, "run", **more, **data)
    assert _export(folder, tmp_path / "out", *ONNX) == 0  # model.onnx: checked in ONNX Runtime as it is written
    assert (tmp_path / "out" / "model.onnx").is_file() == bool(ONNX)
    loaded = _timm_load(tmp_path / "out").eval()
    cfg, state = load_run(folder / "last.pt", {}, "test")
    x = torch.randn(2, 1, size, size)
    with torch.no_grad():
        assert torch.equal(loaded(x), trained_model(cfg, state, 10).eval()(x))


def test_a_run_from_an_exported_folder_exports_again(run, tmp_path):
    """``--model.name local-dir:<export>`` continues from an export; that run's export rebuilds the same
    architecture, from the arguments timm's factory recorded or, where timm records none, the folder's."""
    folder, _ = run
    assert _export(folder, tmp_path / "first") == 0
    more = {"model.name": f"local-dir:{tmp_path / 'first'}", "model.kwargs": {"pretrained": True}, "sub.kind": "none"}
    again, _ = _train(tmp_path, "again", **more)
    assert _export(again, tmp_path / "second") == 0
    written = json.loads((tmp_path / "second" / "config.json").read_text())
    card = (tmp_path / "second" / "README.md").read_text()
    details = card.split("## Model details")[1].split("## Usage")[0]
    assert "- **Architecture:** `vit_tiny_patch16_224` (timm) with {" in details and "local-dir:" not in details
    assert written["model_args"] == json.loads((tmp_path / "first" / "config.json").read_text())["model_args"]
    cfg, state = load_run(again / "last.pt", {}, "test")
    assert "pretrained" not in cfg.model.kwargs  # the checkpoint holds every weight
    model = trained_model(cfg, state, 10)
    if hasattr(model, "_model_args"):
        del model._model_args  # as a timm that records none (before 1.0.2x) builds it
    assert _architecture(model, cfg) == written["model_args"]


def test_a_failed_write_is_named_and_leaves_nothing(run, tmp_path, capsys, monkeypatch):
    folder, _ = run

    def full_disk(*_):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    assert _export(folder, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert f"cannot write {tmp_path / 'out'}: No space left on device; nothing was written" in err
    assert not any(tmp_path.iterdir())


@needs_onnx
def test_onnx_model_gives_the_run_logits_in_onnx_runtime(run, tmp_path, capsys):
    import onnxruntime

    folder, _ = run
    assert _export(folder, tmp_path / "out", "--onnx") == 0
    assert "model.onnx by the " in capsys.readouterr().out
    loaded = _timm_load(tmp_path / "out").eval()
    session = onnxruntime.InferenceSession(str(tmp_path / "out" / "model.onnx"), providers=["CPUExecutionProvider"])
    transform = create_transform(**resolve_data_config(model=loaded))
    cfg, _ = load_run(folder / "last.pt", {}, "test")
    images = build_eval_dataset(cfg, list(CLASSES))
    x = torch.stack([transform(images[i][0]) for i in range(7)])  # a batch size neither traced nor checked
    got = torch.from_numpy(session.run(["logits"], {"pixel_values": x.numpy()})[0])
    with torch.no_grad():
        want = loaded(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert torch.equal(got.argmax(1), want.argmax(1))


@needs_onnx
def test_onnx_problems_are_named_and_leave_nothing(run, tmp_path, capsys, monkeypatch):
    import onnxruntime

    folder, _ = run

    class Wrong:  # a runtime that computes something else
        def __init__(self, *a, **k):
            pass

        def run(self, names, feeds):
            return [np.zeros((len(feeds["pixel_values"]), 10), dtype=np.float32)]

    monkeypatch.setattr(onnxruntime, "InferenceSession", Wrong)
    assert _export(folder, tmp_path / "out", "--onnx") == 2
    assert "the ONNX model computes other logits than the PyTorch model" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    assert _export(folder, tmp_path / "out", "--onnx") == 2
    assert "--onnx needs onnxscript: pip install onnx onnxscript onnxruntime" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_onnx_under_an_older_timm_is_refused_before_anything_is_written(run, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(timm, "__version__", "1.0.30")
    assert _export(run[0], tmp_path / "out", "--onnx") == 2
    assert f"--onnx needs timm >= {MIN_TIMM}, whose ONNX exporter keeps the batch size free" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_the_model_card_states_the_run_and_its_usage_code_runs(run, tmp_path, capsys, monkeypatch):
    folder, last = run
    assert _export(folder / "best.pt", tmp_path / "fmnist", "--ema") == 0
    card = (tmp_path / "fmnist" / "README.md").read_text()
    assert card.startswith("---\ntags:\n- image-classification\n- timm\n- masksub\nlibrary_name: timm\n")
    assert "license" not in card  # the owner's to state
    assert f"- **Accuracy:** top-1 {last['ema_top1']:.2f}% on the evaluation split" in card
    assert "- **Training:** MaskSub, ratio 0.5; recipe `fashion_mnist_vit`, 1 of 1 epochs (4 optimizer steps)" in card
    assert "- **Weights:** the EMA weights of `best.pt`" in card
    code = card.split("```python\n")[1].split("```")[0]
    advice = "timm before 1.0.26 opens a local folder's `model.safetensors` with `torch.load` and fails: there, add\n"
    assert f"{advice}`{OLD_TIMM.format('fmnist')}` to `create_model`" in card
    if not LOCAL_DIR_SAFETENSORS:  # the card's advice for this timm, followed
        code = code.replace("pretrained=True)", f"pretrained=True, {OLD_TIMM.format('fmnist')})")
    x, _ = load_fashion_mnist("test")
    Image.fromarray(x[5].numpy()).save(tmp_path / "image.png")
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    exec(compile(code, "README.md", "exec"), {})
    printed = ast.literal_eval(capsys.readouterr().out.strip())
    model = _timm_load(tmp_path / "fmnist").eval()
    transform = create_transform(**resolve_data_config(model=model))
    with torch.no_grad():
        best = model(transform(Image.open(tmp_path / "image.png").convert("L"))[None]).argmax().item()
    assert len(printed) == 5 and printed[0][0] == CLASSES[best]


def test_a_pretraining_run_exports_its_encoder_as_a_backbone(tmp_path, capsys):
    """DMJD's encoder, as encoder.pt holds it, becomes a timm backbone without a classifier (and an ONNX file of its
    features); its card says how it was pretrained; predict and --ema refuse it."""
    from test_pretrain import PRE

    settings = {"train.output": str(tmp_path), "train.name": "pre", "sched.epochs": 1, "sched.warmup_epochs": 0.5}
    assert main(["pretrain", *args(PRE, **settings)]) == 0
    assert _export(tmp_path / "pre", tmp_path / "enc", *ONNX) == 0
    assert "a pretrained backbone without a classifier" in capsys.readouterr().out
    loaded = _timm_load(tmp_path / "enc").eval()
    encoder = timm.create_model("vit_tiny_patch16_224", num_classes=0, in_chans=1, **PRE["model.kwargs"]).eval()
    encoder.load_state_dict(torch.load(tmp_path / "pre" / "encoder.pt", weights_only=True))
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert loaded.num_classes == 0 and torch.equal(loaded(x), encoder(x))
    config = json.loads((tmp_path / "enc" / "config.json").read_text())
    assert "label_names" not in config and config["num_classes"] == 0
    card = (tmp_path / "enc" / "README.md").read_text()
    assert "DMJD masked image modelling (hog targets, 0.6 of the patches corrupted)" in card
    assert "none measured in pretraining" in card and "features = model(" in card
    assert main(["predict", "--checkpoint", str(tmp_path / "enc"), str(tmp_path)]) == 2
    assert "a backbone without a classifier" in capsys.readouterr().err
    assert _export(tmp_path / "pre", tmp_path / "ema", "--ema") == 2
    assert "a pretraining run keeps no EMA weights" in capsys.readouterr().err


def _eval(checkpoint, *more) -> int:
    return main(["eval", "--checkpoint", str(checkpoint), *more])


def test_eval_of_an_export_scores_what_the_run_scored(run, tmp_path, capsys):
    """The folder alone, its own preprocessing (resize, crop 0.9, the run's mean and std), on Fashion-MNIST's test
    split: the run's accuracy, per class too."""
    folder, last = run
    assert _export(folder / "last.pt", tmp_path / "out") == 0
    capsys.readouterr()
    assert _eval(tmp_path / "out", "--data.eval_subset", "200", "--per-class") == 0
    out = capsys.readouterr().out
    assert "(vit_tiny_patch16_224): 200 images of the Fashion-MNIST test split (data.eval_subset 200" in out, out
    assert f"weights: top-1 {last['top1']:.2f}%" in out and "ema weights" not in out
    assert _eval(folder / "last.pt", "--per-class") == 0
    run_out = capsys.readouterr().out
    plain = run_out.split("\nweights: ")[1].split("ema weights: ")[0]  # the run's plain weights, as exported
    assert out.split("weights: ")[1] == plain  # the same numbers and per-class table


def test_eval_of_an_export_matches_folder_classes_by_name(run, tmp_path, capsys):
    """Three class folders of another data set, in another order than the model's outputs: labelled by name."""
    folder, _ = run
    assert _export(folder / "last.pt", tmp_path / "out") == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    config["label_names"] = [f"c{i:02d}" for i in range(10)]  # names a folder can have ("T-shirt/top" cannot)
    config["pretrained_cfg"]["label_names"] = config["label_names"]
    (tmp_path / "out" / "config.json").write_text(json.dumps(config))
    x, y = load_fashion_mnist("test")
    picked = [i for i in range(300) if int(y[i]) in (7, 1, 3)]
    for i in picked:
        (tmp_path / "data" / "val" / f"c{int(y[i]):02d}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[i].numpy()).save(tmp_path / "data" / "val" / f"c{int(y[i]):02d}" / f"{i}.png")
    model = _timm_load(tmp_path / "out").eval()
    transform = create_transform(**resolve_data_config(model=model))
    with torch.no_grad():
        batch = torch.stack([transform(Image.fromarray(x[i].numpy())) for i in picked])
        correct = (model(batch).argmax(1) == y[picked]).sum().item()
    capsys.readouterr()
    assert _eval(tmp_path / "out", "--data.name", "folder", "--data.dir", str(tmp_path / "data")) == 0
    out = capsys.readouterr().out
    assert f"{len(picked)} images of {tmp_path / 'data' / 'val'}" in out
    assert f"weights: top-1 {100 * correct / len(picked):.2f}%" in out, (out, correct, len(picked))


def test_eval_of_an_export_refuses_what_it_cannot_do(run, tmp_path, capsys):
    folder, _ = run
    assert _export(folder / "last.pt", tmp_path / "out") == 0
    assert _eval(tmp_path / "out", "--model.name", "resnet18") == 2
    assert "model.name: " in capsys.readouterr().err
    assert _eval(tmp_path / "out", "--data.img_size", "32") == 2
    assert "config.json sets its input and preprocessing" in capsys.readouterr().err
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    config["label_names"] = config["pretrained_cfg"]["label_names"] = list(reversed(CLASSES))
    (tmp_path / "out" / "config.json").write_text(json.dumps(config))
    assert _eval(tmp_path / "out") == 2
    assert "classifies into Ankle boot, Bag, Sneaker, Shirt, ..., not the Fashion-MNIST classes" in (
        capsys.readouterr().err
    )
    (tmp_path / "data" / "val" / "Bag").mkdir(parents=True)  # a class of the model, and one it lacks
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "data" / "val" / "Bag" / "0.png")
    (tmp_path / "data" / "val" / "Hat").mkdir()
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "data" / "val" / "Hat" / "0.png")
    assert _eval(tmp_path / "out", "--data.name", "folder", "--data.dir", str(tmp_path / "data")) == 2
    assert "val has 1 class folder(s) the model has no output for (Hat)" in capsys.readouterr().err
    del config["label_names"], config["pretrained_cfg"]["label_names"]
    (tmp_path / "out" / "config.json").write_text(json.dumps(config))
    assert _eval(tmp_path / "out") == 2
    assert "names 0 classes (label_names) for 10 outputs" in capsys.readouterr().err
