"""What a batch holds and what a model returns: the logits in an output, the labels in a mapping, the call of a
branch on either kind of input. Shared by ``Step``, the Hugging Face Trainer and Lightning's ``TrainingStep``."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


def logits_of(output):
    """The logits in a model's output: the tensor itself, a Hugging Face output's ``logits``, an extractive
    question-answering output's ``start_logits`` and ``end_logits`` as ``(batch, 2, length)`` (two predictions over
    the positions, whose targets are ``(batch, 2)``: the answer's start and end), or a torchvision segmentation
    model's ``out`` (dense logits)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    if isinstance(output, Mapping) and output.get("start_logits") is not None and output.get("end_logits") is not None:
        return torch.stack([output["start_logits"], output["end_logits"]], dim=1)
    hint = ""
    if isinstance(output, Mapping) and "out" in output and set(output) <= {"out", "aux"}:  # FCN, DeepLabV3, LRASPP
        if "aux" not in output:
            return output["out"]
        hint = "; its 'aux' logits (an auxiliary head) neither branch's loss would train: build it with aux_loss=False"
    if type(output) is tuple and len(output) == 2 and all(isinstance(t, torch.Tensor) for t in output):
        hint = (
            "; a pair of logits is what timm's distilled models (deit_*_distilled_*) return after "
            "set_distilled_training(True), for a teacher's hard distillation: turn it off, and both heads' mean is "
            "the logits the sub branch learns from"
        )
    if any(f.startswith("aux_logits") for f in getattr(output, "_fields", ())):  # torchvision Inception3, GoogLeNet
        hint = (
            f"; {type(output).__name__} holds auxiliary logits, which neither branch's loss would train: build "
            "the model with aux_logits=False"
        )
    raise TypeError(
        f"the criterion needs logits, and the model returned {type(output).__name__}: return a tensor, or a "
        f"mapping / Hugging Face ModelOutput with 'logits' (return_dict=True), or torchvision's {{'out': logits}}{hint}"
    )


ANSWER_POSITIONS = ("start_positions", "end_positions")  # an extractive question-answering batch's labels


def split_labels(x, target: torch.Tensor | None = None):
    """``(inputs, target)``: a mapping's ``labels`` (or, without them, an extractive question-answering batch's
    ``start_positions`` and ``end_positions``, as ``(batch, 2)``) are the target when ``target`` is None, and never
    reach the model (a Hugging Face model then computes no loss of its own)."""
    if isinstance(x, Mapping) and "labels" in x:
        target = x["labels"] if target is None else target
        x = {k: v for k, v in x.items() if k != "labels"}
    elif isinstance(x, Mapping) and set(ANSWER_POSITIONS) <= set(x):
        target = torch.stack([x[n].flatten() for n in ANSWER_POSITIONS], 1) if target is None else target
        x = {k: v for k, v in x.items() if k not in ANSWER_POSITIONS}
    return x, target


def is_patch_dict(x) -> bool:
    """timm's NaFlex batch (``patches``, ``patch_coord``, ``patch_valid``...): one input, not keyword inputs."""
    return isinstance(x, Mapping) and "patches" in x and "patch_coord" in x


def forward(model: nn.Module, x, sub: bool = False):
    """The main (or, ``sub=True``, the sub) branch on an input batch, a NaFlex patch dict, or a mapping of
    keyword inputs."""
    flag = {"sub": True} if sub else {}
    return model(**x, **flag) if isinstance(x, Mapping) and not is_patch_dict(x) else model(x, **flag)
