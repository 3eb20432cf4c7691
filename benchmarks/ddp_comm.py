"""Gradient reductions per optimizer step under DDP and FSDP: plain step, masksub.Step, research-style step.

    python benchmarks/ddp_comm.py                 # 2 CPU processes (gloo), ViT-S/16 at 64 px
    python benchmarks/ddp_comm.py --tiny          # a tiny ViT, for the test suite

DDP: counts, with a communication hook (`masksub.train.distributed.count_allreduces`), the
all-reduce rounds (every bucket once per synced backward) and the gradient elements sent per
optimizer step. Expected: 1, 1 and 2 rounds.
FSDP (`fully_shard` on every block and the root; torch >= 2.6): counts the reduce-scatters
(`ReduceScatterCount`) and the gradient elements they reduce. Expected: one per sharded module for
the plain and MaskSub steps, two for the research-style step.
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
from masksub.train.distributed import ReduceScatterCount, count_allreduces, exit_without_teardown

try:
    from torch.distributed.fsdp import fully_shard
except ImportError:  # torch < 2.6
    fully_shard = None

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


def shard(net: torch.nn.Module) -> torch.nn.Module:
    """fully_shard every block, then the root (the wrapper, or the plain model)."""
    inner = getattr(net, "model", net)
    for block in inner.blocks:
        fully_shard(block)
    return fully_shard(net)


def measure(kind: str, model, step, args, size: int, counter) -> dict:
    """Steps of ``kind``; ``counter()`` gives a context whose ``rounds`` / ``elements`` count while active."""
    opt = step.optimizer
    per_step = []
    for _ in range(args.steps):
        with counter() as count:
            for _ in range(args.accum if kind != "research" else 1):
                x, y = torch.randn(args.batch, 3, size, size), torch.randint(0, 10, (args.batch,))
                if kind == "research":
                    research_step(model, opt, x, y, step.loss.sub_loss)
                else:
                    step(x, y)
        per_step.append((count.rounds, count.elements))
    return {
        "reduction_rounds_per_step": [r for r, _ in per_step],
        "elements_per_step": [e for _, e in per_step],
        "gradient_elements": sum(p.numel() for p in build(args.tiny).parameters()),
        "accum_steps": args.accum if kind != "research" else 1,
    }


class DDPCounter:
    """The all-reduces a DDP model's hook counts between entering and leaving."""

    def __init__(self, count):
        self.count = count

    def __enter__(self):
        self.start = (self.count.rounds, self.count.elements)
        return self

    def __exit__(self, *exc):
        self.rounds, self.elements = self.count.rounds - self.start[0], self.count.elements - self.start[1]


def worker(rank: int, world: int, init: str, args, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    size = 32 if args.tiny else 64
    results = {"ddp": {}, "fsdp": {}}
    for parallel in ("ddp", "fsdp") if fully_shard is not None else ("ddp",):
        for kind in STEPS:
            net = build(args.tiny) if kind == "plain" else masksub.wrap(build(args.tiny))
            if parallel == "ddp":
                model = DDP(net)
                count = count_allreduces(model)
                counter = lambda count=count: DDPCounter(count)  # noqa: E731
            else:
                model = net = shard(net)
                counter = ReduceScatterCount
            opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
            step = masksub.Step(model, opt, torch.nn.CrossEntropyLoss(), accum_steps=args.accum)
            results[parallel][kind] = measure(kind, model, step, args, size, counter)
        if parallel == "fsdp":
            results["fsdp_modules"] = 1 + len(build(args.tiny).blocks)
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
        "| parallel | step | micro-batches per step | gradient reductions per step | "
        "gradient elements reduced per step / model gradient elements |",
        "|---|---|---|---|---|",
    ]
    for parallel, label in (("ddp", "DDP (all-reduce rounds)"), ("fsdp", "FSDP (reduce-scatters)")):
        for kind, r in results.get(parallel, {}).items():
            ratio = r["elements_per_step"][-1] / r["gradient_elements"]
            lines.append(
                f"| {label} | {kind} | {r['accum_steps']} | {r['reduction_rounds_per_step'][-1]} | {ratio:.2f} |"
            )
    if "fsdp_modules" in results:
        lines += ["", f"FSDP shards {results['fsdp_modules']} modules (every block and the root)."]
    (out / "ddp_comm.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
