"""Fashion-MNIST accuracy: plain vs MaskSub vs DropSub vs PathSub over seeds, at equal epochs and equal time.

    python benchmarks/accuracy.py --scale gpu --jobs 8                  # ViT 6x192 patch 4, 25 epochs, all 60k images
    python benchmarks/accuracy.py --scale gpu --jobs 8 --model resnet   # ResNet-18, 25 epochs, all 60k images
    python benchmarks/accuracy.py --scale cpu                           # ViT 4x96, 8 epochs on 6,000 images
    python benchmarks/accuracy.py --scale cpu --model resnet            # half-width ResNet-18, the same schedule
    python benchmarks/accuracy.py --scale cpu --model swin --subs none,mask,mask_drop  # a 2-stage Swin: MaskSub
                                                # with the mask token (the default) and with adapter swin_drop
    python benchmarks/accuracy.py --scale cpu_long --subs none,mask     # the cpu scale for 30 epochs, not 8
    python benchmarks/accuracy.py --scale tiny                          # seconds; the test suite
    python benchmarks/accuracy.py --scale cpu --ratios-only             # only each sub branch's step cost
    python benchmarks/accuracy.py --scale cpu --subs none,rdrop,cosub --tag peers  # the peers (peers.py): R-Drop,
                                                # cosub; into results/accuracy_cpu_peers.*

Every run is `masksub train` on the same recipe, seeds and schedule; only the sub branch differs.
A plain run is also given MaskSub's compute: its epochs scaled by the ratio of MaskSub to plain step
time, timed alone before the runs (as is every sub branch's step cost, a column of the table); the
table shows accuracy at equal epochs and at equal compute (with two MaskSub variants, `mask` and
`mask_drop`, at the compute of each). Runs go as
`--jobs` concurrent processes (a GPU is mostly idle with one small run). Writes
results/accuracy_<scale>[_<model>][_<tag>].{json,md,png}.

The peers `rdrop` and `cosub` (see peers.py) run the model with its own dropout (R-Drop) or drop path (cosub) at
the rate in RATIOS in both passes, through `peers.py`, on the same trainer, data, schedule and seeds.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import peers
import torch
from common import alternating_step_times, hardware, run_cli

from masksub.train.runlog import plot_curves

VIT = {"img_size": 28, "patch_size": 4}
# Swin at 28 px: patch 2 and 7-token windows, so the first stage (14x14 tokens) has 4 windows, shifted in
# every second block, and the second stage (7x7) one window.
SWIN = {"img_size": 28, "patch_size": 2, "window_size": 7}
# Per scale: the schedule, and per model kind the timm model and its create_model arguments.
SCALES = {
    "gpu": dict(  # the data set on the GPU, batches augmented there
        vit=("vit_tiny_patch16_224", {**VIT, "embed_dim": 192, "depth": 6, "num_heads": 3}),
        resnet=("resnet18", {}),
        swin=("swin_tiny_patch4_window7_224", {**SWIN, "embed_dim": 96, "depths": [2, 6], "num_heads": [3, 6]}),
        epochs=25,
        images=None,
        aug="simple",
        on_device=True,
    ),
    "cpu": dict(
        vit=("vit_tiny_patch16_224", {**VIT, "embed_dim": 96, "depth": 4, "num_heads": 3}),
        resnet=("resnet18", {"channels": [32, 64, 128, 256], "stem_width": 32}),
        swin=("swin_tiny_patch4_window7_224", {**SWIN, "embed_dim": 48, "depths": [2, 2], "num_heads": [3, 6]}),
        epochs=8,
        images=6000,
        aug="simple",
    ),
    "cpu_long": dict(  # the cpu scale for 30 epochs: 1,380 steps instead of 368
        vit=("vit_tiny_patch16_224", {**VIT, "embed_dim": 96, "depth": 4, "num_heads": 3}),
        resnet=("resnet18", {"channels": [32, 64, 128, 256], "stem_width": 32}),
        swin=("swin_tiny_patch4_window7_224", {**SWIN, "embed_dim": 48, "depths": [2, 2], "num_heads": [3, 6]}),
        epochs=30,
        images=6000,
        aug="simple",
    ),
    "tiny": dict(
        vit=("vit_tiny_patch16_224", {**VIT, "patch_size": 7, "embed_dim": 32, "depth": 1, "num_heads": 2}),
        resnet=("resnet18", {"layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64], "stem_width": 8}),
        swin=("swin_tiny_patch4_window7_224", {**SWIN, "embed_dim": 16, "depths": [1, 1], "num_heads": [1, 2]}),
        epochs=1,
        images=256,
        aug="none",
    ),
}
UNITS = {"vit": 32, "resnet": 4, "swin": 4}  # MaskSub block in pixels: the ViT drops tokens (any unit of whole
# patches works; 32 is the default), the ResNet zeroes 4x4-pixel blocks, a 7x7 grid as 32-pixel blocks give at
# 224 px; the Swin's unit is its last stage's token (2-pixel patches merged once), a 7x7 grid again
# Sub-branch strength per kind: MaskSub's paper default; DropSub / PathSub at 0.2 (our choice: the
# paper gives no Fashion-MNIST value; 0.5 drop-path in every block would remove most of a 4-block net).
# The peers' drop rates are the model's own, in both passes (peers.DROP_ARGS; peers.RATE and peers.ALPHA).
RATIOS = {"mask": 0.5, "mask_drop": 0.5, "dropout": 0.2, "droppath": 0.2, "rdrop": peers.RATE, "cosub": peers.RATE}
ALPHA = peers.ALPHA


def peer_kwargs(sub: str, model_name: str) -> dict:
    """The create_model arguments a peer's model adds (its drop rates); none for a sub branch of ours."""
    return peers.drop_kwargs(sub, model_name, RATIOS[sub]) if sub in peers.PEERS else {}


def peer_overrides(sub: str, model_name: str, model_kwargs: dict) -> dict:
    """The run keys of a peer's model: the trainer's own drop-rate keys, the other rates in ``model.kwargs``."""
    own = {"drop_rate": "model.drop_rate", "drop_path_rate": "model.drop_path_rate"}
    rates = peer_kwargs(sub, model_name)
    return {
        "model.kwargs": {**model_kwargs, **{k: v for k, v in rates.items() if k not in own}},
        **{own[k]: v for k, v in rates.items() if k in own},
    }


# Sub branches beyond a kind: (kind, adapter, the models it fits): MaskSub through the opt-in adapter
# that drops the masked blocks instead of giving them Swin's mask token.
SUBS = {"mask_drop": ("mask", "swin_drop", ("swin",))}


def sub_args(sub: str) -> tuple[str, str | None]:
    """``(kind, adapter)`` of one sub branch of the table."""
    kind, adapter, _ = SUBS.get(sub, (sub, None, ()))
    return kind, adapter


def step_time_ratios(name: str, kwargs: dict, unit: int, batch: int, device: str, kinds: list) -> dict:
    """Per sub-branch kind: median seconds per step over the plain step's, timed alone before any run."""
    import timm

    import masksub

    dev = torch.device("cuda" if device != "cpu" and torch.cuda.is_available() else "cpu")
    x, y = torch.randn(batch, 1, 28, 28, device=dev), torch.randint(0, 10, (batch,), device=dev)
    steps = {}
    for kind in ("none", *(k for k in kinds if k != "none")):
        net = timm.create_model(name, in_chans=1, num_classes=10, **kwargs, **peer_kwargs(kind, name)).to(dev)
        criterion = torch.nn.CrossEntropyLoss()
        if kind in peers.PEERS:
            loss = peers.peer_loss(kind, criterion, ALPHA)
            step = peers.peer_step(net, torch.optim.AdamW(net.parameters()), loss)
        else:
            if kind != "none":
                sub, adapter = sub_args(kind)
                net = masksub.wrap(net, sub, ratio=RATIOS[kind], unit=unit, adapter=adapter)
            step = masksub.Step(net, torch.optim.AdamW(net.parameters()), criterion)
        steps[kind] = functools.partial(step, x, y)
    times = alternating_step_times(steps, cuda=dev.type == "cuda")
    return {kind: t / times["none"] for kind, t in times.items() if kind != "none"}


def recorded_ratios(result: Path, model_name: str, model_kwargs: dict, hw: str, kinds: list) -> dict | None:
    """The step-cost ratios an earlier result recorded for every sub branch in ``kinds``, same model and hardware.

    A re-timed ratio moves by a few hundredths from call to call, which would change the equal-compute
    epochs and rerun every finished equal-compute run; adding seeds must not.
    """
    if not result.is_file():
        return None
    meta = json.loads(result.read_text())["meta"]
    ratios = meta.get("step_time_ratios_over_plain") or {}
    same = meta["model"]["name"] == model_name and meta["model"]["kwargs"] == model_kwargs and meta["hardware"] == hw
    needed = [k for k in kinds if k != "none"]
    return {k: ratios[k] for k in needed} if same and set(needed) <= set(ratios) else None


def write_ratios(stem: Path, ratios: dict, model_name: str, model_kwargs: dict, hw: str) -> None:
    """--ratios-only: each sub branch's step time over the plain step's, as JSON and a markdown table."""
    meta = {"command": "python " + " ".join(sys.argv), "torch": torch.__version__, "hardware": hw}
    lines = [
        f"Command: `{meta['command']}`; {hw}; torch {meta['torch']}; `{model_name}` {model_kwargs}, batch 128.",
        "",
        "| sub branch | sub ratio | step time / plain step time |",
        "|---|---|---|",
        *(f"| {kind} | {RATIOS[kind]} | {r:.3f} |" for kind, r in ratios.items()),
    ]
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "step_time_ratios_over_plain": ratios}, indent=1))
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scale", choices=tuple(SCALES), default="cpu")
    p.add_argument("--model", choices=tuple(UNITS), default="vit", help="the ViT or the small ResNet")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--subs", default="none,mask,dropout,droppath")
    p.add_argument("--jobs", type=int, default=1, help="concurrent training processes")
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--reuse",
        action="store_true",
        help="read finished runs in the output folder, don't rerun them, and keep the step-cost ratios the earlier "
        "result recorded on this hardware (so seeds added later get the same equal-compute schedule)",
    )
    p.add_argument("--ratios-only", action="store_true", help="only time each sub branch's step against the plain one")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--tag", default=None, help="a suffix of the result files' names (accuracy_cpu_<tag>.*)")
    args = p.parse_args()
    s = SCALES[args.scale]
    seeds = [int(x) for x in args.seeds.split(",")]
    kinds = args.subs.split(",")
    for sub in kinds:
        if sub != "none" and sub not in RATIOS:
            p.error(f"--subs: unknown sub branch '{sub}'; name some of none, {', '.join(RATIOS)}")
        if sub in SUBS and args.model not in SUBS[sub][2]:
            p.error(f"--subs: {sub} fits --model {' or '.join(SUBS[sub][2])} only, not {args.model}")
    stem = f"accuracy_{args.scale}" + ("" if args.model == "vit" else f"_{args.model}")
    stem += f"_{args.tag}" if args.tag else ""
    runs_dir = Path(args.out) / f"{stem}_runs"
    model_name, model_kwargs = s[args.model]
    unit = UNITS[args.model]
    base = {
        "model.name": model_name,
        "model.kwargs": model_kwargs,
        "sched.epochs": s["epochs"],
        "aug.preset": s["aug"],
        "data.workers": 1,
        "data.on_device": s.get("on_device", False),
        "train.device": args.device,
        "data.train_subset": s["images"],
    }
    threads = max(1, (torch.get_num_threads() // args.jobs)) if args.device != "cuda" else 1

    def job(sub, seed, epochs=None, label=None):
        if sub in peers.PEERS:  # the plain run's keys, its model with the peer's drop rates, through peers.py
            o = {**base, **peer_overrides(sub, model_name, model_kwargs), "train.seed": seed}
            program = (
                str(Path(__file__).with_name("peers.py")),
                sub,
                *(("--alpha", str(ALPHA)) if sub == "rdrop" else ()),
            )
            return run_cli("train", f"{sub}-s{seed}", o, runs_dir, reuse=args.reuse, program=program)
        kind, adapter = sub_args(sub)
        o = {**base, "sub.kind": kind, "train.seed": seed}
        if sub in RATIOS:
            o["sub.ratio"] = RATIOS[sub]
        if kind == "mask":  # the mask unit: read by no other kind
            o["sub.unit"] = unit
        if adapter:
            o["sub.adapter"] = adapter
        if epochs:
            o["sched.epochs"] = epochs
        return run_cli("train", label or f"{sub}-s{seed}", o, runs_dir, reuse=args.reuse)

    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    # The cost ratios are timed alone, before the runs: concurrent runs would distort their own times.
    timed = "none" in kinds and len(kinds) > 1
    if args.ratios_only and not timed:
        p.error(
            f"--ratios-only times sub branches against the plain step: --subs must hold none and another ({args.subs})"
        )
    hw = hardware(args.device)
    reuse = args.reuse and timed and not args.ratios_only
    recorded = reuse and recorded_ratios(Path(args.out) / f"{stem}.json", model_name, model_kwargs, hw, kinds)
    if recorded:
        print(f"step-cost ratios as recorded in {stem}.json: {recorded}", flush=True)
        ratios = recorded
    else:
        ratios = step_time_ratios(model_name, model_kwargs, unit, 128, args.device, kinds) if timed else {}
    if args.ratios_only:
        write_ratios(Path(args.out) / f"{stem}_cost", ratios, model_name, model_kwargs, hw)
        return
    ratio = ratios.get("mask")
    # plain given each MaskSub variant's compute: epochs scaled by its step-time ratio; a row per variant,
    # one set of runs per number of epochs
    eq = {v: max(1, round(s["epochs"] * ratios[v])) for v in ("mask", "mask_drop") if v in ratios}
    eq_label = {v: "none-equal-time" + ("" if v == "mask" else f" ({v})") for v in eq}
    jobs = [
        (e, ("none", sd, e, f"none-equal-time-{e}ep-s{sd}"))
        for e in sorted(set(eq.values()), reverse=True)
        for sd in seeds
    ] + [(k, (k, sd)) for k in kinds for sd in seeds]
    with ThreadPoolExecutor(args.jobs) as pool:  # one queue, the longest runs first
        results = list(pool.map(lambda kj: (kj[0], job(*kj[1])), jobs))
    by_kind = {k: [r for kk, r in results if kk == k] for k in kinds}
    by_kind.update({eq_label[v]: [r for kk, r in results if kk == e] for v, e in eq.items()})
    # each run once, in the table's order (two variants may share an equal-time run)
    runs = {r["name"]: r for rows in by_kind.values() for r in rows}

    def stat(rows, key):
        vals = [r[key] for r in rows if r[key] is not None]
        return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)

    meta = {
        "command": "python " + " ".join(sys.argv),
        "torch": torch.__version__,
        "hardware": hw,
        "scale": args.scale,
        "model": {"name": model_name, "kwargs": model_kwargs, "mask_unit_px": unit},
        "setting": {**s, "ratios": RATIOS},
        "step_time_ratio_mask_over_plain": ratio,
        "step_time_ratios_over_plain": ratios,
        "equal_time_epochs": eq.get("mask"),
        "equal_time_epochs_per_variant": eq,
        "peer_model_kwargs": {k: peer_kwargs(k, model_name) for k in kinds if k in peers.PEERS},
        "rdrop_alpha": ALPHA,
    }
    lines = [
        f"Command: `{meta['command']}`; {hw}; torch {meta['torch']}.",
        f"`{model_name}` {model_kwargs}, mask unit {unit} px, {s['epochs']} epochs on {s['images'] or 60000} "
        f"training images, augmentation `{s['aug']}`, test on 10,000 images; seeds {seeds}.",
        *(
            [
                f"Peers (peers.py): {', '.join(k for k in kinds if k in peers.PEERS)}; their sub ratio is the model's "
                f"own dropout (rdrop, KL weight alpha {ALPHA}) or drop-path rate (cosub), in both passes."
            ]
            if any(k in peers.PEERS for k in kinds)
            else []
        ),
        "",
        "| run | sub ratio | epochs | step time / plain | final top-1 (mean ± sd) | best top-1 (mean ± sd) "
        "| train time s (mean) |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind, rows in by_kind.items():
        f_m, f_sd = stat(rows, "final_top1")
        b_m, b_sd = stat(rows, "best_top1")
        t_m, _ = stat(rows, "train_time_s")
        epochs = rows[0]["epochs"]
        cost = ratios.get(kind, 1.0 if kind.startswith("none") else None)
        lines.append(
            f"| {kind} | {RATIOS.get(kind, '-')} | {epochs} | {'-' if cost is None else f'{cost:.2f}'} | "
            f"{f_m:.2f} ± {f_sd:.2f} | {b_m:.2f} ± {b_sd:.2f} | {t_m:.1f} |"
        )
    out = Path(args.out)
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "runs": list(runs.values())}, indent=1))
    plot_curves({name: r["records"] for name, r in runs.items()}, out / f"{stem}.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
