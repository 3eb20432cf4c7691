"""soft_cross_entropy, the distillation of softmax teachers: the formula's value and gradient in every dtype and
chunking, and nothing of the logits' size kept for the backward but the logits themselves."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import masksub.loss
from masksub.loss import SubBranchLoss, soft_cross_entropy


def by_formula(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    return -(F.softmax(teacher.double() / t, -1) * F.log_softmax(student.double() / t, -1)).sum(-1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("t", [1.0, 2.5])
@pytest.mark.parametrize("chunk", [10, 2**18], ids=["chunks-of-2-rows-last-ragged", "one-chunk"])
def test_value_and_gradient_equal_the_formula(monkeypatch, dtype, t, chunk):
    monkeypatch.setitem(masksub.loss.CHUNK_ELEMENTS, "cpu", chunk)  # 7 rows of 5: chunks of 2, 2, 2 and 1
    g = torch.Generator().manual_seed(0)
    student = (3 * torch.randn(7, 5, generator=g)).to(dtype).requires_grad_()
    teacher = (3 * torch.randn(7, 5, generator=g)).to(dtype)
    weights = torch.rand(7, generator=g, dtype=torch.float64)  # a weight per row, as the token losses give
    got = soft_cross_entropy(student, teacher, t)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and got.shape == (7,)
    (grad,) = torch.autograd.grad((got.double() * weights).sum(), student)
    exact = student.detach().double().requires_grad_()
    want = by_formula(exact, teacher, t)
    (want_grad,) = torch.autograd.grad((want * weights).sum(), exact)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]  # bf16: its gradient's rounding
    torch.testing.assert_close(got.double(), want, rtol=1e-5 if dtype != torch.float64 else 1e-12, atol=tol)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.double(), want_grad, rtol=tol, atol=tol)


def test_gradcheck_and_the_teacher_gets_no_gradient(monkeypatch):
    monkeypatch.setitem(masksub.loss.CHUNK_ELEMENTS, "cpu", 8)
    student = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s: soft_cross_entropy(s, teacher, 1.7), (student,))
    soft_cross_entropy(student, teacher).sum().backward()
    assert teacher.grad is None and student.grad is not None


def test_rows_of_another_shape_are_refused():
    with pytest.raises(ValueError, match=r"\(rows, classes\) alike, got \(3, 4\) and \(3, 5\)"):
        soft_cross_entropy(torch.zeros(3, 4), torch.zeros(3, 5))


def test_the_distillation_keeps_nothing_of_the_logits_size_but_the_logits():
    """A language model's distillation over its vocabulary: the backward keeps the two branches' logits (which
    exist anyway) and small tensors, not float32 copies of them, softmaxes or log-softmaxes; the loss and its
    gradient equal the formula's."""
    batch, length, vocab = 2, 6, 4096
    sub = torch.randn(batch, length, vocab, dtype=torch.bfloat16, requires_grad=True)
    main = torch.randn(batch, length, vocab, dtype=torch.bfloat16)
    target = torch.randint(0, vocab, (batch, length)).masked_fill(torch.rand(batch, length) < 0.3, -100)
    saved = []

    def pack(x):
        saved.append(x.numel() * x.element_size() if x.data_ptr() not in (sub.data_ptr(), main.data_ptr()) else 0)
        return x

    loss = SubBranchLoss(torch.nn.CrossEntropyLoss())
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        distilled = loss.sub_loss(sub, main, target)
    assert max(saved) < sub.numel()  # of the logits' size in bytes at bfloat16, a fourth of a float32 copy
    distilled.backward()
    labelled = target != -100
    want = by_formula(sub.detach()[labelled], main[labelled], 1.0).mean()
    torch.testing.assert_close(distilled.double(), want, rtol=1e-5, atol=1e-6)


def test_torch_compile_traces_it_whole_to_the_same_value_and_gradient():
    loss = SubBranchLoss(torch.nn.CrossEntropyLoss(), temperature=2.0)
    sub = torch.randn(2, 5, 300, requires_grad=True)
    main = torch.randn(2, 5, 300)
    target = torch.randint(0, 300, (2, 5)).index_fill(1, torch.tensor([0, 1]), -100)
    want = loss.sub_loss(sub, main, target)
    compiled = torch.compile(loss.sub_loss, fullgraph=True)(sub, main, target)  # fullgraph: no break at the Function
    torch.testing.assert_close(compiled, want)
    torch.testing.assert_close(torch.autograd.grad(compiled, sub)[0], torch.autograd.grad(want, sub)[0])
