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


@pytest.mark.parametrize("name", ["vit", "cait", "swin", "resnet", "convvit", "hiera", "gemma4", "beit", "qwen3"])
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


def _tiny_swin(family: str) -> torch.nn.Module:
    """A 2-stage Swin for 64-pixel images (4-pixel patches, windows of 4) of timm (its attention, or the fused kernel,
    which takes the per-window key mask; SwinV2-Cr), torchvision or Hugging Face (Swin with eager or SDPA attention,
    Swinv2, Donut-Swin)."""
    torch.manual_seed(0)
    if family.startswith("timm"):
        import timm

        kw = dict(img_size=64, depths=(2, 2), num_heads=(1, 2), embed_dim=16, window_size=4, num_classes=5)
        name = "swinv2_cr_tiny_ns_224" if family == "timm cr" else "swin_tiny_patch4_window7_224"
        model = timm.create_model(name, **kw)
        for m in model.modules():
            if hasattr(m, "fused_attn"):
                m.fused_attn = family == "timm fused"
        return model
    if family == "torchvision":
        from torchvision.models.swin_transformer import SwinTransformer

        return SwinTransformer([4, 4], 16, [2, 2], [1, 2], [4, 4], num_classes=5)
    import transformers

    settings = dict(image_size=64, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[1, 2], window_size=4)
    settings["drop_path_rate"] = 0.0  # its stochastic depth rounds its random draws in bf16, unlike fp32's
    if family == "hf v2":
        return transformers.Swinv2ForImageClassification(transformers.Swinv2Config(**settings, num_labels=5))
    if family == "hf donut":
        return transformers.DonutSwinForImageClassification(transformers.DonutSwinConfig(**settings, num_labels=5))
    config = transformers.SwinConfig(**settings, num_labels=5, attn_implementation=family.split()[1])
    return transformers.SwinForImageClassification(config)


SWIN_FAMILIES = ["timm", "timm fused", "timm cr", "torchvision", "hf eager", "hf sdpa", "hf v2", "hf donut"]


@pytest.mark.parametrize("family", SWIN_FAMILIES)
def test_swin_drop_in_bf16_follows_fp32_and_its_step_never_syncs(family):
    """Swin's opt-in ``swin_drop`` (``hf_swin_drop``) sub pass on CUDA: finite in bf16 autocast, close to fp32 under
    the same masks, and a step with no sync."""
    adapter = "hf_swin_drop" if family.startswith("hf") else "swin_drop"
    wrapped = masksub.wrap(_tiny_swin(family).cuda(), unit=16, adapter=adapter).train()
    x, y = torch.rand(8, 3, 64, 64, device="cuda"), torch.arange(8, device="cuda") % 5

    def logits():
        out = wrapped(x, sub=True)
        return getattr(out, "logits", out)

    torch.manual_seed(1)
    expected = logits()
    torch.manual_seed(1)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        found = logits()
    assert torch.isfinite(found).all()
    torch.testing.assert_close(found.float(), expected, rtol=0.05, atol=0.05)
    opt = torch.optim.AdamW(wrapped.parameters(), lr=1e-3, fused=True)
    step = masksub.Step(wrapped, opt, torch.nn.CrossEntropyLoss(), amp="bf16")
    step(x, y), step(x, y)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = step(x, y)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out["updated"] and torch.isfinite(out["loss"]).item()


def test_a_model_on_the_gpu_before_wrapping_trains_without_another_move():
    """Swin's mask token is made where the model is: a CPU token failed the first sub pass."""
    wrapped = masksub.wrap(tiny_model("swin").cuda(), unit=16).train()
    assert wrapped.branch.mask_token.is_cuda
    step = masksub.Step(wrapped, torch.optim.AdamW(wrapped.parameters()), torch.nn.CrossEntropyLoss())
    out = step(tiny_images("swin", batch=4).cuda(), torch.arange(4, device="cuda") % 5)
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


def _fsdp_on_one_gpu(rank, init_file, out):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=1)
    torch.cuda.set_device(0)
    results = {}
    for shard in (False, True):
        torch.manual_seed(0)
        wrapped = masksub.wrap(tiny_model("vit"), unit=32).cuda().train()
        if shard:
            for block in wrapped.model.blocks:
                fully_shard(block)
            fully_shard(wrapped)
        opt = torch.optim.AdamW(wrapped.parameters(), lr=1e-3)
        step = masksub.Step(wrapped, opt, torch.nn.CrossEntropyLoss(), amp="bf16", clip_grad=1.0, accum_steps=2)
        x, y = tiny_images("vit", batch=8).cuda(), torch.arange(8, device="cuda") % 5
        norms = []
        for i in range(6):
            torch.manual_seed(100 + i)  # the same masks in both runs
            out_i = step(x, y)
            if out_i["updated"]:
                norms.append(float(out_i["grad_norm"]))
        state = {k: getattr(v, "full_tensor", lambda v=v: v)().float().cpu() for k, v in wrapped.state_dict().items()}
        results[shard] = (norms, state)
    torch.save(results, out)
    dist.destroy_process_group()


def test_fully_sharded_step_on_cuda_matches_the_unsharded_step(tmp_path):
    """fully_shard over NCCL (one GPU): bf16 autocast, accumulation, norm clipping; same norms and weights."""
    import torch.multiprocessing as mp

    if not hasattr(pytest.importorskip("torch.distributed.fsdp"), "fully_shard"):
        pytest.skip("fully_shard is public from torch 2.6")
    mp.spawn(_fsdp_on_one_gpu, args=(str(tmp_path / "init"), str(tmp_path / "out.pt")), nprocs=1, join=True)
    (norms, plain), (sharded_norms, sharded) = (torch.load(tmp_path / "out.pt")[k] for k in (False, True))
    torch.testing.assert_close(torch.tensor(sharded_norms), torch.tensor(norms), rtol=1e-3, atol=1e-5)
    for k in plain:
        torch.testing.assert_close(sharded[k], plain[k], rtol=1e-3, atol=1e-4, msg=k)


def test_lightning_training_step_in_fp16_on_cuda_gives_the_fp32_gradient_by_hand():
    """Lightning's 16-mixed on a GPU: the main backward is scaled by the same GradScaler as Lightning's own."""
    pytest.importorskip("lightning")
    from lightning.pytorch.plugins.precision import MixedPrecision
    from test_lightning import Classifier, _by_hand, _loader, _trainer

    module = Classifier(memory_saving=True)
    fp16 = MixedPrecision("16-mixed", "cuda", torch.amp.GradScaler("cuda", init_scale=2.0**10))
    _trainer(accelerator="gpu", plugins=[fp16], max_steps=2).fit(module, _loader())
    assert len(module.grads) == 2 and fp16.scaler.get_scale() == 2.0**10  # no overflow skipped a step
    assert module.grads_at_forward[:2] == [False, True]
    module.cuda()  # Lightning moves the module back to the CPU at the end of fit
    for step, grads in enumerate(module.grads):
        for n, g in _by_hand(module, module.seen[step : step + 1], 1).items():
            assert (grads[n] - g).norm() <= 0.02 * g.norm(), f"step {step}: {n}"


def test_step_with_accelerate_fp16_on_cuda_gives_the_fp32_gradient_by_hand():
    """Accelerate's fp16 (autocast forward, the scaler in the prepared optimizer) under Step, one SGD step."""
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState
    from conftest import masksub_loss_by_hand

    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        scaling = accelerate.utils.GradScalerKwargs(init_scale=2.0**10)  # no overflow on the first step
        accelerator = accelerate.Accelerator(mixed_precision="fp16", kwargs_handlers=[scaling])
        model = masksub.wrap(tiny_model("vit"))
        model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=1.0))
        step = masksub.Step(model, optimizer, torch.nn.CrossEntropyLoss())
        assert step.scaler is optimizer.scaler
        x, y = tiny_images("vit", batch=8).cuda(), torch.arange(8, device="cuda") % 5
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        torch.manual_seed(0)
        step(x, y)
        assert not optimizer.step_was_skipped
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    reference = masksub.wrap(tiny_model("vit")).cuda()  # fp32, the same masks
    torch.manual_seed(0)
    masksub_loss_by_hand(reference, x, y).backward()
    for (n, p), q in zip(model.named_parameters(), reference.parameters()):
        assert (before[n] - p.detach() - q.grad).norm() <= 0.02 * q.grad.norm(), n


def test_a_step_made_before_the_model_moves_to_the_gpu_autocasts_there():
    """The autocast device was read once, at Step(): a model moved to the GPU after it ran in fp32 there."""
    wrapped = masksub.wrap(tiny_model("vit"), unit=TINY["vit"][3]).train()
    opt = torch.optim.AdamW(wrapped.parameters(), lr=1e-3)
    step = masksub.Step(wrapped, opt, torch.nn.CrossEntropyLoss(), amp="bf16")
    wrapped.cuda()  # moves the parameters in place: the optimizer holds them still
    x, y = tiny_images("vit", batch=8).cuda(), torch.arange(8, device="cuda") % 5
    out = step(x, y)
    assert out["updated"] and out["logits"].dtype == torch.bfloat16


@pytest.mark.parametrize("kind", ["modernbert", "mistral"])
def test_text_drop_mode_window_masks_on_cuda_in_bf16(kind):
    """Text ``mode="drop"`` on CUDA with SDPA: the sliding layers' window masks by position (ModernBERT's local
    layers, Mistral's with a window shorter than the batch) give, in bf16 autocast, the logits of hiding the same
    tokens, and a step trains."""
    from conftest import dropped_and_hidden, text_batch, wrap_text
    from test_text import _decoder, _decoder_batch, _modernbert, inputs

    model = (_modernbert() if kind == "modernbert" else _decoder("mistral")).cuda()
    model.config.sliding_window = 4 if kind == "modernbert" else 8
    wrapped = wrap_text(model, mode="drop")
    batch = inputs(text_batch(batch=4, length=24)) if kind == "modernbert" else _decoder_batch(False, batch=4)
    batch = {k: v.cuda() for k, v in batch.items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got, expected, _, lengths = dropped_and_hidden(wrapped, model, batch)
    assert lengths[0] < batch["input_ids"].shape[1]
    torch.testing.assert_close(got.float(), expected.float(), rtol=0.05, atol=0.05)
    opt = torch.optim.AdamW(wrapped.parameters(), lr=1e-4)
    step = masksub.Step(wrapped.train(), opt, torch.nn.CrossEntropyLoss(), amp="bf16")
    out = step({**batch, "labels": torch.arange(4, device="cuda") % 3})
    assert out["updated"] and torch.isfinite(out["loss"]).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_chunked_distillation_on_cuda_equals_the_formula_and_peaks_at_its_gradient(dtype):
    """``soft_cross_entropy`` with CUDA's chunk size (several chunks, the last ragged): value and gradient of the
    formula in float64, and the memory it allocates over its inputs about its gradient's, not float32 copies."""
    from test_loss import by_formula

    from masksub.loss import CHUNK_ELEMENTS_ELSEWHERE, soft_cross_entropy

    classes = 32768
    rows = 2 * CHUNK_ELEMENTS_ELSEWHERE // classes + 3
    g = torch.Generator("cuda").manual_seed(0)
    student = (3 * torch.randn(rows, classes, generator=g, device="cuda")).to(dtype).requires_grad_()
    teacher = (3 * torch.randn(rows, classes, generator=g, device="cuda")).to(dtype)
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss = soft_cross_entropy(student, teacher).mean()
    (grad,) = torch.autograd.grad(loss, student)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - held
    assert peak < 1.5 * grad.numel() * grad.element_size() + 4 * CHUNK_ELEMENTS_ELSEWHERE * 4  # a few fp32 chunks
    exact = student.detach().double().requires_grad_()
    want = by_formula(exact, teacher, 1.0).mean()
    (want_grad,) = torch.autograd.grad(want, exact)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(grad.double(), want_grad, rtol=tol, atol=tol * want_grad.abs().max().item())
