"""masksub.Step on a model and optimizer set up by Lightning Fabric: the sub branch is found inside Fabric's
wrapper, each backward goes through ``fabric.backward``, the fp16 scaler of Fabric's precision is unscaled once
before clipping, and under DDP the main pass runs in ``no_sync()``."""

from __future__ import annotations

import pytest
import torch
from conftest import masksub_loss_by_hand, run_worker, tiny_images, tiny_model

import masksub

L = pytest.importorskip("lightning")
from lightning.fabric.plugins.precision import MixedPrecision  # noqa: E402


def _batches():
    x = tiny_images("vit", batch=8, seed=3)
    return list(zip(x.chunk(2), (torch.arange(8) % 5).chunk(2)))


def test_fabric_bf16_trains_as_step_own_bf16():
    weights = {}
    for kind in ("fabric", "step"):
        model = masksub.wrap(tiny_model("vit"))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        options = {"amp": "bf16"}
        if kind == "fabric":  # Fabric autocasts the forward, and wants its backward
            fabric = L.Fabric(accelerator="cpu", devices=1, precision="bf16-mixed")
            model, optimizer = fabric.setup(model, optimizer)
            options = {"backward": fabric.backward}
        step = masksub.Step(model, optimizer, torch.nn.CrossEntropyLoss(), clip_grad=1.0, **options)
        assert step.has_sub  # the wrapped model is found inside Fabric's wrapper
        dtypes = []
        model.model.head.register_forward_hook(lambda m, a, out, seen=dtypes: seen.append(out.dtype))
        for i, (x, y) in enumerate(_batches()):
            torch.manual_seed(i)  # the same masks in both runs
            out = step(x, y)
        assert dtypes == [torch.bfloat16] * 4 and out["loss_sub"] > 0  # main and sub, two steps
        weights[kind] = {k.removeprefix("_forward_module."): v for k, v in model.state_dict().items()}
    for k, v in weights["step"].items():
        torch.testing.assert_close(weights["fabric"][k], v, rtol=1e-3, atol=1e-5, msg=k)


def test_fabric_fp16_scaler_is_unscaled_once_before_clipping():
    """fabric.backward scales both losses; Step unscales before it clips at 5x the true norm (no clipping), and
    Fabric's optimizer step does not unscale again: the update is the fp32 gradient."""
    x, y = _batches()[0]
    reference = masksub.wrap(tiny_model("vit"))  # the fp32 gradient by hand
    torch.manual_seed(0)
    masksub_loss_by_hand(reference, x, y).backward()
    norm = torch.stack([p.grad.norm() for p in reference.parameters()]).norm().item()

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    fabric = L.Fabric(accelerator="cpu", devices=1, plugins=[MixedPrecision("16-mixed", "cpu", scaler)])
    model = masksub.wrap(tiny_model("vit"))
    model, optimizer = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=1.0))
    step = masksub.Step(model, optimizer, torch.nn.CrossEntropyLoss(), clip_grad=5 * norm, backward=fabric.backward)
    assert step.scaler is scaler
    before = {n: p.detach().clone() for n, p in reference.named_parameters()}
    torch.manual_seed(0)
    out = step(x, y)
    assert scaler.get_scale() == 2.0**10  # no overflow: the step was taken
    assert out["grad_norm"].item() == pytest.approx(norm, rel=0.02)  # measured unscaled
    for (n, p), q in zip(model.model.named_parameters(prefix="model"), reference.parameters()):
        update = before[n] - p.detach()  # SGD, lr 1: the gradient
        assert (update - q.grad).norm() <= 0.02 * q.grad.norm(), n


def test_a_fabric_model_needs_fabric_backward():
    fabric = L.Fabric(accelerator="cpu", devices=1)
    model = masksub.wrap(tiny_model("vit"))
    model, optimizer = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match=r"set up by Lightning Fabric.*Step\(\.\.\., backward=fabric.backward\)"):
        masksub.Step(model, optimizer, torch.nn.CrossEntropyLoss())
    with pytest.raises(ValueError, match="backward= scales the loss itself: amp='fp16'"):
        masksub.Step(model, optimizer, torch.nn.CrossEntropyLoss(), amp="fp16", backward=fabric.backward)


@pytest.mark.slow
def test_under_fabric_ddp_one_all_reduce_per_step(tmp_path):
    """torchrun, 2 CPU processes, Fabric's DDP and bf16: 3 optimizer steps of 2 micro-batches, 3 all-reduces."""
    for rank in run_worker("ddp_fabric_worker.py", tmp_path):
        assert rank["result"] == {"world": 2, "rounds": 3, "steps": 3}
