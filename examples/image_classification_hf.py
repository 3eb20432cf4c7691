"""Train a Hugging Face image classifier with MaskSub in the Trainer on Fashion-MNIST, and print its accuracy.

    python examples/image_classification_hf.py                  # a small ViTForImageClassification, from scratch
    python examples/image_classification_hf.py --sub none       # the plain Trainer, same settings
    python examples/image_classification_hf.py --model google/vit-base-patch16-224-in21k --image-size 224 \\
        --lr 5e-5 --batch-size 32                               # fine-tune a pretrained checkpoint

The data is Fashion-MNIST from its IDX files (``masksub.data``; Debian's ``dataset-fashion-mnist``).
Without ``--model`` the classifier is a ViT built from a configuration (28 px, patch 4, 4 layers
96 wide), whose sub branch drops patch tokens (the ``hf_vit`` adapter). With ``--model`` the images
are resized to ``--image-size`` and repeated to the model's channels. Models masked in blocks of pixels
(Swin, BEiT, CNNs) need a ``--unit`` that leaves more than one block per image: 32 (the default) at
224 px, 8 at 32 px.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from fashion_mnist import check_args  # the argument checks of the hand-written loop's example

from masksub.data import CLASSES, MEAN, STD, load_fashion_mnist
from masksub.hf import MaskSubTrainer


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="hub name or local folder of an image classifier (default: a small ViT)")
    p.add_argument("--image-size", type=int, default=28, help="images are resized to this (28: as stored)")
    p.add_argument("--data-dir", help="folder of the Fashion-MNIST IDX files (default: found as masksub.data does)")
    p.add_argument("--train-images", type=int, help="train on the first N training images (default: all 60,000)")
    p.add_argument("--test-images", type=int, help="evaluate on the first N test images (default: all 10,000)")
    p.add_argument("--sub", default="mask", choices=["mask", "dropout", "none"])
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument(
        "--unit", type=int, help="mask block in pixels for models masked in blocks (Swin, CNNs; default: 32)"
    )
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--max-steps", type=int, default=-1, help="stop after this many optimizer steps (-1: epochs)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/image_classification_hf")
    return check_args(p, p.parse_args(argv), ("image_size", "train_images", "test_images", "batch_size", "unit"))


class FashionMNIST(torch.utils.data.Dataset):
    """Fashion-MNIST images as normalized float tensors (channels, size, size), with their labels."""

    def __init__(self, split: str, data_dir: str | None, limit: int | None, channels: int, size: int):
        images, self.labels = load_fashion_mnist(split, data_dir)
        images, self.labels = images[:limit], self.labels[:limit]
        x = (images.float().div(255) - MEAN) / STD
        if size != x.shape[-1]:
            x = F.interpolate(x[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
        self.images = x[:, None].expand(-1, channels, -1, -1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.images[i], "labels": self.labels[i]}


def small_vit() -> transformers.PreTrainedModel:
    config = transformers.ViTConfig(
        image_size=28, patch_size=4, num_channels=1, hidden_size=96, num_hidden_layers=4, num_attention_heads=3,
        intermediate_size=384, num_labels=len(CLASSES), id2label=dict(enumerate(CLASSES)),
        label2id={c: i for i, c in enumerate(CLASSES)},
    )  # fmt: skip
    return transformers.ViTForImageClassification(config)


def accuracy(pred) -> dict:
    return {"accuracy": float((np.argmax(pred.predictions, axis=-1) == pred.label_ids).mean())}


def main(argv=None) -> dict:
    args = parse_args(argv)
    transformers.set_seed(args.seed)
    if args.model is None:
        if args.image_size != 28:
            raise SystemExit("the default model takes 28 px images; pass --model to train at another --image-size")
        model = small_vit()
    else:
        labels = dict(num_labels=len(CLASSES), id2label=dict(enumerate(CLASSES)))
        try:
            model = transformers.AutoModelForImageClassification.from_pretrained(
                args.model, **labels, ignore_mismatched_sizes=True
            )
        except (OSError, ValueError) as e:  # not on the hub, not reachable, or not an image classifier
            raise SystemExit(f"error: cannot load --model {args.model}: {e}") from None
    channels = getattr(model.config, "num_channels", 3)
    try:
        train = FashionMNIST("train", args.data_dir, args.train_images, channels, args.image_size)
        test = FashionMNIST("test", args.data_dir, args.test_images, channels, args.image_size)
    except (FileNotFoundError, ValueError) as e:  # missing or corrupt files: the message says what to do
        raise SystemExit(f"error: {e}") from None
    training = transformers.TrainingArguments(
        output_dir=args.out,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=256,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        warmup_steps=len(train) // (2 * args.batch_size),  # half an epoch, as the fashion_mnist_vit recipe
        eval_strategy="epoch",
        logging_strategy="epoch",
        save_strategy="no",
        report_to=[],
        seed=args.seed,
    )
    common = dict(model=model, args=training, train_dataset=train, eval_dataset=test, compute_metrics=accuracy)
    if args.sub == "none":
        trainer = transformers.Trainer(**common)
    else:
        options = {"unit": args.unit} if args.sub == "mask" and args.unit else {}
        trainer = MaskSubTrainer(**common, sub=args.sub, ratio=args.ratio, mask_options=options)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    metrics = trainer.evaluate()
    trainer.save_model(f"{args.out}/model")
    adapter = getattr(getattr(trainer, "sub_branch", None), "name", None)
    summary = {"sub": args.sub, "ratio": args.ratio, "adapter": adapter, "train_seconds": round(seconds, 1)}
    summary.update({k: metrics[k] for k in ("eval_accuracy", "eval_loss")})
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
