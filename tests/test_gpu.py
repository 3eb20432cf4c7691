"""GPU-only checks (skipped without CUDA): the step never waits on the device."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, tiny_images, tiny_model

import masksub

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("name", ["vit", "swin", "resnet"])
def test_bf16_step_has_no_host_device_sync(name):
    wrapped = masksub.wrap(tiny_model(name), unit=TINY[name][3]).cuda().train()
    opt = torch.optim.AdamW(wrapped.parameters(), lr=1e-3, fused=True)
    step = masksub.Step(wrapped, opt, torch.nn.CrossEntropyLoss(), amp="bf16", clip_grad=1.0, accum_steps=2)
    x, y = tiny_images(name, batch=8).cuda(), torch.arange(8, device="cuda") % 5
    step(x, y), step(x, y)  # warm-up: lazy initialisation may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(4):
            out = step(x, y)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out["updated"] and torch.isfinite(out["loss"]).item()
