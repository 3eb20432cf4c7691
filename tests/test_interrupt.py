"""Ctrl-C / SIGTERM: the run saves at the next optimizer step, says how to continue, and resumes exactly."""

from __future__ import annotations

import contextlib
import csv
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch
from test_trainer import TINY, args, run_train

import masksub
from masksub.cli import main
from masksub.train import checkpoint


@pytest.fixture(autouse=True)
def ctrl_c_as_in_a_terminal():
    """SIGINT raises KeyboardInterrupt, as in a terminal, however pytest was started: a job started in the
    background by a script (or with nohup) ignores SIGINT, and so does the trainer then, and the processes
    these tests start inherit it."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def signal_on_call(monkeypatch, n: int, signum: int) -> None:
    """The ``n``-th micro-batch sends ``signum`` to this process from inside the step."""
    original, calls = masksub.Step.__call__, [0]

    def step(self, x, target=None, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signum)
        return original(self, x, target, **kwargs)

    monkeypatch.setattr(masksub.Step, "__call__", step)


def test_ctrl_c_saves_at_the_next_step_and_the_run_resumes_exactly(tmp_path, monkeypatch, capsys):
    full = run_train(tmp_path, "full")
    before = signal.getsignal(signal.SIGINT)
    signal_on_call(monkeypatch, 3, signal.SIGINT)
    part = tmp_path / "part"
    assert main(["train", *args(TINY, **{"train.output": str(tmp_path), "train.name": "part"})]) == 130
    err = capsys.readouterr().err
    assert f"interrupted by SIGINT in epoch 1, step 3: saved {part / 'last.pt'}" in err
    assert f"--resume {part}" in err
    assert signal.getsignal(signal.SIGINT) is before, "the previous handler is back"
    assert checkpoint.load(part / "last.pt")["position"] == {
        "epoch": 0,
        "micro_in_epoch": 3,
        "global_step": 3,
        "batches_per_epoch": 4,
    }

    monkeypatch.undo()
    assert main(["train", "--resume", str(part)]) == 0
    a, b = checkpoint.load(full / "last.pt"), checkpoint.load(part / "last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), "as if never interrupted"
    assert all(
        torch.equal(a["optimizer"]["state"][k]["exp_avg"], b["optimizer"]["state"][k]["exp_avg"])
        for k in a["optimizer"]["state"]
    )


def test_an_interrupted_compare_run_again_keeps_finished_runs_and_resumes_the_stopped_one(
    tmp_path, monkeypatch, capsys
):
    def compare(output: str) -> list[str]:
        return ["compare", "--subs", "none,mask", "--seeds", "0", "--output", str(tmp_path / output), *args(TINY)]

    assert main(compare("whole")) == 0
    signal_on_call(monkeypatch, 8 + 3, signal.SIGTERM)  # the plain run's 8 micro-batches, then the mask run's third
    assert main(compare("cut")) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "run the same masksub compare command again" in err
    monkeypatch.undo()

    assert main(compare("cut")) == 0
    out = capsys.readouterr().out
    cut = tmp_path / "cut"
    assert f"{cut / 'runs' / 'none-s0'} is finished" in out
    assert f"resumed {cut / 'runs' / 'mask-s0'} at epoch 1, step 3" in out
    assert sorted(p.name for p in (cut / "runs").iterdir()) == ["mask-s0", "none-s0"]  # nothing trained twice
    results = lambda folder: [  # noqa: E731
        (r["sub"], r["epochs"], r["steps"], r["final_top1"], r["final_train_loss"])
        for r in csv.DictReader((folder / "compare.csv").open())
    ]
    assert results(cut) == results(tmp_path / "whole"), "as if never interrupted"

    # Other settings in the same output folder: the earlier runs are left as they are, new ones start beside.
    assert main([*compare("cut"), "--sched.epochs", "1"]) == 0
    assert "was trained with other settings (sched.epochs 2, now 1): not continued" in capsys.readouterr().out
    assert sorted(p.name for p in (cut / "runs").iterdir()) == ["mask-s0", "mask-s0-1", "none-s0", "none-s0-1"]


def test_a_second_ctrl_c_stops_at_once_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    original, calls = masksub.Step.__call__, [0]

    def step(self, x, target=None, **kwargs):
        calls[0] += 1
        if calls[0] == 3:  # Ctrl-C twice in the third step
            # raise_signal runs the handler in this thread before it returns: each Ctrl-C is handled in turn
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
        return original(self, x, target, **kwargs)

    monkeypatch.setattr(masksub.Step, "__call__", step)
    cli = ["train", *args(TINY, **{"train.output": str(tmp_path), "train.name": "r", "train.checkpoint_every": 1})]
    assert main(cli) == 130
    assert "masksub train: stopped at once by Ctrl-C (files written before are kept)" in capsys.readouterr().err
    assert checkpoint.load(tmp_path / "r" / "last.pt")["position"]["global_step"] == 2  # the step before, whole


def test_a_run_that_ignores_sigint_goes_on_ignoring_it(tmp_path, monkeypatch):
    """A job started in the background (`masksub train &` in a script, nohup) ignores SIGINT: Ctrl-C in the terminal
    does not stop it. The trainer used to catch it all the same, stop the run, and then ignore a second one."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal_on_call(monkeypatch, 3, signal.SIGINT)
    cli = ["train", *args(TINY, **{"train.output": str(tmp_path), "train.name": "r"})]
    assert main(cli) == 0
    position = checkpoint.load(tmp_path / "r" / "last.pt")["position"]
    assert position["global_step"] == position["batches_per_epoch"] * 2, "trained to the end"
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_sigterm_mid_accumulation_stops_after_the_optimizer_step(tmp_path, monkeypatch):
    signal_on_call(monkeypatch, 3, signal.SIGTERM)  # micro-batch 3 of 4: the second step's first half
    cli = ["train", *args(TINY, **{"train.output": str(tmp_path), "train.name": "r", "train.accum_steps": 2})]
    assert main(cli) == 128 + signal.SIGTERM
    position = checkpoint.load(tmp_path / "r" / "last.pt")["position"]
    assert position == {"epoch": 0, "micro_in_epoch": 4, "global_step": 2, "batches_per_epoch": 4}, (
        "never saved between micro-batches"
    )


def test_torchrun_processes_agree_on_the_step_to_stop_at(tmp_path):
    """Only rank 0 gets the signal; both stop at the same step, and the checkpoint holds both ranks."""
    worker = tmp_path / "worker.py"
    worker.write_text(
        textwrap.dedent(
            """
            import os, signal, sys
            import masksub
            from masksub.cli import main
            from masksub.train.trainer import Trainer

            Trainer.stop_poll = 1
            if os.environ["RANK"] == "0":
                original, calls = masksub.Step.__call__, [0]

                def step(self, x, target=None, **kwargs):
                    calls[0] += 1
                    if calls[0] == 2:
                        os.kill(os.getpid(), signal.SIGTERM)
                    return original(self, x, target, **kwargs)

                masksub.Step.__call__ = step
            sys.exit(main(sys.argv[1:]))
            """
        )
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker)]
    cmd += ["train", *args(TINY, **{"train.output": str(tmp_path), "train.name": "ddp", "sched.epochs": 3})]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)  # seconds when right; a hang
    assert proc.returncode != 0 and "interrupted by SIGTERM in epoch 1, step 2" in proc.stderr, proc.stderr[-3000:]
    state = checkpoint.load(tmp_path / "ddp" / "last.pt")
    assert state["position"]["global_step"] == 2 and len(state["rng"]) == 2


SIGNAL_THE_GROUP = """
import os, sys
import masksub
from masksub.cli import main
from masksub.train import trainer

SIGNUM, WHEN = int(sys.argv[1]), sys.argv[2]
signal_the_group = lambda: os.killpg(os.getpgrp(), SIGNUM)  # this process and its loader workers
original_step, calls = masksub.Step.__call__, [0]
original_evaluate = trainer.evaluate


def step(self, x, target=None, **kwargs):
    calls[0] += 1
    if WHEN == "step" and calls[0] == 2:
        signal_the_group()
    return original_step(self, x, target, **kwargs)


class SignalAtSecondBatch:  # the evaluation loader, its workers running
    def __init__(self, loader):
        self.loader = loader

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if i == 1:
                signal_the_group()
            yield batch


def evaluate(model, loader, *args):
    return original_evaluate(model, SignalAtSecondBatch(loader) if WHEN == "eval" else loader, *args)


masksub.Step.__call__, trainer.evaluate = step, evaluate
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.parametrize("when", ["step", "eval"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_whole_process_group_with_loader_workers_still_saves(tmp_path, signum, when):
    """Ctrl-C in a terminal and a preempted job signal every process of the job, DataLoader workers
    too: the workers leave the signal to the main process, which saves at the next step."""
    worker = tmp_path / "worker.py"
    worker.write_text(SIGNAL_THE_GROUP)
    overrides = {"train.output": str(tmp_path), "train.name": "r", "data.workers": 2, "data.eval_batch_size": 50}
    cmd = [sys.executable, str(worker), str(int(signum)), when, "train", *args(TINY, **overrides)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, start_new_session=True)
    name, step = signal.Signals(signum).name, 2 if when == "step" else 5  # 4 steps an epoch; eval after the 4th
    assert proc.returncode == 128 + signum, proc.stderr[-3000:]
    assert f"interrupted by {name} in epoch {step // 4 + 1}, step {step}" in proc.stderr, proc.stderr[-3000:]
    assert "DataLoader worker" not in proc.stderr
    assert proc.stderr.count(f"{name}: stopping after this optimizer step") == 1, "the main process alone handles it"
    assert checkpoint.load(tmp_path / "r" / "last.pt")["position"]["global_step"] == step


RAISE_IN_A_WORKER = """
import os, sys
from masksub.cli import main
from masksub.train import data

WHERE = sys.argv[1]
original = data.Augmented.__getitem__


def getitem(self, key):  # training keys are (epoch, index), evaluation keys plain indices
    if (WHERE == "train") == isinstance(key, tuple) and os.environ.get("RANK", "1") == "1":
        raise ValueError(f"a transform failed in the {WHERE} loader")
    return original(self, key)


data.Augmented.__getitem__ = getitem
sys.exit(main(sys.argv[2:]))
"""


def run_or_kill(cmd: list[str], marker: str, timeout: float = 240) -> tuple[int | None, str]:
    """Run ``cmd`` to its end: its exit code (None if it ran past ``timeout`` seconds) and its stderr. A
    process past the time is killed with every process whose command line holds ``marker``: torchrun
    starts its workers in sessions of their own, out of reach of a signal to its process group."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, text=True, env=env)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            for entry in Path("/proc").iterdir():
                with contextlib.suppress(OSError):
                    if entry.name.isdigit() and marker.encode() in (entry / "cmdline").read_bytes():
                        os.kill(int(entry.name), signal.SIGKILL)
            proc.wait()
            code = None
        err.seek(0)
        return code, err.read()


@pytest.mark.parametrize("where", ["train", "eval"])
def test_an_error_raised_in_a_loader_worker_ends_the_run(tmp_path, where):
    """The error reaches the user and the process exits: the workers, which pass over the first
    SIGTERM, are shut down by the loop, not left to the interpreter's exit (that waited forever)."""
    script = tmp_path / "raise.py"
    script.write_text(RAISE_IN_A_WORKER)
    overrides = {"train.output": str(tmp_path), "train.name": "r", "data.workers": 2, "data.eval_batch_size": 50}
    code, err = run_or_kill([sys.executable, str(script), where, "train", *args(TINY, **overrides)], str(script))
    assert code is not None, f"the run hung after the {where} loader's worker raised"
    assert code == 1, err[-3000:]
    assert f"ValueError: a transform failed in the {where} loader" in err


def test_an_error_on_one_torchrun_process_ends_the_job(tmp_path):
    """Process 1's loader fails while process 0 is in a step's all-reduce: the job ends at once. (A barrier
    on the error path made process 1 wait beside that all-reduce until the backend's 30-minute timeout.)"""
    script = tmp_path / "raise.py"
    script.write_text(RAISE_IN_A_WORKER)
    overrides = {"train.output": str(tmp_path), "train.name": "r", "data.workers": 1}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    code, err = run_or_kill(cmd + ["train", "train", *args(TINY, **overrides)], str(script))
    assert code is not None, "the job hung after process 1's loader raised"
    assert code != 0 and "ValueError: a transform failed in the train loader" in err, err[-3000:]
