"""Seconds per optimizer step, peak memory and FLOPs: plain vs masksub.Step vs a research-style step.

    python benchmarks/step_cost.py                                    # GPU: the four paper models at 224 px
    python benchmarks/step_cost.py --models resnet50 --compile on     # a subset; results merge into one file
    python benchmarks/step_cost.py --tiny                             # CPU, tiny models (the test suite)

In one process, per model: a plain timm-style loop, ``masksub.Step`` on the plain model, ``masksub.Step``
with MaskSub at ratio 0.5, and the research-code style step (two forwards, two backwards, the loss read
back every step, nothing else optimized). Warm-up, then repeats timed with CUDA events (perf_counter on
CPU); mean and spread. The FLOP-ideal cost ratio is (main + sub FLOPs) / main FLOPs of forward+backward
(torch.utils.flop_counter). Results merge into results/step_cost.json and results/step_cost.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import masksub

PAPER_MODELS = {  # model -> batch (the paper's per-GPU scale)
    "deit3_small_patch16_224": 256,
    "deit3_base_patch16_224": 128,
    "swin_tiny_patch4_window7_224": 128,
    "resnet50": 256,
}
TINY_MODELS = {  # model -> (create kwargs, image size, mask unit)
    "vit_tiny_patch16_224": (dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2), 32, 32),
    "swin_tiny_patch4_window7_224": (
        dict(img_size=64, depths=(1, 1), num_heads=(1, 2), embed_dim=16, window_size=4),
        64,
        16,
    ),
    "resnet10t": (dict(), 32, 16),
}
VARIANTS = ("timm_loop", "plain", "masksub", "research")


def make_model(name, tiny, device, channels_last=False):
    kwargs = TINY_MODELS[name][0] if tiny else {}
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=1000, **kwargs).to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def make_step(variant, model, device, amp_dtype, unit, compile_):
    """One optimizer step as a closure over (x, y)."""
    autocast = lambda: torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)  # noqa: E731
    net = masksub.wrap(model, ratio=0.5, unit=unit) if variant in ("masksub", "research") else model
    if compile_:
        net.compile()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=device.type == "cuda")
    crit = torch.nn.CrossEntropyLoss()
    if variant in ("plain", "masksub"):
        amp = {torch.bfloat16: "bf16", None: None}[amp_dtype]
        return masksub.Step(net, opt, crit, amp=amp)
    if variant == "timm_loop":

        def timm_loop(x, y):
            opt.zero_grad(set_to_none=True)
            with autocast():
                loss = crit(net(x), y)
            loss.backward()
            opt.step()

        return timm_loop
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

    return research


def flops(model, x, y, unit):
    """Forward+backward FLOPs of the main pass and of the MaskSub sub pass."""
    wrapped = masksub.wrap(model, ratio=0.5, unit=unit)
    out = {}
    for name, sub in (("main", False), ("sub", True)):
        with FlopCounterMode(display=False) as counter:
            F.cross_entropy(wrapped(x, sub=sub), y).backward()
        out[name] = counter.get_total_flops()
    wrapped.unwrap()
    model.zero_grad(set_to_none=True)
    return out


def timed(step, x, y, device, warmup, repeats, iters):
    for _ in range(warmup):
        step(x, y)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                step(x, y)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000 / iters)
        else:
            t0 = time.perf_counter()
            for _ in range(iters):
                step(x, y)
            times.append((time.perf_counter() - t0) / iters)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return times, peak


def bench_model(name, batch, args, device):
    tiny = args.tiny
    img = TINY_MODELS[name][1] if tiny else args.img
    unit = TINY_MODELS[name][2] if tiny else 32
    amp_dtype = None if args.amp == "none" else torch.bfloat16
    x = torch.randn(batch, 3, img, img, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    row = {"batch": batch, "img": img, "flops": flops(make_model(name, tiny, device), x[:8], y[:8], unit)}
    row["flop_ideal_ratio"] = (row["flops"]["main"] + row["flops"]["sub"]) / row["flops"]["main"]
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    for compile_ in modes:
        mode = "compiled" if compile_ else "eager"
        for variant in VARIANTS:
            model = make_model(name, tiny, device, channels_last=name.startswith("resnet") and device.type == "cuda")
            step = make_step(variant, model, device, amp_dtype, unit, compile_)
            times, peak = timed(step, x, y, device, args.warmup, args.repeats, args.iters)
            row[f"{mode}/{variant}"] = {
                "s_per_step": statistics.fmean(times),
                "spread": statistics.stdev(times) if len(times) > 1 else 0.0,
                "images_per_s": batch / statistics.fmean(times),
                "peak_gib": peak,
            }
            print(f"{name:32s} {mode:8s} {variant:10s} {statistics.fmean(times) * 1000:9.2f} ms/step", flush=True)
            del model, step
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return row


def markdown(data: dict) -> str:
    meta = data["meta"]
    lines = [
        f"Hardware: {meta['hardware']}; torch {meta['torch']}, timm {meta['timm']}; {meta['precision']}.",
        f"Commands: {'; '.join(f'`{c}`' for c in meta['commands'])}",
        "",
        "| model | batch | mode | plain ms | masksub ms | research ms | masksub / plain | research / plain "
        "| FLOP-ideal | timm loop / plain | peak mem masksub / plain |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in data["models"].items():
        for mode in ("eager", "compiled"):
            if f"{mode}/plain" not in row:
                continue
            t = {v: row[f"{mode}/{v}"] for v in VARIANTS}
            ms = {v: t[v]["s_per_step"] * 1000 for v in VARIANTS}
            sd = {v: t[v]["spread"] * 1000 for v in VARIANTS}
            mem = f"{t['masksub']['peak_gib'] / t['plain']['peak_gib']:.3f}" if t["plain"]["peak_gib"] else "n/a (CPU)"
            lines.append(
                f"| {name} | {row['batch']} | {mode} | {ms['plain']:.1f} ± {sd['plain']:.1f} | "
                f"{ms['masksub']:.1f} ± {sd['masksub']:.1f} | {ms['research']:.1f} ± {sd['research']:.1f} | "
                f"{ms['masksub'] / ms['plain']:.3f} | {ms['research'] / ms['plain']:.3f} | "
                f"{row['flop_ideal_ratio']:.3f} | {ms['timm_loop'] / ms['plain']:.3f} | {mem} |"
            )
    return "\n".join(lines) + "\n"


def flops_table(args) -> None:
    """FLOPs per image of the main and MaskSub 0.5 sub pass (forward+backward): hardware-independent."""
    names = args.models.split(",") if args.models else list(PAPER_MODELS)
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
    p.add_argument("--tiny", action="store_true", help="tiny models on the CPU")
    p.add_argument("--models", default=None, help="comma-separated subset")
    p.add_argument("--img", type=int, default=224)
    p.add_argument("--amp", default="bf16", choices=("bf16", "none"))
    p.add_argument("--compile", default="both", choices=("off", "on", "both"))
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--iters", type=int, default=10, help="steps per timed repeat")
    p.add_argument("--batch", type=int, default=None, help="override every model's batch size")
    p.add_argument("--flops-only", action="store_true", help="only the FLOP counts (any device, batch 2)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()
    if args.flops_only:
        return flops_table(args)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    table = {name: 4 for name in TINY_MODELS} if args.tiny else dict(PAPER_MODELS)
    if args.models:
        table = {m: table.get(m, 128) for m in args.models.split(",")}
    if args.batch:
        table = {m: args.batch for m in table}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / ("step_cost_tiny.json" if args.tiny else "step_cost.json")
    data = json.loads(path.read_text()) if path.is_file() else {"meta": {"commands": []}, "models": {}}
    hardware = (
        torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    )
    data["meta"].update(
        torch=torch.__version__,
        timm=timm.__version__,
        hardware=hardware,
        precision="bf16 autocast, AdamW" if args.amp == "bf16" else "fp32, AdamW",
    )
    data["meta"]["commands"] = sorted(set(data["meta"]["commands"]) | {"python " + " ".join(sys.argv)})
    for name, batch in table.items():
        data["models"][name] = {**data["models"].get(name, {}), **bench_model(name, batch, args, device)}
        path.write_text(json.dumps(data, indent=2))
    path.with_suffix(".md").write_text(markdown(data))
    print(markdown(data))


if __name__ == "__main__":
    main()
