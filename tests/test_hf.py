"""MaskSubTrainer: the Trainer's gradient is that of the summed MaskSub loss in both backward orders,
accumulation included; the memory-saving order back-propagates the main pass before the sub forward."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import (
    MASK,
    SMALL,
    SPECIAL,
    lm_labels,
    needs_transformers_5,
    peak_bytes,
    run_worker,
    text_batch,
    tiny_language_model,
    tiny_text_model,
    tiny_token_model,
    token_labels,
)

from masksub.adapters.text_families import transformers_version
from masksub.hf import MaskSubTrainer

NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


class Rows(torch.utils.data.Dataset):
    def __init__(self, batch):
        self.batch = batch

    def __len__(self):
        return len(next(iter(self.batch.values())))

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.batch.items()}


class GradsBeforeStep(transformers.TrainerCallback):
    def __init__(self, model):
        self.model, self.grads = model, []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.grads.append({n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None})


def _args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        per_device_train_batch_size=4,
        learning_rate=0.0,  # the captured gradient is the first step's, at the initial weights
        max_grad_norm=0.0,  # no clipping: the raw gradient
        max_steps=1,
        seed=0,
        disable_tqdm=True,
    )
    return transformers.TrainingArguments(**{**base, **kw})


def _trainer(tmp_path, model, data, memory_saving=None, **kw):
    mask_options = kw.pop("mask_options", {"mask_token_id": MASK, "special_ids": SPECIAL})
    return MaskSubTrainer(
        model=model,
        args=_args(tmp_path, **kw),
        train_dataset=Rows(data),
        mask_options=mask_options,
        memory_saving=memory_saving,
    )


@pytest.mark.parametrize("memory_saving", [True, False])
@pytest.mark.parametrize("accum", [1, 2])
def test_trainer_gradient_equals_summed_loss_by_hand(tmp_path, accum, memory_saving):
    model = tiny_text_model(**NO_DROPOUT)  # no dropout: the recorded inputs fix both passes
    seen, grads_at_forward = [], []  # (input_ids, attention_mask) of every forward, main and sub alternating

    def record(module, args, kwargs):
        seen.append((kwargs["input_ids"].clone(), kwargs["attention_mask"].clone()))
        grads_at_forward.append(module.classifier.weight.grad is not None)

    recording = model.register_forward_pre_hook(record, with_kwargs=True)
    capture = GradsBeforeStep(model)
    trainer = _trainer(
        tmp_path, model, text_batch(batch=4 * accum), gradient_accumulation_steps=accum, memory_saving=memory_saving
    )
    trainer.add_callback(capture)
    trainer.train()
    assert trainer.memory_saving is memory_saving
    assert len(capture.grads) == 1 and len(seen) == 2 * accum
    # The first micro-batch's sub forward: the main pass was already back-propagated (its graph freed) or not.
    assert grads_at_forward[:2] == [False, memory_saving]

    data = text_batch(batch=4 * accum)
    row_label = {tuple(r.tolist()): int(y) for r, y in zip(data["input_ids"], data["labels"])}
    model.zero_grad()
    recording.remove()
    for (ids, attention), (sub_ids, sub_attention) in zip(seen[0::2], seen[1::2]):
        labels = torch.tensor([row_label[tuple(r.tolist())] for r in ids])
        assert torch.equal(sub_attention, attention) and (sub_ids != ids).any()
        assert torch.equal(sub_ids[sub_ids != ids], torch.full_like(sub_ids[sub_ids != ids], MASK))
        main = model(input_ids=ids, attention_mask=attention).logits
        sub = model(input_ids=sub_ids, attention_mask=attention).logits
        teacher = F.softmax(main.detach(), dim=-1)
        loss = 0.5 * F.cross_entropy(main, labels) + 0.5 * (-(teacher * F.log_softmax(sub, -1)).sum(-1)).mean()
        (loss / accum).backward()
    grads = capture.grads[0]
    assert grads.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-7, msg=n)


def test_logs_hold_both_losses_which_add_up_to_the_loss(tmp_path):
    trainer = MaskSubTrainer(
        model=tiny_text_model(),
        args=_args(tmp_path, learning_rate=1e-3, max_steps=4, logging_steps=2),
        train_dataset=Rows(text_batch(batch=16)),
        mask_options={"mask_token_id": MASK, "special_ids": SPECIAL},
        main_weight=0.8,
        sub_weight=0.3,
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logs] == [2, 4]
    for entry in logs:
        assert entry["loss"] == pytest.approx(0.8 * entry["loss_main"] + 0.3 * entry["loss_sub"], rel=1e-4)
        assert entry["loss_main"] > 0 and entry["loss_sub"] > 0


def test_memory_saving_trainer_peaks_like_the_plain_trainer_not_the_sum(tmp_path):
    batch = text_batch(batch=32, length=48)  # activations well above the 90 kB of gradients held by the sub pass
    peaks = {}
    for kind in ("plain", "two_backwards", "summed"):
        model = tiny_text_model(**NO_DROPOUT)
        if kind == "plain":
            trainer = transformers.Trainer(model=model, args=_args(tmp_path), train_dataset=Rows(batch))
        else:
            trainer = _trainer(tmp_path, model, batch, memory_saving=kind == "two_backwards")
        trainer.current_gradient_accumulation_steps = 1  # set by the Trainer's loop in transformers >= 4.55
        peaks[kind] = peak_bytes(trainer.training_step, trainer.model, batch)
    assert peaks["two_backwards"] <= 1.05 * peaks["plain"]  # the main graph is freed before the sub forward
    assert peaks["summed"] >= 1.5 * peaks["plain"]  # both graphs alive at the one backward


def test_memory_saving_is_refused_where_a_second_backward_cannot_work(tmp_path):
    model, data = tiny_text_model(), text_batch()
    with pytest.raises(ValueError, match="LOMO updates the weights inside each backward.*memory_saving=False"):
        _trainer(tmp_path, model, data, memory_saving=True, optim="lomo")
    assert not _trainer(tmp_path, model, data, optim="lomo").memory_saving  # the default falls back to one backward
    assert _trainer(tmp_path, model, data).memory_saving


@pytest.mark.parametrize("mode", ["token", pytest.param("drop", marks=needs_transformers_5)])
def test_trainer_on_a_token_classifier_equals_the_per_token_loss_by_hand(tmp_path, mode):
    """Both losses per token, tokens labelled -100 left out of both; with mode='drop' the distillation also leaves
    out the tokens the sub pass dropped, whose kept tokens computed what hiding the others computes."""
    model = tiny_token_model(**NO_DROPOUT)
    seen = []
    model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].clone()), with_kwargs=True)
    capture = GradsBeforeStep(model)
    data = token_labels(text_batch(batch=4))
    options = {"mask_token_id": MASK, "special_ids": SPECIAL, "mode": mode}
    trainer = _trainer(tmp_path, model, data, label_smoothing_factor=0.1, mask_options=options)
    trainer.add_callback(capture)
    trainer.train()
    model.zero_grad()
    ids, sub_ids = seen
    order = [next(j for j in range(4) if torch.equal(data["input_ids"][j], row)) for row in ids]  # the sampler's
    labels, attention = data["labels"][order], data["attention_mask"][order]
    labelled = labels != -100
    main = model(input_ids=ids, attention_mask=attention).logits
    if mode == "drop":  # the BERT family drops after its embeddings: the ids it got are the batch's
        kept = trainer.sub_branch.kept
        assert torch.equal(sub_ids, ids) and 0 < (labelled & kept).sum() < labelled.sum()
        sub, distilled = model(input_ids=ids, attention_mask=attention * kept).logits, labelled & kept
    else:
        sub, distilled = model(input_ids=sub_ids, attention_mask=attention).logits, labelled
    per_token = -(F.softmax(main.detach(), -1) * F.log_softmax(sub, -1)).sum(-1)
    main_loss = F.cross_entropy(main[labelled], labels[labelled], label_smoothing=0.1)
    (0.5 * main_loss + 0.5 * per_token[distilled].mean()).backward()
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(capture.grads[0][n], p.grad, rtol=1e-4, atol=1e-7, msg=n)


def test_trainer_on_a_question_answering_model_equals_the_loss_by_hand(tmp_path):
    """Extractive question answering (a batch of start_positions and end_positions, no labels): the main loss is the
    model's own (the mean of the start's and the end's cross-entropy over the positions, one past the sequence left
    out), and the sub branch learns the main branch's start and end distributions over the positions."""
    torch.manual_seed(0)
    model = transformers.BertForQuestionAnswering(
        transformers.BertConfig(**SMALL, max_position_embeddings=64, **NO_DROPOUT)
    )
    seen = []
    model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].clone()), with_kwargs=True)
    capture = GradsBeforeStep(model)
    data = {k: v for k, v in text_batch(batch=4).items() if k != "labels"}
    start = torch.randint(1, 8, (4,), generator=torch.Generator().manual_seed(1))
    data["start_positions"], data["end_positions"] = start, (start + 2)[:, None]  # (batch, 1) too, as HF's takes
    data["end_positions"][1] = 99  # past the sequence: no end loss for it, as in the model's own loss
    trainer = _trainer(tmp_path, model, data)
    trainer.add_callback(capture)
    trainer.train()
    model.zero_grad()
    ids, sub_ids = seen
    assert not torch.equal(ids, sub_ids)
    order = [next(j for j in range(4) if torch.equal(data["input_ids"][j], row)) for row in ids]  # the sampler's
    starts, ends, attention = (
        data["start_positions"][order],
        data["end_positions"][order],
        data["attention_mask"][order],
    )
    main = model(input_ids=ids, attention_mask=attention, start_positions=starts, end_positions=ends)
    sub = model(input_ids=sub_ids, attention_mask=attention)
    main_logits = torch.stack([main.start_logits, main.end_logits], 1).detach()
    sub_logits = torch.stack([sub.start_logits, sub.end_logits], 1)
    per_row = -(F.softmax(main_logits, -1) * F.log_softmax(sub_logits, -1)).sum(-1)  # (batch, start and end)
    answered = torch.stack([starts, ends[:, 0]], 1) < 20
    assert not answered.all()
    (0.5 * main.loss + 0.5 * per_row[answered].mean()).backward()
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(capture.grads[0][n], p.grad, rtol=1e-4, atol=1e-7, msg=n)


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_trainer_on_a_language_model_equals_the_loss_by_hand(tmp_path, kind):
    """Supervised fine-tuning of a causal language model (labels: the input ids, none on the prompt), or an
    encoder-decoder (labels: the target): the main loss is the model's own, the sub branch (its source's words
    masked) learns the main branch's distribution of each labelled token; the configuration is left alone."""
    model = tiny_language_model(kind, dropout_rate=0.0) if kind == "t5" else tiny_language_model(kind)
    seen = []
    model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].clone()), with_kwargs=True)
    capture = GradsBeforeStep(model)
    data = lm_labels(text_batch(batch=4, length=16))
    if kind == "t5":  # a target of its own
        data["labels"] = text_batch(batch=4, length=10, seed=5)["input_ids"]
    trainer = _trainer(tmp_path, model, data)
    trainer.add_callback(capture)
    trainer.train()
    assert model.config.problem_type is None
    model.zero_grad()
    ids, sub_ids = seen
    assert not torch.equal(ids, sub_ids)
    order = [next(j for j in range(4) if torch.equal(data["input_ids"][j], row)) for row in ids]  # the sampler's
    labels, attention = data["labels"][order], data["attention_mask"][order]
    main = model(input_ids=ids, attention_mask=attention, labels=labels)
    sub = model(input_ids=sub_ids, attention_mask=attention, labels=labels).logits
    target = labels if kind == "t5" else F.pad(labels[:, 1:], (0, 1), value=-100)
    per_token = -(F.softmax(main.logits.detach(), -1) * F.log_softmax(sub, -1)).sum(-1)
    (0.5 * main.loss + 0.5 * per_token[target != -100].mean()).backward()
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(capture.grads[0][n], p.grad, rtol=1e-4, atol=1e-7, msg=n)


@pytest.mark.parametrize("kind", ["llava", "voxtral"])
def test_trainer_on_a_vision_language_or_speech_model_equals_the_loss_by_hand(tmp_path, kind):
    """LLaVA in the Trainer, its images in the batch (Voxtral, its audio): the main loss is its own (labels shifted),
    the sub branch's words masked around the placeholders of the image (the audio), each labelled next token
    distilled."""
    from speech import AUDIO, SPEECH_MODELS, speech_batch
    from vlms import IMAGE, llava, vlm_batch

    if kind == "llava":
        model, data, placeholder, media = llava(), vlm_batch("llava"), IMAGE, "pixel_values"
    else:
        model, data, placeholder, media = SPEECH_MODELS[kind](), speech_batch(kind), AUDIO, "input_features"
    seen = []
    record = lambda m, a, kw: seen.append((kw["input_ids"].clone(), kw[media].clone()))  # noqa: E731
    model.register_forward_pre_hook(record, with_kwargs=True)
    capture = GradsBeforeStep(model)
    trainer = _trainer(tmp_path, model, data)
    trainer.add_callback(capture)
    trainer.train()
    model.zero_grad()
    (ids, pixels), (sub_ids, sub_pixels) = seen
    assert not torch.equal(ids, sub_ids) and torch.equal(pixels, sub_pixels)
    assert torch.equal(ids == placeholder, sub_ids == placeholder)  # the placeholders stay where they are
    order = [next(j for j in range(4) if torch.equal(data["input_ids"][j], row)) for row in ids]  # the sampler's
    labels, attention = data["labels"][order], data["attention_mask"][order]
    main = model(input_ids=ids, attention_mask=attention, labels=labels, **{media: pixels})
    sub = model(input_ids=sub_ids, attention_mask=attention, **{media: pixels}).logits
    target = F.pad(labels[:, 1:], (0, 1), value=-100)
    per_token = -(F.softmax(main.logits.detach(), -1) * F.log_softmax(sub, -1)).sum(-1)
    (0.5 * main.loss + 0.5 * per_token[target != -100].mean()).backward()
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(capture.grads[0][n], p.grad, rtol=1e-4, atol=1e-7, msg=n)


def _language_data(kind: str, batch: int = 4) -> dict[str, torch.Tensor]:
    """A batch whose samples hold different numbers of labelled tokens: a causal model's responses (its prompt and
    padding unlabelled) or an encoder-decoder's targets, padded with -100."""
    data = lm_labels(text_batch(batch=batch, length=16))
    data["labels"][0, 7:] = -100  # a response cut short: no two samples of 4 hold as many tokens as the other two
    if kind == "t5":
        target = text_batch(batch=batch, length=10, seed=5)["input_ids"]
        data["labels"] = target.masked_fill(torch.arange(10) >= 10 - 2 * torch.arange(batch)[:, None], -100)
    return data


def _language_model(kind: str):
    return tiny_language_model(kind, dropout_rate=0.0) if kind == "t5" else tiny_language_model(kind)


@pytest.mark.parametrize("memory_saving", [True, False])
@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_accumulated_language_model_steps_weigh_each_labelled_token_alike(tmp_path, kind, memory_saving):
    """Two micro-batches of different numbers of labelled tokens: each micro-batch's losses (means over its tokens)
    weigh by its share of the step's labelled tokens, as the model's own loss given num_items_in_batch does,
    not by half each."""
    model = _language_model(kind)
    seen = []
    model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].clone()), with_kwargs=True)
    capture = GradsBeforeStep(model)
    data = _language_data(kind)
    trainer = _trainer(
        tmp_path, model, data, memory_saving, per_device_train_batch_size=2, gradient_accumulation_steps=2
    )
    trainer.add_callback(capture)
    trainer.train()
    model.zero_grad()
    targets, terms = [], []
    for ids, sub_ids in zip(seen[0::2], seen[1::2]):
        order = [next(j for j in range(4) if torch.equal(data["input_ids"][j], row)) for row in ids]
        labels, attention = data["labels"][order], data["attention_mask"][order]
        main = model(input_ids=ids, attention_mask=attention, labels=labels).logits
        sub = model(input_ids=sub_ids, attention_mask=attention, labels=labels).logits
        target = labels if kind == "t5" else F.pad(labels[:, 1:], (0, 1), value=-100)
        labelled = target != -100
        per_token = -(F.softmax(main.detach(), -1) * F.log_softmax(sub, -1)).sum(-1)
        ce = F.cross_entropy(main.transpose(1, 2), target, reduction="sum")
        targets.append(int(labelled.sum()))
        terms.append((ce, per_token[labelled].mean() * labelled.sum()))
    assert targets[0] != targets[1]  # a mean per micro-batch would weigh the tokens of the smaller one more
    (sum(0.5 * ce + 0.5 * distilled for ce, distilled in terms) / sum(targets)).backward()
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(capture.grads[0][n], p.grad, rtol=1e-4, atol=1e-7, msg=n)


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_accumulation_gives_a_language_model_the_gradient_of_one_batch_its_size(tmp_path, kind):
    """With the main loss alone (main_weight=1, sub_weight=0), 2 micro-batches of 2 accumulated give the gradient of
    the model's own loss over the 4 samples at once, as one batch of 4 does."""
    grads = []
    for batch, accum in ((4, 1), (2, 2)):
        model = _language_model(kind)
        capture = GradsBeforeStep(model)
        args = _args(tmp_path / str(accum), per_device_train_batch_size=batch, gradient_accumulation_steps=accum)
        options = {"mask_token_id": MASK, "special_ids": SPECIAL}
        data = Rows(_language_data(kind))
        trainer = MaskSubTrainer(
            model=model, args=args, train_dataset=data, mask_options=options, main_weight=1.0, sub_weight=0.0
        )
        trainer.add_callback(capture)
        trainer.train()
        grads.append(capture.grads[0])
    model.zero_grad()
    model(**_language_data(kind)).loss.backward()
    for n, p in model.named_parameters():
        if p.grad is not None:
            for got in grads:
                torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-7, msg=n)


@pytest.mark.parametrize("memory_saving", [True, False])
def test_a_mixture_of_experts_trains_its_routers_as_its_own_loss_does(tmp_path, memory_saving):
    """Mixtral, its load-balancing loss on (output_router_logits): the main loss is the model's own, cross-entropy
    plus the router loss by its weight. 2 micro-batches accumulated: the cross-entropy over the step's labelled
    tokens, plus the mean of the micro-batches' router losses (each a mean over its micro-batch, as TRL weighs it)."""
    model = tiny_language_model("mixtral")
    seen = []
    model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].clone()), with_kwargs=True)
    capture = GradsBeforeStep(model)
    data = _language_data("llama")
    args = _args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    options = {"mask_token_id": MASK, "special_ids": SPECIAL}
    trainer = MaskSubTrainer(
        model=model,
        args=args,
        train_dataset=Rows(data),
        mask_options=options,
        main_weight=1.0,
        sub_weight=0.0,
        memory_saving=memory_saving,
    )
    trainer.add_callback(capture)
    trainer.train()
    model.zero_grad()
    ce, router, counts = [], [], []
    for ids in seen[0::2]:
        order = [next(j for j in range(4) if torch.equal(data["input_ids"][j], row)) for row in ids]
        own = model(**{k: v[order] for k, v in data.items()})
        target = data["labels"][order][:, 1:].flatten()
        counts.append((target != -100).sum())
        ce.append(F.cross_entropy(own.logits[:, :-1].flatten(0, 1), target, reduction="sum"))
        router.append(own.loss - ce[-1] / counts[-1])
    assert counts[0] != counts[1] and all(r.item() > 0.1 for r in router)
    (sum(ce) / sum(counts) + sum(router) / 2).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(capture.grads[0][n], p.grad, rtol=1e-4, atol=1e-7, msg=n)


def test_logits_of_another_shape_are_refused(tmp_path):
    data = {**text_batch(batch=4), "labels": torch.zeros(4, 20, 2, dtype=torch.long)}  # labels of the wrong rank
    trainer = _trainer(tmp_path, tiny_token_model(), data)
    with pytest.raises(ValueError, match=r"per token, logits \(batch, length, classes\) with labels \(batch, length\)"):
        trainer.train()


def test_evaluation_uses_the_plain_model_and_its_own_loss(tmp_path):
    model = tiny_text_model()
    data = text_batch(batch=8)
    trainer = _trainer(tmp_path, model, data)
    metrics = trainer.evaluate(Rows(data))
    model.eval()
    with torch.no_grad():
        expected = model(**{k: v for k, v in data.items()}).loss
    assert metrics["eval_loss"] == pytest.approx(float(expected), rel=1e-5)


def test_saved_model_loads_with_from_pretrained(tmp_path):
    model = tiny_text_model()
    trainer = _trainer(tmp_path, model, text_batch(batch=8), learning_rate=1e-3, max_steps=2)
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    loaded = transformers.BertForSequenceClassification.from_pretrained(str(tmp_path / "saved")).eval()
    batch = {k: v for k, v in text_batch().items() if k != "labels"}
    model.eval()
    torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits)


def test_tokenizer_comes_from_processing_class(tmp_path):
    tokenizer = type("Tok", (), {"mask_token_id": 7, "all_special_ids": [0, 7]})()
    trainer = MaskSubTrainer(
        model=tiny_text_model(), args=_args(tmp_path), train_dataset=Rows(text_batch()), processing_class=tokenizer
    )
    assert trainer.sub_branch.mask_token_id == 7 and trainer.sub_branch.special_ids.tolist() == [0, 7]


def test_missing_tokenizer_and_regression_heads_are_refused(tmp_path):
    with pytest.raises(ValueError, match="processing_class=tokenizer"):
        MaskSubTrainer(model=tiny_text_model(), args=_args(tmp_path), train_dataset=Rows(text_batch()))
    with pytest.raises(ValueError, match="regression head"):
        MaskSubTrainer(model=tiny_text_model(num_labels=1), args=_args(tmp_path), mask_options={"special_ids": [0]})


def test_a_custom_loss_function_and_a_batch_without_labels_are_refused(tmp_path):
    def loss(outputs, labels, num_items_in_batch=None):
        return F.cross_entropy(outputs.logits, labels)

    with pytest.raises(ValueError, match="compute_loss_func"):
        MaskSubTrainer(model=tiny_text_model(), args=_args(tmp_path), compute_loss_func=loss, mask_options={})
    trainer = _trainer(tmp_path, tiny_text_model(), text_batch())
    unlabeled = {k: v for k, v in text_batch().items() if k != "labels"}
    trainer.model.train()
    with pytest.raises(ValueError, match="'labels'.*'input_ids'"):
        trainer.compute_loss(trainer.model, unlabeled)


@pytest.mark.slow
@pytest.mark.parametrize(
    "memory_saving,find_unused,model,static",
    [
        ("1", "none", "bert", ""),
        ("0", "0", "bert", ""),
        ("1", "none", "vit", ""),
        ("1", "0", "hf-swin", ""),  # no find_unused_parameters: the token is used in the synced (sub) pass
        ("1", "0", "timm-wrapper-swin", ""),
        ("1", "none", "bert", "static"),
    ],
    ids=["two-backwards", "summed", "hf-vit", "hf-swin-mask-token", "timm-wrapper-swin-mask-token", "static-graph"],
)
def test_trainer_under_ddp_all_reduces_once_per_step(tmp_path, memory_saving, find_unused, model, static):
    """torchrun, 2 CPU processes: 3 optimizer steps of 2 micro-batches each, 3 gradient all-reduces. With
    ddp_static_graph (and steps of one micro-batch) the default order is the summed loss: torch's reducer failed
    with an internal assert at the main backward inside no_sync."""
    if static and "ddp_static_graph" not in transformers.TrainingArguments.__dataclass_fields__:
        pytest.skip(f"transformers {transformers.__version__}'s TrainingArguments has no ddp_static_graph")
    from test_hf_vision import timm_wrapper_takes_model_args  # it imports this module

    if model == "timm-wrapper-swin" and not timm_wrapper_takes_model_args():  # the workers would skip, and fail
        pytest.skip(f"transformers {transformers.__version__}'s TimmWrapper ignores model_args (a tiny model)")
    for rank in run_worker(
        "ddp_trainer_worker.py", tmp_path, memory_saving, find_unused, model, *[static] * bool(static)
    ):
        assert rank["result"] == {"world": 2, "rounds": 3, "steps": 3}


@pytest.mark.parametrize("across", [True, False], ids=["average-tokens-across-devices", "per-process"])
def test_language_model_tokens_weigh_alike_across_processes_as_average_tokens_across_devices_says(tmp_path, across):
    """torchrun, 2 CPU processes, 2 micro-batches of 1 each: with average_tokens_across_devices every labelled token
    of the 4 samples weighs the same (the gradient of the model's own loss over all 4 at once); without it, each
    process's tokens weigh alike, and DDP averages the processes' gradients."""
    ranks = run_worker("ddp_language_worker.py", tmp_path, "across" if across else "per-process")
    data = _language_data("llama")
    model = _language_model("llama")

    def own_loss_gradient(rows: torch.Tensor) -> dict[str, torch.Tensor]:
        order = [next(j for j in range(4) if torch.equal(data["input_ids"][j], row)) for row in rows]
        model.zero_grad()
        model(**{k: v[order] for k, v in data.items()}).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    inputs = [rank["result"]["inputs"] for rank in ranks]
    assert sorted(r.tolist() for r in torch.cat(inputs)) == sorted(data["input_ids"].tolist())  # 4 samples, once
    if across:
        expected = own_loss_gradient(torch.cat(inputs))
    else:
        per_process = [own_loss_gradient(rows) for rows in inputs]
        expected = {n: (per_process[0][n] + per_process[1][n]) / 2 for n in per_process[0]}
    for rank in ranks:
        assert rank["result"]["grads"].keys() == expected.keys()
        for n, g in expected.items():
            torch.testing.assert_close(rank["result"]["grads"][n], g, rtol=1e-4, atol=1e-7, msg=n)


def _load_example(name: str = "text_classification"):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))  # as `python examples/<name>.py` has it: the examples import each other
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


@pytest.fixture
def local_model_and_csvs(tmp_path):
    """A tiny BERT + tokenizer saved with save_pretrained, and train/valid CSVs of two labels."""
    words = ["good", "fine", "great", "bad", "awful", "poor", "the", "film", "was", "plot"]
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, "##s"]))
    tokenizer = transformers.BertTokenizer(str(tmp_path / "vocab.txt"))
    model = tiny_text_model(vocab_size=len(tokenizer), num_labels=2)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 24), ("valid", 8)):
        rows = ["text,label"]
        for i in range(n):
            label = ("pos", "neg")[i % 2]
            opinion = words[:3] if label == "pos" else words[3:6]
            picks = torch.randint(0, 3, (3,), generator=g).tolist()
            rows.append(f"the film was {' '.join(opinion[j] for j in picks)},{label}")
        (tmp_path / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return tmp_path


@pytest.mark.parametrize(
    "sub,mode", [("mask", "token"), pytest.param("mask", "drop", marks=needs_transformers_5), ("none", None)]
)
def test_text_classification_example_runs(local_model_and_csvs, sub, mode):
    d = local_model_and_csvs
    argv = ["--model", str(d / "model"), "--train", str(d / "train.csv"), "--valid", str(d / "valid.csv")]
    argv += ["--sub", sub, "--max-steps", "3", "--batch-size", "8", "--lr", "1e-3", "--out", str(d / f"run-{sub}")]
    summary = _load_example().main([*argv, *(["--mode", mode] if mode else [])])
    assert summary["sub"] == sub and summary["mode"] == mode
    assert 0.0 <= summary["eval_accuracy"] <= 1.0 and summary["eval_loss"] > 0
    assert summary["train_seconds"] > 0 and len(summary["history"]) == 1  # the 3 steps are within epoch 1
    assert summary["history"][-1]["eval_accuracy"] == summary["eval_accuracy"]  # the trained model, evaluated again
    saved = transformers.AutoModelForSequenceClassification.from_pretrained(d / f"run-{sub}" / "model")
    assert saved.config.id2label == {0: "neg", 1: "pos"}


@needs_transformers_5
def test_text_classification_example_tunes_a_decoder_whose_tokenizer_has_no_padding(local_model_and_csvs):
    """A tiny Llama whose tokenizer has no padding token and no mask token, as decoders' have: the example pads with
    the end token, gives the model that padding id (its classifier reads each text's last word), and drops the
    masked words from the sequence."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    d = local_model_and_csvs
    words = ["the", "film", "was", "good", "fine", "great", "bad", "awful", "poor", ","]
    vocab = {w: i for i, w in enumerate(["<unk>", "</s>", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")
    assert tokenizer.pad_token is None and tokenizer.mask_token is None
    small = dict(SMALL, vocab_size=len(vocab), num_key_value_heads=2, max_position_embeddings=64)
    config = transformers.LlamaConfig(**small, num_labels=2, pad_token_id=None)
    torch.manual_seed(0)
    transformers.LlamaForSequenceClassification(config).save_pretrained(d / "llama")
    tokenizer.save_pretrained(d / "llama")
    argv = ["--model", str(d / "llama"), "--train", str(d / "train.csv"), "--valid", str(d / "valid.csv")]
    argv += ["--mode", "drop", "--max-steps", "3", "--batch-size", "8", "--lr", "1e-3", "--out", str(d / "llama-run")]
    summary = _load_example().main(argv)
    assert summary["mode"] == "drop" and 0.0 <= summary["eval_accuracy"] <= 1.0 and summary["eval_loss"] > 0
    saved = transformers.AutoModelForSequenceClassification.from_pretrained(d / "llama-run" / "model")
    assert saved.config.pad_token_id == vocab["</s>"]


@pytest.mark.parametrize(
    "sub,mode", [("mask", "attention"), pytest.param("mask", "drop", marks=needs_transformers_5), ("none", None)]
)
def test_language_model_example_runs(local_causal_lm, sub, mode):
    """Supervised fine-tuning of a tiny Llama on prompts and responses: it pads with the end token, and reports the
    model's own validation loss, its perplexity and the next-token accuracy over the responses."""
    d = local_causal_lm
    argv = ["--model", str(d / "lm"), "--train", str(d / "train_lm.csv"), "--valid", str(d / "valid_lm.csv")]
    argv += ["--sub", sub, "--max-steps", "3", "--batch-size", "8", "--lr", "1e-3", "--out", str(d / f"run-{sub}")]
    summary = _load_example("language_model").main([*argv, *(["--mode", mode] if mode else [])])
    assert summary["mode"] == mode and 0.0 <= summary["eval_accuracy"] <= 1.0
    assert summary["eval_perplexity"] == pytest.approx(math.exp(summary["eval_loss"]))
    saved = transformers.AutoModelForCausalLM.from_pretrained(d / f"run-{sub}" / "model")
    assert saved.config.pad_token_id == 1  # the end token


def test_language_model_example_labels_the_response_only(local_causal_lm):
    """The prompt's tokens are labelled -100, the response's and the end token by themselves; --max-length cuts
    both, and a file whose responses it cuts off entirely, or without a response column, is named."""
    example = _load_example("language_model")
    d = local_causal_lm
    tokenizer = transformers.AutoTokenizer.from_pretrained(d / "lm")
    (d / "one.csv").write_text("prompt,response\nthe film was,good fine\n")
    row = example.Pairs(tokenizer, d / "one.csv", max_length=16)[0]
    the, film, was, good, fine = tokenizer.convert_tokens_to_ids(["the", "film", "was", "good", "fine"])
    assert row["input_ids"] == [the, film, was, good, fine, 1] and row["attention_mask"] == [1] * 6
    assert row["labels"] == [-100, -100, -100, good, fine, 1]
    assert example.Pairs(tokenizer, d / "one.csv", max_length=4)[0]["labels"] == [-100, -100, -100, good]
    with pytest.raises(SystemExit, match="no response token is left within --max-length 3"):
        example.Pairs(tokenizer, d / "one.csv", max_length=3)
    (d / "bad.csv").write_text("prompt,answer\nthe film,good\n")
    with pytest.raises(SystemExit, match="must name the columns prompt and response"):
        example.Pairs(tokenizer, d / "bad.csv", max_length=16)


def _text_lines(d):
    """The texts of ``d``'s train and valid CSVs as text files of one text per line (blank lines between)."""
    for split in ("train", "valid"):
        texts = [row.split(",")[0] for row in (d / f"{split}.csv").read_text().splitlines()[1:]]
        (d / f"{split}.txt").write_text("\n\n".join(texts) + "\n")


@pytest.mark.parametrize(
    "sub,mode", [("mask", "token"), pytest.param("mask", "drop", marks=needs_transformers_5), ("none", None)]
)
def test_masked_language_model_example_pretrains_a_model_the_classification_example_tunes(
    local_model_and_csvs, sub, mode
):
    d = local_model_and_csvs
    _text_lines(d)
    argv = ["--model", str(d / "model"), "--train", str(d / "train.txt"), "--valid", str(d / "valid.txt")]
    argv += ["--sub", sub, "--max-steps", "3", "--batch-size", "8", "--lr", "1e-3", "--mlm-probability", "0.3"]
    argv += ["--out", str(d / f"mlm-{sub}"), *(["--mode", mode] if mode else [])]
    summary = _load_example("masked_language_model").main(argv)
    assert summary["sub"] == sub and summary["mode"] == mode and 0.0 <= summary["eval_accuracy"] <= 1.0
    assert summary["eval_perplexity"] == pytest.approx(math.exp(summary["eval_loss"]))
    assert summary["train_seconds"] > 0 and summary["history"][-1]["eval_loss"] == summary["eval_loss"]
    assert type(transformers.AutoModelForMaskedLM.from_pretrained(d / f"mlm-{sub}" / "model")).__name__ == (
        "BertForMaskedLM"
    )
    argv = ["--model", str(d / f"mlm-{sub}" / "model"), "--train", str(d / "train.csv"), "--valid"]
    argv += [str(d / "valid.csv"), "--max-steps", "2", "--batch-size", "8", "--out", str(d / f"tuned-{sub}")]
    assert 0.0 <= _load_example().main(argv)["eval_accuracy"] <= 1.0


def test_masked_language_model_example_scores_every_run_on_the_same_targets(local_model_and_csvs):
    """The validation texts are masked once under seed 0 (BERT's 80-10-10 rule, the labels the original ids),
    the same in every call and without moving the global random state; bad files and settings are named."""
    example = _load_example("masked_language_model")
    d = local_model_and_csvs
    _text_lines(d)
    tokenizer = transformers.AutoTokenizer.from_pretrained(d / "model")
    texts = example.read_lines(d / "valid.txt")
    assert len(texts) == 8 and all(texts)
    dataset = example.Texts(tokenizer, texts, max_length=16)
    masking = example.Masking(tokenizer, 0.5)
    torch.manual_seed(3)
    state = torch.get_rng_state()
    fixed = masking.fixed(dataset)
    assert torch.equal(torch.get_rng_state(), state) and fixed == masking.fixed(dataset)
    assert fixed != masking.fixed(dataset, seed=1)
    targets = 0
    for row, original in zip(fixed, dataset.rows):
        assert len(row["input_ids"]) == len(original["input_ids"]) == len(row["labels"])
        for token, label, before, special in zip(
            row["input_ids"], row["labels"], original["input_ids"], original["special_tokens_mask"]
        ):
            assert label in (-100, before) and (label == -100 or not special)
            assert token == before or label != -100, "only targets change"
            targets += label != -100
    assert targets > 0
    padded = masking(fixed[:3])  # rows with targets are padded, not masked again
    assert (
        padded["labels"].shape == padded["input_ids"].shape
        and (padded["labels"][0, : len(fixed[0]["labels"])] == torch.tensor(fixed[0]["labels"])).all()
    )
    (d / "blank.txt").write_text("\n  \n")
    with pytest.raises(SystemExit, match="blank.txt holds no text"):
        example.read_lines(d / "blank.txt")
    with pytest.raises(SystemExit, match="cannot read"):
        example.read_lines(d / "missing.txt")
    with pytest.raises(SystemExit):
        example.parse_args(["--model", "m", "--train", "t", "--valid", "v", "--mlm-probability", "1.5"])


def _write_conll(path, sentences):
    path.write_text("-DOCSTART- O\n\n" + "\n\n".join("\n".join(f"{w} {t}" for w, t in s) for s in sentences) + "\n")


def _run_task(d, task: str, train: str, valid: str, sub: str, mode: str | None, batch_size: int):
    """The example's ``task`` on the files ``train`` and ``valid`` in ``d`` for 3 steps, its summary checked; the
    folder it saved the model to."""
    argv = ["--task", task, "--model", str(d / "model"), "--train", str(d / train), "--valid", str(d / valid)]
    argv += ["--sub", sub, "--max-steps", "3", "--batch-size", str(batch_size), *(["--mode", mode] if mode else [])]
    out = d / f"{task}-{sub}-{mode}"
    summary = _load_example().main([*argv, "--lr", "1e-3", "--out", str(out)])
    assert summary["task"] == task and summary["mode"] == mode
    assert 0.0 <= summary["eval_accuracy"] <= 1.0 and summary["eval_loss"] > 0
    return out / "model"


@pytest.mark.parametrize(
    "sub,mode", [("mask", "token"), pytest.param("mask", "drop", marks=needs_transformers_5), ("none", None)]
)
def test_token_classification_example_runs(local_model_and_csvs, sub, mode):
    d = local_model_and_csvs
    tag = {"good": "B-POS", "great": "B-POS", "bad": "B-NEG", "awful": "B-NEG"}
    g = torch.Generator().manual_seed(0)
    vocab = ["good", "great", "bad", "awful", "the", "films", "was", "plot"]
    for split, n in (("train", 16), ("valid", 6)):
        sentences = [[vocab[j] for j in torch.randint(0, 8, (6,), generator=g).tolist()] for _ in range(n)]
        sentences[0][0] = "good"  # every tag occurs in both splits
        sentences[0][1], sentences[0][2] = "bad", "the"
        _write_conll(d / f"{split}.conll", [[(w, tag.get(w, "O")) for w in s] for s in sentences])
    saved = _run_task(d, "token", "train.conll", "valid.conll", sub, mode, batch_size=8)
    saved = transformers.AutoModelForTokenClassification.from_pretrained(saved)
    assert saved.config.id2label == {0: "B-NEG", 1: "B-POS", 2: "O"}


def test_token_example_tags_the_first_piece_of_each_word(local_model_and_csvs):
    example = _load_example()
    tokenizer = transformers.AutoTokenizer.from_pretrained(local_model_and_csvs / "model")
    encoded = example.Encoded(tokenizer, [["the", "films", "good"]], [[0, 1, 2]], max_length=16, words=True)
    pieces = tokenizer.convert_ids_to_tokens(encoded.enc["input_ids"][0])
    assert pieces == ["[CLS]", "the", "film", "##s", "good", "[SEP]"]
    assert encoded[0]["labels"] == [-100, 0, 1, -100, 2, -100]


def test_token_example_names_a_bad_line(local_model_and_csvs):
    d = local_model_and_csvs
    (d / "bad.conll").write_text("the O\nfilms\n")
    argv = ["--task", "token", "--model", str(d / "model"), "--train", str(d / "bad.conll"), "--valid", "x"]
    with pytest.raises(SystemExit, match=r"bad.conll:2: expected a word and its tag, got 'films'"):
        _load_example().main(argv)


def _write_choices(path, n: int, seed: int = 0) -> None:
    """A CSV of ``n`` questions with three answers each, the right one (an opinion of the film's kind) at random."""
    g = torch.Generator().manual_seed(seed)
    rows = ["text,choice0,choice1,choice2,label"]
    for i in range(n):
        answers, right = (
            ["the plot was poor", "the film was awful", "the plot was bad"],
            int(torch.randint(0, 3, (1,), generator=g)),
        )
        answers[right] = ("the film was good", "the film was great")[i % 2]
        rows.append(f"the film was fine,{','.join(answers)},{right}")
    path.write_text("\n".join(rows) + "\n")


@pytest.mark.parametrize(
    "sub,mode", [("mask", "token"), pytest.param("mask", "drop", marks=needs_transformers_5), ("none", None)]
)
def test_multiple_choice_example_runs(local_model_and_csvs, sub, mode):
    """--task choice: a text and its choices a row, each choice read after the text; the model's multiple-choice
    head scores them, with each choice masked as a sentence of its own."""
    d = local_model_and_csvs
    _write_choices(d / "train_choices.csv", 12)
    _write_choices(d / "valid_choices.csv", 6, seed=1)
    if not hasattr(transformers, "DataCollatorForMultipleChoice"):  # transformers 4.48: the example says so
        with pytest.raises(SystemExit, match="DataCollatorForMultipleChoice, which transformers .* lacks: upgrade"):
            _run_task(d, "choice", "train_choices.csv", "valid_choices.csv", sub, mode, batch_size=4)
        return
    saved = _run_task(d, "choice", "train_choices.csv", "valid_choices.csv", sub, mode, batch_size=4)
    saved = transformers.AutoModelForMultipleChoice.from_pretrained(saved)
    assert saved.classifier.out_features == 1  # a score per choice


def test_multiple_choice_example_pairs_each_choice_with_its_text_and_names_a_bad_label(local_model_and_csvs):
    d = local_model_and_csvs
    example = _load_example()
    tokenizer = transformers.AutoTokenizer.from_pretrained(d / "model")
    encoded = example.Encoded(tokenizer, [("the film", ["was good", "was bad"])], [1], max_length=16)
    rows = [tokenizer.convert_ids_to_tokens(ids) for ids in encoded[0]["input_ids"]]
    assert rows == [
        ["[CLS]", "the", "film", "[SEP]", "was", "good", "[SEP]"],
        ["[CLS]", "the", "film", "[SEP]", "was", "bad", "[SEP]"],
    ]
    assert encoded[0]["labels"] == 1
    (d / "bad.csv").write_text("text,choice0,choice1,label\nthe film,was good,was bad,2\n")
    argv = ["--task", "choice", "--model", str(d / "model"), "--train", str(d / "bad.csv"), "--valid", "x"]
    with pytest.raises(SystemExit, match=r"bad.csv:2: label must be the index of the right choice, 0 to 1, got '2'"):
        example.main(argv)
    (d / "bad.csv").write_text("text,choice0,label\nthe film,was good,0\n")
    with pytest.raises(SystemExit, match="must name the columns text, choice0, choice1"):
        example.main(argv)


def _write_answers(path, n: int, seed: int = 0) -> None:
    """A CSV of ``n`` questions on a context of words, each answered by the one opinion word in its context."""
    g = torch.Generator().manual_seed(seed)
    rows = ["question,context,answer"]
    for i in range(n):
        opinion = ("good", "great", "bad", "awful")[i % 4]
        words = ["the", "film", "was", "plot", "fine"]
        words.insert(int(torch.randint(0, 6, (1,), generator=g)), opinion)
        rows.append(f"the film was,{' '.join(words)},{opinion}")
    path.write_text("\n".join(rows) + "\n")


@pytest.mark.parametrize("sub,mode", [("mask", "token"), ("mask", "attention"), ("none", None)])
def test_question_answering_example_runs(local_model_and_csvs, sub, mode):
    """--task qa: a question and its context a row, the answer a span of the context; the model's start and end
    logits over the positions train on its first and last token, the sub branch's on the same masked words."""
    d = local_model_and_csvs
    _write_answers(d / "train_qa.csv", 12)
    _write_answers(d / "valid_qa.csv", 6, seed=1)
    saved = _run_task(d, "qa", "train_qa.csv", "valid_qa.csv", sub, mode, batch_size=4)
    assert transformers.AutoModelForQuestionAnswering.from_pretrained(saved).qa_outputs.out_features == 2


def test_question_answering_example_finds_each_answers_tokens_and_names_bad_input(local_model_and_csvs):
    d = local_model_and_csvs
    example = _load_example()
    tokenizer = transformers.AutoTokenizer.from_pretrained(d / "model")
    pairs, spans = [("the film", "the plot was good")] * 2, [(13, 17), (4, 12)]  # "good"; "plot was"
    answers = example.Answers(tokenizer, pairs, spans, max_length=16)
    assert tokenizer.convert_ids_to_tokens(answers[0]["input_ids"]) == [
        *("[CLS]", "the", "film", "[SEP]", "the", "plot", "was", "good", "[SEP]")
    ]
    assert [(a["start_positions"], a["end_positions"]) for a in answers] == [(7, 7), (5, 6)]
    cut = example.Answers(tokenizer, pairs, spans, max_length=7)  # the context cut after "plot"
    assert [(a["start_positions"], a["end_positions"]) for a in cut] == [(0, 0), (0, 0)]
    (d / "bad.csv").write_text("question,context,answer\nthe film,the plot was good,great\n")
    argv = ["--task", "qa", "--model", str(d / "model"), "--train", str(d / "bad.csv"), "--valid", "x"]
    with pytest.raises(SystemExit, match=r"bad.csv:2: the answer 'great' is not a span of the context"):
        example.main(argv)
    _write_answers(d / "qa.csv", 4)
    argv = ["--task", "qa", "--model", str(d / "model"), "--train", str(d / "qa.csv"), "--valid", str(d / "qa.csv")]
    if transformers_version() >= (5,):
        with pytest.raises(ValueError, match="BertForQuestionAnswering is not one"):  # drop mode would move the answer
            example.main([*argv, "--mode", "drop", "--out", str(d / "qa-drop")])


def test_text_classification_example_names_bad_csv(local_model_and_csvs):
    d = local_model_and_csvs
    (d / "bad.csv").write_text("sentence,label\nthe film,pos\n")
    argv = ["--model", str(d / "model"), "--train", str(d / "bad.csv"), "--valid", str(d / "valid.csv")]
    with pytest.raises(SystemExit, match="must name the columns text and label"):
        _load_example().main(argv)


def test_text_classification_example_names_a_bad_ratio_and_a_model_folder_without_tokenizer(
    local_model_and_csvs, tmp_path, capsys
):
    d = local_model_and_csvs
    argv = ["--model", str(d / "model"), "--train", str(d / "train.csv"), "--valid", str(d / "valid.csv")]
    with pytest.raises(SystemExit) as stop:
        _load_example().main([*argv, "--ratio", "1"])
    assert stop.value.code == 2 and "--ratio must be in [0, 1)" in capsys.readouterr().err
    argv[1] = str(tmp_path)  # no config, no tokenizer
    with pytest.raises(SystemExit, match=f"error: cannot load the tokenizer of --model {tmp_path}: "):
        _load_example().main(argv)


def test_dropsub_in_the_trainer_raises_the_rates_in_the_sub_pass_only(tmp_path):
    """sub='dropout': the sub pass runs every dropout at `ratio`, the main pass and evaluation at the model's."""
    model = tiny_text_model(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    drops = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    seen = []  # the rates in force at each forward of the first dropout layer
    drops[0].register_forward_pre_hook(lambda m, a: seen.append(m.p))
    trainer = MaskSubTrainer(
        model=model,
        args=_args(tmp_path, learning_rate=1e-3, max_steps=2, logging_steps=1),
        train_dataset=Rows(text_batch(batch=8)),
        sub="dropout",
        ratio=0.4,
    )
    trainer.train()
    assert seen == [0.1, 0.4] * 2  # main, sub; per step
    seen.clear()
    trainer.ratio = 0.25  # a schedule's new rate: the sub pass runs it
    trainer.train()
    assert seen == [0.1, 0.25] * 2 and trainer.ratio == 0.25
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        trainer.ratio = 1.5
    assert all(m.p == 0.1 for m in drops)  # restored
    assert all(entry["loss_sub"] > 0 for entry in trainer.state.log_history if "loss" in entry)


def test_a_model_init_gets_the_sub_branch_at_each_train(tmp_path):
    """Trainer(model_init=...) builds a new model at each train(); the branch stayed on the first one, so the
    new model's sub pass ran its dropout at the model's rate: the sub branch changed nothing."""
    built, seen = [], []

    def model_init():
        model = tiny_text_model(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
        next(m for m in model.modules() if isinstance(m, torch.nn.Dropout)).register_forward_pre_hook(
            lambda m, a: seen.append((len(built), m.p))
        )
        built.append(model)
        return model

    args = _args(tmp_path, learning_rate=1e-3, max_steps=1)
    trainer = MaskSubTrainer(model_init=model_init, args=args, train_dataset=Rows(text_batch()), sub="dropout")
    trainer.ratio = 0.3
    for _ in range(2):
        trainer.train()
    assert len(built) == 3  # one at construction, one per train()
    assert seen == [(2, 0.1), (2, 0.3), (3, 0.1), (3, 0.3)]  # main, sub: on the model being trained
    assert trainer.ratio == 0.3 and trainer._wrapped.model is built[-1]
    assert all(m.p == 0.1 for model in built for m in model.modules() if isinstance(m, torch.nn.Dropout))


def test_a_loss_left_without_its_backward_leaves_no_sub_rates_in_the_next_main_pass(tmp_path):
    """A loss the Trainer never back-propagated (its backward ran out of memory, and auto_find_batch_size starts
    over): the sub pass's drop rates stayed in force, into the next micro-batch's main pass."""
    model = tiny_text_model(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1).train()
    seen = []
    next(m for m in model.modules() if isinstance(m, torch.nn.Dropout)).register_forward_pre_hook(
        lambda m, a: seen.append(m.p)
    )
    trainer = MaskSubTrainer(
        model=model, args=_args(tmp_path), train_dataset=Rows(text_batch()), sub="dropout", ratio=0.4
    )
    batch = text_batch(batch=4)
    trainer.compute_loss(model, batch)  # main backward inside; the sub term's is left to the Trainer: not run
    trainer.compute_loss(model, batch)
    assert seen == [0.1, 0.4, 0.1, 0.4]


def test_float_labels_train_multi_label_as_the_model_own_loss_would(tmp_path):
    """problem_type unset and multi-hot float labels: binary cross-entropy and a sigmoid teacher, as the
    Hugging Face model decides for its own loss; evaluation then computes that same loss."""
    model = tiny_text_model(**NO_DROPOUT)
    assert model.config.problem_type is None
    seen = []
    model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].clone()), with_kwargs=True)
    capture = GradsBeforeStep(model)
    data = {**text_batch(batch=4), "labels": torch.tensor([[1.0, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]])}
    trainer = _trainer(tmp_path, model, data)
    trainer.add_callback(capture)
    trainer.train()
    assert model.config.problem_type == "multi_label_classification"
    model.zero_grad()
    ids, sub_ids = seen
    order = [next(j for j in range(4) if torch.equal(data["input_ids"][j], row)) for row in ids]
    labels, attention = data["labels"][order], data["attention_mask"][order]
    main = model(input_ids=ids, attention_mask=attention).logits
    sub = model(input_ids=sub_ids, attention_mask=attention).logits
    distill = F.binary_cross_entropy_with_logits(sub, torch.sigmoid(main.detach()))
    (0.5 * F.binary_cross_entropy_with_logits(main, labels) + 0.5 * distill).backward()
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(capture.grads[0][n], p.grad, rtol=1e-4, atol=1e-7, msg=n)
    metrics = trainer.evaluate(Rows(data))
    with torch.no_grad():
        expected = model.eval()(**data).loss
    assert metrics["eval_loss"] == pytest.approx(float(expected), rel=1e-5)


# transformers 5 renamed TrainingArguments.gradient_checkpointing
CHECKPOINTING_ARG = next(
    a
    for a in ("activation_checkpointing", "gradient_checkpointing")
    if a in transformers.TrainingArguments.__dataclass_fields__
)


def _gradient_with(tmp_path, sub, checkpointing, memory_saving=None):
    model = tiny_text_model(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    capture = GradsBeforeStep(model)
    trainer = MaskSubTrainer(
        model=model,
        args=_args(tmp_path, **{CHECKPOINTING_ARG: checkpointing}),
        train_dataset=Rows(text_batch(batch=4)),
        sub=sub,
        ratio=0.4,
        memory_saving=memory_saving,
        mask_options={"mask_token_id": MASK, "special_ids": SPECIAL} if sub == "mask" else None,
    )
    trainer.add_callback(capture)
    trainer.train()
    return capture.grads[0]


@pytest.mark.parametrize("sub", ["dropout", "mask"])
def test_gradient_checkpointing_gives_the_gradient_it_does_without(tmp_path, sub):
    """TrainingArguments(gradient_checkpointing=True) recomputes each layer in the Trainer's backward of the
    returned loss: the sub pass's dropout rates are still in effect then."""
    expected = _gradient_with(tmp_path, sub, checkpointing=False)
    found = _gradient_with(tmp_path, sub, checkpointing=True)
    assert found.keys() == expected.keys()
    for n, g in expected.items():
        torch.testing.assert_close(found[n], g, rtol=1e-5, atol=1e-7, msg=n)


def test_summed_loss_refuses_dropsub_under_gradient_checkpointing(tmp_path):
    with pytest.raises(ValueError, match="activation checkpointing is on .* and sub='dropout'"):
        _gradient_with(tmp_path, "dropout", checkpointing=True, memory_saving=False)


@needs_transformers_5
@pytest.mark.parametrize("family", ["bert", "llama", "bert-choice"])
def test_trainer_drops_the_masked_tokens_with_mode_drop(tmp_path, family):
    """mask_options={'mode': 'drop'}: each step's sub pass runs the model on the kept tokens only (a decoder gets
    the kept ids with their position ids; a multiple-choice head each choice's)."""
    if family == "llama":
        from test_text import _decoder, _decoder_batch

        model, data = _decoder("llama").train(), {**_decoder_batch(left=False, batch=4), "labels": torch.arange(4) % 3}
    elif family == "bert-choice":  # (batch, choices, length), as DataCollatorForMultipleChoice gives
        from test_text import _multiple_choice

        model, flat = _multiple_choice("bert").train(), text_batch(batch=4)
        data = {**{k: v.view(2, 2, 20) for k, v in flat.items() if k != "labels"}, "labels": torch.tensor([0, 1])}
    else:
        model, data = tiny_text_model(**NO_DROPOUT), text_batch(batch=4)
    lengths = []
    trainer = _trainer(
        tmp_path, model, data, mask_options={"mask_token_id": MASK, "special_ids": SPECIAL, "mode": "drop"}
    )
    assert trainer.sub_branch.mode == "drop"
    # what the encoder gets: BERT drops after its embeddings, a decoder gets the kept ids
    embeddings = model.get_input_embeddings() if family == "llama" else model.bert.embeddings
    embeddings.register_forward_hook(lambda m, a, out: lengths.append(out.shape[1]))
    trainer.train()
    assert lengths[0] == 20 and 8 <= lengths[1] < 20, "the main pass keeps all 20 tokens, the sub pass about half"


def test_seq2seq_trainer_trains_with_the_sub_branch_and_evaluates_by_generating(tmp_path):
    from masksub.hf import MaskSubSeq2SeqTrainer

    model = tiny_language_model("t5", dropout_rate=0.0)
    data = text_batch(batch=8, length=12)
    data["labels"] = text_batch(batch=8, length=6, seed=5)["input_ids"]
    args = transformers.Seq2SeqTrainingArguments(
        str(tmp_path),
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        max_steps=2,
        logging_steps=1,
        per_device_train_batch_size=4,
        predict_with_generate=True,
        generation_max_length=6,
        disable_tqdm=True,
    )
    options = {"mask_token_id": MASK, "special_ids": SPECIAL}
    trainer = MaskSubSeq2SeqTrainer(
        model=model, args=args, train_dataset=Rows(data), eval_dataset=Rows(data), mask_options=options
    )
    trainer.train()
    assert all({"loss_main", "loss_sub"} <= h.keys() for h in trainer.state.log_history if "loss" in h)
    predicted = trainer.predict(Rows(data))
    assert predicted.predictions.ndim == 2 and len(predicted.predictions) == 8  # generated token ids, not logits
    model.eval()
    with torch.no_grad():
        own = model(**{k: v for k, v in data.items()}).loss
    torch.testing.assert_close(torch.tensor(predicted.metrics["test_loss"]), own, rtol=1e-4, atol=1e-5)
