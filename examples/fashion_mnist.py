"""Train a small ViT on Fashion-MNIST twice, plain and with MaskSub, and print both test accuracies.

    python examples/fashion_mnist.py                    # 2 epochs each, a few minutes on 2 CPU cores
    python examples/fashion_mnist.py --epochs 25 --device cuda

Both runs share the seed, model, optimizer, schedule and data order; the only
difference is the MaskSub sub branch (ratio 0.5) and its distillation loss.
Short schedules underfit, and a regularizer may not help there: read the
numbers, don't assume them.
"""

from __future__ import annotations

import argparse
import time

import timm
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from tqdm import tqdm

import masksub
from masksub.data import MEAN, STD, load_fashion_mnist
from masksub.masking import check_ratio


def base_parser(description: str) -> argparse.ArgumentParser:
    """The model, data and optimizer options both Fashion-MNIST examples share."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--sub", default="mask", choices=masksub.wrapper.SUB_KINDS)
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--width", type=int, default=96)
    p.add_argument("--train-images", type=int, default=None, help="use only the first N training images")
    p.add_argument("--test-images", type=int, default=None, help="evaluate on the first N test images")
    p.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST IDX files")
    p.add_argument("--seed", type=int, default=0)
    return p


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace, positive: tuple) -> argparse.Namespace:
    """Refuse the values that would otherwise end in a traceback later: ``positive`` options below 1 (unset
    ones aside) and a --ratio out of [0, 1)."""
    for key in positive:
        value = getattr(args, key)
        if value is not None and value < 1:
            p.error(f"--{key.replace('_', '-')} must be at least 1, got {value}")
    try:
        check_ratio(args.ratio, "--ratio")
    except (TypeError, ValueError) as e:
        p.error(str(e))
    return args


def checked_args(p: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse the options of ``base_parser`` (and more), checked."""
    positive = ("epochs", "batch_size", "depth", "width", "train_images", "test_images")
    args = check_args(p, p.parse_args(argv), positive)
    heads = heads_of(args.width)
    if args.width % heads:
        p.error(
            f"--width {args.width} does not split into {heads} attention heads (one per 32): use a multiple of {heads}"
        )
    return args


def heads_of(width: int) -> int:
    return max(1, width // 32)


def load_data(args) -> tuple[tuple, tuple]:
    """The (images, labels) of the training and test splits, cut to --train-images / --test-images."""
    try:
        train_set, test_set = (load_fashion_mnist(split, args.data_dir) for split in ("train", "test"))
    except (FileNotFoundError, ValueError) as e:  # missing or corrupt files: the message says what to do
        raise SystemExit(f"error: {e}") from None
    return tuple(t[: args.train_images] for t in train_set), tuple(t[: args.test_images] for t in test_set)


def parse_args(argv=None):
    p = base_parser(__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    return checked_args(p, argv)


def to_input(images: torch.Tensor, device: str) -> torch.Tensor:
    """uint8 (B, 28, 28) -> normalized float (B, 1, 28, 28)."""
    return ((images.to(device).float() / 255.0 - MEAN) / STD).unsqueeze(1)


def make_model(args) -> torch.nn.Module:
    torch.manual_seed(args.seed)
    return timm.create_model(
        "vit_tiny_patch16_224",
        img_size=28,
        patch_size=4,
        in_chans=1,
        num_classes=10,
        embed_dim=args.width,
        depth=args.depth,
        num_heads=heads_of(args.width),
    ).to(args.device)


@torch.no_grad()
def evaluate(model, images, labels, device) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(images), 1000):
        logits = model(to_input(images[i : i + 1000], device))
        correct += (logits.argmax(-1).cpu() == labels[i : i + 1000]).sum().item()
    return 100.0 * correct / len(images)


def train(args, use_masksub: bool, train_set, test_set) -> tuple[float, float]:
    model = make_model(args)
    if use_masksub:
        model = masksub.wrap(model, sub=args.sub, ratio=args.ratio)
    optimizer = create_optimizer_v2(model, "adamw", lr=args.lr, weight_decay=args.weight_decay)
    images, labels = train_set
    steps_per_epoch = len(images) // args.batch_size
    if steps_per_epoch == 0:
        raise SystemExit(f"{len(images)} training images make no batch of {args.batch_size}: lower --batch-size")
    scheduler = CosineLRScheduler(
        optimizer,
        t_initial=args.epochs * steps_per_epoch,
        warmup_t=steps_per_epoch // 2,
        warmup_lr_init=1e-5,
        t_in_epochs=False,  # stepped per update
    )
    step = masksub.Step(model, optimizer, torch.nn.CrossEntropyLoss()) if use_masksub else None
    generator = torch.Generator().manual_seed(args.seed)  # the same data order for both runs
    start = time.perf_counter()
    name = f"{masksub.wrapper.METHOD_NAMES[args.sub]} {args.ratio}" if use_masksub else "plain"
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(images), generator=generator)
        bar = tqdm(range(steps_per_epoch), desc=f"{name:>12} epoch {epoch + 1}/{args.epochs}", leave=False)
        for i in bar:
            idx = order[i * args.batch_size : (i + 1) * args.batch_size]
            x, y = to_input(images[idx], args.device), labels[idx].to(args.device)
            if step is not None:
                loss = step(x, y)["loss"]
            else:
                optimizer.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                optimizer.step()
            scheduler.step_update(epoch * steps_per_epoch + i + 1)
            if i % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
        accuracy = evaluate(model, *test_set, args.device)
        print(f"{name:>12} epoch {epoch + 1}/{args.epochs}: test accuracy {accuracy:.2f}%")
    return accuracy, time.perf_counter() - start


def main(argv=None) -> dict:
    args = parse_args(argv)
    train_set, test_set = load_data(args)
    print(f"Fashion-MNIST: {len(train_set[0])} train / {len(test_set[0])} test images; ViT {args.depth}x{args.width}")
    plain_acc, plain_time = train(args, False, train_set, test_set)
    sub_acc, sub_time = train(args, True, train_set, test_set)
    print(f"\nafter {args.epochs} epochs on {args.device}:")
    sub = f"{masksub.wrapper.METHOD_NAMES[args.sub]}, ratio {args.ratio}"
    for name, acc, seconds in (("plain", plain_acc, plain_time), (sub, sub_acc, sub_time)):
        print(f"  {name:<22} test accuracy {acc:6.2f}%   {seconds:6.1f} s")
    print(f"  difference {sub_acc - plain_acc:+.2f} points at {sub_time / plain_time:.2f}x the training time")
    return {"plain": plain_acc, "masksub": sub_acc, "plain_seconds": plain_time, "masksub_seconds": sub_time}


if __name__ == "__main__":
    main()
