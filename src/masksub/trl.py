"""MaskSub in TRL's ``SFTTrainer`` (supervised fine-tuning of language models): ``MaskSubSFTTrainer``.

    from masksub.trl import MaskSubSFTTrainer

    trainer = MaskSubSFTTrainer(model="Qwen/Qwen2.5-0.5B", args=SFTConfig(...), train_dataset=data,
                                sub="mask", ratio=0.5, mask_options={"mode": "attention"})

``SFTTrainer`` prepares the data (chat templates, prompt-completion pairs, ``completion_only_loss`` and
``assistant_only_loss`` labels), the model (a hub name, ``peft_config``) and the evaluation (its loss, entropy and
token accuracy); ``MaskSubTrainer`` trains on each batch's labels as the model's own loss reads them (a causal
model's shifted one token left), plus the sub branch's distillation of every labelled next token, with each
labelled token of an optimizer step weighing the same across accumulated micro-batches and processes (a mixture of
experts' load-balancing loss added by TRL's ``router_aux_loss_coef``). Training logs hold ``loss``, ``loss_main`` and
``loss_sub``, and TRL's own metrics of the main pass: the mean ``entropy`` of its prediction of each labelled token,
``mean_token_accuracy`` (how often its top prediction is the label), ``num_tokens`` (the tokens trained on so far),
``aux_loss``. The main loss is the cross-entropy: ``loss_type="dft"`` is refused.

Padding-free batches (``padding_free=True``, ``packing=True``) pack several sequences into a row: the main pass
runs on them as TRL gives them, and ``sub="mask"``'s pass on the sequences unpacked into a padded batch, each masked
as a sequence of its own (``masksub.adapters.packed``).

Needs ``trl`` (``pip install 'masksub[trl]'``).
"""

from __future__ import annotations

import torch
from trl import SFTTrainer

from .hf import MaskSubTrainer
from .loss import IGNORE_INDEX, as_rows, rows_per_chunk


class MaskSubSFTTrainer(MaskSubTrainer, SFTTrainer):
    """``trl.SFTTrainer`` plus a sub branch. Takes ``SFTTrainer``'s arguments and ``MaskSubTrainer``'s (``sub``,
    ``ratio``, ``mask_options``, ``main_weight``, ``sub_weight``, ``temperature``, ``memory_saving``); the mask
    options' tokenizer is ``processing_class`` (a decoder's has no mask token: ``mode="attention"`` or
    ``"drop"``, or a ``mask_token_id`` of your choice)."""

    def __init__(self, *args, sub: str = "mask", **kwargs):
        config = kwargs.get("args", args[1] if len(args) > 1 else None)
        if getattr(config, "loss_type", "nll") != "nll":
            raise ValueError(
                f"SFTConfig(loss_type={config.loss_type!r}): MaskSubSFTTrainer trains the main branch with the "
                "cross-entropy of each labelled token (loss_type='nll'), and the sub branch to learn its prediction; "
                "set loss_type='nll', or train with SFTTrainer"
            )
        super().__init__(*args, sub=sub, **kwargs)

    def _observe(self, outputs, logits: torch.Tensor, labels: torch.Tensor, inputs: dict) -> None:
        """TRL's training metrics, of the main pass, as ``SFTTrainer`` computes them: the mean entropy of the
        prediction of each labelled token and the share of them predicted first (a chunk of rows at a time: no
        float32 copy of the logits), the tokens trained on (all processes'), a mixture of experts' load-balancing
        loss."""
        with torch.no_grad():
            rows, targets = as_rows(logits.detach(), labels)
            sums = rows.new_zeros(3, dtype=torch.float32)  # entropy, correct, labelled
            step = rows_per_chunk(rows)
            for i in range(0, len(rows), step):
                x, target = rows[i : i + step].float(), targets[i : i + step]
                labelled = target != IGNORE_INDEX  # by weights, not by indexing: no host sync
                entropy = (x.logsumexp(-1) - (x.softmax(-1) * x).sum(-1)) * labelled
                correct = (x.argmax(-1) == target) & labelled
                sums += torch.stack([entropy.sum(), correct.sum().float(), labelled.sum().float()])
            entropy, correct, count = self.accelerator.gather_for_metrics(sums[None]).sum(0).tolist()
        metrics = self._metrics["train"]
        metrics["entropy"].append(entropy / count if count else 0.0)
        metrics["mean_token_accuracy"].append(correct / count if count else 0.0)
        mask = inputs.get("attention_mask")
        tokens = mask.sum() if mask is not None else torch.tensor(inputs["input_ids"].numel(), device=labels.device)
        gathered = int(self.accelerator.gather_for_metrics(tokens[None]).sum())
        self._total_train_tokens += gathered // getattr(self, "_tp_size", 1)  # tensor-parallel ranks repeat a batch
        metrics["num_tokens"] = [self._total_train_tokens]
        aux = getattr(outputs, "aux_loss", None) if getattr(self, "aux_loss_enabled", False) else None
        if aux is not None:
            metrics["aux_loss"].append(self.accelerator.gather_for_metrics(aux.detach()[None]).mean().item())
