"""Data sets opened by name: Hugging Face datasets (``hfds/``) and torchvision's (``torch/``), on real
Fashion-MNIST images written in their formats; the trainer on them, resumed exactly."""

from __future__ import annotations

import gzip
import io
import json
import pickle
import tarfile
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from test_trainer import TINY, args
from torch.utils.data import DataLoader

from masksub.cli import main
from masksub.data import CLASSES, MEAN, STD, CorruptDataError, find_fashion_mnist, load_fashion_mnist
from masksub.train import checkpoint
from masksub.train.config import ConfigError, load_config
from masksub.train.data import build_datasets
from masksub.train.images import CorruptImageError
from masksub.train.sources import HfDataset, TarImages, TorchVision, source
from masksub.train.transforms import mean_std


def _features(label=None):
    label = label or datasets.ClassLabel(names=list(CLASSES))
    return datasets.Features({"image": datasets.Image(), "label": label})


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """Fashion-MNIST's first 256 training and 100 test images as parquet files, labels a ClassLabel."""
    folder = tmp_path_factory.mktemp("hf") / "fmnist"
    for split, n in (("train", 256), ("test", 100)):
        x, y = load_fashion_mnist(split)
        table = {"image": [Image.fromarray(x[i].numpy()) for i in range(n)], "label": y[:n].tolist()}
        datasets.Dataset.from_dict(table, features=_features()).to_parquet(str(folder / f"{split}-00000.parquet"))
    return folder


def test_hf_split_reads_images_and_labels_as_given(hf_folder, tmp_path):
    x, y = load_fashion_mnist("test")
    val = HfDataset(f"hfds/{hf_folder}", str(tmp_path), "val", 1)  # 'val' is the data set's 'test'
    assert val.description == f"hfds/{hf_folder} split test" and len(val) == 100
    assert val.classes == list(CLASSES) and val.num_classes == 10
    for i in (0, 37, 99):
        img, label = val[i]
        assert img.mode == "L" and np.array_equal(np.asarray(img), x[i].numpy()) and label == int(y[i])
    rgb, _ = HfDataset(f"hfds/{hf_folder}", str(tmp_path), "test", 3)[0]
    assert rgb.mode == "RGB" and np.array_equal(np.asarray(rgb)[..., 1], x[0].numpy())
    spread = HfDataset(f"hfds/{hf_folder}", str(tmp_path), "test", 1, subset=10)
    assert len(spread) == 10 and spread[1][1] == int(y[10])  # every tenth row, not the first ten


def test_an_evaluation_split_is_labelled_by_the_training_split_names(hf_folder, tmp_path):
    order = list(reversed(CLASSES))
    val = HfDataset(f"hfds/{hf_folder}", str(tmp_path), "test", 1, classes=order)
    _, y = load_fashion_mnist("test")
    assert val.classes == order and [val[i][1] for i in range(5)] == [9 - int(v) for v in y[:5]]
    with pytest.raises(ConfigError, match=r"has 1 class\(es\) that the training split lacks \(Ankle boot\)"):
        HfDataset(f"hfds/{hf_folder}", str(tmp_path), "test", 1, classes=list(CLASSES[:9]))


def _write(folder, rows: dict, features=None, split="train"):
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(folder / f"{split}-00000.parquet"))
    return f"hfds/{folder}"


def _images(n):
    x, _ = load_fashion_mnist("test")
    return [Image.fromarray(x[i].numpy()) for i in range(n)]


def test_string_and_integer_label_columns_are_classes_by_sorted_value(tmp_path):
    names = _write(tmp_path / "s", {"image": _images(4), "y": ["dog", "cat", "dog", "ant"]})
    ds = HfDataset(names, str(tmp_path / "c"), "train", 1, label_key="y")
    assert ds.classes == ["ant", "cat", "dog"] and [ds[i][1] for i in range(4)] == [2, 1, 2, 0]
    ints = _write(tmp_path / "i", {"image": _images(3), "label": [10, 3, 0]})
    ds = HfDataset(ints, str(tmp_path / "c"), "train", 1)
    assert ds.classes == ["0", "3", "10"] and [ds[i][1] for i in range(3)] == [2, 1, 0]
    unlabelled = _write(tmp_path / "u", {"image": _images(2), "label": [1, -1]}, _features())
    with pytest.raises(ConfigError, match=r"rows labelled -1, outside its 10 classes .*data.val_split"):
        HfDataset(unlabelled, str(tmp_path / "c"), "train", 1)
    floats = _write(tmp_path / "f", {"image": _images(2), "label": [0.5, 1.0]})
    with pytest.raises(ConfigError, match=r"holds 0.5 \(float\), not a class"):
        HfDataset(floats, str(tmp_path / "c"), "train", 1)


def test_missing_columns_and_splits_are_named(hf_folder, tmp_path):
    name = f"hfds/{hf_folder}"
    with pytest.raises(ConfigError, match=r"no image column 'img' \(its columns: image, label\): set data.image_key"):
        HfDataset(name, str(tmp_path), "train", 1, image_key="img")
    with pytest.raises(ConfigError, match=r"no label column 'y' \(its columns: image, label\): set data.label_key"):
        HfDataset(name, str(tmp_path), "train", 1, label_key="y")
    with pytest.raises(ConfigError, match=r"Unknown split \"training\".*'train', 'test'.*data.train_split"):
        HfDataset(name, str(tmp_path), "training", 1)


def test_a_save_to_disk_folder_is_read(hf_folder, tmp_path):
    saved = tmp_path / "saved"
    datasets.load_dataset(str(hf_folder), cache_dir=str(tmp_path / "c")).save_to_disk(str(saved))
    val = HfDataset(f"hfds/{saved}", None, "val", 1)
    assert (
        val.description.endswith("split test")
        and len(val) == 100
        and val[3][1] == int(load_fashion_mnist("test")[1][3])
    )
    with pytest.raises(ConfigError, match=r"Unknown split \"x\".*\['train', 'test'\]"):
        HfDataset(f"hfds/{saved}", None, "x", 1)


def test_an_unreadable_image_is_skipped_or_refused_by_row(tmp_path):
    good = io.BytesIO()
    _images(1)[0].save(good, format="PNG")
    rows = {"image": [{"bytes": b"not an image", "path": None}, {"bytes": good.getvalue(), "path": None}]}
    name = _write(tmp_path / "bad", {**rows, "label": [1, 2]})
    skip = HfDataset(name, str(tmp_path / "c"), "train", 1)
    img, label = skip[0]  # row 0 is broken: row 1 stands in
    assert label == 1 and img.size == (28, 28)  # labels 1, 2 are classes 0, 1
    with pytest.raises(CorruptImageError, match=rf"cannot read image hfds/{tmp_path}/bad split train row 0"):
        HfDataset(name, str(tmp_path / "c"), "train", 1, corrupt="error")[0]


@pytest.fixture(scope="module")
def torch_root(tmp_path_factory):
    """torchvision's FashionMNIST layout (root/FashionMNIST/raw, files unpacked), from the real IDX files; its
    training files are the test split's (torchvision wants all four, and 10,000 images are enough here)."""
    root = tmp_path_factory.mktemp("tv")
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    found = find_fashion_mnist()
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        packed = found / f"t10k-{kind}.gz"
        data = gzip.decompress(packed.read_bytes()) if packed.exists() else (found / f"t10k-{kind}").read_bytes()
        for split in ("t10k", "train"):
            (raw / f"{split}-{kind}").write_bytes(data)
    return root


def test_torchvision_data_set(torch_root):
    x, y = load_fashion_mnist("test")
    val = TorchVision("torch/fashion_mnist", str(torch_root), "val", 1, subset=100)
    assert val.description == "torch/fashion_mnist split test" and len(val) == 100 and val.classes == list(CLASSES)
    img, label = val[2]  # the subset: every hundredth image
    assert img.mode == "L" and np.array_equal(np.asarray(img), x[200].numpy()) and label == int(y[200])
    assert TorchVision("torch/fashion_mnist", str(torch_root), "train", 3)[0][0].mode == "RGB"


def test_missing_torchvision_data_says_where_and_how(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"torch/cifar10 \(split train\) could not be read from .*data.download"
    ):
        TorchVision("torch/cifar10", str(tmp_path), "train", 3)
    with pytest.raises(ConfigError, match="data.name=torch/cifar10 needs data.dir"):
        TorchVision("torch/cifar10", None, "train", 3)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("wds/shards", "streaming readers .* use hfds/"),
        ("hfids/beans", "streaming readers"),
        ("torch/svhn", "'torch/svhn' is not a torchvision data set timm builds"),
        ("imagenet", "data.name must be fashion_mnist, folder"),
        ("hfds/", "got 'hfds/'"),
    ],
)
def test_names_the_trainer_cannot_read_are_refused(name, message):
    with pytest.raises(ConfigError, match=message):
        source(name)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"data.image_key": "img"}, "data.image_key takes effect with data.name hfds/<name>"),
        ({"data.name": "torch/mnist", "data.dir": "x", "data.label_key": "y"}, "data.label_key takes effect with"),
        ({"data.name": "hfds/x", "data.download": True}, "data.download takes effect with data.name torch/<name>"),
    ],
)
def test_data_keys_that_would_do_nothing_are_refused(tmp_path, overrides, message, capsys):
    assert main(["train", *args(TINY, **{"train.output": str(tmp_path)}, **overrides)]) == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_trainer_on_a_hugging_face_data_set_resumes_exactly(hf_folder, tmp_path, capsys):
    data = {"data.name": f"hfds/{hf_folder}", "data.dir": str(tmp_path / "cache"), "data.eval_subset": None}
    out = str(tmp_path / "runs")
    assert main(["train", *args(TINY, **data, **{"train.output": out, "train.name": "full"})]) == 0
    header = capsys.readouterr().out
    assert f"data hfds/{hf_folder}: 256 training images, 100 evaluated every epoch" in header
    part = {"train.output": out, "train.name": "part", "train.max_steps": 3, "data.workers": 1}
    assert main(["train", *args(TINY, **data, **part)]) == 0
    assert main(["train", "--resume", str(tmp_path / "runs" / "part")]) == 0
    a, b = (checkpoint.load(tmp_path / "runs" / n / "last.pt") for n in ("full", "part"))
    assert a["classes"] == list(CLASSES) and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    records = [json.loads(r) for r in (tmp_path / "runs" / "full" / "metrics.jsonl").read_text().splitlines()]
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(tmp_path / "runs" / "full" / "last.pt")]) == 0
    report = capsys.readouterr().out
    assert f"100 images of hfds/{hf_folder} split test" in report and f"top-1 {records[-1]['top1']:.2f}%" in report


def test_build_datasets_reads_both_splits_by_name(torch_root):
    cfg = load_config(None, {"data.name": "torch/fashion_mnist", "data.dir": str(torch_root), "data.train_subset": 50})
    train, val = build_datasets(cfg)
    assert len(train) == 50 and len(val) == 10_000 and train.classes == val.classes == list(CLASSES)
    assert mean_std(cfg, None) == ((MEAN,), (STD,))  # Fashion-MNIST's statistics, as from its IDX files


def _png(array) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _tar_bytes(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, data in members.items():
            _add(tar, name, data)
    return out.getvalue()


@pytest.fixture(scope="module")
def tars(tmp_path_factory):
    """The first 60 test images of Fashion-MNIST, classes 'c00'...'c09', in the three layouts timm's tar reader
    takes: one tar of class folders, a folder of per-class tars, and a tar of per-class tars."""
    root = tmp_path_factory.mktemp("tars")
    x, y = load_fashion_mnist("test")
    by_class: dict[str, dict[str, bytes]] = {}
    for i in range(60):
        by_class.setdefault(f"c{int(y[i]):02d}", {})[f"{i:03d}.png"] = _png(x[i].numpy())
    (root / "flat.tar").write_bytes(_tar_bytes({f"{c}/{n}": d for c, m in by_class.items() for n, d in m.items()}))
    (root / "per_class").mkdir()
    for c, members in by_class.items():
        (root / "per_class" / f"{c}.tar").write_bytes(_tar_bytes(members))
    (root / "nested.tar").write_bytes(_tar_bytes({f"{c}.tar": _tar_bytes(m) for c, m in by_class.items()}))
    return root


@pytest.mark.parametrize("split", ["flat", "per_class", "nested.tar"])
def test_tar_layouts_read_images_and_classes(tars, split):
    x, y = load_fashion_mnist("test")
    ds = TarImages(str(tars), split, 1)
    assert len(ds) == 60 and ds.classes == [f"c{k:02d}" for k in sorted({int(v) for v in y[:60]})]
    for i in (0, 17, 59):
        img, label = ds[i]
        name = ds.reader.filename(ds.rows[i])  # sorted by path: class by class
        source = int(Path(name).stem)
        assert np.array_equal(np.asarray(img), x[source].numpy()) and ds.classes[label] == f"c{int(y[source]):02d}"


def test_tar_evaluation_split_takes_the_training_names_and_forked_workers_read_their_own(tars):
    train = TarImages(str(tars), "flat", 1)
    order = list(reversed(train.classes))
    val = TarImages(str(tars), "nested", 1, classes=order)
    by_name = {Path(train.reader.filename(i)).name: train[i][1] for i in range(60)}  # the two sort differently
    assert val.classes == order
    assert [val[i][1] for i in range(60)] == [
        len(order) - 1 - by_name[Path(val.reader.filename(i)).name] for i in range(60)
    ]
    with pytest.raises(ConfigError, match="class\\(es\\) that the training split lacks"):
        TarImages(str(tars), "per_class", 1, classes=train.classes[1:])
    # the main process has open tar files now; workers forked from it must not read through them (they would share
    # its read position): a process other than the one that opened them opens its own
    opened = val.reader.tar_state.tf
    val._pid = -1  # as in a forked worker
    assert val[0] == val[0] and val.reader.tar_state.tf is not opened and not opened.closed
    assert pickle.loads(pickle.dumps(val))[7] == val[7]  # a spawned worker's copy, made after reading
    loader = DataLoader(val, batch_size=16, num_workers=2, collate_fn=lambda b: b)
    forked = [t for batch in loader for _, t in batch]
    assert forked == [val[i][1] for i in range(60)]


def test_tar_problems_are_named(tars, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no tar for split 'val'.*--data.train_split ILSVRC2012_img_train.tar"):
        TarImages(str(tars), "val", 1)
    (tmp_path / "cut.tar").write_bytes((tars / "flat.tar").read_bytes()[:3000])
    with pytest.raises(CorruptDataError, match=r"cannot read the tar file\(s\) of .*cut.tar"):
        TarImages(str(tmp_path), "cut", 1)
    good = _png(load_fashion_mnist("test")[0][0].numpy())
    (tmp_path / "bad.tar").write_bytes(_tar_bytes({"a/0.png": b"broken", "a/1.png": good, "b/2.png": good}))
    assert TarImages(str(tmp_path), "bad", 1)[0][1] == 0  # 0.png is skipped: 1.png stands in
    with pytest.raises(CorruptImageError, match=r"cannot read image .*bad.tar:a/0.png"):
        TarImages(str(tmp_path), "bad", 1, corrupt="error")[0]


def test_trainer_on_tar_files(tars, tmp_path, capsys):
    data = {"data.name": "tar", "data.dir": str(tars), "data.train_split": "nested.tar", "data.val_split": "flat"}
    more = {"data.train_subset": None, "data.eval_subset": None, "data.batch_size": 20, "train.output": str(tmp_path)}
    assert main(["train", *args(TINY, **data, **more, **{"sched.epochs": 1})]) == 0
    assert "data tar: 60 training images, 60 evaluated every epoch" in capsys.readouterr().out


def test_pretraining_reads_a_hugging_face_data_set_without_labels(tmp_path, capsys):
    name = _write(tmp_path / "unlabelled", {"image": _images(64)})
    assert HfDataset(name, str(tmp_path / "c"), "train", 1, label_key=None)[5][1] == 0
    data = {"data.name": name, "data.dir": str(tmp_path / "c"), "data.batch_size": 32, "data.on_device": False}
    more = {"train.output": str(tmp_path / "runs"), "train.max_steps": 1, "data.workers": 0}
    tiny = {"model.kwargs": TINY["model.kwargs"] | {"img_size": 32, "patch_size": 4}, "data.img_size": 32}
    tiny |= {"pretrain.decoder_dim": 16, "pretrain.decoder_depth": 1, "pretrain.decoder_heads": 2}
    assert main(["pretrain", *args(tiny | {"pretrain.projector_dim": 16}, **data, **more)]) == 0
    assert f"data {name}: 64 training images" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="no label column 'label'"):  # training needs them
        build_datasets(load_config(None, {"data.name": name, "data.dir": str(tmp_path / "c")}))


def test_webdataset_shards_are_read_indexed_through_hugging_face_datasets(tmp_path):
    """timm's wds/ reader streams; the datasets package turns the same shards into an indexed table."""
    x, y = load_fashion_mnist("test")
    (tmp_path / "shards").mkdir()
    for shard in range(2):
        members = {}
        for i in range(shard * 20, shard * 20 + 20):
            members |= {f"{i:06d}.png": _png(x[i].numpy()), f"{i:06d}.cls": str(int(y[i])).encode()}
        (tmp_path / "shards" / f"train-{shard:04d}.tar").write_bytes(_tar_bytes(members))
    ds = HfDataset(f"hfds/{tmp_path / 'shards'}", str(tmp_path / "c"), "train", 1, image_key="png", label_key="cls")
    assert len(ds) == 40 and ds.classes == [str(k) for k in sorted({int(v) for v in y[:40]})]
    for i in (0, 25, 39):
        img, label = ds[i]
        assert np.array_equal(np.asarray(img), x[i].numpy()) and ds.classes[label] == str(int(y[i]))


def _final_weights(tmp_path, name, data):
    more = {"train.output": str(tmp_path), "train.name": name, "sched.epochs": 1, "aug.mean": [0.3], "aug.std": [0.35]}
    assert main(["train", *args(TINY, **{**more, **data})]) == 0
    return checkpoint.load(tmp_path / name / "last.pt")


@pytest.mark.parametrize("kind", ["torch", "hfds"])
def test_the_same_images_by_another_source_train_the_same_weights(kind, torch_root, hf_folder, tmp_path):
    """Fashion-MNIST read from its IDX files and from torchvision's folder or Hugging Face parquet files: the
    same images and labels in the same order, so one run's weights, bit for bit."""
    if kind == "torch":  # torchvision's folder here holds the test split only: both runs train on all of it
        every = {"data.train_split": "test", "data.train_subset": None, "data.eval_subset": 100}
        idx = {"data.name": "fashion_mnist", **every}
        other = {"data.name": "torch/fashion_mnist", "data.dir": str(torch_root), **every}
    else:  # the parquet files hold the first 256 training and 100 test images: IDX's first ones
        idx = {"data.name": "fashion_mnist", "data.train_subset": 256, "data.eval_subset": 100}
        other = {"data.name": f"hfds/{hf_folder}", "data.dir": str(tmp_path / "cache")}
        other |= {"data.train_subset": None, "data.eval_subset": None}
    a, b = _final_weights(tmp_path, "idx", idx), _final_weights(tmp_path, kind, other)
    assert a["classes"] == b["classes"] == list(CLASSES) and a["position"] == b["position"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
