"""Seconds per optimizer step, peak memory and FLOPs: plain vs masksub.Step vs a research-style step.

    python benchmarks/step_cost.py                                    # GPU: the four paper models at 224 px
    python benchmarks/step_cost.py --models resnet50 --compile on     # a subset; results merge into one file
    python benchmarks/step_cost.py --scale cpu                        # CPU: the same models, batch / 8, eager
    python benchmarks/step_cost.py --scale tiny                       # CPU, tiny models (the test suite)
    python benchmarks/step_cost.py --grad-checkpointing               # rows with activation checkpointing
    python benchmarks/step_cost.py --models beit_base_patch16_224 --also-adapter masktoken  # two sub passes

In one process, per model: a plain timm-style loop, ``masksub.Step`` on the plain model, ``masksub.Step``
with MaskSub at ratio 0.5, and the research-code style step (two forwards, two backwards, the loss read
back every step, nothing else optimized). Each is warmed up and its peak memory measured alone; then all
four are timed in interleaved rounds with CUDA events (perf_counter on CPU); mean and spread. Peak memory
counts tensors: parameters, optimizer state, gradients and activations (the CUDA allocator's peak on a GPU,
the profiler's allocation events on a CPU). The FLOP-ideal cost ratio is (main + sub FLOPs) / main FLOPs of
forward+backward (torch.utils.flop_counter). Results merge into results/step_cost[_<scale>].{json,md}.

``--also-adapter NAME`` adds a fifth step to the same rounds: ``masksub.Step`` with MaskSub through the
named adapter (``masktoken`` on a BEiT: the mask token it got before it dropped tokens), with its own
FLOP-ideal ratio, so two ways of masking one model are compared in one run.

``--peers`` adds R-Drop and cosub (peers.py) to the same rounds: each model built with its dropout (R-Drop) or
drop path (cosub) at 0.1, two full passes and one backward of the summed loss, as they need.

``--patch-dropout`` adds, for the models that drop tokens in timm (those with a ``patch_drop`` slot: ViT, EVA,
...), the speed reference for the masked pass: a plain step of the model built with timm's ``patch_drop_rate=0.5``
(FLIP / PatchDropout: half the tokens dropped in the only pass). MaskSub's sub pass should cost what that step
costs, less one optimizer update; the FLOPs of the two passes are compared too.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import peers
import timm
import torch
import torch.nn.functional as F
from common import cpu_peak_bytes, hardware
from torch.utils.flop_counter import FlopCounterMode

import masksub

PAPER_MODELS = {  # model -> batch (the paper's per-GPU scale)
    "deit3_small_patch16_224": 256,
    "deit3_base_patch16_224": 128,
    "swin_tiny_patch4_window7_224": 128,
    "resnet50": 256,
}
TINY_MODELS = {  # model -> (create kwargs, image size, mask unit)
    "vit_tiny_patch16_224": (dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2), 32, 16),
    "swin_tiny_patch4_window7_224": (
        dict(img_size=64, depths=(1, 1), num_heads=(1, 2), embed_dim=16, window_size=4),
        64,
        16,
    ),
    "resnet10t": (dict(), 32, 16),
}
VARIANTS = ("timm_loop", "plain", "masksub", "research")
# Per scale: batch divisor of PAPER_MODELS, compile modes and timing repeats (flags override).
SCALES = {
    "gpu": dict(batch_div=1, compile="both", warmup=10, repeats=5, iters=10),
    "cpu": dict(batch_div=8, compile="off", warmup=1, repeats=4, iters=2),
    "tiny": dict(batch_div=None, compile="off", warmup=1, repeats=2, iters=1),
}


def make_model(name, tiny, device, channels_last=False, checkpointing=False, peer=None, patch_drop=0.0):
    kwargs = TINY_MODELS[name][0] if tiny else {}
    kwargs = {**kwargs, **(peers.drop_kwargs(peer, name, peers.RATE) if peer else {})}
    kwargs = {**kwargs, **({"patch_drop_rate": patch_drop} if patch_drop else {})}
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=1000, **kwargs).to(device)
    model.set_grad_checkpointing(checkpointing)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def make_step(variant, model, device, amp_dtype, unit, compile_):
    """One optimizer step as a callable on (x, y); with the module it trains and its optimizer. ``variant`` is
    one of VARIANTS, ``masksub:NAME`` (MaskSub through the adapter NAME), or a peer (``rdrop``, ``cosub``)."""
    autocast = lambda: torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)  # noqa: E731
    adapter = variant.partition(":")[2] or None
    masked = variant in ("masksub", "research") or adapter
    net = masksub.wrap(model, ratio=0.5, unit=unit, adapter=adapter) if masked else model
    if compile_:
        net.compile()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=device.type == "cuda")
    crit = torch.nn.CrossEntropyLoss()
    amp = {torch.bfloat16: "bf16", None: None}[amp_dtype]
    if variant in ("plain", "masksub", "patchdrop") or adapter:
        return masksub.Step(net, opt, crit, amp=amp), net, opt
    if variant in peers.PEERS:
        return peers.peer_step(net, opt, peers.peer_loss(variant, crit, peers.ALPHA), amp=amp), net, opt
    if variant == "timm_loop":

        def timm_loop(x, y):
            opt.zero_grad(set_to_none=True)
            with autocast():
                loss = crit(net(x), y)
            loss.backward()
            opt.step()

        return timm_loop, net, opt
    sub_loss = masksub.SubBranchLoss(crit).sub_loss

    def research(x, y):
        opt.zero_grad()
        with autocast():
            main = net(x)
            loss = crit(main, y)
        (loss / 2).backward()
        with autocast():
            loss_sub = sub_loss(net(x, sub=True), main)
        (loss_sub / 2).backward()
        opt.step()
        return loss.item() + loss_sub.item()  # logged every step, as the research scripts do

    return research, net, opt


def flops(model, x, y, unit, adapter=None):
    """Forward+backward FLOPs of the main pass and of the MaskSub sub pass (through ``adapter``, if named)."""
    wrapped = masksub.wrap(model, ratio=0.5, unit=unit, adapter=adapter)
    out = {}
    for name, sub in (("main", False), ("sub", True)):
        out[name] = pass_flops(lambda: wrapped(x, sub=sub), y)  # noqa: B023 (called at once)
    wrapped.unwrap()
    model.zero_grad(set_to_none=True)
    return out


def pass_flops(forward, y) -> int:
    """Forward+backward FLOPs of ``forward()`` under cross-entropy on ``y``."""
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(forward(), y).backward()
    return counter.get_total_flops()


def peak_memory(step, net, opt, x, y, iters: int) -> float:
    """Peak GiB of tensor memory over ``iters`` steps: what the model and optimizer hold, plus the gradients
    and activations a step allocates. A GPU reads its allocator; a CPU has no allocator statistics, so the
    profiler's allocation and free events are summed in time order."""
    opt.zero_grad(set_to_none=True)  # every step starts so: its gradients count as allocated during it
    if x.device.type == "cuda":
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(iters):
            step(x, y)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - held + held_by(net, opt)) / 2**30
    return (held_by(net, opt) + cpu_peak_bytes(lambda: [step(x, y) for _ in range(iters)])) / 2**30


def held_by(net, opt) -> int:
    """Bytes of the parameters, buffers and optimizer state (each storage once)."""
    state = (v for st in opt.state.values() for v in st.values() if torch.is_tensor(v))
    tensors = itertools.chain(net.parameters(), net.buffers(), state)
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def seconds_per_step(step, x, y, device, iters) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            step(x, y)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000 / iters
    start = time.perf_counter()
    for _ in range(iters):
        step(x, y)
    return (time.perf_counter() - start) / iters


def mode_name(compile_: bool, checkpointing: bool) -> str:
    return ("compiled" if compile_ else "eager") + (" + checkpointing" if checkpointing else "")


def bench_model(name, batch, args, device, run_info: dict):
    """Per compile mode: build and warm up every variant, measure each one's peak memory alone, then time
    them in interleaved rounds (the order rotates each round) so drifts in clocks or load hit all alike.
    ``run_info`` (command, hardware, date) is stored beside each mode's rows: rows merged from several
    runs keep their own provenance."""
    tiny = args.scale == "tiny"
    img = TINY_MODELS[name][1] if tiny else args.img
    unit = TINY_MODELS[name][2] if tiny else 32
    amp_dtype = None if args.amp == "none" else torch.bfloat16
    channels_last = name.startswith("resnet") and device.type == "cuda"  # CNNs on the GPU, as timm's train.py
    x = torch.randn(batch, 3, img, img, device=device)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x  # the batch too, as timm's loop
    y = torch.randint(0, 1000, (batch,), device=device)
    model = make_model(name, tiny, device)
    row = {"batch": batch, "img": img, "flops": flops(model, x[:8], y[:8], unit)}
    row["flop_ideal_ratio"] = (row["flops"]["main"] + row["flops"]["sub"]) / row["flops"]["main"]
    variants = VARIANTS
    if args.also_adapter:
        variants = (*VARIANTS, f"masksub:{args.also_adapter}")
        f = flops(make_model(name, tiny, device), x[:8], y[:8], unit, args.also_adapter)
        row[f"flop_ideal_ratio:{args.also_adapter}"] = (f["main"] + f["sub"]) / f["main"]
    if args.peers:
        variants = (*variants, *peers.PEERS)
    if args.patch_dropout and hasattr(model, "patch_drop"):  # the slot of timm's patch_drop_rate (ViT, EVA...)
        variants = (*variants, "patchdrop")
        reference = make_model(name, tiny, device, patch_drop=0.5)
        row["flops"]["patchdrop"] = pass_flops(lambda: reference(x[:8]), y[:8])
        del reference  # and its gradients: the steps below build their own models
    compile_modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    # With --grad-checkpointing each variant is also built with checkpointing, and both kinds are timed in
    # the same interleaved rounds: the cost of checkpointing is a ratio within one run.
    checkpointing = [False, True] if args.grad_checkpointing else [False]
    for compile_ in compile_modes:
        configs = [(mode_name(compile_, ckpt), ckpt, v) for ckpt in checkpointing for v in variants]
        steps, peaks = {}, {}
        for mode, ckpt, variant in configs:
            peer = variant if variant in peers.PEERS else None
            drop = 0.5 if variant == "patchdrop" else 0.0
            model = make_model(name, tiny, device, channels_last, ckpt, peer=peer, patch_drop=drop)
            step, net, opt = make_step(variant, model, device, amp_dtype, unit, compile_)
            for _ in range(args.warmup):
                step(x, y)
            peaks[mode, variant] = peak_memory(step, net, opt, x, y, args.iters)
            steps[mode, variant] = step
        times = {key: [] for key in steps}
        keys = list(steps)
        for r in range(args.repeats):
            for key in keys[r % len(keys) :] + keys[: r % len(keys)]:
                times[key].append(seconds_per_step(steps[key], x, y, device, args.iters))
        for (mode, variant), ts in times.items():
            row[f"{mode}/{variant}"] = {
                "s_per_step": statistics.fmean(ts),
                "spread": statistics.stdev(ts) if len(ts) > 1 else 0.0,
                "images_per_s": batch / statistics.fmean(ts),
                "peak_gib": peaks[mode, variant],
                "date": run_info["date"],  # a later run may re-time some of a mode's variants, not all
            }
            print(f"{name:32s} {mode:24s} {variant:20s} {statistics.fmean(ts) * 1000:9.2f} ms/step", flush=True)
        for mode in dict.fromkeys(mode for mode, _, _ in configs):
            row.setdefault("runs", {})[mode] = run_info
        del steps, step, net, opt, model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


MODES = ("eager", "compiled", "eager + checkpointing", "compiled + checkpointing")


def markdown(data: dict) -> str:
    meta = data["meta"]
    runs = []  # each distinct run (command, hardware, date), numbered in time order in the table's "run" column
    for row in data["models"].values():
        for info in row.get("runs", {}).values():
            if info not in runs:
                runs.append(info)
    runs.sort(key=lambda r: r["date"])
    lines = [
        f"torch {meta['torch']}, timm {meta['timm']}; {meta['precision']}. Runs:",
        "",
        *(f"{i}. `{r['command']}` on {r['hardware']}, {r['date']}" for i, r in enumerate(runs, 1)),
        "",
        f"Peak memory: {meta.get('memory', 'CUDA allocator peak')}.",
        "",
        "| model | batch | mode | run | plain ms | masksub ms | research ms | masksub / plain | research / plain "
        "| FLOP-ideal | timm loop / plain | plain peak GiB | masksub / plain peak | research / plain peak |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in data["models"].items():
        for mode in MODES:
            if f"{mode}/plain" not in row:
                continue
            run = row.get("runs", {}).get(mode)
            t = {v: row[f"{mode}/{v}"] for v in VARIANTS}
            ms = {v: t[v]["s_per_step"] * 1000 for v in VARIANTS}
            sd = {v: t[v]["spread"] * 1000 for v in VARIANTS}
            peak = {v: t[v]["peak_gib"] for v in VARIANTS}
            mem = (
                f"{peak['plain']:.2f} | {peak['masksub'] / peak['plain']:.3f} | {peak['research'] / peak['plain']:.3f}"
                if peak["plain"]
                else "n/a | n/a | n/a"
            )
            lines.append(
                f"| {name} | {row['batch']} | {mode} | {runs.index(run) + 1 if run else '-'} | "
                f"{ms['plain']:.1f} ± {sd['plain']:.1f} | "
                f"{ms['masksub']:.1f} ± {sd['masksub']:.1f} | {ms['research']:.1f} ± {sd['research']:.1f} | "
                f"{ms['masksub'] / ms['plain']:.3f} | {ms['research'] / ms['plain']:.3f} | "
                f"{row['flop_ideal_ratio']:.3f} | {ms['timm_loop'] / ms['plain']:.3f} | {mem} |"
            )
    lines += checkpointing_table(data) + adapters_table(data) + peers_table(data) + patch_dropout_table(data)
    return "\n".join(lines) + "\n"


def same_run(row: dict, mode: str, variants) -> bool:
    """Whether ``row`` has all ``variants`` in ``mode``, timed in one run's rounds: ratios are taken only so."""
    entries = [row.get(f"{mode}/{v}") for v in variants]
    return all(entries) and len({e.get("date") for e in entries}) == 1


def adapters_table(data: dict) -> list[str]:
    """MaskSub through another adapter (``--also-adapter``), timed in the same rounds as the rows above."""
    out = []
    for name, row in data["models"].items():
        for key in row:
            mode, _, variant = key.partition("/")
            if not variant.startswith("masksub:") or not same_run(row, mode, ("plain", variant)):
                continue
            adapter, t, plain = variant.partition(":")[2], row[key], row[f"{mode}/plain"]
            peak = f"{t['peak_gib'] / plain['peak_gib']:.3f}" if plain["peak_gib"] else "n/a"
            out.append(
                f"| {name} | {row['batch']} | {mode} | {adapter} | {t['s_per_step'] * 1000:.1f} ± "
                f"{t['spread'] * 1000:.1f} | {t['s_per_step'] / plain['s_per_step']:.3f} | "
                f"{row[f'flop_ideal_ratio:{adapter}']:.3f} | {peak} |"
            )
    if not out:
        return []
    return [
        "",
        "MaskSub through another adapter (`--also-adapter`), timed in the same rounds as the row above:",
        "",
        "| model | batch | mode | adapter | ms | / plain | FLOP-ideal | peak / plain |",
        "|---|---|---|---|---|---|---|---|",
        *out,
    ]


def peers_table(data: dict) -> list[str]:
    """R-Drop and cosub (``--peers``), timed in the same rounds as plain and MaskSub."""
    out = []
    for name, row in data["models"].items():
        for mode in MODES:
            if not same_run(row, mode, ("plain", "masksub", *peers.PEERS)):
                continue
            plain = row[f"{mode}/plain"]
            cells = []
            for v in ("masksub", *peers.PEERS):
                t = row[f"{mode}/{v}"]
                peak = f"{t['peak_gib'] / plain['peak_gib']:.3f}" if plain["peak_gib"] else "n/a"
                cells.append(f"{t['s_per_step'] / plain['s_per_step']:.3f} | {peak}")
            out.append(f"| {name} | {row['batch']} | {mode} | {' | '.join(cells)} |")
    if not out:
        return []
    return [
        "",
        f"The peers (`--peers`: R-Drop and cosub, their drop at {peers.RATE} in both passes, one backward of both "
        "passes' loss), timed in the same rounds as the rows above; time and peak memory over the plain step's:",
        "",
        "| model | batch | mode | MaskSub time | MaskSub peak | R-Drop time | R-Drop peak | cosub time | cosub peak |",
        "|---|---|---|---|---|---|---|---|---|",
        *out,
    ]


def patch_dropout_table(data: dict) -> list[str]:
    """timm's PatchDropout step (``--patch-dropout``) beside MaskSub's: what the sub pass costs against the same
    token dropping in a step of its own."""
    out = []
    for name, row in data["models"].items():
        for mode in MODES:
            if not same_run(row, mode, ("plain", "masksub", "patchdrop")):
                continue
            ms = {v: row[f"{mode}/{v}"]["s_per_step"] * 1000 for v in ("plain", "masksub", "patchdrop")}
            f = row["flops"]
            out.append(
                f"| {name} | {row['batch']} | {mode} | {ms['patchdrop']:.1f} | {ms['patchdrop'] / ms['plain']:.3f} | "
                f"{ms['masksub'] / ms['plain']:.3f} | {(ms['masksub'] - ms['plain']) / ms['patchdrop']:.3f} | "
                f"{f['sub'] / f['patchdrop']:.3f} |"
            )
    if not out:
        return []
    return [
        "",
        "timm's PatchDropout at 0.5 (`--patch-dropout`: half the tokens dropped in a plain step's only pass, FLIP "
        "style), timed in the same rounds; the sub pass's added time is MaskSub's step less the plain step, which "
        "should be the PatchDropout step less one optimizer update:",
        "",
        "| model | batch | mode | PatchDropout ms | PatchDropout / plain | MaskSub / plain "
        "| (MaskSub - plain) / PatchDropout | sub pass FLOPs / PatchDropout FLOPs |",
        "|---|---|---|---|---|---|---|---|",
        *out,
    ]


def checkpointing_table(data: dict) -> list[str]:
    """What activation checkpointing costs and saves: each step with it over the same step without, for rows
    timed in the same rounds of one run (``--grad-checkpointing``)."""
    out = []
    for name, row in data["models"].items():
        runs = row.get("runs", {})
        for base in ("eager", "compiled"):
            ck = f"{base} + checkpointing"
            if ck not in runs or runs[ck] != runs.get(base):
                continue
            ratio = {
                (v, k): row[f"{ck}/{v}"][k] / row[f"{base}/{v}"][k] if row[f"{base}/{v}"][k] else float("nan")
                for v in ("plain", "masksub")
                for k in ("s_per_step", "peak_gib")
            }
            out.append(
                f"| {name} | {row['batch']} | {base} | {ratio['plain', 's_per_step']:.3f} | "
                f"{ratio['masksub', 's_per_step']:.3f} | {ratio['plain', 'peak_gib']:.3f} | "
                f"{ratio['masksub', 'peak_gib']:.3f} |"
            )
    if not out:
        return []
    return [
        "",
        "Activation checkpointing, timed in the same rounds as the steps without it (with / without):",
        "",
        "| model | batch | mode | plain time | masksub time | plain peak | masksub peak |",
        "|---|---|---|---|---|---|---|",
        *out,
    ]


def flops_table(args) -> None:
    """FLOPs per image of the main and MaskSub 0.5 sub pass (forward+backward): hardware-independent."""
    names = args.models.split(",") if args.models else [*PAPER_MODELS, "convvit_base_patch16"]
    lines = [
        f"`python {' '.join(sys.argv)}`; torch {torch.__version__}, timm {timm.__version__}; "
        f"torch.utils.flop_counter, forward+backward, {args.img} px.",
        "",
        "| model | main GFLOP/image | sub GFLOP/image | FLOP-ideal step cost (main + sub) / main |",
        "|---|---|---|---|",
    ]
    rows = {}
    for name in names:
        x, y = torch.randn(2, 3, args.img, args.img), torch.randint(0, 1000, (2,))
        f = flops(make_model(name, False, torch.device("cpu")), x, y, 32)
        rows[name] = {k: v / 2 for k, v in f.items()}
        lines.append(
            f"| {name} | {f['main'] / 2e9:.2f} | {f['sub'] / 2e9:.2f} | {(f['main'] + f['sub']) / f['main']:.3f} |"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "flops.json").write_text(json.dumps({"command": "python " + " ".join(sys.argv), "flops": rows}, indent=2))
    (out / "flops.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scale", choices=tuple(SCALES), default="gpu", help="gpu: the paper's batches; cpu: batch / 8")
    p.add_argument("--models", default=None, help="comma-separated subset")
    p.add_argument("--img", type=int, default=224)
    p.add_argument("--amp", default="bf16", choices=("bf16", "none"))
    p.add_argument("--compile", default=None, choices=("off", "on", "both"), help="default: by scale")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default: by scale)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default: by scale)")
    p.add_argument("--iters", type=int, default=None, help="steps per timed repeat (default: by scale)")
    p.add_argument("--batch", type=int, default=None, help="override every model's batch size")
    p.add_argument("--flops-only", action="store_true", help="only the FLOP counts (any device, batch 2)")
    p.add_argument(
        "--grad-checkpointing",
        action="store_true",
        help="every variant with timm's activation checkpointing (rows merge beside those without)",
    )
    p.add_argument(
        "--also-adapter",
        metavar="NAME",
        help="also time MaskSub through this adapter (masktoken, pixels, ...) in the same rounds",
    )
    p.add_argument("--peers", action="store_true", help="also time R-Drop and cosub (peers.py) in the same rounds")
    p.add_argument(
        "--patch-dropout",
        action="store_true",
        help="also time a plain step with timm's PatchDropout at 0.5 (models with a patch_drop slot)",
    )
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()
    if args.flops_only:
        return flops_table(args)
    scale = SCALES[args.scale]
    for key in ("compile", "warmup", "repeats", "iters"):
        if getattr(args, key) is None:
            setattr(args, key, scale[key])
    if args.scale == "gpu" and not torch.cuda.is_available():
        sys.exit("--scale gpu needs CUDA; on this machine use --scale cpu (or --scale tiny)")
    device = torch.device("cuda" if args.scale == "gpu" else "cpu")
    if args.scale == "tiny":
        table = {name: 4 for name in TINY_MODELS}
    else:
        table = {name: batch // scale["batch_div"] for name, batch in PAPER_MODELS.items()}
    if args.models:
        table = {m: table.get(m, 128) for m in args.models.split(",")}
    if args.batch:
        table = {m: args.batch for m in table}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / ("step_cost.json" if args.scale == "gpu" else f"step_cost_{args.scale}.json")
    data = json.loads(path.read_text()) if path.is_file() else {"meta": {"commands": []}, "models": {}}
    hw = hardware(device.type)
    data["meta"].update(
        torch=torch.__version__,
        timm=timm.__version__,
        hardware=hw,
        precision="bf16 autocast, AdamW" if args.amp == "bf16" else "fp32, AdamW",
        memory="tensor memory (parameters, buffers, optimizer state, gradients, activations; not the inputs) at "
        "its peak over steps after the warm-up: "
        + ("the CUDA allocator's peak" if device.type == "cuda" else "the profiler's CPU allocation and free events"),
    )
    command = "python " + " ".join(sys.argv)
    data["meta"]["commands"] = sorted(set(data["meta"]["commands"]) | {command})
    run_info = {"command": command, "hardware": hw, "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    for name, batch in table.items():
        old, new = data["models"].get(name, {}), bench_model(name, batch, args, device, run_info)
        data["models"][name] = {**old, **new, "runs": {**old.get("runs", {}), **new["runs"]}}
        path.write_text(json.dumps(data, indent=2))  # after each model: a cut-off run keeps what it measured
        path.with_suffix(".md").write_text(markdown(data))
    print(markdown(data))


if __name__ == "__main__":
    main()
