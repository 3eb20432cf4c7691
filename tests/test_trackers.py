"""``train.tensorboard`` and ``train.wandb``: the run's scalars in TensorBoard event files and in an offline W&B
run, equal to its metrics, and a resumed run's equal to the uninterrupted run's even where a killed process logged
past its checkpoint."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import struct
import subprocess
import sys
import time

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_trainer import TINY, args
from torch.utils.tensorboard import SummaryWriter

from masksub.cli import main
from masksub.train.interrupt import Interrupted
from masksub.train.trackers import Trackers, WandB

RUN = {"data.batch_size": 8, "train.tensorboard": True}  # 256 images: 32 steps an epoch, 64 in the run
COMPARED = ("train/loss", "train/loss_main", "train/loss_sub", "train/lr", "epoch/top1", "epoch/train_loss")


def _scalars(folder) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(folder / "tensorboard"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")  # no server: W&B writes its run to <run>/wandb
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    import wandb

    wandb.teardown()  # W&B reads its variables once a process: a test's own are read afresh
    yield
    wandb.teardown()


def _wandb_records(path) -> list:
    """The records of a W&B run file (its LevelDB-style log of protobuf records, as wandb sync reads it)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, part, out = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B", data[:7]
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        part, pos = part + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(part)
            out.append(record)
            part = b""
    return out


def _wandb_runs(folder) -> list[dict]:
    """Each offline W&B run in a run folder, oldest first: its id, name, project, job type, config, exit code,
    whether it was marked preempting, and its history as {key: [(step, value)]}."""
    runs = []
    for file in sorted((folder / "wandb").glob("offline-run-*/run-*.wandb")):
        run = {"history": {}, "exit_code": None, "preempting": False}
        records, waited = _wandb_records(file), 0.0
        while not any(r.WhichOneof("record_type") == "exit" for r in records) and waited < 30:
            time.sleep(0.2)  # W&B's service may still be writing a finished run's last records
            records, waited = _wandb_records(file), waited + 0.2
        for record in records:
            kind = record.WhichOneof("record_type")
            if kind == "run":
                r = record.run
                config = {i.key: json.loads(i.value_json) for i in r.config.update if i.key != "_wandb"}
                run.update(id=r.run_id, name=r.display_name, project=r.project, job_type=r.job_type, config=config)
            elif kind == "history":
                row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                for key, value in row.items():
                    if not key.startswith("_"):
                        run["history"].setdefault(key, []).append((row["_step"], value))
            elif kind == "exit":
                run["exit_code"] = record.exit.exit_code
            elif kind == "preempting":
                run["preempting"] = True
        runs.append(run)
    return runs


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


def test_wandb_logs_what_tensorboard_and_the_metrics_hold(tmp_path):
    run = {**RUN, "train.wandb": "masksub-tests", "train.output": str(tmp_path), "train.name": "run"}
    assert main(["train", *args(TINY, **run)]) == 0
    folder = tmp_path / "run"
    (logged,) = _wandb_runs(folder)
    board, records = _scalars(folder), [json.loads(r) for r in (folder / "metrics.jsonl").read_text().splitlines()]
    assert set(logged["history"]) == set(board)  # the same tags: train/* every 20 steps, epoch/* every epoch
    for tag, points in board.items():
        assert [s for s, _ in logged["history"][tag]] == [s for s, _ in points], tag
        assert [v for _, v in logged["history"][tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag
    assert logged["history"]["epoch/top1"] == [(r["step"], r["top1"]) for r in records]  # exact: JSON, not float32
    saved = json.loads((folder / "wandb-run.json").read_text())
    assert saved == {"id": logged["id"], "project": "masksub-tests"} and logged["id"].startswith("run-")
    assert (logged["name"], logged["project"], logged["job_type"]) == ("run", "masksub-tests", "train")
    assert logged["config"]["train.wandb"] == "masksub-tests" and logged["config"]["model.kwargs"]["embed_dim"] == 32
    assert logged["exit_code"] == 0 and not logged["preempting"]


def test_a_resumed_run_continues_its_wandb_run(tmp_path):
    out = {"train.output": str(tmp_path), "train.wandb": "masksub-tests"}
    assert main(["train", *args(TINY, **RUN, **out, **{"train.name": "full"})]) == 0
    assert main(["train", *args(TINY, **RUN, **out, **{"train.name": "part", "train.max_steps": 45})]) == 0
    first = (tmp_path / "part" / "wandb-run.json").read_text()
    assert main(["train", "--resume", str(tmp_path / "part")]) == 0
    assert (tmp_path / "part" / "wandb-run.json").read_text() == first
    (full,), part = _wandb_runs(tmp_path / "full"), _wandb_runs(tmp_path / "part")
    assert [r["id"] for r in part] == [json.loads(first)["id"]] * 2  # offline, one file a process: W&B joins them
    for tag in COMPARED:
        assert part[0]["history"][tag] + part[1]["history"][tag] == full["history"][tag], tag
    assert [s for s, _ in part[1]["history"]["train/loss"]] == [60]


class _HeldRun:
    """A W&B run resumed from the server, which holds the history up to step 60 (``run.step``)."""

    def __init__(self, step: int):
        self.step, self.logged = step, []

    def log(self, values: dict, step: int) -> None:
        self.logged.append((step, values))


def test_steps_wandb_already_holds_are_not_sent_again():
    tracker = WandB.__new__(WandB)
    tracker.run = _HeldRun(step=60)
    for step in (40, 45, 60, 64):
        tracker.add("train", {"loss": float(step), "epoch": 2}, step)
    assert tracker.run.logged == [(60, {"train/loss": 60.0}), (64, {"train/loss": 64.0})]


def test_an_interrupted_run_is_marked_preempting_and_a_failed_one_failed(tmp_path):
    from masksub.train.config import Config

    cfg = Config()
    cfg.train.wandb = "masksub-tests"
    for name, error, code in (("stopped", Interrupted(signal.SIGTERM, "saved"), 1), ("failed", ValueError(), 1)):
        (tmp_path / name).mkdir()
        with pytest.raises(type(error)), Trackers([WandB(tmp_path / name, cfg, False, "train")]):
            raise error
        (logged,) = _wandb_runs(tmp_path / name)
        assert (logged["exit_code"], logged["preempting"]) == (code, name == "stopped"), name


def test_without_a_wandb_login_the_error_names_the_ways_on(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    import wandb

    wandb.teardown()
    run = {**RUN, "train.wandb": "masksub-tests", "train.output": str(tmp_path / "runs"), "train.name": "run"}
    assert main(["train", *args(TINY, **run)]) == 2
    err = capsys.readouterr().err
    assert "W&B could not start the run" in err and "wandb login" in err and "WANDB_MODE=offline" in err, err
    assert not list((tmp_path / "runs" / "run").glob("*.pt"))


def test_without_the_package_the_key_names_the_install(tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    assert main(["train", *args(TINY, **RUN, **{"train.output": str(tmp_path)})]) == 2
    assert "needs the tensorboard package: pip install tensorboard" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    assert main(["train", *args(TINY, **{**RUN, "train.wandb": "p"}, **{"train.output": str(tmp_path)})]) == 2
    assert "needs the wandb package: pip install wandb" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_under_torchrun_process_zero_alone_writes_events(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "masksub.cli"]
    cmd += ["train", *args(TINY, **RUN, **{"train.output": str(tmp_path), "train.name": "ddp", "train.wandb": "p"})]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((tmp_path / "ddp" / "tensorboard").iterdir())) == 1
    scalars = _scalars(tmp_path / "ddp")
    records = [json.loads(r) for r in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert scalars["epoch/top1"] == [(r["step"], pytest.approx(r["top1"], rel=1e-6)) for r in records]
    assert [r["step"] for r in records] == [16, 32] and [s for s, _ in scalars["train/loss"]] == [20]
    (logged,) = _wandb_runs(tmp_path / "ddp")
    assert logged["history"]["epoch/top1"] == [(r["step"], r["top1"]) for r in records]
