"""The sub branch's distillation over a language model's vocabulary, forward and backward: masksub's loss
(``SubBranchLoss.sub_loss``: float32 chunks of rows, a backward of its own) against the same loss written on whole
float32 arrays (softmax, log-softmax and their product, as autograd keeps them), side by side in one run.

    python benchmarks/distill_cost.py --scale cpu    # 1,024 rows x 49,152 classes (SmolLM2's vocabulary), 2 cores
    python benchmarks/distill_cost.py --scale gpu    # 8,192 rows x 151,936 classes (Qwen2.5's), one GPU
    python benchmarks/distill_cost.py --scale tiny   # the test suite's

Both get the same logits (bf16, as autocast gives them, and fp32) and a mean over the rows; the tables give the
median seconds of a forward and backward over alternating rounds and the peak of the memory each allocates over
its inputs (a GPU: the allocator's peak; a CPU: the profiler's allocation events). Writes
``results/distill_cost_<scale>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import alternating_step_times, cpu_peak_bytes, hardware

from masksub.loss import SubBranchLoss

SCALES = {  # rows (batch x length), classes, device, alternating rounds
    "gpu": (8192, 151936, "cuda", 5),
    "cpu": (1024, 49152, "cpu", 5),
    "tiny": (64, 1000, "cpu", 2),
}


def whole_arrays(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The distillation as autograd computes it on whole float32 arrays."""
    return -(F.softmax(teacher.float(), -1) * F.log_softmax(student.float(), -1)).sum(-1).mean()


def peak_bytes(fn, device: torch.device) -> int:
    if device.type != "cuda":
        return cpu_peak_bytes(fn)
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - held


def bench(rows: int, classes: int, dtype: torch.dtype, device: torch.device, rounds: int) -> dict:
    g = torch.Generator(device).manual_seed(0)
    student = torch.randn(rows, classes, generator=g, device=device).to(dtype).requires_grad_()
    teacher = torch.randn(rows, classes, generator=g, device=device).to(dtype)
    masksub_loss = SubBranchLoss(torch.nn.CrossEntropyLoss())
    losses = {
        "masksub": lambda: masksub_loss.sub_loss(student, teacher),
        "whole arrays": lambda: whole_arrays(student, teacher),
    }

    def step(loss):
        def run():
            loss().backward()
            student.grad = None

        return run

    steps = {name: step(loss) for name, loss in losses.items()}
    times = alternating_step_times(steps, device.type == "cuda", warmup=1, rounds=rounds, calls=2)
    values = {name: loss().item() for name, loss in losses.items()}
    result = {name: {"s": times[name], "peak_gib": peak_bytes(steps[name], device) / 2**30} for name in steps}
    result["loss_difference"] = abs(values["masksub"] - values["whole arrays"])
    return result


def markdown(data: dict) -> str:
    meta = data["meta"]
    lines = [
        f"torch {meta['torch']}; {meta['hardware']}; {meta['date']}.",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"{meta['rows']:,} rows x {meta['classes']:,} classes, forward and backward of the mean over the rows.",
        "",
        "| logits | masksub ms | whole arrays ms | masksub / whole arrays | masksub peak GiB | whole arrays peak GiB "
        "| peak ratio | loss difference |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for dtype, r in data["results"].items():
        a, b = r["masksub"], r["whole arrays"]
        lines.append(
            f"| {dtype} | {a['s'] * 1e3:.1f} | {b['s'] * 1e3:.1f} | {a['s'] / b['s']:.3f} | {a['peak_gib']:.3f} | "
            f"{b['peak_gib']:.3f} | {a['peak_gib'] / b['peak_gib']:.3f} | {r['loss_difference']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scale", choices=tuple(SCALES), default="cpu")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()
    rows, classes, device, rounds = SCALES[args.scale]
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("--scale gpu needs CUDA; on this machine use --scale cpu (or --scale tiny)")
    device = torch.device(device)
    meta = {
        "torch": torch.__version__,
        "hardware": hardware(device.type),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python " + " ".join(sys.argv),
        "rows": rows,
        "classes": classes,
    }
    data = {"meta": meta, "results": {}}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        data["results"][name] = bench(rows, classes, dtype, device, rounds)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"distill_cost_{args.scale}.json").write_text(json.dumps(data, indent=2))
    (out / f"distill_cost_{args.scale}.md").write_text(markdown(data))
    print(markdown(data))


if __name__ == "__main__":
    main()
