"""Run by test_fsdp_trainer under torchrun (2 CPU processes): the trainer with DDP and with FSDP, in one launch."""

from __future__ import annotations

import sys
from pathlib import Path

import torch.distributed as dist
from test_trainer import TINY, args

from masksub.cli import main
from masksub.train.distributed import exit_without_teardown

# Two blocks (two sharded units), EMA, and an evaluation set that the two processes split unevenly
# (101 and 100 images: 3 and 2 batches).
VIT = {
    **TINY,
    "model.kwargs": {**TINY["model.kwargs"], "depth": 2},
    "data.eval_subset": 201,
    "data.eval_batch_size": 50,
    "train.ema": True,
}
SWIN = {
    **TINY,
    "model.name": "swin_tiny_patch4_window7_224",
    "model.kwargs": {
        "img_size": 32,
        "patch_size": 2,
        "window_size": 4,
        "embed_dim": 16,
        "depths": [1, 1],
        "num_heads": [1, 1],
    },
    "data.img_size": 32,
    "sub.unit": 8,
    "train.ema": True,
}
PRETRAIN = {
    **{k: v for k, v in TINY.items() if k != "data.eval_subset"},  # pretraining evaluates nothing
    "model.kwargs": {"img_size": 32, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2},
    "data.img_size": 32,
    "pretrain.decoder_dim": 16,
    "pretrain.decoder_depth": 1,
    "pretrain.decoder_heads": 2,
    "pretrain.projector_dim": 16,
    "train.fsdp": "full_shard",
}

if __name__ == "__main__":
    out = Path(sys.argv[1])
    runs = {
        "ddp": ("train", VIT),
        "fsdp": ("train", {**VIT, "train.fsdp": "full_shard"}),
        "part": ("train", {**VIT, "train.fsdp": "full_shard", "train.max_steps": 3}),
        "fsdp_every": ("train", {**VIT, "train.fsdp": "full_shard", "train.fsdp_sync_every_backward": True}),
        "swin_ddp": ("train", {**SWIN, "train.amp": "bf16"}),
        "swin": ("train", {**SWIN, "train.fsdp": "shard_grad_op", "train.amp": "bf16"}),
        "swin_drop_ddp": ("train", {**SWIN, "sub.adapter": "swin_drop", "train.max_steps": 2}),
        "swin_drop": (
            "train",
            {**SWIN, "sub.adapter": "swin_drop", "train.max_steps": 2, "train.fsdp": "full_shard"}
            | {"model.grad_checkpointing": True},
        ),
        "pretrain": ("pretrain", PRETRAIN),
        "ddp_droppath": ("train", {**VIT, "sub.kind": "droppath", "train.max_steps": 2}),
        "fsdp_droppath_ckpt": (
            "train",
            {
                **VIT,
                "sub.kind": "droppath",
                "train.max_steps": 2,
                "train.fsdp": "full_shard",
                "model.grad_checkpointing": True,
            },
        ),
        "ddp_compiled": ("train", {**VIT, "train.compile": True, "train.max_steps": 2}),
        "fsdp_compiled": ("train", {**VIT, "train.compile": True, "train.max_steps": 2, "train.fsdp": "full_shard"}),
    }
    codes = {}
    for name, (command, config) in runs.items():
        codes[name] = main([command, *args(config, **{"train.output": str(out), "train.name": name})])
    codes["resume"] = main(["train", "--resume", str(out / "part")])
    import torch

    torch.save({"codes": codes, "state": {}}, out / f"rank{dist.get_rank()}.pt")
    exit_without_teardown()
