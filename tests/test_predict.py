"""``masksub predict`` on image files: the run's model and its exported folder give the same classes, and they score
what the run scored on the same images."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from PIL import Image
from test_trainer import TINY, args

from masksub.cli import main
from masksub.data import CLASSES, load_fashion_mnist
from masksub.train.accuracy import per_class_text


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run with EMA weights, and its 200 evaluation images as PNG files (``imgs/<group>/<index>_<label>.png``)
    beside a hidden folder, a text file and a broken image."""
    root = tmp_path_factory.mktemp("predict")
    settings = {"train.output": str(root), "train.name": "run", "sched.epochs": 1, "train.ema": True}
    settings["train.ema_decay"] = 0.9
    assert main(["train", *args(TINY, **settings)]) == 0
    x, y = load_fashion_mnist("test")
    for i in range(200):
        folder = root / "imgs" / f"g{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[i].numpy()).save(folder / f"{i}_{int(y[i])}.png")
    (root / "imgs" / ".cache").mkdir()
    Image.fromarray(x[0].numpy()).save(root / "imgs" / ".cache" / "0_0.png")
    (root / "imgs" / "notes.txt").write_text("not an image")
    (root / "empty").mkdir()
    (root / "imgs" / "broken.png").write_bytes(b"not a png")
    top1 = json.loads((root / "run" / "metrics.jsonl").read_text().splitlines()[-1])["top1"]
    return root, top1


def _predict(source, out, *more) -> list[dict]:
    assert main(["predict", "--checkpoint", str(source), "--out", str(out), *more]) == 0
    with open(out, newline="") as f:
        return list(csv.DictReader(f))


def test_predictions_score_what_the_run_scored(run, tmp_path, capfd):
    root, top1 = run
    rows = _predict(root / "run", tmp_path / "p.csv", "--topk", "3", str(root / "imgs"))
    out, err = capfd.readouterr()  # the warning comes from a loader worker: a process of its own
    assert "wrote the top 3 classes of 200 images" in out and "1 unreadable image(s) skipped" in out
    assert "skipping unreadable image" in err and "broken.png" in err
    assert list(rows[0]) == ["image", "class_1", "prob_1", "class_2", "prob_2", "class_3", "prob_3"]
    assert len(rows) == 200 and not any(".cache" in r["image"] for r in rows)
    correct = sum(CLASSES.index(r["class_1"]) == int(r["image"].rsplit("_", 1)[1][:-4]) for r in rows)
    assert correct / 2 == pytest.approx(top1, abs=1e-6)
    for r in rows:
        probs = [float(r[f"prob_{k}"]) for k in (1, 2, 3)]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        assert len({r["class_1"], r["class_2"], r["class_3"]}) == 3


def test_an_exported_folder_predicts_as_its_run(run, tmp_path, capsys):
    root, _ = run
    some = [str(root / "imgs" / "g1"), str(root / "imgs" / "g0" / "3_1.png")]
    for ema in ([], ["--ema"]):
        assert main(["export", "--checkpoint", str(root / "run"), "--out", str(tmp_path / f"x{len(ema)}"), *ema]) == 0
        by_run = _predict(root / "run", tmp_path / "run.csv", *ema, *some)
        by_export = _predict(tmp_path / f"x{len(ema)}", tmp_path / "export.csv", *some)
        assert len(by_run) == 67 + 1 and [r["image"] for r in by_run] == [r["image"] for r in by_export]
        assert by_run[-1]["image"].endswith("3_1.png")  # in the order named
        for a, b in zip(by_run, by_export, strict=True):
            assert [a[f"class_{k}"] for k in range(1, 6)] == [b[f"class_{k}"] for k in range(1, 6)]
            assert float(a["prob_1"]) == pytest.approx(float(b["prob_1"]), abs=2e-6)
    plain, ema = (_predict(root / "run", tmp_path / f"{n}.csv", *m, *some) for n, m in (("p", []), ("e", ["--ema"])))
    assert [r["prob_1"] for r in plain] != [r["prob_1"] for r in ema]
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(tmp_path / "x0"), "--topk", "2", some[1]]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{some[1]}: {plain[-1]['class_1']} ") and line.count("%") == 2


@pytest.mark.parametrize(
    ("more", "message"),
    [
        (["nowhere"], "nowhere: no such file or folder"),
        (["{root}/empty"], "no images under"),
        (["--topk", "0", "{root}/imgs"], "--topk and --batch-size must be at least 1"),
        (["--sub.ratio", "0.3", "{root}/imgs"], "masksub predict takes no --sub.ratio"),
    ],
)
def test_what_predict_refuses(run, more, message, capsys):
    root, _ = run
    more = [m.format(root=root) for m in more]
    assert main(["predict", "--checkpoint", str(root / "run"), *more]) == 2
    assert message in capsys.readouterr().err


def test_an_exported_folder_has_no_ema_weights(run, tmp_path, capsys):
    root, _ = run
    assert main(["export", "--checkpoint", str(root / "run"), "--out", str(tmp_path / "x")]) == 0
    assert main(["predict", "--checkpoint", str(tmp_path / "x"), "--ema", str(root / "imgs" / "g0")]) == 2
    assert "an exported model, which holds one set of weights: drop --ema" in capsys.readouterr().err


def test_eval_per_class_agrees_with_the_predictions(run, tmp_path, capsys):
    """``masksub eval --per-class --confusion``: the matrix of the evaluation images equals the one counted from
    ``masksub predict`` on the same images as files, and its diagonal is the top-1 accuracy."""
    root, top1 = run
    rows = _predict(root / "run", tmp_path / "p.csv", str(root / "imgs"))
    counted = [[0] * 10 for _ in CLASSES]
    for r in rows:
        counted[int(r["image"].rsplit("_", 1)[1][:-4])][CLASSES.index(r["class_1"])] += 1
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(root / "run"), "--per-class", "--confusion", str(tmp_path / "c.csv")]) == 0
    out = capsys.readouterr().out
    assert out.count("per class, worst first") == 2 and "most often confused (true -> predicted)" in out
    for name in ("c.csv", "c_ema.csv"):
        with open(tmp_path / name, newline="") as f:
            table = list(csv.reader(f))
        assert table[0] == ["true \\ predicted", *CLASSES] and [r[0] for r in table[1:]] == list(CLASSES)
        matrix = [[int(v) for v in r[1:]] for r in table[1:]]
        assert sum(map(sum, matrix)) == 200
        if name == "c.csv":
            assert matrix == counted and sum(matrix[i][i] for i in range(10)) / 2 == pytest.approx(top1, abs=1e-6)


def test_per_class_text_orders_worst_first_and_names_absent_classes():
    confusion = torch.tensor([[8, 2, 0], [5, 5, 0], [0, 0, 0]])
    text = per_class_text(confusion, ["cat", "dog", "eel"], most=5)
    lines = text.splitlines()
    assert lines[1].split() == ["dog", "50.00%", "10"] and lines[2].split() == ["cat", "80.00%", "10"]
    assert "no images of 1 class(es): eel" in text
    assert lines[-2:] == ["    dog -> cat: 5 (50.0% of dog)", "    cat -> dog: 2 (20.0% of cat)"]
