"""Text transformers: BERT, RoBERTa, DeBERTa... (any model whose main input is ``input_ids``).

The sub branch sees the same batch with a fraction ``ratio`` of each sample's
*maskable* tokens masked: tokens the attention mask marks as real that are not
special tokens ([CLS], [SEP], <s>, padding...) nor token ids the model's config names (image
placeholders...). Each sample masks exactly ``num_masked(n, ratio)`` of its own ``n`` maskable
tokens, chosen at random.

- ``mode="token"`` (default): masked tokens become the tokenizer's mask token, the
  input a model pretrained with masked language modelling knows;
- ``mode="attention"``: masked tokens get 0 in the attention mask, so no token
  attends to them;
- ``mode="drop"``: masked tokens leave the sequence, so the model runs on the kept ones:
  what ``"attention"`` computes for the token the classifier reads, at about ``1 - ratio``
  of the model's cost. Sequence classifiers of the BERT family (``DROP_MODELS``: absolute
  positions, pooled from the first token) drop them after the embeddings, each kept token
  with its own position embedding already added; those whose attention reads relative positions
  (``RELATIVE_MODELS``: DeBERTa v2 and v3, MPNet, RoFormer's rotary positions) get the kept tokens' own. Decoder
  sequence classifiers (``DROP_DECODERS``: Llama, Mistral, Mixtral, Qwen 2 and 3 (MoE too), Gemma 1 to 3, Phi 1 to 3
  (MoE too), OLMo 1 to 3, GLM, DeepSeek V2 and V3, Falcon, GPT-2, GPT-Neo, GPT-J, GPT-NeoX, GPT-OSS, Gemma 3's
  multimodal classifier...; causal attention, pooled from the last token that is not padding; and the causal language
  models of those and of Cohere 1 and 2, Granite 3, OLMoE, EXAONE, ERNIE 4.5, GLM-4.5...) get the kept token
  ids with their own position ids and segment ids (Falcon's transformer by a hook: its classifier does not pass
  them on; OPT and BLOOM, whose positions count the attention mask's tokens, the kept attention mask alone), and
  the token they read (the last one that is not padding) is never masked; in Gemma 3's batches with images (whose
  tokens attend each other both ways) the word before an image neither. The sequence classifiers of RoPE encoders
  (``DROP_ROPE_ENCODERS``: ModernBERT, EuroBERT, NomicBERT, GTE..., and ModernVBERT's image and text classifiers;
  pooled from the first token or a mean over the attention mask) get the kept token ids with their own position ids
  too, and so do XLM's and FlauBERT's (``DROP_POSITION_ENCODERS``), with their language ids. A model's sliding
  window counts tokens, and with tokens dropped a window of tokens spans more positions: its sliding-window layers
  get a window mask built from the kept tokens' positions (SDPA and eager attention read it; under a kernel that
  takes none, flash attention, a batch longer than the window hides its masked tokens instead, at the main pass's
  cost, warned once); Llama 4's chunked layers a mask of each kept token's chunk, by its index. Decoders with
  recurrent layers (``RECURRENT_DECODERS``: gated delta nets, Mamba, lightning attention, short convolutions; Qwen3.5,
  Qwen3-Next, Falcon-H1, Jamba...) get the kept token ids the same way, and there the sub pass is not what hiding
  computes (hiding leaves a token's place in the recurrence) but each sequence's kept tokens run alone. Their token
  classifiers and masked language models (``DROP_HEADS``; the targets of a masked
  language model, shown as the mask token, are special tokens: always kept), and the decoders' causal language
  models (and those of LLaVA and its kin on one of those decoders, ``DROP_VLMS``, and Qwen2-VL's,
  ``MROPE_VLMS``, whose 3-D positions its forward makes from the kept tokens as from the hidden ones: their image
  tokens are special, kept with their images' features), run on the kept tokens the same way, no token being held
  back for a head to read: the kept tokens' logits go back to their places, (B, L, C), 0 at the others, and
  ``kept`` (the wrapper's ``sub_kept``) marks those places, which alone the distillation reads. Other heads are
  refused.

``"token"`` and ``"attention"`` keep the sequence, so their sub pass costs what the main pass costs.

Padding-free rows (several sequences packed into a row: TRL's ``padding_free``, transformers'
``DataCollatorWithFlattening``) are masked per sequence: the sub pass runs on them unpacked into a padded batch,
and their logits go back to the packed places (``packed.py``).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from ..masking import check_ratio, gather_tokens, masked_counts
from .frozen_encoder import FrozenEncoderCache, run_reusing
from .packed import is_packed, repack, unpack
from .registry import MaskAdapter, register_adapter
from .text_families import (
    CONFIGURATION_CHECKS,
    DROP_AUDIO_LMS,
    DROP_ID_ENCODERS,
    DROP_VLMS,
    MASK_POSITION_DECODERS,
    MASKED_KERNELS,
    MROPE_VLMS,
    PREFIX_VLMS,
    RELATIVE_MODELS,
    chunk_size,
    classifier_of,
    drop_embeddings,
    position_ids_target,
    predicts_per_token,
    sliding_layers,
    sliding_window,
)

MODES = ("token", "attention", "drop")


def config_token_ids(model: nn.Module) -> set[int]:
    """The token ids the config of ``model`` (and its text config) names (``*_token_id``, ``*_token_index``: padding,
    begin and end of sequence, a multimodal model's image placeholders...): never masked, as a placeholder masked
    would leave its image's features without a place."""
    config = getattr(model, "config", None)  # a PEFT wrapper's is its model's
    if not hasattr(config, "to_dict"):  # not a Hugging Face model: transformers need not be installed
        return set()
    found = set()
    parts = (config, config.get_text_config()) if hasattr(config, "get_text_config") else (config,)
    for part in {id(c): c for c in parts}.values():
        for key, value in part.to_dict().items():
            if key.endswith(("_token_id", "_token_index")):
                found.update(v for v in (value if isinstance(value, list) else [value]) if isinstance(v, int))
    return found


def rows(values: torch.Tensor | None, shape: torch.Size) -> torch.Tensor | None:
    """``values`` (given per token of input_ids of ``shape``, or broadcast to it: one row of position ids, one
    language per sample) as (N, L), a row per sequence: per sample, or per choice of a multiple-choice head's."""
    return None if values is None else values.expand(shape).reshape(-1, shape[-1])


def random_token_mask(maskable: torch.Tensor, ratio: float) -> torch.Tensor:
    """Boolean (B, L) mask, True on ``num_masked(n_i, ratio)`` random maskable tokens of each row."""
    check_ratio(ratio)
    noise = torch.rand(maskable.shape, device=maskable.device).masked_fill(~maskable, 2.0)
    rank = noise.argsort(dim=1).argsort(dim=1)  # (B, L): 0 for the lowest noise; maskable tokens rank first
    return rank < masked_counts(maskable.sum(dim=1), ratio).unsqueeze(1)


@register_adapter("text", priority=25, description="Hugging Face text models (main input input_ids): mask tokens")
class TokenMaskAdapter(MaskAdapter):
    """Masks a random ``ratio`` of each sample's non-special tokens (mask token or attention mask).

    Options (``masksub.wrap(model, ..., **options)``):
        tokenizer: a Hugging Face tokenizer (or a multimodal processor holding one); its ``mask_token_id`` and
            ``all_special_ids`` are used.
        mask_token_id, special_ids: the same, given directly (they override the tokenizer's).
        mode: ``"token"`` (replace by the mask token), ``"attention"`` (hide via the attention mask) or
            ``"drop"`` (leave the sequence; BERT-family and decoder sequence classifiers).
    """

    default_unit = None

    def __init__(
        self,
        model: nn.Module,
        ratio: float,
        unit: int | None = None,
        *,
        tokenizer=None,
        mask_token_id: int | None = None,
        special_ids: Iterable[int] | None = None,
        mode: str = "token",
    ):
        if unit is not None:
            raise ValueError("unit is the mask block size in pixels of image adapters; the text adapter masks tokens")
        super().__init__(model, ratio, unit)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if tokenizer is not None and not hasattr(tokenizer, "all_special_ids") and hasattr(tokenizer, "tokenizer"):
            tokenizer = tokenizer.tokenizer  # a multimodal model's processor: its text tokenizer
        if tokenizer is not None:
            mask_token_id = getattr(tokenizer, "mask_token_id", None) if mask_token_id is None else mask_token_id
            special_ids = tokenizer.all_special_ids if special_ids is None else special_ids
        if special_ids is None:
            raise ValueError(
                "the text mask adapter needs the special token ids so that [CLS], [SEP] and padding are never "
                "masked: wrap(model, tokenizer=tokenizer) or wrap(model, special_ids=tokenizer.all_special_ids, ...)"
            )
        if mode == "token" and mask_token_id is None:
            raise ValueError(
                "mode='token' replaces tokens by the mask token, and none was given (the tokenizer has no "
                "mask_token_id, as decoders' have none): pass mask_token_id=..., or use mode='attention' (hides them "
                "by the attention mask) or mode='drop' (the same for the sequence classifiers it takes, at about "
                "1 - ratio of the cost)"
            )
        self.mode = mode
        self._keep: torch.Tensor | None = None  # mode "drop": the tokens (B, K) the embeddings' hook keeps
        self._handle = None  # the embeddings' hook (BERT family)
        self._relative_handles = []  # DeBERTa's, MPNet's, RoFormer's: the kept tokens' positions (BERT family)
        self._full_mask: torch.Tensor | None = None  # (B, L) the attention mask DeBERTa's embeddings multiply by
        # what each layer reads at its argument 2, made once a pass for the kept tokens: MPNet's bias (B, heads, K, K),
        # RoFormer's sines and cosines (B, 1, K, head size)
        self._bias: torch.Tensor | None = None
        self._position_handle = None  # the hook giving position ids to a transformer its classifier gives none
        self._by_mask = False  # a decoder whose positions count the attention mask's real tokens
        self._mrope = False  # a VLM whose 3-D positions count them too, given its images' grids (Qwen2-VL)
        self.reads_last = False  # mode "drop" on a decoder classifier: the last token that is not padding stays
        self._causal = True  # mode "drop": a decoder's window looks back, a RoPE encoder's (ModernBERT's) both ways
        self.per_token = False  # mode "drop" on a token classifier: its logits go back to their tokens' places
        self.kept: torch.Tensor | None = None  # (B, L) bool after such a sub pass: the tokens it predicted
        self._ids = False  # mode "drop" on the kept token ids with their position ids (decoders, ModernBERT)
        self._positions: torch.Tensor | None = None  # (B, K) and (B, K) bool: the kept tokens' positions and which
        self._valid: torch.Tensor | None = None  # of them are not fillers, for the sliding windows' masks
        self._blocks: torch.Tensor | None = None  # (B, K): each kept token's image block (-1: text), Gemma 3's
        self._chunks: tuple | None = None  # (B, K) and (B, K): each kept token's attention chunk and index, Llama 4's
        self._window_handles = []
        self._window_cache: tuple | None = None  # (the model's mask dtype, the window mask) of the running pass
        self._warned = False
        self._image_blocks = False  # a multimodal classifier whose token_type_ids mark images attending both ways
        self._prefix = False  # a VLM whose token_type_ids 0 mark a prefix attending both ways (PaliGemma's)
        if mode == "drop":
            embeddings = drop_embeddings(model)
            self.per_token = predicts_per_token(model)
            if embeddings is None:
                self._ids = True
                self._text_config = model.config.get_text_config()  # its padding id, read at each pass
                self._causal = model.config.model_type not in DROP_ID_ENCODERS
                self.reads_last = self._causal and not self.per_token
                self._by_mask = self._text_config.model_type in MASK_POSITION_DECODERS
                self._mrope = model.config.model_type in MROPE_VLMS
                # a decoder's images, attending each other both ways (Gemma 3's); an encoder's do anyway, LLaVA's and
                # Qwen2-VL's not
                self._prefix = model.config.model_type in PREFIX_VLMS
                vlm = model.config.model_type in DROP_VLMS + DROP_AUDIO_LMS + MROPE_VLMS + PREFIX_VLMS
                self._image_blocks = self._causal and self._text_config is not classifier_of(model).config and not vlm
                target = None if self._by_mask else position_ids_target(model)
                if target is not None:  # the kept tokens' position ids reach its transformer by a hook
                    self._position_handle = target.register_forward_pre_hook(self._position_ids, with_kwargs=True)
                self._window_handles = [  # given a mask by the kept tokens' positions in the sub pass
                    m.register_forward_pre_hook(self._window_mask, with_kwargs=True)
                    for m in sliding_layers(model, self._text_config)
                ]
            else:
                if model.config.model_type in RELATIVE_MODELS:  # first: it may refuse the model
                    self._relative_handles = self._relative_hooks(model)
                self._handle = embeddings.register_forward_hook(self._drop_hook)
        # a multimodal model's frozen image and audio encoders: their main-pass outputs are given back to the sub pass
        self._encoders = FrozenEncoderCache.of(model)
        self.mask_token_id = None if mask_token_id is None else int(mask_token_id)
        special = sorted({int(i) for i in special_ids} | config_token_ids(model))
        param = next(model.parameters(), None)  # made where the model is: no copy to its device at each pass
        device = param.device if param is not None else None
        self.register_buffer("special_ids", torch.tensor(special, dtype=torch.long, device=device), persistent=False)

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return getattr(model, "main_input_name", None) == "input_ids"

    def token_mask(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, L) bool, True on the tokens the sub branch masks."""
        maskable = ~torch.isin(input_ids, self.special_ids.to(input_ids.device))
        if attention_mask is not None:
            maskable &= attention_mask.bool()
        if self._image_blocks and token_type_ids is not None:  # the token before each image keeps images apart
            image = token_type_ids.expand_as(input_ids) == 1
            maskable[:, :-1] &= ~(image[:, 1:] & ~image[:, :-1])
        if self.reads_last:  # the token the classifier reads, by its own rule: the last that is not padding
            maskable[torch.arange(len(input_ids), device=input_ids.device), self._read_index(input_ids)] = False
        return random_token_mask(maskable, self.ratio)

    @property
    def pad_token_id(self) -> int | None:
        """The decoder's padding id, read from its config at each pass (set after wrapping, as is common)."""
        return self._text_config.pad_token_id

    def _read_index(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B,) the position a decoder classifier reads: its last token that is not padding (the last position
        where the model has no padding id, as transformers' classifiers do)."""
        position = torch.arange(input_ids.shape[1], device=input_ids.device)
        if self.pad_token_id is None:
            return position[-1].expand(len(input_ids))
        return (position * (input_ids != self.pad_token_id)).argmax(-1)

    def forward(self, model: nn.Module, *args, **kwargs):
        return run_reusing(self._encoders, self._forward, model, *args, **kwargs)

    def _forward(self, model: nn.Module, *args, **kwargs):
        if len(args) > 1:
            raise TypeError("the text mask adapter takes input_ids positionally and everything else by keyword")
        input_ids = args[0] if args else kwargs.get("input_ids")
        if not isinstance(input_ids, torch.Tensor) or input_ids.ndim not in (2, 3) or input_ids.is_floating_point():
            got = f"shape {tuple(input_ids.shape)} {input_ids.dtype}" if isinstance(input_ids, torch.Tensor) else None
            raise ValueError(
                f"the text mask adapter masks input_ids, a (batch, length) integer tensor (or (batch, choices, length) "
                f"for a multiple-choice head); got {got} (inputs_embeds are not supported: pass input_ids)"
            )
        shape = input_ids.shape  # each row of the last dimension is a sequence: a sample's, or one of its choices
        attention_mask = kwargs.get("attention_mask")
        if attention_mask is not None and attention_mask.shape != shape:
            raise ValueError(
                f"the text mask adapter reads an attention_mask of input_ids' shape {tuple(shape)}, got shape "
                f"{tuple(attention_mask.shape)}: custom attention masks of more dimensions (packed sequences) are not "
                "supported; pass the padding mask, or use sub='dropout'"
            )
        if is_packed(kwargs):  # the sequences unpacked into a padded batch, the logits back in place (packed.py)
            if input_ids.ndim != 2:
                raise ValueError("packed rows (several sequences in a row) are (batch, length) input_ids")
            filler = int(self.special_ids[0]) if len(self.special_ids) else 0  # at the padding, hidden
            ids, padded, unpacked = unpack(input_ids, {k: v for k, v in kwargs.items() if k != "input_ids"}, filler)
            output = self._forward(model, input_ids=ids, **padded)
            output, self.kept = repack(output, self.kept, unpacked)
            return output
        self.kept = None
        ids, attention_mask = rows(input_ids, shape), rows(attention_mask, shape)
        images = rows(kwargs.get("token_type_ids"), shape) if self._image_blocks else None  # (TAPAS's are 3-D)
        mask = self.token_mask(ids, attention_mask, images)
        if self.mode == "drop" and not (self._ids and self._beyond_window(model, shape[-1])):
            return self._run_kept(model, args, kwargs, shape, ids, attention_mask, mask)
        if self.mode == "token":
            input_ids = ids.masked_fill(mask, self.mask_token_id).view(shape)
            args, kwargs = ((input_ids,), kwargs) if args else ((), {**kwargs, "input_ids": input_ids})
        else:
            if attention_mask is None:
                attention_mask = torch.ones_like(ids)
            kwargs = {**kwargs, "attention_mask": attention_mask.masked_fill(mask, 0).view(shape)}
        return model(*args, **kwargs)

    def _beyond_window(self, model: nn.Module, length: int) -> bool:
        """Whether dropping would change what a sliding window or a chunk sees: a batch longer than the window,
        under an attention kernel that takes no mask (flash attention keeps its window by index, and with tokens
        dropped a window of tokens spans more positions); or what Llama 4's layers without RoPE scale their queries
        by, each token's index, which the drop changes beyond its ``floor_scale`` (8,192 tokens). The batch's masked
        tokens are hidden instead (warned once)."""
        config = self._text_config
        window, kernel = sliding_window(config) or chunk_size(config), config._attn_implementation
        no_rope = 0 in (getattr(config, "no_rope_layers", None) or [])  # Llama 4's layers without RoPE (0 in the list)
        by_index = getattr(config, "attn_temperature_tuning", False) and no_rope
        if by_index and length > config.floor_scale - 1:
            why = (
                f"its layers without RoPE scale each query by its index (attn_temperature_tuning), which dropping "
                f"tokens changes from index {config.floor_scale - 1} on (floor_scale), and a batch of {length} is "
                "longer"
            )
        elif self._window_handles and length > window and kernel not in MASKED_KERNELS:
            why = (
                f"its sliding-window or chunked attention runs on {kernel!r}, which takes no mask to keep the window "
                f"({window} tokens) by position ({' or '.join(MASKED_KERNELS)} do), and a batch of {length} is longer"
            )
        else:
            return False
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"mode='drop' on {type(model).__name__}: {why}; such batches hide their masked tokens instead "
                "(mode='attention', at the main pass's cost)",
                stacklevel=3,
            )
        return True

    def _window_mask(self, module: nn.Module, args: tuple, kwargs: dict):
        """A sliding-window layer's mask in the sub pass, by position (not by index: tokens between two kept ones
        may have been dropped): a decoder's query sees the keys of the ``window`` positions up to its own,
        ModernBERT's those at most ``window`` positions away on either side; keys are kept tokens. In the format of
        the mask the model made (True to attend, or 0 and the dtype's minimum)."""
        if self._positions is None:
            return None
        given = kwargs.get("attention_mask")
        kind = None if given is None else given.dtype
        if self._window_cache is None or self._window_cache[0] != kind:  # built once a pass, for every layer
            self._window_cache = kind, self._build_window_mask(given, args[0] if args else kwargs["hidden_states"])
        return args, {**kwargs, "attention_mask": self._window_cache[1]}

    def _build_window_mask(self, given: torch.Tensor | None, hidden: torch.Tensor) -> torch.Tensor:
        positions, window = self._positions, sliding_window(self._text_config)
        distance = positions[:, :, None] - positions[:, None, :]  # (B, K, K): query's position minus key's
        if self._chunks is not None:  # Llama 4's chunks: by index from the first token that is not padding
            chunks, index = self._chunks
            near = (chunks[:, :, None] == chunks[:, None, :]) & (index[:, :, None] >= index[:, None, :])
        elif not self._causal:  # ModernBERT's window: either side
            near = distance.abs() <= window
        elif self._blocks is None:
            near = (distance >= 0) & (distance < window)
        else:
            blocks = self._blocks
            same = (blocks[:, :, None] == blocks[:, None, :]) & (blocks[:, :, None] >= 0)
            if self._prefix:  # PaliGemma 2: the prefix sees all of itself, beyond the window too
                near = ((distance >= 0) & (distance < window)) | same
            else:  # Gemma 3: an image's tokens also see those after them in the image, within the window
                near = ((distance >= 0) | same) & (distance < window)
        allowed = (near & self._valid[:, None, :]).unsqueeze(1)  # (B, 1, K, K)
        boolean = self._text_config._attn_implementation == "sdpa" if given is None else given.dtype == torch.bool
        if boolean:
            mask = allowed
        else:
            dtype = hidden.dtype if given is None else given.dtype
            mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
            mask = mask.masked_fill(~allowed, torch.finfo(dtype).min)
        return mask

    def _run_kept(self, model, args, kwargs, shape, input_ids, attention_mask, mask):
        """The model on the kept tokens only: each sequence's kept tokens in their order, then (where sequences keep
        different counts) masked tokens or padding, hidden by the attention mask, to fill the batch's longest kept
        count. A BERT-family model drops them after its embeddings; a decoder gets the kept token ids with their own
        position ids, the fillers as padding (which it never reads). ``input_ids``, ``attention_mask`` and ``mask``
        are (N, L), one row a sequence; what the model gets is in the input's ``shape`` (a multiple-choice head's
        (B, C, .))."""
        check = CONFIGURATION_CHECKS.get(model.config.model_type)
        if check is not None:  # a setting changed since wrapping? (BigBird's set_attention_type)
            check(model)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        length = input_ids.shape[1]
        position = torch.arange(length, device=input_ids.device)
        # what no layer reads: the masked tokens and the padding (which would otherwise fill every shorter
        # sequence's slots up to the full length: a batch of ragged lengths would hardly shorten)
        dropped = mask | ~attention_mask.bool()
        order = (dropped.long() * length + position).argsort(dim=1)  # kept tokens first, each group in its order
        keep = order[:, : max(1, int(length - dropped.sum(dim=1).min()))]  # one sync: the longest kept count
        valid = (~dropped).gather(1, keep)
        lead = shape[:-1]
        kwargs = {**kwargs, "attention_mask": valid.to(attention_mask.dtype).view(*lead, -1)}
        if self._ids:
            if kwargs.get("langs") is not None:  # XLM's and FlauBERT's language of each token
                kwargs["langs"] = rows(kwargs["langs"], shape).gather(1, keep).view(*lead, -1)
            if kwargs.get("mm_token_type_ids") is not None:  # Qwen2-VL's: each token an image's, a video's or a word
                kwargs["mm_token_type_ids"] = rows(kwargs["mm_token_type_ids"], shape).gather(1, keep).view(*lead, -1)
            if kwargs.get("lengths") is not None:  # XLM's and FlauBERT's real lengths, which the mask says
                kwargs["lengths"] = valid.sum(1).view(lead)
            if self._prefix and kwargs.get("token_type_ids") is None:  # PaliGemma without them: all causal, as
                # hiding makes it (an all-ones mask, which the kept tokens may have, would attend both ways)
                kwargs["token_type_ids"] = torch.ones_like(input_ids).view(shape)
            if kwargs.get("token_type_ids") is not None:  # GPT-2's segments, Gemma 3's images: each keeps its own
                types = rows(kwargs["token_type_ids"], shape).gather(1, keep)
                kwargs["token_type_ids"] = types.view(*lead, -1)
                if self._image_blocks:  # numbered as the model numbers them: images do not meet, the mask saw to it
                    image = types == 1
                    start = image & ~torch.nn.functional.pad(image, (1, 0))[:, :-1]
                    self._blocks = torch.where(image, start.long().cumsum(1) - 1, -1)
                elif self._prefix:  # one block: the image and the prompt
                    self._blocks = torch.where(types == 0, 0, -1)
            ids = input_ids.gather(1, keep)
            if self.pad_token_id is not None:  # the fillers: a classifier reads the last token that is not padding
                ids = ids.masked_fill(~valid, self.pad_token_id)
            ids = ids.view(*lead, -1)
            positions = kwargs.get("position_ids")
            if self._position_handle is not None:  # a classifier dropping position ids runs on the indices
                positions = None
            grids = kwargs.get("image_grid_thw") is not None or kwargs.get("video_grid_thw") is not None
            by_mask = self._by_mask or (self._mrope and grids and kwargs.get("mm_token_type_ids") is not None)
            if positions is not None and positions.ndim == 3:  # 3-D RoPE's rows (text where there are 4, time...)
                kwargs["position_ids"] = positions.gather(2, keep.expand(len(positions), -1, -1))
                positions = kwargs["position_ids"][0]  # sliding windows read the text row (a word's rows are equal)
            elif positions is not None or not by_mask:
                positions = rows(position if positions is None else positions, shape).gather(1, keep)
                if self._position_handle is None:
                    kwargs["position_ids"] = positions.view(*lead, -1)
            self._positions, self._valid = positions, valid
            if (chunk := chunk_size(self._text_config)) is not None:  # counted as the model counts them on hiding
                left = (attention_mask.masked_fill(mask, 0).cumsum(1) == 0).sum(1, keepdim=True)  # left padding
                self._chunks = torch.div(keep - left, chunk, rounding_mode="floor"), keep
            try:
                output = model(ids, **kwargs) if args else model(**{**kwargs, "input_ids": ids})
            finally:
                self._positions = self._valid = self._blocks = self._window_cache = self._chunks = None
        else:
            self._keep, self._full_mask = keep, attention_mask.masked_fill(mask, 0)
            try:
                output = self.run_with_hooks_active(model, *args, **kwargs)
            finally:
                self._keep = self._full_mask = self._bias = None
        return self._in_place(output, keep, valid, length) if self.per_token else output

    def _in_place(self, output, keep: torch.Tensor, valid: torch.Tensor, length: int):
        """A token classifier's output with its logits (B, K, C) of the kept tokens put back at their places,
        (B, L, C), 0 elsewhere; ``kept`` marks those places (not the fillers), for the loss to leave the rest out.
        Other outputs (hidden states, attentions) stay those of the kept tokens."""
        logits = output["logits"] if isinstance(output, Mapping) else output[0]
        index = keep.unsqueeze(-1).expand(-1, -1, logits.shape[-1])
        placed = logits.new_zeros(len(logits), length, logits.shape[-1])
        placed = placed.scatter(1, index, logits * valid.unsqueeze(-1).to(logits.dtype))
        self.kept = torch.zeros(keep.shape[0], length, dtype=torch.bool, device=keep.device).scatter(1, keep, valid)
        if isinstance(output, Mapping):
            output["logits"] = placed
            return output
        return (placed, *output[1:])

    def _relative_hooks(self, model: nn.Module) -> list:
        """Hooks giving DeBERTa-v2's encoder or MPNet's and RoFormer's layers the kept tokens' relative positions (sub
        pass only); an error where the model mixes neighbouring tokens by index otherwise. The layers' hooks run
        outside transformers' activation checkpointing, which saves and replays what they gave."""
        base = model.base_model
        if model.config.model_type in ("mpnet", "roformer"):
            encoder = base.encoder
            table = self._mpnet_bias if model.config.model_type == "mpnet" else self._rotary_table
            hook = self._layer_positions
            layers = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in encoder.layer]
            return [encoder.register_forward_pre_hook(table), *layers]
        if base.encoder.conv is not None or getattr(base, "z_steps", 0) > 1:
            what = "conv_kernel_size (a convolution over neighbouring tokens)"
            if base.encoder.conv is None:
                what = "z_steps > 1 (its last layer repeated, by positions it counts by index)"
            raise ValueError(
                f"mode='drop' on {type(model).__name__}: its configuration sets {what}, which would see other "
                "tokens once some are dropped; use mode='attention' (the same masking at the main pass's cost)"
            )
        handles = [base.embeddings.register_forward_pre_hook(self._deberta_mask, with_kwargs=True)]
        if base.encoder.relative_attention:
            handles.append(base.encoder.register_forward_pre_hook(self._deberta_positions, with_kwargs=True))
        return handles

    def _deberta_mask(self, module: nn.Module, args: tuple, kwargs: dict):
        """DeBERTa's embeddings run on the whole sequence and multiply by its attention mask: the full-length one."""
        if self._keep is None:
            return None
        return args, {**kwargs, "mask": self._full_mask.to(kwargs["mask"].dtype)}

    def _deberta_positions(self, encoder: nn.Module, args: tuple, kwargs: dict):
        """DeBERTa-v2's relative positions (query's minus key's, in its log buckets) of the kept tokens, per sample
        and head, in the (1, batch * heads, K, K) layout its attention gathers by."""
        if self._keep is None:
            return None
        keep = self._keep
        relative = keep[:, :, None] - keep[:, None, :]
        if encoder.position_buckets > 0 and encoder.max_relative_positions > 0:
            buckets = sys.modules[type(encoder).__module__].make_log_bucket_position
            relative = buckets(relative, encoder.position_buckets, encoder.max_relative_positions)
        heads, length = encoder.layer[0].attention.self.num_attention_heads, keep.shape[1]
        relative = relative.long()[:, None].expand(-1, heads, -1, -1).reshape(1, -1, length, length)
        return args, {**kwargs, "relative_pos": relative}

    def _mpnet_bias(self, encoder: nn.Module, args: tuple):
        """MPNet's position bias for the kept tokens, made once a pass for every layer: its encoder's buckets of
        each key's position minus the query's, per sample (its own bias counts by index)."""
        if self._keep is not None:
            relative = self._keep[:, None, :] - self._keep[:, :, None]
            bias = encoder.relative_attention_bias(encoder.relative_position_bucket(relative))  # (B, K, K, heads)
            self._bias = bias.permute(0, 3, 1, 2)

    def _rotary_table(self, encoder: nn.Module, args: tuple):
        """RoFormer's sines and cosines at the kept tokens' positions, made once a pass for every layer, per sample
        (its encoder's own count positions by index)."""
        if self._keep is not None:
            self._bias = encoder.embed_positions(self._keep.shape, 0, position_ids=self._keep).unsqueeze(1)

    def _layer_positions(self, layer: nn.Module, args: tuple, kwargs: dict):
        """An MPNet or RoFormer layer gets the kept tokens' position bias or rotary table, its argument 2, in place of
        its encoder's (sub pass only)."""
        if self._bias is None:
            return None
        if len(args) > 2:
            return (*args[:2], self._bias, *args[3:]), kwargs
        name = "sinusoidal_pos" if "sinusoidal_pos" in kwargs else "position_bias"
        return args, {**kwargs, name: self._bias}

    def _position_ids(self, module: nn.Module, args: tuple, kwargs: dict):
        """The kept tokens' position ids for a transformer whose classifier does not pass them on (sub pass only)."""
        if self._positions is None:
            return None
        return args, {**kwargs, "position_ids": self._positions}

    def _drop_hook(self, module: nn.Module, args: tuple, output: torch.Tensor):
        if not self._active:
            return None
        if isinstance(output, tuple):  # I-BERT's: the embeddings and their quantization scale (one per tensor)
            return (gather_tokens(output[0], self._keep), *output[1:])
        return gather_tokens(output, self._keep)

    def remove(self) -> None:
        for handle in [self._handle, self._position_handle, *self._window_handles, *self._relative_handles]:
            if handle is not None:
                handle.remove()
        for cache in self._encoders:
            cache.remove()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mode={self.mode}, mask_token_id={self.mask_token_id}"
