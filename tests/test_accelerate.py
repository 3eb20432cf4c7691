"""masksub.Step on a model and optimizer prepared by Hugging Face Accelerate: its mixed precision, and its fp16
grad scaler, which the prepared optimizer steps itself (the gradient is unscaled once, not twice)."""

from __future__ import annotations

import pytest
import torch
from conftest import masksub_loss_by_hand, run_worker, tiny_images, tiny_model

import masksub

accelerate = pytest.importorskip("accelerate")
from accelerate.optimizer import AcceleratedOptimizer  # noqa: E402
from accelerate.state import AcceleratorState  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Accelerate keeps one state per process: each test makes its own Accelerator, and leaves none behind."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def _data():
    x = tiny_images("vit", batch=8, seed=3)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.arange(8) % 5), batch_size=4)


def test_accelerate_bf16_trains_as_step_own_bf16():
    weights = {}
    for kind in ("accelerate", "step"):
        model = masksub.wrap(tiny_model("vit"))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        loader = _data()
        amp = None
        if kind == "accelerate":  # Accelerate autocasts the prepared model's forward
            accelerator = accelerate.Accelerator(cpu=True, mixed_precision="bf16")
            model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
            assert isinstance(optimizer, AcceleratedOptimizer)
        else:
            amp = "bf16"
        step = masksub.Step(model, optimizer, torch.nn.CrossEntropyLoss(), amp=amp, clip_grad=1.0)
        dtypes = []
        model.model.head.register_forward_hook(lambda m, a, out, seen=dtypes: seen.append(out.dtype))
        for i, (x, y) in enumerate(loader):
            torch.manual_seed(i)  # the same masks in both runs
            step(x, y)
        assert dtypes == [torch.bfloat16] * 4  # main and sub, two steps
        weights[kind] = model.state_dict()
    for k, v in weights["step"].items():
        torch.testing.assert_close(weights["accelerate"][k], v, rtol=1e-3, atol=1e-5, msg=k)


@pytest.mark.parametrize("amp", [None, "fp16"])  # None: as with a model that Accelerate autocasts itself
def test_fp16_scaler_of_the_prepared_optimizer_scales_both_backwards_and_unscales_once(amp):
    accelerate.Accelerator(cpu=True)  # fp16 needs a GPU in Accelerate: its optimizer is built with a CPU scaler
    model = masksub.wrap(tiny_model("vit"))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    optimizer = AcceleratedOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), scaler=scaler)
    step = masksub.Step(model, optimizer, torch.nn.CrossEntropyLoss(), amp=amp)
    assert step.scaler is scaler
    x, y = next(iter(_data()))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.manual_seed(0)
    step(x, y)
    assert scaler.get_scale() == 2.0**10  # no overflow: the step was taken

    reference = masksub.wrap(tiny_model("vit"))  # the fp32 gradient by hand, with the same masks
    torch.manual_seed(0)
    masksub_loss_by_hand(reference, x, y).backward()
    for (n, p), q in zip(model.named_parameters(), reference.parameters()):
        update = before[n] - p.detach()  # SGD, lr 1: the gradient
        assert (update - q.grad).norm() <= 0.02 * q.grad.norm(), n


def test_settings_that_disagree_with_accelerate_are_refused():
    model = masksub.wrap(tiny_model("vit"))
    criterion = torch.nn.CrossEntropyLoss()
    accelerate.Accelerator(cpu=True)
    fp16 = AcceleratedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(ValueError, match="brings its own grad scaler: leave out scaler="):
        masksub.Step(model, fp16, criterion, amp="fp16", scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(ValueError, match=r"prepared for fp16 \(AcceleratedOptimizer\) and Step was given amp='bf16'"):
        masksub.Step(model, fp16, criterion, amp="bf16")

    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    optimizer = accelerator.prepare(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match=r"gradient_accumulation_steps=2\).*Step\(accum_steps=N\)"):
        masksub.Step(model, optimizer, criterion)


@pytest.mark.slow
def test_under_accelerate_ddp_one_all_reduce_per_step(tmp_path):
    """torchrun, 2 CPU processes, Accelerate's DDP and bf16: 3 optimizer steps of 2 micro-batches, 3 all-reduces."""
    for rank in run_worker("ddp_accelerate_worker.py", tmp_path):
        assert rank["result"] == {"world": 2, "rounds": 3, "steps": 3}
