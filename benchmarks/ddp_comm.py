"""Gradient all-reduces per optimizer step under DDP: plain step, masksub.Step, research-style step.

    python benchmarks/ddp_comm.py                 # 2 CPU processes (gloo), ViT-S/16 at 64 px
    python benchmarks/ddp_comm.py --tiny          # a tiny ViT, for the test suite

Counts, with a DDP communication hook (`masksub.train.distributed.count_allreduces`), the
all-reduce rounds (every bucket once per synced backward) and the gradient elements sent per
optimizer step. Expected: 1, 1 and 2 rounds.
Writes results/ddp_comm.json and results/ddp_comm.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import masksub
from masksub.train.distributed import count_allreduces, exit_without_teardown

STEPS = ("plain", "masksub", "research")


def build(tiny: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    if tiny:
        return timm.create_model(
            "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2, num_classes=10
        )
    return timm.create_model("vit_small_patch16_224", img_size=64, num_classes=10)


def research_step(model, opt, x, y, sub_loss):
    """Two forwards, two backwards, no no_sync: how the research scripts step under DDP."""
    opt.zero_grad(set_to_none=True)
    main = model(x)
    (0.5 * F.cross_entropy(main, y)).backward()
    (0.5 * sub_loss(model(x, sub=True), main)).backward()
    opt.step()


def worker(rank: int, world: int, init: str, args, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    size = 32 if args.tiny else 64
    results = {}
    for kind in STEPS:
        net = build(args.tiny) if kind == "plain" else masksub.wrap(build(args.tiny))
        model = DDP(net)
        count = count_allreduces(model)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
        step = masksub.Step(model, opt, torch.nn.CrossEntropyLoss(), accum_steps=args.accum)
        per_step = []
        for _ in range(args.steps):
            before = (count.rounds, count.elements)
            for _ in range(args.accum if kind != "research" else 1):
                x, y = torch.randn(args.batch, 3, size, size), torch.randint(0, 10, (args.batch,))
                if kind == "research":
                    research_step(model, opt, x, y, step.loss.sub_loss)
                else:
                    step(x, y)
            per_step.append((count.rounds - before[0], count.elements - before[1]))
        numel = sum(p.numel() for p in net.parameters())
        results[kind] = {
            "allreduce_rounds_per_step": [r for r, _ in per_step],
            "elements_sent_per_step": [s for _, s in per_step],
            "gradient_elements": numel,
            "accum_steps": args.accum if kind != "research" else 1,
        }
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    exit_without_teardown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--accum", type=int, default=2, help="micro-batches per step for the plain and masksub steps")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(args.world, f"{tmp}/init", args, f"{tmp}/out.json"), nprocs=args.world, join=True)
        results = json.loads(Path(f"{tmp}/out.json").read_text())
    meta = {
        "command": "python " + " ".join(sys.argv),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "hardware": f"{args.world} CPU processes (gloo) on {platform.processor() or platform.machine()}",
        "model": "tiny ViT" if args.tiny else "vit_small_patch16_224 at 64 px",
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ddp_comm.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    lines = [
        f"Command: `{meta['command']}`; torch {meta['torch']}, timm {meta['timm']}; {meta['hardware']}; "
        f"{meta['model']}.",
        "",
        "| step | micro-batches per step | all-reduce rounds per step | "
        "gradient elements sent per step / model gradient elements |",
        "|---|---|---|---|",
    ]
    for kind, r in results.items():
        ratio = r["elements_sent_per_step"][-1] / r["gradient_elements"]
        lines.append(f"| {kind} | {r['accum_steps']} | {r['allreduce_rounds_per_step'][-1]} | {ratio:.2f} |")
    (out / "ddp_comm.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
