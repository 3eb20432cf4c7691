"""Run by test_accelerate under torchrun: Step on a model Accelerate wrapped in DDP (gloo, bf16), counting the
gradient all-reduces of 3 optimizer steps of 2 micro-batches."""

from __future__ import annotations

import sys

import accelerate
import torch
from conftest import tiny_images, tiny_model

import masksub
from masksub.train.distributed import count_allreduces, exit_without_teardown

if __name__ == "__main__":
    accelerator = accelerate.Accelerator(cpu=True, mixed_precision="bf16")
    model = masksub.wrap(tiny_model("vit"))
    x = tiny_images("vit", batch=48, seed=3)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.arange(48) % 5), batch_size=4)
    model, optimizer, loader = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-3), loader)
    assert isinstance(model, torch.nn.parallel.DistributedDataParallel) and len(loader) == 6  # 6 batches each
    count = count_allreduces(model)
    step = masksub.Step(model, optimizer, torch.nn.CrossEntropyLoss(), accum_steps=2, clip_grad=1.0)
    updates = sum(step(x, y)["updated"] for x, y in loader)
    result = {"world": accelerator.num_processes, "rounds": count.rounds, "steps": updates}
    state = accelerator.unwrap_model(model).state_dict()
    torch.save({"result": result, "state": state}, f"{sys.argv[1]}/rank{accelerator.process_index}.pt")
    exit_without_teardown()  # gloo's teardown at interpreter exit can abort a finished run
