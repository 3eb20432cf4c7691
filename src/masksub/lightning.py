"""MaskSub in a PyTorch Lightning ``LightningModule``: one call in ``training_step``.

    class Classifier(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = masksub.wrap(timm.create_model("resnet18", num_classes=10), sub="mask", ratio=0.5)
            self.masksub = TrainingStep(torch.nn.CrossEntropyLoss())

        def training_step(self, batch, batch_idx):
            x, y = batch
            return self.masksub(self, x, y)

The call runs the memory-saving order inside Lightning's automatic optimization: the main forward
and the backward of the weighted main loss (through the Trainer's strategy, so the precision plugin
scales it and the module's ``backward`` and backward hooks apply), then the sub forward. It returns
the loss for Lightning to back-propagate: only its sub term still has a graph, its value is the
whole loss. Everything else stays Lightning's: gradient accumulation, clipping, the optimizer and
scheduler steps, mixed precision, logging and checkpoints. One thing moves: Lightning zeroes the
gradients after ``training_step`` returns, which would drop the main pass's gradient, so the module's
``optimizer_zero_grad`` hook runs at the start of each accumulation window instead (see
``TrainingStep._zero_grad_at_window_start``).

Under DDP the main backward runs before DDP prepares its reducer for the step's backward, which it
does when ``training_step`` returns, so it accumulates locally; the sub backward all-reduces. That
is one gradient all-reduce per optimizer step, as in the plain step. Strategies where a backward
inside ``training_step`` is not known to work (FSDP, DeepSpeed, model parallel, XLA) get the summed
loss and one backward instead: the same gradients, with both graphs alive at once.

Lightning itself is not imported here: the module works with ``lightning`` and ``pytorch_lightning``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn

from .language import align, language_model, router_loss
from .loss import SubBranchLoss, distill
from .outputs import forward, logits_of, split_labels
from .step import token_share
from .wrapper import SubBranchModel, SubPassHold, check_one_backward


def scale_gradient(loss: torch.Tensor, factor: torch.Tensor | None) -> torch.Tensor:
    """``loss`` itself in value, its gradient times ``factor`` (None: ``loss``)."""
    if factor is None:
        return loss
    extra = loss * (factor - 1)
    return loss + (extra - extra.detach())


# Strategies (by exact class name: DeepSpeed and XLA subclass DDPStrategy) under which a backward inside
# training_step is the same as Lightning's own.
TWO_BACKWARD_STRATEGIES = ("SingleDeviceStrategy", "DDPStrategy")


class TrainingStep(nn.Module):
    """Call it in ``training_step`` and return what it returns: ``return self.masksub(self, x, y)``.

    Args:
        criterion: the main-branch loss, or a ready ``SubBranchLoss``.
        main_weight, sub_weight, temperature, teacher: see ``masksub.SubBranchLoss``.
        model: the attribute path of the ``masksub.wrap``-ed model in the LightningModule (``"model"``,
            ``"net.backbone"``); None finds the only one.
        memory_saving: None (default): the two-backward order wherever it works, else the summed loss
            (with a warning); True: the two-backward order, or an error saying why it cannot run;
            False: one backward of the summed loss.
        log: log the unweighted ``loss_main`` and ``loss_sub`` with ``LightningModule.log``.

    ``forward(module, x, target=None, num_items_in_batch=None)`` takes the LightningModule and the batch's input (a
    tensor, or a mapping of keyword inputs whose ``labels`` are the target, read as a language model's own loss reads
    them: ``masksub.language``) and returns a dict: ``loss`` (for
    Lightning), and the detached ``loss_main``, ``loss_sub`` and main-branch ``logits``. Without
    gradients (``validation_step``, ``test_step``) it returns the same dict from the two forwards
    and does nothing else: no backward, no gradient zeroing, no logging.

    ``num_items_in_batch``: for token-level targets (a language model's), the labelled targets of the whole optimizer
    step (all its accumulated micro-batches, on all processes: all-reduce each process's count). Lightning divides
    each micro-batch's loss by ``accumulate_grad_batches``, so micro-batches of few labelled tokens weigh as much as
    long ones; given the count, each micro-batch's losses weigh by its share of it instead (as ``Step`` and the
    Trainer weigh them given it), so that every token of the step weighs the same. The returned ``loss`` keeps its
    value; its gradient is scaled. Give it to every micro-batch of a window or to none.
    """

    def __init__(
        self,
        criterion: Callable,
        *,
        main_weight: float = 0.5,
        sub_weight: float = 0.5,
        temperature: float = 1.0,
        teacher: str = "auto",
        model: str | None = None,
        memory_saving: bool | None = None,
        log: bool = True,
    ):
        super().__init__()
        if isinstance(criterion, SubBranchLoss):
            self.loss = criterion
        else:
            self.loss = SubBranchLoss(criterion, main_weight, sub_weight, temperature, teacher)
        self.model_path, self.memory_saving, self.log_losses = model, memory_saving, log
        self._warned = False
        self._zeroed_at = None  # (trainer, optimizer step) when the gradients were last zeroed
        self._sub_hold = SubPassHold()

    def forward(self, module: nn.Module, x, target: torch.Tensor | None = None, num_items_in_batch=None) -> dict:
        trainer = self._trainer(module)
        runner, model = self._model(module)
        self._sub_hold.close()  # rates a loss left without its backward still holds (an OOM in the backward)
        training = torch.is_grad_enabled()  # else validation_step or test_step: both losses, nothing else
        two_backwards = training and self._two_backwards(trainer)
        if training:
            self._zero_grad_at_window_start(module, trainer)
        x, target = align(*language_model(model), *split_labels(x, target))
        factor = None  # the gradients' weight, as Lightning divides them by the accumulation; else by the tokens
        if training and num_items_in_batch is not None:
            share = token_share(self.loss, target, num_items_in_batch, trainer.world_size)
            factor = share * trainer.accumulate_grad_batches
        output = forward(runner, x)
        main, router = logits_of(output), router_loss(model, output)
        loss_main = scale_gradient(self.loss.main_loss(main, target), factor)
        if router is not None:  # a mixture of experts' router losses, which its own loss adds (a per-batch mean)
            loss_main = loss_main + router
        del output
        if two_backwards:
            # Scaled as Lightning scales the loss it back-propagates; backward outside autocast, as Lightning's.
            weighted = self.loss.main_weight * loss_main / trainer.accumulate_grad_batches
            with torch.autocast(main.device.type, enabled=False):
                trainer.strategy.backward(weighted, trainer.optimizers[0] if trainer.optimizers else None)
            loss_main = loss_main.detach()  # its graph is freed: the value is only reported
        if two_backwards:  # the drop rates (DropSub, PathSub) stay until Lightning's backward recomputed
            self._sub_hold.enter(model.branch)
        elif training:
            check_one_backward(model.branch, model.model, "TrainingStep's summed loss (memory_saving=False)")
        loss_sub = distill(self.loss, logits_of(forward(runner, x, sub=True)), main, target, model.sub_kept)
        loss_sub = scale_gradient(loss_sub, factor)
        out = {
            "loss": self.loss.main_weight * loss_main + self.loss.sub_weight * loss_sub,
            "loss_main": loss_main.detach(),
            "loss_sub": loss_sub.detach(),
            "logits": main.detach(),
        }
        if two_backwards:
            self._sub_hold.release_after_backward(out["loss"])
        if self.log_losses and training:  # the training step's loss_main/loss_sub keep their meaning
            module.log_dict({"loss_main": out["loss_main"], "loss_sub": out["loss_sub"]})
        return out

    def _zero_grad_at_window_start(self, module: nn.Module, trainer) -> None:
        """Lightning zeroes the gradients after ``training_step`` returns (on the first micro-batch of each
        accumulation window), which would drop the main pass's gradient. So the module's ``optimizer_zero_grad``
        hook (a subclass's override included) runs here instead, on the first micro-batch after each optimizer
        step, and Lightning's own call to it does nothing from the first call on (in both orders, so that a
        module trained in one order and then the other stays right)."""
        if module.__dict__.get("optimizer_zero_grad") is not _zeroed_by_training_step:
            module.optimizer_zero_grad = _zeroed_by_training_step
        step = (id(trainer), trainer.global_step)  # counts every optimizer step, also those fp16 skips
        if step != self._zeroed_at and trainer.optimizers:
            batch_idx = trainer.fit_loop.epoch_loop.batch_idx
            type(module).optimizer_zero_grad(module, trainer.current_epoch, batch_idx, trainer.optimizers[0])
            self._zeroed_at = step

    @staticmethod
    def _trainer(module: nn.Module):
        trainer = getattr(module, "_trainer", None)
        if trainer is None or not hasattr(module, "automatic_optimization"):
            raise RuntimeError(
                "TrainingStep runs in the training_step of a LightningModule that a lightning Trainer is fitting: "
                "call it as self.masksub(self, x, y) there (in a loop of your own, use masksub.Step)"
            )
        if not module.automatic_optimization:
            raise ValueError(
                "TrainingStep back-propagates the main loss and returns the sub loss for Lightning's automatic "
                "optimization; with automatic_optimization=False it would not run. Keep automatic optimization on"
            )
        if any(isinstance(opt, torch.optim.LBFGS) for opt in trainer.optimizers):
            raise ValueError(
                "LBFGS runs training_step several times per optimizer step, and TrainingStep zeroes the gradients "
                "once per step: use a first-order optimizer"
            )
        return trainer

    def _model(self, module: nn.Module) -> tuple[nn.Module, SubBranchModel]:
        """What to call (the wrapped model, or the ``torch.compile``-d module around it) and the wrapped model."""
        if self.model_path is None:
            found = [name for name, m in module.named_modules() if isinstance(m, SubBranchModel)]
            if len(found) != 1:
                what = "none" if not found else f"{len(found)} ({', '.join(found)})"
                raise ValueError(
                    f"TrainingStep needs one masksub.wrap-ed model in the LightningModule, found {what}: "
                    "assign masksub.wrap(model) to it, or name the one to train with TrainingStep(..., model='name')"
                )
            # looked up by name from now on; torch.compile(wrapped) holds it as _orig_mod: the compiled one runs
            self.model_path = found[0].removesuffix("._orig_mod")
        runner = module.get_submodule(self.model_path)
        wrapped = getattr(runner, "_orig_mod", runner)
        if not isinstance(wrapped, SubBranchModel):
            raise TypeError(f"{self.model_path!r} is a {type(runner).__name__}, not a masksub.wrap-ed model")
        return runner, wrapped

    def _two_backwards(self, trainer) -> bool:
        blocker = self._second_backward_blocker(trainer)
        if self.memory_saving and blocker:
            raise ValueError(
                f"memory_saving=True needs a backward inside training_step, but {blocker}; "
                "pass memory_saving=False (one backward of the summed loss, same gradients)"
            )
        if self.memory_saving is None and blocker and not self._warned:
            warnings.warn(
                f"TrainingStep's memory-saving order needs a backward inside training_step, but {blocker}; it returns "
                "the summed loss for one backward instead (same gradients, both graphs alive at once: more activation "
                "memory). memory_saving=False chooses this without the warning",
                stacklevel=3,
            )
            self._warned = True
        return blocker is None if self.memory_saving is None else self.memory_saving

    @staticmethod
    def _second_backward_blocker(trainer) -> str | None:
        strategy = trainer.strategy
        name = type(strategy).__name__
        if name not in TWO_BACKWARD_STRATEGIES:
            return f"{name} is not a strategy where that is known to work ({', '.join(TWO_BACKWARD_STRATEGIES)} are)"
        if getattr(strategy.model, "static_graph", False):
            return "DDP with static_graph=True expects one backward per forward"
        return None


def _zeroed_by_training_step(epoch, batch_idx, optimizer) -> None:
    """Lightning's zero_grad after ``training_step``: already done by ``TrainingStep`` before its main backward."""
