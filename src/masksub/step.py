"""The MaskSub optimizer step: two backwards, one gradient all-reduce, main-step memory.

Memory-saving order (the default): main forward, main backward (its graph is
freed), sub forward, sub backward; gradients add up in ``.grad``; then one
unscale, one clip and one optimizer step. Peak memory is about the larger of
the two passes instead of their sum, and the gradients equal those of the
summed loss.

Under ``DistributedDataParallel`` the main pass runs inside ``no_sync()`` so
only the sub backward all-reduces: one gradient all-reduce per optimizer step,
also with accumulation (every micro-batch but the last runs fully unsynced).
Under FSDP (``fully_shard``, or ``FullyShardedDataParallel``) the same order gives
one gradient reduce-scatter per sharded module and optimizer step.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable
from contextlib import nullcontext

import torch
from timm.utils import dispatch_clip_grad
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .language import align, language_model, router_loss
from .loss import SubBranchLoss, distill, ignore_index_of
from .outputs import forward, logits_of, split_labels
from .parallel import all_processes, clip_grad_norm, engine, fsdp1_class, grad_norm, no_sync, processes
from .prepared import inner_optimizer, sub_branch_model, wrapper_scaler
from .wrapper import check_one_backward, wrapped_inside

AMP_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
CLIP_MODES = ("norm", "value", "agc")


_EVAL_MODE = {  # a training step on a model left in eval mode (after an evaluation, say): warned once
    False: "Step: the model is in eval mode: dropout, drop path and BatchNorm statistics are off in both "
    "branches; call model.train() before training steps (model.eval() for evaluation)",
    True: "Step: the model is in eval mode, where dropout and drop path are off: the sub branch drops nothing "
    "and equals the main branch; call model.train() before training steps (model.eval() for evaluation)",
}


# Instructions that compute each autocast type on a CPU (``torch.cpu.get_capabilities``'s names), and how to say so.
CPU_AMP_INSTRUCTIONS = {
    torch.bfloat16: ("bf16", ("avx512_bf16", "amx_bf16", "avx_ne_convert", "bf16", "sve_bf16")),
    torch.float16: ("fp16", ("avx512_fp16", "amx_fp16", "avx_ne_convert", "fp16_arith")),
}


def slow_cpu_autocast(dtype: torch.dtype) -> bool:
    """Whether this CPU has none of the instructions that compute ``dtype`` (``CPU_AMP_INSTRUCTIONS``), so that
    autocast to it runs slower than float32. Where torch lists no such instructions (an older torch, without
    ``torch.cpu.get_capabilities``; another architecture): whether PyTorch's oneDNN kernels for it cannot run here.
    False where PyTorch cannot tell."""
    if dtype not in CPU_AMP_INSTRUCTIONS:
        return False
    names = CPU_AMP_INSTRUCTIONS[dtype][1]
    have = getattr(torch.cpu, "get_capabilities", dict)()
    if any(name in have for name in names):
        return not any(have.get(name) for name in names)
    check = "_is_mkldnn_bf16_supported" if dtype == torch.bfloat16 else "_is_mkldnn_fp16_supported"
    try:
        return not getattr(torch.ops.mkldnn, check)()
    except (AttributeError, RuntimeError):  # a build without the check
        return False


def token_share(loss: SubBranchLoss | None, target: torch.Tensor | None, num_items, processes: int) -> torch.Tensor:
    """What a micro-batch's losses (means over its labelled targets) are multiplied by so that every labelled target
    of the optimizer step weighs the same: its labelled targets' share of ``num_items`` (the step's, over all its
    micro-batches and processes), times the ``processes`` whose gradients DDP or FSDP average. An error naming the
    fix where ``num_items`` is no count, or the loss has no class-index target to count."""
    if loss is None or target is None or target.is_floating_point():
        raise ValueError(
            "num_items_in_batch weighs each micro-batch by its labelled targets, class indices of the criterion; "
            f"this step has {'no criterion' if loss is None else 'no class-index target'}: leave it out"
        )
    if isinstance(num_items, bool) or not isinstance(num_items, numbers.Integral | torch.Tensor):
        raise ValueError(f"num_items_in_batch must be a count of labelled targets, got {num_items!r}")
    if not isinstance(num_items, torch.Tensor) and num_items < 1:  # a tensor is not read: no host sync
        raise ValueError(f"num_items_in_batch must be at least 1, got {num_items}")
    labelled = (target != ignore_index_of(loss.criterion)).sum()
    return labelled * processes / num_items


class Step:
    """One call = one micro-batch; the optimizer steps every ``accum_steps`` calls.

    Args:
        model: a ``masksub.wrap``-ed model, optionally inside DistributedDataParallel or
            FullyShardedDataParallel, or sharded with ``fully_shard``. A plain (unwrapped) model
            trains without a sub branch: ``criterion`` alone, weight 1.
        optimizer: any torch optimizer over the wrapper's parameters (mask token included).
        criterion: the main-branch loss, or a ready ``SubBranchLoss``; None for a model that
            returns a dict of losses with the one to minimize under ``"loss"`` (pretraining).
        main_weight, sub_weight, temperature, teacher: see ``SubBranchLoss``.
        accum_steps: micro-batches per optimizer step; each loss is divided by it.
        clip_grad: clip threshold applied after both backwards (None: no clipping).
        clip_mode: ``"norm"``, ``"value"`` or ``"agc"`` (timm's dispatch_clip_grad); ``"agc"`` leaves out
            the model's head (its last two parameters), as timm's ``train.py`` and the NFNet recipe do.
        amp: None (fp32), ``"bf16"`` (autocast) or ``"fp16"`` (autocast + grad scaler; a
            ``ShardedGradScaler`` under FullyShardedDataParallel; refused under ``fully_shard``).
        scaler: a ``torch.amp.GradScaler`` to use for fp16 (one is made if None).
        memory_saving: False sums both losses and calls backward once (same
            gradients, both graphs alive at once: more memory).
        skip_nonfinite: skip the optimizer step (and drop its gradients) when a
            loss of the accumulation window or the gradient norm is not finite (with
            fp16 the grad scaler judges the gradients); costs one host sync per
            optimizer step. The result then has ``skipped=True``. Under DDP or FSDP every
            process skips when a loss is not finite on any (with fp16 that costs one
            scalar all-reduce per optimizer step), so weights and reports agree.
        backward: a function to back-propagate each loss with instead of ``loss.backward()``, which scales the
            loss itself: ``fabric.backward`` for a model and optimizer set up by Lightning Fabric (required there).
        sync_every_backward: reduce the gradients across processes at every backward (main, sub, every
            micro-batch) instead of once per optimizer step. Under FSDP the gradients then stay sharded
            between backwards, where an unsynced backward holds every sharded module's whole gradient on
            every process until the synced one; the price is one reduce-scatter per backward instead of one
            per step. Under DDP, whose gradients are whole on every process anyway, it only adds all-reduces.

    Returns a dict of detached tensors (``loss``, ``loss_main``, ``loss_sub``,
    ``logits`` and, on update steps with norm clipping, ``grad_norm``) plus
    ``updated``; reading a tensor's value (``.item()``) is the only host sync.

    ``state_dict()`` / ``load_state_dict()`` save and restore what a resume needs besides the model's and
    the optimizer's states: the fp16 grad scaler's scale and growth count.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        criterion: Callable,
        *,
        main_weight: float = 0.5,
        sub_weight: float = 0.5,
        temperature: float = 1.0,
        teacher: str = "auto",
        accum_steps: int = 1,
        clip_grad: float | None = None,
        clip_mode: str = "norm",
        amp: str | None = None,
        scaler: torch.amp.GradScaler | None = None,
        memory_saving: bool = True,
        skip_nonfinite: bool = False,
        backward: Callable | None = None,
        sync_every_backward: bool = False,
    ):
        if criterion is None or isinstance(criterion, SubBranchLoss):
            self.loss = criterion
        else:
            self.loss = SubBranchLoss(criterion, main_weight, sub_weight, temperature, teacher)
        if not isinstance(accum_steps, numbers.Integral) or isinstance(accum_steps, bool) or accum_steps < 1:
            raise ValueError(f"accum_steps must be a positive integer, got {accum_steps!r}")
        accum_steps = int(accum_steps)
        if clip_grad is not None and (
            isinstance(clip_grad, bool) or not isinstance(clip_grad, numbers.Real) or not 0 < clip_grad < math.inf
        ):
            # a negative norm threshold flips the gradients' sign, 0 zeroes them, NaN makes the weights NaN
            raise ValueError(f"clip_grad must be a finite number > 0 (None: no clipping), got {clip_grad!r}")
        if clip_mode not in CLIP_MODES:
            raise ValueError(f"clip_mode must be one of {CLIP_MODES}, got {clip_mode!r}")
        if amp is not None and amp not in AMP_DTYPES:
            raise ValueError(f"amp must be None, 'bf16' or 'fp16', got {amp!r}")
        self.model, self.optimizer = model, optimizer
        self.accum_steps, self.clip_grad, self.clip_mode = accum_steps, clip_grad, clip_mode
        self.memory_saving, self.skip_nonfinite = memory_saving, skip_nonfinite
        self.sync_every_backward = sync_every_backward
        self._finite: torch.Tensor | bool = True  # all losses of the window finite (a device tensor)
        sync = engine(model)  # the module that reduces gradients (inside a Fabric wrapper)
        fsdp1 = fsdp1_class()
        sharded = fsdp1 is not None and isinstance(sync, fsdp1)
        wrapped = self._sub_model = sub_branch_model(model)
        self.has_sub = wrapped is not None
        self._language = language_model(model)  # how a language model's labels meet its logits
        if not self.has_sub and (found := wrapped_inside(model)) is not None:
            name, kind = found
            raise ValueError(
                f"{name} was given to masksub.wrap(sub={kind!r}), which returned a wrapper that holds the sub branch, "
                "and Step got the model without it: it would train without the sub branch. Pass the wrapper "
                "(model = masksub.wrap(model, ...)), or call the wrapper's unwrap() to train the model plain"
            )
        if self.has_sub and any(isinstance(m, nn.DataParallel) for m in model.modules()):
            raise ValueError(
                "nn.DataParallel copies the model onto each GPU at every forward, and the copies do not follow the "
                "sub branch's switches (masking hooks, drop rates): the sub pass would equal the main pass. Use "
                "DistributedDataParallel (torchrun --nproc_per_node N), or one GPU"
            )
        unsynced_backward = not sync_every_backward and (accum_steps > 1 or (self.has_sub and memory_saving))
        if unsynced_backward and getattr(sync, "static_graph", False) and isinstance(sync, DistributedDataParallel):
            # torch fails there with an internal assert (its reducer has no autograd hooks yet)
            unsynced = ["the main pass's backward"] if self.has_sub and memory_saving else []
            unsynced += ["every micro-batch but a window's last"] if accum_steps > 1 else []
            summed = " or memory_saving=False (one backward of the summed loss)" if accum_steps == 1 else ""
            raise ValueError(
                "DistributedDataParallel(static_graph=True) cannot back-propagate inside no_sync() before a synced "
                f"backward has recorded its graph, and Step runs {' and '.join(unsynced)} there: build DDP without "
                f"static_graph{summed}"
            )
        # AGC's exception: the model's head (the plain model's last two parameters, not the mask token's)
        head = list((wrapped.model if self.has_sub else model).parameters())[-2:] if clip_mode == "agc" else []
        self._agc_skip = {id(p) for p in head}
        if self.has_sub and self.loss is None:
            raise ValueError("a sub-branch model needs a criterion for its main branch")
        if self.has_sub:
            held = {id(p) for group in optimizer.param_groups for p in group["params"]}
            branch = wrapped.branch
            missing = [f"branch.{n}" for n, p in branch.named_parameters() if p.requires_grad and id(p) not in held]
            missing += [f"model.{n}" for n, p in wrapped.named_added_parameters().items() if id(p) not in held]
            if missing:
                raise ValueError(
                    f"the optimizer does not hold the sub branch's parameters {missing} (made by masksub.wrap): "
                    "create it from the wrapped model's parameters, after wrap()"
                )
        fully_sharded = callable(getattr(sync, "set_requires_gradient_sync", None))  # fully_shard (FSDP2)
        self._fsdp1 = sharded
        if (sharded or fully_sharded) and clip_grad is not None and clip_mode == "agc":
            raise ValueError("clip_mode='agc' clips each parameter by its own norm, which FSDP shards; use 'norm'")
        self.amp_dtype = AMP_DTYPES.get(amp)
        # An optimizer prepared by Accelerate or Fabric for fp16 holds the grad scaler and steps it itself.
        self._steps_scaler = wrapper_scaler(model, optimizer, scaler, self.amp_dtype, backward)
        if self._steps_scaler is not None:
            scaler = self._steps_scaler
        self.backward_fn = backward  # scales the loss itself (fabric.backward)
        if backward is not None and scaler is None and self.amp_dtype is torch.float16:
            raise ValueError("backward= scales the loss itself: amp='fp16' would add a second scaler; leave amp out")
        if self.amp_dtype is torch.float16 and scaler is None:
            if fully_sharded:
                raise ValueError(
                    "amp='fp16' under fully_shard needs a grad scaler whose skipped steps agree across processes, "
                    "which torch.amp.GradScaler does not do with sharded gradients: use amp='bf16', or pass scaler="
                )
            if sharded:  # reduces its inf/NaN check across processes
                from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

                scaler = ShardedGradScaler(self.device_type)
            else:
                scaler = torch.amp.GradScaler(self.device_type)
        self.scaler = scaler
        self._micro = 0  # micro-batches seen since the last optimizer step
        self._weighting = None  # the window's: "mean" (1 / accum_steps) or "tokens" (num_items_in_batch)
        self._warned_eval = False
        self._checked_cpu_amp = False

    def _own_scaler(self) -> torch.amp.GradScaler | None:
        """The grad scaler whose state this step keeps (Accelerate and Fabric save the one they hold)."""
        return self.scaler if self._steps_scaler is None else None

    def state_dict(self) -> dict:
        """The step's state for a checkpoint, taken between optimizer steps (after a call that returned
        ``updated=True``): the gradients of an unfinished accumulation window are not part of it."""
        if self._micro:
            raise RuntimeError(
                f"Step.state_dict() inside an accumulation window ({self._micro} of {self.accum_steps} "
                "micro-batches done): its gradients would be lost on resume; save after a call that returned "
                "updated=True"
            )
        scaler = self._own_scaler()
        return {"scaler": None if scaler is None else scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``'s state; a new accumulation window starts."""
        scaler, saved = self._own_scaler(), state.get("scaler")
        if (saved is None) != (scaler is None):
            have = "no grad scaler" if scaler is None else "a grad scaler (amp='fp16')"
            raise ValueError(
                f"the state was saved {'with' if saved is not None else 'without'} a grad scaler and this Step has "
                f"{have}: resume with the amp setting the run was saved with"
            )
        if scaler is not None:
            scaler.load_state_dict(saved)
        self._micro, self._finite, self._weighting = 0, True, None

    @property
    def device_type(self) -> str:
        """Where the model is now: a model moved after the Step was made (``model.cuda()``) autocasts there."""
        return next(self.model.parameters()).device.type

    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        device = self.device_type
        if not self._checked_cpu_amp and device == "cpu":
            self._checked_cpu_amp = True
            if slow_cpu_autocast(self.amp_dtype):
                name, instructions = CPU_AMP_INSTRUCTIONS[self.amp_dtype]
                warnings.warn(
                    f"Step: amp={name!r} on a CPU with none of the instructions that compute {name} "
                    f"({', '.join(instructions)}): autocast runs slower than float32 here (bf16: 3.3x a ViT-S "
                    "step on an AVX-512 CPU without them, 13x the default recipe's step on an AVX2 CPU). Train in "
                    "float32 on this machine: amp=None (masksub train: --train.amp none)",
                    stacklevel=4,
                )
        return torch.autocast(device, dtype=self.amp_dtype)

    def _no_sync(self):
        return nullcontext() if self.sync_every_backward else no_sync(self.model)

    def _backward(self, loss: torch.Tensor) -> None:
        if self.skip_nonfinite:
            # A non-finite loss makes this process's gradients NaN (a finite one is times 1: the same
            # gradients), so the gradient reduction carries it to every process: under DDP or FSDP all skip
            # the step, also when that loss's own gradients were finite (a NaN constant added to it).
            loss = loss * torch.where(loss.detach().isfinite(), 1.0, math.nan)
        if self.backward_fn is not None:
            self.backward_fn(loss)
        else:
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def _forward(self, x, sub: bool = False):
        try:
            return forward(self.model, x, sub)
        except TypeError as e:
            if not sub or "'sub'" not in str(e):
                raise
            raise TypeError(
                f"{type(self.model).__name__} holds a masksub.wrap-ed model, but its forward does not take sub=True "
                "(the sub branch): give Step the wrapped model itself, or inside DDP, FSDP, torch.compile, Accelerate "
                "or Fabric, or pass sub= through your forward"
            ) from e

    def __call__(
        self,
        x,
        target: torch.Tensor | None = None,
        *,
        last: bool = False,
        num_items_in_batch: int | torch.Tensor | None = None,
    ) -> dict:
        """``x``: an input batch, or a mapping of keyword inputs (a text batch: ``input_ids``,
        ``attention_mask``...); a mapping's ``labels`` are the target when ``target`` is None and
        never reach the model, so a Hugging Face model does not compute its own loss twice. A language
        model's target is read as its own loss reads its labels (``masksub.language``): a causal language
        model's shifted one token left, an encoder-decoder's decoder inputs made from them.

        ``last=True`` ends the accumulation window with this micro-batch (the last batch of an epoch
        whose batch count ``accum_steps`` does not divide): the optimizer steps on the micro-batches
        of the window so far, with the gradient of their mean loss, as a full window has it.

        ``num_items_in_batch``: the labelled targets (class indices other than the criterion's ``ignore_index``:
        a language model's predicted tokens, a tagger's tagged words) of the whole optimizer step, all its
        micro-batches on all processes (under DDP or FSDP, the sum of each process's count). Each micro-batch's
        losses, means over its own targets, then weigh by its share of them instead of ``1 / accum_steps``:
        every target of the step weighs the same, as transformers' own loss weighs them given this count, and k
        micro-batches give the gradient of one batch of them all. Give it to every micro-batch of a window or
        to none.

        A call that raises (a bad batch; an out-of-memory error a loop catches to skip the batch) may
        have reached the gradients in part: the gradients accumulated since the last optimizer step are
        dropped, and the next call starts a new one."""
        if not torch.is_grad_enabled():  # before any state changes: the step's accumulation count stays right
            raise RuntimeError(
                "masksub.Step trains, but gradients are off here (inside torch.no_grad() or torch.inference_mode(), "
                "an evaluation's context, say): call it outside that block"
            )
        try:
            return self._micro_batch(x, target, last, num_items_in_batch)
        except BaseException:
            self._drop_window()
            raise

    def _drop_window(self) -> None:
        """Forget the micro-batches since the last optimizer step (a call raised): without this, the count
        ran past ``accum_steps`` and no later call ever stepped the optimizer."""
        self._micro, self._finite, self._weighting = 0, True, None
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None and self._steps_scaler is None:
            # an unscale_ of the dropped window is forgotten, as update() forgets it
            getattr(self.scaler, "_per_optimizer_states", {}).clear()

    def _scale(self, target: torch.Tensor | None, num_items) -> float | torch.Tensor:
        """What this micro-batch's losses are multiplied by: ``1 / accum_steps``, or its share of the step's
        ``num_items_in_batch`` (times the processes whose gradients DDP or FSDP average)."""
        weighting = "mean" if num_items is None else "tokens"
        if self._weighting not in (None, weighting):
            raise ValueError(
                "num_items_in_batch was given to some micro-batches of this optimizer step and not to others: give "
                "it to every micro-batch of a window (the same count), or to none"
            )
        self._weighting = weighting
        if num_items is None:
            return 1 / self.accum_steps
        return token_share(self.loss, target, num_items, processes(self.model))

    def _main_loss(self, output, target: torch.Tensor | None, scale) -> tuple[torch.Tensor, torch.Tensor]:
        """The main branch's loss (the criterion on ``output``'s logits, plus the router losses a mixture of experts'
        own loss adds: ``router_loss``), and what its gradient is taken of: the criterion times ``scale``, the router
        losses (a mean per micro-batch) times ``1 / accum_steps`` (also in a window of ``num_items_in_batch`` that
        ``last=True`` ends early, which is not rescaled: there they weigh a little less than its mean)."""
        loss = self.loss.main_loss(logits_of(output), target)
        router = router_loss(self.model, output)
        if router is None:
            return loss, loss * scale
        return loss + router, loss * scale + router / self.accum_steps

    def _micro_batch(self, x, target: torch.Tensor | None, last: bool = False, num_items=None) -> dict:
        x, target = align(*self._language, *split_labels(x, target))
        if self.has_sub and not self._warned_eval and not self._sub_model.training:
            self._warned_eval = True
            warnings.warn(_EVAL_MODE[self._sub_model.sub_kind != "mask"], stacklevel=3)
        if self._micro == 0:
            self.optimizer.zero_grad(set_to_none=True)
        self._micro += 1
        scale = self._scale(target, num_items)
        update = last or self._micro == self.accum_steps

        # Only the last backward of the last micro-batch reduces gradients across processes. The contexts
        # are never nested: fully_shard's sync switch is a flag, not a stack.
        synced = nullcontext if update else self._no_sync
        if not self.has_sub:
            with synced(), self._autocast():
                main = self._forward(x)
                if self.loss is None:  # the model's own loss
                    loss_main = main["loss"]
                    scaled = loss_main * scale
                else:
                    loss_main, scaled = self._main_loss(main, target, scale)
            with synced():
                self._backward(scaled)
        elif self.memory_saving:
            with self._no_sync():
                with self._autocast():
                    output = self._forward(x)
                    main = logits_of(output)
                    loss_main, scaled = self._main_loss(output, target, scale)
                    del output  # the logits alone are kept (a cache it returned is not)
                self._backward(self.loss.main_weight * scaled)  # frees the main graph
            with synced(), self._sub_model.sub_pass():  # drop rates held for checkpointed recomputation
                with self._autocast():
                    sub = logits_of(self._forward(x, sub=True))
                    loss_sub = distill(self.loss, sub, main, target, self._sub_model.sub_kept)
                self._backward(self.loss.sub_weight * scale * loss_sub)
        else:
            check_one_backward(self._sub_model.branch, self._sub_model.model, "Step(memory_saving=False)")
            with self._autocast():
                # Unsynced main forward: DDP then broadcasts buffers before it and not again before the
                # sub forward, which would overwrite in place buffers the main graph saved (BERT's ids).
                with no_sync(self.model):  # no backward here: also with sync_every_backward
                    output = self._forward(x)
                main = logits_of(output)
                loss_main, scaled = self._main_loss(output, target, scale)
                with synced():  # DDP decides at the forward whether the backward all-reduces
                    sub = logits_of(self._forward(x, sub=True))
                loss_sub = distill(self.loss, sub, main, target, self._sub_model.sub_kept)
            with synced():
                self._backward(self.loss.main_weight * scaled + self.loss.sub_weight * scale * loss_sub)

        if self.loss is None:  # self-supervised: every reported loss
            out = {k: v.detach() for k, v in main.items()}
        else:
            out = {"loss": loss_main.detach(), "logits": logits_of(main).detach()}
        out["loss_main"] = loss_main.detach()
        if self.has_sub:
            out["loss_sub"] = loss_sub.detach()
            out["loss"] = self.loss.main_weight * out["loss_main"] + self.loss.sub_weight * out["loss_sub"]
        loss = out["loss"]
        if self.skip_nonfinite:
            self._finite = torch.isfinite(loss) & self._finite
        if update:
            micro, self._micro = self._micro, 0
            out.update(self._update(micro))
            self._finite, self._weighting = True, None
        out["updated"] = update
        return out

    def _update(self, micro: int) -> dict:
        out = {}
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if micro < self.accum_steps and self._weighting == "mean":  # a short window: each loss was / accum_steps
            for p in params:  # once per short window; in place, also on FSDP's sharded gradients
                if p.grad is not None:
                    p.grad.mul_(self.accum_steps / micro)
        if self.scaler is not None:
            self.scaler.unscale_(inner_optimizer(self.optimizer))
        norm = None
        if self.clip_grad is not None and self.clip_mode == "norm":
            norm = out["grad_norm"] = clip_grad_norm(self.model, params, self.clip_grad)
        elif self.skip_nonfinite and self.scaler is None:
            # FullyShardedDataParallel's local gradients are shards: its clip (by inf: a no-op) gives the norm
            norm = clip_grad_norm(self.model, params, math.inf) if self._fsdp1 else grad_norm(params)
        if self.skip_nonfinite:
            # A finite loss can still give non-finite gradients. With fp16 the scaler skips those steps
            # itself (and lowers its scale): only the loss is checked then.
            if self.scaler is not None:
                # the scaler skips the step on every process alike; that a loss was not finite, which the
                # step reports, is agreed on with one scalar all-reduce (none for a model not distributed)
                finite = all_processes(self._finite, self.model)
            else:  # the gradients are reduced across processes: their norm is the same on each
                finite = self._finite & torch.isfinite(norm)
            if not bool(finite):  # the one host sync this option costs
                self.optimizer.zero_grad(set_to_none=True)
                if self.scaler is not None:
                    self.scaler.update()  # after unscale_: a scale that overflowed is lowered
                out["skipped"] = True
                return out
        if self.clip_grad is not None and self.clip_mode != "norm":
            clipped = [p for p in params if id(p) not in self._agc_skip]
            dispatch_clip_grad(clipped, self.clip_grad, mode=self.clip_mode)
        if self.scaler is not None and self._steps_scaler is None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        return out
