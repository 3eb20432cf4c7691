"""Run by test_hf under torchrun: MaskSubTrainer on a causal language model with DDP (gloo), one optimizer step
of 2 accumulated micro-batches per process; saves the gradient and the samples this process trained on."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from conftest import MASK, SPECIAL
from test_hf import GradsBeforeStep, Rows, _args, _language_data, _language_model

from masksub.hf import MaskSubTrainer
from masksub.train.distributed import exit_without_teardown

if __name__ == "__main__":
    out, across = sys.argv[1], sys.argv[2] == "across"
    model, seen = _language_model("llama"), []
    model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].clone()), with_kwargs=True)
    capture = GradsBeforeStep(model)
    args = _args(
        f"{out}/run",
        per_device_train_batch_size=1,
        gradient_accumulation_steps=2,
        average_tokens_across_devices=across,
        ddp_backend="gloo",
    )
    options = {"mask_token_id": MASK, "special_ids": SPECIAL}
    trainer = MaskSubTrainer(
        model=model,
        args=args,
        train_dataset=Rows(_language_data("llama")),
        mask_options=options,
        main_weight=1.0,
        sub_weight=0.0,  # the main loss alone: the model's own, whose gradient the test works out
        callbacks=[capture],
    )
    trainer.train()
    main_inputs = torch.cat(seen[0::2])  # each micro-batch's main pass, then its sub pass
    state = {"result": {"grads": capture.grads[0], "inputs": main_inputs}, "state": model.state_dict()}
    torch.save(state, f"{out}/rank{dist.get_rank()}.pt")
    exit_without_teardown()  # gloo's teardown at interpreter exit can abort a finished run
