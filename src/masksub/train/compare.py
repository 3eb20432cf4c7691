"""``masksub compare``: one recipe trained plain and with each sub branch, over several seeds."""

from __future__ import annotations

import os
import re
import statistics
from pathlib import Path

from . import checkpoint
from .config import Config, ConfigError, flat_config, from_dict, load_config
from .interrupt import Interrupted
from .runlog import RunLog, plot_curves, summarize, write_summary
from .trainer import Trainer


def _mean_spread(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _earlier_run(cfg: Config, log) -> dict | None:
    """A run of the same configuration found in the output folder, from a compare that stopped.

    Finished: its records, without training again. Stopped with a checkpoint: ``cfg`` is set to resume
    it (None is returned). A folder of other settings is left alone; the run starts in a folder of its own.
    """
    output, name = Path(cfg.train.output), cfg.train.name
    planned = {k: v for k, v in flat_config(cfg).items() if k != "train.resume"}
    for candidate in sorted(output.glob(f"{name}*"), key=lambda p: p.stat().st_mtime, reverse=True):
        if not (re.fullmatch(rf"{re.escape(name)}(-\d+)?", candidate.name) and (candidate / "last.pt").is_file()):
            continue
        state = checkpoint.load(candidate / "last.pt")
        saved = {k: v for k, v in flat_config(from_dict(state["config"])).items() if k != "train.resume"}
        if saved != planned:
            diff = ", ".join(f"{k} {saved.get(k)!r}, now {v!r}" for k, v in planned.items() if saved.get(k) != v)
            log(f"{candidate} was trained with other settings ({diff[:200]}): not continued")
            continue
        pos, max_steps = state["position"], cfg.train.max_steps
        if pos["epoch"] >= cfg.sched.epochs or (max_steps is not None and pos["global_step"] >= max_steps):
            log(f"{candidate} is finished: its results are used")
            return {"folder": candidate, "records": RunLog(candidate).records()}
        cfg.train.resume = str(candidate)
        return None
    return None


def compare(recipe: str | None, kinds: list[str], seeds: list[int], overrides: dict, output: str, log=print) -> Path:
    """Train every (kind, seed); write compare.csv (one row per run), compare.md and curves.png.

    Every run's configuration is checked before the first one trains. Run again with the same
    arguments after an interruption, it keeps the finished runs and resumes the one that stopped.
    """
    if not kinds or not seeds:
        raise ConfigError(f"compare needs at least one sub branch and one seed, got subs {kinds} and seeds {seeds}")
    for what, values in (("sub branch", kinds), ("seed", seeds)):
        if twice := sorted({v for v in values if values.count(v) > 1}, key=str):
            raise ConfigError(f"compare: {what} {', '.join(map(str, twice))} given twice; list each once")
    folder = Path(output)
    runs = {
        (kind, seed): load_config(
            recipe,
            {
                **overrides,
                "sub.kind": kind,
                "train.seed": seed,
                "train.output": str(folder / "runs"),
                "train.name": f"{kind}-s{seed}",
            },
        )
        for kind in kinds
        for seed in seeds
    }
    main = os.environ.get("RANK", "0") == "0"  # under torchrun, process 0 speaks and writes for all
    if not main:
        log = lambda *args, **kwargs: None  # noqa: E731
    folder.mkdir(parents=True, exist_ok=True)
    rows, curves = [], {}
    for (kind, seed), cfg in runs.items():
        log(f"== {cfg.recipe}: sub={kind} seed={seed}")
        result = _earlier_run(cfg, log)
        if result is None:
            try:
                result = Trainer(cfg, log=log).fit()
            except Interrupted as e:
                raise Interrupted(
                    e.signum,
                    f"{e}; or run the same masksub compare command again: it keeps the finished "
                    "runs and continues this one",
                ) from None
        rows.append(summarize(result["records"], recipe=cfg.recipe, sub=kind, ratio=cfg.sub.ratio, seed=seed))
        curves[f"{kind} s{seed}"] = result["records"]
    if not main:
        return folder
    write_summary(folder / "compare.csv", rows)
    plot_curves(curves, folder / "curves.png")
    lines = [
        f"# {rows[0]['recipe']}: plain vs sub branches, seeds {', '.join(map(str, seeds))}",
        "",
        "| sub | ratio | runs | final top-1 (mean ± sd) | best top-1 (mean ± sd) | train time s (mean) |",
        "|---|---|---|---|---|---|",
    ]
    for kind in kinds:
        mine = [r for r in rows if r["sub"] == kind]
        final, final_sd = _mean_spread([r["final_top1"] for r in mine])
        best, best_sd = _mean_spread([r["best_top1"] for r in mine])
        secs, _ = _mean_spread([r["train_time_s"] for r in mine])
        fmt = lambda m, sd: "n/a" if m is None else f"{m:.2f} ± {sd:.2f}"  # noqa: E731
        ratio = "-" if kind == "none" else mine[0]["ratio"]
        lines.append(f"| {kind} | {ratio} | {len(mine)} | {fmt(final, final_sd)} | {fmt(best, best_sd)} | {secs:.1f} |")
    (folder / "compare.md").write_text("\n".join(lines) + "\n")
    log("\n".join(lines))
    return folder
