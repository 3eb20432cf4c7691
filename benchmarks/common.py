"""Shared by the benchmark scripts: run `masksub` commands as processes, time steps side by side, measure the
tensor memory a CPU step allocates."""

from __future__ import annotations

import itertools
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
import yaml

from masksub.train.runlog import free_run_folder, summarize


def run_cli(
    command: str, name: str, overrides: dict, out: Path, extra: tuple = (), reuse: bool = False, program: tuple = ()
) -> dict:
    """``masksub <command>`` into ``out/name``; returns its folder name, summary, per-epoch records and wall time.

    ``program``: the script and arguments that run instead of ``masksub <command>`` (``peers.py rdrop``), with the
    same run keys and ``--resume``.

    An earlier run in ``out/name`` is never overwritten: the new run gets the next free folder
    (``name-1``, ...), as the trainer names it, and its records are read from there. With ``reuse``,
    a finished run in ``out/name`` with the epochs asked for is read instead, and an unfinished one
    with the same schedule continues from its last checkpoint (``--resume``).
    """
    folder, epochs = out / name, overrides.get("sched.epochs")
    records = _records(folder)
    if reuse and records and records[-1]["epoch"] == epochs:
        return {"name": name, "folder": folder.name, "records": records, "wall_s": None, **summarize(records)}
    runs = [sys.executable, *(program or ("-m", "masksub.cli", command))]
    if reuse and (folder / "last.pt").is_file() and _planned_epochs(folder) == epochs and command != "linprobe":
        cmd = [*runs, "--resume", str(folder)]
    else:
        cmd = [*runs, *extra, "--train.output", str(out), "--train.name", name]
        cmd += [arg for key, value in overrides.items() for arg in (f"--{key}", json.dumps(value))]
        folder = free_run_folder(out, name)  # where the trainer will write this run
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-2000:]}")
    records = _records(folder)
    return {
        "name": name,
        "folder": folder.name,
        "records": records,
        "wall_s": time.perf_counter() - start,
        **summarize(records),
    }


def _records(folder: Path) -> list[dict]:
    metrics = folder / "metrics.jsonl"
    return [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []


def _planned_epochs(folder: Path) -> int | None:
    config = folder / "config.yaml"
    return yaml.safe_load(config.read_text())["sched"]["epochs"] if config.is_file() else None


BF16_FLAGS = ("avx512_bf16", "amx_bf16", "avx_ne_convert")  # x86 instructions that compute or convert bf16


def hardware(device: str = "auto") -> str:
    """The GPU's name, or 'CPU <model name>, N cores, <torch's vector ISA>, bf16 instructions: <flags>'.

    Machines sold under one model name differ in the instructions that matter most here (bf16 autocast
    on a CPU runs several times slower without them), so the CPU's string names them."""
    if torch.cuda.is_available() and device != "cpu":
        return torch.cuda.get_device_name()
    model, flags = platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        fields = [ln.split(":", 1) for ln in cpuinfo.read_text().splitlines() if ":" in ln]
        model = next((v.strip() for k, v in fields if k.strip() == "model name"), model)
        flags = set(next((v.split() for k, v in fields if k.strip() == "flags"), []))
    bf16 = ", ".join(f for f in BF16_FLAGS if f in flags) or ("none" if flags else "unknown")
    isa = torch.backends.cpu.get_cpu_capability()
    return f"CPU {model}, {os.cpu_count()} cores, {isa}, bf16 instructions: {bf16}"


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


def cpu_peak_bytes(fn: Callable[[], object]) -> int:
    """The peak of the tensor memory that ``fn()`` allocates on the CPU, over what was allocated before it:
    the CPU has no allocator statistics, so the profiler's allocation and free events are summed in time order."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    return max(itertools.accumulate((e.nbytes() for e in events), initial=0))
