"""Hugging Face image classifiers: token dropping (hf_vit), transformers' TimmWrapper, the pixel adapter
through pixel_values=, the Trainer on images, and the Fashion-MNIST example."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
import transformers
from conftest import sub_flop_ratio
from test_hf import Rows, _args, _load_example

import masksub
from masksub.hf import MaskSubTrainer

TINY_VIT = dict(
    image_size=32,
    patch_size=4,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    num_labels=3,
)
# Hugging Face ViT-like classifiers and their prefix tokens (class, distillation, registers)
HF_VITS = [
    ("ViTForImageClassification", "ViTConfig", {}, 1),
    ("DeiTForImageClassificationWithTeacher", "DeiTConfig", {}, 2),
    ("Dinov2ForImageClassification", "Dinov2Config", {}, 1),
    ("Dinov2WithRegistersForImageClassification", "Dinov2WithRegistersConfig", {"num_register_tokens": 4}, 5),
    ("ViTMSNForImageClassification", "ViTMSNConfig", {}, 1),
    ("IJepaForImageClassification", "IJepaConfig", {}, 0),
    ("CLIPForImageClassification", "CLIPConfig", "vision", 1),
    ("MetaClip2ForImageClassification", "MetaClip2Config", "vision", 1),
    ("SiglipForImageClassification", "SiglipConfig", "vision", 0),
]


def _hf_vision(name, config, extra):
    if not hasattr(transformers, name):
        pytest.skip(f"transformers {transformers.__version__} has no {name}")
    torch.manual_seed(0)
    if extra == "vision":  # a two-tower configuration: the classifier uses its vision tower
        labels = {"num_labels": TINY_VIT["num_labels"]}
        vision = {k: v for k, v in TINY_VIT.items() if k != "num_labels"}
        config = getattr(transformers, config)(vision_config=vision, text_config={"hidden_size": 32}, **labels)
    else:
        config = getattr(transformers, config)(**TINY_VIT, **extra)
    return getattr(transformers, name)(config).train()


def _tiny_hf_vit():
    return _hf_vision(*HF_VITS[0][:3])


def test_pixel_adapter_masks_pixel_values_passed_by_name():
    """A Hugging Face vision model takes pixel_values=: exactly num_masked 8-pixel blocks per image are zeroed."""
    from masksub import num_masked

    model = _tiny_hf_vit()
    seen = []
    model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["pixel_values"]), with_kwargs=True)
    wrapped = masksub.wrap(model, ratio=0.5, unit=8, adapter="pixels")
    x = torch.rand(4, 3, 32, 32) + 0.5
    wrapped(pixel_values=x, sub=True)
    zero = (seen[-1] == 0).all(1)  # (B, H, W)
    blocks = zero.view(4, 4, 8, 4, 8).permute(0, 1, 3, 2, 4).reshape(4, 16, 64)
    assert (blocks.all(-1) | ~blocks.any(-1)).all(), "whole 8-pixel blocks"
    assert (blocks.all(-1).sum(1) == num_masked(16, 0.5)).all()
    kept = ~zero.unsqueeze(1).expand_as(x)
    assert torch.equal(seen[-1][kept], x[kept])


def test_trainer_on_a_vision_model_needs_no_tokenizer(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = {"pixel_values": torch.rand(8, 3, 32, 32, generator=g), "labels": torch.arange(8) % 3}
    model = _tiny_hf_vit()
    trainer = MaskSubTrainer(model=model, args=_args(tmp_path, learning_rate=1e-3), train_dataset=Rows(data))
    assert trainer.sub_branch.name == "hf_vit"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.train()
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name,config,extra,prefix", HF_VITS, ids=[c[0] for c in HF_VITS])
def test_hf_vit_adapter_keeps_prefix_and_exactly_num_keep_real_patch_tokens(name, config, extra, prefix):
    from masksub.masking import num_keep

    model = _hf_vision(name, config, extra)
    plain = copy.deepcopy(model)
    seen = []  # the embeddings' output as the encoder gets it: registered after the adapter's hook
    wrapped = masksub.wrap(model, ratio=0.5)
    assert wrapped.branch.name == "hf_vit" and wrapped.branch.num_prefix_tokens == prefix
    embeddings = next(
        m
        for m in model.modules()
        if type(m).__name__.endswith("Embeddings")
        and "Text" not in type(m).__name__
        and "Patch" not in type(m).__name__
    )
    embeddings.register_forward_hook(lambda m, a, out: seen.append(out.detach()))
    x = torch.rand(4, 3, 32, 32)
    torch.testing.assert_close(wrapped(pixel_values=x).logits, plain(pixel_values=x).logits, rtol=0, atol=0)
    full = seen[-1]
    for ratio in (0.1, 0.25, 0.5, 0.75, 0.9):
        wrapped.branch.ratio = ratio
        wrapped(pixel_values=x, sub=True)
        sub = seen[-1]
        assert sub.shape == (4, prefix + num_keep(64, ratio), 32)
        assert torch.equal(sub[:, :prefix], full[:, :prefix])
        # every kept token is one of its image's patch tokens, each at most once
        match = (sub[:, prefix:, None, :] == full[:, None, prefix:, :]).all(-1)  # (B, K, N)
        assert (match.sum(-1) == 1).all() and (match.sum(1) <= 1).all()


def test_hf_vit_sub_pass_costs_about_half_at_ratio_half():
    wrapped = masksub.wrap(_hf_vision(*HF_VITS[0][:3]), ratio=0.5)
    x = torch.rand(4, 3, 32, 32)
    assert 0.45 < sub_flop_ratio(wrapped, {"pixel_values": x}) < 0.6  # 32 of 64 patches; the embedding sees all


def test_hf_vision_models_get_their_familys_adapter_and_one_that_reads_the_grid_back_masks_pixels():
    torch.manual_seed(0)
    beit = transformers.BeitForImageClassification(transformers.BeitConfig(**TINY_VIT, use_relative_position_bias=True))
    assert masksub.wrap(beit, unit=8).branch.name == "hf_relpos"  # drops tokens, gathers the relative bias
    mim = transformers.ViTForMaskedImageModeling(transformers.ViTConfig(**TINY_VIT))  # reads the token grid back
    assert masksub.wrap(mim, unit=8).branch.name == "pixels"
    # A token-dropping adapter ignores the block size (the argument of a loop over many models) and says what it drops.
    vit = masksub.wrap(_hf_vision(*HF_VITS[0][:3]), unit=8).branch
    assert (vit.name, vit.unit, vit.masked_unit()) == ("hf_vit", None, "4x4-pixel patch tokens")


TINY_SWIN = dict(
    image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4, num_labels=3
)
# Hugging Face classifiers whose embeddings have a mask-token slot (bool_masked_pos) and whose blocks need the grid
HF_GRID = [
    ("SwinForImageClassification", "SwinConfig", TINY_SWIN),
    ("Swinv2ForImageClassification", "Swinv2Config", TINY_SWIN),
    ("BeitForImageClassification", "BeitConfig", {**TINY_VIT, "use_relative_position_bias": True}),
    ("Data2VecVisionForImageClassification", "Data2VecVisionConfig", TINY_VIT),
    ("FocalNetForImageClassification", "FocalNetConfig", {**TINY_SWIN, "depths": [1, 1], "num_heads": None}),
]


def _hf_grid(name, config, kw):
    torch.manual_seed(0)
    kw = {k: v for k, v in kw.items() if v is not None}
    return getattr(transformers, name)(getattr(transformers, config)(**kw)).train()


@pytest.mark.parametrize("name,config,kw", HF_GRID, ids=[c[0] for c in HF_GRID])
def test_hf_mask_token_masks_exactly_num_masked_blocks_which_carry_nothing_of_the_image(name, config, kw):
    """The embeddings get bool_masked_pos of whole 8-pixel blocks (2x2 tokens), exactly num_masked of the 16 per
    image at every ratio; a masked token's embedding is the same for any image (the mask token, plus the
    position embedding), a kept one is the image's; eval is the plain model; unwrap leaves the plain state dict."""
    from masksub.masking import num_masked

    model = _hf_grid(name, config, kw)
    plain = copy.deepcopy(model)
    wrapped = masksub.wrap(model, ratio=0.5, unit=8, adapter="hf_masktoken")  # BEiT's own choice: hf_relpos
    branch, embeddings = wrapped.branch, wrapped.branch._embed_ref[0]
    assert branch.name == "hf_masktoken" and branch.masked_unit() == "8x8-pixel blocks"
    base = name.removesuffix("ForImageClassification").lower().replace("data2vecvision", "data2vec_vision")
    assert set(model.state_dict()) - set(plain.state_dict()) == {f"{base}.embeddings.mask_token"}
    assert list(wrapped.named_added_parameters()) == [f"{base}.embeddings.mask_token"]
    masks, outs = [], []

    def record(module, args, kwargs, out):
        masks.append(kwargs.get("bool_masked_pos"))
        outs.append(out[0] if isinstance(out, tuple) else out)

    embeddings.register_forward_hook(record, with_kwargs=True)
    x, other = torch.rand(2, 4, 3, 32, 32)
    model.eval(), plain.eval()  # no dropout: outputs compare exactly
    torch.testing.assert_close(wrapped(pixel_values=x).logits, plain(pixel_values=x).logits, rtol=0, atol=0)
    assert masks[-1] is None
    for ratio in (0.1, 0.25, 0.5, 0.75, 0.9):
        wrapped.ratio = ratio
        torch.manual_seed(1)
        wrapped(pixel_values=x, sub=True)
        torch.manual_seed(1)
        wrapped(pixel_values=other, sub=True)
        mask = masks[-1]
        assert torch.equal(mask, masks[-2]) and mask.shape == (4, 64)
        blocks = mask.view(4, 4, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(4, 16, 4)
        assert (blocks.all(-1) | ~blocks.any(-1)).all(), "whole 8-pixel blocks"
        assert (blocks.all(-1).sum(1) == num_masked(16, ratio)).all()
        a, b = (out[:, -64:] for out in outs[-2:])  # the patch tokens (BEiT's class token comes first)
        assert torch.equal(a[mask], b[mask]) and not torch.isclose(a[~mask], b[~mask]).all(-1).any()
    assert wrapped(pixel_values=x, sub=True).logits.shape == (4, 3)
    wrapped.unwrap()
    assert set(model.state_dict()) == set(plain.state_dict())
    getattr(transformers, name)(model.config).load_state_dict(model.state_dict(), strict=True)


def test_hf_mask_token_trains_in_step_which_refuses_an_optimizer_made_before_wrap():
    import timm.optim

    model = _hf_grid(*HF_GRID[0])
    early = torch.optim.SGD(model.parameters(), lr=0.1)
    wrapped = masksub.wrap(model, unit=8)
    with pytest.raises(ValueError, match=r"\['model.swin.embeddings.mask_token'\].*after wrap"):
        masksub.Step(wrapped, early, torch.nn.CrossEntropyLoss())
    token = model.swin.embeddings.mask_token
    before = token.detach().clone()
    step = masksub.Step(wrapped, torch.optim.SGD(wrapped.parameters(), lr=0.1), torch.nn.CrossEntropyLoss())
    step({"pixel_values": torch.rand(2, 3, 32, 32), "labels": torch.tensor([0, 2])})
    assert not torch.equal(token, before)
    with pytest.raises(ValueError, match="holds 1 mask unit of 32 pixels"):  # the default unit on 32-pixel images
        masksub.wrap(_hf_grid(*HF_GRID[2]), adapter="hf_masktoken")(pixel_values=torch.rand(1, 3, 32, 32), sub=True)
    # timm's optimizer factory keeps the token out of weight decay, as it keeps timm's 1-D mask tokens
    groups = timm.optim.create_optimizer_v2(wrapped, "adamw", weight_decay=0.05).param_groups
    assert [g["weight_decay"] for g in groups if any(p is token for p in g["params"])] == [0.0]


TIMM_SWIN = dict(img_size=32, depths=(1, 1), num_heads=(1, 2), embed_dim=16, window_size=4)
# Swin classifiers whose sub branch puts its mask token into the model: how to build one, the token's name there
TOKEN_SWINS = {
    "hf-swin": (lambda: _hf_grid(*HF_GRID[0]), "swin.embeddings.mask_token"),  # the embeddings' own slot
    "timm-wrapper-swin": (lambda: _timm_wrapper("swin_tiny_patch4_window7_224", **TIMM_SWIN), "timm_model.mask_token"),
}


class KeepStates(transformers.TrainerCallback):
    """The model's weights after each optimizer step."""

    def __init__(self, model):
        self.model, self.states = model, {}

    def on_step_end(self, args, state, control, **kwargs):
        self.states[state.global_step] = {k: v.detach().clone() for k, v in self.model.state_dict().items()}


def train_best_first(tmp_path, model, data, options) -> KeepStates:
    """Two steps of ``MaskSubTrainer`` with a checkpoint and an evaluation after each, the first the best, and
    ``load_best_model_at_end``: the model ends with checkpoint-1 loaded. The weights after each step."""
    scores = iter([1.0, 0.0])
    args = _args(
        tmp_path,
        learning_rate=1e-2,
        max_steps=2,
        save_strategy="steps",
        save_steps=1,
        eval_strategy="steps",
        eval_steps=1,
        load_best_model_at_end=True,
        metric_for_best_model="score",
        label_names=["labels"],  # transformers 4 finds none behind a PEFT wrapper, and evaluates no metrics
    )
    keep = KeepStates(model)
    trainer = MaskSubTrainer(
        model=model,
        args=args,
        train_dataset=Rows(data),
        eval_dataset=Rows(data),
        compute_metrics=lambda _: {"score": next(scores)},
        callbacks=[keep],
        mask_options=options,
    )
    trainer.train()
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-1")
    return keep


# models whose checkpoints transformers 5 writes under older weight names, with their sub branch's mask options
RENAMED = {
    "vit": (_tiny_hf_vit, {}),  # 32 of its 40 tensors renamed (transformers 5.25.0)
    "swin": (TOKEN_SWINS["hf-swin"][0], {"unit": 8}),  # 26 of 45, and the mask token under its own name
    "beit": (lambda: _hf_grid(*HF_GRID[2]), {}),  # 36 of 43
}


@pytest.mark.parametrize("kind", RENAMED)
def test_trainer_resumes_and_loads_the_best_model_with_every_weight(tmp_path, kind):
    """transformers 5 writes a ViT's, Swin's or BEiT's checkpoint under older weight names
    (``attention.self.query``); the Trainer's resume and ``load_best_model_at_end`` load it as it is, and left every
    renamed weight as it was. Both now restore every weight (a Swin's mask token too) bit for bit."""
    data = {"pixel_values": torch.rand(8, 3, 32, 32), "labels": torch.arange(8) % 3}
    build, options = RENAMED[kind]
    model = build()
    keep = train_best_first(tmp_path, model, data, options)
    after = model.state_dict()
    assert not all(torch.equal(after[k], keep.states[2][k]) for k in after), "steps 1 and 2 differ"
    for name, tensor in keep.states[1].items():
        torch.testing.assert_close(after[name], tensor, rtol=0, atol=0, msg=f"best model: {name}")

    resumed = build()
    args = _args(tmp_path, learning_rate=1e-2, max_steps=2)
    MaskSubTrainer(model=resumed, args=args, train_dataset=Rows(data), mask_options=options).train(
        resume_from_checkpoint=str(tmp_path / "checkpoint-2")
    )
    for name, tensor in resumed.state_dict().items():
        torch.testing.assert_close(tensor, keep.states[2][name], rtol=0, atol=0, msg=f"resumed: {name}")


@pytest.mark.parametrize("kind", TOKEN_SWINS)
def test_trainer_holds_the_mask_token_out_of_weight_decay_and_checkpoints_it(tmp_path, kind):
    """The Trainer's optimizer trains the token (no weight decay), its checkpoint holds it, resuming restores it;
    a model_init model gets it before the optimizer is made."""
    from safetensors.torch import load_file

    build, name = TOKEN_SWINS[kind]
    data = {"pixel_values": torch.rand(8, 3, 32, 32), "labels": torch.arange(8) % 3}
    args = _args(tmp_path, learning_rate=1e-2, weight_decay=0.1, max_steps=2, save_strategy="steps", save_steps=1)
    model = build()
    trainer = MaskSubTrainer(model=model, args=args, train_dataset=Rows(data), mask_options={"unit": 8})
    token = model.get_parameter(name)
    before = token.detach().clone()
    trainer.train()
    assert not torch.equal(token, before)
    decay = {id(p): g["weight_decay"] for g in trainer.optimizer.param_groups for p in g["params"]}
    assert decay[id(token)] == 0.0 and 0.1 in decay.values()
    saved = load_file(tmp_path / "checkpoint-1" / "model.safetensors")
    assert name in saved and not torch.equal(saved[name], before)
    resumed = build()
    again = MaskSubTrainer(model=resumed, args=args, train_dataset=Rows(data), mask_options={"unit": 8})
    again.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    torch.testing.assert_close(resumed.get_parameter(name), token, rtol=0, atol=0)

    built = []
    init = MaskSubTrainer(
        model_init=lambda: built.append(build()) or built[-1],
        args=_args(tmp_path / "init", learning_rate=1e-2, max_steps=1),
        train_dataset=Rows(data),
        mask_options={"unit": 8},
    )
    init.train()
    token = built[-1].get_parameter(name)
    state = getattr(init.optimizer, "optimizer", init.optimizer).state[token]  # AdamW's: stepped with a gradient
    assert state["exp_avg"].abs().sum() > 0
    with pytest.raises(AttributeError):  # unwrapped: the first model is plain again
        built[0].get_parameter(name)
    assert name not in built[0].state_dict()


@pytest.mark.parametrize(
    "name, config, kw",
    [
        ("BeitForImageClassification", "BeitConfig", TINY_VIT),
        ("ConvNextForImageClassification", "ConvNextConfig", dict(hidden_sizes=[8, 16], depths=[1, 2], num_stages=2)),
    ],
)
def test_pathsub_raises_the_model_own_drop_path_layers_and_restores_them(name, config, kw):
    """Built with drop_path_rate > 0, these models hold their own *DropPath layers (rates rising from 0 by depth):
    every one of them takes the sub branch's rate in the sub pass, not only the rate-0 ones (Identity)."""
    torch.manual_seed(0)
    model = getattr(transformers, name)(getattr(transformers, config)(**{**kw, "drop_path_rate": 0.2})).train()
    layers = [m for n, m in model.named_modules() if n.endswith("drop_path")]
    built = [getattr(m, "drop_prob", None) for m in layers]  # None: an Identity where the rate is 0
    assert any(rate for rate in built if rate) and None in built
    wrapped = masksub.wrap(model, "droppath", 0.5)
    seen = {}
    for site, _ in wrapped.branch._sites:
        site.register_forward_pre_hook(lambda m, args: seen.setdefault(id(m), set()).add(m.drop_prob))
    wrapped(torch.randn(2, 3, 32, 32), sub=True)
    now = [m for n, m in model.named_modules() if n.endswith("drop_path")]  # the Identity ones replaced
    assert seen == {id(m): {0.5} for m in now}
    assert [m.drop_prob for n, m in model.named_modules() if n.endswith("drop_path")] == [r or 0.0 for r in built]


def test_dropsub_raises_the_attention_rate_data2vec_vision_reads_from_its_configuration():
    torch.manual_seed(0)
    config = transformers.Data2VecVisionConfig(**TINY_VIT, attn_implementation="sdpa")
    model = transformers.Data2VecVisionForImageClassification(config).train()
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(m.config.attention_probs_dropout_prob))
    wrapped = masksub.wrap(model, "dropout", 0.5)
    wrapped(torch.randn(2, 3, 32, 32), sub=True)
    wrapped(torch.randn(2, 3, 32, 32))
    assert seen == [0.5, 0.0] and config.attention_probs_dropout_prob == 0.0


def timm_wrapper_takes_model_args() -> bool:
    return "model_args" in inspect.signature(transformers.TimmWrapperConfig.__init__).parameters


def _timm_wrapper(architecture, **model_args):
    torch.manual_seed(0)
    if model_args and not timm_wrapper_takes_model_args():
        pytest.skip(f"transformers {transformers.__version__}'s TimmWrapper ignores model_args (a tiny model)")
    config = transformers.TimmWrapperConfig(architecture=architecture, model_args=model_args, num_labels=3)
    return transformers.TimmWrapperForImageClassification(config).train()


def test_timm_wrapper_masks_with_the_adapter_of_the_timm_model_inside():
    """timm checkpoints loaded through transformers: token dropping for a ViT, exact counts at every ratio."""
    from masksub.masking import num_keep

    model = _timm_wrapper("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=2, embed_dim=32, num_heads=2)
    plain = copy.deepcopy(model)
    wrapped = masksub.wrap(model)
    assert wrapped.branch.name == "timm_wrapper" and wrapped.branch.inner.name == "vit"
    lengths = []
    model.timm_model.blocks[0].register_forward_pre_hook(lambda m, a: lengths.append(a[0].shape[1]))
    x = torch.rand(4, 3, 32, 32)
    torch.testing.assert_close(wrapped(pixel_values=x).logits, plain(pixel_values=x).logits, rtol=0, atol=0)
    for ratio in (0.1, 0.5, 0.9):
        wrapped.branch.ratio = ratio
        assert wrapped(pixel_values=x, sub=True).logits.shape == (4, 3)
        assert lengths[-1] == 1 + num_keep(64, ratio)
    assert lengths[0] == 65
    assert masksub.wrap(_timm_wrapper("resnet18")).branch.inner.name == "pixels"


def test_timm_wrapper_mask_token_is_a_parameter_of_the_wrapper_model_and_leaves_it_at_unwrap(tmp_path):
    """A timm Swin inside transformers' TimmWrapper: its timm mask token is put into the transformers model, as
    ``timm_model.mask_token`` (as hf_masktoken puts a Swin's into its slot): what trains that model holds it
    (the Trainer: above). ``unwrap()`` leaves a timm state dict."""
    import timm

    model = _timm_wrapper("swin_tiny_patch4_window7_224", **TIMM_SWIN)
    plain = copy.deepcopy(model)
    early = torch.optim.SGD(model.parameters(), lr=0.1)
    wrapped = masksub.wrap(model, unit=8)
    assert wrapped.branch.inner.name == "masktoken" and not list(wrapped.branch.parameters())
    token = model.timm_model.mask_token
    assert wrapped.named_added_parameters() == {"timm_model.mask_token": token}
    with pytest.raises(ValueError, match=r"\['model.timm_model.mask_token'\].*after wrap"):
        masksub.Step(wrapped, early, torch.nn.CrossEntropyLoss())
    before = token.detach().clone()
    step = masksub.Step(wrapped, torch.optim.SGD(wrapped.parameters(), lr=0.1), torch.nn.CrossEntropyLoss())
    step({"pixel_values": torch.rand(2, 3, 32, 32), "labels": torch.tensor([0, 2])})
    assert not torch.equal(token, before)
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(wrapped.eval()(pixel_values=x).logits, wrapped.model(pixel_values=x).logits)
    wrapped.unwrap()
    assert not hasattr(model.timm_model, "mask_token") and set(model.state_dict()) == set(plain.state_dict())
    timm.create_model("swin_tiny_patch4_window7_224", num_classes=3, **TIMM_SWIN).load_state_dict(
        model.timm_model.state_dict(), strict=True
    )
    # a branch that keeps its token (a timm Swin given as it is) is refused: the Trainer's optimizer would miss it
    with pytest.raises(ValueError, match="sub branch has parameters .* use masksub.Step.*'adapter': 'pixels'"):
        MaskSubTrainer(model=model.timm_model, args=_args(tmp_path), mask_options={"unit": 8})


def test_a_timm_wrapper_swin_drops_units_with_swin_drop_asked_for_by_name(tmp_path):
    """``adapter="swin_drop"`` masks the timm Swin inside as a backbone, called through the wrapper (its images by
    position or as ``pixel_values``), also in the Trainer; the timm model's own adapter asked for by name is the
    wrapper's (its token placed in the transformers model)."""
    model = _timm_wrapper("swin_tiny_patch4_window7_224", **TIMM_SWIN)
    plain = copy.deepcopy(model)
    wrapped = masksub.wrap(model, unit=16, adapter="swin_drop")
    assert wrapped.branch.name == "swin_drop" and wrapped.branch.target_name == "timm_model"
    lengths = []
    model.timm_model.layers[1].blocks[0].register_forward_pre_hook(lambda m, a: lengths.append(a[0].shape[1:-1]))
    x = torch.rand(4, 3, 32, 32)
    torch.manual_seed(0)
    by_keyword = wrapped(pixel_values=x, sub=True).logits
    torch.manual_seed(0)
    torch.testing.assert_close(wrapped(x, sub=True).logits, by_keyword, rtol=0, atol=0)
    assert lengths == [(8,), (8,)]  # 2 of 4 units (16 px) kept: 2x2 tokens each in the second stage's 4x4 grid
    torch.testing.assert_close(wrapped(pixel_values=x).logits, plain(pixel_values=x).logits, rtol=0, atol=0)
    masked = masksub.wrap(_timm_wrapper("swin_tiny_patch4_window7_224", **TIMM_SWIN), unit=16, adapter="masktoken")
    assert masked.branch.name == "timm_wrapper" and masked.branch.inner.name == "masktoken"

    data = {"pixel_values": torch.rand(8, 3, 32, 32), "labels": torch.arange(8) % 3}
    options = {"adapter": "swin_drop", "unit": 16}
    args = _args(tmp_path, learning_rate=1e-3)
    trainer = MaskSubTrainer(model=plain, args=args, train_dataset=Rows(data), mask_options=options)
    assert trainer.sub_branch.name == "swin_drop"
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    trainer.train()
    assert any(not torch.equal(before[k], v) for k, v in plain.state_dict().items())


def test_trainer_on_a_timm_wrapper_vit(tmp_path):
    model = _timm_wrapper("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=2, embed_dim=32, num_heads=2)
    data = {"pixel_values": torch.rand(8, 3, 32, 32), "labels": torch.arange(8) % 3}
    trainer = MaskSubTrainer(model=model, args=_args(tmp_path, learning_rate=1e-3), train_dataset=Rows(data))
    assert trainer.sub_branch.name == "timm_wrapper"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.train()
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("sub", ["mask", "none"])
def test_image_classification_example_runs_on_fashion_mnist(tmp_path, sub):
    argv = ["--train-images", "256", "--test-images", "128", "--max-steps", "2", "--batch-size", "64"]
    summary = _load_example("image_classification_hf").main([*argv, "--sub", sub, "--out", str(tmp_path / sub)])
    assert summary["adapter"] == ("hf_vit" if sub == "mask" else None)
    assert 0.0 <= summary["eval_accuracy"] <= 1.0 and summary["eval_loss"] > 0
    saved = transformers.AutoModelForImageClassification.from_pretrained(tmp_path / sub / "model")
    assert saved.config.id2label[9] == "Ankle boot"


def test_image_classification_example_resizes_for_a_local_checkpoint(tmp_path):
    """--model: a saved three-channel 32 px ViT gets the images resized and repeated to its channels."""
    transformers.ViTForImageClassification(transformers.ViTConfig(**TINY_VIT)).save_pretrained(tmp_path / "vit")
    example = _load_example("image_classification_hf")
    data = example.FashionMNIST("test", None, 4, channels=3, size=32)
    assert data[0]["pixel_values"].shape == (3, 32, 32)
    argv = ["--model", str(tmp_path / "vit"), "--image-size", "32", "--train-images", "64", "--test-images", "32"]
    summary = example.main([*argv, "--max-steps", "1", "--out", str(tmp_path / "run")])
    assert summary["adapter"] == "hf_vit" and 0.0 <= summary["eval_accuracy"] <= 1.0
    # a Swin at 32 px: one 32-pixel block per image, which masks nothing and is refused; --unit 8 masks 8-pixel blocks
    _hf_grid(*HF_GRID[0]).save_pretrained(tmp_path / "swin")
    argv = [*argv[2:], "--model", str(tmp_path / "swin"), "--max-steps", "1", "--out", str(tmp_path / "swin_run")]
    with pytest.raises(ValueError, match="holds 1 mask unit of 32 pixels"):
        example.main(argv)
    summary = example.main([*argv, "--unit", "8"])
    assert summary["adapter"] == "hf_masktoken" and 0.0 <= summary["eval_accuracy"] <= 1.0


@pytest.mark.skipif(torch.__version__ < (2, 6), reason="dynamo before torch 2.6 breaks graphs at transformers' outputs")
def test_hf_vit_under_torch_compile_two_graphs_and_the_sub_pass_drops_tokens():
    from torch._dynamo.utils import counters

    counters.clear()
    torch._dynamo.reset()
    torch.manual_seed(0)
    config = transformers.ViTConfig(**TINY_VIT, initializer_range=0.5)  # an output that moves with the input
    wrapped = masksub.wrap(transformers.ViTForImageClassification(config).train())
    eager = copy.deepcopy(wrapped)
    wrapped.compile(backend="aot_eager", fullgraph=True)  # fullgraph: any graph break raises
    x = torch.rand(4, 3, 32, 32)
    for _ in range(3):
        wrapped(pixel_values=x).logits.sum().backward()
        wrapped(pixel_values=x, sub=True).logits.sum().backward()
    assert counters["stats"]["unique_graphs"] == 2
    torch.manual_seed(3)
    got = wrapped(pixel_values=x, sub=True).logits
    torch.manual_seed(3)
    torch.testing.assert_close(got, eager(pixel_values=x, sub=True).logits)
    assert not torch.allclose(got, wrapped(pixel_values=x).logits, atol=1e-2)


def _dinov3(**kw) -> torch.nn.Module:
    if not hasattr(transformers, "DINOv3ViTModel"):
        pytest.skip(f"transformers {transformers.__version__} has no DINOv3ViTModel")
    settings = {k: v for k, v in TINY_VIT.items() if k != "num_labels"}
    config = transformers.DINOv3ViTConfig(**{**settings, "num_register_tokens": 2, **kw})
    torch.manual_seed(0)
    return transformers.DINOv3ViTModel(config)


class _Head(torch.nn.Module):
    """A classifier of the user's on DINOv3's pooled class token (DINOv3 has no classifier of its own)."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone, self.head = backbone, torch.nn.Linear(32, 3)

    def forward(self, pixel_values):
        return self.head(self.backbone(pixel_values=pixel_values).pooler_output)


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_dinov3_drops_patch_tokens_with_their_rope_angles(ratio):
    """DINOv3 under a head of the user's: the sub pass keeps the class and register tokens and num_keep patch
    tokens, each rotated by its own patch's RoPE angles: float64, the same output as the whole model whose
    attention hides the dropped patches from every query (an additive key mask)."""
    from masksub.masking import num_keep

    model = _Head(_dinov3()).double().eval()
    wrapped = masksub.wrap(model)
    assert wrapped.branch.name == "hf_vit" and wrapped.branch.target_name == "backbone"
    wrapped.branch.ratio = ratio
    layer_inputs = []
    model.backbone.model.layer[0].register_forward_pre_hook(lambda m, a: layer_inputs.append(a[0]))
    x = torch.rand(3, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        out = wrapped(pixel_values=x, sub=True)
        full, sub = model.backbone.embeddings(x), layer_inputs[0]  # every token, then the kept ones
        assert sub.shape == (3, 3 + num_keep(64, ratio), 32)
        assert torch.equal(sub[:, :3], full[:, :3]), "the class and register tokens stay"
        match = (sub[:, 3:].unsqueeze(2) == full[:, 3:].unsqueeze(1)).all(-1)  # (B, K, N)
        assert (match.sum(-1) == 1).all()
        hidden = torch.ones(3, 67, dtype=torch.bool)
        hidden[:, :3] = False
        hidden[:, 3:] = ~match.any(1)
        mask = torch.zeros(3, 1, 67, 67, dtype=torch.float64).masked_fill(hidden[:, None, None, :], -1e300)
        expected = model.head(model.backbone(pixel_values=x, attention_mask=mask).pooler_output)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
        assert torch.equal(wrapped(pixel_values=x), model(x)), "the main pass is the plain model's"


def test_dinov3_sub_pass_in_training_mode_costs_about_half_and_reaches_every_layer():
    """In training mode (where DINOv3's RoPE rescales its patch coordinates at random, as configured here): the sub
    pass costs about half the main pass in FLOPs, and its gradients reach every layer's weights."""
    wrapped = masksub.wrap(_Head(_dinov3(pos_embed_rescale=2.0)).train())
    assert 0.45 < sub_flop_ratio(wrapped, torch.rand(2, 3, 32, 32)) < 0.6
    wrapped(pixel_values=torch.rand(2, 3, 32, 32), sub=True).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in wrapped.model.backbone.model.parameters())


@pytest.mark.parametrize("native", [False, True], ids=["learned positions", "sincos positions"])
def test_aimv2_vision_tower_under_a_head_drops_patch_tokens_whose_pixels_then_do_not_count(native):
    """AIMv2's vision tower (attention pooling, no prefix token) under a head of the user's: num_keep patch tokens
    reach its layers; new pixels in the dropped patches leave the sub pass unchanged, in the kept ones change it."""
    from conftest import check_dropped_patch_pixels

    from masksub.masking import num_keep

    if not hasattr(transformers, "Aimv2VisionModel"):
        pytest.skip(f"transformers {transformers.__version__} has no Aimv2VisionModel")
    settings = {k: v for k, v in TINY_VIT.items() if k != "num_labels"}
    config = transformers.Aimv2VisionConfig(**settings, is_native=native, use_head=True)
    torch.manual_seed(0)
    model = _Head(transformers.Aimv2VisionModel(config)).train()
    wrapped = masksub.wrap(model)
    assert wrapped.branch.name == "hf_vit" and wrapped.branch.num_prefix_tokens == 0
    lengths = []
    model.backbone.encoder.layers[0].register_forward_pre_hook(lambda m, a: lengths.append(a[0].shape[1]))
    x = torch.rand(2, 3, 32, 32) + 0.5
    with torch.no_grad():
        torch.manual_seed(3)
        out = wrapped(x, sub=True)
        assert lengths == [num_keep(64, 0.5)]
        full = model.backbone.embeddings(x)
        seen = []
        handle = model.backbone.encoder.layers[0].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
        torch.manual_seed(3)
        wrapped(x, sub=True)
        handle.remove()
        keep = (seen[0].unsqueeze(2) == full.unsqueeze(1)).all(-1).int().argmax(-1)  # (B, K) patch of each token
        check_dropped_patch_pixels(wrapped, x, out, keep)
