"""A model of the user's around a timm, torchvision or Hugging Face backbone: its adapter masks the backbone."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from conftest import EXPECTED_ADAPTER, TINY, compiled_graphs, sub_flop_ratio, tiny_images, tiny_model

import masksub

NAMES = [
    "vit",
    "eva_rope",
    "cait",
    "naflex",
    "gemma4",
    "hiera",
    "convvit",
    "swin",
    "beit",
    "vit_relpos",
    "qwen3",
    "qwen3_merge",
    "deepseek",
    "timm_convit",
]


class Net(torch.nn.Module):
    """A backbone without its head, then a head of the user's."""

    def __init__(self, backbone: torch.nn.Module, width: int):
        super().__init__()
        self.backbone, self.head = backbone, torch.nn.Linear(width, 3)

    def forward(self, x):
        features = self.backbone(x)
        return self.head(getattr(features, "pooler_output", features))


def _backbone(name: str) -> torch.nn.Module:
    return tiny_model(name, num_classes=0)


@pytest.mark.parametrize("name", NAMES)
def test_the_backbone_inside_a_model_of_the_users_gets_its_own_adapter_and_masks_as_it_does_alone(name):
    """The model is masked through its backbone: the sub pass equals the head on the backbone's own sub pass under
    the same seed (the same tokens dropped), and the main pass is the plain model."""
    backbone = _backbone(name)
    net = Net(copy.deepcopy(backbone), backbone.num_features).train()
    wrapped = masksub.wrap(net, unit=TINY[name][3])
    assert wrapped.branch.name == EXPECTED_ADAPTER[name] and wrapped.branch.target_name == "backbone"
    assert repr(wrapped.branch).count(f"{wrapped.branch.masked_unit()} of backbone") == 1
    alone = masksub.wrap(backbone, unit=TINY[name][3]).train()
    if name == "swin":  # the same mask token
        alone.branch.mask_token.data.copy_(wrapped.branch.mask_token)
    x = tiny_images(name, batch=4)
    with torch.no_grad():
        torch.manual_seed(0)
        plain = net(x)
        torch.manual_seed(0)
        assert torch.equal(wrapped(x), plain)
        torch.manual_seed(1)
        sub = wrapped(x, sub=True)
        torch.manual_seed(1)
        expected = net.head(alone(x, sub=True))
        sensitive = not torch.allclose(net(x), net(tiny_images(name, batch=4, seed=2)))  # CaiT's is not at init
    torch.testing.assert_close(sub, expected, rtol=0, atol=0)
    assert not sensitive or not torch.allclose(sub, plain)
    wrapped.unwrap()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())


def test_a_torchvision_vit_as_the_backbone_drops_tokens_as_it_does_alone():
    from test_adapters import _torchvision_vit

    backbone = _torchvision_vit()
    backbone.heads = torch.nn.Identity()  # the class token's features, for a head of the user's
    net = Net(copy.deepcopy(backbone), 32).train()
    wrapped = masksub.wrap(net, ratio=0.5)
    assert wrapped.branch.name == "tv_vit" and wrapped.branch.target_name == "backbone"
    alone = masksub.wrap(backbone, ratio=0.5).train()
    x = tiny_images("vit", batch=4)
    with torch.no_grad():
        torch.manual_seed(1)
        sub = wrapped(x, sub=True)
        torch.manual_seed(1)
        torch.testing.assert_close(sub, net.head(alone(x, sub=True)), rtol=0, atol=0)
        assert not torch.allclose(sub, net(x))


def test_a_backbone_that_drops_tokens_trains_in_step_at_about_half_the_flops_and_compiles_into_two_graphs():
    x = tiny_images("vit", batch=4)
    sequential = torch.nn.Sequential(_backbone("vit"), torch.nn.Linear(32, 3))  # a Sequential is the user's too
    assert compiled_graphs(masksub.wrap(sequential, ratio=0.5).train(), x) == 2
    net = Net(_backbone("vit"), 32).train()
    wrapped = masksub.wrap(net, ratio=0.5)
    assert 0.4 < sub_flop_ratio(wrapped, x) < 0.65
    before = {n: p.detach().clone() for n, p in wrapped.named_parameters()}
    step = masksub.Step(wrapped, torch.optim.SGD(wrapped.parameters(), lr=0.1), torch.nn.CrossEntropyLoss())
    assert step(x, torch.tensor([0, 1, 2, 0]))["updated"]
    assert all(not torch.equal(before[n], p) for n, p in wrapped.named_parameters())


HF_BACKBONES = [
    ("ViTModel", "ViTConfig", 1),
    ("Dinov2Model", "Dinov2Config", 1),
    ("CLIPVisionModel", "CLIPVisionConfig", 1),
]
HF_BACKBONES += [("SiglipVisionModel", "SiglipVisionConfig", 0)]


@pytest.mark.parametrize("model,config,prefix", HF_BACKBONES, ids=[b[0] for b in HF_BACKBONES])
def test_a_hugging_face_base_model_as_the_backbone_drops_tokens(model, config, prefix):
    tiny = dict(image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
    backbone = getattr(transformers, model)(getattr(transformers, config)(**tiny, intermediate_size=64))
    net = Net(backbone, 32).train()
    wrapped = masksub.wrap(net, ratio=0.5)
    assert wrapped.branch.name == "hf_vit" and wrapped.branch.target_name == "backbone"
    embeddings = next(m for m in backbone.modules() if type(m).__name__.endswith("Embeddings"))
    lengths = []
    embeddings.register_forward_hook(lambda m, a, out: lengths.append(out.shape[1]) and None)  # after the adapter's
    with torch.no_grad():
        wrapped(tiny_images("vit", batch=2)), wrapped(tiny_images("vit", batch=2), sub=True)
    assert lengths == [prefix + 64, prefix + 32]  # the prefix token and all 64 patches, then half of them


def test_two_backbones_mask_pixels_and_the_forced_adapter_names_them():
    both = torch.nn.ModuleDict({"a": _backbone("vit"), "b": _backbone("vit")})
    assert masksub.wrap(both).branch.name == "pixels"
    with pytest.raises(ValueError, match="adapter 'vit' does not support ModuleDict; it holds 2 modules it does: a, b"):
        masksub.wrap(both, adapter="vit")
    net = Net(_backbone("vit"), 32)
    assert masksub.wrap(net, adapter="pixels").branch.name == "pixels"  # the way back to masking pixels
    assert masksub.wrap(net, adapter="vit").branch.target_name == "backbone"


def test_library_models_are_judged_by_their_own_class_not_searched():
    """A timm, torchvision or transformers model holding a backbone-like module keeps the adapter of its own class:
    ViTForMaskedImageModeling holds a ViTModel, yet reads the token grid back and must see every token."""
    config = transformers.ViTConfig(
        image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    mim = transformers.ViTForMaskedImageModeling(config)
    assert masksub.wrap(mim, unit=8).branch.name != "hf_vit"
    vit = _backbone("vit")
    wrapped = masksub.wrap(vit)
    assert wrapped.branch.name == "vit" and wrapped.branch.target_name == ""
    assert "of " not in repr(wrapped.branch)
