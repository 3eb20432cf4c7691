"""Run by test_lightning under torchrun: TrainingStep in a Lightning Trainer with DDP (gloo), counting the
gradient all-reduces and keeping what the first optimizer step's gradient must be, by hand."""

from __future__ import annotations

import os
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


def token_weighed(out: str) -> None:
    """A causal language model, 2 accumulated micro-batches of one row a process (4 rows of unlike labelled tokens),
    given the step's labelled tokens over both processes, the sub branch weighed 0: the synced gradient is that of
    the model's own loss on the 4 rows."""
    import lightning as L
    from conftest import lm_labels, text_batch, tiny_language_model, wrap_text

    from masksub.lightning import TrainingStep

    data = lm_labels(text_batch(batch=4, length=16))
    data["labels"][0, 7:] = -100
    total = int((data["labels"][:, 1:] != -100).sum())
    rank = int(os.environ["RANK"])

    class LanguageModel(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = wrap_text(tiny_language_model("llama"), mode="attention")
            self.masksub = TrainingStep(torch.nn.CrossEntropyLoss(), main_weight=1.0, sub_weight=0.0, log=False)

        def training_step(self, batch, batch_idx):
            return self.masksub(self, batch, num_items_in_batch=total)

        def on_before_optimizer_step(self, optimizer):
            self.grads = {
                n.removeprefix("model."): p.grad.clone() for n, p in self.named_parameters() if p.grad is not None
            }

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    module = LanguageModel()
    rows = [{k: v[i] for k, v in data.items()} for i in (2 * rank, 2 * rank + 1)]
    trainer = _trainer(
        devices=2, strategy=DDPStrategy(process_group_backend="gloo"), accumulate_grad_batches=2,
        use_distributed_sampler=False,
    )  # fmt: skip
    trainer.fit(module, torch.utils.data.DataLoader(rows, batch_size=1))
    torch.save({"state": module.state_dict(), "synced": module.grads}, f"{out}/rank{rank}.pt")
    exit_without_teardown()


def counted(out: str, memory_saving: bool) -> None:
    """A ViT classifier, 3 optimizer steps of 2 micro-batches a process: the all-reduces counted, the first step's
    synced gradient and this process's by hand."""
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


if __name__ == "__main__":
    if sys.argv[2] == "tokens":
        token_weighed(sys.argv[1])
    else:
        counted(sys.argv[1], sys.argv[2] == "1")
