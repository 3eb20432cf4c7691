"""Text models (Hugging Face transformers, built tiny from configs): the text mask adapter and the step."""

from __future__ import annotations

import copy
import inspect
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    CLS,
    MASK,
    PAD,
    SEP,
    SMALL,
    SPECIAL,
    dropped_and_hidden,
    kept_length,
    needs_transformers_5,
    record_length,
    text_batch,
    tiny_text_model,
    tiny_token_model,
    token_labels,
    wrap_text,
)

import masksub
from masksub.drops import DROPOUT_RATE_ATTRS
from masksub.masking import masked_counts


def _for_model(kind: str, **kw):
    """transformers' default configuration of model type ``kind``; the test skips where the installed transformers
    predates the architecture."""
    import transformers

    if kind not in transformers.CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has no {kind} models")
    return transformers.AutoConfig.for_model(kind, **kw)


def inputs(batch):
    return {k: v for k, v in batch.items() if k != "labels"}


def _rates(model):
    return [tuple(getattr(m, a, None) for a in ("p", *DROPOUT_RATE_ATTRS)) for m in model.modules()]


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert", "llama", "opt"])
@pytest.mark.parametrize("sub", ["mask", "dropout"])
def test_text_contract(family, sub):
    """Main pass = plain model; sub pass differs, is trainable; unwrap restores the model."""
    plain = tiny_text_model(family).train()
    model = copy.deepcopy(plain)
    wrapped = wrap_text(model) if sub == "mask" else masksub.wrap(model, sub="dropout", ratio=0.5)
    if sub == "mask":
        assert wrapped.branch.name == "text"
    batch = inputs(text_batch())
    rates = _rates(model)
    torch.manual_seed(5)
    ref = plain(**batch).logits
    torch.manual_seed(5)
    main = wrapped(**batch).logits
    assert torch.equal(main, ref)
    torch.manual_seed(6)
    sub_out = wrapped(**batch, sub=True).logits
    assert sub_out.shape == ref.shape and not torch.allclose(sub_out, ref)
    assert rates == _rates(model), "drop rates must be restored after the sub pass"
    sub_out.square().mean().backward()
    grads = [p.grad for p in wrapped.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert wrapped.unwrap() is model
    wrapped.eval(), plain.eval()
    assert torch.equal(model(**batch).logits, plain(**batch).logits)


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.25, 1 / 3, 0.5, 0.75, 0.9, 0.99])
def test_exact_counts_never_special_or_padding(ratio):
    wrapped = wrap_text(tiny_text_model(), ratio=ratio)
    batch = text_batch(batch=8, length=24)
    ids, attention = batch["input_ids"], batch["attention_mask"]
    ids[1::2] = torch.where(attention[1::2] == 0, 5, ids[1::2])  # hidden by the attention mask, not by the id
    mask = wrapped.branch.token_mask(ids, attention)
    maskable = (attention == 1) & ~torch.isin(ids, torch.tensor(SPECIAL))
    assert not (mask & ~maskable).any()  # [CLS], [SEP] and padding are never masked
    for i in range(len(ids)):
        n = int(maskable[i].sum())
        assert int(mask[i].sum()) == masksub.num_masked(n, ratio), (i, n)
    if ratio > 0:  # per-sample random: rows with the same maskable set get different masks
        again = wrapped.branch.token_mask(ids, attention)
        assert not torch.equal(mask, again)


def test_masked_counts_match_the_rule_everywhere():
    n = torch.arange(0, 300)
    for ratio in [0.0, 0.05, 0.1, 0.3, 0.5, 0.6, 0.7, 0.9, 0.95]:
        expected = [0] + [masksub.num_masked(int(k), ratio) for k in n[1:]]
        assert masked_counts(n, ratio).tolist() == expected, ratio


@pytest.mark.parametrize("mode", ["token", "attention"])
def test_modes_change_exactly_the_masked_tokens(mode):
    model = tiny_text_model()
    seen = {}
    model.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    wrapped = wrap_text(model, mode=mode)
    batch = inputs(text_batch())
    torch.manual_seed(3)
    wrapped(**batch, sub=True)
    torch.manual_seed(3)
    mask = wrapped.branch.token_mask(batch["input_ids"], batch["attention_mask"])
    if mode == "token":
        assert torch.equal(seen["input_ids"], batch["input_ids"].masked_fill(mask, MASK))
        assert torch.equal(seen["attention_mask"], batch["attention_mask"])
    else:
        assert torch.equal(seen["input_ids"], batch["input_ids"])
        assert torch.equal(seen["attention_mask"], batch["attention_mask"].masked_fill(mask, 0))
    assert mask.any()


def test_tokenizer_option_reads_mask_and_special_ids():
    tokenizer = type("Tok", (), {"mask_token_id": 7, "all_special_ids": [0, 1, 2, 7]})()
    wrapped = masksub.wrap(tiny_text_model(), tokenizer=tokenizer)
    assert wrapped.branch.mask_token_id == 7 and wrapped.branch.special_ids.tolist() == [0, 1, 2, 7]


@pytest.mark.parametrize(
    "kw, error, match",
    [
        (dict(mask_token_id=MASK), ValueError, "special token ids"),
        (dict(special_ids=SPECIAL), ValueError, "no mask_token_id.* mode='attention' .* or mode='drop'"),
        (dict(special_ids=SPECIAL, mode="span"), ValueError, "mode must be one of"),
        (dict(special_ids=SPECIAL, mask_token_id=MASK, unit=8), ValueError, "masks tokens"),
        (dict(special_ids=SPECIAL, mask_token_id=MASK, mask_id=3), TypeError, "no option 'mask_id'"),
        (dict(sub="dropout", special_ids=SPECIAL), TypeError, "uses no mask adapter"),
        (dict(sub="dropout", adapter="text"), TypeError, "adapter: mask adapter options, but sub='dropout'"),
    ],
)
def test_bad_options_are_named(kw, error, match):
    with pytest.raises(error, match=match):
        masksub.wrap(tiny_text_model(), **kw)


def test_image_adapters_refuse_text_options():
    import timm

    with pytest.raises(TypeError, match="'vit' mask adapter has no option 'tokenizer'"):
        masksub.wrap(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=1), tokenizer=None)


@pytest.mark.parametrize("mode", ["token", "attention"])
def test_custom_4d_attention_mask_is_refused_by_name(mode):
    """A (B, 1, L, L) mask cannot be read per token; it used to fail in a broadcast deep inside."""
    wrapped = wrap_text(tiny_text_model(), mode=mode)
    batch = text_batch()
    ids, attention = batch["input_ids"], batch["attention_mask"]
    length = ids.shape[1]
    square = attention[:, None, None, :].expand(-1, 1, length, -1).bool()
    with pytest.raises(ValueError, match=r"attention_mask of input_ids. shape \(6, 20\), got shape \(6, 1, 20, 20\)"):
        wrapped(input_ids=ids, attention_mask=square, sub=True)


def test_special_ids_are_kept_where_the_model_is():
    """Made on the CPU, the special ids were copied to a GPU model's device at every sub pass (a host-device
    copy that waits); a meta-device model stands in for the GPU here."""
    with torch.device("meta"):
        model = tiny_text_model("bert")
    assert masksub.wrap(model, special_ids=SPECIAL, mask_token_id=MASK).branch.special_ids.device.type == "meta"


def test_inputs_embeds_is_refused():
    wrapped = wrap_text(tiny_text_model())
    with pytest.raises(ValueError, match="inputs_embeds are not supported"):
        wrapped(inputs_embeds=torch.randn(2, 8, 32), sub=True)


def _step_grads(memory_saving: bool, accum_steps: int = 1):
    wrapped = wrap_text(tiny_text_model()).train()
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.0)
    step = masksub.Step(wrapped, opt, torch.nn.CrossEntropyLoss(), memory_saving=memory_saving, accum_steps=accum_steps)
    batch = text_batch(batch=4 * accum_steps)
    for i in range(accum_steps):
        torch.manual_seed(10 + i)  # the same masks and dropout in every run
        out = step({k: v[4 * i : 4 * (i + 1)] for k, v in batch.items()})  # labels come from the mapping
    assert out["updated"] and out["logits"].shape == (4, 3)
    return wrapped, {n: p.grad.clone() for n, p in wrapped.named_parameters() if p.grad is not None}


def test_step_on_a_text_batch_equals_the_summed_loss_by_hand():
    _, grads = _step_grads(memory_saving=True)
    _, summed = _step_grads(memory_saving=False)
    ref = wrap_text(tiny_text_model()).train()
    batch = text_batch(batch=4)
    torch.manual_seed(10)
    main = ref(**inputs(batch)).logits
    sub = ref(**inputs(batch), sub=True).logits
    teacher = F.softmax(main.detach(), dim=-1)
    loss = 0.5 * F.cross_entropy(main, batch["labels"]) + 0.5 * (-(teacher * F.log_softmax(sub, -1)).sum(-1)).mean()
    loss.backward()
    assert grads.keys() == summed.keys() == {n for n, p in ref.named_parameters() if p.grad is not None}
    for n, p in ref.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-5, atol=1e-7, msg=n)
            torch.testing.assert_close(summed[n], p.grad, rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.parametrize("mode", ["token", "drop"])
@pytest.mark.parametrize("memory_saving", [True, False])
def test_step_on_a_token_classifier_equals_the_per_token_loss_by_hand(memory_saving, mode):
    """Token classification: both losses per token, tokens labelled -100 left out of both; with mode='drop' the
    distillation also leaves out the tokens the sub pass dropped (it has no prediction for them)."""
    batch = token_labels(text_batch(batch=4))
    wrapped = wrap_text(tiny_token_model(), mode=mode).train()
    step = masksub.Step(
        wrapped, torch.optim.SGD(wrapped.parameters(), lr=0.0), torch.nn.CrossEntropyLoss(), memory_saving=memory_saving
    )
    torch.manual_seed(10)
    out = step(batch)
    assert out["logits"].shape == (4, 20, 3)
    ref = wrap_text(tiny_token_model(), mode=mode).train()
    torch.manual_seed(10)
    main = ref(**inputs(batch)).logits
    sub = ref(**inputs(batch), sub=True).logits
    labels, labelled = batch["labels"], batch["labels"] != -100
    distilled = labelled if mode == "token" else labelled & ref.sub_kept
    assert 0 < distilled.sum() < labelled.sum() < labelled.numel() if mode == "drop" else ref.sub_kept is None
    per_token = -(F.softmax(main.detach(), -1) * F.log_softmax(sub, -1)).sum(-1)
    loss = 0.5 * F.cross_entropy(main[labelled], labels[labelled]) + 0.5 * per_token[distilled].mean()
    loss.backward()
    for n, p in ref.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(dict(wrapped.named_parameters())[n].grad, p.grad, rtol=1e-5, atol=1e-7, msg=n)


def _bert_tokenizer(tmp_path):
    """A WordPiece tokenizer of BERT's kind over conftest's ids: [PAD] [CLS] [SEP] [MASK], [UNK], then words."""
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]", *(f"w{i}" for i in range(5, 64))]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(str(tmp_path / "vocab.txt"))
    assert [tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.mask_token_id] == SPECIAL
    return tokenizer


@pytest.mark.parametrize("mode", ["token", "attention", "drop"])
def test_step_on_a_masked_language_model_equals_its_pretraining_loss_by_hand(tmp_path, mode):
    """BERT's pretraining objective with transformers' own collator (15%... here 30% of the words become targets,
    most of them the mask token): the main loss is the model's own masked-LM loss; the sub branch masks half of
    the other words (never a target's mask token) and learns the main branch's distribution at each target it
    predicts: in drop mode every target shown as the mask token, which is never dropped."""
    import transformers

    tokenizer = _bert_tokenizer(tmp_path)
    config = transformers.BertConfig(**SMALL, max_position_embeddings=64, hidden_dropout_prob=0.0)
    config.attention_probs_dropout_prob = 0.0

    def model():
        torch.manual_seed(0)
        return wrap_text(transformers.BertForMaskedLM(config), mode=mode, tokenizer=tokenizer).train()

    texts = [" ".join(f"w{(7 * i + 3 * j) % 59 + 5}" for j in range(6 + 3 * i)) for i in range(4)]
    collator = transformers.DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.3)
    torch.manual_seed(1)
    batch = collator([tokenizer(t) for t in texts])
    labels, labelled = batch["labels"], batch["labels"] != -100
    shown_as_mask = labelled & (batch["input_ids"] == MASK)
    assert shown_as_mask.sum() > 4 and (labelled & ~shown_as_mask).any(), "the collator's 80-10-10 split"
    wrapped = model()
    step = masksub.Step(wrapped, torch.optim.SGD(wrapped.parameters(), lr=0.0), torch.nn.CrossEntropyLoss())
    torch.manual_seed(10)
    out = step(dict(batch))
    with torch.no_grad():
        own = wrapped.unwrap()(**batch).loss
    torch.testing.assert_close(out["loss_main"], own, rtol=1e-6, atol=1e-6)
    ref = model()
    torch.manual_seed(10)
    main = ref(**inputs(batch)).logits
    sub = ref(**inputs(batch), sub=True).logits
    distilled = labelled if mode != "drop" else labelled & ref.sub_kept
    if mode == "drop":
        assert ref.sub_kept[shown_as_mask].all() and distilled.sum() < labelled.sum()
    per_token = -(F.softmax(main.detach(), -1) * F.log_softmax(sub, -1)).sum(-1)
    torch.testing.assert_close(out["loss_sub"], per_token[distilled].mean().detach(), rtol=1e-5, atol=1e-6)
    loss = 0.5 * F.cross_entropy(main[labelled], labels[labelled]) + 0.5 * per_token[distilled].mean()
    loss.backward()
    for n, p in ref.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(dict(wrapped.named_parameters())[n].grad, p.grad, rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.skipif(torch.__version__ < (2, 6), reason="dynamo before torch 2.6 breaks graphs at transformers' outputs")
@pytest.mark.parametrize("mode", ["token", "attention"])
def test_torch_compile_two_graphs_no_breaks_and_the_sub_pass_stays_masked(mode):
    from torch._dynamo.utils import counters

    counters.clear()
    torch._dynamo.reset()
    model = tiny_text_model(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, initializer_range=0.5)
    wrapped = wrap_text(model, mode=mode).train()
    eager = copy.deepcopy(wrapped)
    wrapped.compile(backend="aot_eager", fullgraph=True)  # fullgraph: any graph break raises
    batch = inputs(text_batch())
    for _ in range(3):
        wrapped(**batch).logits.sum().backward()
        wrapped(**batch, sub=True).logits.sum().backward()
    assert counters["stats"]["unique_graphs"] == 2
    torch.manual_seed(3)
    got = wrapped(**batch, sub=True).logits
    torch.manual_seed(3)
    torch.testing.assert_close(got, eager(**batch, sub=True).logits)
    assert not torch.allclose(got, wrapped(**batch).logits, atol=1e-2)


def test_step_labels_never_reach_the_model():
    model = tiny_text_model()
    seen = []
    model.register_forward_pre_hook(lambda m, a, kw: seen.append(set(kw)), with_kwargs=True)
    wrapped = wrap_text(model).train()
    step = masksub.Step(wrapped, torch.optim.SGD(wrapped.parameters(), lr=0.1), torch.nn.CrossEntropyLoss())
    step(text_batch())
    assert seen == [{"input_ids", "attention_mask"}] * 2


def test_model_output_without_logits_is_a_clear_error():
    wrapped = wrap_text(tiny_text_model()).train()
    step = masksub.Step(wrapped, torch.optim.SGD(wrapped.parameters(), lr=0.1), torch.nn.CrossEntropyLoss())
    with pytest.raises(TypeError, match="needs logits"):
        step({**text_batch(), "return_dict": False})


def test_readme_text_example_runs(tmp_path, monkeypatch):
    """The README's text example as written, with its two downloads replaced by local equivalents."""
    import re
    from pathlib import Path

    import transformers

    words = ["a", "gripping", ",", "funny", "film", "two", "hours", "i", "will", "not", "get", "back"]
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]))
    tokenizer = transformers.BertTokenizer(str(tmp_path / "vocab.txt"))
    model = transformers.BertForSequenceClassification(
        transformers.BertConfig(**{**SMALL, "vocab_size": len(tokenizer)})
    )
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda name: tokenizer)
    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained", lambda name, **kw: model)
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("## Text models: Hugging Face transformers", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["metrics"]["updated"] and torch.isfinite(scope["metrics"]["loss"])
    assert scope["plain"] is model and scope["step"].model.branch.name == "text"
    assert scope["step"].model.branch.mask_token_id == 4
    assert not (scope["batch"]["input_ids"] == 1).any()  # every word is in the vocabulary: none is [UNK]


def test_dropsub_raises_rates_read_from_the_config_and_restores_them():
    """Falcon reads config.hidden_dropout in its forward: the sub pass raises it, then puts it back."""
    import transformers

    torch.manual_seed(0)
    config = transformers.FalconConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, pad_token_id=PAD, num_labels=3
    )
    model = transformers.FalconForSequenceClassification(config).train()
    wrapped = masksub.wrap(model, sub="dropout", ratio=0.5)
    assert (config, "hidden_dropout") in wrapped.branch._sites
    batch = inputs(text_batch())
    torch.manual_seed(1)
    main = wrapped(**batch).logits
    torch.manual_seed(1)
    assert not torch.equal(wrapped(**batch, sub=True).logits, main)
    assert config.hidden_dropout == 0.0 and config.attention_dropout == 0.0


@pytest.mark.parametrize(
    "name, attr, config",
    [
        # Starcoder2 applies F.dropout(p=self.residual_dropout), MPT F.dropout(p=self.attn_dropout_p); MPT's rate is
        # the int 0 of its configuration unless set
        ("Starcoder2", "residual_dropout", dict(hidden_size=32, num_attention_heads=2, num_hidden_layers=2)),
        ("Starcoder2", "embedding_dropout", dict(hidden_size=32, num_attention_heads=2, num_hidden_layers=2)),
        ("Mpt", "attn_dropout_p", dict(d_model=32, n_heads=2, n_layers=2)),
    ],
)
def test_dropsub_raises_functional_dropout_rates_of_every_name_transformers_uses(name, attr, config):
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, f"{name}Config")(vocab_size=64, num_labels=3, pad_token_id=PAD, **config)
    model = getattr(transformers, f"{name}ForSequenceClassification")(config).train()
    owners = [m for m in model.modules() if hasattr(m, attr)]
    built = [getattr(m, attr) for m in owners]
    assert owners and set(built) == {0}
    seen = []
    for m in owners:
        m.register_forward_pre_hook(lambda m, args, kwargs: seen.append(getattr(m, attr)), with_kwargs=True)
    wrapped = masksub.wrap(model, sub="dropout", ratio=0.5)
    wrapped(**inputs(text_batch()), sub=True)
    assert seen and set(seen) == {0.5}
    restored = [getattr(m, attr) for m in owners]
    assert restored == built and [type(v) for v in restored] == [type(v) for v in built]  # MPT's int 0 as it was


def _drop_family(family: str) -> torch.nn.Module:
    """A tiny classifier of ``family`` without dropout: the modes' outputs compare exactly in training mode. Its
    weights are drawn 10 times wider than transformers' default (0.02), so that hiding tokens moves the logits by
    far more than the tests' tolerance (at the default, by about 1e-4, MobileBERT's by 1e-7)."""
    import transformers

    if family == "distilbert":
        model = tiny_text_model("distilbert", initializer_range=0.2)
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        return model.train()
    no_dropout = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, initializer_range=0.2)
    if family in ("bert", "roberta"):
        return tiny_text_model(family, **no_dropout).train()
    torch.manual_seed(0)
    kw = dict(SMALL, max_position_embeddings=64, num_labels=3, **no_dropout)
    if family == "electra":
        return transformers.ElectraForSequenceClassification(transformers.ElectraConfig(**kw, embedding_size=16))
    if family == "albert":
        return transformers.AlbertForSequenceClassification(transformers.AlbertConfig(**kw, embedding_size=16)).train()
    kind, relative = RELATIVE_CASES.get(family, (family, None))
    config = _for_model(kind, **kw, pad_token_id=PAD)  # the others' defaults, made small
    if family == "mobilebert":  # its bottleneck and embeddings within the small width
        config.update(dict(intra_bottleneck_size=16, embedding_size=16, true_hidden_size=16))
    if family == "squeezebert":  # its embeddings as wide as its layers
        config.embedding_size = SMALL["hidden_size"]
    if family == "xmod":  # two languages, each with its adapters
        config.languages = ["en_XX", "de_DE"]
    if family == "luke":  # a small entity vocabulary (its default has 500,000)
        config.update(dict(entity_vocab_size=16, entity_emb_size=16))
    if family == "big_bird":  # full attention (block-sparse is refused)
        config.attention_type = "original_full"
    if family == "rembert":  # its input embeddings, mapped to the width in the encoder
        config.update(dict(input_embedding_size=16, output_embedding_size=16))
    if relative is not None:  # DeBERTa's disentangled attention, MPNet's bias
        config.update(relative)
    return transformers.AutoModelForSequenceClassification.from_config(config).train()


DEBERTA_V3 = dict(relative_attention=True, position_biased_input=False, pos_att_type=["p2c", "c2p"])
DEBERTA_V3.update(share_att_key=True, position_buckets=8, norm_rel_ebd="layer_norm")
RELATIVE_CASES = {  # case: model type and configuration, of the classifiers whose attention reads relative positions
    "deberta-v3": ("deberta-v2", DEBERTA_V3),  # v3's, with log buckets shorter than the batch (v3 has 256)
    "deberta-v2": ("deberta-v2", dict(DEBERTA_V3, share_att_key=False, position_buckets=-1)),  # v2's projections
    "deberta-c2p": ("deberta-v2", dict(DEBERTA_V3, pos_att_type=["c2p"])),
    "deberta-absolute": ("deberta-v2", dict(relative_attention=False)),  # its default configuration: no relative
    "mpnet": ("mpnet", {}),
    "roformer": ("roformer", dict(embedding_size=16)),  # rotary queries and keys; embeddings mapped to the width
    "roformer-value": ("roformer", dict(rotary_value=True)),  # values turned too
}


DROP_FAMILIES = ["bert", "roberta", "distilbert", "electra", "albert", "data2vec-text", "ernie"]
DROP_FAMILIES += ["roberta-prelayernorm", "xlm-roberta-xl", "megatron-bert", "mobilebert", "rembert", "squeezebert"]
DROP_FAMILIES += ["layoutlm", "markuplm", "roc_bert", "xmod", "big_bird", "ibert", "luke", "tapas", *RELATIVE_CASES]


def _extra_inputs(family: str, batch: int, length: int) -> dict[str, torch.Tensor]:
    """The inputs a family takes besides the ids: per token, embedded before the drop (each kept token keeps its
    own), LayoutLM's word boxes, MarkupLM's XPath tags and subscripts, RoCBERT's glyph and pronunciation ids; per
    sample, X-MOD's language (its layers' adapters) and LUKE's entities (attending to and from the kept words; their
    position embeddings are those of the words they span, dropped or not)."""
    g = torch.Generator().manual_seed(4)
    if family == "xmod":
        return {"lang_ids": torch.arange(batch) % 2}
    if family == "layoutlm":
        corners = torch.randint(0, 500, (batch, length, 2, 2), generator=g).sort(dim=2).values  # x0 <= x1, y0 <= y1
        return {"bbox": corners.reshape(batch, length, 4)}  # x0, y0, x1, y1
    if family == "markuplm":
        xpath = torch.randint(0, 50, (batch, length, 50, 2), generator=g)
        return {"xpath_tags_seq": xpath[..., 0], "xpath_subs_seq": xpath[..., 1]}
    if family == "luke":  # two entities a sample, each over a span of words (its word positions, -1 to pad)
        spans = torch.full((batch, 2, 3), -1)
        spans[:, 0, :2], spans[:, 1, :3] = torch.tensor([1, 2]), torch.tensor([5, 6, 7])
        return {"entity_ids": torch.randint(2, 10, (batch, 2), generator=g), "entity_position_ids": spans}
    if family == "tapas":  # a question of 8 tokens, then a table: rows of 2 cells, 2 tokens each
        cell = (torch.arange(length) - 8).clamp(min=0) // 2
        table = (
            torch.stack([torch.ones_like(cell), cell % 2 + 1, cell // 2 + 1], -1) * (torch.arange(length) >= 8)[:, None]
        )
        types = torch.zeros(batch, length, 7, dtype=torch.long)  # segment, column, row; then ranks and labels: 0
        types[..., :3] = table
        return {"token_type_ids": types}
    if family == "roc_bert":
        shapes, sounds = torch.randint(0, 64, (2, batch, length), generator=g)
        return {"input_shape_ids": shapes, "input_pronunciation_ids": sounds}
    return {}


@pytest.mark.parametrize("family", DROP_FAMILIES)
def test_drop_mode_computes_what_attention_mode_does_on_the_kept_tokens_only(family):
    """Dropping the masked tokens after the embeddings gives the logits of hiding them from attention (the same
    mask under one seed), with the encoder running on each sample's kept tokens: the batch's longest kept count."""
    model = _drop_family(family).train()
    hidden = wrap_text(copy.deepcopy(model), mode="attention")
    dropped = wrap_text(model, mode="drop")
    batch = {**inputs(text_batch(batch=6, length=24)), **_extra_inputs(family, 6, 24)}
    lengths = []
    # registered after the adapter's hook: sees the sequence the encoder gets
    model.base_model.embeddings.register_forward_hook(record_length(lengths))
    torch.manual_seed(5)
    expected = hidden(**batch, sub=True).logits
    torch.manual_seed(5)
    got = dropped(**batch, sub=True).logits
    torch.manual_seed(5)
    mask = dropped.branch.token_mask(batch["input_ids"], batch["attention_mask"])
    assert lengths[-1] == kept_length(batch["attention_mask"], mask) < 24
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.manual_seed(5)
    main = dropped(**batch).logits
    torch.manual_seed(5)  # ALBERT's classifier drops out
    assert torch.equal(main, hidden(**batch).logits), "the main pass is the plain model's"
    assert (expected - main).abs().max() > 0.05, "hiding the tokens moves the logits far beyond the tolerance"


def _modernbert(attn: str = "sdpa", pooling: str = "cls") -> torch.nn.Module:
    """A tiny ModernBERT sequence classifier: a global layer, then two local ones whose window (8 tokens: 4 each
    side) is shorter than the batches here."""
    import transformers

    config = transformers.ModernBertConfig(
        **{**SMALL, "num_hidden_layers": 3},
        local_attention=8,
        global_attn_every_n_layers=3,
        initializer_range=0.2,  # hiding tokens moves the logits far beyond the tolerance (at 0.02, ~3e-3)
        pad_token_id=PAD,
        num_labels=3,
        classifier_pooling=pooling,
        attn_implementation=attn,
    )
    torch.manual_seed(0)
    return transformers.ModernBertForSequenceClassification(config).eval()


@needs_transformers_5
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_drop_mode_on_modernbert_keeps_its_local_windows_by_position(attn, pooling):
    """ModernBERT gets the kept token ids with their position ids (its RoPE), and its local layers a window mask by
    position: the logits of hiding the same tokens, with the model running on the batch's longest kept count."""
    model = _modernbert(attn, pooling)
    assert sorted(model.config.layer_types) == ["full_attention", "sliding_attention", "sliding_attention"]
    plain = copy.deepcopy(model)
    dropped = wrap_text(model, mode="drop")
    batch = inputs(text_batch(batch=6, length=24))
    got, expected, mask, lengths = dropped_and_hidden(dropped, model, batch)
    assert lengths == [kept_length(batch["attention_mask"], mask), 24] and lengths[0] < 24
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        assert torch.equal(dropped(**batch).logits, plain(**batch).logits), "the main pass is the plain model's"


def test_drop_mode_on_modernbert_under_a_kernel_that_takes_no_mask_hides_the_tokens(monkeypatch):
    """Where the local layers' kernel takes no mask (flash attention), a batch hides its masked tokens instead: the
    same logits at the full length, warned once."""
    model = _modernbert()
    hidden = wrap_text(copy.deepcopy(model), mode="attention")
    dropped = wrap_text(model, mode="drop")
    monkeypatch.setattr(masksub.adapters.text, "MASKED_KERNELS", ("eager",))  # as if SDPA took no mask
    batch = inputs(text_batch(batch=6, length=24))
    lengths = []
    model.model.embeddings.register_forward_hook(lambda m, a, out: lengths.append(out.shape[1]))
    with torch.no_grad(), pytest.warns(UserWarning, match="attention runs on 'sdpa', which takes no mask"):
        torch.manual_seed(5)
        got = dropped(**batch, sub=True).logits
    torch.manual_seed(5)
    with torch.no_grad():
        assert torch.equal(got, hidden(**batch, sub=True).logits) and lengths == [24]


def _rope_encoder(kind: str, **overrides) -> torch.nn.Module:
    """A tiny sequence classifier of a RoPE encoder (bidirectional, rotated by position ids) of model type ``kind``
    (3 labels, padding id PAD, config ``overrides``), in eval mode."""
    import transformers

    config = _for_model(kind)
    small = dict(SMALL, num_key_value_heads=2, head_dim=16, max_position_embeddings=64, num_labels=3, type_vocab_size=2)
    small.update(pad_token_id=PAD, bos_token_id=CLS, eos_token_id=SEP)
    small.update(initializer_range=0.2)  # hiding tokens moves the logits far beyond the tolerance (at 0.02, ~5e-5)
    for key, value in {**small, **overrides}.items():
        if key in overrides or (hasattr(config, key) and not isinstance(getattr(type(config), key, None), property)):
            setattr(config, key, value)
    torch.manual_seed(0)
    return transformers.AutoModelForSequenceClassification.from_config(config).eval()


ROPE_ENCODER_CASES = [  # (model type, its classifier's pooling where it offers several)
    *[("eurobert", pooling) for pooling in ("bos", "mean", "late")],
    *[("ultrabert", pooling) for pooling in ("cls", "mean")],
    *[(kind, None) for kind in ("nomic_bert", "gte", "jina_embeddings_v3", "esmc")],
]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("kind,pooling", ROPE_ENCODER_CASES)
def test_drop_mode_on_a_rope_encoder_computes_what_hiding_the_tokens_does(kind, pooling, attn):
    """EuroBERT, Ultrabert, NomicBERT, GTE, Jina v3 and ESM C (bidirectional, RoPE over position ids) get the kept
    token ids with their position ids (and segment ids, where they embed them): pooled from the first token, a mean
    over the attention mask or the mean of each token's logits, the logits of hiding the same tokens, with the model
    running on the batch's longest kept count."""
    model = _rope_encoder(kind, **({"classifier_pooling": pooling} if pooling else {}))
    model.config._attn_implementation = attn
    dropped = wrap_text(model, mode="drop")
    assert not dropped.branch.reads_last
    batch = inputs(text_batch(batch=6, length=24))
    if "token_type_ids" in inspect.signature(model.forward).parameters and model.config.type_vocab_size > 1:
        batch["token_type_ids"] = (torch.arange(24) >= 9).long().repeat(6, 1)  # a second segment
    got, expected, mask, lengths = dropped_and_hidden(dropped, model, batch)
    assert lengths == [kept_length(batch["attention_mask"], mask), 24] and lengths[0] < 24
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_drop_mode_on_ultrabert_keeps_its_sliding_windows_by_position(attn):
    """Ultrabert's sliding layers (those its layer types name; a window of 4 positions each side, shorter than the
    batch) get a window mask by position, as ModernBERT's local ones do."""
    model = _rope_encoder("ultrabert", sliding_window=4, layer_types=["sliding_attention", "full_attention"])
    model.config._attn_implementation = attn
    dropped = wrap_text(model, mode="drop")
    assert len(dropped.branch._window_handles) == 1
    got, expected, _, lengths = dropped_and_hidden(dropped, model, inputs(text_batch(batch=6, length=24)))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert lengths[0] < 24


@pytest.mark.parametrize("family", ["bert", "deberta-v3", "llama", "modernbert"])
def test_drop_mode_saves_compute_and_its_gradients_match_the_summed_loss(family):
    from conftest import sub_flop_ratio

    builders = {
        "llama": lambda: _decoder("llama").train(),
        "bert": lambda: _drop_family("bert"),
        "deberta-v3": lambda: _drop_family("deberta-v3"),
        "modernbert": lambda: _modernbert().train(),
    }
    build = builders[family]
    batch = inputs(text_batch(batch=4, length=48))
    wrapped = wrap_text(build(), mode="drop", ratio=0.5)
    assert 0.4 < sub_flop_ratio(wrapped, batch) < 0.7
    grads = []
    for memory_saving in (True, False):
        wrapped = wrap_text(build(), mode="drop", ratio=0.5).train()
        opt = torch.optim.SGD(wrapped.parameters(), lr=0.0)  # .grad holds the step's gradient
        step = masksub.Step(wrapped, opt, torch.nn.CrossEntropyLoss(), memory_saving=memory_saving)
        torch.manual_seed(3)
        step({**batch, "labels": torch.arange(4) % 3})
        grads.append({n: p.grad.clone() for n, p in wrapped.named_parameters() if p.grad is not None})
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-5, atol=1e-7, msg=n)


def test_drop_mode_is_refused_where_the_sequence_must_stay_whole():
    import transformers

    deberta = transformers.DebertaForSequenceClassification(transformers.DebertaConfig(**SMALL, num_labels=3))
    with pytest.raises(  # DeBERTa v1's span of relative positions is the sequence's length
        ValueError, match="mode='drop' .* DebertaForSequenceClassification is not one: use mode='attention'"
    ):
        wrap_text(deberta, mode="drop")
    config = dict(SMALL, num_labels=3, relative_attention=True)
    conv = transformers.DebertaV2ForSequenceClassification(transformers.DebertaV2Config(**config, conv_kernel_size=3))
    repeated = transformers.DebertaV2ForSequenceClassification(transformers.DebertaV2Config(**config))
    repeated.deberta.z_steps = 2  # its last layer run again: an attribute of the model, not of its configuration
    for setting, deberta in (("conv_kernel_size", conv), ("z_steps", repeated)):  # v2-xlarge has the convolution
        with pytest.raises(ValueError, match=f"mode='drop' on DebertaV2ForSequenceClassification: .* {setting}"):
            wrap_text(deberta, mode="drop")
        assert not any(m._forward_pre_hooks or m._forward_hooks for m in deberta.modules())
    config = transformers.BertConfig(**SMALL, max_position_embeddings=64)
    for head in (transformers.BertForQuestionAnswering, transformers.BertForPreTraining):  # spans; two heads
        with pytest.raises(ValueError, match=f"needs a sequence, multiple-choice or .* {head.__name__} is not one"):
            wrap_text(head(config), mode="drop")
    for family in ("bert", "deberta-v3", "mpnet", "roformer"):
        plain = wrap_text(_drop_family(family), mode="drop").unwrap()
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in plain.modules())


def _decoder(kind: str, **overrides) -> torch.nn.Module:
    """A tiny decoder sequence classifier of model type ``kind`` (3 labels, padding id PAD, config ``overrides``),
    in eval mode: the modes' outputs compare without dropout draws."""
    import transformers

    top = _decoder_config(kind, **overrides)
    torch.manual_seed(0)
    if type(top) not in transformers.AutoModelForSequenceClassification._model_mapping:
        pytest.skip(f"transformers {transformers.__version__} has no {kind} sequence classifier")
    return transformers.AutoModelForSequenceClassification.from_config(top).eval()


def _decoder_lm(kind: str, **overrides) -> torch.nn.Module:
    """The causal language model of ``_decoder_config(kind, **overrides)``, drawn under seed 0, in eval mode."""
    import transformers

    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(_decoder_config(kind, **overrides)).eval()


def _decoder_config(kind: str, **overrides):
    """The configuration of a tiny decoder of model type ``kind``: 3 labels, padding id PAD, config ``overrides``."""
    top = _for_model(kind)
    config = top.get_text_config()  # the config itself, or a multimodal classifier's language model's (Gemma 3's)
    if top is not config:  # its vision tower: 4 patches pooled to 4 image tokens
        vision = dict(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, patch_size=14)
        top.vision_config.update(dict(vision, image_size=28))
        top.mm_tokens_per_image = 4
    small = dict(SMALL, num_key_value_heads=2, head_dim=16, moe_intermediate_size=32, pad_token_id=PAD)
    small.update(max_position_embeddings=64, first_k_dense_replace=1)  # DeepSeek's second layer routes
    small.update(index_topk=4)  # AXK2's indexer: each query's keys, fewer than the batch has
    for key, value in small.items():
        derived = isinstance(getattr(type(config), key, None), property)  # Falcon's head_dim, read from the sizes
        unset = hasattr(config, key) and getattr(config, key) is None  # Ministral's head_dim, Nemotron's kv heads
        if key == "pad_token_id" or unset or (isinstance(getattr(config, key, None), int) and not derived):
            setattr(config, key, value)
    if getattr(config, "kv_lora_rank", None):  # latent attention (DeepSeek V2/V3, MiniCPM3, Mistral 4)
        small_latent = dict(q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)
        for key, value in small_latent.items():
            setattr(config, key, value)
        config.head_dim = int(config.qk_rope_head_dim / config.rope_parameters.get("partial_rotary_factor", 1.0))
    if getattr(config, "n_routed_experts", None) and not getattr(config, "num_experts_per_tok", None):
        config.num_experts_per_tok = 2  # DeepSeek V2 routes none by default
    if getattr(config, "rotary_dim", None):  # GPT-J's rotary part of each head, within the small head
        config.rotary_dim = 8
    for key, value in config.to_dict().items():  # the config's own special tokens, never masked: none a word here
        if key.endswith("_token_id") and isinstance(value, int) and SEP < value < SMALL["vocab_size"]:
            setattr(config, key, SEP)
    top.num_labels = 3
    for key, value in overrides.items():
        setattr(config, key, value)
    return top


def _decoder_batch(left: bool, batch: int = 6, length: int = 20) -> dict[str, torch.Tensor]:
    """Words only (no special token at either end), sample i with ``length - 2 * i`` of them, padded on the left
    or the right: the token the classifier reads is a word."""
    ids = torch.randint(4, 64, (batch, length), generator=torch.Generator().manual_seed(1))
    attention = torch.ones(batch, length, dtype=torch.long)
    for i in range(batch):
        pad = slice(0, 2 * i) if left else slice(length - 2 * i, length)
        ids[i, pad], attention[i, pad] = PAD, 0
    return {"input_ids": ids, "attention_mask": attention}


def _with_head(kinds: tuple[str, ...], auto: str = "AutoModelForTokenClassification") -> list[str]:
    """The model types among ``kinds`` that the installed transformers has ``auto``'s head for (a token classifier
    by default)."""
    import transformers

    have = set(getattr(transformers, auto)._model_mapping)  # configuration classes
    return [k for k in kinds if k in transformers.CONFIG_MAPPING and transformers.CONFIG_MAPPING[k] in have]


@pytest.mark.parametrize("left", [False, True], ids=["right_padded", "left_padded"])
@pytest.mark.parametrize(
    "kind", _with_head(masksub.adapters.text_families.DROP_DECODERS, "AutoModelForSequenceClassification")
)
def test_drop_mode_on_a_decoder_classifier_computes_what_hiding_the_tokens_does(kind, left):
    """The decoder gets each sample's kept token ids with their own position ids: its logits are those of the whole
    sequence with the same tokens hidden by the attention mask. The token it reads (the last that is not padding, a
    word here) is never masked, and each sample masks num_masked of its other words."""
    model = _decoder(kind)
    wrapped = wrap_text(model, mode="drop", ratio=0.5)
    batch = _decoder_batch(left)
    got, expected, mask, lengths = dropped_and_hidden(wrapped, model, batch)
    read = torch.arange(20) * (batch["input_ids"] != PAD)
    assert not mask.gather(1, read.argmax(-1, keepdim=True)).any(), "the token the classifier reads stays"
    words = batch["attention_mask"].sum(1)
    assert mask.sum(1).tolist() == masked_counts(words - 1, 0.5).tolist()
    assert lengths == [kept_length(batch["attention_mask"], mask), 20] and lengths[0] < 20
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        assert torch.equal(wrapped(**batch).logits, model(**batch).logits), "the main pass is the plain model's"


def _as_token_classifier(model, auto: str = "AutoModelForTokenClassification") -> torch.nn.Module:
    """The token classifier (3 labels per token; or another head: ``auto``) of ``model``'s configuration (or of the
    configuration given, in eval mode), without dropout, in ``model``'s mode; the test skips where transformers has
    none for that model type."""
    import transformers

    config = getattr(model, "config", model)
    if type(config) not in getattr(transformers, auto)._model_mapping:
        pytest.skip(f"transformers {transformers.__version__} has no {config.model_type} head of {auto}")
    torch.manual_seed(0)
    token = getattr(transformers, auto).from_config(config)
    for m in token.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return token.train(getattr(model, "training", False))


def _token_case(
    family: str, auto: str = "AutoModelForTokenClassification"
) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A tiny token classifier (or another head: ``auto``) of ``family`` (a case of the BERT family's, RoPE
    encoders' or decoders' sequence classifier tests) and a batch for it: the decoders' without special tokens,
    padded on the right."""
    if family in masksub.adapters.text_families.DROP_DECODERS:
        return _as_token_classifier(_decoder_config(family), auto), _decoder_batch(left=False)
    if family == "modernbert":
        return _as_token_classifier(_modernbert(), auto), inputs(text_batch(batch=6, length=24))
    if family in masksub.adapters.text_families.DROP_ROPE_ENCODERS:
        return _as_token_classifier(_rope_encoder(family), auto), inputs(text_batch(batch=6, length=24))
    batch = {**inputs(text_batch(6, 24)), **_extra_inputs(family, 6, 24)}
    return _as_token_classifier(_drop_family(family), auto), batch


TOKEN_DROP_CASES = [f for f in DROP_FAMILIES if _with_head(RELATIVE_CASES.get(f, (f,))[:1])]  # not TAPAS
TOKEN_DROP_CASES += ["modernbert", *dict(ROPE_ENCODER_CASES)]  # the multimodal and XLM: below
TOKEN_DROP_CASES += _with_head(masksub.adapters.text_families.DROP_DECODERS)


@pytest.mark.parametrize("family", TOKEN_DROP_CASES)
def test_drop_mode_on_a_token_classifier_predicts_each_kept_token_as_hiding_the_others_does(family):
    """A token classifier runs on the kept tokens only (the batch's longest kept count), and their logits go back
    to their places: there, those of the whole sequence with the same tokens hidden by the attention mask; 0 at the
    dropped tokens and the padding, which ``sub_kept`` leaves out. Masked as in the other modes: no token is kept
    from masking for a head to read."""
    model, batch = _token_case(family)
    wrapped = wrap_text(model, mode="drop", ratio=0.5)
    assert wrapped.branch.per_token and not wrapped.branch.reads_last
    length = batch["input_ids"].shape[1]
    lengths = []  # the sequence the transformer's layers get
    if family in DROP_FAMILIES:  # the BERT family drops after its embeddings (this hook runs after the adapter's)
        model.base_model.embeddings.register_forward_hook(record_length(lengths))
    got, expected, mask, input_lengths = dropped_and_hidden(wrapped, model, batch)
    lengths = lengths or input_lengths
    real, words = batch["attention_mask"].bool(), ~torch.isin(batch["input_ids"], torch.tensor(SPECIAL))
    assert mask.sum(1).tolist() == masked_counts((real & words).sum(1), 0.5).tolist()
    kept = wrapped.sub_kept
    assert torch.equal(kept, real & ~mask)
    assert lengths[0] == kept_length(batch["attention_mask"], mask) < length
    assert got.shape == expected.shape == (6, length, model.config.num_labels)
    torch.testing.assert_close(got[kept], expected[kept], rtol=1e-4, atol=1e-5)  # float32, 200 tokens
    assert not got[~kept].any()
    with torch.no_grad():
        plain = model(**batch).logits
        assert torch.equal(wrapped(**batch).logits, plain), "the main pass is the plain model's"
    assert (expected[kept] - plain[kept]).abs().max() > 1e-3, "hiding the tokens moves the kept ones' logits"


MASKED_LM_DROP_CASES = [
    f for f in TOKEN_DROP_CASES if _with_head(RELATIVE_CASES.get(f, (f,))[:1], "AutoModelForMaskedLM")
]


@pytest.mark.parametrize("family", MASKED_LM_DROP_CASES)
def test_drop_mode_on_a_masked_language_model_keeps_every_mask_token_and_predicts_as_hiding_the_others_does(family):
    """A masked language model (BERT's pretraining head) runs on the kept tokens only: the mask tokens its collator
    put in, its targets, are special tokens and always kept; of the other words ``num_masked`` leave the sequence.
    At the kept places the logits are those of the whole sequence with the same words hidden by the attention mask."""
    model, batch = _token_case(family, "AutoModelForMaskedLM")
    wrapped = wrap_text(model, mode="drop", ratio=0.5)
    assert wrapped.branch.per_token and not wrapped.branch.reads_last
    ids, real, special = batch["input_ids"], batch["attention_mask"].bool(), wrapped.branch.special_ids
    targets = real & ~torch.isin(ids, special) & (torch.arange(24) % 4 == 1)  # as a collator masks
    batch["input_ids"] = ids.masked_fill(targets, MASK)
    lengths = []  # the sequence the transformer's layers get
    if family in DROP_FAMILIES:  # the BERT family drops after its embeddings (this hook runs after the adapter's)
        model.base_model.embeddings.register_forward_hook(record_length(lengths))
    got, expected, mask, input_lengths = dropped_and_hidden(wrapped, model, batch)
    lengths = lengths or input_lengths
    words = real & ~torch.isin(batch["input_ids"], special)  # also a token id its config names (ESM C's mask)
    assert mask.sum(1).tolist() == masked_counts(words.sum(1), 0.5).tolist()
    kept = wrapped.sub_kept
    assert torch.equal(kept, real & ~mask) and kept[targets].all(), "every mask token is predicted"
    assert got.shape == expected.shape == (6, 24, model.config.vocab_size)
    assert lengths[0] == kept_length(batch["attention_mask"], mask) < 24
    torch.testing.assert_close(got[kept], expected[kept], rtol=1e-4, atol=1e-5)
    assert not got[~kept].any()
    with torch.no_grad():
        plain = model(**batch).logits
        assert torch.equal(wrapped(**batch).logits, plain), "the main pass is the plain model's"
    assert (expected[targets] - plain[targets]).abs().max() > 1e-3, "hiding the words moves the targets' logits"


CAUSAL_LM_DROP_CASES = _with_head(masksub.adapters.text_families.DROP_DECODERS, "AutoModelForCausalLM")


@pytest.mark.parametrize("kind", CAUSAL_LM_DROP_CASES)
def test_drop_mode_on_a_causal_language_model_predicts_each_kept_tokens_next_as_hiding_the_others_does(kind):
    """A decoder's causal language model (supervised fine-tuning) runs on the kept tokens only, and their next-token
    logits go back to their places: there, those of the whole sequence with the same tokens hidden by the attention
    mask; 0 elsewhere, which ``sub_kept`` leaves out. Every word may be masked (none is held back for a head)."""

    model = _decoder_lm(kind)
    wrapped = wrap_text(model, mode="drop", ratio=0.5)
    assert wrapped.branch.per_token and not wrapped.branch.reads_last
    batch = _decoder_batch(left=False)
    got, expected, mask, lengths = dropped_and_hidden(wrapped, model, batch)
    real = batch["attention_mask"].bool()
    assert mask.sum(1).tolist() == masked_counts(real.sum(1), 0.5).tolist()
    kept = wrapped.sub_kept
    assert torch.equal(kept, real & ~mask)
    assert lengths == [kept_length(batch["attention_mask"], mask), 20] and lengths[0] < 20
    assert got.shape == expected.shape == (6, 20, model.config.get_text_config().vocab_size)
    torch.testing.assert_close(got[kept], expected[kept], rtol=1e-4, atol=1e-5)
    assert not got[~kept].any()
    with torch.no_grad():
        assert torch.equal(wrapped(**batch).logits, model(**batch).logits), "the main pass is the plain model's"


def _from_config(config, head: str) -> torch.nn.Module:
    """The sequence, token or multiple-choice classifier (``head``) of ``config``, drawn under seed 0, in eval mode."""
    import transformers

    auto = {"token": "AutoModelForTokenClassification", "choice": "AutoModelForMultipleChoice"}.get(head)
    torch.manual_seed(0)
    return getattr(transformers, auto or "AutoModelForSequenceClassification").from_config(config).eval()


def _xlm(kind: str, head: str, **overrides) -> torch.nn.Module:
    """A tiny XLM or FlauBERT classifier (3 labels; two languages, embedded per token), in eval mode."""
    config = _for_model(kind, vocab_size=64, emb_dim=32, n_layers=2, n_heads=2, n_langs=2, use_lang_emb=True)
    config.update(dict(max_position_embeddings=64, pad_index=PAD, pad_token_id=PAD, num_labels=3, **overrides))
    config.update(dict(init_std=0.2, embed_init_std=0.2))  # hiding tokens moves the logits far beyond the tolerance
    return _from_config(config, head)


@pytest.mark.parametrize("head", ["sequence", "token"])
@pytest.mark.parametrize("kind", ["xlm", "flaubert"])
def test_drop_mode_on_xlm_keeps_each_tokens_position_and_language(kind, head):
    """XLM and FlauBERT get the kept token ids with their position ids and language ids (``langs``), and their
    ``lengths`` from the kept tokens: the logits of hiding the same tokens, read from the first token or per token."""
    model = _xlm(kind, head)
    wrapped = wrap_text(model, mode="drop")
    batch = inputs(text_batch(batch=6, length=24))
    batch["langs"] = (torch.arange(24) >= 12).long().repeat(6, 1)  # two languages in each sample
    batch["lengths"] = batch["attention_mask"].sum(1)
    got, expected, mask, lengths = dropped_and_hidden(wrapped, model, batch)
    assert lengths == [kept_length(batch["attention_mask"], mask), 24] and lengths[0] < 24
    kept = wrapped.sub_kept if head == "token" else torch.ones(6, dtype=torch.bool)
    torch.testing.assert_close(got[kept], expected[kept], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        languages_matter = model(**{**batch, "langs": 1 - batch["langs"]}).logits
        assert (languages_matter - model(**batch).logits).abs().max() > 1e-2, "the language ids reach the logits"
        assert (expected[kept] - model(**batch).logits[kept]).abs().max() > 1e-2, "hiding moved the logits"


def test_drop_mode_refuses_a_causal_xlm_and_a_summary_over_other_tokens():
    for overrides, what in (({"causal": True}, "is causal"), ({"summary_type": "mean"}, "summary_type='mean'")):
        model = _xlm("xlm", "sequence", **overrides)
        with pytest.raises(ValueError, match=f"mode='drop' on XLMForSequenceClassification: .*{what}"):
            wrap_text(model, mode="drop")
        assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    wrap_text(_xlm("xlm", "token", summary_type="mean"), mode="drop").unwrap()  # a token head reads every token
    roformer = _from_config(_drop_family("roformer").config, "choice")  # its summary: by default the last position
    with pytest.raises(ValueError, match="RoFormerForMultipleChoice: .* summary_type='last'"):
        wrap_text(roformer, mode="drop")


def _multiple_choice(family: str) -> torch.nn.Module:
    """A tiny multiple-choice classifier of ``family`` (a case of the BERT family's tests, ModernBERT, XLM or
    FlauBERT), without dropout, in eval mode."""
    builders = {"modernbert": _modernbert, "xlm": lambda: _xlm("xlm", "sequence")}
    builders["flaubert"] = lambda: _xlm("flaubert", "sequence")
    config = builders.get(family, lambda: _drop_family(family))().config
    if family.startswith("roformer"):  # its head's summary from the first token (by default the last position's)
        config.summary_type = "first"
    model = _from_config(config, "choice")
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


CHOICE_CASES = [f for f in DROP_FAMILIES if _with_head(RELATIVE_CASES.get(f, (f,))[:1], "AutoModelForMultipleChoice")]
CHOICE_CASES += _with_head(("modernbert", "xlm", "flaubert"), "AutoModelForMultipleChoice")


@pytest.mark.parametrize("family", CHOICE_CASES)
def test_a_multiple_choice_head_masks_each_choice_as_a_sequence(family):
    """A multiple-choice head's input_ids (batch, choices, length): each choice masks num_masked of its own words,
    the mask token in its place (``"token"``), hidden (``"attention"``) or dropped (``"drop"``: the logits of
    hiding them, the model running on the longest kept count); the logits (batch, choices) of the model given those
    inputs."""
    model = _multiple_choice(family)
    flat = {**inputs(text_batch(batch=6, length=24)), **_extra_inputs(family, 6, 24)}
    flat.pop("lang_ids", None)  # X-MOD: its default language for every choice
    if family == "xmod":
        model.set_default_language("en_XX")
    batch = {k: v.view(3, 2, *v.shape[1:]) for k, v in flat.items()}
    modes = ("token", "attention", "drop")
    wrapped = {mode: wrap_text(model if mode == "drop" else copy.deepcopy(model), mode=mode) for mode in modes}
    lengths = []
    model.get_input_embeddings().register_forward_hook(record_length(lengths))  # (batch * choices, length)
    if family in DROP_FAMILIES:  # dropped after the embeddings: what the layers get
        model.base_model.embeddings.register_forward_hook(record_length(lengths))
    got = {}
    with torch.no_grad():
        for mode in modes:
            torch.manual_seed(5)
            got[mode] = wrapped[mode](**batch, sub=True).logits
        sub_lengths, lengths[:] = lengths[-1], []
        torch.manual_seed(5)
        mask = wrapped["drop"].branch.token_mask(flat["input_ids"], flat["attention_mask"])
        ids = flat["input_ids"].masked_fill(mask, MASK).view(3, 2, 24)
        hidden = flat["attention_mask"].masked_fill(mask, 0).view(3, 2, 24)
        with_tokens = model(**{**batch, "input_ids": ids}).logits
        hiding = model(**{**batch, "attention_mask": hidden}).logits
        plain = model(**batch).logits
    real, words = flat["attention_mask"].bool(), ~torch.isin(flat["input_ids"], torch.tensor(SPECIAL))
    assert mask.sum(1).tolist() == masked_counts((real & words).sum(1), 0.5).tolist()  # per choice
    assert got["drop"].shape == plain.shape == (3, 2)
    assert torch.equal(got["token"], with_tokens)
    assert torch.equal(got["attention"], hiding)
    torch.testing.assert_close(got["drop"], hiding, rtol=1e-5, atol=1e-5)
    assert sub_lengths == kept_length(flat["attention_mask"], mask) < 24
    assert (hiding - plain).abs().max() > 1e-3, "hiding the tokens moves the logits"
    assert torch.equal(wrapped["drop"](**batch).logits, plain), "the main pass is the plain model's"


def test_drop_mode_refuses_a_quantized_ibert():
    """I-BERT's integer-only mode takes its activation ranges over the whole sequence in training: refused by name."""
    model = _drop_family("ibert")
    model.config.quant_mode = True
    model = type(model)(model.config)
    with pytest.raises(ValueError, match="IBertForSequenceClassification: its configuration sets quant_mode"):
        wrap_text(model, mode="drop")
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_drop_mode_takes_bigbird_in_full_attention_only():
    """BigBird's block-sparse attention counts tokens by index: refused when wrapping, naming the full attention
    that drop mode takes, and at a sub pass after the model was set back to it (no hook left behind)."""
    sparse = _drop_family("big_bird")
    sparse.base_model.set_attention_type("block_sparse")
    with pytest.raises(ValueError, match="its attention is 'block_sparse'.*set_attention_type\\('original_full'\\)"):
        wrap_text(sparse, mode="drop")
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in sparse.modules())
    model = _drop_family("big_bird")
    wrapped = wrap_text(model, mode="drop")
    batch = inputs(text_batch(batch=2, length=24))
    wrapped(**batch, sub=True)
    model.base_model.set_attention_type("block_sparse")
    with pytest.raises(ValueError, match="BigBirdForSequenceClassification: its attention is 'block_sparse'"):
        wrapped(**batch, sub=True)


def _vision_encoder(kind: str, head: str, pooling: str = "cls") -> torch.nn.Module:
    """A tiny ModernVBERT or UltraVBERT classifier (3 labels): a 32-pixel image as 4 tokens (id 60), a text
    model with a global layer and two local ones whose window (8 tokens) is shorter than the batch; in eval mode."""
    config = _for_model(kind)
    text = dict(SMALL, head_dim=16, num_key_value_heads=2, num_hidden_layers=3, local_attention=8, pad_token_id=PAD)
    config.text_config.update({k: v for k, v in text.items() if hasattr(config.text_config, k)})
    config.text_config.update(dict(global_attn_every_n_layers=3, initializer_range=0.2))
    vision = dict(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, patch_size=8)
    config.vision_config.update(dict(vision, image_size=32))
    config.update(dict(pixel_shuffle_factor=2, image_token_id=60, initializer_range=0.2, num_labels=3))
    config.classifier_pooling = pooling
    return _from_config(config, head)


@pytest.mark.parametrize("head,pooling", [("sequence", "cls"), ("sequence", "mean"), ("token", None)])
@pytest.mark.parametrize("kind", ["modernvbert", "ultravbert"])
def test_drop_mode_on_an_image_and_text_encoder_keeps_its_image_tokens(kind, head, pooling):
    """ModernVBERT and UltraVBERT (ModernBERT's and Ultrabert's classifiers of images with text): the image's
    placeholders are never masked and take its features in their places, the words around them drop, and the local
    layers get their windows by position: the logits of hiding the same words."""
    model = _vision_encoder(kind, head, pooling or "cls")
    wrapped = wrap_text(model, mode="drop")
    assert len(wrapped.branch._window_handles) == 2 and not wrapped.branch._image_blocks
    batch = inputs(text_batch(batch=4, length=24))
    batch["input_ids"] = batch["input_ids"].masked_fill(batch["input_ids"] == 60, 59)
    batch["input_ids"][:, 3:7] = 60  # the image's 4 tokens
    batch["pixel_values"] = torch.randn(4, 1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    got, expected, mask, lengths = dropped_and_hidden(wrapped, model, batch)
    assert not mask[:, 3:7].any() and lengths == [kept_length(batch["attention_mask"], mask), 24] and lengths[0] < 24
    kept = wrapped.sub_kept if head == "token" else torch.ones(4, dtype=torch.bool)
    torch.testing.assert_close(got[kept], expected[kept], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        other_image = model(**{**batch, "pixel_values": batch["pixel_values"].flip(0)}).logits
        assert (other_image - model(**batch).logits).abs().max() > 1e-3, "the image reaches the logits"


def test_drop_mode_is_refused_before_transformers_5(monkeypatch):
    for model in (_decoder("llama"), _rope_encoder("modernbert"), tiny_text_model("bert")):
        monkeypatch.setattr(masksub.adapters.text_families, "transformers_version", lambda: (4, 48))
        with pytest.raises(ValueError, match=r"mode='drop' on \w+ needs transformers >= 5, .* this is 4.48: upgrade"):
            masksub.wrap(model, mode="drop", mask_token_id=MASK, special_ids=SPECIAL)
        masksub.wrap(model, mode="attention", mask_token_id=MASK, special_ids=SPECIAL).unwrap()  # what it names
        monkeypatch.undo()
        if masksub.adapters.text_families.transformers_version() >= (5,):
            masksub.wrap(model, mode="drop", mask_token_id=MASK, special_ids=SPECIAL).unwrap()


def test_drop_mode_on_a_decoder_follows_given_position_ids_and_a_padding_id_set_after_wrapping():
    """Position ids given for the batch (one row, broadcast) are gathered with the kept tokens, and the padding id
    set on the config after wrapping (as one does once the tokenizer is loaded) finds the token that stays."""
    model = _decoder("llama")
    model.config.pad_token_id = None
    wrapped = wrap_text(model, mode="drop", ratio=0.5)
    model.config.pad_token_id = PAD
    batch = {**_decoder_batch(left=False), "position_ids": (torch.arange(20) + 3).unsqueeze(0)}
    got, expected, _, _ = dropped_and_hidden(wrapped, model, batch)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


SLIDING_DECODERS = ["mistral", "ministral", "gemma3_text", "gemma3", "gpt_oss", "modernbert-decoder", "gpt_neo"]
SLIDING_DECODERS += ["qwen2"]
SLIDING_DECODERS += ["cohere2", "cohere2_moe", "exaone_moe", "afmoe", "kolibri1", "vaultgemma", "cwm"]  # no classifier


@pytest.mark.parametrize("kind", SLIDING_DECODERS)
def test_drop_mode_on_a_sliding_window_decoder_keeps_its_window_by_position(kind):
    """A sliding window counts tokens, and with tokens dropped a window of tokens spans more positions: the layers
    that slide (Mistral's and Ministral's all, Gemma 3's, GPT-OSS's and ModernBERT-decoder's by layer type, GPT-Neo's
    local ones, none of Qwen2's here) get a window mask by position. Dropping then computes what hiding does, with a
    window shorter than the batch, and the same when it spans the batch. Cohere 2's, EXAONE-MoE's, AFMoE's, Kolibri's,
    VaultGemma's and CWM's causal language models (they have no sequence classifier) at each kept token."""

    key = "window_size" if kind == "gpt_neo" else "sliding_window"  # GPT-Neo builds its window into its layers
    classifier = bool(_with_head((kind,), "AutoModelForSequenceClassification"))
    for window in (8, 20):
        model = (_decoder if classifier else _decoder_lm)(kind, **{key: window})
        wrapped = wrap_text(model, mode="drop", ratio=0.5)
        assert bool(wrapped.branch._window_handles) is (kind != "qwen2")
        got, expected, _, lengths = dropped_and_hidden(wrapped, model, _decoder_batch(left=False))
        kept = ... if classifier else wrapped.sub_kept
        torch.testing.assert_close(got[kept], expected[kept], rtol=1e-5, atol=1e-6)
        assert lengths[0] < 20


@pytest.mark.parametrize("left", [False, True], ids=["right-padded", "left-padded"])
def test_drop_mode_on_llama4_keeps_its_attention_chunks_by_index(left, monkeypatch):
    """Llama 4's chunked layers (3 of its 4 here; the fourth, without RoPE, attends to all) see the tokens of their
    own chunk, counted by index from the first token that is not padding: with tokens dropped, their masks are made
    from the kept tokens' indices, and dropping computes what hiding does with chunks of 8 and 20 over batches of
    20, padded on either side. Without those masks it does not."""
    for chunk in (8, 20):
        model = _decoder_lm("llama4_text", attention_chunk_size=chunk, num_hidden_layers=4)
        assert model.config.layer_types[:4] == ["chunked_attention"] * 3 + ["full_attention"]
        wrapped = wrap_text(model, mode="drop", ratio=0.5)
        assert len(wrapped.branch._window_handles) == 3
        got, expected, _, lengths = dropped_and_hidden(wrapped, model, _decoder_batch(left=left))
        torch.testing.assert_close(got[wrapped.sub_kept], expected[wrapped.sub_kept], rtol=1e-5, atol=1e-6)
        assert lengths[0] < 20
    monkeypatch.setattr(masksub.adapters.text, "sliding_layers", lambda *args: [])  # no chunk masks in the sub pass
    model = _decoder_lm("llama4_text", attention_chunk_size=8, num_hidden_layers=4)
    wrapped = wrap_text(model, mode="drop", ratio=0.5)
    got, expected, _, _ = dropped_and_hidden(wrapped, model, _decoder_batch(left=left))
    assert (got[wrapped.sub_kept] - expected[wrapped.sub_kept]).abs().max() > 1e-3


def test_drop_mode_on_llama4_hides_batches_whose_no_rope_layers_scale_queries_by_index():
    """Llama 4's layers without RoPE scale each query by its index beyond ``floor_scale`` (8,192 tokens; 8 here):
    dropping would change that index, so a longer batch hides its masked tokens instead (the same logits at the full
    length), warned once; a batch within it drops."""
    model = _decoder_lm("llama4_text", num_hidden_layers=4, floor_scale=8)
    wrapped = wrap_text(model, mode="drop", ratio=0.5)
    batch = _decoder_batch(left=False)
    with pytest.warns(UserWarning, match="scale each query by its index .* a batch of 20 is longer"):
        got, expected, _, lengths = dropped_and_hidden(wrapped, model, batch)
    assert lengths == [20, 20]
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    for within in (dict(floor_scale=32), dict(floor_scale=8, attn_temperature_tuning=False)):  # or no scaling
        model = _decoder_lm("llama4_text", num_hidden_layers=4, **within)
        wrapped = wrap_text(model, mode="drop", ratio=0.5)
        got, expected, _, lengths = dropped_and_hidden(wrapped, model, batch)
        assert lengths[0] < 20
        torch.testing.assert_close(got[wrapped.sub_kept], expected[wrapped.sub_kept], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["gpt2", "ctrl"])
def test_drop_mode_keeps_each_kept_tokens_own_segment_id(kind):
    """GPT-2's and CTRL's classifiers embed ``token_type_ids`` per token: the kept tokens keep their own."""
    model = _decoder(kind)
    wrapped = wrap_text(model, mode="drop", ratio=0.5)
    batch = _decoder_batch(left=False)
    batch["token_type_ids"] = (torch.arange(20) >= 7).long().repeat(6, 1)
    got, expected, _, lengths = dropped_and_hidden(wrapped, model, batch)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert lengths[0] < 20


@pytest.mark.parametrize("window", [8, 20])
def test_drop_mode_on_gemma3_with_images_keeps_their_placeholders_and_their_blocks(window):
    """Gemma 3's multimodal classifier: the image placeholders its config names are never masked (the special ids
    given do not list them), so a batch with images drops the masked words around them. Given ``token_type_ids``
    marking the images, the tokens of each image also attend those after them (in its sliding layers too, within the
    window), and the word before each image is never masked, so that two images never meet as one: the logits are
    those of hiding the same tokens, with images or without."""
    model = _decoder("gemma3", sliding_window=window)
    projection = model.model.multi_modal_projector.mm_input_projection_weight  # zero from the start: images alike
    torch.nn.init.normal_(projection, generator=torch.Generator().manual_seed(3))
    wrapped = wrap_text(model, mode="drop", ratio=0.9)  # the word between the images would go
    image = model.config.image_token_id
    assert image not in SPECIAL
    batch = _decoder_batch(left=False, length=30)
    ids = batch["input_ids"]
    ids[:, 1:5], ids[:, 6:10] = image, image  # two images a sample, one word between them (no begin/end tokens)
    batch["pixel_values"] = torch.randn(12, 3, 28, 28, generator=torch.Generator().manual_seed(2))
    got, expected, mask, lengths = dropped_and_hidden(wrapped, model, batch)
    assert not mask[:, 1:5].any() and not mask[:, 6:10].any() and lengths[0] < 30
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    batch["token_type_ids"] = (ids == image).long()
    got, expected, mask, lengths = dropped_and_hidden(wrapped, model, batch)
    assert not mask[:, [0, 5]].any(), "the words before the images stay"
    assert lengths[0] < 30
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    text = {**_decoder_batch(left=True), "token_type_ids": torch.zeros(6, 20, dtype=torch.long)}
    got, expected, _, lengths = dropped_and_hidden(wrapped, model, text)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert lengths[0] < 20


def test_drop_mode_under_a_kernel_that_takes_no_mask_hides_the_tokens_of_batches_longer_than_the_window(monkeypatch):
    """Flash attention keeps its window by index and takes no mask: a batch longer than the window hides its
    masked tokens instead (the same logits at the full length), warned once; a batch within the window drops."""
    model = _decoder("mistral")
    wrapped = wrap_text(model, mode="drop", ratio=0.5)
    monkeypatch.setattr(masksub.adapters.text, "MASKED_KERNELS", ("eager",))  # as if SDPA took no mask
    batch = _decoder_batch(left=False)
    model.config.sliding_window = 8
    with pytest.warns(UserWarning, match="runs on 'sdpa', which takes no mask .* a batch of 20 is longer"):
        got, expected, _, lengths = dropped_and_hidden(wrapped, model, batch)
    assert lengths == [20, 20]
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once
        dropped_and_hidden(wrapped, model, batch)
    model.config.sliding_window = 20
    got, expected, _, lengths = dropped_and_hidden(wrapped, model, batch)
    assert lengths[0] < 20


@pytest.mark.parametrize("kind", ["modernbert", "mistral", "deberta-v3", "roformer"])
def test_drop_mode_window_masks_hold_under_gradient_checkpointing(kind):
    """The layers recomputed in the backward get the window mask (or relative positions) the forward gave them:
    gradient checkpointing changes no gradient of a step (ModernBERT's local layers, Mistral's with a window shorter
    than the batch, DeBERTa v3's relative positions, RoFormer's rotary table)."""

    def grads(checkpointing: bool) -> dict:
        builders = {"modernbert": _modernbert, "mistral": lambda: _decoder("mistral")}
        model = builders.get(kind, lambda: _drop_family(kind))()
        if kind in builders:
            model.config.sliding_window = 4 if kind == "modernbert" else 8
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        wrapped = wrap_text(model.train(), mode="drop")
        assert wrapped.branch._window_handles or wrapped.branch._relative_handles
        step = masksub.Step(wrapped, torch.optim.SGD(wrapped.parameters(), lr=0.0), torch.nn.CrossEntropyLoss())
        batch = _decoder_batch(False, batch=4) if kind == "mistral" else inputs(text_batch(batch=4, length=24))
        torch.manual_seed(3)
        step({**batch, "labels": torch.arange(4) % 3})
        return {n: p.grad for n, p in wrapped.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys()
    for n, g in plain.items():
        torch.testing.assert_close(checkpointed[n], g, rtol=1e-5, atol=1e-7, msg=n)


def test_drop_mode_window_masks_survive_a_deep_copy_and_pickling():
    """The window-mask hooks of a copied or unpickled wrapped model are the copy's own: it drops alike."""
    import pickle

    wrapped = wrap_text(_modernbert(), mode="drop")
    batch = inputs(text_batch(batch=6, length=24))
    for other in (copy.deepcopy(wrapped), pickle.loads(pickle.dumps(wrapped))):
        hooks = list(other.model.model.layers[1]._forward_pre_hooks.values())
        assert [h.__self__ for h in hooks] == [other.branch]
        got, expected, _, lengths = dropped_and_hidden(other, other.model, batch)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        assert lengths[0] < 24


def _packed_and_padded(lengths=(5, 9, 3), seed: int = 1):
    """Sequences of ``lengths`` (words between [CLS] and [SEP]) packed into one row, as TRL's padding-free collator
    packs them (position ids, flash attention's cumulative lengths and sequence index), and right-padded, one a row."""
    g = torch.Generator().manual_seed(seed)
    rows = [
        torch.cat([torch.tensor([CLS]), torch.randint(4, 64, (n - 2,), generator=g), torch.tensor([SEP])])
        for n in lengths
    ]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    packed = {
        "input_ids": torch.cat(rows)[None],
        "position_ids": torch.cat([torch.arange(n) for n in lengths])[None],
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": max(lengths),
        "max_length_k": max(lengths),
        "seq_idx": torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None],
    }
    ids = torch.full((len(lengths), max(lengths)), PAD)
    attention = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)], attention[i, : len(row)] = row, 1
    return packed, {"input_ids": ids, "attention_mask": attention}


@pytest.mark.parametrize("boundaries", ["flash", "positions"])
@pytest.mark.parametrize("mode", ["token", "attention", pytest.param("drop", marks=needs_transformers_5)])
def test_packed_rows_are_masked_per_sequence_as_the_padded_batch_is(mode, boundaries):
    """Padding-free rows (TRL's, DataCollatorWithFlattening's): the sub pass runs on the sequences unpacked into a
    padded batch, so at each packed token its logits (and which tokens a dropping pass predicted) are those of the
    right-padded batch of the same sequences, under the same mask draw; the packed main pass is the padded one's."""
    from conftest import tiny_language_model

    # no cache: transformers finds packed sequences by their position ids only without one (as the Trainer runs)
    model = wrap_text(tiny_language_model("llama", use_cache=False), sub="mask", ratio=0.5, mode=mode).train()
    packed, padded = _packed_and_padded()
    if boundaries == "positions":  # DataCollatorWithFlattening's default: position ids alone
        packed = {k: packed[k] for k in ("input_ids", "position_ids")}
    real = padded["attention_mask"].bool()
    if masksub.adapters.text_families.transformers_version() >= (5,):  # transformers 4: SDPA sees across them
        torch.testing.assert_close(model(**packed).logits[0], model(**padded).logits[real], rtol=1e-5, atol=1e-5)
    torch.manual_seed(0)
    got = model(**packed, sub=True).logits
    got_kept = model.sub_kept
    torch.manual_seed(0)
    expected = model(**padded, sub=True).logits
    assert got.shape == (1, 17, 64)
    if mode == "drop":
        assert torch.equal(got_kept[0], model.sub_kept[real]) and not got_kept.all()
        real = real & model.sub_kept
        got = got[:, got_kept[0]]
    torch.testing.assert_close(got[0], expected[real], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got[0], model(**packed).logits[0][got_kept[0] if mode == "drop" else slice(None)])


def test_packed_rows_of_a_sequence_classifier_are_refused():
    model = wrap_text(tiny_text_model("bert"), sub="mask", ratio=0.5)
    packed, _ = _packed_and_padded()
    with pytest.raises(ValueError, match="one prediction per token.*pad the batch"):
        model(**{k: packed[k] for k in ("input_ids", "position_ids")}, sub=True)


def test_padded_rows_with_position_ids_are_not_packed():
    """Rows of one sequence each, with position ids, with or without a padding mask, are masked as they are."""
    from masksub.adapters.packed import is_packed

    ids = text_batch(batch=1, length=16)["input_ids"][:, :-2]
    for one in (
        {"position_ids": torch.arange(14)[None]},
        {"position_ids": torch.arange(14)[None], "attention_mask": torch.ones_like(ids)},
    ):
        assert not is_packed(one)
    assert is_packed({"position_ids": torch.cat([torch.arange(7), torch.arange(7)])[None]})
    assert is_packed({"seq_idx": torch.zeros(1, 14)})
