"""Experiment trackers a run's scalars go to beside metrics.jsonl: TensorBoard (``train.tensorboard``) and Weights
& Biases (``train.wandb``). Both get the same values against the optimizer step: ``train/*`` every 20 steps (the
loss of that step, its main and sub parts, the learning rate and images/s, read when the progress bar reads them: no
other host sync) and ``epoch/*``, each epoch's record. Process 0 alone writes them."""

from __future__ import annotations

import contextlib
import json
import secrets
from pathlib import Path

from .config import ConfigError, flat_config
from .runlog import replace_text


def scalars(prefix: str, values: dict) -> dict[str, float]:
    """The numbers of a record, named ``<prefix>/<key>``; its epoch and step are the x axis, not values."""
    return {
        f"{prefix}/{key}": value
        for key, value in values.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("epoch", "step")
    }


class TensorBoard:
    """Event files in ``<run>/tensorboard``. ``purge_step`` (a resumed run: its checkpoint's step + 1) has
    TensorBoard drop what a killed process logged after the checkpoint, which this run logs again."""

    def __init__(self, folder: Path, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(folder / "tensorboard"), purge_step=purge_step)

    def add(self, prefix: str, values: dict, step: int) -> None:
        for tag, value in scalars(prefix, values).items():
            self.writer.add_scalar(tag, value, step)

    def close(self, error: BaseException | None) -> None:
        self.writer.close()


class WandB:
    """A W&B run in project ``train.wandb``, named as the run folder, its config the resolved config; its files
    in ``<run>/wandb``. W&B's own variables choose the rest (``WANDB_MODE=offline``, ``WANDB_ENTITY``,
    ``WANDB_RUN_GROUP``, ``WANDB_TAGS``...). The W&B run id is kept in ``<run>/wandb-run.json``: a resumed run
    continues the same W&B run, and the steps W&B already holds (logged by the killed process after its
    checkpoint: under exact resume, the values this run computes again) are not sent twice."""

    ID_FILE = "wandb-run.json"

    def __init__(self, folder: Path, cfg, resuming: bool, job_type: str):
        import wandb

        id_file = folder / self.ID_FILE
        run_id = json.loads(id_file.read_text())["id"] if resuming and id_file.is_file() else None
        if run_id is None:
            run_id = f"{folder.name[:50]}-{secrets.token_hex(4)}"  # unique within the project, readable in it
            replace_text(id_file, json.dumps({"id": run_id, "project": cfg.train.wandb}) + "\n")
        try:
            self.run = wandb.init(
                project=cfg.train.wandb,
                id=run_id,
                resume="allow",
                name=folder.name,
                job_type=job_type,
                config=flat_config(cfg),
                dir=str(folder),
            )
        except Exception as e:  # no API key in online mode, an unreachable server...
            raise ConfigError(
                f"W&B could not start the run ({type(e).__name__}: {e}): log in (wandb login, or WANDB_API_KEY), "
                "log offline (WANDB_MODE=offline, then wandb sync), or set train.wandb to ''"
            ) from e

    def add(self, prefix: str, values: dict, step: int) -> None:
        if step < self.run.step:  # held from the killed process (W&B would drop it with a warning)
            return
        self.run.log(scalars(prefix, values), step=step)

    def close(self, error: BaseException | None) -> None:
        from .interrupt import Interrupted

        if isinstance(error, Interrupted):
            self.run.mark_preempting()  # stopped to be resumed, not failed
        self.run.finish(exit_code=0 if error is None else 1)


class Trackers(contextlib.AbstractContextManager):
    """The run's trackers (none, one or both) as one: ``add`` sends to each; closed with the run."""

    def __init__(self, trackers: list | None = None):
        self.open = trackers or []

    def add(self, prefix: str, values: dict, step: int) -> None:
        for tracker in self.open:
            tracker.add(prefix, values, step)

    def __exit__(self, kind, error, tb) -> None:
        for tracker in self.open:
            tracker.close(error)
        self.open = []


def open_trackers(cfg, folder: Path, *, main: bool, resuming: bool, step: int, job_type: str) -> Trackers:
    """Process 0's trackers as ``train.tensorboard`` and ``train.wandb`` ask; none on the other processes."""
    trackers = Trackers()
    if not main:
        return trackers
    try:
        if cfg.train.tensorboard:
            trackers.open.append(TensorBoard(folder, purge_step=step + 1 if resuming else None))
        if cfg.train.wandb:
            trackers.open.append(WandB(folder, cfg, resuming, job_type))
    except BaseException as e:
        trackers.__exit__(type(e), e, None)
        raise
    return trackers
