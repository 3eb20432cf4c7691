"""MaskSubSFTTrainer: TRL's supervised fine-tuning data and evaluation, MaskSubTrainer's step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("trl", minversion="1.0")
import trl  # noqa: E402
from datasets import Dataset  # noqa: E402
from test_hf import GradsBeforeStep  # noqa: E402

import masksub.loss  # noqa: E402
from masksub.masking import masked_counts  # noqa: E402
from masksub.trl import MaskSubSFTTrainer  # noqa: E402


def _pairs(folder, split: str = "train") -> Dataset:
    """The fixture's CSV rows as TRL's prompt-completion pairs."""
    lines = (folder / f"{split}_lm.csv").read_text().splitlines()[1:]
    return Dataset.from_list([{"prompt": p, "completion": " " + c} for p, c in (line.split(",") for line in lines)])


def _config(folder, **kw) -> trl.SFTConfig:
    base = dict(
        output_dir=str(folder / "run"),
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        per_device_train_batch_size=4,
        learning_rate=0.0,  # the captured gradient is at the initial weights
        max_grad_norm=0.0,
        max_steps=1,
        seed=0,
        disable_tqdm=True,
    )
    return trl.SFTConfig(**{**base, **kw})


def _trainer(folder, mode: str = "attention", **kw) -> MaskSubSFTTrainer:
    config = _config(folder, **kw.pop("config", {}))
    options = {"mask_options": {"mode": mode}} if kw.get("sub", "mask") == "mask" else {}
    kw.setdefault("train_dataset", _pairs(folder))
    return MaskSubSFTTrainer(
        model=str(folder / "lm"),  # a folder (or hub) name: SFTTrainer loads it, the sub branch wraps it
        args=config,
        eval_dataset=_pairs(folder, "valid"),
        **options,
        **kw,
    )


def _train_one_step(trainer) -> tuple[dict, list[dict], GradsBeforeStep]:
    """Train one step; return its batch as the trainer got it, the keyword inputs of each model call (the main
    pass, the sub pass) and the gradient before the optimizer step."""
    seen, batches = [], []
    trainer.model.register_forward_pre_hook(lambda m, a, kw: seen.append(dict(kw)), with_kwargs=True)
    trainer.add_callback(capture := GradsBeforeStep(trainer.model))
    compute_loss = trainer.compute_loss

    def recording(model, inputs, *args, **kwargs):
        batches.append({k: v.clone() for k, v in inputs.items() if torch.is_tensor(v)})
        return compute_loss(model, inputs, *args, **kwargs)

    trainer.compute_loss = recording
    trainer.train()
    (batch,) = batches
    return batch, seen, capture


def test_sft_trainer_gradient_equals_the_completion_loss_by_hand(local_causal_lm):
    """TRL labels the completion and its end token only; the main loss is each labelled next token's cross-entropy,
    the sub branch (its words hidden) learns the main branch's next-token distribution at the same positions."""
    trainer = _trainer(local_causal_lm)
    model = trainer.model
    batch, seen, capture = _train_one_step(trainer)
    labels, ids, attention = batch["labels"], batch["input_ids"], batch["attention_mask"]
    labelled = [row[row != -100].tolist() for row in labels]  # " pos" or " neg", then the end token
    assert all(len(r) == 2 and r[1] == trainer.processing_class.eos_token_id for r in labelled)
    main_kw, sub_kw = seen
    assert torch.equal(sub_kw["input_ids"], ids) and (sub_kw["attention_mask"] < attention).any()
    model.zero_grad()
    main = model(input_ids=ids, attention_mask=attention).logits
    sub = model(input_ids=ids, attention_mask=sub_kw["attention_mask"]).logits
    target = F.pad(labels[:, 1:], (0, 1), value=-100)
    per_token = -(F.softmax(main.detach(), -1) * F.log_softmax(sub, -1)).sum(-1)
    loss = 0.5 * F.cross_entropy(main.flatten(0, 1), target.flatten()) + 0.5 * per_token[target != -100].mean()
    loss.backward()
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(capture.grads[0][n], p.grad, rtol=1e-4, atol=1e-7, msg=n)


def test_sft_trainer_trains_logs_both_losses_and_evaluates_with_trl_metrics(local_causal_lm):
    trainer = _trainer(local_causal_lm, config=dict(max_steps=2, learning_rate=1e-3, logging_steps=1))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2 and all({"loss_main", "loss_sub"} <= h.keys() for h in logged)
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())
    metrics = trainer.evaluate()
    assert {"eval_loss", "eval_mean_token_accuracy", "eval_entropy"} <= metrics.keys()
    assert 0.0 <= metrics["eval_mean_token_accuracy"] <= 1.0


def _first_log(trainer) -> dict:
    trainer.train()
    return next(h for h in trainer.state.log_history if "loss" in h)


@pytest.mark.parametrize("chunk", [None, 14 * 20], ids=["one-chunk", "ragged-chunks"])
def test_training_logs_trl_metrics_of_the_main_pass_as_sft_trainer_does(local_causal_lm, monkeypatch, chunk):
    """The first step's entropy, token accuracy and token count, logged by MaskSubSFTTrainer from its main pass, are
    SFTTrainer's on the same batch (the fixture's model has no dropout), also a chunk of 20 rows at a time (of
    about 50 rows, the last chunk short)."""
    if chunk is not None:
        monkeypatch.setitem(masksub.loss.CHUNK_ELEMENTS, "cpu", chunk)
    config = dict(logging_steps=1)
    ours = _first_log(_trainer(local_causal_lm, config=config))
    theirs = _first_log(
        trl.SFTTrainer(
            model=str(local_causal_lm / "lm"),
            args=_config(local_causal_lm, **config),
            train_dataset=_pairs(local_causal_lm),
        )
    )
    assert ours["num_tokens"] == theirs["num_tokens"] > 0
    assert ours["mean_token_accuracy"] == pytest.approx(theirs["mean_token_accuracy"], abs=1e-6)
    assert ours["entropy"] == pytest.approx(theirs["entropy"], rel=1e-5)
    assert ours["entropy"] > 0.1  # not a zero that would match anything
    assert ours["loss_main"] == pytest.approx(theirs["loss"], rel=1e-5)


def test_a_mixture_of_experts_adds_the_load_balancing_loss_trl_weighs(local_causal_lm):
    """Mixtral under SFTConfig(router_aux_loss_coef=0.2): the main loss is SFTTrainer's loss (cross-entropy plus
    0.2 times the load-balancing loss), and the logs hold its aux_loss."""
    import transformers
    from conftest import SMALL

    tokenizer = transformers.AutoTokenizer.from_pretrained(local_causal_lm / "lm")
    sizes = dict(SMALL, vocab_size=len(tokenizer), num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    transformers.MixtralForCausalLM(transformers.MixtralConfig(**sizes)).save_pretrained(local_causal_lm / "moe")
    tokenizer.save_pretrained(local_causal_lm / "moe")
    config = _config(local_causal_lm, logging_steps=1, router_aux_loss_coef=0.2)
    ours = _first_log(
        MaskSubSFTTrainer(
            model=str(local_causal_lm / "moe"),
            args=config,
            train_dataset=_pairs(local_causal_lm),
            mask_options={"mode": "attention"},
        )
    )
    theirs = _first_log(
        trl.SFTTrainer(model=str(local_causal_lm / "moe"), args=config, train_dataset=_pairs(local_causal_lm))
    )
    assert ours["aux_loss"] == pytest.approx(theirs["aux_loss"], rel=1e-5) and ours["aux_loss"] > 1.0
    assert ours["loss_main"] == pytest.approx(theirs["loss"], rel=1e-5)


def test_a_loss_type_other_than_the_cross_entropy_is_refused(local_causal_lm):
    with pytest.raises(ValueError, match="loss_type='dft'.*set loss_type='nll'"):
        _trainer(local_causal_lm, config=dict(loss_type="dft"))


@pytest.mark.parametrize("mode", ["attention", "drop"])
def test_padding_free_batches_give_the_gradient_of_padded_ones(local_causal_lm, mode):
    """padding_free=True packs the batch's sequences into one row: the main pass runs on it packed, the sub pass on
    the sequences unpacked into a padded batch (the same mask draw as TRL's padded batch of them): the gradient is
    the padded batches'."""
    pairs = _pairs(local_causal_lm)  # prompts of uneven lengths: padding in the padded batches
    pairs = pairs.map(lambda row, i: {"prompt": row["prompt"].replace("the ", "", i % 2)}, with_indices=True)
    grads = []
    for padding_free in (False, True):
        # float32 (TRL's default is bf16 autocast, whose rounding differs between packed and padded shapes)
        config = dict(padding_free=padding_free, max_length=None, bf16=False)
        trainer = _trainer(local_causal_lm, mode, config=config, train_dataset=pairs)
        trainer.add_callback(capture := GradsBeforeStep(trainer.model))
        seen = []
        trainer.model.register_forward_pre_hook(lambda m, a, kw, seen=seen: seen.append(dict(kw)), with_kwargs=True)
        trainer.train()
        grads.append(capture.grads[0])
        main = seen[0]
        assert ("cu_seq_lens_q" in main) == padding_free and (padding_free or (main["attention_mask"] == 0).any())
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("sub", ["mask", "dropout"])
def test_packed_batches_train(local_causal_lm, sub):
    trainer = _trainer(local_causal_lm, sub=sub, ratio=0.5 if sub == "mask" else 0.1, config=dict(packing=True))
    trainer.train()
    assert trainer.state.global_step == 1 and trainer.sub_branch.name == {"mask": "text"}.get(sub, sub)


def test_a_peft_config_trains_the_adapter_with_the_sub_branch(local_causal_lm):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = _trainer(local_causal_lm, peft_config=config, config=dict(learning_rate=1e-2))
    lora = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    trainer.train()
    assert any(not torch.equal(p, lora[n]) for n, p in trainer.model.named_parameters() if n in lora)
    assert all(torch.equal(p, frozen[n]) for n, p in trainer.model.named_parameters() if n in frozen)
    assert trainer.sub_branch is not None and trainer._wrapped.model is trainer.model


def test_readme_sft_example_runs(local_causal_lm, monkeypatch):
    """docs/transformers.md's TRL example as written, its hub model replaced by the fixture's folder and ``data``
    given; on this machine without a GPU, TRL's bf16 default needs use_cpu=True, and 2 steps do."""
    import re
    import textwrap
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "transformers.md").read_text()
    section = text.split("- TRL's supervised fine-tuning", 1)[1]
    code = textwrap.dedent(re.search(r"```python\n(.*?)```", section, re.S).group(1))
    assert '"Qwen/Qwen2.5-0.5B"' in code and 'output_dir="out"' in code
    code = code.replace('"Qwen/Qwen2.5-0.5B"', repr(str(local_causal_lm / "lm")))
    code = code.replace(
        'SFTConfig(output_dir="out")', 'SFTConfig(output_dir="out", max_steps=2, report_to=[], use_cpu=True)'
    )
    monkeypatch.chdir(local_causal_lm)
    scope = {"data": _pairs(local_causal_lm)}
    exec(compile(code, "docs/transformers.md", "exec"), scope)
    trainer = scope["trainer"]
    assert trainer.state.global_step == 2 and trainer.sub_branch.name == "text"


def _vlm_sft(data: str):
    """A tiny LLaVA (CLIP tower, Llama) and its processor, whose ``<image>`` becomes the 4 placeholders of a
    16-pixel image of 8-pixel patches; reviews, each with an image, in the four forms TRL takes them: prompt-completion
    pairs as text (``text``) or as a user's and an assistant's messages (``chat``), and whole conversations
    (``messages``) to model as a language, every token labelled. The processor's chat template writes the messages
    out."""
    import numpy as np
    import transformers
    from PIL import Image
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<s>", "</s>", "<image>", "review", ":", "the", "film", "was", "good", "bad", "verdict"]
    words += ["pos", "neg"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    pixels = transformers.CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    processor = transformers.LlavaProcessor(
        image_processor=pixels,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's class token, which "default" leaves out
    )
    text = transformers.LlamaConfig(
        vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    vision = transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=8
    )
    config = transformers.LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=3, vision_feature_select_strategy="default"
    )
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(config)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):
        opinion = " ".join(["good", "bad"][i % 2] for _ in range(i % 3 + 1))  # prompts of uneven lengths
        image = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
        prompt, completion = f"review : the film was {opinion} verdict :", ["pos", "neg"][i % 2]
        # TRL puts the image first in the user's message: the template writes it as <image>
        messages = [{"role": "user", "content": prompt}], [{"role": "assistant", "content": completion}]
        rows.append({"images": [image]})
        if data == "chat":
            rows[-1].update(prompt=messages[0], completion=messages[1])
        elif data == "text":
            rows[-1].update(prompt=f"<image> {prompt}", completion=f" {completion}")
        else:  # messages, or assistant: the same conversations, the assistant's words alone labelled
            rows[-1].update(messages=messages[0] + messages[1])
    processor.chat_template = (  # the assistant's words marked, as TRL's assistant_only_loss needs them
        "{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'][0]['text'] }}"
        "{% endgeneration %}{% else %}{% for c in m['content'] %}{{ '<image> ' if c['type'] == 'image' else "
        "c['text'] }}{% endfor %}{% endif %}{{ '' if loop.last else ' ' }}{% endfor %}"
    )
    return model, processor, Dataset.from_list(rows)


VLM_CASES = [(data, "attention") for data in ("text", "chat", "messages", "assistant")]
VLM_CASES += [(data, "drop") for data in ("chat", "messages")]


@pytest.mark.parametrize("data, mode", VLM_CASES)
def test_sft_trainer_on_a_vision_language_model_trains_on_its_images(tmp_path, data, mode):
    """TRL's vision-language collator (images; prompt-completion pairs, as text or as messages, or whole
    conversations) and a LLaVA: the images reach both passes, the sub pass hides (or drops) half of each sample's
    words and never an image's placeholder, and the gradient (the vision tower's included) is the labelled next
    tokens' loss (the completion's; every token's, as TRL labels language-modelling data) and its distillation
    worked out by hand (at the kept tokens, where the sub pass drops the others)."""
    model, processor, data_set = _vlm_sft(data)
    config = _config(tmp_path, bf16=False, max_length=None, assistant_only_loss=data == "assistant")
    trainer = MaskSubSFTTrainer(
        model=model, args=config, train_dataset=data_set, processing_class=processor, mask_options={"mode": mode}
    )
    batch, seen, capture = _train_one_step(trainer)
    ids, attention, labels, pixels = (batch[k] for k in ("input_ids", "attention_mask", "labels", "pixel_values"))
    main_kw, sub_kw = seen
    assert torch.equal(main_kw["pixel_values"], pixels) and torch.equal(sub_kw["pixel_values"], pixels)
    assert pixels.shape == (4, 3, 16, 16) and (ids == 3).sum(1).tolist() == [4] * 4  # 4 placeholders a sample
    sub_attention, kept = sub_kw["attention_mask"], attention.bool()
    if mode == "drop":  # the kept tokens at their positions, shorter, every placeholder among them
        assert sub_kw["input_ids"].shape[1] < ids.shape[1] and (sub_kw["input_ids"] == 3).sum(1).tolist() == [4] * 4
        kept = torch.zeros_like(kept).scatter(1, sub_kw["position_ids"], sub_attention.bool())
        sub_attention = attention * kept
    words = (attention == 1) & (ids > 3)
    hidden = words & (sub_attention == 0)
    assert hidden.sum(1).tolist() == masked_counts(words.sum(1), 0.5).tolist()
    assert torch.equal(sub_attention[~words], attention[~words])  # placeholders and padding as given
    model.zero_grad()
    main = model(input_ids=ids, attention_mask=attention, pixel_values=pixels).logits
    sub = model(input_ids=ids, attention_mask=sub_attention, pixel_values=pixels).logits
    target = F.pad(labels[:, 1:], (0, 1), value=-100)
    if data == "messages":  # every token predicts its next one, the placeholders included
        assert torch.equal((target != -100).sum(1), attention.sum(1) - 1)
    else:
        assert (target != -100).sum() == 4  # the verdict alone is labelled
    distilled = (target != -100) & kept  # a dropped word predicts nothing in the sub pass
    per_token = -(F.softmax(main.detach(), -1) * F.log_softmax(sub, -1)).sum(-1)
    loss = 0.5 * F.cross_entropy(main.flatten(0, 1), target.flatten()) + 0.5 * per_token[distilled].mean()
    loss.backward()
    assert capture.grads[0].keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    assert any(n.startswith("model.vision_tower") for n in capture.grads[0])
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(capture.grads[0][n], p.grad, rtol=1e-4, atol=1e-7, msg=n)
