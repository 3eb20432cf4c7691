"""Accuracy over an evaluation set: top-1 and top-5, summed across processes."""

from __future__ import annotations

import torch

from . import distributed
from .interrupt import worker_batches


@torch.no_grad()
def evaluate(model, loader, device, amp_dtype=None, channels_last=False, blank=None) -> dict:
    """Top-1 / top-5 (%) over the whole evaluation set, summed across processes; top-5 is None for a
    model of 5 classes or fewer, where every label is among the top 5.

    ``blank``, an input batch, puts the processes in lockstep: a sharded (FSDP) model gathers its
    weights in every forward, so a process with fewer batches runs ``blank`` until all ran as many.
    """
    model.eval()
    totals = torch.zeros(3, device=device, dtype=torch.float64)  # top1 hits, top5 hits, count
    classes = None
    if blank is not None:
        most = distributed.max_int(len(loader), device)
        for _ in range(most - len(loader)):
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                model(blank)
    with worker_batches(loader) as batches:
        for x, y in batches:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = model(x)
            classes = logits.shape[1]
            top = logits.topk(min(5, classes), dim=1).indices
            hits = top == y[:, None]
            totals += torch.stack([hits[:, 0].sum(), hits.any(1).sum(), torch.tensor(len(y), device=device)]).double()
    totals = distributed.sum_tensor(totals)
    return {
        "top1": round(100 * totals[0].item() / totals[2].item(), 3),
        "top5": round(100 * totals[1].item() / totals[2].item(), 3) if classes is None or classes > 5 else None,
    }


def accuracy_text(metrics: dict, sep: str = ", ") -> str:
    """'top-1 91.20%, top-5 99.80%' (top-1 alone where top-5 says nothing: 5 classes or fewer)."""
    top5 = f"{sep}top-5 {metrics['top5']:.2f}%" if metrics.get("top5") is not None else ""
    return f"top-1 {metrics['top1']:.2f}%{top5}"
