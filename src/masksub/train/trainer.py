"""The training loop: config -> model + sub branch -> Step -> run folder.

Everything a recipe names comes from timm (models, transforms, mixup/cutmix,
optimizers with layer decay, schedulers, EMA); this module wires it together,
evaluates each epoch, and writes checkpoints that resume bit-exactly.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import sys
import time
import warnings
from pathlib import Path

import torch
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import masksub

from . import checkpoint, distributed, resume, sharding
from .accuracy import accuracy_text, evaluate
from .build import build_criterion, build_model, build_scheduler, resolve_device
from .checks import check_command_keys
from .config import Config, ConfigError, dump, load_config
from .data import build_datasets, build_loaders
from .interrupt import Interrupted, StopRequest, worker_batches
from .runlog import FolderLock, RunLog, make_run_folder, resume_command
from .trackers import Trackers, open_trackers


class NonFiniteLossError(RuntimeError):
    pass


def counted(n: int, noun: str) -> str:
    """``counted(1, "step")`` -> '1 step', ``counted(1200, "step")`` -> '1,200 steps'."""
    return f"{n:,} {noun}{'s' * (n != 1)}"


def _duration(seconds: float) -> str:
    """'45 s', '12.5 min', '3.2 h', '2.1 days'."""
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def _progress_interval() -> dict:
    """Progress bar refreshes: as tqdm does on a terminal; written to a file (a batch job's log), one a minute,
    not ten a second (tens of megabytes over a long run). ``TQDM_MININTERVAL`` still decides where it is set."""
    if sys.stderr.isatty() or "TQDM_MININTERVAL" in os.environ:
        return {}
    return {"mininterval": 60.0}


def _own_memory(optimizer: torch.optim.Optimizer) -> None:
    """Copies the optimizer state that ``load_state_dict`` left on the CPU as given: tensors of the memory-mapped
    checkpoint (Adam's steps, all of it on a CPU run), which would keep the replaced last.pt's disk space
    through the run."""
    for state in optimizer.state.values():
        for key, value in state.items():
            if torch.is_tensor(value) and value.device.type == "cpu":
                state[key] = value.clone()


class Trainer:
    command = "train"  # the masksub command that runs (and resumes) this trainer's runs
    evaluates = True  # reads an evaluation split and reports accuracy

    def __init__(self, cfg: Config, log=print, dry_run: bool = False):
        """Everything a run needs, its folder made and its configuration written there; with ``dry_run``, nothing is
        written (``rehearse`` then times a few steps)."""
        self.dry_run = dry_run
        if not cfg.train.resume:  # a resumed run goes on as it began (validate's note)
            check_command_keys(cfg, self.command)
        self.cfg, self.log = cfg, log
        resume_state = checkpoint.load(cfg.train.resume) if cfg.train.resume else None
        self.resuming = resume_state is not None
        if resume_state is not None:
            resume.check_config(resume_state["config"], cfg)  # before building anything that may not fit
        self.device = resolve_device(cfg.train.device)
        self.dist = distributed.init(self.device.type)
        if not self.dist.main:
            self.log = lambda *args, **kwargs: None  # process 0 speaks for all
        self.fsdp = cfg.train.fsdp != "none"
        if self.fsdp and not self.dist.enabled:
            raise ConfigError(
                f"train.fsdp={cfg.train.fsdp} shards the model across processes: launch with torchrun "
                "--nproc_per_node N -m masksub.cli ..., or set train.fsdp none"
            )
        if self.fsdp and not sharding.available():
            raise ConfigError(f"train.fsdp needs torch >= 2.6 (fully_shard); this is torch {torch.__version__}")
        if self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(self.device)
        train_set, val_set = build_datasets(cfg, evaluation=self.evaluates)
        self.classes = list(train_set.classes)  # by label; kept in checkpoints for resume and evaluation
        if resume_state is not None and "classes" in resume_state:
            resume.check_classes(resume_state["classes"], self.classes, cfg.train.resume)
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        self._build(train_set, val_set)  # self.model, self.net, self.loaders, self.ema, self.criterion
        params = list(self.model.parameters())  # before sharding
        sizes = (len(train_set), len(val_set or ()), sum(p.numel() for p in params))
        sizes += (sum(p.numel() for p in params if p.requires_grad),)
        if self.fsdp:
            self._shard()  # before the optimizer: sharding replaces the parameters
        self._check_input()
        self.optimizer = self._optimizer()
        self.scheduler = build_scheduler(
            cfg, self.optimizer, self.loaders.steps_per_epoch, self._learning_rate(), warn=self.dist.main
        )
        if cfg.train.compile:
            self.net.compile()
        train_net = self.net
        if self.dist.enabled and not self.fsdp:
            ids = [self.device.index] if self.device.type == "cuda" else None
            train_net = DistributedDataParallel(self.net, device_ids=ids)
        s = cfg.sub
        self.step = masksub.Step(
            train_net,
            self.optimizer,
            self.criterion,
            main_weight=s.main_weight,
            sub_weight=s.sub_weight,
            temperature=s.temperature,
            accum_steps=cfg.train.accum_steps,
            clip_grad=cfg.optim.clip_grad,
            clip_mode=cfg.optim.clip_mode,
            amp=cfg.train.amp,
            memory_saving=s.memory_saving,
            skip_nonfinite=True,
            sync_every_backward=cfg.train.fsdp_sync_every_backward,
        )
        self.amp_dtype = self.step.amp_dtype
        # Per-rank streams for masks, dropout and mixup; rank 0's equals a single-process run.
        torch.manual_seed(cfg.train.seed + self.dist.rank)
        self.epoch = self.micro_in_epoch = self.global_step = 0
        self.best_top1, self.nonfinite_run, self.skipped = None, 0, 0
        self.epoch_seconds_before = 0.0  # of the current epoch, spent before the checkpoint this run resumed
        self.epoch_sums = self._zero_sums()  # loss, main loss, sub loss, micro-batches: on the device, no sync
        self.folder = self._run_folder()
        self.runlog = RunLog(self.folder, enabled=self.dist.main and not dry_run)
        self.trackers = Trackers()  # while fit runs: TensorBoard and W&B, as the run asks
        self.log(self._header(*sizes))
        if resume_state is not None:
            self._resume(resume_state, cfg.train.resume)
        elif self.dist.main and not dry_run:
            (self.folder / "config.yaml").write_text(dump(cfg, self.command))

    # ----------------------------------------------------------------- setup
    # The two per-epoch training losses reported besides the total (keys of the step's output).
    LOSS_KEYS = ("loss_main", "loss_sub")

    def _build(self, train_set, val_set) -> None:
        """Classification: the timm model, its sub branch, loaders, EMA and criterion."""
        cfg = self.cfg
        num_classes = getattr(train_set, "num_classes", None) or 1000
        model = build_model(cfg, num_classes, self.log, initial_weights=not self.resuming).to(self.device)
        if cfg.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
        s = cfg.sub
        if s.kind == "none":
            self.net = model
        else:
            options = {"adapter": s.adapter} if s.kind == "mask" else {}
            try:
                self.net = masksub.wrap(
                    model, sub=s.kind, ratio=s.ratio, unit=s.unit, sub_bn_stats=s.bn_stats, **options
                )
            except ValueError as e:
                if s.adapter is None:
                    raise
                raise ConfigError(f"sub.adapter {s.adapter}: {e}") from None
        if cfg.train.linprobe:
            self._linear_probe_head(model)
        self.model = model  # the plain model: evaluation, EMA, export
        self.loaders = build_loaders(cfg, model, train_set, val_set, self.dist.rank, self.dist.world, self.device)
        self.ema = ModelEmaV3(model, decay=cfg.train.ema_decay) if cfg.train.ema else None
        self.criterion = build_criterion(cfg, self.loaders.mixup is not None)

    def _check_input(self) -> None:
        """Two blank images through the main and the sub branch, before anything is written.

        A model that cannot take the configured images (size, channels, mask unit) fails here with
        the keys to change, not after the run folder exists. Evaluation mode, no gradients and a
        forked random stream: no state changes. Under FSDP it also gathers every sharded group once,
        which torch's gradient accumulation needs of a group that the main pass leaves out (the sub
        branch's mask token; see ``sharding.units``).
        """
        d = self.cfg.data
        x = torch.zeros(2, d.in_chans, d.img_size, d.img_size, device=self.device)
        training = self.net.training
        self.net.eval()
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                self.net(x)
                if isinstance(self.net, masksub.SubBranchModel):
                    self.net(x, sub=True)
        except (ValueError, RuntimeError, AssertionError) as e:
            raise ConfigError(
                f"{self.cfg.model.name} cannot take {d.in_chans} x {d.img_size} x {d.img_size} images "
                f"(data.in_chans, data.img_size; sub.kind={self.cfg.sub.kind}, sub.unit={self.cfg.sub.unit}): {e}"
            ) from None
        finally:
            self.net.train(training)
            if self.fsdp:
                sharding.reshard(self.net)

    def _shard(self) -> None:
        """FSDP: every block of the model (and of a pretraining decoder), then the whole; the EMA copy alike."""
        cfg = self.cfg
        dtype = torch.bfloat16 if cfg.train.amp == "bf16" else None
        sharding.shard(self.net, sharding.units(self.model, self.net), cfg.train.fsdp, dtype, self.device.type)
        if self.ema is not None:
            ema = self.ema.module
            sharding.shard(ema, sharding.units(ema), cfg.train.fsdp, dtype, self.device.type)

    @staticmethod
    def _linear_probe_head(model: torch.nn.Module) -> None:
        """Freeze everything; the head becomes BatchNorm without affine + the linear classifier."""
        if not isinstance(getattr(model, "head", None), torch.nn.Linear):
            raise ConfigError(f"train.linprobe needs a model with a linear .head, {type(model).__name__} has none")
        for p in model.parameters():
            p.requires_grad_(False)
        head = model.head
        head.requires_grad_(True)
        model.head = torch.nn.Sequential(torch.nn.BatchNorm1d(head.in_features, affine=False), head).to(
            head.weight.device
        )

    def _learning_rate(self) -> float:
        cfg, o = self.cfg, self.cfg.optim
        global_batch = cfg.data.batch_size * cfg.train.accum_steps * self.dist.world
        return o.lr if o.lr is not None else o.base_lr * global_batch / 256

    def _zero_sums(self) -> torch.Tensor:
        return torch.zeros(4, dtype=torch.float64, device=self.device)

    def _optimizer(self):
        o = self.cfg.optim
        lr = self._learning_rate()
        extra = {k: v for k, v in (("betas", o.betas), ("eps", o.eps)) if v is not None}
        opt = create_optimizer_v2(  # timm passes momentum to the optimizers that take it (the config checks)
            self.model,
            opt=o.name,
            lr=lr,
            weight_decay=o.weight_decay,
            momentum=o.momentum,
            layer_decay=o.layer_decay,
            **extra,
        )
        own = {id(p) for p in self.model.parameters()}
        rest = [p for p in self.net.parameters() if p.requires_grad and id(p) not in own]
        # Parameters outside the timm model (a mask token, a pretraining decoder): 1-D ones without decay.
        for group in ([p for p in rest if p.ndim <= 1], [p for p in rest if p.ndim > 1]):
            if group:
                opt.add_param_group({"params": group, "weight_decay": 0.0 if group[0].ndim <= 1 else o.weight_decay})
        return opt

    def _method_name(self) -> str:
        """The method part of a run folder's default name."""
        return self.cfg.sub.kind

    def _model_part(self) -> list[str]:
        """The model in a run folder's default name, where it is not the recipe's own (--model.name resnet18)."""
        try:
            recipe_model = load_config(self.cfg.recipe, check=False).model.name
        except ConfigError:  # a recipe given as a path outside the bundled ones: its model is not known here
            return []
        name = self.cfg.model.name
        return [] if name == recipe_model else [re.sub(r"[^\w.+-]+", "_", name)]

    def _run_folder(self) -> Path:
        cfg = self.cfg
        if cfg.train.resume:
            path = Path(cfg.train.resume)
            return path if path.is_dir() else path.parent
        name = cfg.train.name or "-".join([cfg.recipe, *self._model_part(), self._method_name(), f"s{cfg.train.seed}"])
        folder = Path(cfg.train.output) / name
        if self.dist.main and not self.dry_run:
            try:
                folder = make_run_folder(Path(cfg.train.output), name)
            except OSError as e:
                raise ConfigError(
                    f"cannot make the run folder {folder}: {e.strerror}; set train.output to a folder you can write to"
                ) from None
        obj = [str(folder)]
        if self.dist.enabled:
            torch.distributed.broadcast_object_list(obj, src=0)
        return Path(obj[0])

    # ----------------------------------------------------------- checkpoints
    def _state(self) -> dict:
        rngs = [checkpoint.rng_state()]
        if self.dist.enabled:
            rngs = [None] * self.dist.world
            torch.distributed.all_gather_object(rngs, checkpoint.rng_state())
        return {
            "model": self._full_state(self.net),
            "optimizer": self._optimizer_state(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.step.scaler.state_dict() if self.step.scaler is not None else None,
            "ema": self._full_state(self.ema) if self.ema is not None else None,
            "rng": rngs,
            "position": {
                "epoch": self.epoch,
                "micro_in_epoch": self.micro_in_epoch,
                "global_step": self.global_step,
                "batches_per_epoch": self.loaders.batches_per_epoch,
            },
            "epoch_sums": self.epoch_sums.cpu(),
            "epoch_seconds": self._epoch_seconds(),
            "best_top1": self.best_top1,
            "nonfinite_run": self.nonfinite_run,
            "skipped": self.skipped,
            "config": dataclasses.asdict(self.cfg),
            "classes": self.classes,
            "command": self.command,
        }

    def _full_state(self, module: torch.nn.Module) -> dict:
        """``module.state_dict()``; under FSDP gathered into whole tensors on process 0 (every process calls)."""
        return sharding.full_model_state(module) if self.fsdp else module.state_dict()

    def _optimizer_state(self) -> dict:
        """Keyed by parameter name under FSDP (whole tensors, on process 0), by position otherwise."""
        return sharding.full_optimizer_state(self.net, self.optimizer) if self.fsdp else self.optimizer.state_dict()

    def _load_state(self, module: torch.nn.Module, state: dict) -> None:
        if self.fsdp:
            sharding.load_model_state(module, state)
        else:
            module.load_state_dict(state)

    def save(self, name: str = "last.pt") -> None:
        state = self._state()  # every rank joins the RNG gather
        if self.dist.main:
            try:
                checkpoint.save_atomic(state, self.folder / name)
            except checkpoint.CheckpointWriteError as e:
                last = self.folder / "last.pt"
                then = f"continue from it with {self.resume_command}" if last.is_file() else "start the run again"
                e.args = (f"{e.args[0]}; make room, then {then}",)
                raise

    def _header(self, train_images: int, eval_images: int, parameters: int, trained: int) -> str:
        """What this run trains, on what, how: the run's first lines."""
        cfg, d, world, accum = self.cfg, self.cfg.data, self.dist.world, self.cfg.train.accum_steps
        parts = (
            [f"{d.batch_size} per process"]
            + [f"{world} processes"] * (world > 1)
            + [f"{accum} accumulated"] * (accum > 1)
        )
        batch = f"batch {d.batch_size * world * accum}" + (f" ({' x '.join(parts)})" if len(parts) > 1 else "")
        epochs = counted(cfg.sched.epochs, "epoch")
        left = self.loaders.batches_per_epoch % accum
        short = f" (the last of {left} batch{'es' * (left > 1)})" if left else ""
        where = "dry run: nothing is written" if self.dry_run else f"run folder {self.folder}"
        return (
            f"{where}\n"
            f"model {cfg.model.name}{self._model_kwargs()}: {parameters / 1e6:.2f}M parameters"
            f"{f' ({trained:,} trained)' if trained != parameters else ''}{self._method()}\n"
            f"data {d.name}: {train_images:,} training images{self._evaluated(eval_images)}; {batch}, "
            f"{counted(self.loaders.steps_per_epoch, 'step')} per epoch{short}, {epochs}; {cfg.optim.name} lr "
            f"{self._learning_rate():.2e}, {cfg.sched.name} with {cfg.sched.warmup_epochs:g} warm-up "
            f"epoch{'s' * (cfg.sched.warmup_epochs != 1)}"
        )

    def _model_kwargs(self) -> str:
        """The arguments the model was built with (a recipe's, kept when ``--model.name`` changes the model)."""
        kwargs = self.cfg.model.kwargs
        return f" ({', '.join(f'{k}={v}' for k, v in sorted(kwargs.items()))})" if kwargs else ""

    def _method(self) -> str:
        if not isinstance(self.net, masksub.SubBranchModel):
            return "; no sub branch"
        kind, ratio = self.cfg.sub.kind, self.net.ratio
        if kind == "mask":
            branch = self.net.branch
            return f"; sub branch mask, ratio {ratio} of the {branch.masked_unit()} ({branch.name} adapter)"
        return f"; sub branch {kind}, rate {ratio}"

    def _evaluated(self, images: int) -> str:
        every = self.cfg.train.eval_every
        return f", {images:,} evaluated every {'epoch' if every == 1 else f'{every} epochs'}"

    @property
    def resume_command(self) -> str:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", self.dist.world))
        return resume_command(self.command, self.folder, self.dist.world, local)

    def _resume(self, state: dict, path: str) -> None:
        resume.check_position(state, self.dist.world, self.loaders.batches_per_epoch, path)
        try:
            self._load_state(self.net, state["model"])
        except RuntimeError as e:
            raise ConfigError(f"cannot resume from {path}: the model does not match ({str(e)[:300]})") from None
        if self.fsdp:
            sharding.load_optimizer_state(self.net, self.optimizer, state["optimizer"])
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.step.scaler is not None and state["scaler"]:
            self.step.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state["ema"]:
            self._load_state(self.ema, state["ema"])
        pos, weights = state["position"], resume.weights_file(path)
        checkpoint.set_rng_state(state["rng"][self.dist.rank])
        self.epoch, self.micro_in_epoch, self.global_step = pos["epoch"], pos["micro_in_epoch"], pos["global_step"]
        self.epoch_sums = state["epoch_sums"].to(self.device, copy=True)
        _own_memory(self.optimizer)
        self.epoch_seconds_before = state.get("epoch_seconds", 0.0)
        self.best_top1, self.nonfinite_run, self.skipped = state["best_top1"], state["nonfinite_run"], state["skipped"]
        if self.epoch >= self.cfg.sched.epochs:
            self.log(
                f"{path} finished its {counted(self.cfg.sched.epochs, 'epoch')} ({counted(self.global_step, 'step')}): "
                "nothing is left to train; to train longer, start a new run from its weights with "
                f"--model.checkpoint {weights}"
            )
        else:
            self.log(f"resumed {path} at epoch {self.epoch + 1}, step {self.global_step}")

    # -------------------------------------------------------------- training
    # Under torchrun, processes agree on an interrupt every this many optimizer steps (one tiny all-reduce).
    stop_poll = 20

    def fit(self) -> dict:
        """Train to the end; on Ctrl-C or SIGTERM save at the next optimizer step and raise ``Interrupted``."""
        if self.dry_run:
            raise RuntimeError("a trainer made with dry_run has no run folder to train into: build one without it")
        cfg = self.cfg
        # The barriers sit on the paths every process takes together. After any other error a barrier would
        # wait beside a process still in a step's all-reduce until the backend's timeout; the error ends this
        # process instead, and torchrun then the others.
        with (
            FolderLock(self.folder, enabled=self.dist.main) as lock,
            StopRequest() as self._stop,
            self._trackers() as self.trackers,
        ):
            if self.resuming:  # under the lock: a process still training here may have appended since
                self.runlog.truncate_after(self.epoch)  # epochs after the checkpoint run again
            if lock.leftovers:
                size = sum(n for _, n in lock.leftovers) / 2**20
                names = ", ".join(name for name, _ in lock.leftovers[:3])
                self.log(f"removed {len(lock.leftovers)} unfinished write(s) of a killed run ({size:.1f} MiB): {names}")
            while self.epoch < cfg.sched.epochs:
                stopped = self._train_epoch()  # None, "max_steps" or a signal number
                if stopped is None:
                    self._end_epoch()
                    continue
                self.save()
                if stopped == "max_steps":
                    self.log(
                        f"stopped after {counted(self.global_step, 'step')} (train.max_steps); "
                        f"continue with {self.resume_command}"
                    )
                    break
                distributed.barrier()  # the processes stopped at the same step: none ends before process 0 saved
                raise Interrupted(
                    stopped,
                    f"interrupted by {signal.Signals(stopped).name} in epoch {self.epoch + 1}, step "
                    f"{self.global_step}: saved {self.folder / 'last.pt'}; continue exactly with "
                    f"{self.resume_command}",
                )
        distributed.barrier()
        return {"folder": self.folder, "records": self.runlog.records() if self.dist.main else []}

    def _trackers(self) -> Trackers:
        """Process 0's TensorBoard and W&B loggers, as the run asks (``train.tensorboard``, ``train.wandb``)."""
        main, step = self.dist.main, self.global_step
        return open_trackers(self.cfg, self.folder, main=main, resuming=self.resuming, step=step, job_type=self.command)

    def _step_on(self, x: torch.Tensor, y: torch.Tensor, last: bool) -> dict:
        """One micro-batch through the step: moved to the device, in the run's memory format, mixed as the run
        mixes."""
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        if self.cfg.train.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.loaders.mixup is not None:
            x, y = self.loaders.mixup(x, y)
        return self.step(x, y, last=last)

    def rehearse(self, steps: int = 3) -> str:
        """Time ``steps`` optimizer steps after one that warms up (compilation, allocation, the loader's workers), on
        the run's data, model and settings, and say what the run would take at that speed. The weights change: a
        trainer made with ``dry_run`` is for this alone."""
        loaders, cuda = self.loaders, self.device.type == "cuda"
        loaders.sampler.set_epoch(0)
        self.net.train()
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        times, last = [], None
        with worker_batches(loaders.train) as batches:
            for i, (x, y) in enumerate(batches):
                if not self._step_on(x, y, last=i + 1 == loaders.batches_per_epoch)["updated"]:
                    continue
                if cuda:
                    torch.cuda.synchronize(self.device)
                now = time.perf_counter()
                if last is not None:
                    times.append(now - last)
                last = now
                if len(times) == steps or i + 1 == loaders.batches_per_epoch:
                    break
        if not times:
            raise ConfigError("an epoch of one optimizer step leaves none to time after the warm-up: use more images")
        mean = sum(times) / len(times)
        images = self.cfg.data.batch_size * self.cfg.train.accum_steps * self.dist.world / mean
        epoch, epochs = mean * loaders.steps_per_epoch, self.cfg.sched.epochs
        if cuda:
            memory = f"{torch.cuda.max_memory_allocated(self.device) / 2**30:.2f} GiB of CUDA memory at most"
        else:  # the process's peak resident memory (kilobytes on Linux; no such module on Windows)
            import resource

            memory = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB resident at most"
        return (
            f"dry run: {counted(len(times), 'optimizer step')} after one to warm up, {mean:.3f} s each (fastest "
            f"{min(times):.3f} s), {images:,.0f} images/s; an epoch of {counted(loaders.steps_per_epoch, 'step')} "
            f"would take {_duration(epoch)}, {counted(epochs, 'epoch')} {_duration(epoch * epochs)} without "
            f"evaluation; {memory}"
        )

    def _train_epoch(self) -> str | int | None:
        cfg, loaders = self.cfg, self.loaders
        per_epoch = loaders.batches_per_epoch
        loaders.sampler.set_epoch(self.epoch, start=self.micro_in_epoch * cfg.data.batch_size)
        self.net.train()
        start, seen = time.perf_counter(), 0
        self._epoch_start = start
        bar = tqdm(
            total=per_epoch,
            initial=self.micro_in_epoch,
            disable=not self.dist.main,
            leave=False,
            desc=f"epoch {self.epoch + 1}/{cfg.sched.epochs}",
            dynamic_ncols=True,
            **_progress_interval(),
        )
        with bar, worker_batches(loaders.train) as batches:  # the bar closes however the epoch ends
            for x, y in batches:
                if self.micro_in_epoch >= per_epoch:
                    break
                # the epoch's last batch steps the optimizer, with a shorter window when accum_steps does not
                # divide the batches (the mean loss of its micro-batches, as a full window)
                out = self._step_on(x, y, last=self.micro_in_epoch + 1 == per_epoch)
                self.micro_in_epoch += 1
                seen += len(x)
                one = torch.ones((), device=self.device)
                sums = [out["loss"]] + [out.get(k, one * 0) for k in self.LOSS_KEYS] + [one]
                sums = torch.stack([v.double() for v in sums])
                # a non-finite loss (its step skipped, and counted) stays out of the epoch's mean: no sync
                self.epoch_sums += torch.where(torch.isfinite(sums).all(), sums, 0.0)
                bar.update(1)
                if not out["updated"]:
                    continue
                self.global_step += 1
                self._after_update(out, bar, seen / (time.perf_counter() - start))
                if cfg.train.checkpoint_every and self.global_step % cfg.train.checkpoint_every == 0:
                    self.save()
                if cfg.train.max_steps and self.global_step >= cfg.train.max_steps:
                    return "max_steps"
                signum = self._stop.agreed(self.device, poll=self.global_step % self.stop_poll == 0)
                if signum:
                    return signum
        self.epoch_time = self._epoch_seconds()
        return None

    def _epoch_seconds(self) -> float:
        """Training time of the current epoch so far, the part before a resume included."""
        if self.micro_in_epoch == 0:
            return 0.0
        return self.epoch_seconds_before + time.perf_counter() - getattr(self, "_epoch_start", time.perf_counter())

    def _after_update(self, out: dict, bar, images_per_s: float) -> None:
        if out.get("skipped"):
            self.nonfinite_run += 1
            self.skipped += 1
            warnings.warn(
                f"non-finite loss or gradients at step {self.global_step}: step skipped "
                f"({self.nonfinite_run} in a row)",
                stacklevel=2,
            )
            if self.nonfinite_run >= self.cfg.train.max_nonfinite:
                raise NonFiniteLossError(
                    f"{self.nonfinite_run} non-finite losses or gradients in a row (train.max_nonfinite); stopping. "
                    f"The last good checkpoint is {self.folder / 'last.pt'}; lower optim.lr, enable optim.clip_grad "
                    "or use bf16"
                )
        else:
            self.nonfinite_run = 0
            if self.ema is not None:
                self.ema.update(self.model, step=self.global_step)
        self.scheduler.step_update(self.global_step)
        if self.global_step % 20 == 0:  # the only host syncs of the loop
            loss, lr = out["loss"].item(), self.optimizer.param_groups[0]["lr"]
            bar.set_postfix(
                loss=f"{loss:.3f}",
                lr=f"{lr:.2e}",
                img_s=f"{images_per_s * self.dist.world:.0f}",
                refresh=False,  # shown at the bar's next refresh: a log file gets no line per call
            )
            if self.trackers.open:
                parts = {k: out[k].item() for k in self.LOSS_KEYS if torch.is_tensor(out.get(k))}
                values = {"loss": loss, **parts, "lr": lr, "images_per_s": images_per_s * self.dist.world}
                self.trackers.add("train", values, self.global_step)

    def _evaluate(self) -> dict:
        cl = self.cfg.train.channels_last
        # self.net: the plain model, or the wrapper whose main branch is it (compiled with train.compile)
        d = self.cfg.data
        blank = torch.zeros(1, d.in_chans, d.img_size, d.img_size, device=self.device) if self.fsdp else None
        record = evaluate(self.net, self.loaders.val, self.device, self.amp_dtype, cl, blank)
        if self.ema is not None:
            ema = evaluate(self.ema.module, self.loaders.val, self.device, self.amp_dtype, cl, blank)
            record.update(ema_top1=ema["top1"], ema_top5=ema["top5"])
        if self.fsdp:
            sharding.reshard(self.net)
            if self.ema is not None:
                sharding.reshard(self.ema.module)
        return record

    def _end_epoch(self) -> None:
        cfg = self.cfg
        self.epoch += 1
        sums = distributed.sum_tensor(self.epoch_sums).cpu()
        n = sums[3].item()  # micro-batches with finite losses
        mean = lambda i: sums[i].item() / n if n else None  # noqa: E731
        record = {
            "epoch": self.epoch,
            "step": self.global_step,
            "train_loss": mean(0),
            **{f"train_{k}": mean(i + 1) for i, k in enumerate(self.LOSS_KEYS)},
            "lr": self.optimizer.param_groups[0]["lr"],
            "epoch_time_s": round(getattr(self, "epoch_time", 0.0), 3),
            "nonfinite_skipped": self.skipped,
        }
        if not self.step.has_sub and "train_loss_sub" in record:  # a step without a second pass (a peer's has one)
            record["train_loss_sub"] = None
        self.skipped = 0
        if self.epoch % cfg.train.eval_every == 0 or self.epoch == cfg.sched.epochs:
            record.update(self._evaluate())
        accuracy = f", test {accuracy_text(record)}" if "top1" in record else ""
        loss = "n/a (no finite loss)" if record["train_loss"] is None else f"{record['train_loss']:.4f}"
        self.log(f"epoch {self.epoch}/{cfg.sched.epochs}: loss {loss}{accuracy}")
        self.micro_in_epoch, self.epoch_sums, self.epoch_seconds_before = 0, self._zero_sums(), 0.0
        self.runlog.append(record)
        self.trackers.add("epoch", record, self.global_step)
        best = record.get("top1") is not None and (self.best_top1 is None or record["top1"] > self.best_top1)
        if best:
            self.best_top1 = record["top1"]
        self.save()
        if best:  # best.pt is last.pt now: a second name of its file (last.pt is later replaced, not rewritten)
            linked = self.dist.main and checkpoint.link_atomic(self.folder / "last.pt", self.folder / "best.pt")
            if distributed.max_int(int(self.dist.main and not linked), self.device):  # no hard links: written
                self.save("best.pt")
