"""`masksub train` and `masksub pretrain` with ``train.fsdp`` under torchrun, two CPU processes (gloo).

One launch (tests/fsdp_trainer_worker.py) trains a ViT with DDP and with FSDP (eager and compiled), stops
and resumes an FSDP run, trains a Swin (mask token) with bf16 mixed precision under DDP and under FSDP,
and pretrains DMJD under FSDP. Checkpoints hold whole tensors under the unsharded names.
"""

from __future__ import annotations

import json

import pytest
import timm
import torch
from conftest import made_once, run_worker
from fsdp_trainer_worker import PRETRAIN

from masksub.train import checkpoint, sharding
from masksub.train.evaluate import evaluate_checkpoint

pytestmark = pytest.mark.skipif(not sharding.available(), reason="FSDP's fully_shard needs torch >= 2.6")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = made_once(tmp_path_factory, "fsdp", lambda out: run_worker("fsdp_trainer_worker.py", out))
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for rank in ranks:
        assert rank["codes"] == dict.fromkeys(
            ["ddp", "fsdp", "part", "fsdp_every", "swin_ddp", "swin", "swin_drop_ddp", "swin_drop", "pretrain"]
            + ["ddp_droppath", "fsdp_droppath_ckpt", "ddp_compiled", "fsdp_compiled", "resume"],
            0,
        )
    return out


def _metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def _assert_same(a: dict, b: dict, atol: float = 0.0):
    assert a.keys() == b.keys()
    for k in a:
        assert type(a[k]) is torch.Tensor and type(b[k]) is torch.Tensor, f"{k}: not a whole tensor"
        if atol:
            assert torch.allclose(a[k].float(), b[k].float(), rtol=0, atol=atol), k
        else:
            assert torch.equal(a[k], b[k]), k


def test_fsdp_trains_as_ddp_does(runs):
    """fp32: the sharded run ends with DDP's weights and EMA weights, and evaluates the same."""
    ddp, fsdp = checkpoint.load(runs / "ddp"), checkpoint.load(runs / "fsdp")
    _assert_same(fsdp["model"], ddp["model"], atol=1e-6)
    _assert_same(fsdp["ema"], ddp["ema"], atol=1e-6)
    assert fsdp["position"] == ddp["position"] and fsdp["position"]["global_step"] == 4
    for a, b in zip(_metrics(runs / "fsdp"), _metrics(runs / "ddp"), strict=True):
        assert (a["top1"], a["ema_top1"]) == (b["top1"], b["ema_top1"])  # 201 images split 101 / 100
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)


def test_fsdp_sync_every_backward_trains_as_ddp_does(runs):
    """train.fsdp_sync_every_backward (a reduce-scatter at every backward): DDP's weights and accuracy."""
    ddp, every = checkpoint.load(runs / "ddp"), checkpoint.load(runs / "fsdp_every")
    _assert_same(every["model"], ddp["model"], atol=1e-6)
    assert every["config"]["train"]["fsdp_sync_every_backward"] and every["position"]["global_step"] == 4
    assert [m["top1"] for m in _metrics(runs / "fsdp_every")] == [m["top1"] for m in _metrics(runs / "ddp")]


def test_fsdp_compiled_trains_as_ddp_compiled(runs):
    """train.compile with FSDP (the wrapper compiled after sharding): DDP's compiled weights."""
    ddp, fsdp = checkpoint.load(runs / "ddp_compiled"), checkpoint.load(runs / "fsdp_compiled")
    _assert_same(fsdp["model"], ddp["model"], atol=1e-6)
    assert fsdp["position"]["global_step"] == 2


def test_fsdp_with_activation_checkpointing_trains_as_ddp_without(runs):
    """PathSub with checkpointed blocks under FSDP: the sub pass's rate holds while the backward recomputes."""
    ddp, fsdp = checkpoint.load(runs / "ddp_droppath"), checkpoint.load(runs / "fsdp_droppath_ckpt")
    _assert_same(fsdp["model"], ddp["model"], atol=1e-6)


def test_fsdp_resume_is_bit_identical(runs):
    """Stopped after 3 steps and resumed, under FSDP: the weights, EMA and optimizer state of the straight run."""
    full, part = checkpoint.load(runs / "fsdp"), checkpoint.load(runs / "part")
    _assert_same(part["model"], full["model"])
    _assert_same(part["ema"], full["ema"])
    for name, state in full["optimizer"]["state"].items():  # keyed by parameter name
        for k, v in state.items():
            assert torch.equal(torch.as_tensor(part["optimizer"]["state"][name][k]), torch.as_tensor(v)), (name, k)
    assert part["position"] == full["position"]


def test_fsdp_checkpoint_evaluates_in_one_process(runs):
    """`masksub eval` reads a sharded run's checkpoint with no process group: the run's own accuracy."""
    found = evaluate_checkpoint(runs / "fsdp" / "last.pt")
    last = _metrics(runs / "fsdp")[-1]
    one_image = 100 / 201 + 1e-9  # batches of another size may round one borderline logit the other way
    assert found["weights"]["top1"] == pytest.approx(last["top1"], abs=one_image)
    assert found["ema weights"]["top1"] == pytest.approx(last["ema_top1"], abs=one_image)


def test_fsdp_bf16_mixed_precision_trains_the_mask_token(runs):
    """Swin under FSDP with bf16 weights gathered and fp32 gradient reduction (the mask token in a group of its
    own): close to DDP with bf16 autocast, and the mask token trained as DDP trains it."""
    ddp, fsdp = checkpoint.load(runs / "swin_ddp"), checkpoint.load(runs / "swin")
    token = "branch.mask_token"
    # 8 AdamW steps at lr 1e-3 move it by about 8e-3 per element: an untrained token would be far off
    assert torch.allclose(fsdp["model"][token], ddp["model"][token], rtol=0, atol=1e-4)
    _assert_same(fsdp["model"], ddp["model"], atol=2e-3)  # bf16 gradients: rounded at other points
    assert fsdp["config"]["train"]["fsdp"] == "shard_grad_op"


def test_fsdp_swin_drop_gathers_each_stage_in_the_sub_pass(runs):
    """Swin with adapter swin_drop, whose sub pass runs each stage on the kept tokens through the stage's own call:
    under FSDP (each stage sharded, its blocks checkpointed) it ends with DDP's weights."""
    ddp, fsdp = checkpoint.load(runs / "swin_drop_ddp"), checkpoint.load(runs / "swin_drop")
    _assert_same(fsdp["model"], ddp["model"], atol=1e-6)
    assert fsdp["config"]["sub"]["adapter"] == "swin_drop" and fsdp["position"]["global_step"] == 2


def test_fsdp_pretraining_writes_a_whole_encoder(runs):
    """DMJD under FSDP: encoder.pt holds whole tensors that load strictly into the timm encoder."""
    encoder = torch.load(runs / "pretrain" / "encoder.pt", weights_only=True)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, in_chans=1, **PRETRAIN["model.kwargs"])
    model.load_state_dict(encoder)  # strict: every key, every shape
    assert all(type(v) is torch.Tensor for v in encoder.values())
    assert any(k.startswith("decoder.") for k in checkpoint.load(runs / "pretrain")["model"])
