"""The README's own-loop example runs as written; the timm TrainingTask matches the Step."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import tiny_images, tiny_model

import masksub

try:
    from masksub.task import MaskSubMultiLabelTask, MaskSubTask
except ImportError as e:  # an older timm: the core is tested, the task is not available
    MaskSubTask, MaskSubMultiLabelTask, TASK_SKIP = None, None, str(e)
else:
    TASK_SKIP = ""
needs_task_api = pytest.mark.skipif(MaskSubTask is None, reason=TASK_SKIP)

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_own_loop_example_runs():
    text = README.read_text()
    section = text.split("## Use it in your own loop", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)
    model, metrics = scope["model"], scope["metrics"]
    assert metrics["updated"] and torch.isfinite(metrics["loss"])
    plain = timm.create_model("deit3_small_patch16_224", img_size=64, num_classes=10)
    plain.load_state_dict(scope["plain_state"], strict=True)
    assert model.branch.name == "vit"


def test_readme_hand_written_loop_example_learns_in_both_runs(monkeypatch, capsys):
    """examples/fashion_mnist.py, whose measured numbers the README shows, on a slice of the data."""
    monkeypatch.syspath_prepend(str(README.parent / "examples"))
    example = __import__("fashion_mnist")
    tiny = ["--train-images", "1024", "--test-images", "500", "--epochs", "1", "--batch-size", "64", "--width", "32"]
    result = example.main(tiny)
    assert result["plain"] > 20 and result["masksub"] > 20  # 10 classes: chance is 10%
    assert result["plain"] != result["masksub"], "the second run has the sub branch"
    assert "MaskSub, ratio 0.5" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="100 training images make no batch of 128: lower --batch-size"):
        example.main(["--train-images", "100"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--ratio", "1.5"], "--ratio must be in [0, 1)"),  # were tracebacks (a ZeroDivisionError for 0 test images)
        (["--test-images", "0"], "--test-images must be at least 1, got 0"),
        (["--depth", "0"], "--depth must be at least 1, got 0"),
        (["--width", "97"], "--width 97 does not split into 3 attention heads (one per 32): use a multiple of 3"),
    ],
)
def test_the_examples_refuse_bad_arguments_by_name(monkeypatch, capsys, argv, message):
    monkeypatch.syspath_prepend(str(README.parent / "examples"))
    for example in ("fashion_mnist", "lightning_fashion_mnist"):
        with pytest.raises(SystemExit) as stop:
            __import__(example).parse_args(argv)
        assert stop.value.code == 2 and message in capsys.readouterr().err, example


@pytest.mark.parametrize(
    "argv, message", [(["--ratio", "1"], "--ratio must be in [0, 1)"), (["--test-images", "0"], "")]
)
def test_the_hugging_face_example_refuses_bad_arguments_by_name(monkeypatch, capsys, argv, message):
    monkeypatch.syspath_prepend(str(README.parent / "examples"))
    with pytest.raises(SystemExit) as stop:
        __import__("image_classification_hf").parse_args(argv)
    assert stop.value.code == 2 and (message or f"{argv[0]} must be at least 1, got 0") in capsys.readouterr().err


def test_the_example_names_missing_data_without_a_traceback(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(README.parent / "examples"))
    with pytest.raises(SystemExit, match="error: Fashion-MNIST IDX files not found .* dataset-fashion-mnist"):
        __import__("fashion_mnist").main(["--data-dir", str(tmp_path)])


@needs_task_api
def test_task_gradients_equal_step_and_checkpoint_is_plain():
    x, y = tiny_images("swin", batch=4), torch.arange(4)
    wrapped = masksub.wrap(tiny_model("swin"), unit=16).train()
    step = masksub.Step(wrapped, torch.optim.SGD(wrapped.parameters(), lr=0.0), torch.nn.CrossEntropyLoss())
    torch.manual_seed(5)
    out = step(x, y)

    task_model = masksub.wrap(tiny_model("swin"), unit=16).train()
    task = MaskSubTask(task_model, criterion=torch.nn.CrossEntropyLoss(), verbose=False)
    torch.manual_seed(5)
    result = task(x, y)
    result["loss"].backward()
    torch.testing.assert_close(result["loss"], out["loss"])
    for (n, p), q in zip(wrapped.named_parameters(), task_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=n)

    named = {id(p): n for n, p in task_model.named_parameters()}
    clipped = [named[id(p)] for p in task.get_clip_parameters(exclude_head=True)]  # timm's AGC leaves the head out
    assert "branch.mask_token" in clipped and not any(n.startswith("model.head.") for n in clipped)
    assert len(clipped) == len(named) - 2

    state = task.get_checkpoint_state()
    plain = tiny_model("swin")
    plain.load_state_dict(state["state_dict"], strict=True)
    assert "mask_token" in state["task_state"]["branch"]
    other = MaskSubTask(masksub.wrap(tiny_model("swin", seed=9), unit=16), verbose=False)
    other.load_checkpoint_state(state["state_dict"], state["task_state"])
    assert torch.equal(other._wrapper[0].branch.mask_token, task_model.branch.mask_token)


@needs_task_api
def test_task_compiled_and_ema_checkpoints_hold_the_plain_model():
    """timm's train.py with --torchcompile and --model-ema: both state dicts load into the plain timm model."""
    x, y = tiny_images("vit", batch=4), torch.arange(4)
    task = MaskSubTask(masksub.wrap(tiny_model("vit"), unit=16).train(), verbose=False)
    eval_model = task.compile(backend="eager")
    task.setup_ema(decay=0.5)
    task(x, y)["loss"].backward()
    task.update_ema()
    assert task.get_eval_model() is eval_model
    for ema, key in [(False, "state_dict"), (True, "state_dict_ema")]:
        state = task.get_checkpoint_state(ema=ema)
        plain = tiny_model("vit", seed=9).eval()
        plain.load_state_dict(state[key], strict=True)
        task.load_checkpoint_state(state[key], state.get("task_state"), ema=ema)
        task.get_eval_model(ema=ema).eval()
        torch.testing.assert_close(task.get_eval_model(ema=ema)(x), plain(x))


@needs_task_api
@pytest.mark.parametrize("loss_type", ["bce", "asl"])
def test_multi_label_task_distills_sigmoids_and_refuses_single_label_settings(loss_type):
    """timm's multi-label task with a sub branch: its loss by hand, its evaluator; class-index targets and a
    softmax criterion are refused by name."""
    x, y = tiny_images("vit", batch=4), (torch.rand(4, 5, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    wrapped = masksub.wrap(tiny_model("vit")).train()
    kwargs = dict(criterion_kwargs={"loss_type": loss_type}, verbose=False)
    task = MaskSubMultiLabelTask(wrapped, threshold=0.4, **kwargs)
    torch.manual_seed(3)
    result = task(x, y)
    torch.manual_seed(3)
    main, sub = wrapped(x), wrapped(x, sub=True)
    by_hand = 0.5 * task.criterion(main, y) + 0.5 * F.binary_cross_entropy_with_logits(sub, torch.sigmoid(main))
    torch.testing.assert_close(result["loss"], by_hand)
    evaluator = task.create_evaluator()
    assert evaluator.threshold == 0.4 and "map" in evaluator.metric_names
    with pytest.raises(ValueError, match="dense float targets"):
        task(x, torch.arange(4))
    with pytest.raises(ValueError, match="CrossEntropyLoss is a single-label criterion"):
        MaskSubMultiLabelTask(masksub.wrap(tiny_model("vit")), criterion=torch.nn.CrossEntropyLoss(), verbose=False)


@needs_task_api
def test_task_refuses_pathsub_under_activation_checkpointing():
    """timm's loop back-propagates the summed loss once, recomputing both passes' blocks with one drop rate."""
    net = tiny_model("vit")
    net.set_grad_checkpointing(True)
    task = MaskSubTask(masksub.wrap(net, sub="droppath"), criterion=torch.nn.CrossEntropyLoss(), verbose=False)
    with pytest.raises(ValueError, match="activation checkpointing is on .VisionTransformer. and sub='droppath'"):
        task(tiny_images("vit", batch=2), torch.arange(2))
    with torch.no_grad():  # no backward: nothing to refuse
        assert torch.isfinite(task(tiny_images("vit", batch=2), torch.arange(2))["loss"])


@pytest.mark.parametrize("old_api", ["no_task_module", "old_signature"])
def test_task_on_older_timm_names_the_version_to_install(old_api):
    """timm's task API changed between releases: an older one fails at import with the fix, not mid-training."""
    fake = {
        "no_task_module": "sys.modules['timm.task'] = None",  # import fails, as on timm < 1.0.23
        "old_signature": """
            mod = types.ModuleType('timm.task')
            class ClassificationTask:  # timm 1.0.23 to 1.0.30
                def __init__(self, model, criterion, device=None, dtype=None, verbose=True): ...
            mod.ClassificationTask = ClassificationTask
            sys.modules['timm.task'] = mod
        """,
    }[old_api]
    code = "import sys, types, timm\n" + textwrap.dedent(fake) + "\nimport masksub.task\n"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode != 0
    assert "ImportError: masksub.task needs timm's TrainingTask API" in run.stderr
    assert "pip install -U 'timm>=1.0.31'" in run.stderr
