"""Reading speed of the trainer's data sources on the same images: an image folder (``data.name=folder``), a tar
(``tar``), Hugging Face parquet files and WebDataset shards (``hfds/<folder>``).

    python benchmarks/data_sources.py                     # 4,000 JPEGs of 224 px, 5 rounds; ~4 min on 2 cores
    python benchmarks/data_sources.py --scale tiny        # seconds; the test suite

Writes Fashion-MNIST's first training images, upscaled to 224x224 RGB JPEGs (quality 90: a decode cost like
ImageNet's), into each layout in a temporary folder. Then times, for each: opening the split as ``masksub train``
does (the folder walk, the tar scan, the datasets package's first conversion to an Arrow table and a second
opening from its cache), and reading every image through the trainer's evaluation transform (decode, resize,
crop, normalize) in one process, the layouts taking turns in each round. Writes
results/data_sources_<scale>.{json,md}.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
from common import hardware
from PIL import Image

SCALES = {
    "tiny": dict(images=48, size=64, rounds=1, shard=16),
    "cpu": dict(images=4000, size=224, rounds=5, shard=1000),
}
LAYOUTS = ("folder", "tar", "parquet", "webdataset")


def _jpegs(n: int, size: int) -> list[tuple[bytes, int]]:
    from masksub.data import load_fashion_mnist

    x, y = load_fashion_mnist("train")
    out = []
    for i in range(n):
        img = Image.fromarray(x[i].numpy()).convert("RGB").resize((size, size), Image.BICUBIC)
        buffer = io.BytesIO()
        img.save(buffer, format="JPEG", quality=90)
        out.append((buffer.getvalue(), int(y[i])))
    return out


def _tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def write_layouts(root: Path, images: list[tuple[bytes, int]], shard: int) -> None:
    import datasets

    from masksub.data import CLASSES

    for i, (data, label) in enumerate(images):
        folder = root / "folder" / "train" / f"c{label}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:06d}.jpg").write_bytes(data)
    (root / "tar").mkdir()
    _tar(root / "tar" / "train.tar", {f"c{label}/{i:06d}.jpg": data for i, (data, label) in enumerate(images)})
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(CLASSES))})
    rows = {"image": [{"bytes": d, "path": None} for d, _ in images], "label": [label for _, label in images]}
    (root / "parquet").mkdir()
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(root / "parquet" / "train-00000.parquet"))
    (root / "webdataset").mkdir()
    for start in range(0, len(images), shard):
        members = {}
        for i in range(start, min(start + shard, len(images))):
            members |= {f"{i:06d}.jpg": images[i][0], f"{i:06d}.cls": str(images[i][1]).encode()}
        _tar(root / "webdataset" / f"train-{start // shard:04d}.tar", members)


def open_split(layout: str, root: Path, cache: Path):
    """The training split as the trainer opens it for ``layout``."""
    from masksub.train.data import ImageFolder
    from masksub.train.sources import HfDataset, TarImages

    if layout == "folder":
        return ImageFolder(root / "folder" / "train", "skip", 3)
    if layout == "tar":
        return TarImages(str(root / "tar"), "train", 3)
    keys = {"image_key": "jpg", "label_key": "cls"} if layout == "webdataset" else {}
    return HfDataset(f"hfds/{root / layout}", str(cache), "train", 3, **keys)


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scale", default="cpu", choices=sorted(SCALES))
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args(argv)
    s = SCALES[args.scale]
    from masksub.train.config import load_config
    from masksub.train.transforms import build_transforms

    cfg = load_config(None, {"data.img_size": s["size"], "data.in_chans": 3, "aug.preset": "timm"})
    cfg.aug.mean, cfg.aug.std = (0.5,), (0.5,)  # given: the transform needs no model for them
    transform = build_transforms(cfg, None)[1]
    torch.set_num_threads(1)  # one loader process's cost: a worker runs one thread
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        images, written_s = _timed(lambda: _jpegs(s["images"], s["size"]))
        write_layouts(root, images, s["shard"])
        sets, results = {}, {}
        for layout in LAYOUTS:
            sets[layout], first = _timed(lambda layout=layout: open_split(layout, root, root / "cache"))
            _, again = _timed(lambda layout=layout: open_split(layout, root, root / "cache"))
            assert len(sets[layout]) == s["images"], (layout, len(sets[layout]))
            results[layout] = {"open_s": first, "open_again_s": again, "read_s": []}
        for _ in range(s["rounds"]):
            for layout in LAYOUTS:
                ds = sets[layout]
                _, took = _timed(lambda ds=ds: [transform(ds[i][0]) for i in range(len(ds))])
                results[layout]["read_s"].append(took)
    base = statistics.median(results["folder"]["read_s"])
    for r in results.values():
        r["images_per_s"] = s["images"] / statistics.median(r["read_s"])
        r["read_vs_folder"] = statistics.median(r["read_s"]) / base
    meta = {
        "command": " ".join(["python benchmarks/data_sources.py", *(sys.argv[1:] if argv is None else argv)]),
        "hardware": hardware("cpu"),
        "torch": torch.__version__,
        "images": s["images"],
        "size": s["size"],
        "rounds": s["rounds"],
        "jpeg_bytes_mean": sum(len(d) for d, _ in images) / len(images),
        "jpegs_made_s": written_s,
    }
    import datasets
    import timm

    meta |= {"timm": timm.__version__, "datasets": datasets.__version__}
    names = {"folder": "folder", "tar": "tar", "parquet": "hfds/ parquet", "webdataset": "hfds/ WebDataset shards"}
    lines = [
        f"Command: `{meta['command']}`; {meta['hardware']}; torch {meta['torch']}, timm {meta['timm']}, "
        f"datasets {meta['datasets']}.",
        "",
        f"{s['images']:,} JPEGs of {s['size']}x{s['size']} RGB (mean {meta['jpeg_bytes_mean'] / 1024:.1f} KiB), read "
        f"by one process through the evaluation transform; median of {s['rounds']} round(s), layouts taking turns.",
        "",
        "| layout | open (s) | open again (s) | read all (s): median, min to max | images/s (median) "
        "| read time vs folder |",
        "|---|---|---|---|---|---|",
    ]
    for layout, r in results.items():
        lines.append(
            f"| {names[layout]} | {r['open_s']:.2f} | {r['open_again_s']:.2f} | {statistics.median(r['read_s']):.2f}, "
            f"{min(r['read_s']):.2f} to {max(r['read_s']):.2f} | {r['images_per_s']:.0f} | "
            f"{r['read_vs_folder']:.2f} |"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"data_sources_{args.scale}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    (args.out / f"data_sources_{args.scale}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return results


if __name__ == "__main__":
    main()
