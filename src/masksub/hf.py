"""MaskSub in Hugging Face's ``transformers.Trainer``: ``MaskSubTrainer`` is a drop-in replacement.

    trainer = MaskSubTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                             sub="mask", ratio=0.5)

Each training micro-batch runs the memory-saving order: the main forward and the backward of
``main_weight * criterion(main, labels)`` inside ``no_sync``, then the sub forward, whose loss
``sub_weight * distill(sub, main)`` the Trainer back-propagates with its own ``backward`` (the one
gradient all-reduce under DDP). The main graph is freed before the sub forward, so peak memory is
about the plain Trainer's. Everything else is the Trainer's own: gradient accumulation, mixed
precision, DDP/FSDP through accelerate, logging (plus ``loss_main`` and ``loss_sub``), checkpoints.
Where a second backward cannot work (DeepSpeed steps inside its backward; LOMO updates there; DDP's
static graph) it returns the summed loss for one backward instead: same gradients, both graphs alive together.
An extractive question-answering batch (``start_positions`` and ``end_positions``, no ``labels``) trains on the
model's own loss, its start and end logits each distilled over the positions. A causal language model (supervised
fine-tuning) or an encoder-decoder (translation, summarization) trains on its labels as its own loss reads them
(``masksub.language``): each predicted token is distilled over the vocabulary. Evaluation and prediction use the
plain model and its own loss. Nothing is added to the model, except
for Swin, SwinV2 and FocalNet classifiers with ``sub="mask"``: a mask token in
the slot their embeddings have for one (``swin.embeddings.mask_token``), which the Trainer's optimizer,
DDP and checkpoints then hold; ``from_pretrained`` of the classifier leaves it out of the saved
model (its load report lists it as unexpected); ``SwinForMaskedImageModeling`` and kin load it.
A timm Swin (or another model of timm's ``masktoken`` adapter) inside transformers' ``TimmWrapper``
gets its token the same way, as ``timm_model.mask_token``. Under a PEFT wrapper, whose checkpoints
hold the adapter only, the token is saved beside them (``masksub_added_parameters.safetensors``) and
resuming reads it. Resuming and ``load_best_model_at_end`` read a checkpoint whose weights transformers 5
saved under older names (a ViT's, Swin's, BEiT's) through ``from_pretrained``: ``load_renamed_checkpoint``.

Needs ``transformers`` (``pip install 'masksub[text]'``).
"""

from __future__ import annotations

import contextlib
import json
import os

import torch
import torch.nn.functional as F
import transformers

from .adapters import resolve_adapter
from .language import align, labelled_tokens, language_model, router_loss
from .loss import IGNORE_INDEX, SubBranchLoss, as_rows, distill
from .outputs import ANSWER_POSITIONS, logits_of, split_labels
from .wrapper import SubPassHold, check_one_backward, wrap

# beside a PEFT checkpoint: the mask token the sub branch put into the base model, which PEFT does not save
ADDED_PARAMETERS_NAME = "masksub_added_parameters.safetensors"


def answer_loss(logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """An extractive question-answering model's own loss: the mean of the start's and the end's cross-entropy over
    the positions, ``logits`` (B, 2, L) and ``positions`` (B, 2) (IGNORE_INDEX where past the sequence); no label
    smoothing, as the plain Trainer smooths ``labels`` only."""
    start, end = (F.cross_entropy(logits[:, i].float(), positions[:, i], ignore_index=IGNORE_INDEX) for i in (0, 1))
    return (start + end) / 2


def _saved_tensor_files(folder: str) -> dict[str, str] | None:
    """Each tensor name in a checkpoint folder's safetensors weights -> its file (one file, or shards and their
    index), or None when the folder holds other weights."""
    single = os.path.join(folder, transformers.utils.SAFE_WEIGHTS_NAME)
    index = os.path.join(folder, transformers.utils.SAFE_WEIGHTS_INDEX_NAME)
    if os.path.isfile(single):
        from safetensors import safe_open

        with safe_open(single, "pt") as f:
            return dict.fromkeys(f.keys(), single)
    if os.path.isfile(index):
        with open(index) as f:
            return {name: os.path.join(folder, shard) for name, shard in json.load(f)["weight_map"].items()}
    return None


@contextlib.contextmanager
def _quiet_loading():
    logs, bars = transformers.logging.get_verbosity(), transformers.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(logs)
        if bars:
            transformers.logging.enable_progress_bar()


def load_renamed_checkpoint(model: torch.nn.Module, folder: str) -> bool:
    """Load a Trainer checkpoint whose tensors ``save_pretrained`` wrote under older names into ``model``; False
    (nothing loaded) when its names are the model's own, or it cannot be read so.

    transformers 5 renames some models' weights (a Swin's ``attention.self.query`` is ``attention.q_proj``) and
    writes checkpoints under the old names; ``from_pretrained`` renames them back, but the Trainer's resume and
    ``load_best_model_at_end`` load the file as it is, leaving every renamed weight as it was (a warning lists
    them). Here ``from_pretrained`` reads the folder, and tensors saved under the model's own names that it
    leaves out (the sub branch's mask token) come from the files."""
    files = _saved_tensor_files(folder)
    own = model.state_dict()
    if files is None or not isinstance(model, transformers.PreTrainedModel) or own.keys() <= files.keys():
        return False
    with _quiet_loading():  # its report would list the mask token as unexpected, which is loaded below
        loaded, info = type(model).from_pretrained(folder, config=model.config, output_loading_info=True)
    state = {name: t for name, t in loaded.state_dict().items() if name in own}
    rest = sorted((own.keys() & files.keys()) - state.keys())
    if rest:
        from safetensors import safe_open

        for path in sorted({files[name] for name in rest}):
            with safe_open(path, "pt") as f:
                state.update({name: f.get_tensor(name) for name in rest if files[name] == path})
    if info["missing_keys"] or own.keys() - state.keys():  # not this model's checkpoint: the Trainer's load warns
        return False
    model.load_state_dict(state)
    return True


class MaskSubTrainer(transformers.Trainer):
    """``transformers.Trainer`` plus a sub branch, for sequence (or image, or token) classification.

    Args (besides the Trainer's own, all passed through):
        sub: ``"mask"`` (text models: masked tokens; vision models: dropped patch tokens for ViT and kin, the
            mask token for Swin and kin, masked pixel blocks for CNNs), ``"dropout"`` or ``"droppath"``.
        ratio: fraction of each sample's tokens masked, or the sub branch's drop probability.
        mask_options: options of the mask adapter (``mode``, ``mask_token_id``, ``special_ids``);
            by default the mask token and special tokens come from ``processing_class``.
        main_weight, sub_weight, temperature: see ``masksub.SubBranchLoss``.
        memory_saving: ``None`` (default): the two-backward order wherever it works, else the summed
            loss; ``True``: the two-backward order, or an error saying why it cannot run;
            ``False``: one backward of the summed loss.

    The main criterion is cross-entropy (with the Trainer's ``label_smoothing_factor``), or binary
    cross-entropy when ``config.problem_type`` is ``"multi_label_classification"`` (or, unset, when the
    labels are floats, as the model's own loss decides); the sub branch
    learns the main branch's softmax (sigmoid) prediction. Token classifiers are distilled per token,
    except tokens labelled -100 (special tokens, padding, continued words), which no loss sees; language
    models per predicted token (a causal one's labels shifted, as its own loss shifts them), except those
    labelled -100 (a prompt, padding). A language model's labelled tokens each weigh the same in an optimizer step,
    across its accumulated micro-batches (and its processes, with ``average_tokens_across_devices``), as the
    model's own loss weighs them given ``num_items_in_batch``: k micro-batches accumulated give the gradient of one
    batch k times their size. Other models' losses are means over each micro-batch, as their own losses are.
    """

    # compute_loss's loss is divided by the accumulation steps in every transformers release: a language model's
    # is weighed by its share of the step's labelled tokens (times the steps) first.
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        *args,
        sub: str = "mask",
        ratio: float = 0.5,
        mask_options: dict | None = None,
        main_weight: float = 0.5,
        sub_weight: float = 0.5,
        temperature: float = 1.0,
        memory_saving: bool | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if getattr(self, "compute_loss_func", None) is not None:
            raise ValueError(
                "MaskSubTrainer computes the training loss itself (cross-entropy with label_smoothing_factor, or "
                "binary cross-entropy for multi-label, plus the sub branch's distillation), so compute_loss_func "
                "would only change the evaluation loss; remove it, or use masksub.Step with your criterion"
            )
        self.model_accepts_loss_kwargs = False  # transformers < 5 reads this instead of loss_is_scaled_for_ga
        language_model(self.model)  # an error for a text generator whose labels it cannot read
        config = getattr(self.model, "config", None)
        if getattr(config, "problem_type", None) == "regression" or getattr(config, "num_labels", 2) == 1:
            raise ValueError("MaskSub distills class probabilities, and a regression head (num_labels=1) has none")
        options = dict(mask_options or {})
        text = sub == "mask" and resolve_adapter(self.model).name == "text"
        if text and "special_ids" not in options and "tokenizer" not in options:
            tokenizer = getattr(self, "processing_class", None) or getattr(self, "tokenizer", None)
            if tokenizer is None:
                raise ValueError(
                    "sub='mask' needs the tokenizer's mask token and special tokens: pass processing_class=tokenizer, "
                    "or mask_options={'mask_token_id': ..., 'special_ids': [...]}"
                )
            options["tokenizer"] = tokenizer
        self._wrap_args = (sub, options)
        self._wrap(self.model, ratio)
        self._sub_hold = SubPassHold()
        # by the problem: single-label (softmax teacher) or multi-label (sigmoid teacher)
        self.masksub_losses = {
            multi: SubBranchLoss(criterion, main_weight, sub_weight, temperature)
            for multi, criterion in ((False, torch.nn.CrossEntropyLoss()), (True, torch.nn.BCEWithLogitsLoss()))
        }
        blocker = self._second_backward_blocker()
        if memory_saving and blocker:
            raise ValueError(
                f"memory_saving=True needs two backwards per micro-batch, but {blocker}; "
                "pass memory_saving=False (one backward of the summed loss, same gradients)"
            )
        self.memory_saving = blocker is None if memory_saving is None else bool(memory_saving)
        self._loss_sums, self._loss_count = None, 0
        self._step_tokens = None  # a language model's labelled tokens in the optimizer step: (count, all processes)

    def _wrap(self, model, ratio: float) -> None:
        sub, options = self._wrap_args
        self._wrapped = wrap(model, sub, ratio, **options)  # the model plus the branch; read for .ratio
        self.sub_branch = self._wrapped.branch
        if any(True for _ in self.sub_branch.parameters()):
            raise ValueError(
                f"the {self.sub_branch.name!r} sub branch has parameters the Trainer's optimizer would not hold; "
                "use masksub.Step in your own loop for it, or mask input pixels, which needs none: "
                "mask_options={'adapter': 'pixels'}"
            )

    def call_model_init(self, trial=None):
        """A model that ``model_init`` builds at ``train()`` gets the sub branch at once, before the Trainer makes
        its optimizer and DDP: a mask token that the branch puts into the model must be among their parameters."""
        model = super().call_model_init(trial)
        if hasattr(self, "_wrapped"):  # not the call in Trainer.__init__, before the first wrap
            ratio = self._wrapped.ratio
            self._wrapped.unwrap()
            self._wrap(model, ratio)
        return model

    def get_decay_parameter_names(self, model) -> list[str]:
        """The Trainer's weight-decay names less the mask token the sub branch put into the model (a Swin's, a
        BEiT's): a learned input, not a weight, and kept out of weight decay as timm's optimizers keep it."""
        added = {id(p) for p in getattr(self.sub_branch, "added_parameters", list)()}
        names = set(super().get_decay_parameter_names(model))
        return [n for n, p in model.named_parameters() if n in names and id(p) not in added]

    def _added_outside_checkpoint(self) -> dict[str, torch.nn.Parameter]:
        """The parameters the sub branch put into the model that the model's own checkpoint leaves out: a Swin's
        mask token under a PEFT wrapper, whose ``save_pretrained`` writes the adapter only. Sharded (FSDP,
        DeepSpeed) models save and load through their engines and are left to them."""
        if not type(self.model).__module__.startswith("peft.") or self.is_fsdp_enabled or self.is_deepspeed_enabled:
            return {}
        return self._wrapped.named_added_parameters()

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The Trainer's save, and beside a PEFT adapter the mask token it leaves out: a resumed run goes on
        with the trained token, not a fresh one."""
        super()._save(output_dir, state_dict)
        added = self._added_outside_checkpoint()
        if added and self.args.should_save:
            from safetensors.torch import save_file

            path = os.path.join(output_dir or self.args.output_dir, ADDED_PARAMETERS_NAME)
            save_file({name: p.detach().cpu().contiguous() for name, p in added.items()}, path)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """The Trainer's resume (with renamed weights mapped back: ``load_renamed_checkpoint``), and the mask token
        ``_save`` wrote beside a PEFT adapter."""
        if self.is_fsdp_enabled or not load_renamed_checkpoint(model or self.model, resume_from_checkpoint):
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._load_added_parameters(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        """``load_best_model_at_end``, with renamed weights mapped back and the mask token beside a PEFT adapter
        read, as on resume."""
        folder = self.state.best_model_checkpoint
        if self.is_fsdp_enabled or self.is_deepspeed_enabled or not load_renamed_checkpoint(self.model, folder):
            super()._load_best_model()
        self._load_added_parameters(folder)

    def _load_added_parameters(self, folder: str) -> None:
        """The mask token ``_save`` wrote beside a PEFT adapter in ``folder``, into the model being trained."""
        path = os.path.join(folder, ADDED_PARAMETERS_NAME)
        if not os.path.isfile(path):
            return
        from safetensors.torch import load_file

        self._branch_on_current_model()
        added, saved = self._added_outside_checkpoint(), load_file(path)
        if set(saved) != set(added):
            raise ValueError(
                f"{path} holds the sub branch's parameters {sorted(saved)}, but the sub branch on this model put "
                f"{sorted(added)} into it: resume with the model, sub and mask_options of the run that saved it"
            )
        with torch.no_grad():
            for name, tensor in saved.items():
                added[name].copy_(tensor)

    def _branch_on_current_model(self):
        """The sub branch on the model being trained: with ``model_init`` the Trainer builds a new model at each
        ``train()``, whose modules the branch (its hooks, its dropout sites) must be moved to."""
        if self._wrapped.model is not self.model:
            ratio = self._wrapped.ratio
            self._wrapped.unwrap()
            self._wrap(self.model, ratio)
        return self.sub_branch

    @property
    def ratio(self) -> float:
        """The sub branch's mask ratio or drop rate; settable between steps (a ``TrainerCallback``'s schedule).

        Checked as ``ratio=`` is. Set this, not an attribute of ``sub_branch``: DropSub's and PathSub's
        branches hold their rate as ``p``.
        """
        return self._wrapped.ratio

    @ratio.setter
    def ratio(self, value: float) -> None:
        self._wrapped.ratio = value

    def _second_backward_blocker(self) -> str | None:
        if getattr(self, "is_deepspeed_enabled", False):
            return "DeepSpeed steps the optimizer inside each backward"
        if getattr(self, "use_apex", False):
            return "apex scales the one loss the Trainer back-propagates"
        if str(getattr(self.args.optim, "value", self.args.optim)) in ("lomo", "adalomo"):
            return "LOMO updates the weights inside each backward"
        if getattr(self.args, "ddp_static_graph", None) and self.args.world_size > 1:
            # torch fails with an internal assert at a backward inside no_sync before the first synced one
            return "DDP with static_graph=True (ddp_static_graph) cannot back-propagate inside no_sync first"
        return None

    def _accumulation_steps(self) -> int:
        # What the Trainer divides compute_loss's result by: transformers >= 4.55 counts the micro-batches
        # of the current step (fewer at the end of an epoch), earlier versions use the argument.
        return getattr(self, "current_gradient_accumulation_steps", None) or self.args.gradient_accumulation_steps

    def get_batch_samples(self, *args, **kwargs):
        """The Trainer's micro-batches of one optimizer step; for a language model, their labelled tokens are
        counted (over all processes with ``average_tokens_across_devices``), which weigh each micro-batch's loss."""
        batches, num_items = super().get_batch_samples(*args, **kwargs)
        kind, _ = language_model(self.model)
        counts = [labelled_tokens(kind, batch) for batch in batches] if kind is not None else []
        self._step_tokens = None
        if counts and all(c is not None for c in counts):
            tokens = sum(counts).to(self.args.device)
            across = getattr(self.args, "average_tokens_across_devices", False) and self.args.world_size > 1
            if across:
                tokens = self.accelerator.gather(tokens[None]).sum()
            self._step_tokens = (tokens, across)
        return batches, num_items

    def _token_share(self, target: torch.Tensor) -> torch.Tensor | float:
        """What a language model's micro-batch loss (a mean over its labelled tokens) is multiplied by before the
        Trainer divides it by the accumulation steps: its tokens' share of the step's, times the steps (and the
        processes, whose gradients DDP averages, when the step's tokens are counted over all of them); 1 where the
        step's tokens were not counted (``compute_loss`` called outside the Trainer's loop)."""
        if self._step_tokens is None:
            return 1.0
        tokens, across = self._step_tokens
        scale = self._accumulation_steps() * (self.accelerator.num_processes if across else 1)
        return target.ne(IGNORE_INDEX).sum() * scale / tokens.clamp(min=1)

    def _main_pass_context(self, model):
        # A micro-batch that does not sync already runs inside the Trainer's no_sync. Entering it again would
        # turn FSDP2's gradient sync back on at the inner exit: its switch is a flag, not a stack.
        state = self.accelerator.gradient_state
        if state.sync_gradients or getattr(state, "plugin_kwargs", {}).get("sync_each_batch", False):
            return self.accelerator.no_sync(model)
        return contextlib.nullcontext()

    def _multi_label(self, labels: torch.Tensor) -> bool:
        """The model's ``problem_type``; unset, it is inferred from the labels and set as the model's own loss
        does (integer labels: single-label; float labels: multi-label), so evaluation computes the same loss."""
        config = getattr(self.model, "config", None)
        problem = getattr(config, "problem_type", None)
        if problem is None:
            integer = labels.dtype in (torch.long, torch.int)
            problem = "single_label_classification" if integer else "multi_label_classification"
            if config is not None:
                config.problem_type = problem
        return problem == "multi_label_classification"

    def _main_loss(self, logits: torch.Tensor, labels: torch.Tensor, multi_label: bool) -> torch.Tensor:
        if multi_label:
            return F.binary_cross_entropy_with_logits(logits.float(), labels.to(logits.dtype).float())
        rows, targets = as_rows(logits.float(), labels)  # token classification: one row per token
        total = F.cross_entropy(
            rows, targets, ignore_index=IGNORE_INDEX, label_smoothing=self.args.label_smoothing_factor, reduction="sum"
        )  # the mean over the labelled tokens, 0 where none is (a micro-batch whose responses were cut off)
        return total / targets.ne(IGNORE_INDEX).sum().clamp(min=1)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:  # evaluation and prediction: the plain model
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        answers = "labels" not in inputs and set(ANSWER_POSITIONS) <= set(inputs)  # extractive question answering
        if "labels" not in inputs and not answers:
            raise ValueError(
                f"MaskSubTrainer trains on a batch with 'labels' (or a question-answering batch's 'start_positions' "
                f"and 'end_positions'), and this one has {sorted(inputs)}: name the label column 'labels' (or "
                "'label', which the default collator renames)"
            )
        self._sub_hold.close()  # rates a loss left without its backward still holds (an OOM in the backward)
        branch = self._branch_on_current_model()
        language = language_model(model)  # a language model's labels: shifted, or the decoder's targets
        features, labels = align(*language, *split_labels(inputs))  # labels, or the answer positions as (batch, 2)
        two_backwards = self.memory_saving and torch.is_grad_enabled()
        # Unsynced main pass. In the summed order this matters too: DDP broadcasts buffers before each
        # synced forward, which would overwrite in place buffers the main graph saved.
        with self._main_pass_context(model):
            outputs = model(**features)
            main = logits_of(outputs)
            if main.ndim != 2 and (main.ndim != 3 or labels.shape != main.shape[:-1]):
                raise ValueError(
                    "MaskSubTrainer distills one prediction per sequence, logits (batch, classes), or per token, "
                    f"logits (batch, length, classes) with labels (batch, length); got logits {tuple(main.shape)} "
                    f"and labels {tuple(labels.shape)}"
                )
            if answers:  # positions past the sequence count for neither loss, as in the model's own
                labels = labels.clamp(0, main.shape[-1])
                labels = labels.masked_fill(labels == main.shape[-1], IGNORE_INDEX)
            multi_label = not answers and language[0] is None and self._multi_label(labels)
            weights = self.masksub_losses[multi_label]
            loss_main = answer_loss(main, labels) if answers else self._main_loss(main, labels, multi_label)
            share = self._token_share(labels) if language[0] is not None else 1.0
            # what the main weight multiplies: the criterion by its share, a mixture of experts' router losses (a
            # mean per micro-batch) as they are; reported, their sum is the model's own loss
            main_term, router = loss_main * share, router_loss(model, outputs)
            if router is not None:
                main_term, loss_main = main_term + router, loss_main + router
            self._observe(outputs, main, labels, features)
            if two_backwards:  # scaled as the Trainer scales the loss it back-propagates
                self.accelerator.backward(weights.main_weight * main_term / self._accumulation_steps())
                loss_main, main_term = loss_main.detach(), main_term.detach()  # graph freed: values only reported
        if two_backwards:  # the drop rates (DropSub, PathSub) stay until the Trainer's backward recomputed
            self._sub_hold.enter(branch)
        elif torch.is_grad_enabled():
            check_one_backward(branch, self.model, "MaskSubTrainer's summed loss (memory_saving=False)")
        sub = logits_of(branch(model, **features))
        loss_sub = distill(weights, sub, main, labels, self._wrapped.sub_kept)
        self._record(loss_main, loss_sub)
        # With two backwards only the sub term still has a graph; the value is the whole loss either way.
        loss = weights.main_weight * main_term + weights.sub_weight * loss_sub * share
        if two_backwards:
            self._sub_hold.release_after_backward(loss)
        return (loss, outputs) if return_outputs else loss

    def _observe(self, outputs, logits: torch.Tensor, labels: torch.Tensor, inputs: dict) -> None:
        """Called with each training micro-batch's main outputs, their logits and the labels these are scored against
        (a causal model's shifted), and the inputs: for subclasses' training metrics."""

    def _record(self, loss_main: torch.Tensor, loss_sub: torch.Tensor) -> None:
        pair = torch.stack([loss_main.detach().float(), loss_sub.detach().float()])
        self._loss_sums = pair if self._loss_sums is None else self._loss_sums + pair
        self._loss_count += 1

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """The Trainer's log, plus the unweighted ``loss_main`` and ``loss_sub`` since the last log."""
        if "loss" in logs and self._loss_count:  # a training log: every process is here
            means = self._loss_sums / self._loss_count
            if self.accelerator.num_processes > 1:
                means = self.accelerator.gather(means[None]).mean(0)
            loss_main, loss_sub = means.tolist()
            logs = {**logs, "loss_main": loss_main, "loss_sub": loss_sub}
            self._loss_sums, self._loss_count = None, 0
        super().log(logs, *args, **kwargs)


class MaskSubSeq2SeqTrainer(MaskSubTrainer, transformers.Seq2SeqTrainer):
    """``transformers.Seq2SeqTrainer`` plus a sub branch: an encoder-decoder (translation, summarization) trains as
    in ``MaskSubTrainer`` (the source masked in the sub branch, each target token distilled), and evaluates and
    predicts as ``Seq2SeqTrainer`` does, generating with ``predict_with_generate=True``. Takes both trainers'
    arguments."""
