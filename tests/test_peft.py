"""PEFT (LoRA) models: the sub branch works on the base model the PEFT wrapper runs, trains the LoRA
weights through the sub pass, and timm's optimizer helpers and the Trainer see the right names."""

from __future__ import annotations

import pytest
import torch
from conftest import EXPECTED_ADAPTER, kept_length, tiny_images, tiny_model, tiny_text_model
from peft import LoraConfig, PeftModel, get_peft_model
from test_hf import Rows, _args
from test_hf_vision import _tiny_hf_vit
from timm.optim import create_optimizer_v2

import masksub
from masksub.adapters.text_families import transformers_version
from masksub.hf import MaskSubTrainer
from masksub.masking import num_keep

# transformers' ViT and Swin attention projections: renamed in transformers 5
QV = ["q_proj", "v_proj"] if transformers_version() >= (5, 0) else ["query", "value"]


def _lora(model, targets, **kw):
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, **kw))


@pytest.mark.parametrize("name", ["vit", "eva_rope", "naflex", "swin", "beit", "qwen3"])
def test_a_lora_timm_model_gets_its_base_models_adapter(name):
    """Before, a PEFT-wrapped ViT was no VisionTransformer to the adapters: it got the mask-token adapter
    (found through PEFT's attribute forwarding), which keeps every token and saves no compute."""
    base = tiny_model(name)
    wrapped = masksub.wrap(_lora(base, ["qkv"]), ratio=0.5, unit=16).train()
    assert wrapped.branch.name == EXPECTED_ADAPTER[name]
    if wrapped.branch.name in ("vit", "naflexvit", "relpos", "vlm_tower"):  # it drops tokens of the base model
        lengths = []
        getattr(base, "encoder", base).blocks[0].register_forward_pre_hook(lambda m, a: lengths.append(a[0].shape[1]))
        wrapped(tiny_images(name, batch=2), sub=True)
        assert lengths == [base.num_prefix_tokens + num_keep(64, 0.5)]
        assert "patch_drop" not in wrapped.model._modules, "the PEFT wrapper itself is left alone"


def test_a_lora_hf_vit_and_a_lora_text_model_get_their_adapters():
    assert masksub.wrap(_lora(_tiny_hf_vit(), QV)).branch.name == "hf_vit"
    text = _lora(tiny_text_model("bert"), ["query", "value"], task_type="SEQ_CLS")
    assert masksub.wrap(text, special_ids=[0, 1, 2, 3], mask_token_id=3).branch.name == "text"


def test_the_sub_pass_of_a_lora_vit_drops_tokens_and_trains_only_the_lora_weights():
    base = tiny_model("vit")
    wrapped = masksub.wrap(_lora(base, ["qkv"], modules_to_save=["head"]), ratio=0.5).train()
    lengths = []
    base.blocks[0].register_forward_pre_hook(lambda m, a: lengths.append(a[0].shape[1]))
    wrapped(tiny_images("vit", batch=2), sub=True).sum().backward()
    assert lengths == [1 + num_keep(64, 0.5)], "the class token and half of the 64 patch tokens"
    lora_b = [p for n, p in wrapped.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b)

    frozen = {n: p.detach().clone() for n, p in wrapped.named_parameters() if not p.requires_grad}
    trainable = [p for p in wrapped.parameters() if p.requires_grad]
    step = masksub.Step(wrapped, torch.optim.AdamW(trainable, lr=1e-2), torch.nn.CrossEntropyLoss())
    step(tiny_images("vit", batch=4), torch.arange(4) % 5)
    assert all(torch.equal(p, frozen[n]) for n, p in wrapped.named_parameters() if n in frozen)
    assert any(n.startswith("model.base_model.model.blocks.0.attn.qkv.base_layer") for n in frozen)


def test_timm_optimizer_groups_of_a_lora_vit_follow_the_base_models_layers():
    """timm's no-weight-decay names and layer groups are the base model's; the wrapper must prefix them with
    the PEFT wrapper's path, or layer decay puts every LoRA weight in one group at full lr."""
    wrapped = masksub.wrap(_lora(tiny_model("vit"), ["qkv"], modules_to_save=["head"]), ratio=0.5)
    names = dict(wrapped.named_parameters())
    assert {"model.base_model.model.pos_embed", "model.base_model.model.cls_token"} <= wrapped.no_weight_decay()
    assert all(name in names for name in wrapped.no_weight_decay() if "dist_token" not in name and "reg" not in name)

    def scales(model):
        opt = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.5)
        return {id(p): group["lr_scale"] for group in opt.param_groups for p in group["params"]}

    plain_model = tiny_model("vit")
    plain, lora = scales(plain_model), scales(wrapped)
    by_block = {int(n.split(".")[1]): plain[id(p)] for n, p in plain_model.named_parameters() if n[:7] == "blocks."}
    assert by_block[0] < by_block[1], "a two-block ViT has two layer-decay scales"
    for name, param in names.items():
        if "lora_" in name:  # model.base_model.model.blocks.<i>.attn.qkv.lora_A.default.weight
            assert lora[id(param)] == by_block[int(name.split(".")[4])], name
    assert lora[id(names["model.base_model.model.head.modules_to_save.default.weight"])] == 1.0


def test_trainer_on_a_lora_hf_vit_trains_and_saves_the_adapter_only(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = {"pixel_values": torch.rand(8, 3, 32, 32, generator=g), "labels": torch.arange(8) % 3}
    model = _lora(_tiny_hf_vit(), QV, modules_to_save=["classifier"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = _args(tmp_path, learning_rate=1e-2, max_steps=2)
    trainer = MaskSubTrainer(model=model, args=args, train_dataset=Rows(data))
    assert trainer.sub_branch.name == "hf_vit"
    trainer.train()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed and all("lora_" in k or "modules_to_save" in k for k in changed)

    trainer.save_model(str(tmp_path / "final"))
    files = {p.name for p in (tmp_path / "final").iterdir()}
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files
    loaded = PeftModel.from_pretrained(_tiny_hf_vit(), str(tmp_path / "final")).eval()
    x = torch.rand(2, 3, 32, 32, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=x).logits, model.eval()(pixel_values=x).logits)


def test_trainer_on_a_lora_hf_swin_trains_its_mask_token_with_the_lora_weights(tmp_path):
    """The mask token of a Hugging Face Swin sits in the base model, out of PEFT's frozen weights: it trains, and
    PEFT's checkpoints, which hold the adapter only, get it in a file beside them that resuming reads."""
    from safetensors.torch import load_file
    from test_hf_vision import HF_GRID, _hf_grid

    from masksub.hf import ADDED_PARAMETERS_NAME

    def lora_swin():
        return _lora(_hf_grid(*HF_GRID[0]), QV, modules_to_save=["classifier"])

    model = lora_swin()
    data = {"pixel_values": torch.rand(8, 3, 32, 32), "labels": torch.arange(8) % 3}
    args = _args(tmp_path, learning_rate=1e-2, max_steps=2, save_strategy="steps", save_steps=1)
    trainer = MaskSubTrainer(model=model, args=args, train_dataset=Rows(data), mask_options={"unit": 8})
    assert trainer.sub_branch.name == "hf_masktoken"
    token = model.base_model.model.swin.embeddings.mask_token
    before = token.detach().clone()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainer.train()
    assert token.requires_grad and not torch.equal(token, before)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)

    name = "base_model.model.swin.embeddings.mask_token"
    assert "adapter_model.safetensors" in {p.name for p in (tmp_path / "checkpoint-2").iterdir()}
    saved = load_file(tmp_path / "checkpoint-2" / ADDED_PARAMETERS_NAME)
    assert set(saved) == {name}
    torch.testing.assert_close(saved[name], token.detach(), rtol=0, atol=0)
    resumed = lora_swin()
    again = MaskSubTrainer(model=resumed, args=args, train_dataset=Rows(data), mask_options={"unit": 8})
    again.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))  # nothing left to train: loads only
    torch.testing.assert_close(resumed.base_model.model.swin.embeddings.mask_token, token, rtol=0, atol=0)
    other = MaskSubTrainer(model=lora_swin(), args=args, train_dataset=Rows(data), mask_options={"adapter": "pixels"})
    with pytest.raises(ValueError, match="holds the sub branch's parameters .* resume with the model, sub"):
        other.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))


def test_load_best_model_at_end_of_a_lora_hf_swin_loads_its_mask_token_too(tmp_path):
    """The best checkpoint's LoRA weights came back at the end, but the mask token beside them did not: the model
    ended with the last step's token. Now every weight, the token included, is the best step's."""
    from test_hf_vision import HF_GRID, _hf_grid, train_best_first

    model = _lora(_hf_grid(*HF_GRID[0]), QV, modules_to_save=["classifier"])
    data = {"pixel_values": torch.rand(8, 3, 32, 32), "labels": torch.arange(8) % 3}
    keep = train_best_first(tmp_path, model, data, {"unit": 8})
    token = "base_model.model.swin.embeddings.mask_token"
    assert not torch.equal(keep.states[1][token], keep.states[2][token])
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, keep.states[1][name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("kind", ["llama", "mistral", "falcon", "gemma3"])
def test_drop_mode_on_a_lora_decoder_classifier_runs_the_base_model_on_the_kept_tokens(kind):
    """LoRA on a decoder classifier, as text classification is often tuned: the PEFT wrapper passes the kept ids'
    position ids through (Falcon's transformer gets them by a hook; Mistral's sliding layers and those of Gemma 3's
    multimodal classifier's language model, a window shorter than the batch, their window masks), and the logits are
    those of the same tokens hidden by the attention mask."""
    from conftest import dropped_and_hidden, wrap_text
    from test_text import _decoder, _decoder_batch

    targets = ["query_key_value"] if kind == "falcon" else ["q_proj", "v_proj"]
    sliding = kind in ("mistral", "gemma3")
    model = _decoder(kind, **({"sliding_window": 8} if sliding else {}))
    peft = _lora(model, targets, task_type="SEQ_CLS")
    wrapped = wrap_text(peft, mode="drop", ratio=0.5)
    assert bool(wrapped.branch._window_handles) is sliding
    batch = _decoder_batch(left=True)
    got, expected, mask, lengths = dropped_and_hidden(wrapped, peft, batch)
    assert lengths == [kept_length(batch["attention_mask"], mask), 20]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["bert", "deberta-v3", "mpnet"])
def test_drop_mode_on_a_lora_encoder_classifier_drops_after_the_base_models_embeddings(family):
    """LoRA on an encoder classifier (DeBERTa v3 with LoRA is a common way to tune one): the kept tokens leave the
    sequence after the base model's embeddings, DeBERTa's and MPNet's layers get their relative positions, and the
    logits are those of the same tokens hidden by the attention mask."""
    from conftest import text_batch, wrap_text
    from test_text import _drop_family

    targets = {"bert": ["query", "value"], "deberta-v3": ["query_proj", "value_proj"], "mpnet": ["q", "v"]}[family]
    peft = _lora(_drop_family(family), targets, task_type="SEQ_CLS")
    wrapped = wrap_text(peft, mode="drop", ratio=0.5)
    batch = {k: v for k, v in text_batch(batch=6, length=24).items() if k != "labels"}
    lengths = []
    peft.base_model.model.base_model.embeddings.register_forward_hook(lambda m, a, out: lengths.append(out.shape[1]))
    with torch.no_grad():
        torch.manual_seed(5)
        got = wrapped(**batch, sub=True).logits
        torch.manual_seed(5)
        mask = wrapped.branch.token_mask(batch["input_ids"], batch["attention_mask"])
        expected = peft(**{**batch, "attention_mask": batch["attention_mask"].masked_fill(mask, 0)}).logits
    assert lengths == [kept_length(batch["attention_mask"], mask), 24]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["deberta-v3", "llama"])
def test_drop_mode_on_a_lora_token_classifier_tags_the_kept_tokens(family):
    """LoRA on a token classifier (TOKEN_CLS): the PEFT wrapper is a token classifier too, so the kept tokens' logits
    go back to their places, those of the same tokens hidden by the attention mask, and the sub_kept mask marks them."""
    from conftest import dropped_and_hidden, text_batch, wrap_text
    from test_text import _as_token_classifier, _decoder, _decoder_batch, _drop_family

    if family == "llama":
        model, batch, targets = _as_token_classifier(_decoder("llama")), _decoder_batch(left=True), ["q_proj", "v_proj"]
    else:
        batch = {k: v for k, v in text_batch(batch=6, length=24).items() if k != "labels"}
        model, targets = _as_token_classifier(_drop_family(family)), ["query_proj", "value_proj"]
    peft = _lora(model, targets, task_type="TOKEN_CLS")
    wrapped = wrap_text(peft, mode="drop", ratio=0.5)
    assert wrapped.branch.per_token
    got, expected, mask, _ = dropped_and_hidden(wrapped, peft, batch)
    kept = wrapped.sub_kept
    assert torch.equal(kept, batch["attention_mask"].bool() & ~mask) and not got[~kept].any()
    torch.testing.assert_close(got[kept], expected[kept], rtol=1e-4, atol=1e-5)


def test_a_lora_causal_language_model_is_scored_as_its_own_loss_and_drops_tokens():
    """LoRA on a causal language model (CAUSAL_LM), as supervised fine-tuning is commonly run: ``Step`` finds the
    language model inside the PEFT wrapper and shifts its labels (its main loss is the model's own); the drop mode's
    next-token logits at the kept tokens are those of the same tokens hidden by the attention mask."""
    from conftest import dropped_and_hidden, lm_labels, text_batch, tiny_language_model, wrap_text

    from masksub.language import CAUSAL, language_model

    peft = _lora(tiny_language_model("llama"), ["q_proj", "v_proj"], task_type="CAUSAL_LM")
    wrapped = wrap_text(peft, mode="drop", ratio=0.5)
    assert language_model(wrapped)[0] == CAUSAL and wrapped.branch.per_token
    batch = lm_labels(text_batch(batch=4, length=16))
    features = {k: v for k, v in batch.items() if k != "labels"}
    got, expected, mask, _ = dropped_and_hidden(wrapped, peft, features)
    kept = wrapped.sub_kept
    assert torch.equal(kept, batch["attention_mask"].bool() & ~mask) and not got[~kept].any()
    torch.testing.assert_close(got[kept], expected[kept], rtol=1e-4, atol=1e-5)
    step = masksub.Step(wrapped, torch.optim.SGD(wrapped.parameters(), lr=0.0), torch.nn.CrossEntropyLoss())
    with torch.no_grad():
        own = peft(**batch).loss
    torch.testing.assert_close(step(batch)["loss_main"], own, rtol=1e-6, atol=1e-6)
    assert all(p.grad is None or "lora_" in n for n, p in peft.named_parameters())
