"""DMJD vs its single-view baseline on Fashion-MNIST, at equal epochs and at equal compute.

    python benchmarks/pretrain.py --scale cpu                  # ViT 4x96, 6,000 images, minutes on 2 cores
    python benchmarks/pretrain.py --scale gpu --jobs 7         # ViT 6x192, 60k images, data on the GPU
    python benchmarks/pretrain.py --scale cpu --encoder convvit   # the same with ConViT (results *_convvit)
    python benchmarks/pretrain.py --throughput-only            # only the ViT-B/16 and ConViT-B step throughput (GPU)
    python benchmarks/pretrain.py --scale tiny                 # seconds; the test suite

Pretrains DMJD and the single-view baseline for the same epochs, and the baseline again for DMJD's
compute: its epochs scaled by the ratio of DMJD to single-view step time, timed alone before the
runs. Then judges every encoder by a linear probe and by finetuning with MaskSub (same recipes,
seeds and schedules), and a finetune from scratch. Runs go as `--jobs` concurrent processes, in two
waves (the pretraining runs, then the evaluations). Writes results/pretrain_<scale>.{json,md};
--throughput-only writes results/pretrain_throughput.{json,md}.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from common import alternating_step_times, hardware, run_cli

SCALES = {
    "tiny": dict(
        kwargs=dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2),
        images=256,
        eval=200,
        pretrain=1,
        probe=1,
        finetune=1,
        decoder=(32, 1, 2),
        on_device=True,  # the GPU scale's data path, here on the CPU
    ),
    "cpu": dict(
        kwargs=dict(img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3),
        images=6000,
        eval=None,
        pretrain=5,
        probe=3,
        finetune=3,
        decoder=(96, 2, 3),
        on_device=False,
    ),
    "gpu": dict(
        kwargs=dict(img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=3),
        images=None,
        eval=None,
        pretrain=50,
        probe=20,
        finetune=20,
        decoder=(192, 4, 6),
        on_device=True,  # the images on the GPU, each batch cropped there: no loader processes
    ),
}


# The same comparison with ConViT (masked-convolution stages, then ViT blocks) as the encoder:
# per scale, a width and depth like the ViT's, tokens of the same size (8, 4 and 4 pixels).
CONVVIT = {
    "tiny": dict(img_size=32, patch_size=(2, 2, 2), embed_dim=(8, 16, 32), depth=(1, 1, 1), num_heads=2),
    "cpu": dict(img_size=32, patch_size=(2, 2, 1), embed_dim=(32, 64, 96), depth=(1, 1, 3), num_heads=3),
    "gpu": dict(img_size=32, patch_size=(2, 2, 1), embed_dim=(64, 128, 192), depth=(1, 1, 5), num_heads=3),
}
ENCODER_NAMES = {"vit": "vit_tiny_patch16_224", "convvit": "convvit_base_patch16"}


def step_time_ratio(s: dict, device: str, batch: int = 128) -> float:
    """DMJD's step time over the single-view step's at this scale's encoder and decoder, timed alone."""
    import timm

    import masksub
    from masksub.data import MEAN, STD
    from masksub.pretrain import DMJD

    dev = torch.device("cuda" if device != "cpu" and torch.cuda.is_available() else "cpu")
    x = torch.rand(batch, 1, 32, 32, device=dev)
    dd, depth, heads = s["decoder"]
    steps = {}
    for method in ("dmjd", "single"):
        encoder = timm.create_model(s["name"], in_chans=1, num_classes=0, **s["kwargs"])
        net = DMJD(encoder, method, decoder_dim=dd, decoder_depth=depth, decoder_heads=heads, projector_dim=dd,
                   mean=(MEAN,), std=(STD,)).to(dev)  # fmt: skip
        step = masksub.Step(net, torch.optim.AdamW(net.parameters(), betas=(0.9, 0.95)), None)
        steps[method] = functools.partial(step, x)
    times = alternating_step_times(steps, cuda=dev.type == "cuda")
    return times["dmjd"] / times["single"]


ENCODERS = {"ViT-B/16": "vit_base_patch16_224", "ConViT-B": "convvit_base_patch16"}  # the paper's two backbones


def throughput(
    batch: int = 64, steps: int = 20, device: str = "cuda", size: int = 224, encoder_kwargs: dict | None = None
) -> dict:
    """Images/s of a DMJD and a single-view training step per encoder, ``size`` px, bf16 on a GPU
    (``encoder_kwargs``: per encoder label, smaller settings for a CPU check)."""
    import timm

    from masksub.pretrain import DMJD

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    out = {}
    for label, name in ENCODERS.items():
        for method in ("dmjd", "single"):
            encoder = timm.create_model(name, num_classes=0, img_size=size, **(encoder_kwargs or {}).get(label, {}))
            model = DMJD(encoder, method=method).to(dev)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=cuda)
            x = torch.rand(batch, 3, size, size, device=dev)
            for i in range(steps + 5):
                if i == 5:  # after the warm-up
                    if cuda:
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
                    loss = model(x)["loss"]
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            if cuda:
                torch.cuda.synchronize()
            seconds = (time.perf_counter() - start) / steps
            row = {"s_per_step": seconds, "images_per_s": batch / seconds, "batch": batch, "px": size, "bf16": cuda}
            out.setdefault(label, {})[method] = row
            del model, opt
            if cuda:
                torch.cuda.empty_cache()
    return out


def throughput_line(t: dict) -> str:
    lines = []
    for label, methods in t.items():
        speeds = ", ".join(
            f"{m} {v['images_per_s']:.0f} images/s ({v['s_per_step'] * 1000:.1f} ms/step)" for m, v in methods.items()
        )
        d, single = methods["dmjd"], methods["single"]
        setting = f"{d['px']} px, batch {d['batch']}, {'bf16' if d['bf16'] else 'fp32'}"
        ratio = d["s_per_step"] / single["s_per_step"]
        lines.append(f"{label}, {setting}: {speeds}; DMJD / single-view step time {ratio:.2f}.")
    return "\n\n".join(lines)


def write_throughput(out: Path) -> None:
    if not torch.cuda.is_available():
        raise SystemExit("--throughput-only times CUDA steps: it needs a GPU")
    t = throughput()
    meta = {"command": "python " + " ".join(sys.argv), "hardware": hardware(), "torch": torch.__version__}
    line = f"Command: `{meta['command']}`; {meta['hardware']}; torch {meta['torch']}.\n\n{throughput_line(t)}\n"
    (out / "pretrain_throughput.md").write_text(line)
    (out / "pretrain_throughput.json").write_text(json.dumps({"meta": meta, "throughput": t}, indent=1))
    print(line)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scale", choices=tuple(SCALES), default="cpu")
    p.add_argument("--encoder", choices=tuple(ENCODER_NAMES), default="vit", help="convvit: ConViT at the same scale")
    p.add_argument("--device", default="auto")
    p.add_argument("--jobs", type=int, default=1, help="concurrent training processes")
    p.add_argument("--reuse", action="store_true", help="read finished runs in the output folder, don't rerun them")
    p.add_argument("--throughput", action="store_true", help="also time ViT-B/16 and ConViT-B steps (GPU)")
    p.add_argument("--throughput-only", action="store_true", help="only time the ViT-B/16 and ConViT-B steps")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()
    s = dict(SCALES[args.scale], name=ENCODER_NAMES[args.encoder])
    if args.encoder == "convvit":
        s["kwargs"] = CONVVIT[args.scale]
    label = f"{args.scale}_convvit" if args.encoder == "convvit" else args.scale  # result and run folder names
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.throughput_only:
        write_throughput(out)
        return
    runs = out / f"pretrain_{label}_runs"
    dd, depth, heads = s["decoder"]
    data = {
        "model.name": s["name"],
        "model.kwargs": s["kwargs"],
        "data.img_size": 32,
        "data.train_subset": s["images"],
        "data.eval_subset": s["eval"],
        "data.workers": 1,
        "data.on_device": s["on_device"],
        "train.device": args.device,
    }
    pre = {
        **{k: v for k, v in data.items() if k != "data.eval_subset"},  # pretraining evaluates nothing
        "model.kwargs": {**s["kwargs"], "fixed_pos_embed": True} if args.encoder == "convvit" else s["kwargs"],
        "sched.epochs": s["pretrain"],
        "pretrain.decoder_dim": dd,
        "pretrain.decoder_depth": depth,
        "pretrain.decoder_heads": heads,
        "pretrain.projector_dim": dd,
    }
    if args.device == "cpu" or not torch.cuda.is_available():
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, torch.get_num_threads() // args.jobs)))

    def wave(jobs: dict) -> dict:
        """Runs ``{name: (command, overrides, extra args)}`` as --jobs concurrent processes."""
        with ThreadPoolExecutor(args.jobs) as pool:
            done = pool.map(lambda kv: run_cli(kv[1][0], kv[0], kv[1][1], runs, kv[1][2], args.reuse), jobs.items())
            return dict(zip(jobs, done, strict=True))

    # The cost ratio is timed alone, before the runs: concurrent runs would distort their own times.
    ratio = step_time_ratio(s, args.device)
    equal = max(1, round(s["pretrain"] * ratio))
    single = {k: v for k, v in pre.items() if k != "pretrain.projector_dim"}  # one view: no visible branch
    done = wave(  # the longest run first
        {
            "single-equal-time": ("pretrain", {**single, "sched.epochs": equal}, ("--method", "single")),
            "dmjd": ("pretrain", pre, ("--method", "dmjd")),
            "single": ("pretrain", single, ("--method", "single")),
        }
    )
    results = {name: done[name] for name in ("dmjd", "single", "single-equal-time")}
    evaluations = {"scratch-finetune": ("train", {**data, "sched.epochs": s["finetune"], "sub.kind": "mask"}, ())}
    for name, r in results.items():
        encoder = str(runs / r["folder"] / "encoder.pt")  # the run folder under runs/
        evaluations[f"{name}-finetune"] = (
            "train",
            {**data, "sched.epochs": s["finetune"], "sub.kind": "mask", "model.checkpoint": encoder},
            (),
        )
        evaluations[f"{name}-linprobe"] = ("linprobe", {**data, "sched.epochs": s["probe"]}, ("--checkpoint", encoder))
    scores = wave(evaluations)
    for name, r in results.items():
        r.update(
            linprobe_top1=scores[f"{name}-linprobe"]["final_top1"],
            finetune_top1=scores[f"{name}-finetune"]["final_top1"],
        )

    meta = {
        "command": "python " + " ".join(sys.argv),
        "hardware": hardware(args.device),
        "torch": torch.__version__,
        "setting": s,
        "step_time_ratio_dmjd_over_single": ratio,
        "equal_time_epochs": equal,
        "concurrent_jobs": args.jobs,
    }
    if args.throughput:
        meta["throughput"] = throughput()
    lines = [
        f"Command: `{meta['command']}`; {meta['hardware']}; torch {meta['torch']}.",
        f"{'ConViT' if args.encoder == 'convvit' else 'ViT'} {s['kwargs']} on {s['images'] or 60000} "
        f"Fashion-MNIST images; linear probe {s['probe']} and "
        f"finetune (MaskSub 0.5) {s['finetune']} epochs; one seed. DMJD step time / single-view step time "
        f"{ratio:.2f} (timed alone), so the equal-compute single-view run has {equal} epochs.",
        *(
            [f"The runs went {args.jobs} at a time: their times below are not a cost measurement; the ratio is."]
            if args.jobs > 1
            else []
        ),
        "",
        "| encoder | pretrain epochs | pretrain time s | s / epoch | linear probe top-1 | finetune top-1 |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['epochs']} | {r['train_time_s']:.1f} | {r['train_time_s'] / r['epochs']:.1f} | "
            f"{r['linprobe_top1']:.2f} | {r['finetune_top1']:.2f} |"
        )
    lines.append(f"| none (from scratch) | 0 | 0 | - | - | {scores['scratch-finetune']['final_top1']:.2f} |")
    if args.throughput:
        lines += ["", throughput_line(meta["throughput"])]
    (out / f"pretrain_{label}.md").write_text("\n".join(lines) + "\n")
    runs_json = {**results, "scratch": scores["scratch-finetune"]}
    (out / f"pretrain_{label}.json").write_text(json.dumps({"meta": meta, "runs": runs_json}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
