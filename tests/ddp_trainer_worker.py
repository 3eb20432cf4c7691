"""Run by test_hf under torchrun: MaskSubTrainer with DDP (gloo), counting gradient all-reduces per step."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from conftest import MASK, SPECIAL, text_batch, tiny_text_model
from test_hf import Rows, _args
from test_hf_vision import TOKEN_SWINS, _tiny_hf_vit

from masksub.hf import MaskSubTrainer
from masksub.train.distributed import count_allreduces, exit_without_teardown


class CountingTrainer(MaskSubTrainer):
    count = None

    def compute_loss(self, model, inputs, *args, **kwargs):
        if self.count is None and isinstance(model, torch.nn.parallel.DistributedDataParallel):
            self.count = count_allreduces(model)  # before the first backward
        return super().compute_loss(model, inputs, *args, **kwargs)


if __name__ == "__main__":
    out, memory_saving, find_unused = sys.argv[1], sys.argv[2] == "1", {"none": None, "0": False}[sys.argv[3]]
    # "static": DDP(static_graph=True) and no accumulation; memory_saving=None (the default) picks the order
    static = sys.argv[5:] == ["static"]
    if sys.argv[4] == "vit":  # a Hugging Face ViT: the sub pass drops tokens through hooks (hf_vit)
        model, mask_options = _tiny_hf_vit(), {}
        data = {"pixel_values": torch.rand(48, 3, 32, 32), "labels": torch.arange(48) % 3}
    elif sys.argv[4] in TOKEN_SWINS:  # a Swin whose mask token the branch puts into the model: all-reduced
        model, mask_options = TOKEN_SWINS[sys.argv[4]][0](), {"unit": 8}
        data = {"pixel_values": torch.rand(48, 3, 32, 32), "labels": torch.arange(48) % 3}
    else:
        model, mask_options = tiny_text_model(), {"mask_token_id": MASK, "special_ids": SPECIAL}
        data = text_batch(batch=48)
    args = _args(
        f"{out}/run",
        max_steps=3,
        gradient_accumulation_steps=1 if static else 2,
        **({"ddp_static_graph": True} if static else {}),  # an argument older transformers lacks
        learning_rate=1e-3,
        ddp_backend="gloo",
        ddp_find_unused_parameters=find_unused,  # None: the Trainer's default for a Hugging Face model (True)
    )
    trainer = CountingTrainer(
        model=model,
        args=args,
        train_dataset=Rows(data),
        mask_options=mask_options,
        memory_saving=None if static else memory_saving,
    )
    if sys.argv[4] in TOKEN_SWINS:  # the mask token wrap() made, before training
        token = model.get_parameter(TOKEN_SWINS[sys.argv[4]][1]).detach().clone()
    trainer.train()
    result = {"world": dist.get_world_size(), "rounds": trainer.count.rounds, "steps": trainer.state.global_step}
    assert trainer.memory_saving is (memory_saving and not static)
    names = {"vit": "hf_vit", "hf-swin": "hf_masktoken", "timm-wrapper-swin": "timm_wrapper"}
    assert trainer.sub_branch.name == names.get(sys.argv[4], "text")
    if sys.argv[4] in TOKEN_SWINS:  # trained; run_worker checks that the processes agree on it
        assert not torch.equal(model.get_parameter(TOKEN_SWINS[sys.argv[4]][1]), token)
    torch.save({"result": result, "state": model.state_dict()}, f"{out}/rank{dist.get_rank()}.pt")
    exit_without_teardown()  # gloo's teardown at interpreter exit can abort a finished run
