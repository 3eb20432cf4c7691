"""Two CPU processes (gloo): one gradient all-reduce per optimizer step, same result as one process.

The same under FSDP (``fully_shard``, and ``FullyShardedDataParallel``; each block and the root sharded):
one gradient reduce-scatter per sharded module and optimizer step, as many as the plain step makes,
and the result of one process. A vision-language model's frozen vision tower (a speech model's audio tower) runs
once a step under each."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import TINY, _transformers_5, made_once, text_batch, tiny_images, tiny_model, tiny_text_model, wrap_text
from speech import SPEECH_MODELS, speech_batch
from torch.nn.parallel import DistributedDataParallel as DDP
from vlms import VLMS, vlm_batch

import masksub
from masksub.parallel import clip_grad_norm, engine, grad_norm
from masksub.train.distributed import AllReduceCount, ReduceScatterCount, count_allreduces, exit_without_teardown

WORLD, BATCH, STEPS = 2, 8, 3
MASK_UNITS = {"vit": 64, "swin": 16}  # random numbers each sample's mask draws (tokens or units)
# (model, accum_steps, step kind); "research" is the unoptimized two-backward step, for contrast
CASES = [("vit", 1, "masksub"), ("vit", 2, "masksub"), ("swin", 1, "masksub"), ("resnet", 1, "masksub")]
# "summed": both forwards, then one backward of the summed loss (as MaskSubTrainer does)
CASES += [("vit", 1, "research"), ("vit", 2, "summed"), ("bert", 1, "masksub"), ("bert", 1, "summed")]
CASES += [("vit", 2, "every")]  # masksub with sync_every_backward: every backward reduces
CASES += [("vit", 2, "short")]  # accum_steps=3, each window ended by last=True after 2 micro-batches
CASES += [("vit", 2, "items")]  # num_items_in_batch: the step's samples on both processes; DDP averages its 2
CASES += [("vit", 2, "compiled")]  # torch.compile(DDP(wrapped)), the order PyTorch documents: was 2 per micro-batch
try:  # timm's own task (two forwards, one backward), where timm's task API is new enough
    from masksub.task import MaskSubTask

    CASES += [("swin", 1, "task")]
except ImportError:
    MaskSubTask = None
try:  # FSDP on CPU (torch >= 2.6): blocks and root sharded; clipping by the norm of the sharded gradients
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    FSDP_CASES = [("vit", 1, "plain"), ("vit", 1, "masksub"), ("vit", 2, "masksub"), ("vit", 1, "summed")]
    FSDP_CASES += [("swin", 1, "masksub"), ("vit", 2, "every"), ("vit", 2, "short")]  # short: last=True
    FSDP_CASES = [(*case, "fsdp2") for case in FSDP_CASES]
    FSDP_CASES += [("vit", 1, "plain", "fsdp1"), ("vit", 2, "masksub", "fsdp1"), ("swin", 1, "masksub", "fsdp1")]
    FSDP_CASES += [("vit", 2, "every", "fsdp1")]
except ImportError:
    FSDP_CASES = []
FSDP_CLIP = 0.2  # below the tiny models' gradient norms: clipping changes the update


def _data(name, micro):
    if name == "bert":  # keyword inputs: input_ids and attention_mask
        batch = text_batch(batch=BATCH * micro, length=12, seed=3)
        xs = [{k: batch[k][i * BATCH : (i + 1) * BATCH] for k in ("input_ids", "attention_mask")} for i in range(micro)]
        return xs, batch["labels"].chunk(micro)
    x = tiny_images(name, batch=BATCH * micro, seed=3)
    return x.chunk(micro), (torch.arange(len(x)) % 5).chunk(micro)


def _rows(x, start, end):
    return {k: v[start:end] for k, v in x.items()} if isinstance(x, dict) else x[start:end]


def _shard(wrapped, name, parallel):
    """Shard every block (Swin: every stage) and then the root, with fully_shard or FullyShardedDataParallel."""
    inner = wrapped.model if isinstance(wrapped, masksub.SubBranchModel) else wrapped
    blocks = list(inner.blocks if name == "vit" else inner.layers)
    if parallel == "fsdp1":
        policy = ModuleWrapPolicy({type(blocks[0])})
        return FullyShardedDataParallel(wrapped, auto_wrap_policy=policy, device_id=torch.device("cpu"))
    for block in blocks:
        fully_shard(block)
    return fully_shard(wrapped)


def _full_state(model):
    return {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}


def _train(name, accum, kind, rank=0, world=1, parallel="ddp", static_graph=False):
    """Train STEPS optimizer steps; under DDP count gradient all-reduces per step, under FSDP reduce-scatters."""
    fsdp = parallel.startswith("fsdp")
    if name == "bert":
        wrapped = wrap_text(tiny_text_model()).train()
    elif kind == "plain":
        wrapped = tiny_model(name).train()
    else:
        wrapped = masksub.wrap(tiny_model(name), unit=TINY[name][3]).train()
    model, count, task = wrapped, AllReduceCount(), None
    if kind == "task":
        task = MaskSubTask(wrapped, criterion=torch.nn.CrossEntropyLoss(), verbose=False)
    if world > 1 and fsdp:
        model = wrapped = _shard(wrapped, name, parallel)
    elif world > 1:  # no find_unused_parameters, also for the Swin mask token
        model = task.prepare_distributed().trainable_module if task else DDP(wrapped, static_graph=static_graph)
        count = count_allreduces(model)
        if kind == "compiled":
            model = torch.compile(model, backend="eager")  # dynamo's front end; no C++ compiler needed
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.1, momentum=0.9)
    step = masksub.Step(
        model,
        opt,
        torch.nn.CrossEntropyLoss(),
        accum_steps=accum + (kind == "short"),
        memory_saving=kind != "summed",
        clip_grad=FSDP_CLIP if fsdp else None,
        sync_every_backward=kind == "every",
    )
    xs, ys = _data(name, STEPS * accum)
    per_rank = BATCH // world
    counts, start, numels, numel_start, norms = [], 0, [], 0, []
    for i, (x, y) in enumerate(zip(xs, ys)):
        x, y = _rows(x, rank * per_rank, (rank + 1) * per_rank), y[rank * per_rank : (rank + 1) * per_rank]
        torch.manual_seed(1000 + i)
        if name in MASK_UNITS:  # skip the numbers lower ranks' samples use: the masks of one full batch
            torch.rand(rank * per_rank, MASK_UNITS[name])
        if kind == "research":
            opt.zero_grad()
            main = model(x)
            (0.5 * torch.nn.functional.cross_entropy(main, y)).backward()
            (0.5 * step.loss.sub_loss(model(x, sub=True), main)).backward()
            opt.step()
            updated = True
        elif kind == "task":
            opt.zero_grad()
            task(x, y)["loss"].backward()
            opt.step()
            updated = True
        elif fsdp and world > 1:
            with ReduceScatterCount() as reductions:
                out = step(x, y, last=kind == "short" and i % accum == accum - 1)
            count.rounds += reductions.rounds
            updated = out["updated"]
        else:
            items = BATCH * accum if kind == "items" else None  # every sample of the step, on all processes
            out = step(x, y, last=kind == "short" and i % accum == accum - 1, num_items_in_batch=items)
            updated = out["updated"]
        if fsdp and updated:
            assert type(out["grad_norm"]) is torch.Tensor, "a norm of the whole model, not of a shard"
            norms.append(float(out["grad_norm"]))
        if updated:
            counts.append(count.rounds - start)
            numels.append(count.elements - numel_start)
            start, numel_start = count.rounds, count.elements
    if fsdp:  # and the norm of the last step's clipped gradients, which are still there
        params = [p for g in opt.param_groups for p in g["params"]]
        norm = clip_grad_norm(model, params, math.inf) if parallel == "fsdp1" else grad_norm(params)
        assert type(norm) is torch.Tensor, "a norm of the whole model, not of a shard"
        norms.append(float(norm))
        return (counts, norms), _full_state(wrapped)
    return (counts, numels), wrapped.state_dict()


def _fsdp_settings():
    """What Step makes of settings that sharding changes: its errors, and the fp16 scaler it picks."""
    found = {}
    for parallel in ("fsdp1", "fsdp2"):
        model = _shard(masksub.wrap(tiny_model("vit"), unit=32), "vit", parallel)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for key, kw in {"agc": dict(clip_grad=1.0, clip_mode="agc"), "fp16": dict(amp="fp16")}.items():
            try:
                step = masksub.Step(model, opt, torch.nn.CrossEntropyLoss(), **kw)
                found[parallel, key] = type(step.scaler).__name__
            except ValueError as e:
                found[parallel, key] = str(e)
    return found


NONFINITE = [("ddp", None, "pixel"), ("ddp", None, "constant"), ("ddp", "fp16", "pixel"), ("ddp", "fp16", "constant")]
if FSDP_CASES:
    NONFINITE += [("fsdp2", "bf16", "constant"), ("fsdp1", None, "constant")]


def _nonfinite_steps(parallel, amp, mode, rank):
    """Three steps with skip_nonfinite; at the second, rank 1's loss is not finite: a NaN pixel in its batch
    (NaN gradients too), or a NaN constant added to its loss (finite gradients). What each step reported, and
    the weights."""
    wrapped = masksub.wrap(tiny_model("vit"), unit=TINY["vit"][3]).train()
    if parallel == "ddp":
        model = DDP(wrapped)
    else:  # FullyShardedDataParallel's state dict (the full one) is the wrapper's
        model = wrapped = _shard(wrapped, "vit", parallel)
    at = [0]  # the step being taken

    def criterion(logits, y):
        loss = torch.nn.functional.cross_entropy(logits, y)
        return loss + float("nan") if mode == "constant" and rank == 1 and at[0] == 1 else loss

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step = masksub.Step(model, opt, criterion, amp=amp, skip_nonfinite=True)
    torch.manual_seed(10 + rank)
    skipped = []
    for i in range(3):
        at[0] = i
        x, y = tiny_images("vit", batch=4, seed=20 + 2 * i + rank), torch.arange(4) % 5
        if mode == "pixel" and rank == 1 and i == 1:
            x[0, 0, 0, 0] = float("nan")
        skipped.append(bool(step(x, y).get("skipped", False)))
    return skipped, _full_state(wrapped)


def _static_graph(rank):
    """DDP(static_graph=True): Step's backwards inside no_sync are refused by name (torch's reducer fails there
    with an internal assert); the summed loss without accumulation trains."""
    refused = []
    for kw in (dict(), dict(accum_steps=2, memory_saving=False)):
        wrapped = masksub.wrap(tiny_model("vit"), unit=TINY["vit"][3]).train()
        try:
            masksub.Step(DDP(wrapped, static_graph=True), torch.optim.SGD(wrapped.parameters()), F.cross_entropy, **kw)
        except ValueError as e:
            refused.append(str(e))
    return refused, _train("vit", 1, "summed", rank=rank, world=WORLD, static_graph=True)


# a LLaVA's vision tower frozen or trained, under DDP or FSDP, its frozen output reused by the sub pass or not; and a
# Voxtral's frozen audio tower under DDP and FSDP2
VLM_CASES = [
    (p, frozen, True, "llava") for p in ("ddp", "fsdp1", "fsdp2") if p == "ddp" or FSDP_CASES for frozen in (1, 0)
]
VLM_CASES += [(p, 1, True, "voxtral") for p in ("ddp", "fsdp2") if p == "ddp" or FSDP_CASES]
VLM_CASES = [*VLM_CASES, *((p, 1, False, name) for p, frozen, _, name in VLM_CASES if frozen)]
VLM_CASES = VLM_CASES if _transformers_5() else []


def _vlm_train(parallel, frozen, reuse, name, rank):
    """STEPS MaskSub steps (drop mode) of a tiny LLaVA (or speech model: ``name``), each process on its half of the
    batch: the vision (audio) tower's computations a step, DDP's gradient all-reduces a step, and the weights."""
    from masksub.adapters.frozen_encoder import audio_encoder, image_encoder

    speech = name in SPEECH_MODELS
    model = (SPEECH_MODELS if speech else VLMS)[name]().train()
    tower = audio_encoder(model) if speech else image_encoder(model)
    tower.requires_grad_(not frozen)
    calls = []
    next(tower.children()).register_forward_hook(lambda *a: calls.append(1))
    wrapped = wrap_text(model, sub="mask", ratio=0.5, mode="drop")
    if not reuse:
        wrapped.branch._encoders = []
    count = AllReduceCount()
    if parallel == "ddp":
        sharded = DDP(wrapped, find_unused_parameters=not frozen)  # LLaVA leaves the tower's last norm unused
        count = count_allreduces(sharded)
    elif parallel == "fsdp1":  # frozen, the tower a unit of its own (a flat parameter trains whole or not at all);
        # trained, its parameters flattened into the root's, which hides them from the tower
        policy = ModuleWrapPolicy({type(tower)}) if frozen else None
        sharded = FullyShardedDataParallel(wrapped, auto_wrap_policy=policy, device_id=torch.device("cpu"))
    else:  # the tower's blocks (fully_shard on the tower itself leaves LLaVA without the hidden states it reads)
        for block in tower.layers if speech else tower.encoder.layers:
            fully_shard(block)
        sharded = fully_shard(wrapped)
    opt = torch.optim.SGD([p for p in sharded.parameters() if p.requires_grad], lr=0.1)
    step = masksub.Step(sharded, opt, torch.nn.CrossEntropyLoss())
    batch = _rows(speech_batch(name) if speech else vlm_batch(name), 2 * rank, 2 * rank + 2)
    per_step, start = [], 0
    for i in range(STEPS):
        calls.clear()
        torch.manual_seed(100 * rank + i)
        assert step(batch)["updated"]
        per_step.append((len(calls), count.rounds - start))
        start = count.rounds
    return per_step, _full_state(sharded if parallel == "fsdp1" else wrapped)


def _worker(rank, init_file, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    out = {case: _train(*case, rank=rank, world=WORLD) for case in CASES}
    out.update({case: _train(*case[:3], rank=rank, world=WORLD, parallel=case[3]) for case in FSDP_CASES})
    if FSDP_CASES:
        out["fsdp settings"] = _fsdp_settings()
    out.update({("nonfinite", *case): _nonfinite_steps(*case, rank) for case in NONFINITE})
    out["static graph"] = _static_graph(rank)
    out.update({("vlm", *case): _vlm_train(*case, rank) for case in VLM_CASES})
    torch.save(out, f"{results}.{rank}")
    exit_without_teardown()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    def launch(tmp):
        mp.spawn(_worker, args=(str(tmp / "init"), str(tmp / "result")), nprocs=WORLD, join=True)

    tmp = made_once(tmp_path_factory, "ddp", launch)
    return [torch.load(tmp / f"result.{r}", weights_only=True) for r in range(WORLD)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_ddp_allreduce_count_and_rank_agreement(ddp_results, case):
    ((counts0, numels0), state0), ((counts1, _), state1) = ddp_results[0][case], ddp_results[1][case]
    expected = {"research": 2, "every": 2 * case[1]}.get(case[2], 1)
    assert counts0 == counts1 == [expected] * STEPS, f"gradient all-reduces per optimizer step: {counts0}"
    grad_numel = sum(v.numel() for k, v in state0.items() if v.is_floating_point() and "running" not in k)
    assert numels0 == [expected * grad_numel] * STEPS, "each gradient must be sent once per all-reduce"
    # Parameters agree exactly. BatchNorm running stats are rank-local after the last forward,
    # as in any DDP run; DDP broadcasts rank 0's at the start of the next forward.
    for k in state0:
        if "running" not in k and "num_batches" not in k:
            assert torch.equal(state0[k], state1[k]), f"ranks disagree on {k}"


@pytest.mark.parametrize("case", [c for c in CASES if c[0] in MASK_UNITS], ids=lambda c: "-".join(map(str, c)))
def test_ddp_equals_single_process_full_batch(ddp_results, case):
    _, single = _train(*case)
    _, state = ddp_results[0][case]
    for k in single:
        torch.testing.assert_close(state[k], single[k], rtol=1e-4, atol=1e-6, msg=k)
    if case[0] == "swin":
        initial = masksub.wrap(tiny_model("swin"), unit=16).state_dict()["branch.mask_token"]
        assert not torch.equal(state["branch.mask_token"], initial), "the mask token must train under DDP"


def test_static_graph_ddp_refuses_backwards_inside_no_sync_and_trains_the_summed_loss(ddp_results):
    refused, ((counts, _), state) = ddp_results[0]["static graph"]
    assert len(refused) == 2 and all("DistributedDataParallel(static_graph=True) cannot" in m for m in refused)
    assert "Step runs the main pass's backward there" in refused[0] and "or memory_saving=False" in refused[0]
    assert "every micro-batch but a window's last there" in refused[1] and "memory_saving" not in refused[1]
    assert counts == [1] * STEPS
    _, single = _train("vit", 1, "summed")
    for k in single:
        torch.testing.assert_close(state[k], single[k], rtol=1e-4, atol=1e-6, msg=k)


def test_the_reducing_module_is_found_inside_torch_compile_only():
    """torch.compile(ddp_model) holds DDP as _orig_mod; a wrapper that forwards unknown attributes inward
    (FullyShardedDataParallel does) around a compiled module is itself the one that reduces."""

    class Forwarding(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def __getattr__(self, name):
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(self.inner, name)

    plain = torch.nn.Linear(2, 2)
    compiled = torch.compile(plain)
    assert engine(compiled) is plain and engine(plain) is plain
    outer = Forwarding(compiled)
    assert engine(outer) is outer


def test_a_window_ended_by_last_equals_a_full_one_under_ddp(ddp_results):
    """accum_steps=3 with last=True after 2 micro-batches: the weights of accum_steps=2 (one all-reduce per
    step is checked with the other cases)."""
    for rank in range(WORLD):
        short, full = ddp_results[rank][("vit", 2, "short")][1], ddp_results[rank][("vit", 2, "masksub")][1]
        for k in full:
            torch.testing.assert_close(short[k], full[k], rtol=1e-5, atol=1e-7, msg=k)


@pytest.mark.parametrize("case", FSDP_CASES, ids=lambda c: "-".join(map(str, c)))
def test_fsdp_reduces_once_per_module_and_equals_single_process(ddp_results, case):
    """FSDP: as many gradient reduce-scatters per optimizer step as the plain step (one per sharded module),
    or with sync_every_backward one per module and backward (2 per micro-batch); the gradient norm clipped
    is the full model's, so is the norm of the gradients clipped (the last entry); the weights are one
    process's."""
    ((counts0, norms0), state0), ((counts1, norms1), _) = (r[case] for r in ddp_results)
    name, accum, kind = case[:3]
    modules = 1 + len(tiny_model(name).blocks if name == "vit" else tiny_model(name).layers)
    per_step = modules * 2 * accum if kind == "every" else modules
    assert counts0 == counts1 == [per_step] * STEPS, f"gradient reduce-scatters per optimizer step: {counts0}"
    (_, single_norms), single = _train(*case[:3], parallel=case[3])  # one process, unsharded, same clipping
    assert norms0 == norms1
    torch.testing.assert_close(torch.tensor(norms0), torch.tensor(single_norms), rtol=1e-4, atol=1e-6)
    assert norms0[-1] == pytest.approx(FSDP_CLIP, rel=1e-4), "the clipped gradients' norm"
    assert all(n > FSDP_CLIP for n in single_norms[:-1]), "clipping must change the update for this test to see it"
    assert state0.keys() == single.keys()
    for k in single:
        torch.testing.assert_close(state0[k], single[k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.skipif(not FSDP_CASES, reason="FSDP on CPU needs torch >= 2.6")
def test_fsdp_refuses_per_parameter_clipping_and_picks_a_sharded_scaler(ddp_results):
    found = ddp_results[0]["fsdp settings"]
    for parallel in ("fsdp1", "fsdp2"):
        assert "clip_mode='agc' clips each parameter by its own norm, which FSDP shards" in found[parallel, "agc"]
    assert found["fsdp1", "fp16"] == "ShardedGradScaler"  # its inf check is reduced across processes
    assert "amp='fp16' under fully_shard" in found["fsdp2", "fp16"] and "use amp='bf16'" in found["fsdp2", "fp16"]


@pytest.mark.parametrize("case", NONFINITE, ids=lambda c: "-".join(map(str, c)))
def test_a_loss_not_finite_on_one_process_skips_the_step_on_every_process(ddp_results, case):
    """skip_nonfinite under DDP / FSDP: one process's non-finite loss (with NaN gradients, or with finite
    ones) skips the step on each process, each reports it skipped, and the weights stay the same on all."""
    (skipped0, state0), (skipped1, state1) = (r[("nonfinite", *case)] for r in ddp_results)
    assert skipped0 == skipped1 == [False, True, False], f"steps reported skipped: {skipped0} and {skipped1}"
    for k in state0:
        assert torch.equal(state0[k], state1[k]), f"processes disagree on {k}"


@pytest.mark.parametrize("case", [c for c in VLM_CASES if c[2]], ids=lambda c: "-".join(map(str, c)))
def test_a_frozen_vision_tower_runs_once_a_step_under_ddp_and_fsdp_with_the_same_weights(ddp_results, case):
    """A frozen vision (or audio) tower computes once a step on each process (twice where it trains: FSDP1 hides
    its parameters from it, so the tower's output requiring a gradient says it trains), DDP all-reduces once a step,
    and the weights are those of the sub pass running the tower again."""
    parallel, frozen, _, name = case
    (steps0, state0), (steps1, state1) = (r[("vlm", *case)] for r in ddp_results)
    reductions = 1 if parallel == "ddp" else 0
    assert steps0 == steps1 == [(1 if frozen else 2, reductions)] * STEPS, "tower computations, all-reduces a step"
    for k in state0:
        assert torch.equal(state0[k], state1[k]), f"processes disagree on {k}"
    if frozen:
        again_steps, again = ddp_results[0][("vlm", parallel, frozen, False, name)]
        assert again_steps == [(2, reductions)] * STEPS
        assert state0.keys() == again.keys()
        for k in again:
            torch.testing.assert_close(state0[k], again[k], rtol=1e-6, atol=1e-8, msg=k)
