"""MaskSub in Hugging Face's ``transformers.Trainer``: ``MaskSubTrainer`` is a drop-in replacement.

    trainer = MaskSubTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                             sub="mask", ratio=0.5)

Each training micro-batch returns ``main_weight * criterion(main, labels) + sub_weight *
distill(sub, main)`` to the Trainer's own loop, which keeps everything it does (gradient
accumulation, mixed precision, DDP through accelerate with one all-reduce per step, logging,
checkpoints). One summed loss means one backward, so both passes' activations are alive together;
in a loop of your own, ``masksub.Step`` runs the memory-saving two-backward order instead.
Evaluation and prediction use the plain model and its own loss; nothing is added to the model,
so ``save_model`` writes a checkpoint that ``from_pretrained`` loads as usual.

Needs ``transformers`` (``pip install 'masksub[text]'``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import transformers

from .adapters import resolve_adapter
from .loss import SubBranchLoss
from .step import logits_of
from .wrapper import wrap


class MaskSubTrainer(transformers.Trainer):
    """``transformers.Trainer`` plus a sub branch, for sequence (or image) classification.

    Args (besides the Trainer's own, all passed through):
        sub: ``"mask"`` (text models: masked tokens; vision models such as ``ViTForImageClassification``:
            masked pixel blocks), ``"dropout"`` or ``"droppath"``.
        ratio: fraction of each sample's tokens masked, or the sub branch's drop probability.
        mask_options: options of the mask adapter (``mode``, ``mask_token_id``, ``special_ids``);
            by default the mask token and special tokens come from ``processing_class``.
        main_weight, sub_weight, temperature: see ``masksub.SubBranchLoss``.

    The main criterion is cross-entropy (with the Trainer's ``label_smoothing_factor``), or binary
    cross-entropy when ``config.problem_type`` is ``"multi_label_classification"``; the sub branch
    learns the main branch's softmax (sigmoid) prediction.
    """

    # compute_loss returns a per-micro-batch mean: the Trainer divides it by the accumulation steps.
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
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False  # transformers < 5 reads this instead of loss_is_scaled_for_ga
        config = getattr(self.model, "config", None)
        self.multi_label = getattr(config, "problem_type", None) == "multi_label_classification"
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
        self.sub_branch = wrap(self.model, sub, ratio, **options).branch
        if any(True for _ in self.sub_branch.parameters()):
            raise ValueError(
                f"the {self.sub_branch.name!r} sub branch has parameters the Trainer's optimizer would not hold; "
                "use masksub.Step in your own loop for it"
            )
        criterion = torch.nn.BCEWithLogitsLoss() if self.multi_label else torch.nn.CrossEntropyLoss()
        self.masksub_loss = SubBranchLoss(criterion, main_weight, sub_weight, temperature)

    def _main_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.multi_label:
            return F.binary_cross_entropy_with_logits(logits.float(), labels.to(logits.dtype).float())
        return F.cross_entropy(logits.float(), labels, label_smoothing=self.args.label_smoothing_factor)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training or "labels" not in inputs:  # evaluation and prediction: the plain model
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs["labels"]
        features = {k: v for k, v in inputs.items() if k != "labels"}
        # Unsynced main forward: DDP broadcasts buffers before it and not again before the sub forward,
        # which would overwrite in place buffers the main graph saved; the backward still all-reduces once.
        with self.accelerator.no_sync(model):
            outputs = model(**features)
        main = logits_of(outputs)
        if main.ndim != 2:
            raise ValueError(
                f"MaskSubTrainer distills one prediction per sequence, logits (batch, classes); got shape "
                f"{tuple(main.shape)}"
            )
        loss_sub = self.masksub_loss.sub_loss(logits_of(self.sub_branch(model, **features)), main)
        loss = self.masksub_loss.main_weight * self._main_loss(main, labels) + self.masksub_loss.sub_weight * loss_sub
        return (loss, outputs) if return_outputs else loss
