"""The run folder: its name, resolved config, metrics.jsonl, summary.csv, the curves plot, its lock and the
command that resumes it."""

from __future__ import annotations

import csv
import io
import json
import re
import shlex
from pathlib import Path

import matplotlib

from .config import ConfigError

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


class FolderLock:
    """While open, an exclusive lock on a run folder: a second process training into it (a job submitted
    twice, a resume while the run still trains) is refused instead of interleaving its checkpoints and
    metrics with the first's. Ends with the context or the process; a no-op where fcntl is missing."""

    def __init__(self, folder: Path, enabled: bool = True):
        self.folder, self.enabled, self._file = Path(folder), enabled, None
        self.leftovers: list[tuple[str, int]] = []  # (name, bytes) of removed unfinished writes

    def __enter__(self) -> FolderLock:
        try:
            import fcntl
        except ImportError:  # Windows
            return self
        if not self.enabled:
            return self
        try:
            f = (self.folder / ".lock").open("a")
        except OSError:  # a folder this process cannot write: its first checkpoint says so
            return self
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            raise ConfigError(
                f"run folder {self.folder} is in use by another masksub process; wait for it to end, or stop it"
            ) from None
        self._file = f
        self._remove_leftovers()
        return self

    def _remove_leftovers(self) -> None:
        """Files written beside and renamed over (checkpoints, metrics) stay half-written, hidden, when a
        process is killed mid-write (SIGKILL, out of memory, a node lost): each as large as a checkpoint,
        one more per kill. Under the lock no other process writes here: they are removed."""
        for path in sorted(self.folder.glob(".*.tmp")):
            try:
                size = path.stat().st_size
                path.unlink()
            except OSError:
                continue
            self.leftovers.append((path.name, size))

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class RunLog:
    """Appends one JSON line per epoch; rewrites the summary and plot from them."""

    def __init__(self, folder: Path, enabled: bool = True):
        self.folder, self.enabled = folder, enabled
        self.path = folder / "metrics.jsonl"

    def records(self) -> list[dict]:
        if not self.path.is_file():
            return []
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        records = []
        for i, line in enumerate(lines):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if i < len(lines) - 1:
                    raise ValueError(f"{self.path}, line {i + 1}, is not JSON: {line[:80]!r}") from None
                # The last line, torn by a kill or a full disk while it was appended: its epoch has
                # no checkpoint after it, and a resumed run writes it again.
        return records

    def truncate_after(self, epoch: int) -> None:
        """On resume: forget epochs the checkpoint had not reached (they will be run again)."""
        if self.enabled and self.path.is_file():
            kept = [r for r in self.records() if r["epoch"] <= epoch]
            replace_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def append(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        records = self.records()
        write_summary(self.folder / "summary.csv", [summarize(records)])
        plot_curves({self.folder.name: records}, self.folder / "curves.png")


def summarize(records: list[dict], **extra) -> dict:
    evaluated = [r for r in records if r.get("top1") is not None]
    last = records[-1] if records else {}
    return {
        **extra,
        "epochs": last.get("epoch", 0),
        "steps": last.get("step", 0),
        "final_top1": evaluated[-1]["top1"] if evaluated else None,
        "best_top1": max(r["top1"] for r in evaluated) if evaluated else None,
        "final_top5": evaluated[-1].get("top5") if evaluated else None,
        "final_ema_top1": evaluated[-1].get("ema_top1") if evaluated else None,
        "final_train_loss": last.get("train_loss"),
        "train_time_s": round(sum(r.get("epoch_time_s", 0.0) for r in records), 2),
        "nonfinite_skipped": sum(r.get("nonfinite_skipped", 0) for r in records),
    }


def write_summary(path: Path, rows: list[dict]) -> None:
    out = io.StringIO(newline="")
    writer = csv.DictWriter(out, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    replace_text(path, out.getvalue())


def write_output(path: Path, text: str) -> None:
    """A file a command was asked to write (a CSV of predictions, a confusion matrix): whole or not at all, its
    folder made, a failure an error naming it."""
    from .checkpoint import CheckpointWriteError

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        replace_text(path, text)
    except OSError as e:
        raise CheckpointWriteError(f"cannot write {path}: {e.strerror or e}") from e


def replace_text(path: Path, text: str) -> None:
    """Written beside and renamed over: a kill mid-write leaves the old file, not half of the new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, newline="")  # as given: csv's own line ends
    tmp.replace(path)


def plot_curves(runs: dict[str, list[dict]], path: Path) -> None:
    """Training loss and test accuracy per epoch, one line per run, side by side.

    Runs named ``<group>-s<seed>`` share their group's colour and legend entry; seeds differ by line style.
    """
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    group_of = {name: re.sub(r"-s\d+$", "", name) for name in runs}
    colour = {group: i % 10 for i, group in enumerate(dict.fromkeys(group_of.values()))}
    seen: dict[str, int] = {}
    for name, records in runs.items():
        group = group_of[name]
        k = seen[group] = seen.get(group, -1) + 1
        style = dict(
            color=plt.get_cmap("tab10")(colour[group]),
            linestyle=("-", "--", ":", "-.")[k % 4],
            marker=".",
            label=group if k == 0 else "_nolegend_",
        )
        epochs = [r["epoch"] for r in records]
        ax_loss.plot(epochs, [r.get("train_loss_main", r.get("train_loss")) for r in records], **style)
        evaluated = [r for r in records if r.get("top1") is not None]
        ax_acc.plot([r["epoch"] for r in evaluated], [r["top1"] for r in evaluated], **style)
    ax_loss.set(xlabel="epoch", ylabel="main-branch training loss", title="training loss")
    ax_acc.set(xlabel="epoch", ylabel="top-1 (%)", title="test accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def free_run_folder(output: Path, name: str) -> Path:
    """``output/name``, or the first of ``name-1``, ``name-2``, ... not taken: a run never overwrites another."""
    folder, n = output / name, 0
    while folder.exists():
        n += 1
        folder = output / f"{name}-{n}"
    return folder


def make_run_folder(output: Path, name: str) -> Path:
    """Makes and returns ``free_run_folder(output, name)``; two runs started at once get a folder each."""
    output.mkdir(parents=True, exist_ok=True)
    while True:
        folder = free_run_folder(output, name)
        try:
            folder.mkdir()
            return folder
        except FileExistsError:  # another run took it between the two calls
            continue


def resume_command(command: str, folder: Path, world: int = 1, local_world: int = 1) -> str:
    """The command that continues a run, as a user pastes it into a shell: under torchrun, with as many
    processes as wrote the checkpoint (an exact resume needs each one's random streams)."""
    tail = f"{command} --resume {shlex.quote(str(folder))}"
    if world <= 1:
        return f"masksub {tail}"
    nodes = f" --nnodes {world // local_world} (and this job's rendezvous options)" if world > local_world else ""
    return f"torchrun --nproc_per_node {local_world}{nodes} -m masksub.cli {tail}"
