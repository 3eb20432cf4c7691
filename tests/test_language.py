"""Language models: Step scores a causal language model's and an encoder-decoder's labels as their own loss does."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    CLS,
    LANGUAGE_MODELS,
    MASK,
    PAD,
    SEP,
    SMALL,
    SPECIAL,
    assert_causal_step_gradients,
    lm_labels,
    needs_transformers_5,
    step_seeing_ids,
    text_batch,
    tiny_language_model,
    wrap_text,
)
from vlms import IMAGE, PATCHES, PLACEHOLDERS, VIDEO, VIDEO_PLACEHOLDERS, VLMS, llava, vlm_batch

import masksub
from masksub.language import CAUSAL, ROUTER_LOSSES, SEQ2SEQ, language_model
from masksub.masking import masked_counts

pytest.importorskip("transformers")

CAUSAL_KINDS = [k for k, (auto, _) in LANGUAGE_MODELS.items() if auto == "AutoModelForCausalLM"]


def _batch(kind: str) -> dict[str, torch.Tensor]:
    """A causal model's batch: its labels the input ids, none on the prompt and padding. An encoder-decoder's: a
    source, and a target of another length whose padding has no label."""
    batch = text_batch(batch=4, length=16)
    if LANGUAGE_MODELS[kind][0] == "AutoModelForCausalLM":
        return lm_labels(batch)
    target = text_batch(batch=4, length=10, seed=5)
    return {**batch, "labels": target["input_ids"].masked_fill(target["attention_mask"] == 0, -100)}


def _step(model) -> masksub.Step:
    return masksub.Step(model, torch.optim.SGD(model.parameters(), lr=0.0), torch.nn.CrossEntropyLoss())


# transformers 4's JetMoE shifts its labels twice (its loss function shifts the shifted ones again)
KINDS = [pytest.param(k, marks=needs_transformers_5) if k == "jetmoe" else k for k in LANGUAGE_MODELS]


@pytest.mark.parametrize("wrapped", [False, True], ids=["plain", "wrapped"])
@pytest.mark.parametrize("kind", KINDS)
def test_step_scores_a_language_model_as_its_own_loss_does(kind, wrapped):
    """The main loss is the model's own loss given the labels (under the same dropout draws): a causal model's
    labels shifted one left, XLM's language-model head's each at its own position, an encoder-decoder's decoder run
    on its labels shifted right."""
    model = tiny_language_model(kind).train()
    batch = _batch(kind)
    torch.manual_seed(0)
    own = model(**batch)
    step = _step(wrap_text(model, sub="mask", ratio=0.5, mode="attention") if wrapped else model)
    torch.manual_seed(0)
    out = step(batch)
    torch.testing.assert_close(out["loss_main"], own.loss.detach(), rtol=1e-6, atol=1e-6)
    # the test can tell: scored the other way, the loss is another
    labels, logits = batch["labels"], own.logits.detach().flatten(0, 1)
    expected = SEQ2SEQ if LANGUAGE_MODELS[kind][0] == "AutoModelForSeq2SeqLM" else None if kind == "xlm" else CAUSAL
    other = labels if expected == CAUSAL else F.pad(labels[:, 1:], (0, 1), value=-100)
    assert not torch.isclose(F.cross_entropy(logits, other.flatten()), own.loss)
    assert language_model(step.model)[0] == expected


@pytest.mark.parametrize("mode", ["token", "attention", "drop"])
def test_step_on_a_causal_lm_equals_the_next_token_loss_by_hand(mode):
    """Both losses by hand: the main branch's cross-entropy of each labelled next token, the sub branch's
    distillation of the main branch's next-token distribution at the same positions, where the sub pass predicted
    (with mode='drop' the dropped tokens' positions have no prediction, and count for neither)."""
    model = tiny_language_model("llama").train()
    wrapped = wrap_text(model, sub="mask", ratio=0.5, mode=mode)
    batch = _batch("llama")
    torch.manual_seed(3)
    _step(wrapped)(batch)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    features = {k: v for k, v in batch.items() if k != "labels"}
    target = torch.cat([batch["labels"][:, 1:], torch.full((4, 1), -100)], 1)
    torch.manual_seed(3)
    main = model(**features).logits
    sub = wrapped(**features, sub=True).logits
    counted = target != -100
    if mode == "drop":
        assert (counted & ~wrapped.sub_kept).any(), "some labelled positions were dropped"
        counted &= wrapped.sub_kept
    per_token = -(F.softmax(main.detach(), -1) * F.log_softmax(sub, -1)).sum(-1)
    loss = 0.5 * F.cross_entropy(main.flatten(0, 1), target.flatten()) + 0.5 * per_token[counted].mean()
    loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-5, atol=1e-7, msg=n)


def _uneven_parts() -> tuple[dict, list[dict], list[int]]:
    """A causal model's batch of 4, its micro-batches of 1 and 3 rows, and their labelled next tokens (uneven: the
    first row's response is cut short)."""
    batch = _batch("llama")
    batch["labels"][0, 7:] = -100
    parts = [{k: v[rows] for k, v in batch.items()} for rows in (slice(0, 1), slice(1, 4))]
    return batch, parts, [int((p["labels"][:, 1:] != -100).sum()) for p in parts]


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("last", [False, True], ids=["full-window", "window-ended-by-last"])
def test_num_items_in_batch_gives_the_gradient_of_the_whole_batch(last):
    """A plain causal LM (the criterion alone), 2 micro-batches of 1 and 3 rows given the step's labelled tokens:
    the gradient of the model's own loss on the 4 rows at once, also in a window that last=True ends early."""
    model = tiny_language_model("llama").train()
    batch, parts, counts = _uneven_parts()
    step = masksub.Step(
        model, torch.optim.SGD(model.parameters(), lr=0.0), torch.nn.CrossEntropyLoss(), accum_steps=3 if last else 2
    )
    outs = [step(part, num_items_in_batch=sum(counts), last=last and i == 1) for i, part in enumerate(parts)]
    assert [o["updated"] for o in outs] == [False, True]
    grads = _grads(model)
    model.zero_grad()
    model(**batch).loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.parametrize("memory_saving", [True, False])
def test_num_items_in_batch_weighs_each_micro_batch_by_its_labelled_tokens(memory_saving):
    """MaskSub in attention mode: the window's gradient is the micro-batches' own gradients (each alone, the same
    masks) weighed by their share of the labelled tokens, not by half each."""
    model = tiny_language_model("llama").train()
    wrapped = wrap_text(model, sub="mask", ratio=0.5, mode="attention")
    _, parts, counts = _uneven_parts()

    def step(accum: int) -> masksub.Step:
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        return masksub.Step(wrapped, opt, torch.nn.CrossEntropyLoss(), accum_steps=accum, memory_saving=memory_saving)

    alone = []
    for i, part in enumerate(parts):
        torch.manual_seed(10 + i)
        step(1)(part)
        alone.append(_grads(model))
    window = step(2)
    for i, part in enumerate(parts):
        torch.manual_seed(10 + i)
        window(part, num_items_in_batch=torch.tensor(sum(counts)))
    grads = _grads(model)
    assert counts[0] * 2 < counts[1]
    for n, g in grads.items():
        want = sum(c / sum(counts) * a[n] for c, a in zip(counts, alone))
        torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-7, msg=n)
    halves = {n: (alone[0][n] + alone[1][n]) / 2 for n in grads}
    assert any(not torch.allclose(grads[n], halves[n], rtol=1e-3, atol=1e-6) for n in grads)  # the test can tell


@pytest.mark.parametrize("memory_saving", [True, False])
def test_router_losses_weigh_each_micro_batch_alike_beside_the_tokens_weighed_cross_entropy(memory_saving):
    """A mixture of experts' load-balancing loss is a mean per micro-batch, as its own loss computes it: 2
    micro-batches of 1 and 3 rows given the step's labelled tokens get the gradient of their cross-entropy summed over
    the step's tokens, plus the mean of their router losses (not each weighed by its tokens, nor summed)."""
    model = tiny_language_model("mixtral").train()
    wrapped = wrap_text(model, sub="mask", ratio=0.5, mode="attention")
    _, parts, counts = _uneven_parts()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    step = masksub.Step(
        wrapped, opt, torch.nn.CrossEntropyLoss(), accum_steps=2, memory_saving=memory_saving, sub_weight=0.0
    )
    for part in parts:
        step(part, num_items_in_batch=sum(counts))
    grads = _grads(model)
    model.zero_grad()
    ce, router = [], []
    for part in parts:
        own = model(**part)
        target = part["labels"][:, 1:].flatten()
        ce.append(F.cross_entropy(own.logits[:, :-1].flatten(0, 1), target, reduction="sum"))
        router.append(own.loss - ce[-1] / (target != -100).sum())  # what its own loss adds
    assert all(r.item() > 0.1 for r in router)
    (0.5 * sum(ce) / sum(counts) + 0.5 * sum(router) / 2).backward()
    gates = [n for n in grads if ".gate." in n]
    assert gates and all(grads[n].abs().sum() > 0 for n in gates)  # the routers learn from the balance
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-5, atol=1e-7, msg=n)


def test_router_losses_of_an_encoder_decoder_are_weighed_as_its_own_loss_weighs_them():
    """Switch Transformers: both stacks' load-balancing and z-losses, each by its own weight."""
    import transformers

    sizes = LANGUAGE_MODELS["t5"][1] | dict(num_experts=4, encoder_sparse_step=2, decoder_sparse_step=2)
    weights = dict(router_aux_loss_coef=0.5, router_z_loss_coef=0.3, router_jitter_noise=0.0, dropout_rate=0.0)
    config = transformers.SwitchTransformersConfig(**sizes, **weights, pad_token_id=PAD, decoder_start_token_id=PAD)
    model = transformers.SwitchTransformersForConditionalGeneration(config).train()
    batch = {**_batch("t5"), "output_router_logits": True}
    own = model(**batch)
    out = _step(model)(batch)
    assert own.encoder_z_loss > 0.1 and own.decoder_aux_loss > 0.1
    torch.testing.assert_close(out["loss_main"], own.loss.detach(), rtol=1e-6, atol=1e-6)


def test_router_losses_without_a_weight_are_refused_by_name(monkeypatch):
    """A router loss whose weight is found neither on the model nor on its configuration (a model of names unknown
    to masksub) is an error, not left out or weighed 1."""
    monkeypatch.setitem(ROUTER_LOSSES, "aux_loss", ("balance_weight",))
    with pytest.raises(ValueError, match=r"router loss \(aux_loss\).*no weight for it \(balance_weight\)"):
        _step(tiny_language_model("mixtral").train())(_batch("mixtral"))


def test_num_items_in_batch_is_refused_where_it_cannot_weigh():
    model = tiny_language_model("llama").train()
    _, parts, counts = _uneven_parts()
    step = masksub.Step(model, torch.optim.SGD(model.parameters(), lr=0.0), torch.nn.CrossEntropyLoss(), accum_steps=2)
    step(parts[0], num_items_in_batch=sum(counts))
    with pytest.raises(ValueError, match="given to some micro-batches of this optimizer step and not to others"):
        step(parts[1])
    for bad in (0, True, 2.5):
        with pytest.raises(ValueError, match="num_items_in_batch must be"):
            step(parts[0], num_items_in_batch=bad)
    images = torch.randn(2, 8)
    classifier = masksub.Step(
        torch.nn.Linear(8, 3), torch.optim.SGD([torch.zeros(1)], lr=0.0), torch.nn.CrossEntropyLoss()
    )
    with pytest.raises(ValueError, match="no class-index target"):
        classifier(images, torch.softmax(torch.randn(2, 3), -1), num_items_in_batch=2)


@pytest.mark.parametrize("mode", ["token", "attention"])
@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_an_encoder_decoder_masks_its_source_only_and_distills_each_target_token(kind, mode):
    """The sub branch masks num_masked of each source's words and runs the decoder on the same inputs as the main
    branch (the labels shifted right); its loss is the main branch's distribution distilled at each labelled
    target token."""
    no_dropout = dict(dropout_rate=0.0) if kind == "t5" else dict(dropout=0.0, attention_dropout=0.0)
    model = tiny_language_model(kind, **no_dropout, activation_dropout=0.0).train()
    seen = []
    model.register_forward_pre_hook(lambda m, a, kw: seen.append(dict(kw)), with_kwargs=True)
    batch = _batch(kind)
    torch.manual_seed(0)
    out = _step(wrap_text(model, sub="mask", ratio=0.5, mode=mode))(batch)
    main, sub = seen
    decoder = model.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
    assert torch.equal(main["decoder_input_ids"], decoder) and torch.equal(sub["decoder_input_ids"], decoder)
    assert "labels" not in main and "labels" not in sub
    if mode == "token":
        masked = sub["input_ids"] != batch["input_ids"]
        assert (sub["input_ids"][masked] == MASK).all()
    else:
        masked = sub["attention_mask"] != batch["attention_mask"]
        assert torch.equal(sub["input_ids"], batch["input_ids"])
    words = (batch["attention_mask"].bool() & ~torch.isin(batch["input_ids"], torch.tensor(SPECIAL))).sum(1)
    assert masked.sum(1).tolist() == masked_counts(words, 0.5).tolist()
    with torch.no_grad():
        teacher = model(**main).logits
        student = model(**sub).logits
    counted = batch["labels"] != -100
    per_token = -(F.softmax(teacher, -1) * F.log_softmax(student, -1)).sum(-1)
    torch.testing.assert_close(out["loss_sub"], per_token[counted].mean(), rtol=1e-5, atol=1e-6)


def test_a_batchs_shift_labels_are_the_target_as_they_are():
    """transformers' context parallelism gives a causal model's labels already shifted, as ``shift_labels``: they
    are the target as they are, and never reach the model."""
    model = tiny_language_model("llama").train()
    seen = []
    model.register_forward_pre_hook(lambda m, a, kw: seen.append(set(kw)), with_kwargs=True)
    batch = _batch("llama")
    shifted = {k: v for k, v in batch.items() if k != "labels"}
    shifted["shift_labels"] = F.pad(batch["labels"][:, 1:], (0, 1), value=-100)
    step = _step(wrap_text(model, sub="mask", ratio=0.5, mode="attention"))
    torch.manual_seed(0)
    by_labels = step(batch)
    torch.manual_seed(0)
    by_shift = step(shifted)
    assert not any("shift_labels" in keys or "labels" in keys for keys in seen)
    torch.testing.assert_close(by_shift["loss_main"], by_labels["loss_main"], rtol=0, atol=0)
    torch.testing.assert_close(by_shift["loss_sub"], by_labels["loss_sub"], rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["bart", "marian", "encoder-decoder"])
def test_decoders_of_encoder_decoders_are_scored_as_their_own_loss_scores_them(kind):
    """BART's and Marian's causal language models (the decoders of encoder-decoders) score each position against its
    own label, unshifted, as their own loss does; transformers' generic EncoderDecoderModel also hides its decoder's
    padding when it makes the decoder's inputs from the labels. ``Step``'s main loss is the model's own."""
    import transformers

    sizes = LANGUAGE_MODELS["bart"][1]
    ids = dict(pad_token_id=PAD, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    if kind == "encoder-decoder":
        small = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
        encoder, decoder = transformers.BertConfig(**small), transformers.BertConfig(**small, is_decoder=True)
        decoder.add_cross_attention = True
        config = transformers.EncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
        config.update(ids)
        torch.manual_seed(0)
        model, expected = transformers.EncoderDecoderModel(config), SEQ2SEQ
    else:
        config = transformers.AutoConfig.for_model(kind, **sizes, **ids)
        torch.manual_seed(0)
        model, expected = transformers.AutoModelForCausalLM.from_config(config), None
    model.eval()
    batch = lm_labels(text_batch(batch=4, length=16))
    if kind == "encoder-decoder":  # a target of its own whose first tokens carry no loss: its decoder reads padding
        batch["labels"] = text_batch(batch=4, length=10, seed=5)["input_ids"]
        batch["labels"][:, :3] = -100
    with torch.no_grad():
        own = model(**batch).loss
    assert language_model(model)[0] == expected
    out = _step(model)(batch)  # plain, in eval mode: no dropout draw to match
    torch.testing.assert_close(out["loss_main"], own, rtol=1e-6, atol=1e-6)


def test_a_text_generator_whose_labels_are_laid_out_otherwise_is_refused():
    """A model that generates text and is neither a causal language model nor an encoder-decoder (GPT-2's double
    heads here; vision-language models), or a causal one whose logits begin with image tokens (GIT), lays out its
    labels its own way: refused by name, not scored wrongly."""
    import transformers

    from masksub.hf import MaskSubTrainer

    config = transformers.GPT2Config(**LANGUAGE_MODELS["gpt2"][1], pad_token_id=PAD)
    model = transformers.GPT2DoubleHeadsModel(config)
    with pytest.raises(ValueError, match="GPT2DoubleHeadsModel generates text, and is neither a causal"):
        _step(model)
    args = transformers.TrainingArguments(output_dir="unused", use_cpu=True, report_to=[])
    with pytest.raises(ValueError, match="GPT2DoubleHeadsModel generates text"):
        MaskSubTrainer(model=model, args=args, mask_options={"mask_token_id": MASK, "special_ids": SPECIAL})
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=16)
    config = transformers.GitConfig(vision_config=dict(vision, patch_size=8), **LANGUAGE_MODELS["llama"][1])
    git = transformers.GitForCausalLM(config)  # a causal language model whose logits begin with its image tokens
    with pytest.raises(ValueError, match="GitForCausalLM's logits hold more positions than its labels"):
        _step(git)


def test_a_masked_language_model_scores_each_position_against_its_own_label_though_it_says_it_can_generate(
    monkeypatch,
):
    """transformers 4 says masked language models can generate (they have ``prepare_inputs_for_generation``): they
    are still not refused as generators of another layout, and their labels are not shifted."""
    import transformers

    model = transformers.BertForMaskedLM(transformers.BertConfig(**SMALL, max_position_embeddings=64))
    monkeypatch.setattr(type(model), "can_generate", classmethod(lambda cls: True))
    assert model.can_generate() and language_model(model) == (None, model)


@pytest.mark.parametrize("kind", ["bert", "t5"])
def test_drop_mode_refuses_language_models_it_cannot_shorten(kind):
    """mode='drop' takes the causal language models of the decoders (tested in test_text.py); BERT as a decoder
    and the encoder-decoders are refused, naming what to use."""
    model = tiny_language_model(kind)
    with pytest.raises(ValueError, match=f"{type(model).__name__} is not one: use mode='attention'"):
        wrap_text(model, sub="mask", ratio=0.5, mode="drop")


@needs_transformers_5
def test_readme_language_model_example_runs(monkeypatch):
    """docs/transformers.md's language-model example as written, with its two downloads replaced by a tiny Llama and a
    tokenizer without padding or mask token (as decoders' are)."""
    import re
    import textwrap
    from pathlib import Path

    import transformers
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    words = ["question", ":", "what", "is", "two", "and", "?", "answer", "four"]
    vocab = {w: i for i, w in enumerate(["<unk>", "</s>", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer, backend.normalizer = pre_tokenizers.Whitespace(), normalizers.Lowercase()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")
    model = tiny_language_model("llama", vocab_size=len(vocab))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda name: tokenizer)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda name, **kw: model)
    text = (Path(__file__).resolve().parents[1] / "docs" / "transformers.md").read_text()
    section = text.split("- **Language models**", 1)[1]
    code = textwrap.dedent(re.search(r"```python\n(.*?)```", section, re.S).group(1))
    scope: dict = {"torch": torch, "masksub": masksub, "AutoTokenizer": transformers.AutoTokenizer}
    exec(compile(code, "docs/transformers.md", "exec"), scope)
    assert scope["metrics"]["updated"] and torch.isfinite(scope["metrics"]["loss"])
    batch = scope["batch"]
    assert batch["input_ids"][0, -1] == 1 and (batch["labels"][0, :10] == -100).all()  # the prompt's 10 tokens
    assert batch["labels"][0, 10:].tolist() == [vocab["four"], 1] and not (batch["input_ids"] == 0).any()
    assert scope["step"].model.branch.mode == "drop" and scope["step"]._language[0] == CAUSAL


VLM_MODES = [(kind, mode, False) for kind in VLMS for mode in ("token", "attention", "drop")]
VLM_MODES += [(kind, "drop", True) for kind in VIDEO_PLACEHOLDERS]  # a video a sample in place of the image


@pytest.mark.parametrize("kind, mode, videos", VLM_MODES)
def test_a_vision_language_model_is_scored_as_its_own_loss_scores_it(kind, mode, videos):
    """The logits of LLaVA and its kin (LLaVA-NeXT, LLaVA-OneVision, Mistral 3, InternVL, Idefics3, SmolVLM), of
    Qwen2-VL, Qwen2.5-VL and GLM-4V hold a prediction per input token, the image's placeholders included, and their
    own loss shifts the labels: Step's main loss equals it, with the images, and the gradient is the next-token loss
    and its distillation worked out by hand. The sub pass masks words, never an image's token (a placeholder masked
    would leave an image without its tokens: the model fails then), or drops them (``mode="drop"``: the
    distillation leaves the dropped positions out). The same with videos."""
    model = VLMS[kind]().train()
    batch = vlm_batch(kind, videos=videos)
    placeholder, count = (VIDEO, VIDEO_PLACEHOLDERS[kind]) if videos else (IMAGE, PLACEHOLDERS.get(kind, PATCHES))
    assert language_model(model)[0] == CAUSAL
    wrapped, out, seen = step_seeing_ids(model, batch, mode)
    own = model.eval()(**batch).loss  # eval: no dropout draws to match
    torch.testing.assert_close(out["loss_main"], own.detach(), rtol=1e-6, atol=1e-6)
    main_ids, sub_ids = seen
    image = torch.tensor([placeholder, IMAGE - 2, IMAGE - 3])  # placeholders, vision start and end
    kept = torch.isin(main_ids, torch.tensor([PAD, CLS, SEP, *image]))
    assert (main_ids == placeholder).sum() == (sub_ids == placeholder).sum() == 4 * count
    if mode == "drop":  # the kept words and every placeholder, shorter
        assert sub_ids.shape[1] < main_ids.shape[1]
    else:
        assert torch.equal(main_ids[kept], sub_ids[kept])
    if mode == "token":
        words = (batch["attention_mask"] == 1) & ~torch.isin(batch["input_ids"], torch.tensor([*SPECIAL, *image]))
        hidden = sub_ids == MASK
        assert hidden.sum(1).tolist() == masked_counts(words.sum(1), 0.9).tolist() and not (hidden & ~words).any()

    grads = assert_causal_step_gradients(model, wrapped, batch, mode)
    assert grads.keys() & _tower_names(model, videos)  # the images' tower trains from both passes


VLM_DROP_CASES = [(kind, "images") for kind in VLMS] + [("qwen2_5_vl", "text"), ("qwen2_5_vl", "positions")]
VLM_DROP_CASES += [("paligemma", "text")]  # no token types: causal where words are hidden
VLM_DROP_CASES += [(kind, "videos") for kind in VIDEO_PLACEHOLDERS]


@needs_transformers_5
@pytest.mark.parametrize("kind, given", VLM_DROP_CASES)
def test_drop_mode_on_a_vision_language_model_runs_its_images_and_kept_words_as_hiding_the_others_does(kind, given):
    """The sub pass runs on the kept words and every image token (placeholders, Qwen2-VL's vision start and end:
    special, never masked), the images' features placed at their placeholders as in the main pass, each token at the
    position hiding the masked words gives it (by index for LLaVA and its kin; the 3-D positions of Qwen2-VL,
    Qwen2.5-VL and GLM-4V, which their forward makes from the attention mask's tokens given the images' grids, by
    index without images, and as given where the batch gives them): each kept token's next-token logits are those
    of the whole sequence with the masked words hidden, and the images reach them. The same with a video a sample
    in place of the image (LLaVA-NeXT-Video, LLaVA-OneVision, Qwen2-VL)."""
    model = VLMS[kind]().eval()
    wrapped = wrap_text(model, sub="mask", ratio=0.5, mode="drop")
    batch = {k: v for k, v in vlm_batch(kind, videos=given == "videos").items() if k != "labels"}
    images, placeholder = given != "text", VIDEO if given == "videos" else IMAGE
    pixels = "pixel_values_videos" if given == "videos" else "pixel_values"
    if not images:  # and no padding: every sequence keeps as many words (a model may skip an all-ones mask)
        ids = batch["input_ids"].masked_fill(batch["input_ids"] == PAD, 4)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if given == "positions":  # (3, B, L): time, height and width, as the model makes them from the whole sequence
        grids = {k: batch[k] for k in ("image_grid_thw", "mm_token_type_ids", "attention_mask")}
        batch["position_ids"] = model.model.get_rope_index(batch["input_ids"], **grids)[0]
    ids, real = batch["input_ids"], batch["attention_mask"].bool()
    lengths = []
    handle = model.get_input_embeddings().register_forward_hook(lambda m, args, out: lengths.append(out.shape[1]))
    with torch.no_grad():
        torch.manual_seed(5)
        got = wrapped(**batch, sub=True).logits
        kept = wrapped.sub_kept
        torch.manual_seed(5)
        mask = wrapped.branch.token_mask(ids, batch["attention_mask"])
        expected = model(**{**batch, "attention_mask": batch["attention_mask"].masked_fill(mask, 0)}).logits
        if images:
            torch.manual_seed(5)
            other_images = wrapped(**{**batch, pixels: batch[pixels].flip(0)}, sub=True).logits
            assert (other_images[kept] - got[kept]).abs().max() > 1e-3, "the images reach the sub pass"
    handle.remove()
    words = real & ~torch.isin(ids, torch.tensor([*SPECIAL, placeholder, IMAGE - 2, IMAGE - 3]))
    assert mask.sum(1).tolist() == masked_counts(words.sum(1), 0.5).tolist() and not (mask & ~words).any()
    assert torch.equal(kept, real & ~mask) and kept[ids == placeholder].all()
    assert lengths[0] == int(kept.sum(1).max()) < ids.shape[1] and lengths[1] == ids.shape[1]
    torch.testing.assert_close(got[kept], expected[kept], rtol=1e-5, atol=1e-6)
    assert not got[~kept].any()
    assert (expected[kept] - model(**batch).logits[kept]).abs().max() > 1e-3, "hiding moved the logits"


def _tower(model, videos: bool = False) -> torch.nn.Module:
    """``model``'s vision tower: its images', or with ``videos`` its videos' (Video-LLaVA's own, else the same)."""
    from masksub.adapters import frozen_encoder

    return (videos and frozen_encoder.video_encoder(model)) or frozen_encoder.image_encoder(model)


def _tower_names(model, videos: bool = False) -> set[str]:
    """The names of the parameters of ``model``'s vision tower (its videos' with ``videos``)."""
    tower = {id(p) for p in _tower(model, videos).parameters()}
    return {n for n, p in model.named_parameters() if id(p) in tower}


def _frozen_tower_step(kind: str, mode: str, cache: bool, monkeypatch, compiled=False, images_grad=False):
    """One MaskSub step of ``kind`` in training mode with its vision tower frozen: the gradients (the images'
    too, as ``"pixel_values"``, where ``images_grad``), and how many times the tower ran. ``cache=False``: the
    frozen encoder's cache turned off, both passes running the tower. ``compiled``: the wrapper compiled (dynamo's
    front end), the step taken twice, the tower counted in the second. ``kind`` ending in " videos": a video a
    sample in place of the image."""
    from masksub.adapters import frozen_encoder

    kind, _, videos = kind.partition(" ")
    model = VLMS[kind]().train()
    tower = _tower(model, bool(videos))
    tower.requires_grad_(False)
    calls = []  # the tower's computation (its hooks run at each call, its forward given back or not)
    next(tower.children()).register_forward_hook(lambda *a: calls.append(1))
    batch = vlm_batch(kind, videos=bool(videos))
    pixels = batch["pixel_values_videos" if videos else "pixel_values"].requires_grad_(images_grad)
    with monkeypatch.context() as patch:
        if not cache:
            patch.setattr(frozen_encoder.FrozenEncoderCache, "frozen", lambda self: False)
        wrapped = wrap_text(model, sub="mask", ratio=0.5, mode=mode)
        if compiled:
            torch._dynamo.reset()
            wrapped.compile(backend="eager")
        step = _step(wrapped)
        for _ in range(1 + compiled):
            calls.clear()
            model.zero_grad()
            pixels.grad = None
            torch.manual_seed(3)
            step(batch)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return grads | ({"pixel_values": pixels.grad} if images_grad else {}), len(calls)


FROZEN_CASES = [(kind, "drop") for kind in VLMS] + [("llava", "token"), ("qwen2_vl", "attention")]
FROZEN_CASES += [(f"{kind} videos", "drop") for kind in VIDEO_PLACEHOLDERS]


@needs_transformers_5
@pytest.mark.parametrize("kind, mode", FROZEN_CASES)
def test_a_frozen_vision_tower_runs_once_a_step_with_the_same_gradients(kind, mode, monkeypatch):
    """A vision tower with no trainable parameter and nothing random computes the same in both branches: the sub
    pass gets the main pass's output back (the tower computes once a step, not twice) and the gradients are those
    of running it twice."""
    cached, once = _frozen_tower_step(kind, mode, cache=True, monkeypatch=monkeypatch)
    again, twice = _frozen_tower_step(kind, mode, cache=False, monkeypatch=monkeypatch)
    assert (once, twice) == (1, 2)
    name, _, videos = kind.partition(" ")
    assert cached.keys() == again.keys() and not cached.keys() & _tower_names(VLMS[name](), bool(videos))
    for n in cached:
        torch.testing.assert_close(cached[n], again[n], rtol=1e-6, atol=1e-8, msg=n)


@needs_transformers_5
def test_a_compiled_wrapper_runs_a_frozen_vision_tower_once_a_step_with_the_same_gradients(monkeypatch):
    """Under torch.compile (LLaVA's own checks break its graph; the cache's bookkeeping runs eagerly, outside the
    graphs), the sub pass still gets the main pass's output back, with eager's gradients."""
    eager, once = _frozen_tower_step("llava", "drop", cache=True, monkeypatch=monkeypatch)
    compiled, calls = _frozen_tower_step("llava", "drop", cache=True, monkeypatch=monkeypatch, compiled=True)
    torch._dynamo.reset()
    assert once == calls == 1
    assert compiled.keys() == eager.keys()
    for n in eager:
        torch.testing.assert_close(compiled[n], eager[n], rtol=1e-6, atol=1e-8, msg=n)


@needs_transformers_5
def test_images_that_require_a_gradient_run_a_frozen_tower_again(monkeypatch):
    """A frozen tower given images that require a gradient (a saliency map, an adversarial example) gives the sub
    pass a gradient of its own to them: the tower's output requires a gradient, so the sub pass runs it again (as
    where FSDP1's flat parameters hide a trained tower's parameters from it), and the images' gradient is that of
    both passes."""
    cached, calls = _frozen_tower_step("llava", "drop", cache=True, monkeypatch=monkeypatch, images_grad=True)
    again, _ = _frozen_tower_step("llava", "drop", cache=False, monkeypatch=monkeypatch, images_grad=True)
    assert calls == 2 and cached.keys() == again.keys() and "pixel_values" in cached
    for n in again:
        torch.testing.assert_close(cached[n], again[n], rtol=1e-6, atol=1e-8, msg=n)


def test_the_vision_tower_runs_again_where_it_is_trained_random_or_given_other_images():
    """The sub pass reuses nothing from a tower that trains (a parameter requiring a gradient) or draws at random
    (dropout in training mode), nor where its images are others or were changed in place since the main pass;
    passes without gradients (evaluation) hold nothing."""
    from masksub.adapters import frozen_encoder

    model = llava().train()
    tower = frozen_encoder.image_encoder(model)
    calls = []
    next(tower.children()).register_forward_hook(lambda *a: calls.append(1))
    wrapped = wrap_text(model, sub="mask", ratio=0.5, mode="attention")
    batch = {k: v for k, v in vlm_batch("llava").items() if k != "labels"}
    (cache,) = wrapped.branch._encoders

    def passes(sub_batch=None, change=None) -> int:
        calls.clear()
        wrapped(**batch)
        if change is not None:
            change()
        wrapped(**(sub_batch or batch), sub=True)
        return len(calls)

    assert passes() == 2  # trained
    tower.requires_grad_(False)
    assert passes() == 1 and cache.reused == 1 and not cache._held
    tower.config.attention_dropout = 0.1
    assert passes() == 2  # random in training mode, not in evaluation
    tower.eval()
    assert passes() == 1
    torch.manual_seed(1)
    other = {**batch, "pixel_values": torch.randn_like(batch["pixel_values"])}
    assert passes(other) == 2
    assert passes(change=lambda: batch["pixel_values"].mul_(2)) == 2
    with torch.no_grad():
        wrapped(**batch)
    assert not cache._held
    with torch.no_grad():  # the sub pass's images are its own: the same output as the tower computes for them
        torch.manual_seed(4)
        wrapped(**batch)
        got = wrapped(**other, sub=True).logits
        torch.manual_seed(4)
        expected = wrapped(**other, sub=True).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    wrapped.unwrap()
    assert not tower._forward_hooks and "forward" not in tower.__dict__


def test_drop_mode_refuses_a_vision_language_model_it_does_not_know_by_name():
    """VipLLaVA (untested) is not known to the drop mode; a LLaVA on a language model it does not know is refused
    as that language model is."""
    import transformers as tf

    config = llava().config
    vip = tf.VipLlavaConfig(vision_config=config.vision_config, text_config=config.text_config)
    with pytest.raises(ValueError, match="mode='drop' shortens the sequence.*VipLlavaForConditionalGeneration"):
        wrap_text(tf.VipLlavaForConditionalGeneration(vip), sub="mask", ratio=0.5, mode="drop")
    config.text_config = tf.MptConfig(d_model=32, n_heads=2, n_layers=2, vocab_size=64, pad_token_id=PAD)
    known = r"of llava, .*, paligemma \(vision-language\) or qwen2_audio, .* on one of those decoders .* LlavaFor"
    with pytest.raises(ValueError, match=known):
        wrap_text(tf.LlavaForConditionalGeneration(config), sub="mask", ratio=0.5, mode="drop")


def test_a_multimodal_processor_gives_its_tokenizers_mask_token_and_special_tokens():
    """A vision-language model's processor (what MaskSubTrainer's processing_class, and TRL, hold for it) stands for
    its tokenizer: wrap(model, tokenizer=processor) masks with the tokenizer's mask token and never its special
    tokens, the image placeholder among them."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<s>", "</s>", "<mask>", "<image>", *(f"w{i}" for i in range(40))]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", mask_token="<mask>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    processor = transformers.LlavaProcessor(image_processor=transformers.CLIPImageProcessor(), tokenizer=tokenizer)
    assert not hasattr(processor, "all_special_ids")
    wrapped = masksub.wrap(llava(), sub="mask", ratio=0.5, tokenizer=processor)
    assert wrapped.branch.mask_token_id == 3 and {0, 1, 2, 3, 4} <= set(wrapped.branch.special_ids.tolist())
