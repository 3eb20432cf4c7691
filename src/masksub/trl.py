"""MaskSub in TRL's ``SFTTrainer`` (supervised fine-tuning of language models): ``MaskSubSFTTrainer``.

    from masksub.trl import MaskSubSFTTrainer

    trainer = MaskSubSFTTrainer(model="Qwen/Qwen2.5-0.5B", args=SFTConfig(...), train_dataset=data,
                                sub="mask", ratio=0.5, mask_options={"mode": "attention"})

``SFTTrainer`` prepares the data (chat templates, prompt-completion pairs, ``completion_only_loss`` and
``assistant_only_loss`` labels), the model (a hub name, ``peft_config``) and the evaluation (its loss, entropy and
token accuracy); ``MaskSubTrainer`` trains on each batch's labels as the model's own loss reads them (a causal
model's shifted one token left), plus the sub branch's distillation of every labelled next token, with each
labelled token of an optimizer step weighing the same across accumulated micro-batches and processes. Training logs
hold ``loss``, ``loss_main`` and ``loss_sub``; TRL's own training metrics (entropy, token accuracy) come from its
fused loss, which the MaskSub step does not run, so they appear for evaluation only.

Padding-free batches (``padding_free=True``, ``packing=True``) pack several sequences into a row, which
``sub="mask"`` refuses with an error: keep TRL's padded batches (its default), or use ``sub="dropout"``.

Needs ``trl`` (``pip install 'masksub[trl]'``).
"""

from __future__ import annotations

from trl import SFTTrainer

from .hf import MaskSubTrainer


class MaskSubSFTTrainer(MaskSubTrainer, SFTTrainer):
    """``trl.SFTTrainer`` plus a sub branch. Takes ``SFTTrainer``'s arguments and ``MaskSubTrainer``'s (``sub``,
    ``ratio``, ``mask_options``, ``main_weight``, ``sub_weight``, ``temperature``, ``memory_saving``); the mask
    options' tokenizer is ``processing_class`` (a decoder's has no mask token: ``mode="attention"`` or
    ``"drop"``, or a ``mask_token_id`` of your choice)."""

    def __init__(self, *args, sub: str = "mask", **kwargs):
        config = kwargs.get("args", args[1] if len(args) > 1 else None)
        if sub == "mask" and (getattr(config, "padding_free", False) or getattr(config, "packing", False)):
            raise ValueError(
                "SFTConfig(padding_free=True) and packing=True pack several sequences into each row, and sub='mask' "
                "masks a ratio of each row's words and hides them through a padding mask, which packed rows do not "
                "have: set padding_free=False and packing=False (TRL's padded batches), or use sub='dropout'"
            )
        super().__init__(*args, sub=sub, **kwargs)
