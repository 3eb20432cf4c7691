"""Run by test_lightning under torchrun: TrainingStep in a Lightning Trainer with DDP (gloo), counting the
gradient all-reduces and keeping what the first optimizer step's gradient must be, by hand."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from test_lightning import Classifier, _by_hand, _loader, _trainer

from masksub.train.distributed import count_allreduces, exit_without_teardown


class Counting(Classifier):
    count = None

    def on_train_start(self):
        self.count = count_allreduces(self.trainer.strategy.model)  # before the first backward


if __name__ == "__main__":
    out, memory_saving = sys.argv[1], sys.argv[2] == "1"
    module = Counting(memory_saving=memory_saving, lr=0.1)
    initial = Classifier()
    initial.load_state_dict(module.state_dict())
    strategy = DDPStrategy(process_group_backend="gloo")
    trainer = _trainer(devices=2, strategy=strategy, max_steps=3, accumulate_grad_batches=2)
    trainer.fit(module, _loader(batches=12))  # each process gets 6 of the 12 batches: 3 steps of 2 micro-batches
    result = {
        "world": dist.get_world_size(),
        "rounds": module.count.rounds,
        "steps": trainer.global_step,
        "two_backwards": module.grads_at_forward[1],  # gradients exist at the first sub forward
    }
    by_hand = _by_hand(initial, module.seen[:2], accum=2)  # this process's share of the first step
    torch.save(
        {"result": result, "state": module.state_dict(), "synced": module.grads[0], "local": by_hand},
        f"{out}/rank{dist.get_rank()}.pt",
    )
    exit_without_teardown()  # gloo's teardown at interpreter exit can abort a finished run
