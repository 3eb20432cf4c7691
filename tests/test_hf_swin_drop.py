"""Hugging Face's Swin and Swinv2 with ``adapter="hf_swin_drop"``: the sub pass is the model, each window on its kept
tokens."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from conftest import compiled_graphs, sub_flop_ratio
from swin_common import (
    UNIT,
    assert_backbone_masked,
    assert_same_grads,
    check_dropped_units_unseen,
    copies_masking_alike,
    spread_logit_scales,
    step_gradients,
    sub_pass,
)
from swin_common import images as _images
from swin_common import present as _present
from torch import nn

import masksub
from masksub.masking import num_keep

transformers = pytest.importorskip("transformers")
from transformers.models.swin import modeling_swin  # noqa: E402

pytestmark = pytest.mark.skipif(
    not hasattr(modeling_swin, "SwinRelativePositionBias"), reason="a transformers release with another Swin layout"
)
CLASSES = {
    "swin": ("SwinConfig", "SwinForImageClassification"),
    "swinv2": ("Swinv2Config", "Swinv2ForImageClassification"),
    "donut": ("DonutSwinConfig", "DonutSwinForImageClassification"),
}


@pytest.fixture(params=sorted(CLASSES))
def family(request) -> str:
    return request.param


def _swin(family: str = "swin", seed: int = 0, attn: str = "eager", **kw) -> nn.Module:
    torch.manual_seed(seed)
    settings = dict(image_size=64, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[1, 2], window_size=4)
    config, model = (getattr(transformers, name) for name in CLASSES[family])
    return model(config(**{**settings, "num_labels": 5, "drop_path_rate": 0.0, **kw}, attn_implementation=attn))


def _body(model: nn.Module) -> nn.Module:
    """The ``SwinModel``, ``Swinv2Model`` or ``DonutSwinModel`` of a classifier."""
    return next(getattr(model, name) for name in ("swin", "swinv2", "donut") if hasattr(model, name))


def _wrap(model: nn.Module, ratio: float = 0.5) -> masksub.SubBranchModel:
    return masksub.wrap(model, ratio=ratio, unit=UNIT, adapter="hf_swin_drop").train()


def _embed(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The embeddings' tokens as a (B, H, W, C) grid."""
    tokens, grid = _body(model).embeddings(x)
    return tokens.unflatten(1, grid)


def _masked_windows_reference(model, x, kept):
    """The plain model, each layer's attention given a key mask of the kept tokens (the layer's own padding, shift and
    partition of a map of them) with its shift mask, and the mean over the kept tokens of the last stage."""
    unit_grid = (x.shape[-2] // UNIT, x.shape[-1] // UNIT)
    restore = []
    for s, stage in enumerate(_body(model).encoder.layers):
        grid = (x.shape[-2] // 4 >> s, x.shape[-1] // 4 >> s)
        for layer in stage.blocks:
            attention = layer.attention

            def forward(windows, mask=None, layer=layer, grid=grid, **kw):
                present = _present(kept, unit_grid, grid[0] // unit_grid[0])  # (B, H, W, 1), 1.0 on kept tokens
                padded, _ = layer.maybe_pad(present - 1.0, *grid)  # 0 on kept tokens and padding, -1 on dropped ones
                if layer.shift_size:  # Swin's cyclic_shift or the roll of Swinv2's forward
                    padded = torch.roll(padded, (-layer.shift_size,) * 2, (1, 2))
                keys = modeling_swin.window_partition(padded, layer.window_size)
                keys = keys.reshape(-1, 1, layer.window_size**2) * 1e30  # (B * nW, 1, N); softmax in float32
                n = keys.shape[-1]
                if mask is not None:  # (nW, N, N), the shifted regions'
                    keys = keys + mask.repeat(keys.shape[0] // mask.shape[0], 1, 1)
                return type(layer.attention).forward(layer.attention, windows, keys.expand(-1, n, n), **kw)
                # (Swinv2's adds the mask given twice, as it does its shift mask)

            attention.forward = forward
            restore.append(attention)
    try:
        tokens = _body(model)(x).last_hidden_state  # (B, h * w, C), normalized
    finally:
        for attention in restore:
            del attention.forward
    present = _present(kept, unit_grid, (x.shape[-2] // 4 >> (len(restore) // 2 - 1)) // unit_grid[0])
    return model.classifier(torch.stack([t[p.flatten().bool()].mean(0) for t, p in zip(tokens, present)]))


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
@pytest.mark.parametrize(
    "family,variant,settings",
    [
        *(
            (family, variant, settings)
            for family in sorted(CLASSES)
            for variant, settings in [
                ("shifted", {}),
                ("padded", {"window_size": 3}),  # 16x16 and 8x8 grids padded to windows of 3, then rolled
                ("window shrunk", {"window_size": 8}),  # the second stage's 8x8 grid: one window, no shift
            ]
        ),
        ("swin", "sdpa", {"attn": "sdpa"}),
        ("swin", "absolute positions", {"use_absolute_embeddings": True}),  # Swinv2's has one position too many
        ("swinv2", "pretrained windows", {"pretrained_window_sizes": [8, 6]}),  # its position bias's offsets
    ],
)
def test_the_sub_pass_is_the_model_with_every_window_attending_to_its_kept_tokens(family, variant, settings, ratio):
    """Float64, against the model's attention given a key mask of the kept tokens: the same logits;
    ``num_keep(U, ratio)`` whole units per sample; the main pass is the plain model's."""
    model = _swin(family, **settings).double()
    with torch.no_grad():  # biases start at zero (a padded window's zero tokens attend by their q, k, v biases)
        for name, p in model.named_parameters():
            if name.endswith("bias") or "position" in name or ("norm" in name and name.endswith("weight")):
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)
    spread_logit_scales(model)
    wrapped = _wrap(model, ratio)
    assert wrapped.branch.name == "hf_swin_drop"
    x = _images().double()
    with torch.no_grad():
        out, kept = sub_pass(wrapped, _body(model).encoder.layers[0], x, partial(_embed, model))
        assert kept.shape == (3, num_keep(16, ratio))
        torch.testing.assert_close(out, _masked_windows_reference(model, x, kept), rtol=0, atol=1e-12)
        assert torch.equal(wrapped(x).logits, model(x).logits), "the main pass is the plain model"


def test_whole_units_per_sample_and_the_pixels_of_dropped_ones_do_not_reach_the_sub_pass(family):
    model = _swin(family)
    check_dropped_units_unseen(_wrap(model), _body(model).encoder.layers[0], partial(_embed, model))


def test_the_sub_pass_costs_about_half_and_compiles_into_two_graphs(family):
    """Swin-T's configuration at 224 px (7x7 windows, a 7x7 last grid): the projections and MLPs on half the tokens."""
    config, model = (getattr(transformers, name) for name in CLASSES[family])
    wrapped = masksub.wrap(model(config(num_labels=10)), adapter="hf_swin_drop").train()  # Swin-T's architecture
    assert 0.45 < sub_flop_ratio(wrapped, torch.rand(1, 3, 224, 224)) < 0.55
    assert compiled_graphs(_wrap(_swin(family, window_size=3)), _images(batch=4)) == 2


def test_two_backward_step_equals_summed_loss_and_gradient_checkpointing_changes_no_gradient(family):
    def grads(memory_saving, checkpointing):
        model = _swin(family)
        if checkpointing:
            model.activation_checkpointing_enable()
        norm = _body(model).encoder.layers[1].blocks[1].layernorm_before
        return step_gradients(model, _wrap(model), memory_saving, norm, recomputed=checkpointing)

    assert_same_grads(grads(False, False), grads(True, False), grads(True, True))


def test_every_stage_merging_and_layer_runs_through_its_own_call(family):
    """What FSDP (``fully_shard`` on each layer or stage) needs to gather the weights: hooks on them run in the sub
    pass too, on the kept tokens."""
    model = _swin(family)
    seen = []
    stages = _body(model).encoder.layers
    for module in [*stages, stages[0].downsample, *stages[0].blocks, *stages[1].blocks]:
        module.register_forward_pre_hook(lambda m, a: seen.append((type(m).__name__, a[0].shape[1])))
    _wrap(model)(_images(batch=2), sub=True)
    # 64 px, 16-px units: 8 of 16 units kept, 4x4 tokens each at the first stage and 2x2 at the second
    name = {"swin": "Swin", "swinv2": "Swinv2", "donut": "DonutSwin"}[family]
    first, second = [(f"{name}Layer", 128)] * 2, [(f"{name}Layer", 32)] * 2
    merging = (f"{name}PatchMerging", 128)
    assert seen == [(f"{name}Stage", 128), *first, merging, (f"{name}Stage", 32), *second]


def test_a_swin_model_under_a_head_of_the_users(family):
    backbone = _body(_swin(family))  # SwinModel or Swinv2Model, with its mean pool

    class Mine(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone, self.head = backbone, nn.Linear(32, 5)

        def forward(self, x):
            return self.head(self.backbone(x).pooler_output)

    mine = Mine()
    wrapped = masksub.wrap(mine, unit=UNIT, adapter="hf_swin_drop").train()
    assert wrapped.branch.target_name == "backbone"
    backbone_sub_pass = wrapped.branch.run_with_hooks_active
    assert_backbone_masked(wrapped, lambda x: mine.head(backbone_sub_pass(backbone, x).pooler_output), mine)


def test_the_mask_token_stays_the_default_and_bad_settings_are_refused(family):
    assert masksub.wrap(_swin(family), unit=UNIT).branch.name == "hf_masktoken"
    with pytest.raises(ValueError, match="unit 4 px is not a multiple of the last stage's token, 8x8 px"):
        masksub.wrap(_swin(family), unit=4, adapter="hf_swin_drop")
    with pytest.raises(ValueError, match="image size 72x64 is not divisible by the mask unit of 16 pixels"):
        _wrap(_swin(family))(torch.rand(2, 3, 72, 64), sub=True)
    model = _swin(family)
    for layer in (b for stage in _body(model).encoder.layers for b in stage.blocks):
        if family == "swin":
            del layer.attention.q_proj  # another release's layout
        else:
            del layer.attention.self.query
    layout = {
        "swin": "has no q_proj, k_proj, v_proj and o_proj",
        "swinv2": "another layout than self.query, key, value, logit_scale",
        "donut": "another layout than self.query, key, value and relative_position_bias_table",
    }
    with pytest.raises(ValueError, match=layout[family] + ".*adapter='hf_masktoken'"):
        masksub.wrap(model, unit=UNIT, adapter="hf_swin_drop")


def test_unwrap_restores_and_a_copied_or_pickled_wrapped_model_masks_alike(family):
    wrapped = _wrap(_swin(family))
    x = _images(batch=2)
    for other in copies_masking_alike(wrapped):
        encoder = _body(other.model).encoder
        assert encoder.forward.args[0] is encoder
    model = wrapped.unwrap()
    assert not any("forward" in vars(m) for m in model.modules())
    assert _body(model)(x).last_hidden_state.shape == (2, 64, 32)


def test_the_hugging_face_trainer_takes_it_by_name(tmp_path, family):
    """``MaskSubTrainer(mask_options={"adapter": "hf_swin_drop"})``: the sub pass runs its layers on the kept tokens,
    and the model trains."""
    from test_hf import Rows, _args

    from masksub.hf import MaskSubTrainer

    data = {"pixel_values": _images(batch=8), "labels": torch.arange(8) % 5}
    model = _swin(family)
    options = {"adapter": "hf_swin_drop", "unit": UNIT}
    args = _args(tmp_path, learning_rate=1e-3, max_steps=2)
    trainer = MaskSubTrainer(model=model, args=args, train_dataset=Rows(data), mask_options=options)
    assert trainer.sub_branch.name == "hf_swin_drop"
    lengths = []
    _body(model).encoder.layers[1].blocks[0].register_forward_pre_hook(lambda m, a: lengths.append(a[0].shape[1]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.train()
    assert lengths == [64, 32] * 2  # per step: the main pass's 8x8 tokens, the sub pass's 8 of 16 units
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_lora_swin_drops_units_and_trains_only_the_lora_weights(family):
    from peft import LoraConfig, get_peft_model

    model = _swin(family)
    targets = {"swin": ["q_proj", "v_proj"], "swinv2": ["query", "value"], "donut": ["query", "value"]}[family]
    lora = get_peft_model(model, LoraConfig(target_modules=targets, r=4))
    wrapped = masksub.wrap(lora, unit=UNIT, adapter="hf_swin_drop").train()
    trained = [p for p in wrapped.parameters() if p.requires_grad]
    step = masksub.Step(wrapped, torch.optim.SGD(trained, lr=0.1), nn.CrossEntropyLoss())
    before = {n: p.clone() for n, p in model.named_parameters()}
    lengths = []
    _body(model).encoder.layers[1].blocks[0].register_forward_pre_hook(lambda m, a: lengths.append(a[0].shape[1]))
    assert step(_images(batch=4), torch.arange(4) % 5)["updated"]
    assert lengths == [64, 32]  # the main pass's 8x8 tokens, the sub pass's 8 of 16 units
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
