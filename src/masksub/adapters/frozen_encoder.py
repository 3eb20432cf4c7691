"""A multimodal language model's frozen image or audio encoder runs once a step: the sub pass reuses its output.

The text adapter masks words; a vision-language model's images (a speech model's audio) reach both branches as they
are. Where its image encoder (``get_encoder(modality="image")``: the vision tower) or audio encoder (the audio tower)
has no trainable parameter and draws nothing at random (in eval mode, or with no dropout, drop-path or layer-drop
rate above 0), the sub pass would compute the main pass's output again, with no gradient to give either way, as in
fine-tuning with the tower frozen (LLaVA's second stage, most LoRA recipes, a speech model's Whisper encoder). So
the main pass's calls of each such encoder keep their outputs (the tower's output, all its
layers' hidden states where the model asks for them: memory held from the main pass to the sub pass), with the
tensors they were called on; in the sub pass a call on the same tensors, unchanged since (their version counters
say so), or on tensors equal to them in value (a model may make its encoder's input anew at each pass; one host
sync), gets the output back without running the encoder, and any other call runs it. The outputs go once the sub
pass is done, and only the last ``KEEP`` calls are held (a model calls its encoder once for its images and once for
its videos); passes without gradients (evaluation) keep nothing. An output that requires a gradient is never held:
its images require one, or the tower's parameters do where a wrapper hides them from it (FSDP1's flat parameters).
Under ``torch.compile`` the bookkeeping runs eagerly, between the graphs.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from .text_families import classifier_of

KEEP = 4
# the config keys that name a random draw: dropout, drop path, and the layers Whisper's kin skip at random in training
RATES = ("dropout", "dropout_prob", "dropout_rate", "drop_path_rate", "layerdrop")
# speech models whose audio encoder is not where ``get_encoder(modality="audio")`` looks: its name in the base model
AUDIO_ENCODERS = {"granite_speech": "encoder", "granite_speech_plus": "encoder"}


def image_encoder(model: nn.Module, modality: str = "image") -> nn.Module | None:
    """The image encoder of a Hugging Face vision-language model (wrapped by PEFT or not), or with ``modality="audio"``
    the audio encoder of a speech model; None for other models."""
    model = classifier_of(model)
    find = getattr(model, "get_encoder", None)
    if find is None:
        return None
    try:
        encoder = find(modality=modality)
    except (TypeError, ValueError, AttributeError):  # an older transformers, or no such encoder
        return None
    base = getattr(model, "base_model", None)
    name = AUDIO_ENCODERS.get(getattr(model.config, "model_type", None)) if modality == "audio" else None
    if name is not None and encoder in (model, base):
        encoder = getattr(base, name, encoder)
    return encoder if encoder is not model and encoder is not base else None


def video_encoder(model: nn.Module) -> nn.Module | None:
    """The video encoder of a vision-language model with one of its own beside its image encoder (Video-LLaVA's
    ``video_tower``), None for others (a video then goes through the image encoder)."""
    return getattr(getattr(classifier_of(model), "base_model", None), "video_tower", None)


def audio_encoder(model: nn.Module) -> nn.Module | None:
    """The audio encoder of a Hugging Face speech model (Qwen2-Audio's, Voxtral's audio tower...), None for others."""
    return image_encoder(model, modality="audio")


def draws_at_random(module: nn.Module) -> bool:
    """Whether ``module`` in its present mode may compute another output for the same input: dropout or drop path
    in training mode, by its modules or its configuration's rates."""
    if not module.training:
        return False
    if any(isinstance(m, nn.Dropout) and m.p > 0 for m in module.modules()):
        return True
    config = getattr(module, "config", None)
    values = config.to_dict().items() if hasattr(config, "to_dict") else ()
    return any(k.endswith(RATES) and isinstance(v, int | float) and v > 0 for k, v in values)


def _copy(output):
    """A model output whose fields the caller may set (a model's ``get_image_features`` sets the encoder output's
    ``pooler_output`` to its projected features) without changing the one held."""
    return type(output)(**output) if isinstance(output, Mapping) and hasattr(output, "to_tuple") else output


def _version(leaf) -> int | None:
    return leaf._version if isinstance(leaf, torch.Tensor) else None


def _same(held, version: int | None, given) -> bool:
    """Whether ``given`` is what ``held`` was when the main pass called the encoder with it (``version``: its version
    counter then): a tensor unchanged since and the same view, or equal in value (a model may make its encoder's
    input anew at each pass: one host sync), or another value that compares equal."""
    if isinstance(held, torch.Tensor) or isinstance(given, torch.Tensor):
        if not (isinstance(held, torch.Tensor) and isinstance(given, torch.Tensor)) or held._version != version:
            return False  # changed in place since: its values then are not known
        layout = (held.shape, held.stride(), held.dtype, held.device)
        if (held.data_ptr(), *layout) == (given.data_ptr(), given.shape, given.stride(), given.dtype, given.device):
            return True  # the same view of the same memory (held, so not another tensor's since), unchanged
        return (held.shape, held.dtype, held.device) == (given.shape, given.dtype, given.device) and bool(
            torch.equal(held, given)
        )
    try:
        return bool(held == given)
    except Exception:  # values that do not compare: not the same call
        return False


class FrozenEncoderCache:
    """Holds a frozen image encoder's main-pass outputs for the sub pass (see the module's docstring)."""

    def __init__(self, encoder: nn.Module):
        self.encoder = encoder
        self._held: list[tuple[list, list, object, object]] = []  # (input leaves, versions, structure, output)
        self._reusing = False
        self._handle = encoder.register_forward_hook(self._hold, with_kwargs=True)
        self.reused = 0  # calls the sub pass did not run (read by the tests)

    @classmethod
    def of(cls, model: nn.Module) -> list[FrozenEncoderCache]:
        """A cache for each encoder of ``model``: its image encoder, a video encoder of its own, its audio encoder
        (none for other models)."""
        found = (image_encoder(model), video_encoder(model), audio_encoder(model))
        return [cls(encoder) for encoder in {id(e): e for e in found if e is not None}.values()]

    def frozen(self) -> bool:
        return not any(p.requires_grad for p in self.encoder.parameters()) and not draws_at_random(self.encoder)

    @torch.compiler.disable  # Python bookkeeping: version counters, a host sync; eager under torch.compile
    def _hold(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        if self._reusing or not torch.is_grad_enabled() or not self.frozen():
            return
        if any(isinstance(t, torch.Tensor) and t.requires_grad for t in tree_flatten(output)[0]):
            return  # a gradient flows through it (a parameter hidden from parameters(), as FSDP1 flattens them)
        leaves, spec = tree_flatten((args, kwargs))
        self._held = [*self._held[-(KEEP - 1) :], (leaves, [_version(v) for v in leaves], spec, _copy(output))]

    @torch.compiler.disable
    def _find(self, args: tuple, kwargs: dict):
        leaves, spec = tree_flatten((args, kwargs))
        for held, versions, held_spec, output in self._held:
            if held_spec == spec and all(map(_same, held, versions, leaves)):
                self.reused += 1
                return _copy(output)
        return None

    def _forward(self, original):
        def forward(*args, **kwargs):
            output = self._find(args, kwargs)
            return original(*args, **kwargs) if output is None else output

        return forward

    def run_reusing(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` (the sub pass) with the encoder's held outputs given back, then let go."""
        if not self._held or not self.frozen():
            self._held = []
            return fn(*args, **kwargs)
        patched = self.encoder.__dict__.get("forward")  # a forward set on the instance (accelerate's hooks)
        original = patched if patched is not None else self.encoder.forward
        self.encoder.forward = self._forward(original)
        self._reusing = True
        try:
            return fn(*args, **kwargs)
        finally:
            self._reusing, self._held = False, []
            if patched is None:
                del self.encoder.forward
            else:
                self.encoder.forward = patched

    def remove(self) -> None:
        self._handle.remove()
        self._held = []


def run_reusing(caches: list[FrozenEncoderCache], fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` (the sub pass) with each cache's held outputs given back."""
    if not caches:
        return fn(*args, **kwargs)
    first, *rest = caches
    return first.run_reusing(run_reusing, rest, fn, *args, **kwargs)
