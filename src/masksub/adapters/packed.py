"""Padding-free rows for the text adapter: several sequences packed into one row, as TRL's ``padding_free=True`` and
``packing=True`` and transformers' ``DataCollatorWithFlattening`` make them.

The text adapter masks a ratio of each *sequence*'s words and hides or drops them through a padding mask, which
packed rows do not have. So its sub pass runs on the sequences unpacked into a padded batch (one right-padded row
each, an attention mask on its real tokens, its own position ids), and the per-token logits come back to their
packed places: every sequence is masked as it would be in a padded batch, under any attention kernel. The main pass
keeps its packed rows. With sequences of uneven lengths the sub pass computes on padding the packed pass skips.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

PACKED_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "seq_idx")  # transformers' and TRL's padding-free batches
BOUNDARY_KEYS = (*PACKED_KEYS, "max_length_q", "max_length_k")  # what a padded batch does without


def is_packed(kwargs: Mapping) -> bool:
    """Whether a batch's keyword inputs pack several sequences into a row: flash attention's sequence boundaries,
    or, without a padding mask, position ids that start again within a row (read on the host: only such batches
    pay for it)."""
    if any(key in kwargs for key in PACKED_KEYS):
        return True
    positions = kwargs.get("position_ids")
    if kwargs.get("attention_mask") is not None or not isinstance(positions, torch.Tensor) or positions.ndim != 2:
        return False
    return bool((positions[:, 1:] <= positions[:, :-1]).any())


@dataclass
class Unpacked:
    """Where each packed token sits in the padded batch: ``index`` (B * T,) into its (S, L) places, flattened."""

    index: torch.Tensor
    shape: tuple[int, int]  # the packed rows' (B, T)
    padded: tuple[int, int]  # the padded batch's (S, L): its sequences, and the longest one's length

    def place(self, values: torch.Tensor, fill) -> torch.Tensor:
        """(B, T) packed values as the padded batch's (S, L), ``fill`` at the padding."""
        out = values.new_full((self.padded[0] * self.padded[1],), fill)
        return out.index_put_((self.index,), values.reshape(-1)).view(self.padded)

    def back(self, values: torch.Tensor) -> torch.Tensor:
        """The padded batch's (S, L, ...) values at the packed places, (B, T, ...)."""
        flat = values.reshape(self.padded[0] * self.padded[1], *values.shape[2:])
        return flat[self.index].view(*self.shape, *values.shape[2:])


def sequence_starts(kwargs: Mapping, shape: torch.Size) -> torch.Tensor:
    """(B, T) bool, True at the first token of each packed sequence: from flash attention's cumulative lengths
    (``cu_seq_lens_q``, over a single row), else where the position ids do not go on by one (transformers' rule)."""
    cu = kwargs.get("cu_seq_lens_q")
    if isinstance(cu, torch.Tensor) and shape[0] == 1:
        starts = torch.zeros(shape[1], dtype=torch.bool, device=cu.device)
        starts[cu[cu < shape[1]].long()] = True
        starts[0] = True
        return starts[None]
    positions = kwargs.get("position_ids")
    if not isinstance(positions, torch.Tensor):
        raise ValueError(
            "this batch packs several sequences into a row (cu_seq_lens_q or seq_idx), but the text adapter finds "
            "no boundaries it can read: pass position_ids (starting again at each sequence), or cu_seq_lens_q over "
            "a single row"
        )
    return F.pad(positions.expand(shape).diff(dim=1) != 1, (1, 0), value=True)


def unpack(input_ids: torch.Tensor, kwargs: Mapping, pad_id: int) -> tuple[torch.Tensor, dict, Unpacked]:
    """``input_ids`` (B, T) of packed rows as a padded batch of their sequences (S, L), and the model's keyword
    inputs for it: an attention mask on the real tokens, each sequence's position ids (its own, or counted from 0),
    every other (B, T) input placed alike; flash attention's boundaries left out."""
    shape = input_ids.shape
    starts = sequence_starts(kwargs, shape).reshape(-1)
    sequence = starts.long().cumsum(0) - 1  # (B * T,) each token's sequence
    flat = torch.arange(starts.numel(), device=input_ids.device)
    first = flat[starts]  # (S,) where each sequence starts
    offset = flat - first[sequence]
    length = int(offset.max()) + 1  # one sync: the longest sequence
    unpacked = Unpacked(sequence * length + offset, tuple(shape), (len(first), length))
    given = kwargs.get("attention_mask")
    real = torch.ones_like(input_ids) if given is None else given
    out = {k: v for k, v in kwargs.items() if k not in BOUNDARY_KEYS and k not in ("attention_mask", "position_ids")}
    for key, value in out.items():
        if isinstance(value, torch.Tensor) and value.shape == shape:
            out[key] = unpacked.place(value, 0)
    positions = kwargs.get("position_ids")
    positions = offset.view(shape) if positions is None else positions.expand(shape)
    out |= {"attention_mask": unpacked.place(real, 0), "position_ids": unpacked.place(positions, 0)}
    return unpacked.place(input_ids, pad_id), out, unpacked


def repack(output, kept: torch.Tensor | None, unpacked: Unpacked):
    """The padded batch's ``output`` with its per-token logits (S, L, C) back at their packed places (B, T, C), and
    ``kept`` (the tokens a dropping sub pass predicted) the same way. Other outputs stay the padded batch's."""
    logits = output["logits"] if isinstance(output, Mapping) else output[0]
    if logits.ndim != 3 or tuple(logits.shape[:2]) != unpacked.padded:
        raise ValueError(
            f"packed rows (several sequences in a row) give one prediction per token, for a language model or a token "
            f"classifier; this model's logits are {tuple(logits.shape)}: pad the batch, one sequence a row"
        )
    placed = unpacked.back(logits)
    kept = None if kept is None else unpacked.back(kept)
    if isinstance(output, Mapping):
        output["logits"] = placed
        return output, kept
    return (placed, *output[1:]), kept
