"""The relaxed self-distillation loss: the sub branch learns the main branch's prediction.

``loss = main_weight * criterion(main, target) + sub_weight * distill(sub, teacher)``
with ``teacher = softmax(main.detach() / T)`` for softmax criteria (hard labels,
label smoothing, mixup/cutmix soft targets) or ``sigmoid(main.detach() / T)``
for binary cross-entropy criteria (DeiT-III, ResNet strikes back). Targets,
mixed or smoothed, reach the main branch only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from timm.loss import BinaryCrossEntropy
from torch import nn

TEACHERS = ("auto", "softmax", "sigmoid")


def teacher_kind(criterion: Callable) -> str:
    """``"sigmoid"`` for binary cross-entropy criteria, else ``"softmax"``."""
    bce = (nn.BCEWithLogitsLoss, BinaryCrossEntropy)
    if isinstance(criterion, bce) or criterion is F.binary_cross_entropy_with_logits:
        return "sigmoid"
    return "softmax"


class SubBranchLoss(nn.Module):
    """Main-branch criterion plus the sub branch's distillation from the main logits.

    Args:
        criterion: the recipe's loss on the main branch, ``criterion(logits, target)``.
        main_weight, sub_weight: the paper uses 0.5 and 0.5.
        temperature: divides both logits before softmax/sigmoid; the distillation
            term is multiplied by ``T**2`` so its gradient scale does not depend on T.
        teacher: ``"auto"`` (from the criterion type), ``"softmax"`` or ``"sigmoid"``.
    """

    def __init__(
        self,
        criterion: Callable,
        main_weight: float = 0.5,
        sub_weight: float = 0.5,
        temperature: float = 1.0,
        teacher: str = "auto",
    ):
        super().__init__()
        if teacher not in TEACHERS:
            raise ValueError(f"teacher must be one of {TEACHERS}, got {teacher!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if main_weight < 0 or sub_weight < 0:
            raise ValueError(f"loss weights must be >= 0, got main {main_weight}, sub {sub_weight}")
        self.criterion = criterion
        self.main_weight, self.sub_weight = float(main_weight), float(sub_weight)
        self.temperature = float(temperature)
        self.teacher = teacher_kind(criterion) if teacher == "auto" else teacher

    def main_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Unweighted main-branch loss."""
        return self.criterion(logits, target)

    def sub_loss(self, sub_logits: torch.Tensor, main_logits: torch.Tensor) -> torch.Tensor:
        """Unweighted distillation loss; ``main_logits`` are detached here."""
        t = self.temperature
        sub = sub_logits.float() / t
        main = main_logits.detach().float() / t
        if self.teacher == "sigmoid":
            loss = F.binary_cross_entropy_with_logits(sub, torch.sigmoid(main))
        else:
            loss = torch.sum(-F.softmax(main, dim=-1) * F.log_softmax(sub, dim=-1), dim=-1).mean()
        return loss * (t * t)

    def forward(self, main_logits: torch.Tensor, sub_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Weighted sum of both terms, for a single backward."""
        main = self.main_weight * self.main_loss(main_logits, target)
        return main + self.sub_weight * self.sub_loss(sub_logits, main_logits)

    def extra_repr(self) -> str:
        w = f"main_weight={self.main_weight}, sub_weight={self.sub_weight}"
        return f"{w}, temperature={self.temperature}, teacher={self.teacher}"
