"""Train a small ViT on Fashion-MNIST with PyTorch Lightning, plain and with MaskSub, and print both test accuracies.

    python examples/lightning_fashion_mnist.py                       # 2 epochs each on the CPU
    python examples/lightning_fashion_mnist.py --accelerator gpu --devices 2 --precision bf16-mixed --epochs 25

MaskSub is one line in ``training_step``: ``return self.masksub(self, x, y)``. Both runs share the seed, model,
optimizer, schedule (timm's cosine, stepped per update) and data order; the only difference is the sub
branch and its distillation loss. Short schedules underfit, and a regularizer may not help there.
"""

from __future__ import annotations

import argparse
import time

import lightning as L
import torch
import torch.nn.functional as F

# the hand-written loop's options, data, model and input
from fashion_mnist import base_parser, checked_args, load_data, make_model, to_input
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler

import masksub
from masksub.lightning import TrainingStep


class FashionClassifier(L.LightningModule):
    def __init__(self, args, use_masksub: bool):
        super().__init__()
        self.args = args
        model = make_model(argparse.Namespace(**{**vars(args), "device": "cpu"}))
        self.model = masksub.wrap(model, sub=args.sub, ratio=args.ratio) if use_masksub else model
        self.masksub = TrainingStep(torch.nn.CrossEntropyLoss()) if use_masksub else None

    def training_step(self, batch, batch_idx):
        images, labels = batch
        x = to_input(images, self.device)
        if self.masksub is not None:
            out = self.masksub(self, x, labels)  # main forward + backward, sub forward; Lightning does the rest
        else:
            out = {"loss": F.cross_entropy(self.model(x), labels)}
        self.log("loss", out["loss"].detach(), prog_bar=True)
        return out

    def on_validation_epoch_start(self):
        self.counts = torch.zeros(2, device=self.device)  # correct, seen

    def validation_step(self, batch, batch_idx):
        images, labels = batch
        correct = (self.model(to_input(images, self.device)).argmax(-1) == labels).sum()
        self.counts += torch.stack([correct, torch.tensor(len(labels), device=self.device)])

    def on_validation_epoch_end(self):
        correct, seen = self.trainer.strategy.reduce(self.counts, reduce_op="sum").tolist()
        self.accuracy = 100.0 * correct / seen
        if not self.trainer.sanity_checking:
            self.print(f"epoch {self.current_epoch + 1}/{self.args.epochs}: test accuracy {self.accuracy:.2f}%")

    def configure_optimizers(self):
        args = self.args
        optimizer = create_optimizer_v2(self, "adamw", lr=args.lr, weight_decay=args.weight_decay)
        updates = int(self.trainer.estimated_stepping_batches)  # per process, with its share of the data
        scheduler = CosineLRScheduler(
            optimizer,
            t_initial=updates,
            warmup_t=updates // args.epochs // 2,
            warmup_lr_init=1e-5,
            t_in_epochs=False,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def lr_scheduler_step(self, scheduler, metric):
        scheduler.step_update(self.global_step)  # timm's schedulers count updates


def parse_args(argv=None):
    p = base_parser(__doc__.split("\n")[0])
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--devices", default="1")
    p.add_argument("--precision", default="32-true", help="32-true, bf16-mixed, 16-mixed...")
    return checked_args(p, argv)


def run(args, use_masksub: bool, train_set, test_set) -> tuple[float, float]:
    L.seed_everything(args.seed)  # the same data order for both runs
    train = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(*train_set), batch_size=args.batch_size, shuffle=True, drop_last=True
    )
    test = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*test_set), batch_size=1000)
    module = FashionClassifier(args, use_masksub)
    trainer = L.Trainer(
        max_epochs=args.epochs,
        accelerator=args.accelerator,
        devices=int(args.devices) if args.devices.isdigit() else args.devices,
        precision=args.precision,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    trainer.fit(module, train, test)  # the test accuracy after each epoch
    seconds = time.perf_counter() - start
    return module.accuracy, seconds, trainer.is_global_zero


def main(argv=None) -> dict:
    args = parse_args(argv)
    train_set, test_set = load_data(args)
    print(f"Fashion-MNIST: {len(train_set[0])} train / {len(test_set[0])} test images; ViT {args.depth}x{args.width}")
    plain_acc, plain_time, _ = run(args, False, train_set, test_set)
    sub_acc, sub_time, report = run(args, True, train_set, test_set)
    result = {"plain": plain_acc, "masksub": sub_acc, "plain_seconds": plain_time, "masksub_seconds": sub_time}
    if not report:  # one report, from the first process
        return result
    print(f"\nafter {args.epochs} epochs ({args.accelerator}, {args.precision}):")
    print(f"  plain                 test accuracy {plain_acc:6.2f}%   {plain_time:6.1f} s")
    sub = f"{masksub.wrapper.METHOD_NAMES[args.sub]}, ratio {args.ratio}"
    print(f"  {sub:<22} test accuracy {sub_acc:6.2f}%   {sub_time:6.1f} s")
    print(f"  difference {sub_acc - plain_acc:+.2f} points at {sub_time / plain_time:.2f}x the training time")
    return result


if __name__ == "__main__":
    main()
