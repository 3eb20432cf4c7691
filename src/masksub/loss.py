"""The relaxed self-distillation loss: the sub branch learns the main branch's prediction.

``loss = main_weight * criterion(main, target) + sub_weight * distill(sub, teacher)``
with ``teacher = softmax(main.detach() / T)`` for softmax criteria (hard labels,
label smoothing, mixup/cutmix soft targets) or ``sigmoid(main.detach() / T)``
for binary cross-entropy criteria (DeiT-III, ResNet strikes back). Targets,
mixed or smoothed, reach the main branch only.

Token-level outputs ``(B, L, C)`` (token classification) are distilled per token:
the criterion sees them as rows ``(B * L, C)`` with targets ``(B * L,)``, as Hugging
Face's token classifiers compute their loss, and a token whose class-index target
is the criterion's ``ignore_index`` (-100: padding, special tokens, sub-words) is
left out of the distillation as it is out of the main loss. Dense outputs ``(B, C, H, W)``
(segmentation: classes in dim 1, as torch's ``cross_entropy`` reads them) are distilled
per pixel the same way.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import timm.loss
import torch
import torch.nn.functional as F
from torch import nn

TEACHERS = ("auto", "softmax", "sigmoid")
IGNORE_INDEX = -100  # torch's cross-entropy default, and Hugging Face's label for tokens without one


def class_dim(logits: torch.Tensor, target: torch.Tensor | None = None) -> int:
    """The dimension of ``logits`` that holds the classes.

    The last one for ``(B, C)`` and token-level ``(B, L, C)`` outputs (Hugging Face's layout); dim 1 for dense
    outputs ``(B, C, H, W, ...)``, as torch's ``cross_entropy`` reads them. Class-index targets settle the cases
    where only one layout fits them: ``(B, L)`` targets of ``(B, C, L)`` logits, ``(B, H, W)`` ones of
    ``(B, H, W, C)`` logits.
    """
    last = logits.ndim - 1
    if logits.ndim <= 2:
        return last
    if target is not None and target.shape != logits.shape:
        fits_last = target.shape == logits.shape[:-1]
        fits_first = target.shape == (logits.shape[0], *logits.shape[2:])
        if fits_last != fits_first:
            return last if fits_last else 1
    return 1 if logits.ndim > 3 else last


def as_rows(
    logits: torch.Tensor, target: torch.Tensor | None = None, dim: int | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-level ``(B, L, C)`` or dense ``(B, C, H, W)`` logits as rows ``(N, C)``, one per token or pixel, with
    their targets as ``(N,)`` class indices or ``(N, C)`` soft targets; ``(B, C)`` logits and their targets pass
    unchanged. ``dim``: the classes' dimension (``class_dim(logits, target)`` when None)."""
    if logits.ndim <= 2:
        return logits, target
    dim = class_dim(logits, target) if dim is None else dim
    moved = logits.movedim(dim, -1)
    rows = moved.reshape(-1, moved.shape[-1])
    if target is None:
        return rows, None
    if target.shape == logits.shape:
        return rows, target.movedim(dim, -1).reshape(rows.shape)
    if target.shape == moved.shape[:-1]:
        return rows, target.reshape(-1)
    last, first = (
        f"{tuple(logits.shape[:-1])} (classes last)",
        f"{(logits.shape[0], *logits.shape[2:])} (classes in dim 1)",
    )
    raise ValueError(
        f"logits {tuple(logits.shape)}, a prediction per token or pixel, need class-index targets of shape "
        f"{f'{first} or {last}' if logits.ndim > 3 else f'{last} or {first}'}, or soft targets of their own shape, "
        f"got {tuple(target.shape)}"
    )


# Multi-label losses, each a sigmoid per class: torch's and timm's (those of timm's loss_type choices for
# multi-label targets; the newer ones are looked up by name, as older timm releases lack them).
MULTI_LABEL_TIMM = ("BinaryCrossEntropy", "AsymmetricLossMultiLabel", "PolyBinaryCrossEntropy", "TwoWayLoss")
MULTI_LABEL_TIMM += ("ZlprLoss", "DistributionBalancedLoss")
MULTI_LABEL = (nn.BCEWithLogitsLoss, nn.MultiLabelSoftMarginLoss) + tuple(
    getattr(timm.loss, name) for name in MULTI_LABEL_TIMM if hasattr(timm.loss, name)
)
REGRESSION = (nn.MSELoss, nn.L1Loss, nn.SmoothL1Loss, nn.HuberLoss, nn.GaussianNLLLoss, nn.PoissonNLLLoss)
REGRESSION_FUNCTIONS = (F.mse_loss, F.l1_loss, F.smooth_l1_loss, F.huber_loss)


def teacher_kind(criterion: Callable) -> str:
    """``"sigmoid"`` for binary cross-entropy and other multi-label criteria, else ``"softmax"``; a regression
    criterion is refused.

    A ``functools.partial`` is judged by the function or loss it binds (``partial(F.mse_loss, reduction=...)``).
    """
    while isinstance(criterion, functools.partial):
        criterion = criterion.func
    if isinstance(criterion, MULTI_LABEL) or criterion in (
        F.binary_cross_entropy_with_logits,
        F.multilabel_soft_margin_loss,
    ):
        return "sigmoid"
    if isinstance(criterion, nn.BCELoss) or criterion is F.binary_cross_entropy:
        raise ValueError(
            "BCELoss takes probabilities (after a sigmoid), and the sub branch learns from the main branch's logits: "
            "have the model return logits and use BCEWithLogitsLoss (the same loss, numerically safer)"
        )
    if isinstance(criterion, REGRESSION) or criterion in REGRESSION_FUNCTIONS:
        name = getattr(criterion, "__name__", type(criterion).__name__)
        raise ValueError(
            f"{name} is a regression criterion, and the sub branch learns the main branch's class probabilities "
            "(softmax or sigmoid of its logits), which regression outputs are not; if the outputs are class logits "
            "all the same, say which with teacher='softmax' or teacher='sigmoid'"
        )
    return "softmax"


def _setting_of(criterion: Callable, name: str, default):
    """A criterion's setting ``name``: a module's attribute, or a keyword a ``functools.partial`` binds."""
    while isinstance(criterion, functools.partial):
        if name in criterion.keywords:
            return criterion.keywords[name]
        criterion = criterion.func
    return getattr(criterion, name, default)


def ignore_index_of(criterion: Callable) -> int:
    """The class index a criterion leaves out: its ``ignore_index``, else torch's default, -100."""
    return _setting_of(criterion, "ignore_index", IGNORE_INDEX)


def reduction_of(criterion: Callable) -> str:
    """How a criterion reduces its per-sample losses: its ``reduction``, else ``"mean"``, as torch's and timm's
    losses default to."""
    reduction = _setting_of(criterion, "reduction", "mean")
    return reduction if isinstance(reduction, str) else "mean"


# Elements of a (rows, classes) chunk that soft_cross_entropy computes on at once, in float32: on a CPU, about the
# size of a core's L2 cache (4x faster than whole float32 arrays at a 49,152-token vocabulary, 2 cores); on an
# accelerator, large enough that the chunks' kernel launches do not count.
CHUNK_ELEMENTS = {"cpu": 2**18}
CHUNK_ELEMENTS_ELSEWHERE = 2**24


def rows_per_chunk(logits: torch.Tensor) -> int:
    """How many rows of ``logits`` (rows, classes) a chunk of ``CHUNK_ELEMENTS`` holds on their device."""
    return max(1, CHUNK_ELEMENTS.get(logits.device.type, CHUNK_ELEMENTS_ELSEWHERE) // max(logits.shape[1], 1))


def _exact(x: torch.Tensor, t: float = 1.0) -> torch.Tensor:
    """``x / t`` in float32, or in its own dtype where that is wider (float64); ``x`` itself where that is all."""
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    return x if t == 1.0 else x / t


class _SoftCrossEntropy(torch.autograd.Function):
    """Per row, ``-sum(softmax(teacher / t) * log_softmax(student / t))`` as ``logsumexp(s) - sum(p * s)``, in
    float32 chunks of rows; its backward, ``(softmax(s) - p) / t`` per row, recomputes both softmaxes chunk by chunk.
    Nothing of the logits' size is saved or made but the gradient: no float32 copies of either branch's logits,
    no log-softmax kept for the backward."""

    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
        rows = rows_per_chunk(student)
        out = student.new_empty(student.shape[0], dtype=torch.promote_types(student.dtype, torch.float32))
        for i in range(0, student.shape[0], rows):
            s, m = _exact(student[i : i + rows], t), _exact(teacher[i : i + rows], t)
            out[i : i + rows] = torch.logsumexp(s, -1) - (m.softmax(-1) * s).sum(-1)
        ctx.save_for_backward(student, teacher)
        ctx.t, ctx.rows = t, rows
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        student, teacher = ctx.saved_tensors
        t, rows = ctx.t, ctx.rows
        out = torch.empty_like(student)
        for i in range(0, student.shape[0], rows):
            s, m = _exact(student[i : i + rows], t), _exact(teacher[i : i + rows], t)
            out[i : i + rows] = s.softmax(-1).sub_(m.softmax(-1)).mul_(grad[i : i + rows, None] / t)
        return out, None, None


def soft_cross_entropy(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Each row's cross-entropy of ``student``'s softmax against ``teacher``'s, both logits ``(N, C)`` divided by
    ``temperature``, as float32 ``(N,)`` (float64 for float64 logits); the teacher gets no gradient. Computed in
    chunks of rows, with a backward of its own: for a language model's rows over its vocabulary, memory of the
    logits' size is the gradient only."""
    if student.shape != teacher.shape or student.ndim != 2:
        raise ValueError(
            f"student and teacher logits must be (rows, classes) alike, got {tuple(student.shape)} and "
            f"{tuple(teacher.shape)}"
        )
    return _SoftCrossEntropy.apply(student, teacher.detach(), float(temperature))


def distill(
    loss: SubBranchLoss,
    sub_logits: torch.Tensor,
    main_logits: torch.Tensor,
    target: torch.Tensor | None,
    kept: torch.Tensor | None,
) -> torch.Tensor:
    """``loss.sub_loss``, given ``kept`` only where a sub pass left places out: a ``SubBranchLoss`` subclass whose
    ``sub_loss`` takes no ``kept`` (written before it existed) works wherever no sub pass drops tokens."""
    if kept is None:
        return loss.sub_loss(sub_logits, main_logits, target)
    return loss.sub_loss(sub_logits, main_logits, target, kept=kept)


class SubBranchLoss(nn.Module):
    """Main-branch criterion plus the sub branch's distillation from the main logits.

    The distillation reduces as the criterion does: a mean over samples (tokens), or with ``reduction="sum"``
    a sum over them (and, for a sigmoid teacher, over classes, as ``BCEWithLogitsLoss(reduction="sum")``
    sums), so the two terms keep the weights given whatever the batch size.

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
        if not 0 < temperature < math.inf:
            raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
        if not (0 <= main_weight < math.inf and 0 <= sub_weight < math.inf):
            raise ValueError(f"loss weights must be finite and >= 0, got main {main_weight}, sub {sub_weight}")
        if main_weight == 0 and sub_weight == 0:
            raise ValueError("main_weight and sub_weight are both 0: the loss would be 0 and nothing would train")
        self.criterion = criterion
        self.main_weight, self.sub_weight = float(main_weight), float(sub_weight)
        self.temperature = float(temperature)
        self.teacher = teacher_kind(criterion) if teacher == "auto" else teacher
        self.summed = reduction_of(criterion) == "sum"

    def main_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Unweighted main-branch loss (token-level and dense logits as rows, see the module doc)."""
        loss = self.criterion(*as_rows(logits, target))
        if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(
                f"the criterion returned {shape}, not a scalar loss: give it reduction='mean' (or 'sum'), or "
                "reduce its output in a function of your own"
            )
        return loss

    def sub_loss(
        self,
        sub_logits: torch.Tensor,
        main_logits: torch.Tensor,
        target: torch.Tensor | None = None,
        kept: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Unweighted distillation loss; ``main_logits`` are detached here. ``target`` only matters for
        token-level and dense logits: tokens (pixels) whose target is the criterion's ``ignore_index`` are left out,
        and it tells where the classes are (``class_dim``). ``kept``: for token-level and dense logits, a bool
        tensor of their shape without the classes, True where the sub pass predicted (a sub pass that dropped
        tokens: the wrapper's ``sub_kept``); the others are left out too."""
        t = self.temperature
        dim = class_dim(sub_logits, target)
        sub, rows_target = as_rows(sub_logits, target, dim)
        main, _ = as_rows(main_logits.detach(), None, dim)
        if self.teacher == "sigmoid":
            sub, main = sub.float() / t, main.float() / t
            per_class = F.binary_cross_entropy_with_logits(sub, torch.sigmoid(main), reduction="none")
            per_row = per_class.sum(-1) if self.summed else per_class.mean(-1)
        else:
            per_row = soft_cross_entropy(sub, main, t)
        weight = None  # which rows count: a weight, not a selection (static shapes)
        if sub_logits.ndim > 2 and rows_target is not None and rows_target.ndim == 1:
            weight = rows_target != ignore_index_of(self.criterion)
        if kept is not None:
            places = sub_logits.movedim(dim, -1).shape[:-1]
            if sub_logits.ndim <= 2 or kept.shape != places:
                raise ValueError(
                    f"kept marks the places a sub pass predicted, one per token or pixel: shape {tuple(places)} for "
                    f"logits {tuple(sub_logits.shape)}, got {tuple(kept.shape)}"
                )
            weight = kept.reshape(-1) if weight is None else weight & kept.reshape(-1)
        if weight is not None:
            weight = weight.to(per_row.dtype)
            loss = (per_row * weight).sum()
            loss = loss if self.summed else loss / weight.sum().clamp(min=1)
        else:
            loss = per_row.sum() if self.summed else per_row.mean()
        return loss * (t * t)

    def forward(
        self,
        main_logits: torch.Tensor,
        sub_logits: torch.Tensor,
        target: torch.Tensor,
        kept: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Weighted sum of both terms, for a single backward."""
        main = self.main_weight * self.main_loss(main_logits, target)
        return main + self.sub_weight * distill(self, sub_logits, main_logits, target, kept)

    def extra_repr(self) -> str:
        w = f"main_weight={self.main_weight}, sub_weight={self.sub_weight}"
        summed = ", summed" if self.summed else ""
        return f"{w}, temperature={self.temperature}, teacher={self.teacher}{summed}"
