"""Check masksub's three sub branches on every timm model family installed here.

For each family (timm module) it takes the model with the least compute (parameters x default
input pixels, counted on the meta device), builds it at random init with a 5-class head re-drawn
so the output depends on the input, and for ``mask``, ``dropout`` and ``droppath``:

- ``wrap`` picks an adapter (or refuses with an error that is reported as is);
- in eval mode the wrapped model's main pass equals the plain model's output, bit for bit;
- the sub pass keeps the output shape and, for ``mask``, changes the output;
- a train-mode sub pass back-propagates finite gradients, and reaches the mask token if any;
- ``unwrap()`` gives back a model whose eval output equals the wrapped main pass.

Each family runs in a process of its own with a time limit, so one model that runs out of memory
or hangs costs only its row. Writes a JSON and a markdown table.

    python scripts/check_families.py                       # all families: ~40 min on 2 CPU cores
    python scripts/check_families.py --families vision_transformer resnet swin_transformer
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

KINDS = ("mask", "dropout", "droppath")
INSENSITIVE = "at init the output does not depend on the input"


def families() -> dict[str, list[str]]:
    import timm

    return {module: timm.list_models(module=module) for module in timm.list_modules()}


def input_size(model) -> tuple[int, int, int]:
    return tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))


SMALL_WORDS = ("test_", "atto", "femto", "pico", "nano", "tiny", "xxs", "xs", "mini", "small")


def smallest(names: list[str]) -> tuple[str, tuple[int, int, int]] | None:
    """The name with the least parameters x input pixels, counted on the meta device.

    Where the installed timm/torch cannot build on the meta device (timm 1.0.20 calls ``.item()``
    in ``__init__``), names are ranked by the size words in them and the first that builds wins.
    """
    import timm
    import torch

    best = None
    for name in names:
        try:
            with torch.device("meta"):
                model = timm.create_model(name)
        except Exception:  # a model that cannot be built from its defaults is not a candidate
            continue
        size = input_size(model)
        cost = sum(p.numel() for p in model.parameters()) * size[1] * size[2]
        if best is None or cost < best[0]:
            best = (cost, name, size)
    if best is not None:
        return best[1:]

    def rank(name: str) -> tuple[int, int]:
        return next((i for i, w in enumerate(SMALL_WORDS) if w in name), len(SMALL_WORDS)), len(name)

    for name in sorted(names, key=rank):
        try:
            size = input_size(timm.create_model(name))
        except Exception:
            continue
        return name, size
    return None


def check_kind(model, x, kind: str, sensitive: bool) -> str:
    import torch

    import masksub

    model.eval()
    with torch.no_grad():
        plain = model(x)
    wrapped = masksub.wrap(model, sub=kind, ratio=0.5)
    try:
        label = getattr(wrapped.branch, "name", type(wrapped.branch).__name__)
        wrapped.eval()
        with torch.no_grad():
            assert torch.equal(wrapped(x), plain), "main pass differs from the plain model"
            sub = wrapped(x, sub=True)
        assert sub.shape == plain.shape, f"sub output shape {tuple(sub.shape)} != {tuple(plain.shape)}"
        if kind == "mask" and sensitive:
            assert not torch.allclose(sub, plain), "masking did not change the output"
        wrapped.train()
        wrapped(x, sub=True).float().square().mean().backward()
        bad = [n for n, p in wrapped.named_parameters() if p.grad is not None and not p.grad.isfinite().all()]
        assert not bad, f"non-finite gradients in {bad[0]}"
        for name, p in wrapped.branch.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} gets no gradient"
        wrapped.eval()
        with torch.no_grad():
            main = wrapped(x)
    finally:
        model.zero_grad(set_to_none=True)
        restored = wrapped.unwrap()
    with torch.no_grad():
        assert torch.equal(restored.eval()(x), main), "unwrap() changed the model"
    if kind != "mask":
        return "ok"
    return f"ok ({label})" if sensitive else f"ok ({label}; the change is not checked: {INSENSITIVE})"


def check_family(family: str, names: list[str]) -> dict:
    import timm
    import torch

    picked = smallest(names)
    if picked is None:
        return {"family": family, "model": "", "error": "no model builds from its defaults"}
    name, size = picked
    row = {"family": family, "model": name, "input": list(size)}
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5)
    head = model.get_classifier()
    if isinstance(head, torch.nn.Linear):  # some heads start at zero: the output would not see the input
        torch.nn.init.normal_(head.weight, std=0.5)
    x = torch.rand(2, *size) + 0.5  # no exact zeros: zeroed pixels are the ones masked
    with torch.no_grad():
        sensitive = not torch.allclose(model.eval()(x), model(torch.rand_like(x)))
    for kind in KINDS:
        try:
            row[kind] = check_kind(model, x, kind, sensitive)
        except Exception as e:  # reported per row: this is the result being collected
            row[kind] = f"{type(e).__name__}: {str(e).splitlines()[0]}"
    return row


def run_one(family: str, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--one", family]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"family": family, "error": f"took longer than {timeout:.0f} s"}
    if done.returncode == -9:
        return {"family": family, "error": "killed (SIGKILL): out of memory at its default input size?"}
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        return {"family": family, "error": f"process failed (exit {done.returncode}): {tail}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _short(text: str, limit: int = 160) -> str:
    text = text.replace("|", "/")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def markdown(rows: list[dict], versions: str, command: str) -> str:
    head = "| family | model | input | mask | dropout | droppath |"
    lines = [
        f"Checked with {versions} on {os.cpu_count()} CPU cores ({platform.platform()}).",
        "",
        f"Command: `{command}`",
        "",
        head,
        "|---" * 6 + "|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['family']} | {r.get('model', '')} | | {r['error']} | | |")
            continue
        size = "x".join(map(str, r["input"][1:]))
        cells = [_short(r[k]) for k in KINDS]
        lines.append(f"| {r['family']} | {r['model']} | {size} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", nargs="*", help="timm module names (default: all)")
    p.add_argument("--out", type=Path, default=Path("families"), help="writes OUT.json and OUT.md")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--timeout", type=float, default=600, help="seconds per family")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        import torch

        torch.set_num_threads(1)
        print(json.dumps(check_family(args.one, families()[args.one])))
        return
    import timm
    import torch

    found = families()
    chosen = args.families or sorted(found)
    unknown = [f for f in chosen if f not in found]
    if unknown:
        p.error(f"unknown timm families {unknown}; installed ones: {', '.join(sorted(found))}")
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = []
        for row in pool.map(lambda f: run_one(f, args.timeout), chosen):
            print(row, flush=True)
            rows.append(row)
    versions = f"timm {timm.__version__}, torch {torch.__version__}"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"versions": versions, "rows": rows}, indent=1) + "\n")
    command = "python scripts/check_families.py " + " ".join(sys.argv[1:])
    args.out.with_suffix(".md").write_text(markdown(rows, versions, command))
    print(f"wrote {args.out.with_suffix('.md')} and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
