"""The peers MaskSub is measured against, written here from their papers for the benchmarks: R-Drop and cosub.

- **R-Drop** (Liang et al., NeurIPS 2021): the batch goes through the model twice, each pass with the model's own
  dropout drawn anew; ``loss = (CE(a, y) + CE(b, y)) / 2 + alpha * (KL(a || b) + KL(b || a)) / 2`` (per-sample
  means), gradients through both passes.
- **cosub** (Touvron et al., "Co-training 2^L submodels", 2022; DeiT-III's ``--cosub``): twice with the model's own
  drop path drawn anew; each pass learns the targets and the other pass's detached prediction (softmax, or sigmoid
  for binary cross-entropy), a quarter each:
  ``crit(a, y)/4 + crit(b, y)/4 + distill(a <- b)/4 + distill(b <- a)/4``. DeiT-III runs the two copies as one
  batch of 2B; two passes of B give the same loss and gradients, except that a CNN's BatchNorm then normalizes each
  copy with its own batch statistics.

Both need the two passes' outputs before either backward, so they run through ``masksub.Step`` with
``memory_saving=False`` (one backward of the summed loss: both graphs alive, one gradient all-reduce under DDP),
the second pass being the model again (``Again``). The model's dropout (R-Drop) or drop path (cosub) is what the
run builds it with (``model.kwargs``); both passes then drop.

    python benchmarks/peers.py rdrop --alpha 1.0 --recipe fashion_mnist_vit --model.kwargs '{...drop rates...}'
    python benchmarks/peers.py cosub --model.kwargs '{..., drop_path_rate: 0.1}' --sched.epochs 8
    python benchmarks/peers.py rdrop --resume runs/fashion_mnist_vit-none-s0    # continues as it began

A run is ``masksub train`` with ``sub.kind none`` and this step; ``peer.json`` in its folder says which peer.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import masksub
from masksub import SubBranchLoss, SubBranchModel
from masksub.train import checkpoint
from masksub.train.checks import validate
from masksub.train.config import apply_overrides, from_dict, load_config, parse_overrides
from masksub.train.trainer import Trainer

PEERS = ("rdrop", "cosub")
# Our settings for both benchmarks, not tuned: the peers' dropout / drop-path rate in both passes (0.1, the usual
# dropout of ViT finetuning) and R-Drop's KL weight
RATE, ALPHA = 0.1, 1.0
# timm's create_model arguments that set a peer's drop in each model family: R-Drop's dropout at every dropout site
# the family has, cosub's drop path (timm's rule: rising linearly with depth to the rate)
DROP_ARGS = {
    "rdrop": {
        "vit": ("drop_rate", "pos_drop_rate", "proj_drop_rate", "attn_drop_rate"),
        "swin": ("drop_rate", "proj_drop_rate", "attn_drop_rate"),
        "resnet": ("drop_rate",),
    },
    "cosub": {family: ("drop_path_rate",) for family in ("vit", "swin", "resnet")},
}


def family(model_name: str) -> str:
    """``vit``, ``swin`` or ``resnet``: the families DROP_ARGS knows (a DeiT-III is a ViT)."""
    for prefix, fam in (("resnet", "resnet"), ("swin", "swin"), ("vit", "vit"), ("deit", "vit")):
        if model_name.startswith(prefix):
            return fam
    raise ValueError(f"peers.py knows the drop arguments of ViTs, Swins and ResNets, not of {model_name}")


def drop_kwargs(peer: str, model_name: str, rate: float) -> dict:
    """The create_model arguments that give ``model_name`` the peer's drop at ``rate``."""
    return dict.fromkeys(DROP_ARGS[peer][family(model_name)], rate)


class Again(nn.Module):
    """The peers' second pass: the model as it is, its dropout and drop path drawn anew."""

    name = "again"

    def forward(self, model: nn.Module, *args, **kwargs):
        return model(*args, **kwargs)

    def remove(self) -> None:
        pass


class RDropLoss(SubBranchLoss):
    """R-Drop on top of the run's criterion: half its loss on each pass, plus ``alpha`` times the mean of the two
    KL divergences between the passes' softmax outputs, back-propagated through both (per-sample means)."""

    def __init__(self, criterion, alpha: float = 1.0):
        super().__init__(criterion, 0.5, 0.5, teacher="softmax")
        self.alpha = float(alpha)

    def sub_loss(self, sub_logits, main_logits, target=None):
        """``crit(b, y) + alpha * (KL(a || b) + KL(b || a))``: with the weights 1/2 the R-Drop loss."""
        log_a, log_b = F.log_softmax(main_logits.float(), -1), F.log_softmax(sub_logits.float(), -1)
        kl = ((log_a.exp() - log_b.exp()) * (log_a - log_b)).sum(-1).mean()  # KL(a||b) + KL(b||a), per sample
        return self.main_loss(sub_logits, target) + self.alpha * kl


class CosubLoss(SubBranchLoss):
    """cosub on top of the run's criterion: each pass a quarter of the criterion and a quarter of the distillation
    from the other pass's detached output (the teacher MaskSub's sub branch uses: softmax, or sigmoid for BCE)."""

    def __init__(self, criterion):
        super().__init__(criterion, 0.25, 0.25)

    def sub_loss(self, sub_logits, main_logits, target=None):
        """``crit(b, y) + distill(a <- b) + distill(b <- a)``; with ``main_loss`` = ``crit(a, y)``, a quarter each."""
        distill = super().sub_loss
        mutual = distill(main_logits, sub_logits, target) + distill(sub_logits, main_logits, target)
        return self.main_loss(sub_logits, target) + mutual


def peer_loss(peer: str, criterion, alpha: float | None = 1.0) -> SubBranchLoss:
    if peer == "rdrop":
        return RDropLoss(criterion, alpha)
    if peer == "cosub":
        return CosubLoss(criterion)
    raise ValueError(f"unknown peer {peer!r}; choose one of {', '.join(PEERS)}")


def peer_step(model: nn.Module, optimizer: torch.optim.Optimizer, loss: SubBranchLoss, **step_args) -> masksub.Step:
    """A ``masksub.Step`` that runs ``model`` twice and back-propagates ``loss`` once."""
    return masksub.Step(SubBranchModel(model, Again()), optimizer, loss, memory_saving=False, **step_args)


def install(trainer: Trainer, peer: str, alpha: float | None) -> None:
    """Give a plain run's trainer the peer's step, with the run's optimizer, criterion and step settings."""
    old, cfg = trainer.step, trainer.cfg
    if old.has_sub or trainer.dist.enabled or trainer.fsdp or cfg.train.compile:
        raise SystemExit("peers.py: a peer runs on one process, uncompiled, on a plain run (sub.kind none)")
    trainer.step = peer_step(
        trainer.net,
        trainer.optimizer,
        peer_loss(peer, trainer.criterion, alpha),
        accum_steps=old.accum_steps,
        clip_grad=old.clip_grad,
        clip_mode=old.clip_mode,
        amp=cfg.train.amp,
        scaler=old.scaler,  # its state, when a resumed fp16 run loaded one
        skip_nonfinite=old.skip_nonfinite,
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("peer", choices=PEERS)
    p.add_argument("--alpha", type=float, default=None, help="R-Drop's weight of the KL term (default: ALPHA, 1)")
    p.add_argument("--recipe", default=None)
    p.add_argument("--resume", default=None, help="a peer run's folder or checkpoint: continue it")
    args, rest = p.parse_known_args(argv)
    overrides = parse_overrides(rest)
    if given := [key for key in overrides if key.startswith("sub.")]:
        p.error(f"{', '.join(given)}: a peer's run has no sub branch of masksub's (sub.kind none); leave them out")
    if args.alpha is not None and args.peer != "rdrop":
        p.error(f"--alpha is R-Drop's KL weight: {args.peer} has none")
    if args.resume:
        folder = Path(args.resume) if Path(args.resume).is_dir() else Path(args.resume).parent
        if not (folder / "peer.json").is_file():
            p.error(f"{folder} has no peer.json: not a peers.py run (resume a masksub run with masksub train --resume)")
        recorded = json.loads((folder / "peer.json").read_text())
        if recorded["peer"] != args.peer:
            p.error(f"{args.resume} is a {recorded['peer']} run")
        if args.alpha not in (None, recorded["alpha"]):
            p.error(f"{args.resume} ran with --alpha {recorded['alpha']}: a resumed run goes on as it began")
        args.alpha = recorded["alpha"]
        saved = from_dict(checkpoint.load(args.resume)["config"])
        cfg = apply_overrides(saved, {"train.max_steps": None, **overrides, "train.resume": args.resume})
    else:
        cfg = load_config(args.recipe, {**overrides, "sub.kind": "none"}, check=False)
        validate(cfg)
        args.alpha = (ALPHA if args.alpha is None else args.alpha) if args.peer == "rdrop" else None
    trainer = Trainer(cfg)
    install(trainer, args.peer, args.alpha)
    if not args.resume:
        (trainer.folder / "peer.json").write_text(json.dumps({"peer": args.peer, "alpha": args.alpha}) + "\n")
    result = trainer.fit()
    if result["records"]:
        print(f"done: test top-1 {result['records'][-1]['top1']:.2f}%; run folder {result['folder']}")


if __name__ == "__main__":
    sys.exit(main())
