"""`masksub train` end to end on real Fashion-MNIST: artifacts, exact resume, atomic checkpoints, errors."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import errno
import io
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

import masksub
from masksub.cli import main
from masksub.data import load_fashion_mnist
from masksub.train import checkpoint
from masksub.train.config import (
    ConfigError,
    PretrainConfig,
    SubConfig,
    all_keys,
    list_recipes,
    load_config,
    recipe_notes,
)
from masksub.train.data import build_eval_dataset
from masksub.train.runlog import RunLog
from masksub.train.trainer import _duration

TINY = {
    "model.kwargs": {"img_size": 28, "patch_size": 7, "embed_dim": 32, "depth": 1, "num_heads": 2},
    "data.train_subset": 256,
    "data.eval_subset": 200,
    "data.batch_size": 64,
    "data.workers": 0,
    "data.on_device": False,  # the per-sample loader path; the on-device path has tests of its own
    "sched.epochs": 2,
}


def args(overrides: dict, **more) -> list[str]:
    out = []
    for k, v in {**overrides, **more}.items():
        out += [f"--{k}", yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()]
    return out


def run_train(tmp_path, name, **more) -> Path:
    assert main(["train", *args(TINY, **{"train.output": str(tmp_path), "train.name": name}, **more)]) == 0
    return tmp_path / name


def test_train_writes_every_artifact(tmp_path, capsys):
    folder = run_train(tmp_path, "run")
    out = capsys.readouterr().out
    kwargs = TINY["model.kwargs"]
    parameters = sum(
        p.numel() for p in timm.create_model("vit_tiny_patch16_224", num_classes=10, in_chans=1, **kwargs).parameters()
    )
    assert out.startswith(
        f"run folder {folder}\nmodel vit_tiny_patch16_224 (depth=1, embed_dim=32, img_size=28, num_heads=2, "
        f"patch_size=7): {parameters / 1e6:.2f}M parameters; sub branch mask, ratio "
        "0.5 of the 7x7-pixel patch tokens (vit adapter)\ndata fashion_mnist: 256 training images, 200 evaluated every "
        "epoch; batch 64, 4 steps per epoch, 2 epochs; adamw lr 1.00e-03, cosine with 0.5 warm-up epochs\n"
    )
    for f in ("config.yaml", "metrics.jsonl", "summary.csv", "curves.png", "last.pt", "best.pt"):
        assert (folder / f).is_file(), f
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert all(0 <= r["top1"] <= 100 and r["top5"] >= r["top1"] for r in records)
    assert records[-1]["train_loss_sub"] is not None
    with Image.open(folder / "curves.png") as img:
        img.verify()
        assert img.format == "PNG"
    saved = yaml.safe_load((folder / "config.yaml").read_text())
    assert saved["sub"]["kind"] == "mask" and saved["model"]["kwargs"]["depth"] == 1
    assert recipe_notes(str(folder / "config.yaml"))[0].startswith("masksub train --recipe <this file>")
    same = {"train.name": folder.name, "train.output": str(tmp_path)}
    assert load_config(str(folder / "config.yaml")) == load_config(None, TINY | same)
    state = checkpoint.load(folder / "last.pt")
    assert state["position"]["global_step"] == 8  # 256 images / 64 per batch x 2 epochs
    assert "branch" not in "".join(state["model"])  # ViT: no extra parameters
    summary = (folder / "summary.csv").read_text().splitlines()
    assert summary[0].startswith("epochs,steps,final_top1") and summary[1].startswith("2,8,")


def test_second_run_does_not_overwrite_the_first(tmp_path):
    first = run_train(tmp_path, "same", **{"sched.epochs": 1})
    before = (first / "last.pt").read_bytes()
    run_train(tmp_path, "same", **{"sched.epochs": 1})
    assert (tmp_path / "same-1" / "last.pt").is_file()
    assert (first / "last.pt").read_bytes() == before


def test_resume_is_bit_identical(tmp_path):
    full = run_train(tmp_path, "full", **{"train.ema": True})
    # Interrupted mid-epoch 1 (after 3 of 4 steps), with a data-loading worker this time.
    part = run_train(tmp_path, "part", **{"train.ema": True, "train.max_steps": 3, "data.workers": 1})
    assert checkpoint.load(part / "last.pt")["position"] == {
        "epoch": 0,
        "micro_in_epoch": 3,
        "global_step": 3,
        "batches_per_epoch": 4,
    }
    assert main(["train", "--resume", str(part)]) == 0
    a, b = checkpoint.load(full / "last.pt"), checkpoint.load(part / "last.pt")
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), f"{key}.{k} differs after resume"
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    ra = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(x) for x in (part / "metrics.jsonl").read_text().splitlines()]
    assert [(r["top1"], r["ema_top1"], r["train_loss"]) for r in ra] == [
        (r["top1"], r["ema_top1"], r["train_loss"]) for r in rb
    ]


def test_writes_left_unfinished_by_a_killed_run_are_removed_on_resume(tmp_path, capsys):
    """A SIGKILL mid-save leaves a hidden temporary as large as a checkpoint; one more per kill."""
    part = run_train(tmp_path, "part", **{"train.max_steps": 2})
    (part / ".last.pt.k3j9x.tmp").write_bytes(b"\0" * 3 * 2**20)  # as save_atomic names them
    (part / ".metrics.jsonl.tmp").write_text('{"epoch": 1')
    (part / "notes.tmp").write_text("not ours")  # not hidden: left alone
    capsys.readouterr()
    assert main(["train", "--resume", str(part)]) == 0
    assert "removed 2 unfinished write(s) of a killed run (3.0 MiB): .last.pt.k3j9x.tmp, .metrics.jsonl.tmp" in (
        capsys.readouterr().out
    )
    assert sorted(p.name for p in part.glob("*.tmp")) == ["notes.tmp"] and not list(part.glob(".*.tmp"))


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's memory maps (Linux)")
def test_a_resumed_run_lets_go_of_its_memory_mapped_checkpoint(tmp_path):
    """Optimizer state left aliasing the mapped last.pt kept the replaced file's disk space through the run."""
    import gc

    from masksub.train.config import apply_overrides, from_dict
    from masksub.train.trainer import Trainer

    part = run_train(tmp_path, "part", **{"train.max_steps": 5})
    saved = checkpoint.load(part / "last.pt")["config"]
    trainer = Trainer(apply_overrides(from_dict(saved), {"train.max_steps": None, "train.resume": str(part)}))
    gc.collect()
    assert trainer.global_step == 5
    assert [line for line in Path("/proc/self/maps").read_text().splitlines() if str(part) in line] == []


def test_resuming_a_finished_run_says_so_and_changes_nothing(tmp_path, capsys):
    folder = run_train(tmp_path, "done", **{"sched.epochs": 1})
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.suffix in (".pt", ".jsonl", ".csv")}
    capsys.readouterr()
    assert main(["train", "--resume", str(folder)]) == 0
    out = capsys.readouterr().out
    assert f"{folder} finished its 1 epoch (4 steps): nothing is left to train" in out and "resumed" not in out
    assert f"with --model.checkpoint {folder / 'last.pt'}" in out
    assert before == {name: (folder / name).read_bytes() for name in before}


def test_resume_from_non_matching_checkpoint(tmp_path, capsys):
    part = run_train(tmp_path, "part", **{"train.max_steps": 2})
    assert (
        main(
            [
                "train",
                "--resume",
                str(part),
                "--model.kwargs",
                "{img_size: 28, patch_size: 7, embed_dim: 64, depth: 1, num_heads: 2}",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "cannot resume" in err and "model.kwargs" in err
    assert f"start a new run with --model.checkpoint {part / 'last.pt'}" in err
    # The optimizer's and scheduler's states bring their settings back: a new lr was recorded, not used.
    before = (part / "last.pt").read_bytes()
    assert main(["train", "--resume", str(part), "--optim.lr", "5", "--sched.warmup_lr", "0"]) == 2
    err = capsys.readouterr().err
    assert "optim.lr: checkpoint 0.001, now 5.0" in err and "sched.warmup_lr: checkpoint 1e-05, now 0.0" in err
    assert (part / "last.pt").read_bytes() == before

    # Fewer training images: the position and the schedule would not fit the data.
    assert main(["train", "--resume", str(part), "--data.train_subset", "192"]) == 2
    err = capsys.readouterr().err
    assert "trained on 4 batches per epoch and process, this run has 3" in err and "data.train_subset" in err
    assert (part / "last.pt").read_bytes() == before


def test_accumulation_steps_on_the_batches_left_at_an_epoch_end(tmp_path, capsys):
    """4 batches with accum_steps=3: a window of 3 and one of 1, every image used; resumed exactly between them."""
    full = run_train(tmp_path, "full", **{"train.accum_steps": 3})
    out = capsys.readouterr().out
    assert "batch 192 (64 per process x 3 accumulated), 2 steps per epoch (the last of 1 batch), 2 epochs;" in out
    a = checkpoint.load(full / "last.pt")
    assert a["position"] == {"epoch": 2, "micro_in_epoch": 0, "global_step": 4, "batches_per_epoch": 4}
    part = run_train(tmp_path, "part", **{"train.accum_steps": 3, "train.max_steps": 1})
    assert checkpoint.load(part / "last.pt")["position"]["micro_in_epoch"] == 3
    assert main(["train", "--resume", str(part)]) == 0
    b = checkpoint.load(part / "last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["scheduler"] == b["scheduler"]
    # the short window stepped: the weights differ from a run that stops after each epoch's first window
    three = run_train(tmp_path, "three", **{"train.accum_steps": 3, "data.train_subset": 192})
    c = checkpoint.load(three / "last.pt")
    assert c["position"]["global_step"] == 2
    assert not all(torch.equal(a["model"][k], c["model"][k]) for k in a["model"])


KILLER = textwrap.dedent(
    """
    import os, signal, sys, torch
    from masksub.train import checkpoint
    real_save = torch.save
    def dying_save(obj, f):
        real_save({"junk": torch.zeros(1000)}, f)   # part of a file on disk...
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)        # ...and the process dies mid-write
    torch.save = dying_save
    checkpoint.save_atomic({"version": torch.tensor(2)}, sys.argv[1])
    """
)


def test_killed_while_writing_keeps_previous_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    checkpoint.save_atomic({"version": torch.tensor(1)}, path)
    proc = subprocess.run([sys.executable, "-c", KILLER, str(path)], capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()
    assert checkpoint.load(path)["version"].item() == 1


class FullDisk:
    """A file that takes ``room`` bytes, then fails as a full disk does."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, data) -> int:
        self.room -= len(data)
        if self.room < 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)


def fill_disk_after(monkeypatch, saves: int) -> None:
    """The checkpoint writes after the first ``saves`` find the disk full after a few kilobytes."""
    real_save, count = torch.save, [0]

    def save(obj, f, **kw):
        count[0] += 1
        return real_save(obj, f if count[0] <= saves else FullDisk(f, 4096), **kw)

    monkeypatch.setattr(checkpoint.torch, "save", save)


def test_a_full_disk_is_a_clear_error_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    checkpoint.save_atomic({"version": torch.tensor(1)}, path)
    mask = os.umask(0o027)
    try:
        checkpoint.save_atomic({"version": torch.tensor(1)}, path)
    finally:
        os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o640  # as any file this process writes, not mkstemp's 0600
    fill_disk_after(monkeypatch, 0)
    with pytest.raises(checkpoint.CheckpointWriteError, match="No space left on device") as e:
        checkpoint.save_atomic({"version": torch.tensor(2), "w": torch.zeros(10_000)}, path)
    assert str(path) in str(e.value) and "previous last.pt is whole" in str(e.value)
    assert e.value.errno == errno.ENOSPC
    assert checkpoint.load(path)["version"].item() == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temporary file left behind


def test_a_full_disk_stops_the_run_with_the_resume_command(tmp_path, monkeypatch, capsys):
    fill_disk_after(monkeypatch, 1)  # epoch 1's last.pt (best.pt: a second name of it), then the disk is full
    code = main(["train", *args(TINY, **{"train.output": str(tmp_path), "train.name": "full"})])
    err = capsys.readouterr().err
    assert code == 2
    folder = tmp_path / "full"
    assert f"cannot write checkpoint {folder / 'last.pt'}: No space left on device" in err
    assert f"continue from it with masksub train --resume {folder}" in err
    assert checkpoint.load(folder / "last.pt")["position"]["epoch"] == 1  # epoch 1's checkpoint, whole
    monkeypatch.undo()
    assert main(["train", "--resume", str(folder)]) == 0
    assert checkpoint.load(folder / "last.pt")["position"]["global_step"] == 8


def test_best_is_a_second_name_of_last_when_written_at_the_same_step(tmp_path, monkeypatch):
    """No second write of the same state (and one copy on disk); written where hard links are missing."""
    folder = run_train(tmp_path, "linked", **{"sched.epochs": 1})
    assert os.path.samefile(folder / "best.pt", folder / "last.pt")
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and p.name != ".lock") == []

    monkeypatch.setattr(checkpoint.os, "link", lambda *a: (_ for _ in ()).throw(OSError(errno.EPERM, "no links")))
    folder = run_train(tmp_path, "copied", **{"sched.epochs": 1})
    assert not os.path.samefile(folder / "best.pt", folder / "last.pt")
    best, last = checkpoint.load(folder / "best.pt"), checkpoint.load(folder / "last.pt")
    assert best["position"] == last["position"] and all(
        torch.equal(best["model"][k], v) for k, v in last["model"].items()
    )


def test_a_metrics_line_torn_by_a_kill_does_not_stop_the_resume(tmp_path):
    """Killed (or out of disk) while appending epoch 2's line: the resumed run writes the epoch again."""
    folder = run_train(tmp_path, "torn", **{"train.max_steps": 6})  # 4 steps per epoch: stopped in epoch 2
    with (folder / "metrics.jsonl").open("a") as f:
        f.write('{"epoch": 2, "step": 8, "train_lo')
    assert main(["train", "--resume", str(folder)]) == 0
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert not list(folder.glob(".*.tmp"))  # the rewritten files were renamed into place


def test_a_corrupt_metrics_line_before_the_last_is_named(tmp_path):
    log = RunLog(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\nnot json\n{"epoch": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2, is not JSON"):
        log.records()


def test_a_warmup_as_long_as_the_schedule_is_warned_of(tmp_path):
    with pytest.warns(UserWarning, match="sched.warmup_epochs=2.0 is not shorter than sched.epochs=2"):
        run_train(tmp_path, "warm", **{"sched.warmup_epochs": 2.0, "train.max_steps": 1})
    # The command prints it on one line, as its errors, not as Python's two-line warning with a source line.
    more = {"train.output": str(tmp_path), "sched.warmup_epochs": 2.0, "train.max_steps": 1}
    cmd = [sys.executable, "-m", "masksub.cli", "train", *args(TINY, **more)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "\nmasksub: warning: sched.warmup_epochs=2.0 is not shorter" in "\n" + proc.stderr
    assert "UserWarning" not in proc.stderr


def test_the_printed_resume_command_runs_as_printed_from_a_folder_with_spaces(tmp_path, capsys):
    output = tmp_path / "my runs"
    assert main(["train", *args(TINY, **{"train.output": str(output), "train.max_steps": 1})]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "(train.max_steps); continue with " in x)
    command = shlex.split(line.split("continue with ", 1)[1])  # as a shell splits what the user pastes
    assert command == ["masksub", "train", "--resume", str(output / "fashion_mnist_vit-mask-s0")]
    assert main(command[1:]) == 0
    assert "resumed" in capsys.readouterr().out


def test_a_run_of_another_model_than_the_recipe_s_is_named_after_it(tmp_path, capsys):
    more = {"train.output": str(tmp_path), "train.max_steps": 1, "model.kwargs": {}, "data.img_size": 32}
    assert main(["train", *args(TINY, **more, **{"model.name": "resnet10t"})]) == 0
    assert main(["train", *args(TINY, **more, **{"model.name": "test_resnet.r160_in1k"})]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "fashion_mnist_vit-resnet10t-mask-s0",
        "fashion_mnist_vit-test_resnet.r160_in1k-mask-s0",
    ]


def test_the_resume_command_of_a_torchrun_job_relaunches_as_many_processes():
    from masksub.train.runlog import resume_command

    folder = Path("/runs/a b")
    assert resume_command("train", folder) == "masksub train --resume '/runs/a b'"
    assert resume_command("pretrain", folder, 8, 8) == (
        "torchrun --nproc_per_node 8 -m masksub.cli pretrain --resume '/runs/a b'"
    )
    assert resume_command("train", folder, 16, 8) == (
        "torchrun --nproc_per_node 8 --nnodes 2 (and this job's rendezvous options) -m masksub.cli train "
        "--resume '/runs/a b'"
    )


@pytest.mark.parametrize(
    "settings, rates",
    [
        ({"sched.name": "step", "sched.decay_epochs": 1, "sched.decay_rate": 0.5}, [5e-4, 2.5e-4]),
        ({"sched.name": "multistep", "sched.decay_milestones": [1.5], "sched.decay_rate": 0.2}, [1e-3, 2e-4]),
        ({"sched.name": "poly", "sched.decay_rate": 2.0, "sched.min_lr": 0.0}, [2.5e-4, 0.0]),  # (1 - t / T)^2
    ],
)
def test_step_multistep_and_poly_schedules_take_their_settings(tmp_path, settings, rates):
    """The rate after each epoch (4 steps each, no warm-up): the decay interval, milestones, factor and power
    set reach timm's scheduler (before, timm's defaults: a decay every 90 epochs, power 0.1)."""
    folder = run_train(tmp_path, "s", **{"sched.warmup_epochs": 0, **settings})
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in records] == pytest.approx(rates, abs=1e-12)


def test_a_step_schedule_that_never_decays_is_warned_of(tmp_path):
    with pytest.warns(UserWarning, match=r"sched.decay_milestones=\[2, 4\] is not within sched.epochs=2: the multi"):
        run_train(tmp_path, "m", **{"sched.name": "multistep", "sched.decay_milestones": [2, 4], "train.max_steps": 1})


def test_a_floor_above_the_peak_learning_rate_is_warned_of(tmp_path):
    with pytest.warns(UserWarning, match="sched.min_lr=0.01 is above the peak learning rate 0.001: the cosine"):
        run_train(tmp_path, "floor", **{"sched.min_lr": 0.01, "train.max_steps": 1})


def test_a_resumed_run_does_not_need_its_initial_weights_file(tmp_path):
    """The checkpoint holds every weight: the model.checkpoint file (on scratch space, since cleaned) is not read."""
    cfg = load_config(None, TINY)
    initial = tmp_path / "initial.pt"
    torch.save(timm.create_model(cfg.model.name, num_classes=10, in_chans=1, **cfg.model.kwargs).state_dict(), initial)
    part = run_train(tmp_path, "part", **{"model.checkpoint": str(initial), "train.max_steps": 3})
    initial.unlink()
    assert main(["train", "--resume", str(part)]) == 0
    assert checkpoint.load(part / "last.pt")["position"]["global_step"] == 8


def test_runs_started_at_once_get_a_folder_each(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from masksub.train.runlog import make_run_folder

    with ThreadPoolExecutor(16) as pool:
        folders = list(pool.map(lambda _: make_run_folder(tmp_path / "runs", "run"), range(64)))
    assert len(set(folders)) == 64 and all(f.is_dir() for f in folders)


def test_ctrl_c_before_training_ends_quietly(tmp_path, monkeypatch, capsys):
    """Ctrl-C while the data is read (an ImageNet folder scan takes minutes) exits 130 without a traceback."""
    import masksub.train.trainer as trainer

    def reading(cfg, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "build_datasets", reading)
    assert main(["train", *args(TINY, **{"train.output": str(tmp_path)})]) == 130
    assert "masksub train: stopped at once by Ctrl-C (files written before are kept)" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # no run folder was made


def test_the_resume_key_resumes_with_the_run_settings_as_the_resume_flag_does(tmp_path):
    """--train.resume X (the config key) once resumed on the default recipe's settings: optim.lr fell back to 1e-3."""
    part = run_train(tmp_path, "part", **{"optim.lr": 2e-3, "train.max_steps": 2})
    assert main(["train", "--train.resume", str(part)]) == 0
    state = checkpoint.load(part / "last.pt")
    assert state["config"]["optim"]["lr"] == 2e-3 and state["position"]["global_step"] == 8


def test_an_epoch_resumed_midway_counts_its_time_before_the_stop(tmp_path, monkeypatch):
    import time

    import masksub

    step = masksub.Step.__call__
    monkeypatch.setattr(masksub.Step, "__call__", lambda self, *a, **k: time.sleep(0.5) or step(self, *a, **k))
    part = run_train(tmp_path, "part", **{"train.max_steps": 2})  # half of epoch 1, slowed to >= 1 s
    before = checkpoint.load(part / "last.pt")["epoch_seconds"]
    assert before >= 1.0
    monkeypatch.undo()
    assert main(["train", "--resume", str(part)]) == 0
    first = json.loads((part / "metrics.jsonl").read_text().splitlines()[0])
    assert first["epoch"] == 1 and first["epoch_time_s"] >= round(before, 3)


def test_a_run_folder_in_use_by_another_process_is_refused(tmp_path, capsys):
    """A job submitted twice, or a resume while the run still trains, would interleave checkpoints and metrics."""
    part = run_train(tmp_path, "part", **{"train.max_steps": 6})  # epoch 1 (4 steps) done, 2 steps of epoch 2
    with (part / "metrics.jsonl").open("a") as f:  # the other process has since finished epoch 2
        f.write(json.dumps({"epoch": 2, "step": 8, "train_loss": 1.0}) + "\n")
    before = {name: (part / name).read_bytes() for name in ("last.pt", "metrics.jsonl")}
    script = f"import time; from masksub.train.runlog import FolderLock\nwith FolderLock({str(part)!r}):\n"
    script += "    print('locked', flush=True); time.sleep(60)"
    other = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "locked"
        assert main(["train", "--resume", str(part)]) == 2
        assert f"run folder {part} is in use by another masksub process" in capsys.readouterr().err
        assert before == {name: (part / name).read_bytes() for name in before}, "the refused resume wrote nothing"
    finally:
        other.kill()
        other.wait()
    assert main(["train", "--resume", str(part)]) == 0  # the lock ends with the process that held it


def test_errors_under_torchrun_name_their_process(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(["train", "--sub.ratio", "2"]) == 2
    assert capsys.readouterr().err == (
        "masksub train (process 1 of 2): error: sub.ratio must be in [0, 1) (the fraction of the input removed), "
        "got 2.0; the paper's default is 0.5\n"
    )


def test_eval_reproduces_a_run_evaluated_under_autocast(tmp_path, capsys):
    """masksub eval evaluates as the run did each epoch, with its train.amp (it evaluated in full precision
    whatever the run's precision); --train.amp null asks for full precision."""
    folder = run_train(tmp_path, "bf", **{"sched.epochs": 1, "train.amp": "bf16", "data.eval_subset": 500})
    top1 = json.loads((folder / "metrics.jsonl").read_text().splitlines()[-1])["top1"]
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(folder / "last.pt")]) == 0
    out = capsys.readouterr().out
    assert ", on cpu, bf16 autocast\n" in out and f"weights: top-1 {top1:.2f}%" in out
    assert main(["eval", "--checkpoint", str(folder / "last.pt"), "--train.amp", "null"]) == 0
    assert (
        "500 images of the Fashion-MNIST test split (data.eval_subset 500; --data.eval_subset null for all), on cpu\n"
        in (capsys.readouterr().out)
    )


def test_eval_command(tmp_path, capsys):
    folder = run_train(tmp_path, "ev", **{"sched.epochs": 1, "train.ema": True})
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(folder / "best.pt")]) == 0
    out = capsys.readouterr().out
    top1 = json.loads((folder / "metrics.jsonl").read_text().splitlines()[-1])["top1"]
    assert f"weights: top-1 {top1:.2f}%" in out and "ema weights: top-1" in out
    assert out.startswith(  # which weights, on which images: the run's eval_subset, unless overridden
        f"{folder / 'best.pt'} after 4 training steps: 200 images of the Fashion-MNIST test split "
        "(data.eval_subset 200; --data.eval_subset null for all), on cpu\n"
    )
    assert main(["eval", "--checkpoint", str(folder / "best.pt"), "--data.eval_subset", "300"]) == 0
    assert ": 300 images of the Fashion-MNIST test split" in capsys.readouterr().out
    # another model than the weights are of: refused (a size-mismatch traceback, or weights that fit in part)
    assert main(["eval", "--checkpoint", str(folder / "best.pt"), "--data.in_chans", "3", "--sub.kind", "none"]) == 2
    assert "error: data.in_chans, sub.kind: the checkpoint sets them (its weights" in capsys.readouterr().err
    # keys evaluation does not read: refused, not ignored
    assert main(["eval", "--checkpoint", str(folder / "best.pt"), "--optim.lr", "5", "--sched.epochs", "9"]) == 2
    assert "optim.lr, sched.epochs would do nothing in masksub eval, which evaluates the checkpoint's weights" in (
        capsys.readouterr().err
    )
    assert main(["eval", "--checkpoint", str(folder / "best.pt"), "--data.train_subset", "64"]) == 2
    assert "data.train_subset would do nothing in masksub eval" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(folder / "best.pt"), "--data.eval_subset", "20000"]) == 0
    # more than the split holds: all of it, without the hint that there are more
    assert ": 10,000 images of the Fashion-MNIST test split, on cpu\n" in capsys.readouterr().out
    # data.val_split picks Fashion-MNIST's split too (it was read as the test split whatever its value)
    assert main(["eval", "--checkpoint", str(folder), "--data.val_split", "train", "--data.eval_subset", "64"]) == 0
    assert ": 64 images of the Fashion-MNIST train split" in capsys.readouterr().out
    cfg = load_config(overrides={"data.val_split": "train", "data.eval_subset": 64})
    assert torch.equal(build_eval_dataset(cfg, []).images, load_fashion_mnist("train")[0][:64])
    # A run started with a setting a later check refuses as doing nothing (AdamW given a momentum) is evaluated
    # and resumed: the checks are for new runs.
    state = torch.load(folder / "best.pt", weights_only=False)
    state["config"]["optim"]["momentum"], state["config"]["sched"]["epochs"] = 0.5, 2
    torch.save(state, tmp_path / "older.pt")
    assert main(["eval", "--checkpoint", str(tmp_path / "older.pt"), "--data.eval_subset", "64"]) == 0
    more = ["--data.eval_subset", "64", "--train.output", str(tmp_path / "more")]
    assert main(["train", "--resume", str(tmp_path / "older.pt"), *more, "--train.max_steps", "5"]) == 0
    assert "stopped after 5 steps" in capsys.readouterr().out
    assert (
        load_config(overrides={"optim.momentum": 0.5, "train.resume": str(tmp_path / "older.pt")}).optim.momentum == 0.5
    )
    with pytest.raises(ConfigError, match="optim.name=adamw takes no momentum"):  # a new run: refused
        load_config(overrides={"optim.momentum": 0.5})


def test_plain_run_and_compare(tmp_path):
    out = tmp_path / "cmp"
    more = {"sched.epochs": 1, "sub.ratio": 0.25}  # the plain runs read no sub.* key: it reaches the mask runs only
    code = main(["compare", "--subs", "none,mask", "--seeds", "0,1", "--output", str(out), *args(TINY, **more)])
    assert code == 0
    table = (out / "compare.md").read_text()
    assert table.startswith("# fashion_mnist_vit: plain vs MaskSub, seeds 0, 1\n")
    assert "| none | - |" in table and "| mask | 0.25 | 2 |" in table
    assert load_config(str(out / "runs" / "none-s0" / "config.yaml")).sub.ratio == 0.5
    rows = list(csv.DictReader((out / "compare.csv").open()))
    assert len(rows) == 4
    finals = [float(r["final_top1"]) for r in rows if r["sub"] == "mask"]
    mean, sd = sum(finals) / 2, abs(finals[0] - finals[1]) / 2**0.5  # the sample standard deviation of two
    assert f"| mask | 0.25 | 2 | {mean:.2f} ± {sd:.2f} |" in table
    with Image.open(out / "curves.png") as img:
        img.verify()
    # One seed has no spread: the table shows the value alone (it showed ± 0.00).
    assert main(["compare", "--subs", "mask", "--seeds", "0", "--output", str(tmp_path / "one"), *args(TINY)]) == 0
    table = (tmp_path / "one" / "compare.md").read_text()
    assert table.startswith("# fashion_mnist_vit: MaskSub, seed 0\n") and "±" not in table
    assert "| final top-1 (one seed: no spread) |" in table


def test_non_finite_loss_skips_then_stops(tmp_path, capsys):
    with pytest.warns(UserWarning, match="non-finite loss"):
        code = main(
            [
                "train",
                *args(
                    TINY,
                    **{
                        "train.output": str(tmp_path),
                        "train.name": "nan",
                        "optim.lr": 1.0e12,
                        "optim.name": "sgd",
                        "train.max_nonfinite": 2,
                        "train.checkpoint_every": 1,
                    },
                ),
            ]
        )
    assert code == 2
    assert "non-finite losses or gradients in a row" in capsys.readouterr().err
    state = checkpoint.load(tmp_path / "nan" / "last.pt")  # the last good checkpoint is intact
    assert state["nonfinite_run"] <= 1


def test_a_skipped_non_finite_loss_stays_out_of_the_epoch_loss(tmp_path, monkeypatch):
    """One NaN batch made the epoch's train_loss NaN (and metrics.jsonl invalid JSON for strict readers)."""
    from masksub.train import trainer as trainer_module

    build = trainer_module.build_criterion

    def poisoned(cfg, mixup):
        criterion, calls = build(cfg, mixup), []

        def loss(logits, target):
            calls.append(1)
            return criterion(logits, target) * (float("nan") if len(calls) == 3 else 1.0)

        return loss

    monkeypatch.setattr(trainer_module, "build_criterion", poisoned)
    with pytest.warns(UserWarning, match="non-finite loss"):
        folder = run_train(tmp_path, "nan1", **{"sched.epochs": 1})
    text = (folder / "metrics.jsonl").read_text()
    record = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in metrics.jsonl"))
    assert record["nonfinite_skipped"] == 1 and 0 < record["train_loss"] < 10 and 0 < record["train_loss_sub"] < 10


def test_a_recipe_that_is_not_valid_yaml_is_named(tmp_path, capsys):
    (tmp_path / "mine.yaml").write_text("model: [\n")
    assert main(["train", "--recipe", str(tmp_path / "mine.yaml")]) == 2
    assert f"{tmp_path / 'mine.yaml'} is not valid YAML: while parsing a flow node" in capsys.readouterr().err


def test_none_unsets_an_optional_key_and_stays_a_name_where_one_is_given():
    """``--train.amp none`` was the string 'none': "train.amp must be one of (None, 'bf16', 'fp16')"."""
    unset = ["--train.amp", "none", "--optim.clip_grad", "None", "--data.train_subset", "none", "--train.name", "none"]
    cfg = load_config("fashion_mnist_vit", ["--train.amp", "bf16", "--optim.clip_grad", "1", *unset])
    assert (cfg.train.amp, cfg.optim.clip_grad, cfg.data.train_subset, cfg.train.name) == (None, None, None, "none")


def test_recipe_values_an_override_makes_moot_fall_back_to_their_defaults(tmp_path):
    """Turning a recipe's warm-up, augmentation, BCE or optimizer off left its warm-up rate, RandAugment policy,
    BCE threshold and betas behind, refused as doing nothing, though the user never set them."""
    off = ["--sched.warmup_epochs", "0", "--aug.preset", "simple", "--aug.bce", "false", "--optim.name", "sgd"]
    before = load_config("deit3_vit_s_400")
    assert (before.sched.warmup_lr, before.aug.auto_augment, before.aug.bce_target_thresh) == (1e-6, "3a", 0.0)
    cfg = load_config("deit3_vit_s_400", off)
    assert (cfg.sched.warmup_lr, cfg.aug.auto_augment, cfg.aug.bce_target_thresh) == (1e-5, None, None)
    assert (cfg.aug.color_jitter, cfg.aug.crop_pct, cfg.optim.betas) == (0.0, 0.875, None)
    assert (cfg.optim.weight_decay, cfg.aug.mixup, cfg.sched.min_lr) == (0.03, 0.8, 1e-5)  # the rest stays
    with pytest.raises(ConfigError, match="sched.warmup_lr takes effect with sched.warmup_epochs above 0"):
        load_config("deit3_vit_s_400", [*off, "--sched.warmup_lr", "1e-4"])  # set by the user: refused
    recipe = tmp_path / "mine.yaml"  # a recipe that is itself moot: refused as before
    recipe.write_text("sched: {warmup_epochs: 0, warmup_lr: 0.1}\n")
    with pytest.raises(ConfigError, match="sched.warmup_lr takes effect with sched.warmup_epochs above 0"):
        load_config(str(recipe))
    plain = load_config("fashion_mnist_resnet", ["--sub.kind", "none"])  # its mask unit of 4 px: read by no branch
    assert dataclasses.asdict(plain.sub) == {**dataclasses.asdict(SubConfig()), "kind": "none"}
    single = load_config("fashion_mnist_dmjd", ["--pretrain.method", "single"], check=False)  # no visible branch
    assert (single.pretrain.projector_dim, single.pretrain.decoder_dim) == (PretrainConfig.projector_dim, 96)
    probe = ["--train.linprobe", "true", "--model.checkpoint", "w.pt"]  # the head alone trains: no layers to decay
    assert load_config("mae_finetune_vit_b", probe, check=False).optim.layer_decay is None
    with pytest.raises(ConfigError, match="a linear probe .train.linprobe. trains the head alone: leave it unset"):
        load_config(None, [*probe, "--optim.layer_decay", "0.7"])


@pytest.mark.parametrize(
    "cli, message",
    [
        (["--sub.kind", "none", "--sub.ratio", "0.25"], "sub.ratio would do nothing with sub.kind none (plain"),
        (
            ["--sub.kind", "none", "--sub.temperature", "2", "--sub.memory_saving", "false"],
            "sub.temperature, sub.memory_saving would do nothing with sub.kind none",
        ),
        (["--sub.kind", "droppath", "--sub.unit", "16"], "sub.unit would do nothing with sub.kind droppath"),
    ],
)
def test_sub_branch_keys_a_plain_run_or_a_drop_branch_does_not_read_are_refused(cli, message):
    """A plain run trained as if --sub.ratio 0.25 had been understood."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, cli)


@pytest.mark.parametrize(
    "cli, message",
    [
        (["--recipe", "no_such_recipe"], "unknown recipe"),
        (["--recipe", "runs/no_such/config.yaml"], "recipe file runs/no_such/config.yaml not found (from "),
        (["--recipe", "fashion_mnist_vti"], "fashion_mnist_vit"),
        (
            ["--recipe", "fashion_mnist_dmjd"],
            "recipe 'fashion_mnist_dmjd' is a pretraining recipe, for masksub pretrain",
        ),
        (["--sub.ratoi", "0.5"], "did you mean sub.ratio"),
        (["--optim.lr", "fast"], "optim.lr must be float"),
        (["--optim.betas", "[0.9, fast]"], "optim.betas must be a list of finite numbers, got [0.9, 'fast']"),
        (["--optim.betas", "[.nan, 0.999]"], "optim.betas must be a list of finite numbers, got [nan, 0.999]"),
        (["--optim.lr", ".inf"], "optim.lr must be a finite number, got inf"),  # YAML's infinity: was accepted
        (["--optim.clip_grad", ".nan"], "optim.clip_grad must be a finite number, got nan"),  # NaN weights
        (["--sub.temperature", "1e999"], "sub.temperature must be a finite number, got '1e999'"),
        (["--aug.std", "0.5"], "aug.std must be a list of numbers in brackets, e.g. [0.5, 1.0], got 0.5"),
        (["--sub.ratio", "1.5"], "sub.ratio must be in [0, 1)"),
        (["--data.dir", "/nonexistent/fmnist"], "dataset-fashion-mnist"),
        (["--data.name", "folder", "--data.dir", "/nonexistent/imagenet"], "does not exist"),
        (["--model.name", "resnet_9000"], "not a timm model"),
        (["--model.name", "convvit_base"], "not a timm model; did you mean convvit_base_patch16?"),  # a longer form
        (  # the recipe's ViT kwargs: the error said what, not where they came from nor the fix
            ["--model.name", "resnet18"],
            "resnet18 does not take one of model.kwargs ['depth', 'embed_dim', 'img_size', 'num_heads', 'patch_size'] "
            "(ResNet.__init__() got an unexpected keyword argument 'img_size'); model.kwargs come from the recipe "
            "(fashion_mnist_vit) unless given, and fit its model: set --model.kwargs to this model's own",
        ),
        (["--train.device", "cuda:3"], "set train.device=cuda and CUDA_VISIBLE_DEVICES=3"),
        (["--model.name", "deit_smal_patch16_224"], "not a timm model; did you mean deit_small_patch16_224,"),
        (["--recipe", "mae_finetune_vit_b", "--data.dir", "."], "--model.checkpoint"),
        (["--optim.name", "adamww"], "optim.name='adamww' is not a timm optimizer; did you mean adamw"),
        (["--sched.name", "cosin"], "did you mean cosine?"),
        (["--data.in_chans", "2"], "data.in_chans must be 1 (grey) or 3 (RGB), got 2"),
        (["--data.val_split", "validation"], "data.val_split='validation': Fashion-MNIST has the splits 'train' and"),
        (["--aug.mean", "[0.5, 0.5, 0.5]"], "aug.mean has 3 values for data.in_chans=1: give one value per channel"),
        (["--optim.lr", "-1"], "optim.lr must be > 0, got -1.0"),
        (["--optim.clip_grad", "0"], "optim.clip_grad must be > 0, got 0.0; leave it unset for no clipping"),
        (["--data.workers", "-1"], "data.workers must be >= 0, got -1"),
        (["--train.checkpoint_every", "-3"], "train.checkpoint_every must be >= 0, got -3"),
        (["--aug.hflip", "2"], "aug.hflip must be in [0, 1], got 2.0"),
        (["--aug.hflip", "0.3"], "aug.hflip takes effect with aug.preset simple, timm or pretrain"),  # preset none
        (
            ["--model.kwargs", "{img_size: 28, patch_size: 7, drop_path_rate: 0.1}"],  # was silently 0
            "model.kwargs sets drop_path_rate, which the trainer sets from model.drop_path_rate (the kwargs value",
        ),
        (
            ["--model.kwargs", "{img_size:28,patch_size:7}"],  # was "built for 224x224 images ... set img_size: 28"
            "model.kwargs: YAML read 'img_size:28', 'patch_size:7' as keys without a value (it needs a space after "
            "each colon): write {img_size: 28, patch_size: 7}",
        ),
        (
            ["--model.kwargs", "{img_size: 28, patch_size: 7, embed_dim: 50, num_heads: 3}"],  # timm's AssertionError
            "vit_tiny_patch16_224 cannot be built with {'img_size': 28, 'patch_size': 7, 'embed_dim': 50, 'num_heads': "
            "3, 'in_chans': 1, 'num_classes': 10} (model.kwargs, data.in_chans, the data's classes): dim should be",
        ),
        (["--train.ema_decay", "0.99"], "train.ema_decay takes effect with train.ema true, not set here"),
        (["--optim.clip_mode", "agc"], "optim.clip_mode takes effect with optim.clip_grad, not set here"),
        (
            ["--sched.warmup_epochs", "0", "--sched.warmup_lr", "0.1"],
            "sched.warmup_lr takes effect with sched.warmup_e",
        ),
        (["--pretrain.views", "3"], "pretrain.views would do nothing in masksub train (they configure masksub pretr"),
        (["--aug.bce_target_thresh", "0.2"], "aug.bce_target_thresh takes effect with aug.bce true"),  # did nothing
        (["--aug.mixup_prob", "0.5"], "aug.mixup_prob takes effect with aug.mixup or aug.cutmix above 0, and both"),
        (["--aug.smoothing", "1"], "aug.smoothing must be in [0, 1), got 1.0"),  # was timm's bare AssertionError
        (["--model.drop_path_rate", "1"], "model.drop_path_rate must be in [0, 1), got 1.0"),
        (["--optim.betas", "[0.9]"], "optim.betas for adamw must be 2 values in [0, 1), e.g. [0.9, 0.999], got [0.9]"),
        (["--optim.name", "adan", "--optim.betas", "[0.9, 0.99]"], "optim.betas for adan must be 3 values in [0, 1)"),
        # timm drops what an optimizer does not take: these trained as if unset
        (["--optim.name", "sgd", "--optim.betas", "[0.9, 0.99]"], "optim.name=sgd takes no betas: optim.betas would"),
        (["--optim.name", "sgd", "--optim.betas", "[0.9]"], "optim.name=sgd takes no betas: optim.betas would"),
        (["--optim.momentum", "0.5"], "optim.name=adamw takes no momentum: optim.momentum would do nothing; leave"),
        (["--optim.name", "lion", "--optim.eps", "1e-6"], "optim.name=lion takes no eps: optim.eps would do nothing"),
        (["--optim.name", "sgd", "--optim.momentum", "1.5"], "optim.momentum must be in [0, 1), got 1.5"),
        (["--optim.name", "sgd", "--optim.momentum", "0"], "optim.name=sgd uses Nesterov momentum, which needs"),
        (["--sched.warmup_lr", "-1"], "sched.warmup_lr must be >= 0, got -1.0"),  # trained, on a negative rate
        (["--sched.min_lr", "-1"], "sched.min_lr must be >= 0, got -1.0"),  # was timm's bare AssertionError
        (["--sub.unit", "0"], "sub.unit must be >= 1, got 0"),  # was a traceback
        # the schedulers' own settings: each read by some schedulers only
        (["--sched.decay_epochs", "1"], "sched.decay_epochs takes effect with sched.name step, not set here"),
        (["--sched.name", "step", "--sched.min_lr", "0"], "sched.min_lr takes effect with sched.name cosine or tanh"),
        (["--sched.decay_rate", "0.5"], "sched.decay_rate takes effect with sched.name step or multistep or poly"),
        (["--sched.name", "step", "--sched.decay_rate", "0"], "sched.decay_rate must be > 0, got 0.0"),
        (["--sched.name", "multistep", "--sched.decay_milestones", "[2, 1]"], "must be in increasing order (epo"),
        (["--sched.name", "multistep", "--sched.decay_milestones", "[-1]"], "sched.decay_milestones must be >= 0"),
        (["--aug.preset", "timm", "--aug.interpolation", "cubic"], "aug.interpolation must be one of ('nearest',"),
        (["--aug.preset", "timm", "--aug.color_jitter", "-1"], "aug.color_jitter must be >= 0, got -1.0"),
        (["--optim.layer_decay", "0"], "optim.layer_decay must be > 0, got 0.0"),
        (["--optim.layer_decay", "1.5"], "optim.layer_decay must be in [0, 1], got 1.5"),
        (["--aug.std", "[0]"], "aug.std must be > 0 (inputs are divided by it), got [0.0]"),
        (["--sub.main_weight", "0", "--sub.sub_weight", "0"], "are both 0: nothing would train"),
        (["--aug.preset", "timm", "--aug.scale", "[1, 0.5]"], "aug.scale must be [min, max] area fractions"),
        (["--aug.preset", "timm", "--aug.auto_augment", "bogus"], "aug.auto_augment='bogus' is not a timm augm"),
        (["--aug.auto_augment", "3a"], "aug.auto_augment takes effect with aug.preset timm (timm's transforms), not"),
        (["--aug.preset", "simple", "--aug.crop_pct", "1", "--aug.re_prob", "0.25"], "aug.re_prob, aug.crop_pct take"),
        (["--data.train_subset", "0"], "data.train_subset must be >= 1, got 0; leave it unset for every image"),
        (  # was "give 0 batches ..., fewer than train.accum_steps=1"
            ["--data.train_subset", "100"],
            "100 training images make 0 batches of 128 (data.batch_size), fewer than the one full batch an optimizer "
            "step needs: lower data.batch_size to 100 or less, or use more images",
        ),
        (
            ["--data.train_subset", "300", "--train.accum_steps", "3"],
            "fewer than the 3 full batches (train.accum_steps) an optimizer step needs: lower data.batch_size to 100",
        ),
        (["--data.eval_subset", "-3"], "data.eval_subset must be >= 1, got -3; leave it unset for every image"),
        (["--zzz.qqq", "1"], "unknown config key 'zzz.qqq'; `masksub keys` lists every key"),
        (["--data.img_size", "32"], "built for 28x28 images but data.img_size=32; set model.kwargs img_size: 32"),
        (["--train.fsdp", "full"], "train.fsdp must be one of ('none', 'full_shard', 'shard_grad_op')"),
        (["--train.fsdp", "full_shard"], "shards the model across processes: launch with torchrun"),
        (["--train.fsdp", "full_shard", "--train.amp", "fp16"], "train.amp=fp16 cannot run with train.fsdp"),
        (["--train.fsdp", "shard_grad_op", "--train.linprobe", "true"], "train.linprobe cannot run with train.fsdp"),
        (
            ["--train.fsdp", "full_shard", "--optim.clip_grad", "1", "--optim.clip_mode", "agc"],
            "optim.clip_mode=agc cannot run with",
        ),
        (["--train.fsdp_sync_every_backward", "true"], "without FSDP the gradients are whole on every process"),
        (
            ["--model.kwargs", "{img_size: 30, patch_size: 4, embed_dim: 96, depth: 4, num_heads: 3}"]
            + ["--data.img_size", "30"],
            "vit_tiny_patch16_224 cannot take 1 x 30 x 30 images (data.in_chans, data.img_size; sub.kind=mask, "
            "sub.unit=4): image size 30x30 is not divisible by the patch size 4x4",
        ),
    ],
)
def test_bad_input_gets_a_clear_error(tmp_path, capsys, cli, message):
    assert main(["train", *cli, "--train.output", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir()), "a run that cannot start writes nothing"


def test_momentum_zero_is_refused_only_where_the_optimizer_refuses_it():
    for name in ("sgd", "nesterov", "nlars"):  # Nesterov momentum: torch's SGD raises without momentum
        with pytest.raises(ConfigError, match=f"optim.name={name} uses Nesterov momentum"):
            load_config(overrides={"optim.name": name, "optim.momentum": 0.0})
    for name in ("momentum", "sgdp", "lars"):  # no momentum is plain SGD (LARS) there
        assert load_config(overrides={"optim.name": name, "optim.momentum": 0.0}).optim.momentum == 0.0


def test_numbers_written_without_a_dot_are_numbers():
    """YAML 1.1 reads 1e-3 as a string: --optim.lr 1e-3 was refused as 'must be float'."""
    cfg = load_config(
        "fashion_mnist_vit", ["--optim.lr", "1e-3", "--optim.betas", "[0.9, 1e-2]", "--optim.eps", "1E+0"]
    )
    assert (cfg.optim.lr, cfg.optim.betas, cfg.optim.eps) == (1e-3, (0.9, 0.01), 1.0) and type(cfg.optim.lr) is float
    with pytest.raises(ConfigError, match="optim.eps must be >= 0, got -1.0"):  # and range-checked as numbers
        load_config("fashion_mnist_vit", ["--optim.eps", "-1e0"])


@pytest.mark.parametrize(
    "optim, expected",
    [
        ({"optim.name": "rmsprop", "optim.momentum": 0.5}, {"momentum": 0.5}),  # was left at timm's 0.9
        ({"optim.name": "adan", "optim.betas": [0.9, 0.9, 0.9], "optim.eps": 1e-6}, {"betas": [0.9] * 3, "eps": 1e-6}),
        ({"optim.name": "sgd"}, {"momentum": 0.9, "nesterov": True}),  # timm's sgd
    ],
)
def test_the_optimizer_gets_the_betas_eps_and_momentum_set(tmp_path, optim, expected):
    folder = run_train(tmp_path, "run", **optim, **{"train.max_steps": 1})
    groups = torch.load(folder / "last.pt", weights_only=False)["optimizer"]["param_groups"]
    for key, value in expected.items():
        assert all(_plain_list(g[key]) == value for g in groups), key


def _plain_list(value):
    return list(value) if isinstance(value, tuple) else value


def test_pretrained_weights_that_cannot_be_fetched_say_what_to_do(tmp_path, capsys, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network, also where there is one
    cli = ["--model.name", "resnet18", "--model.kwargs", "{pretrained: true}", "--train.output", str(tmp_path)]
    assert main(["train", *cli]) == 2
    err = capsys.readouterr().err
    assert "error: resnet18: timm could not fetch its pretrained weights (" in err
    assert err.strip().endswith("pass the file as model.checkpoint (no pretrained in model.kwargs)")
    assert not any(tmp_path.iterdir())


def test_an_output_folder_that_cannot_be_made_is_named(tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    assert main(["train", *args(TINY, **{"train.output": str(tmp_path / "a_file")})]) == 2
    err = capsys.readouterr().err
    assert f"cannot make the run folder {tmp_path / 'a_file'}" in err and "set train.output to a folder" in err


def test_version_names_masksub_torch_and_timm(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert (
        capsys.readouterr().out
        == f"masksub {masksub.__version__} (torch {torch.__version__}, timm {timm.__version__})\n"
    )


def test_a_progress_bar_written_to_a_file_refreshes_rarely(tmp_path):
    """A batch job's log got a bar line every 20 steps (and tqdm's ten a second): tens of MB over a long run."""
    more = {"train.output": str(tmp_path), "data.train_subset": 2560, "data.batch_size": 32, "sched.epochs": 1}
    cmd = [sys.executable, "-m", "masksub.cli", "train", *args(TINY, **more)]
    env = {k: v for k, v in os.environ.items() if k != "TQDM_MININTERVAL"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)  # stderr: a pipe, not a tty
    assert proc.returncode == 0, proc.stderr[-2000:]
    bars = [line for line in proc.stderr.replace("\r", "\n").splitlines() if line.startswith("epoch 1/1:")]
    assert len(bars) == 1 and "0/80" in bars[0], bars  # the start; 80 steps take seconds, not a minute


def test_a_listing_read_by_a_reader_that_stops_ends_quietly():
    """`masksub recipes | head -1`: the reader has gone (here: before the first line) when masksub writes."""
    import signal

    read, write = os.pipe()
    os.close(read)
    proc = subprocess.run([sys.executable, "-m", "masksub.cli", "recipes"], stdout=write, stderr=subprocess.PIPE)
    os.close(write)
    assert proc.returncode == 128 + signal.SIGPIPE and proc.stderr == b"", proc.stderr[-2000:]


def test_keys_lists_every_key_with_the_recipe_value(capsys):
    assert main(["keys", "--recipe", "mae_finetune_vit_b", "--sub.ratio", "0.25"]) == 0
    lines = dict(line.split(maxsplit=1) for line in capsys.readouterr().out.splitlines())
    assert list(lines) == [*all_keys()[1:], "recipe"]  # declaration order, recipe last
    assert lines["optim.layer_decay"] == "0.65" and lines["sub.ratio"] == "0.25"
    assert lines["model.checkpoint"] == "'???'", "a recipe that needs weights still lists its keys"
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "`masksub keys` lists every key" in capsys.readouterr().out


def test_recipes_lists_each_with_its_command_and_shows_one(capsys):
    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split() for line in lines[1 : len(list_recipes()) + 1]}
    assert sorted(rows) == list_recipes()
    vit = ["masksub", "train", "vit_tiny_patch16_224*", "fashion_mnist", "28", "px", "2"]
    assert rows["fashion_mnist_vit"][1:8] == vit
    assert rows["fashion_mnist_vit"][-2:] == ["MaskSub", "0.5"] and rows["swin_t"][-2:] == ["MaskSub", "0.5"]
    assert rows["dmjd_vit_b"][2] == "pretrain" and rows["maskfeat_vit_b"][-4:] == ["(MaskFeat", "/", "MAE", "style)"]
    assert rows["fashion_mnist_linprobe"][2] == "linprobe"
    for name in list_recipes():
        notes = recipe_notes(name)
        defaults = ("fashion_mnist_vit", "fashion_mnist_dmjd", "fashion_mnist_linprobe")  # launched without --recipe
        assert f"--recipe {name}" in notes[0] or name in defaults
        assert not notes[1].startswith("Short of"), f"{name}: what the recipe trains comes right after its command"
    assert main(["recipes", "deit3_vit_h_400"]) == 0
    shown = capsys.readouterr().out.splitlines()
    assert shown[0].endswith("deit3_vit_h_400.yaml") and shown[1].startswith("torchrun --nnodes 4")
    assert shown[2].startswith("DeiT-III ViT-H from scratch")
    assert main(["recipes", "swin_x"]) == 2 and "Did you mean swin_t" in capsys.readouterr().err


@pytest.fixture
def image_folder(tmp_path):
    """A tiny ImageNet-layout folder: 3 classes, 8 train and 2 val images each, one corrupt file."""
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 8), ("val", 2)):
        for c in range(3):
            d = tmp_path / "imgs" / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                pixels = (torch.rand(40, 48, 3, generator=g) * 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(d / f"{i}.png")
    (tmp_path / "imgs" / "train" / "class1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return tmp_path / "imgs"


FOLDER = {"data.batch_size": 8, "data.workers": 0, "data.img_size": 32, "train.max_steps": 2}
VIT_TINY = {"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2, "img_size": 32}
CONVVIT_TINY = {"embed_dim": [8, 16, 32], "depth": [1, 1, 1], "num_heads": 2, "img_size": 64}  # 4x4 tokens


def test_corrupt_image_reported_and_skipped_or_rejected(tmp_path, image_folder, capsys, caplog):
    base = [
        "train",
        "--recipe",
        "fashion_mnist_resnet",
        "--data.name",
        "folder",
        "--data.dir",
        str(image_folder),
        "--data.in_chans",
        "3",
        "--train.output",
        str(tmp_path),
        *args(FOLDER),
    ]
    assert main(base + ["--data.corrupt", "error"]) == 2
    assert "broken.png" in capsys.readouterr().err
    with caplog.at_level("WARNING", logger="masksub"):
        assert main(base + ["--data.corrupt", "skip", "--train.max_steps", "3"]) == 0
    assert "broken.png" in caplog.text
    assert "data.on_device" not in caplog.text, "the recipe's Fashion-MNIST speed option: nothing for the user to do"
    assert "masksub: warning: skipping unreadable image " in capsys.readouterr().err  # one line, as warnings


def test_an_image_error_in_a_loader_worker_is_one_line(tmp_path, image_folder, capsys):
    """torch re-raises a worker's error with the worker's whole traceback as its message."""
    cli = ["train", "--recipe", "fashion_mnist_resnet", "--data.name", "folder", "--data.dir", str(image_folder)]
    cli += ["--data.in_chans", "3", "--data.corrupt", "error", "--train.output", str(tmp_path)]
    assert main([*cli, *args({**FOLDER, "data.workers": 1})]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    err = [line for line in err.splitlines() if "error" in line]  # the progress bar and warnings aside
    assert len(err) == 1, err
    assert err[0].startswith("masksub train: error: cannot read image ") and "broken.png" in err[0]
    assert err[0].endswith("set data.corrupt=skip (in DataLoader worker process 0)")


@pytest.mark.parametrize("in_chans", [1, 3])
def test_sixteen_bit_images_are_scaled_not_clipped_and_wider_ones_refused(tmp_path, in_chans):
    from masksub.train.data import CorruptImageError, ImageFolder

    ramp = np.arange(0, 65536, 256, dtype=np.uint16).reshape(16, 16)  # 0, 256, ..., 65280
    (tmp_path / "a").mkdir()
    Image.fromarray(ramp).save(tmp_path / "a" / "x.png")  # PIL reads it as mode I;16
    img, _ = ImageFolder(tmp_path, "error", in_chans)[0]
    pixels = np.asarray(img)
    grey = pixels if in_chans == 1 else pixels[..., 0]
    assert np.array_equal(grey, np.arange(256, dtype=np.uint8).reshape(16, 16))  # PIL's convert: 255 from 1 on
    Image.fromarray(ramp.astype(np.int32)).save(tmp_path / "a" / "y.TIF")  # mode I: no known range
    with pytest.raises(CorruptImageError, match=r"y.TIF has 32-bit integer pixels .* convert the data set"):
        ImageFolder(tmp_path, "skip", in_chans)[1]


def test_a_folder_without_images_or_with_images_outside_class_folders_is_named(tmp_path):
    from masksub.train.data import ImageFolder

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "notes.txt").write_text("")
    with pytest.raises(FileNotFoundError, match=r"no images found under .*: expected <class>/<image> .*\.webp"):
        ImageFolder(tmp_path, "skip", 3)
    for name in ("x.webp", "y.bmp"):
        Image.new("RGB", (4, 4)).save(tmp_path / "a" / name)
    assert len(ImageFolder(tmp_path, "skip", 3)) == 2
    Image.new("RGB", (4, 4)).save(tmp_path / "stray.jpg")  # became a class named '' before
    with pytest.raises(FileNotFoundError, match=r"holds 1 image file\(s\) outside a class folder \(e.g. stray.jpg\)"):
        ImageFolder(tmp_path, "skip", 3)
    flat = tmp_path / "val"  # ImageNet's validation images as downloaded: one folder
    flat.mkdir()
    Image.new("RGB", (4, 4)).save(flat / "ILSVRC2012_val_00000001.JPEG")
    with pytest.raises(FileNotFoundError, match="ImageNet's validation images come in one folder: sort them"):
        ImageFolder(flat, "skip", 3)
    with pytest.raises(FileNotFoundError, match=r"holds a, val: name yours with data.train_split / data.val_split"):
        ImageFolder(tmp_path / "validation", "skip", 3)


def test_images_are_labelled_by_their_class_folder_at_any_depth_and_hidden_ones_skipped(tmp_path):
    """timm's reader labelled by the innermost folder: Jupyter's .ipynb_checkpoints became a class, and cat/a/*
    and dog/a/* one class 'a'."""
    from masksub.train.data import ImageFolder

    files = [
        "cat/0.png", "cat/a/1.png", "cat/a/b/2.png", "cat/.ipynb_checkpoints/0-checkpoint.png", "cat/._0.png",
        "dog/a/3.png", "dog/4.JPG", ".ipynb_checkpoints/5.png", ".hidden/6.png",
    ]  # fmt: skip
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4)).save(tmp_path / name, format="PNG")
    found = ImageFolder(tmp_path, "error", 3)
    assert found.classes == ["cat", "dog"]
    labels = {str(Path(path).relative_to(tmp_path)): target for path, target in found.samples}
    assert labels == {"cat/0.png": 0, "cat/a/1.png": 0, "cat/a/b/2.png": 0, "dog/4.JPG": 1, "dog/a/3.png": 1}
    # A split labelled as another (the validation split by the training split's classes) leaves out the rest.
    assert [t for _, t in ImageFolder(tmp_path, "error", 3, class_map={"dog": 0, "bird": 1}).samples] == [0, 0]


def test_a_folder_subset_keeps_every_class_in_its_share(tmp_path):
    """The first N images in path order were the first classes only (an eval_subset of ImageNet: 4 classes)."""
    from masksub.train.data import ImageFolder

    for c in range(5):
        (tmp_path / f"c{c}").mkdir()
        for i in range(10):
            Image.new("RGB", (4, 4)).save(tmp_path / f"c{c}" / f"{i}.png")
    subset = ImageFolder(tmp_path, "error", 3, subset=15)
    assert len(subset) == 15 and torch.bincount(torch.tensor([t for _, t in subset.samples])).tolist() == [3] * 5
    assert len(ImageFolder(tmp_path, "error", 3, subset=500)) == 50


def test_random_interpolation_trains_with_each_and_evaluates_bicubic():
    """aug.interpolation random (timm's training option) was passed to the evaluation transform: a KeyError."""
    from timm.data.transforms import RandomResizedCropAndInterpolation
    from torchvision.transforms import InterpolationMode, Resize

    from masksub.train.transforms import build_transforms

    cfg = load_config("fashion_mnist_vit", {"aug.preset": "timm", "aug.interpolation": "random", "data.img_size": 32})
    train, evaluate = build_transforms(cfg, timm.create_model("resnet18", num_classes=10))
    crop = next(t for t in train.transforms if isinstance(t, RandomResizedCropAndInterpolation))
    assert len(crop.interpolation) > 1  # one drawn per image
    assert next(t for t in evaluate.transforms if isinstance(t, Resize)).interpolation == InterpolationMode.BICUBIC
    assert evaluate(Image.new("L", (28, 28))).shape == (1, 32, 32)


@pytest.mark.parametrize("policy", ["rand-m9-mstd0.5-inc1", "v0", "augmix-m5-w4-d2"])
def test_posterize_at_its_strongest_level_gives_black_with_every_pillow(policy):
    """timm keeps 0 bits there; Pillow >= 13 refuses 0, which stopped Swin and MAE-finetuning runs in their
    first batches (about 1 image in 500 draws it)."""
    from timm.data.auto_augment import AugMixAugment, AutoAugment, RandAugment

    from masksub.train.transforms import build_transforms

    cfg = load_config("fashion_mnist_vit", {"aug.preset": "timm", "aug.auto_augment": policy, "data.in_chans": 3})
    train, _ = build_transforms(cfg, timm.create_model("resnet18", num_classes=10))
    augment = next(t for t in train.transforms if isinstance(t, (RandAugment, AutoAugment, AugMixAugment)))
    ops = [op for group in (augment.policy if hasattr(augment, "policy") else [augment.ops]) for op in group]
    posterize = [op for op in ops if op.name.startswith("Posterize")]
    assert posterize, ops
    for op in posterize:
        op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0  # strongest level
        op.level_fn = lambda magnitude, hparams: (0,)  # keep 0 bits, as PosterizeIncreasing does at level 10
        out = np.asarray(op(Image.new("RGB", (8, 8), (200, 100, 50))))
        assert out.shape == (8, 8, 3) and out.max() == 0


def test_grey_training_on_a_colour_folder_normalizes_with_one_statistic(tmp_path, image_folder):
    """data.in_chans=1 on RGB files: the images are read grey, and the model's RGB mean and std
    (timm's pretrained configuration) are averaged to one value each."""
    from masksub.train.transforms import mean_std

    cfg = load_config("fashion_mnist_resnet", {"data.name": "folder", "data.dir": str(image_folder)})
    mean, std = mean_std(cfg, timm.create_model("resnet18", in_chans=1))
    assert mean == pytest.approx((sum(IMAGENET_DEFAULT_MEAN) / 3,)) and std == pytest.approx(
        (sum(IMAGENET_DEFAULT_STD) / 3,)
    )
    cfg.data.in_chans = 3
    assert mean_std(cfg, timm.create_model("resnet18")) == (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    cfg.aug.mean, cfg.aug.std = (0.5,), (0.25,)
    assert mean_std(cfg, None) == ((0.5,) * 3, (0.25,) * 3), "one value stands for every channel"
    cfg.aug.std = None  # was ignored unless both were set: mean set alone keeps the model's std
    assert mean_std(cfg, timm.create_model("resnet18")) == ((0.5,) * 3, IMAGENET_DEFAULT_STD)

    overrides = dict(FOLDER, **{"data.name": "folder", "data.dir": str(image_folder), "train.name": "grey"})
    cli = ["train", "--recipe", "fashion_mnist_resnet", *args(overrides), "--train.output", str(tmp_path)]
    assert main(cli) == 0
    assert checkpoint.load(tmp_path / "grey" / "last.pt")["model"]["model.conv1.weight"].shape[1] == 1


def test_the_validation_split_takes_the_training_split_class_indices(tmp_path, image_folder, capsys):
    """Each folder split numbers its own classes; a validation split without class0 would shift the labels."""
    import shutil

    from masksub.train.data import build_datasets

    shutil.rmtree(image_folder / "val" / "class0")
    cfg = load_config("fashion_mnist_resnet", {"data.name": "folder", "data.dir": str(image_folder)})
    train, val = build_datasets(cfg)
    assert train.class_to_idx == val.class_to_idx == {"class0": 0, "class1": 1, "class2": 2}
    assert sorted(val[i][1] for i in range(len(val))) == [1, 1, 2, 2]

    (image_folder / "val" / "class9").mkdir()
    shutil.copy(image_folder / "val" / "class1" / "0.png", image_folder / "val" / "class9")
    cli = ["train", "--recipe", "fashion_mnist_resnet", *args(FOLDER, **{"data.name": "folder"})]
    assert main(cli + ["--data.dir", str(image_folder), "--train.output", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "val has 1 class folder(s) the model has no output for (class9): train/ lacks them" in err
    assert not (tmp_path / "runs").exists()


def test_a_checkpoint_keeps_its_classes_for_evaluation_and_resume(tmp_path, image_folder, capsys):
    """eval reads only the validation split, labelled by the checkpoint's classes; resume refuses other classes."""
    import shutil

    overrides = dict(FOLDER, **{"data.name": "folder", "data.dir": str(image_folder), "train.name": "cls"})
    overrides.update({"train.max_steps": None, "sched.epochs": 1})  # an evaluated epoch: 3 steps
    cli = ["train", "--recipe", "fashion_mnist_resnet", *args(overrides), "--train.output", str(tmp_path)]
    assert main(cli) == 0
    folder = tmp_path / "cls"
    assert checkpoint.load(folder / "last.pt")["classes"] == ["class0", "class1", "class2"]
    top1 = json.loads((folder / "metrics.jsonl").read_text().splitlines()[-1])["top1"]

    shutil.move(image_folder / "train", tmp_path / "train_elsewhere")  # e.g. evaluated on another machine
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(folder / "last.pt")]) == 0
    assert f"weights: top-1 {top1:.2f}%" in capsys.readouterr().out

    shutil.move(tmp_path / "train_elsewhere", image_folder / "train")
    shutil.copytree(image_folder / "train" / "class2", image_folder / "train" / "class3")
    assert main(["train", "--resume", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "the training split's classes are not the ones the checkpoint was trained on (new: class3)" in err


PRETRAIN_TINY = {
    "pretrain.decoder_dim": 32,
    "pretrain.decoder_depth": 1,
    "pretrain.decoder_heads": 2,
    "pretrain.projector_dim": 32,
}


def _recipe_overrides(recipe: str, tmp_path: Path) -> dict:
    if recipe.startswith("fashion_mnist"):
        tiny = {"train.max_steps": 2, "data.train_subset": 64, "data.batch_size": 16, "data.workers": 0}
        if recipe.endswith("vit"):
            tiny["model.kwargs"] = TINY["model.kwargs"]
        if recipe.endswith(("dmjd", "linprobe")):
            tiny["model.kwargs"] = VIT_TINY
            tiny.update(PRETRAIN_TINY if recipe.endswith("dmjd") else {})
        if recipe.endswith("convvit"):
            tiny["model.kwargs"] = dict(CONVVIT_TINY, img_size=32, patch_size=[2, 2, 1], fixed_pos_embed=True)
            tiny.update(PRETRAIN_TINY)
        if recipe.endswith("linprobe"):
            import timm

            encoder = timm.create_model("vit_tiny_patch16_224", in_chans=1, num_classes=0, **VIT_TINY)
            torch.save(encoder.state_dict(), tmp_path / "encoder.pt")
            tiny["model.checkpoint"] = str(tmp_path / "encoder.pt")
        return tiny
    out = dict(FOLDER)
    if "convvit" in recipe:
        out.update(PRETRAIN_TINY if recipe.startswith("dmjd") else {}, **{"data.img_size": 64})
        out["model.kwargs"] = CONVVIT_TINY
        if recipe.endswith("finetune"):
            import timm

            weights = timm.create_model("convvit_base_patch16", num_classes=0, **CONVVIT_TINY).state_dict()
            torch.save(weights, tmp_path / "encoder.pt")
            out["model.checkpoint"] = str(tmp_path / "encoder.pt")
    elif recipe.startswith(("dmjd", "maskfeat")):
        out.update(PRETRAIN_TINY, **{"model.kwargs": VIT_TINY})
        if recipe.startswith("maskfeat"):  # one view: no visible branch to project (its size would do nothing)
            del out["pretrain.projector_dim"]
    elif recipe.startswith(("deit3", "mae", "clip")):
        kwargs = dict(VIT_TINY)
        if recipe.startswith("deit3"):
            kwargs["init_values"] = 1e-4
        if recipe.startswith("mae"):
            kwargs["global_pool"] = "avg"
        out["model.kwargs"] = kwargs
        if recipe.startswith(("mae", "clip")):
            import timm

            name = yaml.safe_load((Path("recipes") / f"{recipe}.yaml").read_text())["model"]["name"]
            weights = timm.create_model(name, num_classes=7, **kwargs).state_dict()
            weights["decoder_embed.weight"] = torch.zeros(2, 2)  # an MAE decoder key: reported, not loaded
            torch.save({"model": weights}, tmp_path / "pretrained.pth")
            out["model.checkpoint"] = str(tmp_path / "pretrained.pth")
    elif recipe.startswith("swin"):
        out["model.kwargs"] = {"img_size": 64, "embed_dim": 16, "depths": [1, 1], "num_heads": [1, 2], "window_size": 4}
        out.update({"data.img_size": 64, "sub.unit": 16})
    elif recipe.startswith("rsb"):  # 32-pixel images: the recipes' 32-pixel unit would be one block, none masked
        out["sub.unit"] = 8
        out["model.kwargs"] = {"layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64], "stem_width": 8}  # bottlenecks
    return out


@pytest.mark.parametrize("recipe", sorted(p.stem for p in Path("recipes").glob("*.yaml")))
def test_every_recipe_runs_with_tiny_overrides(recipe, tmp_path, image_folder, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    overrides = _recipe_overrides(recipe, tmp_path)
    if not recipe.startswith("fashion_mnist"):
        overrides["data.dir"] = str(image_folder)
    command = "pretrain" if "pretrain:" in (Path("recipes") / f"{recipe}.yaml").read_text() else "train"
    cli = [command, "--recipe", recipe, *args(overrides), "--train.output", str(tmp_path), "--train.name", "r"]
    assert main(cli) == 0
    state = checkpoint.load(tmp_path / "r" / "last.pt")
    assert state["position"]["global_step"] == 2
    assert state["config"]["recipe"] == recipe


def test_swin_recipe_drops_units_with_sub_adapter_swin_drop(tmp_path, image_folder, monkeypatch, capsys):
    """``--sub.adapter swin_drop``: the Swin recipe's sub pass drops its masked units (the kept tokens reach the
    blocks); the key is saved with the run, and a name that does not fit the model is refused before the run folder
    exists, as is the key with DropSub."""
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    overrides = {**_recipe_overrides("swin_t", tmp_path), "data.dir": str(image_folder), "sub.adapter": "swin_drop"}
    lengths = []
    original = masksub.adapters.swin._block

    def spy(block, method, x, keep=None, grid=None):
        if keep is not None:  # the sub pass
            lengths.append(x.shape[1])
        return original(block, method, x, keep, grid)

    monkeypatch.setattr(masksub.adapters.swin, "_block", spy)
    cli = ["train", "--recipe", "swin_t", *args(overrides), "--train.output", str(tmp_path), "--train.name", "r"]
    assert main(cli) == 0
    assert "ratio 0.5 of the 16x16-pixel blocks (swin_drop adapter)" in capsys.readouterr().out
    assert lengths and set(lengths) <= {128, 32}  # 8 of 16 units: 8x16 first-stage tokens, 8x4 second-stage ones
    assert checkpoint.load(tmp_path / "r" / "last.pt")["config"]["sub"]["adapter"] == "swin_drop"
    for bad, message in (
        ({"sub.adapter": "swin_drop"}, "sub.adapter swin_drop: adapter 'swin_drop' does not support VisionTransformer"),
        ({"sub.adapter": "swin_drop", "sub.kind": "dropout"}, "sub.adapter would do nothing with sub.kind dropout"),
    ):
        assert main(["train", *args(TINY, **bad), "--train.output", str(tmp_path / "bad")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_torchrun_two_processes_end_to_end(tmp_path, capsys):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    # 4 batches of 32 per process and epoch, accumulated 3 and 1: the short window steps on both processes
    more = {"train.output": str(tmp_path), "train.name": "ddp", "data.batch_size": 32, "train.accum_steps": 3}
    cmd += ["-m", "masksub.cli", "train", *args(TINY, **more)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "batch 192 (32 per process x 2 processes x 3 accumulated), 2 steps per epoch (the last of 1 batch)" in (
        proc.stdout
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp"]  # only rank 0 writes
    state = checkpoint.load(tmp_path / "ddp" / "last.pt")
    assert state["position"]["global_step"] == 4  # 256 images / (2 processes x 32) = 4 batches: 2 steps x 2 epochs
    assert len(state["rng"]) == 2  # both ranks' random streams, for an exact resume
    records = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and all(r["top1"] is not None for r in records)
    assert proc.stdout.count("done: test top-1") == 1
    assert main(["train", "--resume", str(tmp_path / "ddp")]) == 2  # one process cannot continue two exactly
    assert "it was written by 2 processes, this run has 1; resume with 2" in capsys.readouterr().err


def test_torchrun_compare_writes_and_speaks_once(tmp_path):
    """Every process trains each run; process 0 alone prints and writes the table (a race before)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m"]
    cmd += ["masksub.cli", "compare", "--subs", "none,mask", "--seeds", "0", "--output", str(tmp_path)]
    cmd += args(TINY, **{"sched.epochs": 1})
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("| mask | 0.5 | 1 |") == 1 and proc.stdout.count("== ") == 2
    rows = list(csv.DictReader((tmp_path / "compare.csv").open()))
    for row in rows:
        record = json.loads((tmp_path / "runs" / f"{row['sub']}-s0" / "metrics.jsonl").read_text())
        assert float(row["final_top1"]) == record["top1"]


def test_corrupt_checkpoint_gets_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "last.pt"
    bad.write_bytes(b"PK\x03\x04 truncated zip")
    assert main(["train", "--resume", str(bad)]) == 2
    assert "cannot load checkpoint" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert "not found" in capsys.readouterr().err


def test_checkpoint_load_maps_zip_files_and_reads_legacy_ones(tmp_path):
    """Checkpoints are memory-mapped (the processes of a node share the pages); pre-zip files are read whole."""
    for legacy in (False, True):
        torch.save({"w": torch.arange(4.0)}, tmp_path / "w.pt", _use_new_zipfile_serialization=not legacy)
        assert torch.equal(checkpoint.load(tmp_path / "w.pt")["w"], torch.arange(4.0))


def test_initial_weights_of_another_model_are_refused_not_ignored(tmp_path, capsys):
    """Nothing loaded used to be two log lines, then a run from scratch (days, on ImageNet)."""
    vit = TINY["model.kwargs"]
    torch.save(
        timm.create_model("vit_tiny_patch16_224", num_classes=0, in_chans=1, **vit).state_dict(), tmp_path / "w.pt"
    )
    for other in ({"model.name": "resnet18", "model.kwargs": {}}, {"model.kwargs": {**vit, "embed_dim": 64}}):
        cli = ["train", *args(TINY, **{"model.checkpoint": str(tmp_path / "w.pt"), **other})]
        assert main([*cli, "--train.output", str(tmp_path / "runs")]) == 2
        err = capsys.readouterr().err
        assert f"error: none of the 18 tensors in {tmp_path / 'w.pt'} fits the " in err
        assert err.strip().endswith("set model.name and model.kwargs to the checkpoint's")
    assert "e.g. cls_token: (1, 1, 32) there, (1, 1, 64) here" in err
    # A classifier of as many classes: its head's bias fits any model of them, and it alone was loaded.
    torch.save(
        timm.create_model("vit_tiny_patch16_224", num_classes=10, in_chans=1, **vit).state_dict(), tmp_path / "h.pt"
    )
    wider = {"model.checkpoint": str(tmp_path / "h.pt"), "model.kwargs": {**vit, "embed_dim": 64}}
    assert main(["train", *args(TINY, **wider), "--train.output", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert f"none of the 20 tensors in {tmp_path / 'h.pt'} fits the VisionTransformer being trained, the " in err
    assert "classifier's head.bias aside (19 differ in shape" in err
    # A file of another family that timm's converter of this one cannot take (a ConvViT encoder's 16 position
    # embeddings, read by the ViT filter as a class token and 15 patches): named, not a reshape traceback.
    convvit = dict(img_size=64, embed_dim=(8, 16, 32), depth=(1, 1, 2), num_heads=2, num_classes=0, in_chans=1)
    torch.save(timm.create_model("convvit_base_patch16", **convvit).state_dict(), tmp_path / "c.pt")
    cli = ["train", *args(TINY, **{"model.checkpoint": str(tmp_path / "c.pt")})]
    assert main([*cli, "--train.output", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert f"error: {tmp_path / 'c.pt'} does not convert to the VisionTransformer being trained: timm's " in err
    assert "checkpoint_filter_fn failed (RuntimeError: shape" in err and "Traceback" not in err
    assert err.strip().endswith("set model.name and model.kwargs to the checkpoint's")
    assert not (tmp_path / "runs").exists()
    assert (
        main(["train", *args(TINY, **{"model.checkpoint": str(tmp_path / "w.pt"), "train.output": str(tmp_path)})]) == 0
    )
    out = capsys.readouterr().out
    assert "2 missing keys ['head.bias', 'head.weight']" in out and "unexpected" not in out


class Opaque:
    """An object of the user's own in a checkpoint."""


def test_checkpoints_of_other_tools_load_or_get_a_clear_error(tmp_path, capsys):
    """timm's train.py, DeiT and MAE keep their argparse.Namespace beside the weights; hub weights are safetensors."""
    import argparse

    import safetensors.torch

    model = timm.create_model("resnet18", num_classes=10, in_chans=1)
    weights = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save({"state_dict": weights, "args": argparse.Namespace(lr=0.1), "epoch": 3}, tmp_path / "timm.pth.tar")
    safetensors.torch.save_file(weights, tmp_path / "model.safetensors")
    for name in ("timm.pth.tar", "model.safetensors"):
        fresh = timm.create_model("resnet18", num_classes=10, in_chans=1)
        assert checkpoint.load_pretrained(fresh, tmp_path / name) == ([], [])
        assert all(torch.equal(v, weights[k]) for k, v in fresh.state_dict().items()), name

    torch.save({"model": weights, "extra": Opaque()}, tmp_path / "opaque.pt")  # refused, with the way out
    with pytest.raises(checkpoint.CheckpointError, match="holds Python objects that loading with weights_only=True"):
        checkpoint.load(tmp_path / "opaque.pt")
    (tmp_path / "config.yaml").write_text("model: {}\n")
    with pytest.raises(checkpoint.CheckpointError, match="it is not a PyTorch checkpoint"):
        checkpoint.load(tmp_path / "config.yaml")

    assert main(["train", "--resume", str(tmp_path / "timm.pth.tar")]) == 2
    assert "is not a masksub run checkpoint (it has no configuration)" in capsys.readouterr().err


def test_a_damaged_or_cut_short_checkpoint_is_refused_by_name(tmp_path, capsys):
    """torch.load read a checkpoint with damaged bytes as if whole (the weights silently took them), and one cut
    short failed with '[Errno 22] Invalid argument'."""
    path = tmp_path / "last.pt"
    state = {"model": {"w": torch.arange(50_000.0)}, "step": torch.tensor(3)}
    with checksums(False):  # a process that turned checksums off: save_atomic writes them
        checkpoint.save_atomic(state, path)
    data = path.read_bytes()
    assert torch.equal(checkpoint.load(path)["model"]["w"], state["model"]["w"])
    at = data.index(torch.arange(50_000.0)[1000:1004].numpy().tobytes())  # inside the tensor's record
    flipped = data[:at] + bytes([data[at] ^ 0x10]) + data[at + 1 :]
    assert not torch.equal(torch.load(io.BytesIO(flipped), weights_only=True)["model"]["w"], state["model"]["w"])
    for name, damaged in (("flipped.pt", flipped), ("cut.pt", data[: len(data) // 2]), ("tail.pt", data[:-50])):
        (tmp_path / name).write_bytes(damaged)
        with pytest.raises(checkpoint.CheckpointError, match="it is damaged or incomplete .a copy or download cut"):
            checkpoint.load(tmp_path / name)
    assert main(["train", "--resume", str(tmp_path / "flipped.pt")]) == 2
    assert "Bad CRC-32 for file" in capsys.readouterr().err
    if hasattr(torch.serialization, "set_crc32_options"):  # torch >= 2.6 can write files without checksums
        with checksums(False):  # such a file (every checksum 0) is taken as it is
            torch.save(state, tmp_path / "plain.pt")
        assert torch.equal(checkpoint.load(tmp_path / "plain.pt")["model"]["w"], state["model"]["w"])


@contextlib.contextmanager
def checksums(on: bool):
    """torch.save writes CRC-32 checksums (``on``) or zeros, where this torch has the switch."""
    switch = getattr(torch.serialization, "set_crc32_options", None)
    if switch is None:
        yield
        return
    before = torch.serialization.get_crc32_options()
    switch(on)
    try:
        yield
    finally:
        switch(before)


def check_device_data_resumes_exactly(tmp_path, **more) -> Path:
    """Train with data.on_device twice, once stopped after 3 steps and resumed: same final weights."""
    dev = {
        "data.on_device": True,
        "aug.preset": "simple",
        "data.img_size": 32,
        "model.kwargs": {**TINY["model.kwargs"], "img_size": 32, "patch_size": 8},
        **more,
    }
    full = run_train(tmp_path, "full", **dev)
    part = run_train(tmp_path, "part", **dev, **{"train.max_steps": 3})
    assert main(["train", "--resume", str(part)]) == 0
    a, b = checkpoint.load(full / "last.pt"), checkpoint.load(part / "last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), "a resumed run must end the same"
    return full


def test_on_device_data_trains_and_resumes_exactly(tmp_path):
    full = check_device_data_resumes_exactly(tmp_path)
    top1 = [json.loads(x)["top1"] for x in (full / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < t <= 100 for t in top1)


@pytest.mark.parametrize("kind", ["droppath", "mask"])
def test_grad_checkpointing_trains_as_without(tmp_path, kind):
    """model.grad_checkpointing recomputes each block in the backward; the sub pass's drop rates hold for it."""
    more = {"sub.kind": kind, "model.drop_path_rate": 0.1, "train.ema": True, "data.train_subset": 128}
    plain = checkpoint.load(run_train(tmp_path, "plain", **more) / "last.pt")
    found = checkpoint.load(run_train(tmp_path, "ckpt", **more, **{"model.grad_checkpointing": True}) / "last.pt")
    for part in ("model", "ema"):
        for k, v in plain[part].items():
            torch.testing.assert_close(found[part][k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_resnet_channels_last_accumulation_bf16(tmp_path, capsys):
    cli = [
        "train",
        "--recipe",
        "fashion_mnist_resnet",
        "--train.output",
        str(tmp_path),
        "--train.name",
        "r",
        *args(
            {
                "data.train_subset": 256,
                "data.eval_subset": 100,
                "data.batch_size": 32,
                "data.workers": 0,
                "sched.epochs": 1,
                "train.channels_last": True,
                "train.accum_steps": 2,
                "train.amp": "bf16",
                "optim.clip_grad": 1.0,
            }
        ),
    ]
    assert main(cli) == 0
    header = capsys.readouterr().out.splitlines()[1:3]
    assert header[0].endswith("sub branch mask, ratio 0.5 of the 4x4-pixel blocks (pixels adapter)")
    assert "batch 64 (32 per process x 2 accumulated), 4 steps per epoch, 1 epoch;" in header[1]
    state = checkpoint.load(tmp_path / "r" / "last.pt")
    assert state["position"]["global_step"] == 4  # 8 micro-batches / 2
    record = json.loads((tmp_path / "r" / "metrics.jsonl").read_text())
    assert record["train_loss_sub"] > 0 and record["top1"] > 0


def test_compare_rejects_seeds_that_are_not_integers(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "--seeds", "0,one"])
    assert exit_info.value.code == 2
    assert "seeds must be comma-separated integers, e.g. 0,1,2; got '0,one'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "subs, seeds, message",
    [
        ("none,masks", "0", "--subs: 'masks' is not a sub branch; choose from none,mask,dropout,droppath"),
        ("", "0", "compare needs at least one sub branch and one seed"),
        ("none", ",", "compare needs at least one sub branch and one seed"),
        ("none,mask,none", "0", "compare: sub branch none given twice"),
        ("none", "0,1,0", "compare: seed 0 given twice"),
        ("none --sub.ratio 0.25", "0", "sub.ratio would do nothing with sub.kind none (plain training: no sub"),
        ("dropout,droppath --sub.unit 7", "0", "sub.unit would do nothing with sub.kind dropout (it drops no input"),
        ("dropout --sub.adapter swin_drop", "0", "sub.adapter would do nothing with sub.kind dropout"),
    ],
)
def test_compare_checks_every_run_before_training_any(tmp_path, capsys, subs, seeds, message):
    out = tmp_path / "cmp"
    subs, *more = subs.split(" ")
    assert main(["compare", "--subs", subs, "--seeds", seeds, "--output", str(out), *args(TINY), *more]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists(), "nothing trained, nothing written"


def test_compare_passes_sub_adapter_and_unit_to_the_mask_runs_only():
    from masksub.train.compare import _overrides_for

    given = {"sub.adapter": "swin_drop", "sub.unit": 64, "sub.ratio": 0.25, "optim.lr": 1e-3}
    kinds = ["none", "mask", "dropout"]
    assert _overrides_for("mask", kinds, given) == given
    assert _overrides_for("dropout", kinds, given) == {"sub.ratio": 0.25, "optim.lr": 1e-3}
    assert _overrides_for("none", kinds, given) == {"optim.lr": 1e-3}


def test_compare_into_a_file_is_named(tmp_path, capsys):
    (tmp_path / "cmp").write_text("notes")
    assert main(["compare", "--subs", "none", "--seeds", "0", "--output", str(tmp_path / "cmp"), *args(TINY)]) == 2
    assert f"--output {tmp_path / 'cmp'} is a file; name a folder" in capsys.readouterr().err  # was a traceback
    assert (tmp_path / "cmp").read_text() == "notes"


@pytest.mark.parametrize(
    "key, message",
    [
        ("train.resume", "for train.resume, run the same masksub compare command again"),
        ("train.name", "for train.name, use --output"),
        ("sub.kind", "for sub.kind, list the sub branches in --subs"),
        ("train.seed", "for train.seed, list the seeds in --seeds"),
    ],
)
def test_compare_refuses_the_keys_it_sets_for_each_run(tmp_path, capsys, key, message):
    """A --train.resume sent every run of the compare into one earlier run's folder; the others were replaced."""
    earlier = run_train(tmp_path, "earlier", **{"train.max_steps": 1})
    before = (earlier / "last.pt").read_bytes()
    value = {"train.resume": str(earlier), "train.name": "mine", "sub.kind": "dropout", "train.seed": 7}[key]
    out = tmp_path / "cmp"
    assert main(["compare", "--subs", "mask", "--seeds", "0", "--output", str(out), *args(TINY, **{key: value})]) == 2
    err = capsys.readouterr().err
    assert f"compare sets {key} itself (each run is <output>/runs/<sub>-s<seed>): {message}" in err
    assert not out.exists() and (earlier / "last.pt").read_bytes() == before


@pytest.mark.parametrize("classes", [3, 5, 10])
def test_top5_is_left_out_where_every_label_is_among_the_top_5(classes, capsys):
    """With 5 classes or fewer top-5 is 100% whatever the model: reported as None, and not printed."""
    from masksub.train.accuracy import accuracy_text, evaluate

    x, y = torch.randn(40, 4), torch.arange(40) % classes
    model = torch.nn.Linear(4, classes)
    metrics = evaluate(model, [(x[:20], y[:20]), (x[20:], y[20:])], torch.device("cpu"))
    top = model(x).topk(min(5, classes), dim=1).indices
    assert metrics["top1"] == pytest.approx(100 * (top[:, 0] == y).double().mean().item(), abs=1e-3)
    if classes <= 5:
        assert metrics["top5"] is None and accuracy_text(metrics) == f"top-1 {metrics['top1']:.2f}%"
    else:
        assert metrics["top5"] == pytest.approx(100 * (top == y[:, None]).any(1).double().mean().item(), abs=1e-3)
        assert accuracy_text(metrics).endswith(f", top-5 {metrics['top5']:.2f}%")


@pytest.mark.parametrize("command", ["train", "pretrain"])
def test_a_dry_run_times_steps_and_writes_nothing(command, tmp_path, capsys):
    from test_pretrain import PRE

    settings = {**(TINY if command == "train" else PRE), "train.output": str(tmp_path / "runs")}
    assert main([command, "--dry-run", *args(settings)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("dry run: nothing is written\n") and not (tmp_path / "runs").exists()
    steps = 4  # 256 images in batches of 64: one step warms up, three are timed
    timed = rf"dry run: 3 optimizer steps after one to warm up, [\d.]+ s each .* an epoch of {steps} steps would take"
    assert re.search(timed, out)
    assert main([command, "--dry-run", "--resume", str(tmp_path)]) == 2
    assert "--dry-run times a new run: leave out --resume" in capsys.readouterr().err


def test_a_dry_run_needs_a_step_to_time(tmp_path, capsys):
    assert main(["train", "--dry-run", *args(TINY, **{"train.output": str(tmp_path), "data.train_subset": 64})]) == 2
    assert "an epoch of one optimizer step leaves none to time" in capsys.readouterr().err


def test_durations_read_as_a_person_says_them():
    assert [_duration(s) for s in (45, 150, 7200 * 1.6, 86400 * 3)] == ["45 s", "2.5 min", "3.2 h", "3.0 days"]
