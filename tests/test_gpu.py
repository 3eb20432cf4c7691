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


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_trainer_with_device_data_trains_and_resumes_exactly_on_cuda(tmp_path, amp):
    from test_trainer import check_device_data_resumes_exactly

    check_device_data_resumes_exactly(tmp_path, **{"train.device": "cuda", "train.amp": amp})


def test_dmjd_step_on_cuda_in_bf16():
    import timm

    from masksub.pretrain import DMJD

    encoder = timm.create_model("vit_tiny_patch16_224", img_size=64, patch_size=8, depth=2, num_classes=0)
    model = DMJD(encoder, decoder_dim=32, decoder_depth=1, decoder_heads=2, projector_dim=32).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(torch.rand(4, 3, 64, 64, device="cuda"))["loss"]
    loss.backward()
    assert torch.isfinite(loss).item()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all().item() for g in grads)


def test_step_cost_benchmark_runs_its_cuda_path(tmp_path):
    """The GPU scale's code path (CUDA events, allocator peaks, channels-last ResNet) on a small batch."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "step_cost.py"
    cmd = [sys.executable, str(script), "--models", "resnet50", "--batch", "8", "--warmup", "1"]
    cmd += ["--repeats", "2", "--iters", "1", "--compile", "off", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads((tmp_path / "step_cost.json").read_text())["models"]["resnet50"]
    for variant in ("timm_loop", "plain", "masksub", "research"):
        assert row[f"eager/{variant}"]["s_per_step"] > 0 and row[f"eager/{variant}"]["peak_gib"] > 0
