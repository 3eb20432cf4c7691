"""A flat evaluation split (ImageNet's validation folder or tar: images without class folders) labelled by a file
(``data.val_labels``), in each format such files come in, on real Fashion-MNIST images."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_sources import _png, _tar_bytes
from test_trainer import TINY, args

from masksub.cli import main
from masksub.data import load_fashion_mnist
from masksub.train.config import ConfigError, load_config
from masksub.train.data import build_datasets

N = 60


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """``train/cXX/<i>.png`` and ``sorted/cXX/img_<i>.png`` (class folders), ``val/img_<i>.png`` and ``val.tar``
    (flat): the first 60 test images of Fashion-MNIST; ``img_2`` sorts before ``img_10``."""
    root = tmp_path_factory.mktemp("flat")
    x, y = load_fashion_mnist("test")
    (root / "val").mkdir()
    members = {}
    for i in range(N):
        png = _png(x[i].numpy())
        for top in ("train", "sorted"):
            (root / top / f"c{int(y[i]):02d}").mkdir(parents=True, exist_ok=True)
            (root / top / f"c{int(y[i]):02d}" / f"img_{i}.png").write_bytes(png)
        (root / "val" / f"img_{i}.png").write_bytes(png)
        members[f"img_{i}.png"] = png
    (root / "val.tar").write_bytes(_tar_bytes(members))
    by_class = {f"c{int(y[i]):02d}/img_{i}.png": members[f"img_{i}.png"] for i in range(N)}
    (root / "train.tar").write_bytes(_tar_bytes(by_class))
    return root, [f"c{int(v):02d}" for v in y[:N]]


def _formats(root, names):
    """The same labels in each format: ``<image> <class>`` lines, ``<image> <index>`` (Caffe), a CSV by image name
    without extension with boxes after the class (Kaggle), a CSV without a header, and classes alone in the images'
    name order (TF-slim)."""
    classes = sorted(set(names))
    files = {
        "pairs.txt": "".join(f"img_{i}.png {names[i]}\n" for i in reversed(range(N))),
        "caffe.txt": "".join(f"img_{i}.png {classes.index(names[i])}\n" for i in range(N)),
        "kaggle.csv": "ImageId,PredictionString\n" + "".join(f"img_{i},{names[i]} 3 4 20 25\n" for i in range(N)),
        "plain.csv": "".join(f"img_{i}.png,{names[i]}\n" for i in range(N)),  # no header row
        "slim.txt": "".join(f"{names[i]}\n" for i in range(N)),  # img_0, img_1, ..., img_59: natural order
    }
    for name, text in files.items():
        (root / name).write_text(text)
    return list(files)


def _config(root, **more):
    return load_config(None, {"data.name": "folder", "data.dir": str(root), "data.in_chans": 1, **more})


@pytest.mark.parametrize("kind", ["folder", "tar"])
def test_each_format_labels_the_flat_split_as_its_class_folders_do(split, kind):
    root, names = split
    x, _ = load_fashion_mnist("test")
    for file in _formats(root, names):
        cfg = _config(root, **{"data.name": kind, "data.val_labels": str(root / file)})
        train, val = build_datasets(cfg)
        assert len(val) == N and val.classes == train.classes
        for i in range(N):  # natural order: the i-th image is img_<i>
            image, label = val[i]
            assert np.array_equal(np.asarray(image), x[i].numpy()), (file, i)
            assert val.classes[label] == names[i], (file, i)


def test_a_subset_keeps_its_images_labels(split):
    root, names = split
    (file,) = _formats(root, names)[:1]
    val = build_datasets(_config(root, **{"data.val_labels": str(root / file), "data.eval_subset": 7}))[1]
    assert len(val) == 7 and [val.classes[val[i][1]] for i in range(7)] == [names[i * N // 7] for i in range(7)]


def _refused(root, text, message, kind="folder", name="labels.txt", split="val"):
    (root / name).write_text(text)
    cfg = _config(root, **{"data.name": kind, "data.val_labels": str(root / name), "data.val_split": split})
    with pytest.raises(ConfigError, match=message):
        build_datasets(cfg)


def test_wrong_label_files_are_refused_naming_the_line_and_the_fix(split, tmp_path):
    root, names = split
    pairs = [f"img_{i}.png {names[i]}" for i in range(N)]
    _refused(root, "\n".join(names[:-1]), r"lists 59 classes, one per line in the order .* holds 60")
    _refused(root, "\n".join(pairs[:-1]), r"leaves 1 image\(s\) of .*val unlabelled \(img_59.png\)")
    _refused(root, "\n".join([*pairs, "img_99.png c00"]), r"labels 1 image\(s\) that .*val lacks \(img_99.png\)")
    _refused(root, "\n".join([*pairs, "img_0 c00"]), r"line 61: img_0.png is labelled twice")
    _refused(root, "\n".join(["img_0.png sandal", *pairs[1:]]), r"line 1: class 'sandal' is not one .* below 10")
    _refused(root, "\n".join(["img_0.png 10", *pairs[1:]]), r"line 1: class '10' is not one the training split has")
    _refused(root, "\n".join(["img_0.png", *pairs[1:]]), r"line 1: 'img_0.png' has no class")
    _refused(root, "ImageId,PredictionString\n", "lists no labels", name="labels.csv")
    kaggle = "ImageId,PredictionString\nimg_0,sandal 1 2 3 4\n" + "".join(f"{p.replace(' ', ',')}\n" for p in pairs[1:])
    _refused(root, kaggle, r"labels.csv, line 2: class 'sandal 1 2 3 4' is not one", name="labels.csv")
    _refused(root, "\n".join(pairs), r"holds class folders, which label its images; .* unset it", split="sorted")
    _refused(root, "\n".join(pairs), r"lie in 10 folders or tars, which label them", kind="tar", split="train")
    with pytest.raises(FileNotFoundError, match="data.val_labels: no such file"):
        build_datasets(_config(root, **{"data.val_labels": str(tmp_path / "none.txt")}))


def test_numbers_are_class_names_where_the_classes_are_numbers(tmp_path):
    """Where folders are named 0, 1, ... a number in the file is that name, never an index."""
    x, y = load_fashion_mnist("test")
    (tmp_path / "val").mkdir()
    for i in range(12):
        (tmp_path / "train" / str(int(y[i]) + 1)).mkdir(parents=True, exist_ok=True)
        (tmp_path / "train" / str(int(y[i]) + 1) / f"{i}.png").write_bytes(_png(x[i].numpy()))
        (tmp_path / "val" / f"{i}.png").write_bytes(_png(x[i].numpy()))
    (tmp_path / "labels.txt").write_text("".join(f"{i}.png {int(y[i]) + 1}\n" for i in range(12)))
    train, val = build_datasets(_config(tmp_path, **{"data.val_labels": str(tmp_path / "labels.txt")}))
    assert [val.classes[val[i][1]] for i in range(12)] == [str(int(v) + 1) for v in y[:12]]
    absent = next(str(k) for k in range(1, 11) if str(k) not in train.classes)
    (tmp_path / "labels.txt").write_text("".join(f"{i}.png {absent}\n" for i in range(12)))
    with pytest.raises(ConfigError, match=rf"class '{absent}' is not one the training split has \(its"):
        build_datasets(_config(tmp_path, **{"data.val_labels": str(tmp_path / "labels.txt")}))


def test_a_flat_folder_without_labels_names_the_key(split):
    root, _ = split
    with pytest.raises(FileNotFoundError, match="name the file of their classes as data.val_labels"):
        build_datasets(_config(root))


@pytest.mark.parametrize("kind", ["folder", "tar"])
def test_the_trainer_scores_a_labelled_flat_split_as_its_class_folders(split, kind, tmp_path, capsys):
    """One run evaluated on the flat split with a label file and one on the same images in class folders: the same
    accuracy every epoch; ``masksub eval`` of the first reads the file again."""
    root, names = split
    file = _formats(root, names)[0]
    common = {"data.name": kind, "data.dir": str(root), "data.train_subset": None, "data.eval_subset": None}
    common |= {"data.batch_size": 20, "train.output": str(tmp_path)}
    runs = {
        "labelled": {"data.val_split": "val" if kind == "folder" else "val.tar", "data.val_labels": str(root / file)},
        "folders": {"data.val_split": "sorted" if kind == "folder" else "train.tar"},
    }
    for name, data in runs.items():
        assert main(["train", *args(TINY, **common, **data, **{"train.name": name})]) == 0
    scores = {
        name: [json.loads(r)["top1"] for r in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        for name in runs
    }
    assert scores["labelled"] == scores["folders"] and len(scores["labelled"]) == 2
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(tmp_path / "labelled" / "last.pt")]) == 0
    assert f"top-1 {scores['labelled'][-1]:.2f}%" in capsys.readouterr().out


def test_the_key_is_refused_where_labels_come_with_the_data(tmp_path, capsys):
    assert main(["train", *args(TINY, **{"train.output": str(tmp_path), "data.val_labels": "x.txt"})]) == 2
    assert "data.val_labels takes effect with data.name folder or tar" in capsys.readouterr().err
