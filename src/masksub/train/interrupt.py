"""Ctrl-C and SIGTERM stop a run at the next optimizer step, with a checkpoint to resume from.

An interrupt that lands in the middle of a step (between the two backwards, inside the optimizer
update) would leave nothing consistent to save. While training, the signal only sets a flag; the
loop checks it after each optimizer step, saves ``last.pt`` at that exact position and stops. A
second signal acts at once, as it would have without this. Under ``torchrun`` the processes agree
on the step to stop at (the flag is all-reduced every ``poll`` steps), since saving gathers every
rank's random state. DataLoader workers (``loader_worker_init``) pass over the first signal: Ctrl-C
in a terminal and a preempted job signal every process of the job, and a worker that died of it
would crash the main process before it could save. For the same reason the loops read their loaders
through ``worker_batches``, which shuts the workers down however the loop ends. A signal the process
ignores (SIGINT in a job started in the background by a script, or with ``nohup``) stays ignored, as it
would without this: Ctrl-C in the terminal does not reach such a job.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(RuntimeError):
    """The run stopped on a signal after saving its checkpoint; ``signum`` is the signal."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


def loader_worker_init(worker_id: int) -> None:
    """``worker_init_fn`` for DataLoader workers: the first SIGINT or SIGTERM leaves them running (the main
    process stops the run and shuts them down); a second acts as it would have without this."""
    for signum in _handled():
        signal.signal(signum, _pass_over_once)


def _handled() -> list[int]:
    """The signals of ``SIGNALS`` this process does not ignore."""
    return [s for s in SIGNALS if signal.getsignal(s) is not signal.SIG_IGN]


def _pass_over_once(signum: int, frame) -> None:
    signal.signal(signum, signal.SIG_DFL)


@contextmanager
def worker_batches(loader: Iterable) -> Iterator[Iterator]:
    """An iterator over ``loader`` whose worker processes are shut down when the block ends, also on an error.

    Without it, an error raised in a worker (a failing transform) leaves the iterator alive in the
    traceback's frames; at the interpreter's exit ``multiprocessing`` terminates the workers with one
    SIGTERM, which ``loader_worker_init`` passes over, and then waits for them forever.
    """
    batches = iter(loader)
    try:
        yield batches
    finally:
        shutdown = getattr(batches, "_shutdown_workers", None)  # what the iterator's __del__ calls
        if shutdown is not None:
            shutdown()


class StopRequest:
    """While active, SIGINT and SIGTERM set :attr:`signum` instead of stopping the process (one it ignores
    stays ignored)."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # signal handlers live there only
            self._previous = {s: signal.signal(s, self._handle) for s in _handled()}
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        self.signum = signum
        self._restore()  # a second signal: whatever it did before
        sys.stderr.write(f"\n{signal.Signals(signum).name}: stopping after this optimizer step (again to stop now)\n")

    def agreed(self, device: torch.device, poll: bool) -> int | None:
        """The signal to stop for now, the same on every process; ``None`` to go on.

        Alone this reads the flag. Under a process group it all-reduces the flag when ``poll`` is
        true (every process must pass the same ``poll``) and goes on otherwise.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return self.signum
        if not poll:
            return None
        flag = torch.tensor([self.signum or 0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None
