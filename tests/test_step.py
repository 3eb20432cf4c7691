"""The two-backward step: same gradients as the summed loss, scaler and clipping done once."""

from __future__ import annotations

import copy
import functools
import gc

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import TINY, peak_bytes, tiny_images, tiny_model
from timm.loss import BinaryCrossEntropy, SoftTargetCrossEntropy

import masksub


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _run(name, memory_saving, accum_steps=1, batches=2, last=False, **step_kw):
    wrapped = masksub.wrap(tiny_model(name), unit=TINY[name][3]).train()
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.0)  # lr 0: parameters stay, .grad holds the step's gradient
    step = masksub.Step(
        wrapped, opt, torch.nn.CrossEntropyLoss(), accum_steps=accum_steps, memory_saving=memory_saving, **step_kw
    )
    x = tiny_images(name, batch=4 * batches)
    y = torch.arange(len(x)) % 5
    for i, (xb, yb) in enumerate(zip(x.chunk(batches), y.chunk(batches))):
        torch.manual_seed(100 + i)  # the same masks in both runs
        out = step(xb, yb, last=last and i == batches - 1)
    assert out["updated"]
    return wrapped, _grads(wrapped)


@pytest.mark.parametrize("accum_steps", [1, 2])
@pytest.mark.parametrize(
    "name",
    ["vit", "cait", "swin", "resnet", "convvit", "hiera", "gemma4", "beit", "vit_relpos", "qwen3", "timm_convit"],
)
def test_two_backward_equals_summed_loss(name, accum_steps):
    batches = accum_steps
    _, two = _run(name, memory_saving=True, accum_steps=accum_steps, batches=batches)
    _, summed = _run(name, memory_saving=False, accum_steps=accum_steps, batches=batches)
    assert two.keys() == summed.keys()
    if name == "swin":
        assert "branch.mask_token" in two and two["branch.mask_token"].abs().sum() > 0
    for n in two:
        torch.testing.assert_close(two[n], summed[n], rtol=1e-5, atol=1e-7, msg=n)


def test_summed_loss_gradient_by_hand():
    """The step's gradient is that of 0.5 * CE(main, y) + 0.5 * CE(sub, softmax(main.detach()))."""
    wrapped, grads = _run("vit", memory_saving=True, batches=1)
    ref = masksub.wrap(tiny_model("vit")).train()
    x, y = tiny_images("vit", batch=4), torch.arange(4) % 5
    torch.manual_seed(100)
    main = ref(x)
    sub = ref(x, sub=True)
    teacher = F.softmax(main.detach(), dim=-1)
    loss = 0.5 * F.cross_entropy(main, y) + 0.5 * (-(teacher * F.log_softmax(sub, -1)).sum(-1)).mean()
    loss.backward()
    for n, p in ref.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-5, atol=1e-7, msg=n)


def test_accumulation_equals_full_batch():
    """Two micro-batches of 4 with accum_steps=2 give the gradient of one batch of 8 (same masks)."""
    _, accum = _run("vit", memory_saving=True, accum_steps=2, batches=2)
    wrapped = masksub.wrap(tiny_model("vit")).train()
    x, y = tiny_images("vit", batch=8), torch.arange(8) % 5
    # Same masks as the two micro-batches: the mask noise is drawn per micro-batch after each reseed.
    noise = []
    for i in range(2):
        torch.manual_seed(100 + i)
        noise.append(torch.rand(4, 64))
    real_rand = torch.rand
    calls = iter([torch.cat(noise)])
    torch.rand = lambda *a, **k: next(calls)
    try:
        loss_fn = masksub.SubBranchLoss(torch.nn.CrossEntropyLoss())
        main = wrapped(x)
        loss = loss_fn(main, wrapped(x, sub=True), y)
    finally:
        torch.rand = real_rand
    loss.backward()
    for n, p in wrapped.named_parameters():
        torch.testing.assert_close(accum[n], p.grad, rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.parametrize(
    "kw", [{}, dict(memory_saving=False), dict(scaler=torch.amp.GradScaler("cpu", init_scale=4.0))]
)
def test_last_ends_a_short_window_with_the_gradient_of_its_mean_loss(kw):
    """Three micro-batches with accum_steps=5, the third last=True: the gradient of a full window of three."""
    kw.setdefault("memory_saving", True)
    _, short = _run("vit", accum_steps=5, batches=3, last=True, **kw)
    _, full = _run("vit", accum_steps=3, batches=3, **kw)
    assert short.keys() == full.keys()
    for n in full:
        torch.testing.assert_close(short[n], full[n], rtol=1e-5, atol=1e-7, msg=n)


def test_the_call_after_last_starts_a_new_window():
    wrapped = masksub.wrap(tiny_model("vit")).train()
    step = masksub.Step(
        wrapped, torch.optim.SGD(wrapped.parameters(), lr=0.1), torch.nn.CrossEntropyLoss(), accum_steps=3
    )
    x, y = tiny_images("vit", batch=4), torch.arange(4) % 5
    assert [step(x, y, last=i == 0)["updated"] for i in range(4)] == [True, False, False, True]


def test_grad_scaler_scales_both_losses_and_unscales_once():
    _, plain = _run("vit", memory_saving=True, batches=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    _, scaled = _run("vit", memory_saving=True, batches=1, scaler=scaler)
    for n in plain:  # a power-of-two scale is exact: any missed or double (un)scale shows
        torch.testing.assert_close(scaled[n], plain[n], rtol=1e-6, atol=0, msg=n)


def test_clipping_after_both_backwards():
    _, raw = _run("vit", memory_saving=True, batches=1)
    _, clipped = _run("vit", memory_saving=True, batches=1, clip_grad=1e-3)
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in raw.values()]))
    assert norm > 1e-3
    for n in raw:
        torch.testing.assert_close(clipped[n], raw[n] * (1e-3 / (norm + 1e-6)), rtol=1e-4, atol=1e-9, msg=n)


@pytest.mark.parametrize("name", ["swin", "resnet"])
def test_agc_clips_all_but_the_models_head_as_timm_does(name):
    """timm's train.py clips with AGC without the head; Step clipped the head too (and, counting the wrapper's
    last two parameters, would have left out the mask token instead)."""
    _, raw = _run(name, memory_saving=True, batches=1)
    _, clipped = _run(name, memory_saving=True, batches=1, clip_grad=1e-3, clip_mode="agc")
    head = [n for n in raw if n.startswith("model.head") or n.startswith("model.fc")]
    assert len(head) == 2
    for n in head:
        assert torch.equal(clipped[n], raw[n]), n
    changed = [n for n in raw if n not in head and not torch.equal(clipped[n], raw[n])]
    assert len(changed) > len(raw) // 2
    if name == "swin":
        assert "branch.mask_token" in changed


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_steps_update_parameters(amp):
    wrapped = masksub.wrap(tiny_model("vit")).train()
    before = copy.deepcopy(wrapped.state_dict())
    opt = torch.optim.AdamW(wrapped.parameters(), lr=1e-3)
    step = masksub.Step(wrapped, opt, torch.nn.CrossEntropyLoss(), amp=amp, clip_grad=1.0)
    for _ in range(2):
        out = step(tiny_images("vit", batch=4), torch.arange(4))
    assert torch.isfinite(out["loss"]) and out["loss"].dtype == torch.float32
    assert (step.scaler is not None) == (amp == "fp16")
    assert any(not torch.equal(before[k], v) for k, v in wrapped.state_dict().items())


def test_step_state_resumes_the_grad_scaler_exactly():
    """A resume in a loop of one's own: model, optimizer and Step states give the weights of the run that went on."""

    def make(state=None):
        wrapped = masksub.wrap(tiny_model("vit")).train()
        opt = torch.optim.SGD(wrapped.parameters(), lr=0.1, momentum=0.9)
        step = masksub.Step(wrapped, opt, torch.nn.CrossEntropyLoss(), amp="fp16", accum_steps=2)
        if state is not None:
            (
                wrapped.load_state_dict(state["model"]),
                opt.load_state_dict(state["opt"]),
                step.load_state_dict(state["step"]),
            )
        return wrapped, step

    def train(step, seeds):
        for seed in seeds:
            torch.manual_seed(seed)
            out = step(tiny_images("vit", batch=4, seed=seed), torch.arange(4))
        return out

    wrapped, step = make()
    train(step, [0])
    with pytest.raises(RuntimeError, match=r"inside an accumulation window \(1 of 2"):
        step.state_dict()
    assert train(step, [1])["updated"]
    step.scaler.update(new_scale=128.0)  # a scale that overflows lowered, say
    state = copy.deepcopy(
        {"model": wrapped.state_dict(), "opt": step.optimizer.state_dict(), "step": step.state_dict()}
    )
    train(step, [2, 3])

    resumed, again = make(state)
    assert again.scaler.get_scale() == 128.0
    train(again, [2, 3])
    assert again.scaler.get_scale() == step.scaler.get_scale()
    for (name, a), b in zip(wrapped.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    plain = masksub.Step(resumed, again.optimizer, torch.nn.CrossEntropyLoss())
    with pytest.raises(ValueError, match="saved with a grad scaler and this Step has no grad scaler"):
        plain.load_state_dict(state["step"])


def test_step_returns_tensors_without_host_sync():
    wrapped = masksub.wrap(tiny_model("vit")).train()
    step = masksub.Step(wrapped, torch.optim.SGD(wrapped.parameters(), lr=0.1), torch.nn.CrossEntropyLoss())
    out = step(tiny_images("vit", batch=4), torch.arange(4))
    assert all(isinstance(out[k], torch.Tensor) for k in ("loss", "loss_main", "loss_sub", "logits"))
    torch.testing.assert_close(out["loss"], 0.5 * out["loss_main"] + 0.5 * out["loss_sub"])


def test_softmax_teacher_matches_by_hand():
    main, sub = torch.randn(6, 5), torch.randn(6, 5)
    loss = masksub.SubBranchLoss(torch.nn.CrossEntropyLoss(label_smoothing=0.1))
    assert loss.teacher == "softmax"
    expected = -(F.softmax(main, -1) * F.log_softmax(sub, -1)).sum(-1).mean()
    torch.testing.assert_close(loss.sub_loss(sub, main), expected)


@pytest.mark.parametrize(
    "criterion",
    [
        torch.nn.BCEWithLogitsLoss(),
        BinaryCrossEntropy(smoothing=0.0),
        torch.nn.MultiLabelSoftMarginLoss(),
        functools.partial(F.binary_cross_entropy_with_logits, reduction="mean"),  # a bound function: was softmax
        functools.partial(functools.partial(torch.nn.BCEWithLogitsLoss()), reduction="mean"),
    ],
)
def test_sigmoid_teacher_for_bce(criterion):
    main, sub = torch.randn(6, 5), torch.randn(6, 5)
    loss = masksub.SubBranchLoss(criterion)
    assert loss.teacher == "sigmoid"
    torch.testing.assert_close(loss.sub_loss(sub, main), F.binary_cross_entropy_with_logits(sub, torch.sigmoid(main)))


@pytest.mark.parametrize(
    "criterion,teacher",
    [
        (torch.nn.CrossEntropyLoss(reduction="sum"), "softmax"),
        (functools.partial(F.cross_entropy, reduction="sum"), "softmax"),
        (torch.nn.BCEWithLogitsLoss(reduction="sum"), "sigmoid"),
    ],
)
def test_a_summing_criterion_gets_a_summed_distillation(criterion, teacher):
    """With reduction='sum' the distillation was a mean: its weight against the main loss fell with the batch."""
    main, sub = torch.randn(6, 5), torch.randn(6, 5)
    loss = masksub.SubBranchLoss(criterion)
    assert loss.teacher == teacher and "summed" in repr(loss)
    if teacher == "softmax":
        expected = -(F.softmax(main, -1) * F.log_softmax(sub, -1)).sum()
    else:
        expected = F.binary_cross_entropy_with_logits(sub, torch.sigmoid(main), reduction="sum")
    torch.testing.assert_close(loss.sub_loss(sub, main), expected)
    # the two terms scale alike with the batch: doubled by a batch of each sample twice
    target = torch.randint(0, 2, (6, 5)).float() if teacher == "sigmoid" else torch.randint(0, 5, (6,))
    twice = [torch.cat([t, t]) for t in (main, sub, target)]
    torch.testing.assert_close(loss(*twice), 2 * loss(main, sub, target))
    # token classification: the kept tokens' distillations summed
    tokens = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    labels = torch.tensor([[1, -100, 2], [0, 4, -100]])
    if teacher == "softmax":
        per_token = -(F.softmax(tokens[0], -1) * F.log_softmax(tokens[1], -1)).sum(-1)
        torch.testing.assert_close(loss.sub_loss(tokens[1], tokens[0], labels), per_token[labels != -100].sum())


# timm's multi-label losses (its loss_type choices for multi-label targets), where this timm has them
MULTI_LABEL_TIMM = {
    "AsymmetricLossMultiLabel": {},
    "PolyBinaryCrossEntropy": {},
    "TwoWayLoss": {},
    "ZlprLoss": {},
    "DistributionBalancedLoss": dict(class_counts=[3.0] * 5, num_samples=10),
}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.skipif(not hasattr(timm.loss, n), reason="older timm"))
        for n in MULTI_LABEL_TIMM
    ],
)
def test_timm_multi_label_losses_get_a_sigmoid_teacher(name):
    """A softmax teacher made the classes of a multi-label target compete: it was taken for all but timm's BCE."""
    criterion = getattr(timm.loss, name)(**MULTI_LABEL_TIMM[name])
    main, sub, target = torch.randn(6, 5), torch.randn(6, 5), torch.randint(0, 2, (6, 5)).float()
    loss = masksub.SubBranchLoss(criterion)
    assert loss.teacher == "sigmoid"
    assert torch.isfinite(loss.main_loss(main, target))
    torch.testing.assert_close(loss.sub_loss(sub, main), F.binary_cross_entropy_with_logits(sub, torch.sigmoid(main)))


def test_timm_single_label_losses_keep_the_softmax_teacher():
    for criterion in (timm.loss.AsymmetricLossSingleLabel(), timm.loss.LabelSmoothingCrossEntropy(0.1)):
        assert masksub.SubBranchLoss(criterion).teacher == "softmax"


@pytest.mark.parametrize(
    "criterion",
    [torch.nn.MSELoss(), torch.nn.SmoothL1Loss(), F.l1_loss, functools.partial(F.mse_loss, reduction="sum")],
)
def test_a_regression_criterion_needs_the_teacher_named(criterion):
    """A softmax teacher over regression outputs was taken silently; the sub branch learnt nothing meaningful."""
    with pytest.raises(ValueError, match="is a regression criterion, .* teacher='softmax' or teacher='sigmoid'"):
        masksub.SubBranchLoss(criterion)
    assert masksub.SubBranchLoss(criterion, teacher="softmax").teacher == "softmax"  # logits all the same: as told


@pytest.mark.parametrize(
    "criterion", [torch.nn.BCELoss(), F.binary_cross_entropy, functools.partial(F.binary_cross_entropy, weight=None)]
)
def test_a_criterion_on_probabilities_is_refused(criterion):
    """BCELoss's inputs are probabilities: a softmax teacher over them was taken silently."""
    with pytest.raises(ValueError, match="BCELoss takes probabilities .* use BCEWithLogitsLoss"):
        masksub.SubBranchLoss(criterion)


def test_nll_loss_on_log_probabilities_distills_as_cross_entropy_on_logits():
    """log_softmax outputs differ from the logits by a shift per row, which softmax ignores: NLLLoss is taken."""
    main, sub, target = torch.randn(6, 5), torch.randn(6, 5), torch.randint(0, 5, (6,))
    by_logits = masksub.SubBranchLoss(torch.nn.CrossEntropyLoss(), temperature=2.0)
    by_log_probs = masksub.SubBranchLoss(torch.nn.NLLLoss(), temperature=2.0)
    logp = (main.log_softmax(-1), sub.log_softmax(-1))
    torch.testing.assert_close(by_log_probs(*logp, target), by_logits(main, sub, target))


def test_mixed_targets_reach_main_branch_only():
    main, sub = torch.randn(4, 5, requires_grad=True), torch.randn(4, 5, requires_grad=True)
    soft = torch.softmax(torch.randn(4, 5), -1)  # mixup/cutmix targets
    loss = masksub.SubBranchLoss(SoftTargetCrossEntropy())
    total = loss(main, sub, soft)
    torch.testing.assert_close(total, 0.5 * SoftTargetCrossEntropy()(main, soft) + 0.5 * loss.sub_loss(sub, main))
    total.backward()
    # The sub term's teacher is detached: main receives only the main loss gradient.
    main2 = main.detach().clone().requires_grad_()
    (0.5 * SoftTargetCrossEntropy()(main2, soft)).backward()
    torch.testing.assert_close(main.grad, main2.grad)


def test_temperature_scaling():
    main, sub = torch.randn(6, 5), torch.randn(6, 5)
    loss = masksub.SubBranchLoss(torch.nn.CrossEntropyLoss(), temperature=2.0)
    expected = -(F.softmax(main / 2, -1) * F.log_softmax(sub / 2, -1)).sum(-1).mean() * 4
    torch.testing.assert_close(loss.sub_loss(sub, main), expected)


@pytest.mark.parametrize("off", [torch.no_grad, torch.inference_mode])
def test_a_step_with_gradients_off_is_named_and_changes_nothing(off):
    torch.manual_seed(0)
    wrapped = masksub.wrap(tiny_model("vit")).train()
    step = masksub.Step(
        wrapped, torch.optim.SGD(wrapped.parameters(), lr=0.1), torch.nn.CrossEntropyLoss(), accum_steps=2
    )
    x, y = tiny_images("vit", 4), torch.arange(4) % 5
    before = {k: v.clone() for k, v in wrapped.state_dict().items()}
    with off(), pytest.raises(RuntimeError, match=r"gradients are off here \(inside torch.no_grad\(\)"):
        step(x, y)
    assert all(torch.equal(v, before[k]) for k, v in wrapped.state_dict().items())
    assert not step(x, y)["updated"] and step(x, y)["updated"]  # the accumulation count did not move


@pytest.mark.parametrize("amp", [None, "fp16"])
def test_a_call_that_raises_drops_its_window_and_the_next_steps_on(amp, monkeypatch):
    """A caught error (a bad batch, an out-of-memory skip) left the micro-batch count past accum_steps: no later
    call stepped the optimizer again, silently."""
    torch.manual_seed(0)
    wrapped = masksub.wrap(tiny_model("vit")).train()
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.1)
    step = masksub.Step(wrapped, optimizer, torch.nn.CrossEntropyLoss(), accum_steps=2, amp=amp, clip_grad=1.0)
    x, y = tiny_images("vit", 4), torch.arange(4) % 5
    assert not step(x, y)["updated"]
    with pytest.raises(AssertionError):  # timm's check of the image size, in the main forward
        step(tiny_images("vit", 4)[..., :24], y)
    assert all(p.grad is None for p in wrapped.parameters()), "the window's gradients are dropped"
    assert [step(x, y)["updated"] for _ in range(4)] == [False, True, False, True]
    # An error inside the update, after the fp16 scaler unscaled the gradients: the scaler is usable again.
    real = optimizer.step
    monkeypatch.setattr(optimizer, "step", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("device lost")))
    step(x, y)
    with pytest.raises(RuntimeError, match="device lost"):
        step(x, y)
    monkeypatch.setattr(optimizer, "step", real)
    before = {k: v.clone() for k, v in wrapped.state_dict().items()}
    assert [step(x, y)["updated"] for _ in range(2)] == [False, True]
    assert any(not torch.equal(v, before[k]) for k, v in wrapped.state_dict().items()), "the optimizer stepped"


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(accum_steps=0), "accum_steps must be a positive integer, got 0"),
        (dict(accum_steps=True), "accum_steps must be a positive integer, got True"),
        (dict(amp="fp8"), "amp must be None, 'bf16' or 'fp16'"),
        (dict(clip_mode="max"), "clip_mode must be one of"),
        (dict(temperature=0.0), "temperature must be a finite number > 0, got 0.0"),
        (dict(temperature=float("inf")), "temperature must be a finite number > 0, got inf"),
        # a negative threshold flipped the gradients' sign, 0 zeroed them, NaN made every weight NaN
        (dict(clip_grad=-1.0), r"clip_grad must be a finite number > 0 \(None: no clipping\), got -1.0"),
        (dict(clip_grad=0), "clip_grad must be a finite number > 0"),
        (dict(clip_grad=float("nan")), "clip_grad must be a finite number > 0"),
        (dict(clip_grad="1.0"), "clip_grad must be a finite number > 0"),
        (dict(sub_weight=float("inf")), "loss weights must be finite and >= 0, got main 0.5, sub inf"),
        (dict(main_weight=0.0, sub_weight=0.0), "both 0: the loss would be 0 and nothing would train"),
    ],
)
def test_step_rejects_bad_settings(kw, message):
    wrapped = masksub.wrap(tiny_model("vit"))
    with pytest.raises(ValueError, match=message):
        masksub.Step(wrapped, torch.optim.SGD(wrapped.parameters(), lr=0.1), torch.nn.CrossEntropyLoss(), **kw)


def test_step_rejects_an_optimizer_made_before_wrap():
    model = tiny_model("swin")
    early = torch.optim.SGD(model.parameters(), lr=0.1)  # misses the mask token wrap() adds
    wrapped = masksub.wrap(model, unit=TINY["swin"][3])
    with pytest.raises(ValueError, match=r"does not hold the sub branch's parameters \['branch.mask_token'\]"):
        masksub.Step(wrapped, early, torch.nn.CrossEntropyLoss())
    masksub.Step(wrapped, torch.optim.SGD(wrapped.parameters(), lr=0.1), torch.nn.CrossEntropyLoss())


def _data_parallel_replica(net: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``net`` as ``nn.DataParallel`` makes one per GPU at each forward (torch's ``replicate`` without
    its CUDA broadcast): module objects copied, parameters shared."""
    modules = list(net.modules())
    replicas = {id(m): m._replicate_for_data_parallel() for m in modules}
    for m in modules:
        replica = replicas[id(m)]
        replica._modules = {k: None if c is None else replicas[id(c)] for k, c in m._modules.items()}
        for k, p in m._parameters.items():
            if p is not None:
                setattr(replica, k, p.view_as(p))
    return replicas[id(net)]


@pytest.mark.parametrize("sub", ["mask", "dropout"])
def test_data_parallel_is_refused_because_its_replicas_run_no_sub_branch(sub):
    wrapped = masksub.wrap(tiny_model("vit", drop_rate=0.1), sub).train()
    x = tiny_images("vit")
    torch.manual_seed(1)
    replica_sub = _data_parallel_replica(wrapped)(x, sub=True)
    torch.manual_seed(1)
    main = wrapped(x)
    torch.testing.assert_close(replica_sub, main)  # the copies ignore the sub branch's switches
    with pytest.raises(ValueError, match="nn.DataParallel copies the model .* Use DistributedDataParallel"):
        masksub.Step(torch.nn.DataParallel(wrapped), torch.optim.SGD(wrapped.parameters(), lr=0.1), F.cross_entropy)
    with pytest.raises(TypeError, match="wrap the plain model first"):
        masksub.wrap(torch.nn.DataParallel(tiny_model("vit")), sub)


@pytest.mark.parametrize("sub", ["mask", "droppath"])
def test_a_step_on_a_model_left_in_eval_mode_is_warned_once(sub, recwarn):
    """After an evaluation, a forgotten model.train() leaves drops and BatchNorm off: PathSub's sub branch
    then equals the main branch, silently."""
    wrapped = masksub.wrap(tiny_model("vit"), sub=sub)
    step = masksub.Step(wrapped, torch.optim.SGD(wrapped.parameters(), lr=0.1), torch.nn.CrossEntropyLoss())
    x, y = tiny_images("vit", batch=4), torch.arange(4)
    step(x, y)  # a fresh model trains: no warning
    assert not [w for w in recwarn if "eval mode" in str(w.message)]
    wrapped.eval()
    with pytest.warns(UserWarning, match="model is in eval mode.*call model.train") as caught:
        step(x, y)
    assert ("the sub branch drops nothing" in str(caught[-1].message)) == (sub == "droppath")
    recwarn.clear()
    step(x, y)
    assert not [w for w in recwarn if "eval mode" in str(w.message)], "once per Step"


@pytest.mark.parametrize("amp", ["bf16", "fp16", None])
@pytest.mark.parametrize("slow", [True, False])
def test_autocast_on_a_cpu_without_its_fast_kernels_is_warned_once(monkeypatch, recwarn, amp, slow):
    """On a CPU whose oneDNN kernels lack the autocast type (an AVX2 CPU's bf16), autocast is many times slower
    than float32: the first step says so and names the fix; a CPU with them, or no autocast, says nothing."""
    asked = []
    monkeypatch.setattr(masksub.step, "slow_cpu_autocast", lambda dtype: asked.append(dtype) or slow)
    wrapped = masksub.wrap(tiny_model("vit"))
    step = masksub.Step(wrapped, torch.optim.SGD(wrapped.parameters(), lr=0.1), torch.nn.CrossEntropyLoss(), amp=amp)
    x, y = tiny_images("vit", batch=4), torch.arange(4)
    step(x, y)
    step(x, y)
    said = [str(w.message) for w in recwarn if "Train in float32" in str(w.message)]
    assert asked == ([] if amp is None else [masksub.step.AMP_DTYPES[amp]]), "checked once per Step"
    assert len(said) == (slow and amp is not None)
    if said:
        assert f"amp={amp!r}" in said[0] and "amp=None" in said[0] and "--train.amp none" in said[0]
        assert "avx512_bf16" in said[0] if amp == "bf16" else "avx512_fp16" in said[0]


@pytest.mark.parametrize(
    "capabilities, slow",
    [
        ({"avx2": True, "avx512_bf16": False, "amx_bf16": False, "avx512_fp16": False}, (True, True)),  # AVX2
        ({"avx512_f": True, "avx512_bf16": True, "avx512_fp16": False}, (False, True)),  # bf16 only
        ({"amx_bf16": True, "amx_fp16": True}, (False, False)),
        ({"avx_ne_convert": True, "avx512_bf16": False}, (False, False)),
        ({"neon": True, "bf16": False, "fp16_arith": True}, (True, False)),  # an Arm CPU without bf16
        ({"architecture": "riscv64"}, None),  # no instructions listed: PyTorch's oneDNN check answers
    ],
)
def test_the_cpu_autocast_check_reads_the_cpus_instructions(monkeypatch, capabilities, slow):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities, raising=False)
    kernels = {"_is_mkldnn_bf16_supported": lambda: False, "_is_mkldnn_fp16_supported": lambda: True}
    monkeypatch.setattr(torch.ops, "mkldnn", type("Ops", (), {k: staticmethod(v) for k, v in kernels.items()}))
    if slow is None:
        slow = (True, False)  # oneDNN's answer
    assert (masksub.step.slow_cpu_autocast(torch.bfloat16), masksub.step.slow_cpu_autocast(torch.float16)) == slow
    assert masksub.step.slow_cpu_autocast(torch.float32) is False
    monkeypatch.delattr(torch.cpu, "get_capabilities")  # an older torch: oneDNN's check answers
    assert masksub.step.slow_cpu_autocast(torch.bfloat16) and not masksub.step.slow_cpu_autocast(torch.float16)
    monkeypatch.setattr(torch.ops, "mkldnn", object())  # nor that: nothing is said
    assert not masksub.step.slow_cpu_autocast(torch.bfloat16)


@pytest.mark.parametrize("memory_saving", [True, False])
def test_a_criterion_that_does_not_reduce_is_named(memory_saving):
    wrapped = masksub.wrap(tiny_model("vit"))
    step = masksub.Step(
        wrapped,
        torch.optim.SGD(wrapped.parameters(), lr=0.1),
        torch.nn.CrossEntropyLoss(reduction="none"),
        memory_saving=memory_saving,
    )
    with pytest.raises(ValueError, match=r"the criterion returned \(4,\), not a scalar loss: give it reduction='mean'"):
        step(tiny_images("vit", batch=4), torch.arange(4))


def test_memory_saving_step_peaks_like_the_plain_step_not_the_sum():
    x, y = torch.randn(32, 3, 32, 32), torch.arange(32) % 10
    peaks = {}
    for kind in ("plain", "two_backwards", "summed"):
        torch.manual_seed(0)
        model = timm.create_model(
            "vit_tiny_patch16_224", img_size=32, patch_size=4, depth=2, embed_dim=64, num_heads=2, num_classes=10
        )
        net = model if kind == "plain" else masksub.wrap(model, ratio=0.5, unit=8)
        opt = torch.optim.AdamW(net.parameters())
        step = masksub.Step(net, opt, torch.nn.CrossEntropyLoss(), memory_saving=kind != "summed")
        step(x, y)  # optimizer state exists before the measured step
        opt.zero_grad(set_to_none=True)
        peaks[kind] = peak_bytes(step, x, y)
    assert peaks["two_backwards"] <= 1.02 * peaks["plain"]  # the sub graph lives after the main one is freed
    assert peaks["summed"] >= 1.3 * peaks["plain"]  # both graphs alive at once


def _poison_once(param):
    """The next backward gives ``param`` a NaN gradient, the loss staying finite."""
    handle = None

    def hook(grad):
        handle.remove()
        return grad * float("nan")

    handle = param.register_hook(hook)


@pytest.mark.parametrize("clip_grad", [None, 1.0])
@pytest.mark.parametrize("poison", ["gradient", "loss"])
def test_nonfinite_gradient_or_loss_skips_the_step(poison, clip_grad):
    wrapped = masksub.wrap(tiny_model("vit")).train()
    opt = torch.optim.AdamW(wrapped.parameters(), lr=1e-2)
    step = masksub.Step(wrapped, opt, torch.nn.CrossEntropyLoss(), clip_grad=clip_grad, skip_nonfinite=True)
    x, y = tiny_images("vit", batch=4), torch.arange(4)
    before = copy.deepcopy(wrapped.state_dict())
    if poison == "gradient":
        _poison_once(wrapped.model.head.weight)
    out = step(x.clone().fill_(float("nan")) if poison == "loss" else x, y)
    assert out["skipped"] and out["updated"]
    assert torch.isfinite(out["loss"]) == (poison == "gradient")
    assert all(torch.equal(before[k], v) for k, v in wrapped.state_dict().items()), "a skipped step changed weights"
    assert all(p.grad is None for p in wrapped.parameters()) and not opt.state
    out = step(x, y)  # the next good step trains as usual
    assert not out.get("skipped") and any(not torch.equal(before[k], v) for k, v in wrapped.state_dict().items())


def test_without_skip_nonfinite_a_nan_gradient_reaches_the_weights():
    wrapped = masksub.wrap(tiny_model("vit")).train()
    step = masksub.Step(wrapped, torch.optim.SGD(wrapped.parameters(), lr=0.1), torch.nn.CrossEntropyLoss())
    _poison_once(wrapped.model.head.weight)
    step(tiny_images("vit", batch=4), torch.arange(4))
    assert wrapped.model.head.weight.isnan().all()


def test_fp16_overflow_is_left_to_the_grad_scaler():
    """With fp16 an infinite gradient is the scaler's business: it skips and lowers its scale, no 'skipped'."""
    wrapped = masksub.wrap(tiny_model("vit")).train()
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.1)
    step = masksub.Step(wrapped, opt, torch.nn.CrossEntropyLoss(), amp="fp16", skip_nonfinite=True)
    before = copy.deepcopy(wrapped.state_dict())
    scale = step.scaler.get_scale()
    _poison_once(wrapped.model.head.weight)
    out = step(tiny_images("vit", batch=4), torch.arange(4))
    assert not out.get("skipped") and step.scaler.get_scale() < scale
    assert all(torch.equal(before[k], v) for k, v in wrapped.state_dict().items())


def test_token_level_distillation_leaves_out_ignored_tokens():
    """(B, L, C) logits: the criterion sees rows, the distillation averages over tokens whose target is not
    ignore_index, and an ignored token's sub logits get no gradient."""
    g = torch.Generator().manual_seed(0)
    main, sub = torch.randn(3, 5, 4, generator=g), torch.randn(3, 5, 4, generator=g).requires_grad_()
    target = torch.randint(0, 4, (3, 5), generator=g)
    target[0, :2], target[2, 4] = -100, -100
    loss = masksub.SubBranchLoss(torch.nn.CrossEntropyLoss())
    kept = target != -100
    per_token = -(F.softmax(main, -1) * F.log_softmax(sub, -1)).sum(-1)
    torch.testing.assert_close(loss.sub_loss(sub, main, target), per_token[kept].mean())
    loss.sub_loss(sub, main, target).backward()
    assert (sub.grad[~kept] == 0).all() and (sub.grad[kept] != 0).any(dim=-1).all()
    expected_main = F.cross_entropy(main.reshape(-1, 4), target.reshape(-1))  # ignore_index=-100 by default
    torch.testing.assert_close(loss.main_loss(main, target), expected_main)
    # a criterion's own ignore_index; every token ignored gives 0, not NaN; soft targets keep every token
    own = masksub.SubBranchLoss(torch.nn.CrossEntropyLoss(ignore_index=3))
    torch.testing.assert_close(own.sub_loss(sub, main, target), per_token[target != 3].mean())
    bound = masksub.SubBranchLoss(functools.partial(F.cross_entropy, ignore_index=3))  # read -100 before
    torch.testing.assert_close(bound.sub_loss(sub, main, target), per_token[target != 3].mean())
    assert loss.sub_loss(sub, main, torch.full((3, 5), -100)).item() == 0.0
    torch.testing.assert_close(loss.sub_loss(sub, main, F.softmax(main, -1)), per_token.mean())
    with pytest.raises(ValueError, match=r"logits \(3, 5, 4\), .* need class-index targets of shape \(3, 5\)"):
        loss.main_loss(main, target[:, :4, None])


def test_distillation_leaves_out_the_places_a_sub_pass_did_not_predict():
    """``kept`` (a token classifier's tokens that a dropping sub pass ran on): only those are distilled, together
    with the target's ignore_index, for token-level and dense logits, soft targets, a sum and a sigmoid teacher; a
    mask of the wrong shape, or one given for (B, C) logits, is an error naming the shape."""
    g = torch.Generator().manual_seed(0)
    main, sub = torch.randn(3, 5, 4, generator=g), torch.randn(3, 5, 4, generator=g).requires_grad_()
    target = torch.randint(0, 4, (3, 5), generator=g)
    target[0, :2] = -100
    kept = torch.rand(3, 5, generator=g) < 0.6
    kept[0, 3] = True
    per_token = -(F.softmax(main, -1) * F.log_softmax(sub, -1)).sum(-1)
    loss = masksub.SubBranchLoss(torch.nn.CrossEntropyLoss())
    both = kept & (target != -100)
    assert both.sum() < kept.sum() and both.sum() < (target != -100).sum()
    torch.testing.assert_close(loss.sub_loss(sub, main, target, kept), per_token[both].mean())
    loss.sub_loss(sub, main, target, kept).backward()
    assert (sub.grad[~both] == 0).all() and (sub.grad[both] != 0).any(dim=-1).all()
    torch.testing.assert_close(loss.sub_loss(sub, main, F.softmax(main, -1), kept), per_token[kept].mean())
    summed = masksub.SubBranchLoss(torch.nn.CrossEntropyLoss(reduction="sum"))
    torch.testing.assert_close(summed.sub_loss(sub, main, target, kept), per_token[both].sum())
    sigmoid = masksub.SubBranchLoss(torch.nn.BCEWithLogitsLoss())
    per_class = F.binary_cross_entropy_with_logits(sub, torch.sigmoid(main), reduction="none").mean(-1)
    torch.testing.assert_close(sigmoid.sub_loss(sub, main, torch.rand(3, 5, 4), kept), per_class[kept].mean())
    dense = torch.randn(2, 4, 3, 5, generator=g)
    pixels = torch.rand(2, 3, 5, generator=g) < 0.5
    per_pixel = -(F.softmax(dense, 1) * F.log_softmax(dense.flip(0), 1)).sum(1)
    torch.testing.assert_close(loss.sub_loss(dense.flip(0), dense, None, pixels), per_pixel[pixels].mean())
    with pytest.raises(ValueError, match=r"shape \(3, 5\) for logits \(3, 5, 4\), got \(3, 4\)"):
        loss.sub_loss(sub, main, target, kept[:, :4])
    with pytest.raises(ValueError, match=r"one per token or pixel: shape \(3,\) for logits \(3, 4\)"):
        loss.sub_loss(sub[:, 0], main[:, 0], target[:, 0], kept[:, 0])


def test_a_loss_subclass_whose_sub_loss_takes_no_kept_still_trains():
    """A SubBranchLoss subclass of a user's, its sub_loss written with (sub, main, target) only, is called so
    wherever no sub pass drops places (every image adapter): Step, for one, trains with it."""

    class Halved(masksub.SubBranchLoss):
        def sub_loss(self, sub_logits, main_logits, target=None):
            return 0.5 * super().sub_loss(sub_logits, main_logits, target)

    wrapped = masksub.wrap(tiny_model("vit"), sub="mask", ratio=0.5).train()
    step = masksub.Step(wrapped, torch.optim.SGD(wrapped.parameters(), lr=0.1), Halved(torch.nn.CrossEntropyLoss()))
    torch.manual_seed(0)
    out = step(tiny_images("vit", batch=4), torch.arange(4))
    assert out["updated"] and torch.isfinite(out["loss_sub"])


def test_dense_logits_are_distilled_per_pixel_with_classes_in_dim_1():
    """(B, C, H, W) logits, as a segmentation model returns them and torch's cross_entropy reads them: the main loss
    is the criterion's own on the dense logits, the distillation a softmax over dim 1 per pixel, ignored pixels left
    out (they used to be refused with targets of a wrong shape suggested)."""
    g = torch.Generator().manual_seed(0)
    main, sub = torch.randn(2, 4, 3, 5, generator=g), torch.randn(2, 4, 3, 5, generator=g).requires_grad_()
    target = torch.randint(0, 4, (2, 3, 5), generator=g)
    target[0, 0], target[1, 2, 4] = 255, 255
    kept = target != 255
    per_pixel = -(F.softmax(main, 1) * F.log_softmax(sub, 1)).sum(1)  # (2, 3, 5)
    for reduction, reduce in (("mean", lambda t: t.mean()), ("sum", lambda t: t.sum())):
        criterion = torch.nn.CrossEntropyLoss(ignore_index=255, reduction=reduction)
        loss = masksub.SubBranchLoss(criterion)
        torch.testing.assert_close(loss.main_loss(main, target), criterion(main, target))
        torch.testing.assert_close(loss.sub_loss(sub, main, target), reduce(per_pixel[kept]))
    soft = F.softmax(torch.randn(2, 4, 3, 5, generator=g), 1)  # soft targets of the logits' shape: classes in dim 1
    loss = masksub.SubBranchLoss(torch.nn.CrossEntropyLoss(reduction="sum"))
    torch.testing.assert_close(loss.main_loss(main, soft), F.cross_entropy(main, soft, reduction="sum"))
    torch.testing.assert_close(loss.sub_loss(sub, main, soft), per_pixel.sum())
    # a 1-D dense output (B, C, L) with targets (B, L), and a channels-last (B, H, W, C) one with (B, H, W)
    mean = masksub.SubBranchLoss(torch.nn.CrossEntropyLoss())
    flat, flat_target = main.flatten(2), target.flatten(1).clamp(max=3)
    torch.testing.assert_close(mean.main_loss(flat, flat_target), F.cross_entropy(flat, flat_target))
    torch.testing.assert_close(mean.sub_loss(sub.flatten(2), flat, flat_target), per_pixel.mean())
    last = main.permute(0, 2, 3, 1)
    torch.testing.assert_close(mean.main_loss(last, target.clamp(max=3)), F.cross_entropy(main, target.clamp(max=3)))
    torch.testing.assert_close(mean.sub_loss(sub.permute(0, 2, 3, 1), last, target), per_pixel.mean())
    with pytest.raises(ValueError, match=r"need class-index targets of shape \(2, 3, 5\) \(classes in dim 1\)"):
        mean.main_loss(main, target[:, :2])


def test_a_segmentation_model_trains_with_step():
    """A dense model on masked pixels: Step's gradients equal those of the summed loss worked out with torch's
    dense cross-entropy and a per-pixel distillation."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.GELU(), torch.nn.Conv2d(8, 4, 1))
    wrapped = masksub.wrap(net, sub="mask", ratio=0.5)
    x, y = torch.randn(2, 3, 64, 64), torch.randint(0, 4, (2, 64, 64))
    y[:, :8] = 255
    criterion = torch.nn.CrossEntropyLoss(ignore_index=255)
    step = masksub.Step(wrapped, torch.optim.SGD(wrapped.parameters(), lr=0.0), criterion)
    torch.manual_seed(1)
    step(x, y)
    got = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    torch.manual_seed(1)
    main = wrapped(x)
    sub = wrapped(x, sub=True)
    kept = y != 255
    distill = -(F.softmax(main.detach(), 1) * F.log_softmax(sub, 1)).sum(1)[kept].mean()
    (0.5 * criterion(main, y) + 0.5 * distill).backward()
    for a, p in zip(got, net.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad)


def test_a_torchvision_segmentation_model_trains_on_its_out_logits():
    """torchvision's segmentation models return {'out': dense logits}: Step trains on them; with an auxiliary head
    (aux_loss=True), which no loss would train, the error says how to build the model without it."""
    from torchvision.models.segmentation import lraspp_mobilenet_v3_large

    torch.manual_seed(0)
    net = lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=4)
    x, y = torch.randn(2, 3, 64, 64), torch.randint(0, 4, (2, 64, 64))
    criterion = torch.nn.CrossEntropyLoss()
    expected = criterion(copy.deepcopy(net).train()(x)["out"], y)
    wrapped = masksub.wrap(net).train()
    out = masksub.Step(wrapped, torch.optim.SGD(wrapped.parameters(), lr=0.01), criterion)(x, y)
    assert out["logits"].shape == (2, 4, 64, 64) and out["loss_sub"] > 0
    torch.testing.assert_close(out["loss_main"], expected.detach())
    with pytest.raises(TypeError, match="'aux' logits .* build it with aux_loss=False"):
        masksub.outputs.logits_of({"out": out["logits"], "aux": out["logits"]})


def test_the_plain_model_of_a_wrapper_is_refused_until_unwrapped():
    """``masksub.wrap(model)`` without keeping the wrapper, then ``Step(model, ...)``: it used to train without the
    sub branch, silently. Refused now, also inside a module of your own; a copy (an EMA model, say) and an unwrapped
    model train plain."""
    model = tiny_model("vit")
    masksub.wrap(model, sub="dropout")
    gc.collect()  # the wrapper is gone; the model still was given to wrap()
    opt, criterion = torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.CrossEntropyLoss()
    with pytest.raises(ValueError, match=r"the model was given to masksub.wrap\(sub='dropout'\).*Pass the wrapper"):
        masksub.Step(model, opt, criterion)
    holder = torch.nn.Sequential(model)
    with pytest.raises(ValueError, match=r"^0 was given to masksub.wrap"):
        masksub.Step(holder, opt, criterion)
    x, y = tiny_images("vit", batch=4), torch.arange(4)
    ema = copy.deepcopy(model)
    assert masksub.Step(ema, torch.optim.SGD(ema.parameters(), lr=0.1), criterion)(x, y)["updated"]
    wrapped = masksub.wrap(model)
    wrapped.unwrap()
    assert masksub.Step(model, opt, criterion)(x, y)["updated"]


def test_a_wrapped_model_inside_a_module_of_your_own_is_found_or_named():
    """A module that holds a wrapped model trains its sub branch when its forward passes sub= through, and gets an
    error that says so when it does not (it used to train without the sub branch, silently)."""

    class Passes(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = masksub.wrap(tiny_model("vit"))

        def forward(self, x, sub=False):
            return self.net(x, sub=sub)

    class Drops(Passes):
        def forward(self, x):
            return self.net(x)

    x, y = tiny_images("vit", batch=4), torch.arange(4)
    for holder, works in ((Passes(), True), (Drops(), False)):
        step = masksub.Step(holder, torch.optim.SGD(holder.parameters(), lr=0.1), torch.nn.CrossEntropyLoss())
        assert step.has_sub
        if works:
            assert step(x, y)["loss_sub"] > 0
        else:
            with pytest.raises(TypeError, match="Drops holds a masksub.wrap-ed model, but its forward does not take"):
                step(x, y)
    two = torch.nn.ModuleList([masksub.wrap(tiny_model("vit")), masksub.wrap(tiny_model("vit"))])
    with pytest.raises(ValueError, match="Step trains one masksub.wrap-ed model, and this model holds 2"):
        masksub.Step(two, torch.optim.SGD(two.parameters(), lr=0.1), torch.nn.CrossEntropyLoss())


def _checkpointed_grads(name, sub, checkpointing, memory_saving=True):
    net = tiny_model(name, drop_rate=0.1, attn_drop_rate=0.1, proj_drop_rate=0.1)  # dropout at work in both passes
    net.set_grad_checkpointing(checkpointing)  # each block's forward runs again in the backward
    wrapped = masksub.wrap(net, sub=sub, ratio=0.4, unit=TINY[name][3] if sub == "mask" else None).train()
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.0)
    step = masksub.Step(wrapped, opt, torch.nn.CrossEntropyLoss(), memory_saving=memory_saving)
    torch.manual_seed(7)  # the same masks and dropout draws in both runs
    step(tiny_images(name, batch=4), torch.arange(4))
    return _grads(wrapped)


@pytest.mark.parametrize("sub", ["mask", "dropout", "droppath"])
@pytest.mark.parametrize("name", ["vit", "swin", "convvit", "beit", "deepseek"])
def test_activation_checkpointing_gives_the_gradients_it_does_without(name, sub):
    """The backward recomputes each checkpointed block: the sub pass's drop rates are still in effect for it."""
    expected = _checkpointed_grads(name, sub, checkpointing=False)
    found = _checkpointed_grads(name, sub, checkpointing=True)
    assert found.keys() == expected.keys()
    for n, g in expected.items():
        torch.testing.assert_close(found[n], g, rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.parametrize("sub", ["dropout", "droppath"])
def test_one_backward_of_both_passes_refuses_drop_rates_under_checkpointing(sub):
    """The summed loss recomputes both passes in one backward, which cannot give each its own drop rates."""
    with pytest.raises(ValueError, match=f"activation checkpointing is on .VisionTransformer. and sub='{sub}'"):
        _checkpointed_grads("vit", sub, checkpointing=True, memory_saving=False)
    expected = _checkpointed_grads("vit", "mask", checkpointing=False, memory_saving=False)
    found = _checkpointed_grads("vit", "mask", checkpointing=True, memory_saving=False)  # masking is not a rate
    for n, g in expected.items():
        torch.testing.assert_close(found[n], g, rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.parametrize("name", ["beit", "vit_relpos"])
def test_one_backward_recomputes_each_pass_with_its_own_relative_bias(name):
    """The summed loss recomputes the main and the sub pass's blocks in one backward: each attention must get the
    full bias for the main pass's tokens and the gathered one for the sub pass's (the relpos adapter)."""
    expected = _checkpointed_grads(name, "mask", checkpointing=False, memory_saving=False)
    found = _checkpointed_grads(name, "mask", checkpointing=True, memory_saving=False)
    assert found.keys() == expected.keys() and any("relative_position" in n or "rel_pos" in n for n in found)
    for n, g in expected.items():
        torch.testing.assert_close(found[n], g, rtol=1e-5, atol=1e-7, msg=n)


def test_an_output_without_logits_is_refused_by_name_and_auxiliary_logits_get_the_fix():
    from torchvision.models.inception import InceptionOutputs

    class AuxNet(torch.nn.Module):  # returns what torchvision's Inception3 returns in training
        def __init__(self, aux: bool):
            super().__init__()
            self.conv, self.aux = torch.nn.Conv2d(3, 5, 3), aux

        def forward(self, x):
            logits = self.conv(x).mean((2, 3))
            return InceptionOutputs(logits, logits * 2) if self.aux else (logits, logits * 2)

    for aux, hint in ((True, "build the model with aux_logits=False"), (False, None)):
        model = masksub.wrap(AuxNet(aux), sub="mask", ratio=0.5, unit=4).train()
        step = masksub.Step(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.CrossEntropyLoss())
        with pytest.raises(TypeError, match="the model returned " + ("InceptionOutputs" if aux else "tuple")) as info:
            step(torch.rand(2, 3, 8, 8), torch.tensor([0, 1]))
        assert (hint in str(info.value)) if hint else "aux_logits" not in str(info.value)


def test_a_distilled_deit_in_distilled_training_gets_the_fix_named():
    """timm's distilled DeiT returns (class, distillation) logits after set_distilled_training(True)."""
    net = timm.create_model("deit_tiny_distilled_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=3)
    net.set_distilled_training(True)
    model = masksub.wrap(net).train()
    step = masksub.Step(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.CrossEntropyLoss())
    x, y = torch.rand(2, 3, 32, 32), torch.tensor([0, 1])
    with pytest.raises(TypeError, match=r"returned tuple.*set_distilled_training\(True\).*turn it off"):
        step(x, y)
    net.set_distilled_training(False)
    assert step(x, y)["updated"]


def test_a_question_answering_model_trains_on_its_answer_positions():
    """An extractive question-answering model's start and end logits are two predictions over the positions
    (``logits_of``: (batch, 2, length)), and labels (batch, 2) give the answer's start and end: the main loss is the
    model's own, and the sub branch learns both distributions."""
    transformers = pytest.importorskip("transformers")
    from conftest import SMALL, text_batch, wrap_text

    torch.manual_seed(0)
    no_dropout = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = transformers.BertForQuestionAnswering(
        transformers.BertConfig(**SMALL, max_position_embeddings=64, **no_dropout)
    )
    wrapped = wrap_text(model)
    step = masksub.Step(wrapped, torch.optim.SGD(wrapped.parameters(), lr=0.0), torch.nn.CrossEntropyLoss())
    batch = {k: v for k, v in text_batch(batch=4).items() if k != "labels"}
    positions = torch.tensor([[1, 3], [2, 2], [5, 9], [4, 6]])
    out = step({**batch, "labels": positions})
    assert out["logits"].shape == (4, 2, 20)
    own = model(**batch, start_positions=positions[:, 0], end_positions=positions[:, 1])
    torch.testing.assert_close(out["loss_main"], own.loss.detach())
    torch.testing.assert_close(out["logits"], torch.stack([own.start_logits, own.end_logits], 1).detach())
    assert out["loss_sub"] > 0
    torch.manual_seed(0)  # a question-answering batch as it comes: the positions are the target, kept from the model
    again = step({**batch, "start_positions": positions[:, 0], "end_positions": positions[:, 1:]})
    torch.testing.assert_close(again["loss_main"], out["loss_main"])
