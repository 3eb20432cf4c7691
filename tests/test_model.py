"""The wrapper: main branch and inference untouched, DropSub/PathSub restore values, BN, export, compile."""

from __future__ import annotations

import copy

import pytest
import timm
import timm.data
import timm.optim
import torch
from conftest import TINY, tiny_images, tiny_model
from timm.layers import DropPath
from torch._dynamo.utils import counters

import masksub


@pytest.mark.parametrize("sub", ["mask", "dropout", "droppath"])
@pytest.mark.parametrize(
    "name",
    [
        "vit",
        "eva_rope",
        "cait",
        "swin",
        "resnet",
        "naflex_rope_mixed",
        "convvit",
        "hiera",
        "gemma4",
        "qwen3",
        "deepseek",
        "timm_convit",
    ],
)
def test_main_branch_and_inference_unchanged(name, sub):
    plain = tiny_model(name, drop_rate=0.0)
    wrapped = masksub.wrap(copy.deepcopy(plain), sub=sub, ratio=0.3, unit=TINY[name][3])
    x = tiny_images(name, batch=4)
    plain.eval(), wrapped.eval()
    with torch.no_grad():
        assert torch.equal(wrapped(x), plain(x))
    plain.train(), wrapped.train()
    with torch.no_grad():
        torch.manual_seed(0)
        expected = plain(x)
        torch.manual_seed(0)
        assert torch.equal(wrapped(x), expected)
        assert not torch.equal(wrapped(x, sub=True), expected)


def _drop_values(model):
    values = {n + ".p": m.p for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout)}
    values |= {n + ".drop_prob": m.drop_prob for n, m in model.named_modules() if isinstance(m, DropPath)}
    values |= {
        n + ".drop_rate": m.drop_rate
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Module) and isinstance(getattr(m, "drop_rate", None), float)
    }
    return values


@pytest.mark.parametrize("sub", ["dropout", "droppath"])
def test_drop_values_raised_in_sub_pass_and_restored_exactly(sub):
    model = tiny_model("vit", drop_rate=0.05, attn_drop_rate=0.03, drop_path_rate=0.07)
    before = _drop_values(model)
    assert 0.03 in before.values() and any(v > 0 for k, v in before.items() if "drop_prob" in k)
    wrapped = masksub.wrap(model, sub=sub, ratio=0.4).train()
    block = model.blocks[1]
    if sub == "dropout":  # fused attention reads attn_drop.p without calling the module
        hooked, read = block.mlp.drop1, lambda: (block.mlp.drop1.p, block.attn.attn_drop.p)
    else:
        hooked, read = block.drop_path1, lambda: (block.drop_path1.drop_prob, block.drop_path2.drop_prob)
    outside = read()
    seen = []
    hooked.register_forward_pre_hook(lambda m, a: seen.append(read()))
    x = tiny_images("vit", batch=2)
    wrapped(x)
    wrapped(x, sub=True)
    assert seen == [outside, (0.4, 0.4)]
    after = _drop_values(model)  # block 0 (rate 0) got DropPath(0.0) where it had an Identity
    assert {k: after[k] for k in before} == before and all(after[k] == 0.0 for k in after.keys() - before.keys())

    # Restored even when the sub pass fails.
    with pytest.raises(AssertionError, match="doesn't match model"):  # timm's own size check
        wrapped(torch.rand(2, 3, 30, 30), sub=True)
    assert _drop_values(model) == after


@pytest.mark.parametrize("sub", ["mask", "dropout", "droppath"])
def test_the_ratio_set_on_the_wrapper_is_the_one_the_sub_pass_uses(sub):
    model = tiny_model("vit", drop_rate=0.05, drop_path_rate=0.07)
    wrapped = masksub.wrap(model, sub=sub, ratio=0.5).train()
    block = model.blocks[1]
    seen = []
    block.register_forward_pre_hook(
        lambda m, a: seen.append((a[0].shape[1], block.mlp.drop1.p, block.drop_path1.drop_prob))
    )
    x = tiny_images("vit", batch=2)
    n = model.patch_embed.num_patches
    for ratio in (0.5, 0.75):
        wrapped.ratio = ratio  # a schedule of the ratio, between steps
        assert wrapped.ratio == ratio
        seen.clear()
        wrapped(x, sub=True)
        tokens, dropout, droppath = seen[0]
        if sub == "mask":
            assert tokens == model.num_prefix_tokens + masksub.num_keep(n, ratio)
        else:
            assert (dropout if sub == "dropout" else droppath) == ratio
    with pytest.raises(ValueError, match=r"ratio must be in \[0, 1\)"):
        wrapped.ratio = 1.0
    assert wrapped.ratio == 0.75


def test_pathsub_on_model_built_without_drop_path():
    for name in ("vit", "resnet", "convnext"):
        model = tiny_model(name)
        assert not any(isinstance(m, DropPath) for m in model.modules())
        keys = list(model.state_dict())
        wrapped = masksub.wrap(model, sub="droppath", ratio=0.5, unit=TINY[name][3]).train()
        assert any(isinstance(m, DropPath) for m in model.modules())
        assert list(model.state_dict()) == keys  # DropPath has no state: the checkpoint is unchanged
        x = tiny_images(name, batch=4)
        with torch.no_grad():
            torch.manual_seed(0)
            main = wrapped(x)
            sub = wrapped(x, sub=True)
        assert not torch.equal(main, sub)
        plain = wrapped.unwrap()
        assert not any(isinstance(m, DropPath) for m in plain.modules())


class _NoShortcutBlock(torch.nn.Module):
    """Keeps a drop_path attribute but, like a stride-2 EfficientNet block, has no shortcut that uses it."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.drop_path = torch.nn.Identity()

    def forward(self, x):
        return self.conv(x).mean((2, 3))


def test_pathsub_refuses_a_model_whose_sites_never_run():
    wrapped = masksub.wrap(_NoShortcutBlock(), sub="droppath", ratio=0.5).train()
    x = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match="none of the 1 drop-path sites of _NoShortcutBlock ran"):
        wrapped(x, sub=True)
    assert not wrapped.model.drop_path._forward_pre_hooks  # the counting hooks are gone
    assert wrapped.model.drop_path.drop_prob == 0.0  # and the rate is restored


def test_pathsub_counts_sites_on_the_first_sub_pass_only():
    wrapped = masksub.wrap(tiny_model("vit"), sub="droppath", ratio=0.5).train()
    x = tiny_images("vit", batch=2)
    wrapped(x, sub=True)
    assert wrapped.branch._checked
    assert not any(m._forward_pre_hooks for m in wrapped.model.modules() if isinstance(m, DropPath))


def test_dropout_branch_needs_dropout_sites():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    with pytest.raises(ValueError, match="no dropout"):
        masksub.wrap(net, sub="dropout")
    with pytest.raises(ValueError, match="no residual drop-path"):
        masksub.wrap(net, sub="droppath")
    with pytest.raises(ValueError, match="unknown sub-branch kind"):
        masksub.wrap(net, sub="cutout")


@pytest.mark.parametrize("sync_bn", [False, True])
@pytest.mark.parametrize("sub_bn_stats", [True, False])
def test_batchnorm_statistics_option(sub_bn_stats, sync_bn):
    wrapped = masksub.wrap(tiny_model("resnet"), unit=16, sub_bn_stats=sub_bn_stats).train()
    if sync_bn:  # the usual DDP order: wrap, then convert (new BatchNorm modules), then DDP
        wrapped = torch.nn.SyncBatchNorm.convert_sync_batchnorm(wrapped)
    x = tiny_images("resnet", batch=4)
    wrapped(x)
    before = {k: v.clone() for k, v in wrapped.model.state_dict().items() if "running" in k or "num_batches" in k}
    wrapped(x, sub=True)
    after = wrapped.model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert bool(changed) == sub_bn_stats
    bns = [m for m in wrapped.model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns and all(m.track_running_stats for m in bns)


@pytest.mark.parametrize("name", ["vit", "swin", "eva_rope", "naflex", "convvit"])
def test_export_loads_into_plain_timm_model(name):
    wrapped = masksub.wrap(tiny_model(name), unit=TINY[name][3]).train()
    opt = torch.optim.AdamW(wrapped.parameters(), lr=1e-2)
    step = masksub.Step(wrapped, opt, torch.nn.CrossEntropyLoss())
    step(tiny_images(name, batch=4), torch.arange(4))
    timm_name, kwargs, _, _ = TINY[name]
    plain = timm.create_model(timm_name, **kwargs)
    plain.load_state_dict(wrapped.model.state_dict(), strict=True)
    x = tiny_images(name, batch=2)
    plain.eval(), wrapped.eval()
    with torch.no_grad():
        assert torch.equal(plain(x), wrapped(x))
    assert not any("mask_token" in k for k in wrapped.model.state_dict())


@pytest.mark.parametrize("name", ["vit", "swin", "resnet"])
def test_the_wrapper_in_eval_mode_exports_and_traces_as_the_plain_model(name):
    """torch.export and torch.jit.trace of the wrapper (the README says they work) give the plain model's outputs;
    its mask hooks and drop-rate switches leave no trace in the graph."""
    wrapped = masksub.wrap(tiny_model(name), unit=TINY[name][3]).eval()
    x = tiny_images(name, batch=2)
    with torch.no_grad():
        expected = wrapped.model(x)
        torch.testing.assert_close(torch.export.export(wrapped, (x,)).module()(x), expected)
        torch.testing.assert_close(torch.jit.trace(wrapped, x)(x), expected)


def _groups(optimizer, model) -> dict:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: (g["weight_decay"], g.get("lr_scale")) for g in optimizer.param_groups for p in g["params"]}


@pytest.mark.parametrize("name", ["vit", "swin", "beit", "eva_rope", "resnet", "convvit"])
@pytest.mark.parametrize("layer_decay", [None, 0.65])
def test_timm_optimizer_factory_sees_the_models_decay_lists_and_layers(name, layer_decay):
    """create_optimizer_v2(wrapped) put weight decay on position embeddings and class tokens, and layer decay
    found one layer (every lr scale 1): the wrapper hid the model's no_weight_decay and group_matcher."""
    kw = dict(opt="adamw", lr=1e-3, weight_decay=0.05, layer_decay=layer_decay)
    plain = tiny_model(name)
    wrapped = masksub.wrap(tiny_model(name), unit=TINY[name][3])
    expected = _groups(timm.optim.create_optimizer_v2(plain, **kw), plain)
    got = _groups(timm.optim.create_optimizer_v2(wrapped, **kw), wrapped)
    assert {n: v for n, v in got.items() if n.startswith("model.")} == {f"model.{n}": v for n, v in expected.items()}
    if name != "resnet":  # position embeddings, class tokens, relative position tables: no decay
        assert any(v[0] == 0.0 and p.ndim > 1 for n, v in expected.items() for p in [plain.get_parameter(n)])
    if layer_decay:
        assert len({v[1] for v in expected.values()}) > 2
    for n, (decay, scale) in got.items():  # the mask token: new, at full lr; 1-D, without decay
        if n.startswith("branch."):
            assert (decay, scale) == (0.0, None if layer_decay is None else 1.0)


def test_timm_data_config_of_the_wrapper_is_the_models():
    plain = timm.create_model("vit_tiny_patch16_384", pretrained=False, num_classes=5)
    wrapped = masksub.wrap(plain)
    config = timm.data.resolve_data_config({}, model=wrapped)
    assert config == timm.data.resolve_data_config({}, model=plain) and config["input_size"] == (3, 384, 384)
    assert wrapped.default_cfg is plain.pretrained_cfg
    assert not hasattr(masksub.wrap(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))), "pretrained_cfg")


def test_an_attribute_of_the_model_asked_of_the_wrapper_names_where_it_is():
    wrapped = masksub.wrap(tiny_model("vit"))
    with pytest.raises(AttributeError, match=r"use \.model\.set_grad_checkpointing .*plain VisionTransformer"):
        wrapped.set_grad_checkpointing(True)
    with pytest.raises(AttributeError, match="has no attribute 'nothing_here'$"):
        getattr(wrapped, "nothing_here")  # noqa: B009
    assert not hasattr(wrapped, "set_grad_checkpointing")  # probes see the wrapper, as before
    assert copy.deepcopy(wrapped).model is not wrapped.model


def test_mask_token_is_saved_and_trained():
    wrapped = masksub.wrap(tiny_model("swin"), unit=16).train()
    assert "branch.mask_token" in wrapped.state_dict()
    token = wrapped.branch.mask_token.detach().clone()
    opt = torch.optim.SGD(wrapped.parameters(), lr=1.0)
    masksub.Step(wrapped, opt, torch.nn.CrossEntropyLoss())(tiny_images("swin", batch=4), torch.arange(4))
    assert not torch.equal(token, wrapped.branch.mask_token)
    assert wrapped.branch.mask_token.ndim == 1  # 1-D: no weight decay under timm's param groups


@pytest.mark.parametrize(
    "name, sub, sub_bn_stats",
    [("vit", "mask", True), ("swin", "mask", True), ("naflex", "mask", True), ("convvit", "mask", True)]
    + [("resnet", "mask", False), ("vit", "droppath", True), ("resnet", "droppath", True), ("swin", "dropout", True)],
)
def test_torch_compile_two_graphs_no_breaks(name, sub, sub_bn_stats):
    if not sub_bn_stats and torch.__version__ < (2, 6):
        pytest.skip("dynamo before torch 2.6 cannot set BatchNorm's track_running_stats in a graph (one break)")
    counters.clear()
    torch._dynamo.reset()
    kwargs = {"unit": TINY[name][3]} if sub == "mask" else {}
    wrapped = masksub.wrap(tiny_model(name), sub, 0.2, sub_bn_stats=sub_bn_stats, **kwargs).train()
    wrapped.compile(backend="aot_eager", fullgraph=True)  # fullgraph: any graph break raises
    x = tiny_images(name, batch=4)
    for _ in range(3):
        wrapped(x).sum().backward()
        wrapped(x, sub=True).sum().backward()
    assert counters["stats"]["unique_graphs"] == 2


@pytest.mark.parametrize("name", ["vit", "swin", "resnet", "naflex", "convvit"])
def test_compiled_sub_branch_stays_masked_beside_other_compiled_instances(name):
    # Dynamo shares graphs across instances of a class and does not guard on module hooks: a compiled
    # plain instance must not hand its unmasked graph to the wrapped model's sub pass.
    torch._dynamo.reset()
    wrapped = masksub.wrap(tiny_model(name), unit=TINY[name][3]).train()
    eager = copy.deepcopy(wrapped)
    wrapped.compile(backend="aot_eager")
    x = tiny_images(name, batch=4)
    wrapped(x), wrapped(x, sub=True)
    plain = tiny_model(name).train()
    plain.compile(backend="aot_eager")
    plain(x)
    other = masksub.wrap(tiny_model(name), sub="dropout", ratio=0.3).train()
    other.compile(backend="aot_eager")
    other(x), other(x, sub=True)
    for seed in (3, 4):
        torch.manual_seed(seed)
        got = wrapped(x, sub=True)
        torch.manual_seed(seed)
        torch.testing.assert_close(got, eager(x, sub=True))
    assert not torch.allclose(got, wrapped(x), atol=1e-4)


class _InplaceDropAfterSoftmax(torch.nn.Module):
    """timm's TNT attention pattern: ``Dropout(inplace=True)`` on a softmax output autograd keeps."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(6, 6)
        self.drop = torch.nn.Dropout(0.0, inplace=True)

    def forward(self, x):
        return self.drop(self.fc(x).softmax(-1)).sum(-1)


@pytest.mark.parametrize("model", [_InplaceDropAfterSoftmax, "tnt"])
def test_dropsub_runs_inplace_dropout_out_of_place(model):
    if model == "tnt":
        model = timm.create_model("tnt_s_patch16_224", img_size=32, depth=1, num_classes=3)
        x = torch.rand(2, 3, 32, 32)
    else:
        model = model()
        x = torch.rand(4, 6)
    inplace = [m for m in model.modules() if isinstance(m, torch.nn.Dropout) and m.inplace]
    assert inplace
    wrapped = masksub.wrap(model, sub="dropout", ratio=0.5).train()
    torch.manual_seed(0)
    wrapped(x, sub=True).sum().backward()  # in place at p=0.5: "modified by an inplace operation"
    assert all(m.inplace and m.p == 0.0 for m in inplace)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("rate", [0.0, 0.1])
def test_pathsub_raises_torchvision_stochastic_depth(rate):
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt
    from torchvision.ops import StochasticDepth

    settings = [CNBlockConfig(8, 16, 2), CNBlockConfig(16, None, 1)]
    model = ConvNeXt(settings, stochastic_depth_prob=rate, num_classes=5)
    sites = [m for m in model.modules() if isinstance(m, StochasticDepth)]
    before = [m.p for m in sites]
    assert len(sites) == 3
    wrapped = masksub.wrap(model, sub="droppath", ratio=0.6).train()
    seen = []
    for m in sites:
        m.register_forward_pre_hook(lambda m, a: seen.append(m.p))
    x = torch.rand(4, 3, 32, 32)
    wrapped(x)
    assert seen == before
    seen.clear()
    torch.manual_seed(0)
    sub = wrapped(x, sub=True)
    assert seen == [0.6] * 3 and [m.p for m in sites] == before
    assert not torch.equal(sub, wrapped(x))
    assert wrapped.unwrap() is model and [m.p for m in sites] == before
