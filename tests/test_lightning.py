"""masksub.lightning.TrainingStep in a Lightning Trainer: the gradient of the summed MaskSub loss in both
backward orders, accumulation included; the memory-saving order frees the main graph before the sub
forward; one gradient all-reduce per optimizer step under DDP."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    masksub_loss_by_hand,
    peak_bytes,
    run_worker,
    text_batch,
    tiny_images,
    tiny_model,
    tiny_text_model,
    wrap_text,
)

import masksub
from masksub.lightning import TrainingStep

L = pytest.importorskip("lightning")

BATCH = 4


class Recording:
    """A LightningModule's body as a user writes it, plus records of what the step saw."""

    def __init__(self, name="vit", memory_saving=None, criterion=None, lr=0.0, kind="masksub", sub="mask", **step_kw):
        super().__init__()
        net = tiny_model(name)
        self.model = net if kind == "plain" else masksub.wrap(net, sub=sub, ratio=0.5)
        self.kind, self.lr = kind, lr
        self.masksub = TrainingStep(criterion or torch.nn.CrossEntropyLoss(), memory_saving=memory_saving, **step_kw)
        self.seen, self.grads, self.grads_at_forward = [], [], []
        head = net.get_classifier()
        net.register_forward_pre_hook(lambda m, a: self.grads_at_forward.append(head.weight.grad is not None))

    def training_step(self, batch, batch_idx):
        if self.kind == "plain":
            x, y = batch
            return F.cross_entropy(self.model(x), y)
        self.seen.append((*batch, _rng_state(batch[0].device)))  # the sub pass's mask draws follow it
        return self.masksub(self, *batch)

    def on_before_optimizer_step(self, optimizer):
        self.grads.append({n: p.grad.clone() for n, p in self.named_parameters() if p.grad is not None})

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class Classifier(Recording, L.LightningModule):
    pass


def _loader(name="vit", batches=2, seed=3):
    x = tiny_images(name, batch=BATCH * batches, seed=seed)
    data = torch.utils.data.TensorDataset(x, torch.arange(len(x)) % 5)
    return torch.utils.data.DataLoader(data, batch_size=BATCH)


def _trainer(**kw):
    base = dict(
        accelerator="cpu",
        devices=1,
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return L.Trainer(**{**base, **kw})


def _rng_state(device):
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _by_hand(module, seen, accum):
    """The gradient of 0.5 CE(main) + 0.5 distill(sub, softmax(main)), from the same inputs and mask draws."""
    module.zero_grad()
    for x, y, (cpu, cuda) in seen:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, x.device)
        (masksub_loss_by_hand(module.model, x, y) / accum).backward()
    return {n: p.grad for n, p in module.named_parameters() if p.grad is not None}


def _assert_each_step_by_hand(module, accum):
    """Each optimizer step's recorded gradient is that of its own micro-batches (lr 0: the weights stay)."""
    assert len(module.grads) >= 2 and len(module.seen) == accum * len(module.grads)  # two windows at least
    for step, grads in enumerate(module.grads):
        expected = _by_hand(module, module.seen[step * accum : (step + 1) * accum], accum)
        assert grads.keys() == expected.keys()
        for n, g in expected.items():
            torch.testing.assert_close(grads[n], g, rtol=1e-4, atol=1e-7, msg=f"step {step}: {n}")


@pytest.mark.parametrize("memory_saving", [True, False])
@pytest.mark.parametrize("name,accum", [("vit", 1), ("vit", 2), ("swin", 1)])
def test_gradient_equals_summed_loss_by_hand(name, accum, memory_saving):
    """Two optimizer steps (lr 0: the weights stay); each step's gradient is that of its own micro-batches."""
    module = Classifier(name, memory_saving=memory_saving)
    _trainer(max_steps=2, accumulate_grad_batches=accum).fit(module, _loader(name, batches=2 * accum))
    assert len(module.grads) == 2 and len(module.seen) == 2 * accum
    # The first micro-batch's sub forward: the main pass was already back-propagated (its graph freed) or not.
    assert module.grads_at_forward[:2] == [False, memory_saving]
    _assert_each_step_by_hand(module, accum)
    if name == "swin":
        assert "model.branch.mask_token" in module.grads[0]  # the sub branch's own parameter trains too


def test_a_short_last_window_of_the_epoch_starts_from_zero():
    """3 micro-batches with accumulate_grad_batches=2: Lightning steps after 2, and again after the third at the
    end of the epoch (still dividing by 2); each step's gradient holds its own micro-batches only."""
    module = Classifier(memory_saving=True)
    _trainer(max_steps=-1, max_epochs=1, accumulate_grad_batches=2).fit(module, _loader(batches=3))
    assert len(module.grads) == 2 and len(module.seen) == 3
    for grads, seen in zip(module.grads, (module.seen[:2], module.seen[2:])):
        for n, g in _by_hand(module, seen, accum=2).items():
            torch.testing.assert_close(grads[n], g, rtol=1e-4, atol=1e-7, msg=n)


@pytest.mark.parametrize("memory_saving", [True, False])
def test_validation_step_gets_both_losses_and_leaves_the_training_gradient_alone(memory_saving):
    """Called in validation_step (no gradients), the step returns the two branches' losses and does nothing else;
    the main backward on a tensor without a graph failed there. Validation runs after every micro-batch, in the
    middle of each accumulation window too, and before training (the sanity check)."""

    class Validated(Classifier):
        def validation_step(self, batch, batch_idx):
            out = self.masksub(self, *batch)
            self.validated.append(out)
            self.log("val_loss", out["loss"])

    module = Validated(memory_saving=memory_saving)
    module.validated = []
    trainer = _trainer(max_steps=2, accumulate_grad_batches=2, val_check_interval=1, num_sanity_val_steps=1)
    trainer.fit(module, _loader(batches=4), _loader(batches=1, seed=5))
    assert len(module.validated) == 1 + 4  # the sanity check, then one per micro-batch
    x, y = _loader(batches=1, seed=5).dataset.tensors
    with torch.no_grad():
        module.eval()
        main = F.cross_entropy(module.model(x), y)
    for out in module.validated:
        assert not out["loss"].requires_grad and torch.isfinite(out["loss_sub"])
        torch.testing.assert_close(out["loss_main"], main)
        torch.testing.assert_close(out["loss"], 0.5 * out["loss_main"] + 0.5 * out["loss_sub"])
    _assert_each_step_by_hand(module.train(), accum=2)
    assert "val_loss" in trainer.callback_metrics and "loss_sub" in trainer.callback_metrics


def test_a_loss_left_without_its_backward_leaves_no_sub_rates_in_the_next_main_pass():
    """DropSub: a call whose loss Lightning never back-propagated kept the sub pass's rates in force, into the
    next call's main pass."""

    class Twice(Classifier):
        def training_step(self, batch, batch_idx):
            self.masksub(self, *batch)  # a loss left without its backward
            return self.masksub(self, *batch)

    module = Twice(sub="dropout", memory_saving=True)
    seen = []
    next(m for m in module.model.modules() if isinstance(m, torch.nn.Dropout)).register_forward_pre_hook(
        lambda m, a: seen.append(m.p)
    )
    _trainer().fit(module, _loader())
    assert seen == [0.0, 0.5, 0.0, 0.5]


@pytest.mark.parametrize("path", [None, "model"])
def test_a_compiled_wrapper_runs_compiled(path):
    """self.model = torch.compile(masksub.wrap(net)): the step found the wrapped model inside (_orig_mod) and ran
    it uncompiled, and a model='model' path to it was refused."""
    module = Classifier(model=path)
    module.model = torch.compile(module.model, backend="eager")
    calls = []
    module.model.register_forward_pre_hook(lambda m, a, kw: calls.append(kw.get("sub", False)), with_kwargs=True)
    _trainer(max_steps=2).fit(module, _loader())
    assert calls == [False, True] * 2  # main, sub; per step
    _assert_each_step_by_hand(module, accum=1)


def test_other_strategies_get_the_summed_loss_with_a_warning_or_an_error_when_asked_for_two_backwards():
    from lightning.pytorch.strategies import SingleDeviceStrategy

    class Custom(SingleDeviceStrategy):  # a strategy TrainingStep does not know
        pass

    module = Classifier()
    unknown = "but Custom is not a strategy where that is known to work.*summed loss"
    with pytest.warns(UserWarning, match=unknown) as caught:
        _trainer(max_steps=2, strategy=Custom(device="cpu")).fit(module, _loader())
    assert sum("TrainingStep" in str(w.message) for w in caught) == 1  # once, not every step
    assert module.grads_at_forward[:2] == [False, False]  # one backward, after both forwards
    _assert_each_step_by_hand(module, 1)
    with pytest.raises(ValueError, match="memory_saving=True needs a backward inside training_step, but Custom is not"):
        _trainer(strategy=Custom(device="cpu")).fit(Classifier(memory_saving=True), _loader())


def test_a_zero_grad_override_runs_once_per_optimizer_step_at_the_start_of_its_window():
    calls = []

    class OwnZeroGrad(Classifier):
        def optimizer_zero_grad(self, epoch, batch_idx, optimizer):
            calls.append((batch_idx, len(self.grads_at_forward)))  # forwards that ran before it
            optimizer.zero_grad(set_to_none=False)

    module = OwnZeroGrad(memory_saving=True)
    _trainer(max_steps=3, accumulate_grad_batches=2).fit(module, _loader(batches=6))
    assert calls == [(0, 0), (2, 4), (4, 8)]  # at the start of each window, before its first forward
    _assert_each_step_by_hand(module, 2)


def test_the_pytorch_lightning_package_works_too():
    pl = pytest.importorskip("pytorch_lightning")

    class PLClassifier(Recording, pl.LightningModule):
        pass

    module = PLClassifier(memory_saving=True)
    pl.Trainer(accelerator="cpu", max_steps=2, accumulate_grad_batches=2, logger=False, enable_checkpointing=False).fit(
        module, _loader(batches=4)
    )
    assert module.grads_at_forward[:2] == [False, True]
    _assert_each_step_by_hand(module, 2)


def test_returned_loss_is_the_whole_loss_and_both_terms_are_logged():
    module = Classifier(main_weight=0.8, sub_weight=0.3)
    outputs = []

    class Keep(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, out, batch, batch_idx):
            outputs.append(out)
            assert {"loss_main", "loss_sub"} <= trainer.callback_metrics.keys()

    _trainer(max_steps=2, callbacks=[Keep()]).fit(module, _loader())
    assert len(outputs) == 2
    for out in outputs:
        torch.testing.assert_close(out["loss"], 0.8 * out["loss_main"] + 0.3 * out["loss_sub"])
        assert out["logits"].shape == (BATCH, 5) and not out["logits"].requires_grad


def test_bf16_autocast_trains_both_branches_in_bf16():
    module = Classifier(memory_saving=True)
    dtypes = []
    module.model.model.head.register_forward_hook(lambda m, a, out: dtypes.append(out.dtype))
    _trainer(precision="bf16-mixed").fit(module, _loader())
    assert dtypes == [torch.bfloat16, torch.bfloat16]
    assert all(torch.isfinite(g).all() for g in module.grads[0].values())


def test_fp16_scales_both_backwards_with_the_one_grad_scaler():
    """The main backward goes through the precision plugin: unscaled once, the gradient is the fp32 one (to fp16
    rounding); a main backward left unscaled would enter it divided by the scale, 1024."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    module = Classifier(memory_saving=True)
    fp16 = MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=2.0**10))
    _trainer(max_steps=2, plugins=[fp16]).fit(module, _loader())
    assert len(module.grads) == 2 and fp16.scaler.get_scale() == 2.0**10  # no overflow skipped a step
    for step, grads in enumerate(module.grads):
        for n, g in _by_hand(module, module.seen[step : step + 1], 1).items():
            assert (grads[n] - g).norm() <= 0.02 * g.norm(), f"step {step}: {n}"


def test_memory_saving_step_peaks_like_the_plain_step_not_the_sum():
    x = tiny_images("vit", batch=64)  # activations well above the weights and gradients
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.arange(64) % 5), batch_size=64)
    peaks = {}
    for kind, memory_saving in (("plain", None), ("two_backwards", True), ("summed", False)):
        module = Classifier(memory_saving=memory_saving, kind=kind)
        peaks[kind] = peak_bytes(_trainer().fit, module, loader)
    assert peaks["two_backwards"] <= 1.05 * peaks["plain"], peaks  # the main graph is freed before the sub forward
    assert peaks["summed"] >= 1.3 * peaks["plain"], peaks  # both graphs alive at the one backward


def test_text_batches_with_labels_in_the_mapping():
    class TextClassifier(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = wrap_text(tiny_text_model(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
            self.masksub = TrainingStep(torch.nn.CrossEntropyLoss())
            self.losses = []

        def training_step(self, batch, batch_idx):
            out = self.masksub(self, batch)
            self.losses.append(out["loss"].detach())
            return out

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    data = text_batch(batch=8)
    rows = [{k: v[i] for k, v in data.items()} for i in range(8)]
    module = TextClassifier()
    _trainer(max_steps=2).fit(module, torch.utils.data.DataLoader(rows, batch_size=4))
    assert len(module.losses) == 2 and all(torch.isfinite(v) for v in module.losses)


@pytest.mark.parametrize("head", ["token", "causal_lm", "mixture_of_experts"])
def test_a_per_token_head_dropping_tokens_trains_with_steps_gradients(head):
    """mode='drop' on a token classifier, or a causal language model (its labels shifted as in Step; a mixture of
    experts' router losses in its main loss): the distillation leaves out the tokens the sub pass dropped, as in
    Step."""
    from conftest import lm_labels, tiny_language_model, tiny_token_model, token_labels

    def build():
        if head != "token":
            return wrap_text(tiny_language_model("llama" if head == "causal_lm" else "mixtral"), mode="drop").train()
        model = tiny_token_model(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        return wrap_text(model, mode="drop").train()

    class Tagger(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = build()
            self.masksub = TrainingStep(torch.nn.CrossEntropyLoss(), log=False)

        def training_step(self, batch, batch_idx):
            torch.manual_seed(7)  # the sub pass's mask
            return self.masksub(self, batch)

        def on_before_optimizer_step(self, optimizer):
            grads = {n: p.grad.clone() for n, p in self.named_parameters() if p.grad is not None}
            self.grads = {n.removeprefix("model."): g for n, g in grads.items()}

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    data = token_labels(text_batch(batch=4)) if head == "token" else lm_labels(text_batch(batch=4))
    module = Tagger()
    rows = [{k: v[i] for k, v in data.items()} for i in range(4)]
    _trainer().fit(module, torch.utils.data.DataLoader(rows, batch_size=4))
    reference = build()
    step = masksub.Step(reference, torch.optim.SGD(reference.parameters(), lr=0.0), torch.nn.CrossEntropyLoss())
    torch.manual_seed(7)
    step(data)
    assert reference.sub_kept is not None and torch.equal(module.model.sub_kept, reference.sub_kept)
    for n, p in reference.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(module.grads[n], p.grad, rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.parametrize("memory_saving", [True, False])
@pytest.mark.parametrize("kind", ["llama", "mixtral"])
def test_num_items_in_batch_weighs_accumulated_micro_batches_by_their_labelled_tokens(kind, memory_saving):
    """Two accumulated micro-batches of 1 and 3 rows, given the step's labelled tokens: each micro-batch's losses
    weigh by its share of them, not by half each (Lightning's division by the accumulation), with Step's gradient
    given the same count (a mixture of experts' router losses still a mean per micro-batch); the returned loss keeps
    its value. Without the count, the gradient differs."""
    from conftest import lm_labels, tiny_language_model

    data = lm_labels(text_batch(batch=4, length=16))
    data["labels"][0, 7:] = -100  # the first row's response cut short: the two micro-batches hold unlike counts
    parts = [{k: v[rows] for k, v in data.items()} for rows in (slice(0, 1), slice(1, 4))]
    total = sum(int((p["labels"][:, 1:] != -100).sum()) for p in parts)

    def build():
        return wrap_text(tiny_language_model(kind), mode="attention").train()

    class LanguageModel(L.LightningModule):
        def __init__(self, num_items):
            super().__init__()
            self.model, self.num_items, self.losses = build(), num_items, []
            self.masksub = TrainingStep(torch.nn.CrossEntropyLoss(), memory_saving=memory_saving, log=False)

        def training_step(self, batch, batch_idx):
            torch.manual_seed(7 + batch_idx)  # the sub pass's mask
            out = self.masksub(self, batch, num_items_in_batch=self.num_items)
            self.losses.append(out["loss"].detach())
            return out

        def on_before_optimizer_step(self, optimizer):
            self.grads = {
                n.removeprefix("model."): p.grad.clone() for n, p in self.named_parameters() if p.grad is not None
            }

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    def fit(num_items):
        module = LanguageModel(num_items)
        rows = [{k: v[i] for k, v in data.items()} for i in range(4)]
        loader = torch.utils.data.DataLoader(rows, batch_sampler=[[0], [1, 2, 3]])
        _trainer(accumulate_grad_batches=2).fit(module, loader)
        return module

    module = fit(total)
    reference = build()
    step = masksub.Step(
        reference, torch.optim.SGD(reference.parameters(), lr=0.0), torch.nn.CrossEntropyLoss(), accum_steps=2,
        memory_saving=memory_saving,
    )  # fmt: skip
    outs = []
    for i, part in enumerate(parts):
        torch.manual_seed(7 + i)
        outs.append(step(part, num_items_in_batch=total))
    assert outs[-1]["updated"] and [float(v) for v in module.losses] == [float(o["loss"]) for o in outs]
    grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    assert module.grads.keys() == grads.keys()
    for n in grads:
        torch.testing.assert_close(module.grads[n], grads[n], rtol=1e-5, atol=1e-7, msg=n)
    halves = fit(None).grads  # Lightning's own weighing: each micro-batch's mean / 2
    assert max((halves[n] - grads[n]).abs().max() for n in grads) > 1e-4


def test_misuse_gets_errors_that_say_what_to_do():
    step = TrainingStep(torch.nn.CrossEntropyLoss())
    with pytest.raises(RuntimeError, match="training_step of a LightningModule that a lightning Trainer"):
        step(Classifier(), tiny_images("vit", batch=2), torch.tensor([0, 1]))

    class Manual(Classifier):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

    with pytest.raises(ValueError, match="Keep automatic optimization on"):
        _trainer().fit(Manual(), _loader())

    class WithLBFGS(Classifier):
        def configure_optimizers(self):
            return torch.optim.LBFGS(self.parameters())

    with pytest.raises(ValueError, match="LBFGS runs training_step several times.*first-order optimizer"):
        _trainer().fit(WithLBFGS(), _loader())

    unwrapped = Classifier()
    unwrapped.model = unwrapped.model.model
    with pytest.raises(ValueError, match="one masksub.wrap-ed model in the LightningModule, found none"):
        _trainer().fit(unwrapped, _loader())

    two = Classifier()
    two.ema = masksub.wrap(tiny_model("vit"))
    with pytest.raises(ValueError, match=r"found 2 \(model, ema\).*model='name'"):
        _trainer().fit(two, _loader())
    named = Classifier(model="model")
    named.ema = masksub.wrap(tiny_model("vit"))
    _trainer().fit(named, _loader())
    assert len(named.grads) == 1 and not any(p.grad is not None for p in named.ema.parameters())


def test_readme_example_runs_as_written():
    readme = Path(__file__).resolve().parents[1] / "README.md"
    section = readme.read_text().split("### PyTorch Lightning: `masksub.lightning.TrainingStep`", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope: dict = {}
    exec(compile(code, str(readme), "exec"), scope)
    module = scope["Classifier"]()
    data = torch.utils.data.TensorDataset(torch.rand(4, 3, 64, 64), torch.tensor([0, 1, 2, 3]))
    trainer = _trainer(max_steps=2, limit_val_batches=1)
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    trainer.fit(module, loader, loader)
    assert trainer.global_step == 2 and {"loss_main", "loss_sub", "val_acc"} <= trainer.callback_metrics.keys()
    assert module.model.branch.name == "pixels"  # resnet50: input pixels masked in 32-pixel blocks


def test_fashion_mnist_example_learns_in_both_runs(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "examples"))
    example = importlib.import_module("lightning_fashion_mnist")
    tiny = ["--train-images", "1024", "--test-images", "500", "--epochs", "1", "--batch-size", "64", "--width", "32"]
    result = example.main(tiny)
    assert result["plain"] > 20 and result["masksub"] > 20  # 10 classes: chance is 10%


@pytest.mark.slow
@pytest.mark.parametrize("memory_saving", ["1", "0"], ids=["two-backwards", "summed"])
def test_ddp_all_reduces_once_per_step_with_the_gradient_of_the_summed_loss(tmp_path, memory_saving):
    """torchrun, 2 CPU processes: 3 optimizer steps of 2 micro-batches each, 3 gradient all-reduces."""
    ranks = run_worker("ddp_lightning_worker.py", tmp_path, memory_saving)
    for rank in ranks:
        assert rank["result"] == {"world": 2, "rounds": 3, "steps": 3, "two_backwards": memory_saving == "1"}
        assert rank["synced"].keys() == ranks[0]["local"].keys()
        for n, g in rank["synced"].items():  # the first step's synced gradient: the mean of both ranks' by hand
            torch.testing.assert_close(g, (ranks[0]["local"][n] + ranks[1]["local"][n]) / 2, rtol=1e-4, atol=1e-7)


@pytest.mark.slow
def test_ddp_num_items_in_batch_gives_the_gradient_of_the_whole_batch(tmp_path):
    """torchrun, 2 CPU processes of 2 accumulated one-row micro-batches each, given the step's labelled tokens over
    both: DDP's mean of the processes' gradients is that of the model's own loss on the 4 rows (each process's
    share counted times the 2 processes the mean divides by; the sub branch weighed 0 here)."""
    from conftest import lm_labels, tiny_language_model

    ranks = run_worker("ddp_lightning_worker.py", tmp_path, "tokens")
    model = tiny_language_model("llama")
    data = lm_labels(text_batch(batch=4, length=16))
    data["labels"][0, 7:] = -100
    model(**data).loss.backward()
    for rank in ranks:  # named in the wrapped model: model.<name>
        assert rank["synced"].keys() == {f"model.{n}" for n, p in model.named_parameters() if p.grad is not None}
        for n, p in model.named_parameters():
            torch.testing.assert_close(rank["synced"][f"model.{n}"], p.grad, rtol=1e-5, atol=1e-7, msg=n)


def _gradient_with(sub, checkpointing, memory_saving=None):
    module = Classifier(memory_saving=memory_saving, sub=sub)
    module.model.model.set_grad_checkpointing(checkpointing)  # each block runs again in Lightning's backward
    torch.manual_seed(7)
    _trainer().fit(module, _loader())
    return module.grads[0]


@pytest.mark.parametrize("sub", ["droppath", "mask"])
def test_activation_checkpointing_gives_the_gradient_it_does_without(sub):
    """Lightning back-propagates the returned loss after training_step: the sub pass's drop-path rate is
    still in effect when that backward recomputes the checkpointed blocks."""
    expected = _gradient_with(sub, checkpointing=False)
    found = _gradient_with(sub, checkpointing=True)
    assert found.keys() == expected.keys()
    for n, g in expected.items():
        torch.testing.assert_close(found[n], g, rtol=1e-5, atol=1e-7, msg=n)


def test_summed_loss_refuses_pathsub_under_activation_checkpointing():
    with pytest.raises(ValueError, match="activation checkpointing is on .VisionTransformer. and sub='droppath'"):
        _gradient_with("droppath", checkpointing=True, memory_saving=False)
