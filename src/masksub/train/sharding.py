"""FSDP for the trainer (``train.fsdp``): ``fully_shard`` on each repeated block, then on the root.

Checkpoints hold full, unsharded state dicts with the same keys as an unsharded run's, so
``masksub eval``, ``--model.checkpoint`` and ``encoder.pt`` read them as they read any other.
Gathering and scattering them are collectives: every process calls these functions.
"""

from __future__ import annotations

import torch
from torch import nn

MODES = ("none", "full_shard", "shard_grad_op")
# Attributes that hold a model's repeated blocks: ViT / EVA / DeiT, Swin, ConvNeXt and most CNNs,
# DMJD's decoder, also numbered per stage (ConvViT's blocks1..blocks3); ResNet's layer1..layer4 by name.
CONTAINERS = ("blocks", "layers", "stages", "decoder")


def available() -> bool:
    """``fully_shard`` is public from torch 2.6."""
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


def units(*modules: nn.Module) -> list[nn.Module]:
    """The blocks to shard one by one (each gathers its weights only while it runs) in ``modules``, each once.

    A sub branch with weights of its own (a mask token) is a unit too: its weights get gradients in the
    sub pass only, and FSDP's mixed precision reduces a group's gradients together only when they all
    have the same dtype, which gradients accumulated since the main pass (fp32) and new ones (bf16) do not.
    Before the first training step such a unit must have run forward once (the trainer's input check
    does): torch's accumulation after a ``no_sync`` backward reads the gathered weights of every group,
    and fails on one never gathered (pytorch/pytorch#194058).
    """
    found = []
    for module in modules:
        for name, child in module.named_children():
            is_stage = name.startswith("layer") and name[5:].isdigit()
            if name.rstrip("0123456789") in CONTAINERS and isinstance(child, (nn.Sequential, nn.ModuleList)):
                found += list(child)
            elif is_stage or (name == "branch" and any(True for _ in child.parameters())):
                found.append(child)
    return list(dict.fromkeys(found))  # a module passed twice (a model that is its own wrapper) counts once


def shard(root: nn.Module, blocks: list[nn.Module], mode: str, param_dtype: torch.dtype | None, device_type: str):
    """Shard ``blocks`` and then ``root`` (whatever the blocks leave: embeddings, head, mask token) over
    every process. ``full_shard`` frees each block's gathered weights after its forward and gathers them
    again for the backward (least memory); ``shard_grad_op`` keeps them until the backward (less
    communication). bf16 training gathers bf16 weights and reduces gradients in fp32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device_type, (torch.distributed.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    reshard = mode == "full_shard"
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard, mp_policy=policy)
    fully_shard(root, mesh=mesh, reshard_after_forward=reshard, mp_policy=policy)


def reshard(module: nn.Module) -> None:
    """Free the gathered weights that a forward without backward (evaluation) leaves in place: the root
    keeps its own after the forward, and a state dict or optimizer state must see the sharded ones."""
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_model_state(module: nn.Module) -> dict:
    """The whole module's state dict on the CPU, on process 0 (the others get an empty dict)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(module, options=_options(cpu_offload=True))


def load_model_state(module: nn.Module, state: dict) -> None:
    """Load a full state dict (every process holds it) into the sharded module, strictly."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    result = set_model_state_dict(module, state, options=_options(strict=True))
    if result.missing_keys or result.unexpected_keys:  # strict mode raises on most torch versions already
        raise RuntimeError(f"missing keys {result.missing_keys[:8]}, unexpected keys {result.unexpected_keys[:8]}")


def full_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state with full tensors, keyed by parameter name, on process 0."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(module, optimizer, options=_options(cpu_offload=True))


def load_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(module, optimizer, state, options=_options())
