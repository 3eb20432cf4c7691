"""Two CPU processes (gloo): one gradient all-reduce per optimizer step, same result as one process."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import TINY, text_batch, tiny_images, tiny_model, tiny_text_model, wrap_text
from torch.nn.parallel import DistributedDataParallel as DDP

import masksub
from masksub.train.distributed import AllReduceCount, count_allreduces, exit_without_teardown

WORLD, BATCH, STEPS = 2, 8, 3
MASK_UNITS = {"vit": 64, "swin": 16}  # random numbers each sample's mask draws (tokens or units)
# (model, accum_steps, step kind); "research" is the unoptimized two-backward step, for contrast
CASES = [("vit", 1, "masksub"), ("vit", 2, "masksub"), ("swin", 1, "masksub"), ("resnet", 1, "masksub")]
# "summed": both forwards, then one backward of the summed loss (as MaskSubTrainer does)
CASES += [("vit", 1, "research"), ("vit", 2, "summed"), ("bert", 1, "masksub"), ("bert", 1, "summed")]
try:  # timm's own task (two forwards, one backward), where timm's task API is new enough
    from masksub.task import MaskSubTask

    CASES += [("swin", 1, "task")]
except ImportError:
    MaskSubTask = None


def _data(name, micro):
    if name == "bert":  # keyword inputs: input_ids and attention_mask
        batch = text_batch(batch=BATCH * micro, length=12, seed=3)
        xs = [{k: batch[k][i * BATCH : (i + 1) * BATCH] for k in ("input_ids", "attention_mask")} for i in range(micro)]
        return xs, batch["labels"].chunk(micro)
    x = tiny_images(name, batch=BATCH * micro, seed=3)
    return x.chunk(micro), (torch.arange(len(x)) % 5).chunk(micro)


def _rows(x, start, end):
    return {k: v[start:end] for k, v in x.items()} if isinstance(x, dict) else x[start:end]


def _train(name, accum, kind, rank=0, world=1):
    """Train STEPS optimizer steps; under DDP count gradient all-reduces per step."""
    if name == "bert":
        wrapped = wrap_text(tiny_text_model()).train()
    else:
        wrapped = masksub.wrap(tiny_model(name), unit=TINY[name][3]).train()
    model, count, task = wrapped, AllReduceCount(), None
    if kind == "task":
        task = MaskSubTask(wrapped, criterion=torch.nn.CrossEntropyLoss(), verbose=False)
    if world > 1:  # no find_unused_parameters, also for the Swin mask token
        model = task.prepare_distributed().trainable_module if task else DDP(wrapped)
        count = count_allreduces(model)
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.1, momentum=0.9)
    step = masksub.Step(model, opt, torch.nn.CrossEntropyLoss(), accum_steps=accum, memory_saving=kind != "summed")
    xs, ys = _data(name, STEPS * accum)
    per_rank = BATCH // world
    counts, start, numels, numel_start = [], 0, [], 0
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
        else:
            updated = step(x, y)["updated"]
        if updated:
            counts.append(count.rounds - start)
            numels.append(count.elements - numel_start)
            start, numel_start = count.rounds, count.elements
    return (counts, numels), wrapped.state_dict()


def _worker(rank, init_file, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    out = {case: _train(*case, rank=rank, world=WORLD) for case in CASES}
    torch.save(out, f"{results}.{rank}")
    exit_without_teardown()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(str(tmp / "init"), str(tmp / "result")), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"result.{r}", weights_only=True) for r in range(WORLD)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_ddp_allreduce_count_and_rank_agreement(ddp_results, case):
    ((counts0, numels0), state0), ((counts1, _), state1) = ddp_results[0][case], ddp_results[1][case]
    expected = 2 if case[2] == "research" else 1
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
