"""Accuracy over an evaluation set: top-1 and top-5, summed across processes."""

from __future__ import annotations

import csv
import io

import torch

from . import distributed
from .interrupt import worker_batches


@torch.no_grad()
def evaluate(model, loader, device, amp_dtype=None, channels_last=False, blank=None, confusion: int = 0) -> dict:
    """Top-1 / top-5 (%) over the whole evaluation set, summed across processes; top-5 is None for a
    model of 5 classes or fewer, where every label is among the top 5.

    ``blank``, an input batch, puts the processes in lockstep: a sharded (FSDP) model gathers its
    weights in every forward, so a process with fewer batches runs ``blank`` until all ran as many.
    ``confusion`` (the number of classes) adds ``"confusion"``: images counted by true class (rows) and top-1
    prediction (columns), on the CPU.
    """
    model.eval()
    totals = torch.zeros(3, device=device, dtype=torch.float64)  # top1 hits, top5 hits, count
    counts = torch.zeros(confusion * confusion, device=device, dtype=torch.int64)
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
            if confusion:
                counts += torch.bincount(y * confusion + top[:, 0], minlength=confusion * confusion)
    totals = distributed.sum_tensor(totals)
    extra = {"confusion": distributed.sum_tensor(counts).view(confusion, confusion).cpu()} if confusion else {}
    return {
        **extra,
        "top1": round(100 * totals[0].item() / totals[2].item(), 3),
        "top5": round(100 * totals[1].item() / totals[2].item(), 3) if classes is None or classes > 5 else None,
    }


def accuracy_text(metrics: dict, sep: str = ", ") -> str:
    """'top-1 91.20%, top-5 99.80%' (top-1 alone where top-5 says nothing: 5 classes or fewer)."""
    top5 = f"{sep}top-5 {metrics['top5']:.2f}%" if metrics.get("top5") is not None else ""
    return f"top-1 {metrics['top1']:.2f}%{top5}"


def per_class_text(confusion: torch.Tensor, classes: list[str], most: int = 5) -> str:
    """Each class's top-1 accuracy, worst first, and the ``most`` commonest confusions, from a confusion matrix
    (true class by row, prediction by column)."""
    total, right = confusion.sum(1).tolist(), confusion.diag().tolist()
    width = max(len(c) for c in classes)
    seen = sorted((c for c in range(len(classes)) if total[c]), key=lambda c: (right[c] / total[c], c))
    lines = ["  per class, worst first (top-1, images):"]
    lines += [f"    {classes[c]:<{width}}  {100 * right[c] / total[c]:6.2f}%  {total[c]:>7,}" for c in seen]
    if absent := [classes[c] for c in range(len(classes)) if not total[c]]:
        lines.append(
            f"    no images of {len(absent)} class(es): {', '.join(absent[:10])}{', ...' if len(absent) > 10 else ''}"
        )
    wrong = confusion.clone()
    wrong.fill_diagonal_(0)
    pairs = [divmod(i, len(classes)) for i in wrong.flatten().argsort(descending=True)[:most].tolist()]
    pairs = [(t, p) for t, p in pairs if wrong[t, p] > 0]
    if pairs:
        lines.append("  most often confused (true -> predicted):")
        for t, p in pairs:
            share = 100 * wrong[t, p].item() / total[t]
            lines.append(f"    {classes[t]} -> {classes[p]}: {int(wrong[t, p]):,} ({share:.1f}% of {classes[t]})")
    return "\n".join(lines)


def confusion_csv(confusion: torch.Tensor, classes: list[str]) -> str:
    """The confusion matrix as CSV: a header of predicted classes, a row per true class."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["true \\ predicted", *classes])
    writer.writerows([name, *row] for name, row in zip(classes, confusion.tolist(), strict=True))
    return out.getvalue()
