"""``masksub compare``: one recipe trained plain and with each sub branch, over several seeds."""

from __future__ import annotations

import statistics
from pathlib import Path

from .config import ConfigError, load_config
from .runlog import plot_curves, summarize, write_summary
from .trainer import Trainer


def _mean_spread(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def compare(recipe: str | None, kinds: list[str], seeds: list[int], overrides: dict, output: str, log=print) -> Path:
    """Train every (kind, seed); write compare.csv (one row per run), compare.md and curves.png.

    Every run's configuration is checked before the first one trains.
    """
    if not kinds or not seeds:
        raise ConfigError(f"compare needs at least one sub branch and one seed, got subs {kinds} and seeds {seeds}")
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
    folder.mkdir(parents=True, exist_ok=True)
    rows, curves = [], {}
    for (kind, seed), cfg in runs.items():
        log(f"== {cfg.recipe}: sub={kind} seed={seed}")
        result = Trainer(cfg, log=log).fit()
        rows.append(summarize(result["records"], recipe=cfg.recipe, sub=kind, ratio=cfg.sub.ratio, seed=seed))
        curves[f"{kind} s{seed}"] = result["records"]
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
