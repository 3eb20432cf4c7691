"""Tiny timm models, one per family the adapters cover, so the whole suite runs on a CPU."""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import masksub


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: without it (-p no:xdist) nothing calls it
def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto`` (pyproject's addopts): a worker per core, 4 at most: each holds torch, timm and transformers,
    and some tests start two processes of their own. ``-n 0`` runs the tests in this process."""
    return min(4, _cores())


if "PYTEST_XDIST_WORKER_COUNT" in os.environ:  # the workers share the cores: no thread waits for a busy one
    torch.set_num_threads(max(1, _cores() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


VIT = dict(img_size=32, patch_size=4, depth=2, embed_dim=32, num_heads=2, num_classes=5)
SWIN = dict(
    img_size=64, depths=(1, 1), num_heads=(1, 2), embed_dim=16, window_size=4, num_classes=5, drop_path_rate=0.0
)

# name -> (timm model name, kwargs, image size (H, W), mask unit in pixels)
TINY = {
    "vit": ("vit_tiny_patch16_224", VIT, (32, 32), 32),
    "vit_reg_avg": (
        "vit_tiny_patch16_224",
        dict(VIT, reg_tokens=4, global_pool="avg", img_size=(32, 48), dynamic_img_size=True),
        (32, 48),
        32,
    ),
    "vit_noclass_map": ("vit_tiny_patch16_224", dict(VIT, class_token=False, global_pool="map"), (32, 32), 32),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", VIT, (32, 32), 32),
    "eva_rope": ("eva02_tiny_patch14_224", dict(VIT, patch_size=4), (32, 32), 32),
    "cait": ("cait_xxs24_224", dict(VIT, depth_token_only=1), (32, 32), 32),
    "swin": ("swin_tiny_patch4_window7_224", SWIN, (64, 64), 16),
    "swinv2": ("swinv2_tiny_window8_256", dict(SWIN, window_size=4), (64, 64), 16),
    "beit": ("beit_base_patch16_224", VIT, (32, 32), 8),
    "vit_relpos": ("vit_relpos_small_patch16_224", VIT, (32, 32), 8),
    "sam": (
        "samvit_base_patch16",
        dict(VIT, window_size=4, global_attn_indexes=(1,), neck_chans=16, use_rel_pos=True),
        (32, 32),
        8,
    ),
    "xcit": ("xcit_nano_12_p16_224", dict(img_size=32, depth=2, num_classes=5), (32, 32), 8),
    "naflex": ("naflexvit_base_patch16_gap", dict(VIT, patch_size=4), (32, 32), 32),
    "naflex_rope_mixed": ("naflexvit_base_patch16_gap", dict(VIT, pos_embed="none", rope_type="mixed"), (32, 32), 32),
    "resnet": ("resnet10t", dict(num_classes=5, zero_init_last=False), (64, 96), 16),
    "convnext": ("convnext_atto", dict(num_classes=5), (64, 64), 16),
    "hiera": (  # 2x3 mask units of 32x32 pixels
        "hiera_tiny_224",
        dict(img_size=(64, 96), embed_dim=8, num_heads=1, stages=(1, 1, 1, 1), num_classes=5),
        (64, 96),
        32,
    ),
    "gemma4": (  # patches embedded by a linear layer, each token with its own position (2D table and RoPE)
        "gemma4_vit_167m",
        dict(VIT, head_dim=16, intermediate_size=64, position_embedding_size=16),
        (32, 32),
        32,
    ),
    "qwen3": (  # a learned position table resampled to the grid (6x6 -> 8x8) and 2D RoPE; a mean pool
        "qwen3_vit_88m",
        dict(VIT, pos_embed_grid_size=6),
        (32, 32),
        32,
    ),
    "qwen3_merge": (  # the VLM projector merges 2x2 blocks of tokens: whole blocks are dropped
        "qwen3_vit_88m",
        dict(VIT, pos_embed_grid_size=6, encoder_pool="merge"),
        (32, 32),
        32,
    ),
    "deepseek": ("deepseek_vit_412m", VIT, (32, 32), 32),  # 2D RoPE only, a final norm; a mean pool
    "timm_convit": (  # gated positional self-attention over the grid, then the class token joins
        "convit_tiny",
        dict(img_size=32, patch_size=4, depth=3, embed_dim=16, num_heads=4, local_up_to_layer=2, num_classes=5),
        (32, 32),
        32,
    ),
    "convvit": (
        "convvit_base_patch16",
        dict(img_size=64, embed_dim=(8, 16, 32), depth=(1, 1, 2), num_heads=2, num_classes=5),
        (64, 64),
        16,
    ),
}

# The adapter each tiny model must resolve to.
EXPECTED_ADAPTER = {
    "vit": "vit",
    "vit_reg_avg": "vit",
    "vit_noclass_map": "vit",
    "deit_distilled": "vit",
    "eva_rope": "vit",
    "cait": "cait",  # patch tokens dropped before the blocks; the class token joins later
    "swin": "masktoken",
    "swinv2": "masktoken",
    "beit": "relpos",  # patch tokens dropped, each attention's relative bias gathered to the kept ones
    "vit_relpos": "relpos",
    "sam": "masktoken",  # window attention + relative position on the full grid
    "xcit": "pixels",  # its patch embedding returns (tokens, grid): input pixels instead
    "naflex": "naflexvit",
    "naflex_rope_mixed": "naflexvit",  # RoPE tables per block, gathered with the kept tokens
    "resnet": "pixels",
    "convnext": "pixels",
    "hiera": "hiera",  # whole mask units dropped, as its MAE pretraining does
    "gemma4": "gemma4",  # kept tokens carry their positions into the table and the RoPE
    "qwen3": "vlm_tower",  # kept tokens carry their positions into the table and the RoPE
    "qwen3_merge": "vlm_tower",
    "deepseek": "vlm_tower",
    "timm_convit": "gpsa",  # each GPSA attention gets the kept tokens' relative positions
    "convvit": "convvit",  # masked convolutions, then the transformer on the kept tokens
}


def tiny_model(name: str, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    timm_name, kwargs, _, _ = TINY[name]
    if not timm.is_model(timm_name):  # a family added to timm after the release under test
        pytest.skip(f"{timm_name} is not in timm {timm.__version__}")
    model = timm.create_model(timm_name, **{**kwargs, **overrides})
    if name == "hiera" and model.num_classes:  # built with a zero classifier: its output would not depend on the input
        torch.nn.init.trunc_normal_(model.head.fc.weight, std=0.1)
    return model


def sub_flop_ratio(wrapped, x) -> float:
    """FLOPs of the sub pass over the main pass, forward and backward; ``x`` is an image batch, or a mapping of
    keyword inputs (a Hugging Face model's ``pixel_values``)."""
    from torch.utils.flop_counter import FlopCounterMode

    flops = []
    for sub in (False, True):
        with FlopCounterMode(display=False) as counter:
            out = wrapped(**x, sub=sub) if isinstance(x, dict) else wrapped(x, sub=sub)
            getattr(out, "logits", out).sum().backward()
        flops.append(counter.get_total_flops())
    return flops[1] / flops[0]


def compiled_graphs(wrapped, x: torch.Tensor) -> int:
    """The graphs that compiling the wrapper with ``fullgraph=True`` (a graph break raises) makes for two rounds of
    both passes: 2 when neither pass recompiles. Graphs, breaks and recompiles are dynamo's, whatever the backend:
    ``aot_eager`` traces each graph through AOTAutograd as inductor would and leaves out its C++ code generation
    (a minute a model on a CPU); inductor itself compiles the trainer's runs in test_fsdp_trainer."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    wrapped.compile(fullgraph=True, backend="aot_eager")
    for _ in range(2):
        wrapped(x), wrapped(x, sub=True)
    assert not counters["graph_break"]
    return counters["stats"]["unique_graphs"]


def check_dropped_patch_pixels(wrapped, x: torch.Tensor, out: torch.Tensor, keep: torch.Tensor, patch: int = 4) -> None:
    """``out`` is the sub pass on ``x`` under seed 3, which kept the patch tokens ``keep`` (B, K): new pixels in the
    dropped patches leave it unchanged, bit for bit, and new pixels in the kept ones change it."""
    b, _, h, w = x.shape
    dropped = torch.ones(b, (h // patch) * (w // patch), dtype=torch.bool).scatter(1, keep, False)
    pixels = dropped.view(b, 1, h // patch, 1, w // patch, 1).expand(-1, 3, -1, patch, -1, patch).reshape_as(x)
    noise = torch.rand_like(x)
    for changed, same in ((pixels, True), (~pixels, False)):
        torch.manual_seed(3)
        assert torch.equal(wrapped(torch.where(changed, noise, x), sub=True), out) is same


def tiny_images(name: str, batch: int = 8, seed: int = 1) -> torch.Tensor:
    _, _, (h, w), _ = TINY[name]
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, h, w, generator=g) + 0.5  # no exact zeros: zeroed pixels are visible


# Text models: token ids of the tiny vocabulary's special tokens.
PAD, CLS, SEP, MASK = 0, 1, 2, 3
SPECIAL = [PAD, CLS, SEP, MASK]
SMALL = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def tiny_text_model(family: str = "bert", seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny Hugging Face sequence classifier (3 labels) built from its config: no download."""
    import transformers

    torch.manual_seed(seed)
    if family == "bert":
        config = transformers.BertConfig(**{**SMALL, "max_position_embeddings": 64, "num_labels": 3, **overrides})
        return transformers.BertForSequenceClassification(config)
    if family == "roberta":
        config = transformers.RobertaConfig(
            **{**SMALL, "max_position_embeddings": 72, "pad_token_id": PAD, "num_labels": 3, **overrides}
        )
        return transformers.RobertaForSequenceClassification(config)
    if family == "llama":  # a decoder: classifies from the last non-padding token; attention dropout only
        config = transformers.LlamaConfig(
            **{**SMALL, "num_key_value_heads": 2, "pad_token_id": PAD, "num_labels": 3, **overrides}
        )
        return transformers.LlamaForSequenceClassification(config)
    if family == "opt":  # dropout only as float rates passed to F.dropout, no nn.Dropout
        config = transformers.OPTConfig(
            vocab_size=64, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=2,
            word_embed_proj_dim=32, max_position_embeddings=64, pad_token_id=PAD, num_labels=3, **overrides,
        )  # fmt: skip
        return transformers.OPTForSequenceClassification(config)
    config = transformers.DistilBertConfig(
        vocab_size=64, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=64, num_labels=3,
        **overrides,
    )  # fmt: skip
    return transformers.DistilBertForSequenceClassification(config)


def tiny_token_model(seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny Hugging Face token classifier (3 labels per token)."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.BertConfig(**{**SMALL, "max_position_embeddings": 64, "num_labels": 3, **overrides})
    return transformers.BertForTokenClassification(config)


LANGUAGE_MODELS = {  # kind: the auto class and a tiny configuration (padding PAD, start CLS, end SEP)
    "llama": ("AutoModelForCausalLM", dict(SMALL, num_key_value_heads=2)),
    "gpt2": ("AutoModelForCausalLM", dict(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=64)),
    "bert": ("AutoModelForCausalLM", dict(SMALL, is_decoder=True, max_position_embeddings=64)),  # BertLMHeadModel
    "xlm": ("AutoModelForCausalLM", dict(vocab_size=64, emb_dim=32, n_layers=2, n_heads=2)),  # scored unshifted
    "t5": ("AutoModelForSeq2SeqLM", dict(vocab_size=64, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2)),
    "bart": (
        "AutoModelForSeq2SeqLM",
        dict(vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2)
        | dict(decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64),
    ),
}
LANGUAGE_MODELS["m2m_100"] = LANGUAGE_MODELS["bart"]  # NLLB's kin: no prepare_decoder_input_ids_from_labels
# mixtures of experts whose own loss adds their load-balancing losses, weighed unlike 1
MOE = dict(num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.5)
LANGUAGE_MODELS |= {
    "mixtral": ("AutoModelForCausalLM", dict(SMALL, num_key_value_heads=2, num_local_experts=4) | MOE),
    "qwen2_moe": (  # a shared expert beside the routed ones
        "AutoModelForCausalLM",
        dict(SMALL, num_key_value_heads=2, num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=32)
        | MOE,
    ),
    "jetmoe": (  # its weight named aux_loss_coef
        "AutoModelForCausalLM",
        dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_key_value_heads=2, kv_channels=8)
        | dict(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, output_router_logits=True)
        | dict(aux_loss_coef=0.5),
    ),
}


def tiny_language_model(kind: str = "llama", seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny Hugging Face language model of ``LANGUAGE_MODELS``: causal, or an encoder-decoder."""
    import transformers

    auto, sizes = LANGUAGE_MODELS[kind]
    ids = dict(pad_token_id=PAD, bos_token_id=CLS, eos_token_id=SEP, decoder_start_token_id=PAD)
    config = transformers.AutoConfig.for_model(kind, **{**sizes, **ids, **overrides})
    torch.manual_seed(seed)
    return getattr(transformers, auto).from_config(config)


def lm_labels(batch: dict[str, torch.Tensor], prompt: int = 4) -> dict[str, torch.Tensor]:
    """``batch`` with a causal language model's labels: its input ids, -100 (no loss) on the first ``prompt``
    positions (a prompt, in supervised fine-tuning) and on the padding."""
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    labels[:, :prompt] = -100
    return {**batch, "labels": labels}


def token_labels(batch: dict[str, torch.Tensor], seed: int = 2) -> dict[str, torch.Tensor]:
    """``batch`` with a label per word and -100 (no label) at [CLS], [SEP] and padding, and at every third
    word (a continued sub-word, as word-level tagging labels only the first piece)."""
    ids = batch["input_ids"]
    labels = torch.randint(0, 3, ids.shape, generator=torch.Generator().manual_seed(seed))
    unlabelled = (ids == CLS) | (ids == SEP) | (ids == PAD) | (torch.arange(ids.shape[1]) % 3 == 2)
    return {**batch, "labels": labels.masked_fill(unlabelled, -100)}


def text_batch(batch: int = 6, length: int = 20, seed: int = 1) -> dict[str, torch.Tensor]:
    """[CLS] tokens... [SEP] [PAD]...: sample i has ``length - 2 - i % (length // 2)`` real words."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 64, (batch, length), generator=g)
    attention = torch.ones(batch, length, dtype=torch.long)
    for i in range(batch):
        end = length - 1 - i % (length // 2)
        ids[i, 0], ids[i, end], ids[i, end + 1 :], attention[i, end + 1 :] = CLS, SEP, PAD, 0
    return {"input_ids": ids, "attention_mask": attention, "labels": torch.arange(batch) % 3}


def _transformers_5() -> bool:
    try:
        from masksub.adapters.text_families import transformers_version

        return transformers_version() >= (5,)
    except ImportError:  # no transformers: the tests that need it skip on their own
        return True


# Text mode="drop" is refused before transformers 5 (tested in test_text.py): tests that run it need 5.
needs_transformers_5 = pytest.mark.skipif(not _transformers_5(), reason="text mode='drop' needs transformers >= 5")


if not _transformers_5():
    # Lightning Fabric 2.2, when imported, replaces torch.compile by a wrapper that fails (under torch 2.4) as the
    # `@torch.compile(dynamic=True)` transformers 4's ModernBERT applies when imported: ModernBERT tests that ran
    # after a Fabric test failed to import it. Imported first, it is as in a process without Fabric.
    with contextlib.suppress(ImportError, RuntimeError, TypeError):  # TypeError: Fabric came first
        import transformers.models.modernbert.modeling_modernbert  # noqa: F401


def kept_length(attention_mask: torch.Tensor, mask: torch.Tensor) -> int:
    """The length a text sub pass in mode "drop" runs on: the batch's longest count of kept tokens (the masked
    tokens and the padding both leave the sequence)."""
    return int((attention_mask.bool() & ~mask).sum(-1).max())


def wrap_text(model, **kw):
    from masksub.adapters.text_families import transformers_version

    if kw.get("mode") == "drop" and transformers_version() < (5,):
        pytest.skip("mode='drop' needs transformers >= 5")  # refused there (tested in test_text.py)
    return masksub.wrap(model, **{"mask_token_id": MASK, "special_ids": SPECIAL, **kw})


def peak_bytes(run: Callable, *args) -> int:
    """Peak bytes allocated while ``run(*args)`` runs, above what was live before it (profiler memory events)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run(*args)
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    return max(itertools.accumulate((e.nbytes() for e in events), initial=0))


def made_once(tmp_path_factory, name: str, make: Callable[[Path], object]) -> Path:
    """The folder ``make(folder)`` filled, made once for all of a run's pytest-xdist workers (one makes it, under
    a lock, while the others wait for it): for module fixtures that launch processes."""
    from filelock import FileLock  # a dependency of torch

    root = tmp_path_factory.getbasetemp()
    root = root.parent if "PYTEST_XDIST_WORKER" in os.environ else root  # the workers' common folder
    folder, done = root / name, root / f"{name}.done"
    with FileLock(root / f"{name}.lock"):
        if not done.exists():
            folder.mkdir(exist_ok=True)
            make(folder)
            done.touch()
    return folder


def run_worker(worker: str, out: Path, *args: str, world: int = 2) -> list[dict]:
    """Run ``tests/<worker> out *args`` under torchrun with ``world`` CPU processes (tests/ importable), fail with
    its stderr, and return what each process saved as ``out/rank<r>.pt``, after checking that the processes
    ended with equal weights (``"state"``)."""
    tests = Path(__file__).parent
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([*cmd, str(tests / worker), str(out), *args], env=env, capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(world)]
    for rank in ranks[1:]:
        for k, v in ranks[0]["state"].items():
            assert torch.equal(v, rank["state"][k]), f"processes disagree on {k}"
    return ranks


def masksub_loss_by_hand(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """0.5 CE(main) + 0.5 distill(sub, softmax(main)), written out; ``model`` is a ``masksub.wrap``-ed classifier."""
    main = model(x)
    sub = model(x, sub=True)
    distill = -(F.softmax(main.detach(), -1) * F.log_softmax(sub, -1)).sum(-1).mean()
    return 0.5 * F.cross_entropy(main, y) + 0.5 * distill


@pytest.fixture
def local_causal_lm(tmp_path):
    """A tiny Llama language model whose tokenizer has neither padding nor mask token (as decoders' have), saved
    with save_pretrained, and train/valid CSVs of prompts and responses."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["review", ":", "the", "film", "was", "good", "fine", "bad", "awful", "verdict", "pos", "neg"]
    vocab = {w: i for i, w in enumerate(["<unk>", "</s>", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")
    small = dict(SMALL, vocab_size=len(vocab), num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**small, pad_token_id=None)).save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 16), ("valid", 6)):
        rows = ["prompt,response"]
        for i in range(n):
            opinion = ["good", "fine"] if i % 2 else ["bad", "awful"]
            picks = " ".join(opinion[j] for j in torch.randint(0, 2, (2,), generator=g).tolist())
            rows.append(f"review : the film was {picks} verdict :,{'pos' if i % 2 else 'neg'}")
        (tmp_path / f"{split}_lm.csv").write_text("\n".join(rows) + "\n")
    return tmp_path


def assert_causal_step_gradients(model, wrapped, batch: dict, mode: str) -> dict[str, torch.Tensor]:
    """The gradients of a MaskSub ``Step`` of ``wrapped`` (``model`` wrapped) on ``batch`` (a causal language model's
    labels in it) in training mode under seed 3, checked to equal the next-token loss and its distillation worked out
    by hand: the labels shifted one left, the distillation over the labelled positions the sub pass predicted (all
    but the dropped ones in ``mode="drop"``)."""
    model.train().zero_grad()
    torch.manual_seed(3)
    masksub.Step(wrapped, torch.optim.SGD(model.parameters(), lr=0.0), torch.nn.CrossEntropyLoss())(batch)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    features = {k: v for k, v in batch.items() if k != "labels"}
    target = F.pad(batch["labels"][:, 1:], (0, 1), value=-100)
    torch.manual_seed(3)
    main = model(**features).logits
    sub = wrapped(**features, sub=True).logits
    distilled = (target != -100) & (wrapped.sub_kept if mode == "drop" else True)
    assert (distilled.sum() < (target != -100).sum()) == (mode == "drop")  # a masked word predicts nothing there
    per_token = -(F.softmax(main.detach(), -1) * F.log_softmax(sub, -1)).sum(-1)
    loss = 0.5 * F.cross_entropy(main.flatten(0, 1), target.flatten()) + 0.5 * per_token[distilled].mean()
    loss.backward()
    assert grads.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-5, atol=1e-7, msg=n)
    return grads


def step_seeing_ids(model, batch: dict, mode: str) -> tuple:
    """``model`` wrapped by the text adapter in ``mode`` (ratio 0.9) and one ``Step`` on ``batch`` under seed 3: the
    wrapped model, the step's output, and the input ids each call of the model's input embeddings saw."""
    wrapped = wrap_text(model, sub="mask", ratio=0.9, mode=mode)
    seen = []
    handle = model.get_input_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].clone()))
    torch.manual_seed(3)
    out = masksub.Step(wrapped, torch.optim.SGD(model.parameters(), lr=0.0), torch.nn.CrossEntropyLoss())(batch)
    handle.remove()
    return wrapped, out, seen


def record_length(lengths: list):
    """A forward hook appending the sequence length of a module's output (of its first part where it gives a tuple:
    I-BERT's embeddings give their quantization scale beside them)."""
    return lambda m, a, out: lengths.append((out[0] if isinstance(out, tuple) else out).shape[1])


def dropped_and_hidden(wrapped, model, batch):
    """Under one seed: the drop mode's sub-pass logits, the model's logits with the same tokens hidden by the
    attention mask, that mask, and the sequence lengths the model's input embeddings saw (sub pass, then the other)."""
    lengths = []
    handle = model.get_input_embeddings().register_forward_hook(record_length(lengths))
    with torch.no_grad():
        torch.manual_seed(5)
        got = wrapped(**batch, sub=True).logits
        torch.manual_seed(5)
        mask = wrapped.branch.token_mask(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
        expected = model(**{**batch, "attention_mask": batch["attention_mask"].masked_fill(mask, 0)}).logits
    handle.remove()
    return got, expected, mask, lengths
