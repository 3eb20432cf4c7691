"""The README's own-loop example runs as written; the timm TrainingTask matches the Step."""

from __future__ import annotations

import re
from pathlib import Path

import timm
import torch
from conftest import tiny_images, tiny_model

import masksub
from masksub.task import MaskSubTask

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_own_loop_example_runs():
    text = README.read_text()
    section = text.split("## Use it in your own loop", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)
    model, metrics = scope["model"], scope["metrics"]
    assert metrics["updated"] and torch.isfinite(metrics["loss"])
    plain = timm.create_model("deit3_small_patch16_224", img_size=64, num_classes=10)
    plain.load_state_dict(scope["plain_state"], strict=True)
    assert model.branch.name == "vit"


def test_task_gradients_equal_step_and_checkpoint_is_plain():
    x, y = tiny_images("swin", batch=4), torch.arange(4)
    wrapped = masksub.wrap(tiny_model("swin"), unit=16).train()
    step = masksub.Step(wrapped, torch.optim.SGD(wrapped.parameters(), lr=0.0), torch.nn.CrossEntropyLoss())
    torch.manual_seed(5)
    out = step(x, y)

    task_model = masksub.wrap(tiny_model("swin"), unit=16).train()
    task = MaskSubTask(task_model, criterion=torch.nn.CrossEntropyLoss(), verbose=False)
    torch.manual_seed(5)
    result = task(x, y)
    result["loss"].backward()
    torch.testing.assert_close(result["loss"], out["loss"])
    for (n, p), q in zip(wrapped.named_parameters(), task_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=n)

    state = task.get_checkpoint_state()
    plain = tiny_model("swin")
    plain.load_state_dict(state["state_dict"], strict=True)
    assert "mask_token" in state["task_state"]["branch"]
    other = MaskSubTask(masksub.wrap(tiny_model("swin", seed=9), unit=16), verbose=False)
    other.load_checkpoint_state(state["state_dict"], state["task_state"])
    assert torch.equal(other._wrapper[0].branch.mask_token, task_model.branch.mask_token)
