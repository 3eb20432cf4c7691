"""Run by test_fabric under torchrun: Step on a model Lightning Fabric wrapped in DDP (gloo, bf16), counting the
gradient all-reduces of 3 optimizer steps of 2 micro-batches."""

from __future__ import annotations

import sys

import lightning as L
import torch
from conftest import tiny_images, tiny_model

import masksub
from masksub.train.distributed import count_allreduces, exit_without_teardown

if __name__ == "__main__":
    fabric = L.Fabric(accelerator="cpu", devices=2, strategy="ddp", precision="bf16-mixed")
    fabric.launch()
    model = masksub.wrap(tiny_model("vit"))
    model, optimizer = fabric.setup(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    x = tiny_images("vit", batch=48, seed=3)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.arange(48) % 5), batch_size=4)
    loader = fabric.setup_dataloaders(loader)  # each process gets 6 of the 12 batches
    assert isinstance(model._forward_module, torch.nn.parallel.DistributedDataParallel) and len(loader) == 6
    count = count_allreduces(model._forward_module)
    step = masksub.Step(model, optimizer, torch.nn.CrossEntropyLoss(), accum_steps=2, backward=fabric.backward)
    updates = sum(step(x, y)["updated"] for x, y in loader)
    result = {"world": fabric.world_size, "rounds": count.rounds, "steps": updates}
    torch.save({"result": result, "state": model.model.state_dict()}, f"{sys.argv[1]}/rank{fabric.global_rank}.pt")
    exit_without_teardown()  # gloo's teardown at interpreter exit can abort a finished run
