"""Gradient reductions per optimizer step under DDP and FSDP: plain step, masksub.Step, research-style step.

    python benchmarks/ddp_comm.py                 # 2 CPU processes (gloo), ViT-S/16 at 64 px
    python benchmarks/ddp_comm.py --tiny          # a tiny ViT, for the test suite

DDP: counts, with a communication hook (`masksub.train.distributed.count_allreduces`), the
all-reduce rounds (every bucket once per synced backward) and the gradient elements sent per
optimizer step. Expected: 1, 1 and 2 rounds.
FSDP (`fully_shard` on every block and the root; torch >= 2.6): counts the reduce-scatters
(`ReduceScatterCount`) and the gradient elements they reduce. Expected: one per sharded module for
the plain and MaskSub steps, two for the research-style step, and one per module and backward for
MaskSub with `sync_every_backward=True`. Under FSDP it also measures each process's peak tensor memory in
an optimizer step without accumulation (the profiler's allocation events, over what the process held
before the step): an unsynced main backward holds whole gradients until the sub backward reduces them.
Writes results/ddp_comm.json and results/ddp_comm.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from common import cpu_peak_bytes
from torch.nn.parallel import DistributedDataParallel as DDP

import masksub
from masksub.train.distributed import ReduceScatterCount, count_allreduces, exit_without_teardown

try:
    from torch.distributed.fsdp import fully_shard
except ImportError:  # torch < 2.6
    fully_shard = None

STEPS = ("plain", "masksub", "masksub_every", "research")  # masksub_every: sync_every_backward=True


STEP_NAMES = {
    "plain": "plain",
    "masksub": "MaskSub",
    "masksub_every": "MaskSub, sync_every_backward",
    "research": "research-code style",
}


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


def step_peak_mib(kind: str, model, step, batch: int, size: int, repeats: int = 3) -> float:
    """Peak tensor memory of one optimizer step, over what was held before it (the optimizer state made by a
    step before it; the gradients set to None, as every step starts); the median of `repeats` steps, as the
    collectives' buffers are not always freed at the same point."""
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
    if kind == "research":
        one = lambda: research_step(model, step.optimizer, x, y, step.loss.sub_loss)  # noqa: E731
    else:
        one = lambda: step(x, y)  # noqa: E731
    peaks = []
    one()  # makes the optimizer state
    for _ in range(repeats):
        step.optimizer.zero_grad(set_to_none=True)
        peaks.append(cpu_peak_bytes(one) / 2**20)
    return statistics.median(peaks)


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
            every = kind == "masksub_every"
            loss = torch.nn.CrossEntropyLoss()
            step = masksub.Step(model, opt, loss, accum_steps=args.accum, sync_every_backward=every)
            results[parallel][kind] = measure(kind, model, step, args, size, counter)
            if parallel == "fsdp":
                step = masksub.Step(model, opt, loss, sync_every_backward=every)  # no accumulation
                results[parallel][kind]["peak_mib"] = step_peak_mib(kind, model, step, args.batch, size)
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
                f"| {label} | {STEP_NAMES[kind]} | {r['accum_steps']} | {r['reduction_rounds_per_step'][-1]} | "
                f"{ratio:.2f} |"
            )
    if "fsdp_modules" in results:
        fsdp = results["fsdp"]
        whole = fsdp["plain"]["gradient_elements"] * 4 / 2**20
        lines += [
            "",
            f"FSDP shards {results['fsdp_modules']} modules (every block and the root).",
            "",
            f"FSDP, peak tensor memory of one optimizer step (no accumulation) on process 0, over what it held "
            f"before the step; the model's whole fp32 gradients are {whole:.1f} MiB, a shard of them "
            f"{whole / args.world:.1f} MiB:",
            "",
            "| step | peak MiB | / plain |",
            "|---|---|---|",
            *(
                f"| {STEP_NAMES[k]} | {r['peak_mib']:.1f} | {r['peak_mib'] / fsdp['plain']['peak_mib']:.2f} |"
                for k, r in fsdp.items()
            ),
        ]
    (out / "ddp_comm.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
