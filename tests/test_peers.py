"""The benchmarks' peers (benchmarks/peers.py): R-Drop's and cosub's gradients as their papers write the loss, and
their runs through the trainer (resumed too)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
import yaml

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.append(str(BENCH))  # after the tests and packages: the scripts shadow nothing
import peers  # noqa: E402
from test_benchmarks import ENV  # noqa: E402


def _vit(**rates):
    torch.manual_seed(0)
    kwargs = dict(img_size=28, patch_size=7, embed_dim=32, depth=2, num_heads=2, in_chans=1, num_classes=10)
    return timm.create_model("vit_tiny_patch16_224", **kwargs, **rates)


def _grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _step_grads(peer: str, criterion, x, y, **rates) -> tuple[dict, dict]:
    """The peer step's gradients (its optimizer's lr 0 leaves the weights), from the seed 1's dropout draws."""
    model = _vit(**rates)
    step = peers.peer_step(model, torch.optim.SGD(model.parameters(), lr=0.0), peers.peer_loss(peer, criterion, 0.7))
    torch.manual_seed(1)
    out = step(x, y)
    return _grads(model), out


def _formula_grads(loss_of, **rates) -> tuple[dict, torch.Tensor]:
    """The gradients and value of ``loss_of(a, b)``, ``a`` and ``b`` the model's two passes from the seed 1's
    draws."""
    model = _vit(**rates)
    torch.manual_seed(1)
    a, b = model(X), model(X)
    loss = loss_of(a, b)
    loss.backward()
    return _grads(model), loss.detach()


X, Y = torch.randn(6, 1, 28, 28), torch.tensor([0, 1, 2, 3, 4, 5])


def test_rdrop_gradients_are_those_of_its_papers_loss():
    rates = dict(drop_rate=0.3, proj_drop_rate=0.3, attn_drop_rate=0.3)

    def rdrop(a, b):  # the R-Drop paper's loss: the CE of each pass halved, alpha times the mean of both KLs
        kl_ab = F.kl_div(F.log_softmax(b, -1), F.softmax(a, -1), reduction="batchmean")  # KL(a || b)
        kl_ba = F.kl_div(F.log_softmax(a, -1), F.softmax(b, -1), reduction="batchmean")
        return 0.5 * (F.cross_entropy(a, Y) + F.cross_entropy(b, Y)) + 0.7 * 0.5 * (kl_ab + kl_ba)

    grads, out = _step_grads("rdrop", torch.nn.CrossEntropyLoss(), X, Y, **rates)
    expected, loss = _formula_grads(rdrop, **rates)
    assert grads.keys() == expected.keys() and len(grads) > 10
    for name, g in expected.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(out["loss"], loss)  # the step reports the loss it minimized
    # negative control: the passes differ (dropout drawn twice), so the KL term has a gradient of its own
    without_kl, _ = _formula_grads(lambda a, b: 0.5 * (F.cross_entropy(a, Y) + F.cross_entropy(b, Y)), **rates)
    assert any(not torch.allclose(grads[n], g, rtol=1e-3, atol=1e-5) for n, g in without_kl.items())


def test_cosub_gradients_are_those_of_deit3s_loss_with_binary_cross_entropy():
    rates = dict(drop_path_rate=0.5)
    onehot = F.one_hot(Y, 10).float()
    bce = torch.nn.BCEWithLogitsLoss()

    def cosub(a, b):  # DeiT-III's --cosub: a quarter each, the other half's output detached through a sigmoid
        return 0.25 * (bce(a, onehot) + bce(b, onehot) + bce(a, b.detach().sigmoid()) + bce(b, a.detach().sigmoid()))

    grads, out = _step_grads("cosub", bce, X, onehot, **rates)
    expected, loss = _formula_grads(cosub, **rates)
    for name, g in expected.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(out["loss"], loss)
    # negative control: without the detach, gradients differ
    loose, _ = _formula_grads(lambda a, b: 0.25 * (bce(a, onehot) + bce(b, onehot) + bce(a, b.sigmoid())), **rates)
    assert any(not torch.allclose(grads[n], g, rtol=1e-3, atol=1e-5) for n, g in loose.items())


def test_a_peer_without_its_drop_has_passes_alike():
    """With no dropout the two passes are one: R-Drop's KL term and its gradient are 0, and the step's gradients are
    the plain cross-entropy's."""
    grads, out = _step_grads("rdrop", torch.nn.CrossEntropyLoss(), X, Y)
    torch.testing.assert_close(out["loss_sub"], out["loss_main"])
    plain, _ = _formula_grads(lambda a, b: F.cross_entropy(a, Y))
    for name, g in plain.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


def _peer_run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(BENCH / "peers.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)


TINY_RUN = (
    *("--model.kwargs", "{img_size: 28, patch_size: 7, embed_dim: 32, depth: 1, num_heads: 2}"),
    *("--data.train_subset", "512", "--data.eval_subset", "256", "--data.batch_size", "128"),
    *("--sched.epochs", "2", "--train.device", "cpu", "--train.name", "run"),
)


def test_a_peer_run_trains_records_its_sub_loss_and_resumes_as_it_began(tmp_path):
    out = tmp_path / "runs"
    first = _peer_run(
        tmp_path,
        "cosub",
        *TINY_RUN,
        "--model.drop_path_rate",
        "0.1",
        "--train.output",
        str(out),
        "--train.max_steps",
        "5",
    )
    assert first.returncode == 0, first.stderr[-3000:]
    folder = out / "run"
    assert json.loads((folder / "peer.json").read_text()) == {"peer": "cosub", "alpha": None}
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert config["sub"]["kind"] == "none" and config["model"]["drop_path_rate"] == 0.1
    for args, message in (
        (("rdrop", "--resume", str(folder)), "is a cosub run"),
        (("cosub", "--alpha", "2", "--resume", str(folder)), "--alpha is R-Drop's KL weight: cosub has none"),
        (("cosub", "--resume", str(tmp_path)), "has no peer.json: not a peers.py run"),
    ):
        wrong = _peer_run(tmp_path, *args)
        assert wrong.returncode == 2 and message in wrong.stderr, wrong.stderr[-2000:]
    resumed = _peer_run(tmp_path, "cosub", "--resume", str(folder))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and records[-1]["step"] == 8
    # the peer's second pass reports its loss; a plain run's record has none
    assert all(r["train_loss_sub"] is not None and r["train_loss_sub"] > 0 for r in records)
    assert not list(out.glob("run-*")), "the resume wrote into the run's own folder"


def test_a_peer_run_refuses_masksubs_sub_branch_keys(tmp_path):
    proc = _peer_run(tmp_path, "rdrop", *TINY_RUN, "--sub.kind", "mask", "--train.output", str(tmp_path / "runs"))
    assert proc.returncode == 2 and "sub.kind: a peer's run has no sub branch" in proc.stderr
    assert not (tmp_path / "runs").exists()
