"""Shared by the benchmark scripts: run `masksub` commands as processes, time steps side by side."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from masksub.train.runlog import summarize


def run_cli(command: str, name: str, overrides: dict, out: Path, extra: tuple = (), reuse: bool = False) -> dict:
    """``masksub <command>`` into ``out/name``; returns the summary, per-epoch records and wall time.

    With ``reuse``, a finished run already in ``out/name`` (as many epochs as asked) is read, not rerun.
    """
    done = out / name / "metrics.jsonl"
    if reuse and done.is_file():
        records = [json.loads(line) for line in done.read_text().splitlines()]
        if records and records[-1]["epoch"] == overrides.get("sched.epochs"):
            return {"name": name, "records": records, "wall_s": None, **summarize(records)}
    cmd = [sys.executable, "-m", "masksub.cli", command, *extra, "--train.output", str(out), "--train.name", name]
    for key, value in overrides.items():
        cmd += [f"--{key}", json.dumps(value)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-2000:]}")
    records = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    return {"name": name, "records": records, "wall_s": time.perf_counter() - start, **summarize(records)}


def hardware(device: str = "auto") -> str:
    if torch.cuda.is_available() and device != "cpu":
        return torch.cuda.get_device_name()
    return f"CPU {platform.machine()}, {os.cpu_count()} cores"


def alternating_step_times(steps: dict[str, Callable], cuda: bool, warmup: int = 5, rounds: int = 5, calls: int = 5):
    """Median seconds per call of each step: after a warm-up, all run in alternating rounds of ``calls``.

    Alternating rounds make a drift in clocks or machine load hit every step alike.
    """
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(calls):
                step()
            if cuda:
                torch.cuda.synchronize()
            times[name].append((time.perf_counter() - start) / calls)
    return {name: statistics.median(ts) for name, ts in times.items()}
