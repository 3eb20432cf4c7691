"""``masksub compare``: one recipe trained plain and with each sub branch, over several seeds."""

from __future__ import annotations

import os
import re
import statistics
from pathlib import Path

from . import checkpoint
from .checks import branch_keys_unused
from .config import RUN_NAMES, Config, ConfigError, flat_config, from_dict, load_config
from .interrupt import Interrupted
from .runlog import RunLog, plot_curves, replace_text, summarize, write_summary
from .trainer import Trainer


def _mean_spread(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation; no spread (None) from one value."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _cell(mean: float | None, sd: float | None) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.2f}" if sd is None else f"{mean:.2f} ± {sd:.2f}"


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


SUBS = ("none", "mask", "dropout", "droppath")  # what --subs takes: plain, then each sub branch

# Keys compare sets for each run, and what to use instead: an override of them would be silently replaced, or,
# for train.resume, would send every run into one earlier run's folder.
OWN_KEYS = {
    "sub.kind": "list the sub branches in --subs",
    "train.seed": "list the seeds in --seeds",
    "train.output": "use --output",
    "train.name": "use --output",
    "train.resume": "run the same masksub compare command again: it resumes the run that stopped",
}


def _overrides_for(kind: str, kinds: list[str], overrides: dict) -> dict:
    """The overrides of the ``kind`` runs: ``sub.*`` keys that this kind does not read but another listed kind
    does (``--sub.ratio`` for the plain runs) are left out of them; keys no listed kind reads stay, and are
    refused."""
    sub = [key.removeprefix("sub.") for key in overrides if key.startswith("sub.")]
    skip = {k for k in branch_keys_unused(kind, sub) if any(not branch_keys_unused(other, [k]) for other in kinds)}
    return {key: value for key, value in overrides.items() if not (key.startswith("sub.") and key[4:] in skip)}


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
    if unknown := [k for k in kinds if k not in SUBS]:
        raise ConfigError(f"--subs: {', '.join(map(repr, unknown))} is not a sub branch; choose from {','.join(SUBS)}")
    if given := [key for key in OWN_KEYS if key in overrides]:
        instead = "; ".join(f"for {key}, {OWN_KEYS[key]}" for key in given)
        where = "each run is <output>/runs/<sub>-s<seed>"
        raise ConfigError(f"compare sets {', '.join(given)} itself ({where}): {instead}")
    folder = Path(output)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--output {folder} is a file; name a folder (it is made if missing)")
    runs = {
        (kind, seed): load_config(
            recipe,
            {
                **_overrides_for(kind, kinds, overrides),
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
    spread = "mean ± sd" if len(seeds) > 1 else "one seed: no spread"
    lines = [
        f"# {rows[0]['recipe']}: {' vs '.join(RUN_NAMES.get(k, k) for k in kinds)}, seed{'s' * (len(seeds) > 1)} "
        f"{', '.join(map(str, seeds))}",
        "",
        f"| sub | ratio | runs | final top-1 ({spread}) | best top-1 ({spread}) | train time s (mean) |",
        "|---|---|---|---|---|---|",
    ]
    for kind in kinds:
        mine = [r for r in rows if r["sub"] == kind]
        final, best = (_cell(*_mean_spread([r[key] for r in mine])) for key in ("final_top1", "best_top1"))
        secs, _ = _mean_spread([r["train_time_s"] for r in mine])
        ratio = "-" if kind == "none" else mine[0]["ratio"]
        lines.append(f"| {kind} | {ratio} | {len(mine)} | {final} | {best} | {secs:.1f} |")
    replace_text(folder / "compare.md", "\n".join(lines) + "\n")
    log("\n".join(lines))
    return folder
