"""``train.tensorboard``: the run's scalars in TensorBoard event files, equal to its metrics, and a resumed run's
equal to the uninterrupted run's even where a killed process logged past its checkpoint."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_trainer import TINY, args
from torch.utils.tensorboard import SummaryWriter

from masksub.cli import main

RUN = {"data.batch_size": 8, "train.tensorboard": True}  # 256 images: 32 steps an epoch, 64 in the run
COMPARED = ("train/loss", "train/loss_main", "train/loss_sub", "train/lr", "epoch/top1", "epoch/train_loss")


def _scalars(folder) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(folder / "tensorboard"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_the_event_files_hold_the_run_metrics(tmp_path):
    assert main(["train", *args(TINY, **RUN, **{"train.output": str(tmp_path), "train.name": "run"})]) == 0
    scalars = _scalars(tmp_path / "run")
    for tag in ("train/loss", "train/loss_main", "train/loss_sub", "train/lr", "train/images_per_s"):
        assert [step for step, _ in scalars[tag]] == [20, 40, 60], tag
    records = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for key in ("top1", "top5", "train_loss", "train_loss_sub", "lr", "epoch_time_s"):
        assert scalars[f"epoch/{key}"] == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in records], key
    assert [r["step"] for r in records] == [32, 64] and "epoch/epoch" not in scalars


def test_a_resumed_run_logs_what_the_uninterrupted_one_logged(tmp_path):
    out = {"train.output": str(tmp_path)}
    assert main(["train", *args(TINY, **RUN, **out, **{"train.name": "full"})]) == 0
    assert main(["train", *args(TINY, **RUN, **out, **{"train.name": "part", "train.max_steps": 45})]) == 0
    # a process killed after its checkpoint (step 45) had gone on logging: this run logs those steps again
    with SummaryWriter(str(tmp_path / "part" / "tensorboard")) as killed:
        killed.add_scalar("train/loss", 999.0, 60)
        killed.add_scalar("epoch/top1", 999.0, 64)
    assert main(["train", "--resume", str(tmp_path / "part")]) == 0
    full, part = _scalars(tmp_path / "full"), _scalars(tmp_path / "part")
    for tag in COMPARED:
        assert part[tag] == full[tag], tag
    assert [step for step, _ in part["epoch/top1"]] == [32, 64]


def test_without_the_package_the_key_names_the_install(tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    assert main(["train", *args(TINY, **RUN, **{"train.output": str(tmp_path)})]) == 2
    assert "needs the tensorboard package: pip install tensorboard" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_under_torchrun_process_zero_alone_writes_events(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "masksub.cli"]
    cmd += ["train", *args(TINY, **RUN, **{"train.output": str(tmp_path), "train.name": "ddp"})]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((tmp_path / "ddp" / "tensorboard").iterdir())) == 1
    scalars = _scalars(tmp_path / "ddp")
    records = [json.loads(r) for r in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert scalars["epoch/top1"] == [(r["step"], pytest.approx(r["top1"], rel=1e-6)) for r in records]
    assert [r["step"] for r in records] == [16, 32] and [s for s, _ in scalars["train/loss"]] == [20]
