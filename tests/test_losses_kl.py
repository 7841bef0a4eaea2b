"""Same-tokenizer top-k KL family: float64 loops on full and coarse distributions, closed forms, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from mlot_ds.losses.kl import DIVERGENCES, coarse_divergence, pair_rows, teacher_topk, topk_kl
from mlot_ds.pairing import pack_pairs


def _softmax(row: list[float], temperature: float) -> list[float]:
    scaled = [v / temperature for v in row]
    top = max(scaled)
    weights = [math.exp(v - top) for v in scaled]
    total = sum(weights)
    return [w / total for w in weights]


def _kl(a: list[float], b: list[float]) -> float:
    return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)


def reference_divergence(p: list[float], q: list[float], divergence: str, lam=0.1, beta=0.5) -> float:
    """Closed forms on explicit probability lists (float64 Python)."""
    if divergence == "forward":
        return _kl(p, q)
    if divergence == "reverse":
        return _kl(q, p)
    if divergence == "skew_forward":
        return _kl(p, [lam * x + (1 - lam) * y for x, y in zip(p, q)])
    if divergence == "skew_reverse":
        return _kl(q, [lam * y + (1 - lam) * x for x, y in zip(p, q)])
    mixture = [beta * x + (1 - beta) * y for x, y in zip(p, q)]
    return beta * _kl(p, mixture) + (1 - beta) * _kl(q, mixture)


def _coarse(probs: list[float], ids: list[int]) -> list[float]:
    kept = [probs[i] for i in ids]
    return kept + [sum(p for v, p in enumerate(probs) if v not in set(ids))]


def _setup(seed=0, batch=2, student_len=6, teacher_len=5, vocab=12, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    student = (torch.randn(batch, student_len, vocab, generator=generator, dtype=torch.float64) * 2).to(dtype)
    teacher = (torch.randn(batch, teacher_len, vocab, generator=generator, dtype=torch.float64) * 2).to(dtype)
    pairing = pack_pairs([[(0, 0), (2, 1), (3, 3), (5, 4)], [(1, 0), (4, 2)]])
    return student, teacher, pairing


def _run(student, teacher, pairing, *, k, temperature, divergence, chunk_elements=None):
    s_rows, t_rows = pair_rows(pairing, student.shape[1], teacher.shape[1])
    vocab = teacher.shape[-1]
    summary = teacher_topk(lambda r: teacher.reshape(-1, vocab).index_select(0, r), t_rows, vocab=vocab, k=k,
                           temperature=temperature, rows_per_block=2)
    return topk_kl(student, s_rows, summary, divergence=divergence, temperature=temperature,
                   chunk_elements=chunk_elements), s_rows, t_rows, summary


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("k", [3, 12, 500])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_matches_the_float64_coarse_reference(divergence, k, temperature, dtype):
    student, teacher, pairing = _setup(dtype=dtype)
    out, s_rows, t_rows, _ = _run(student, teacher, pairing, k=k, temperature=temperature,
                                        divergence=divergence, chunk_elements=5)
    vocab = student.shape[-1]
    s_flat, t_flat = student.double().reshape(-1, vocab), teacher.double().reshape(-1, vocab)
    total = 0.0
    for s_row, t_row in zip(s_rows.tolist(), t_rows.tolist()):
        p = _softmax(t_flat[t_row].tolist(), temperature)
        q = _softmax(s_flat[s_row].tolist(), temperature)
        ids = sorted(range(vocab), key=lambda v: -p[v])[: min(k, vocab)]
        if k < vocab:
            p, q = _coarse(p, ids), _coarse(q, ids)
        total += reference_divergence(p, q, divergence)
    tol = 1e-10 if dtype == torch.float64 else 2e-4
    assert out["kl"].item() == pytest.approx(total * temperature**2, rel=tol, abs=tol)
    assert out["tokens"].item() == pairing.tokens


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_exact_when_k_covers_the_vocabulary_and_a_lower_bound_otherwise(divergence):
    student, teacher, pairing = _setup(seed=1)
    vocab = student.shape[-1]
    full = _run(student, teacher, pairing, k=vocab, temperature=1.5, divergence=divergence)[0]["kl"].item()
    s_rows, t_rows = pair_rows(pairing, student.shape[1], teacher.shape[1])
    exact = 0.0
    for s_row, t_row in zip(s_rows.tolist(), t_rows.tolist()):
        p = _softmax(teacher.reshape(-1, vocab)[t_row].tolist(), 1.5)
        q = _softmax(student.reshape(-1, vocab)[s_row].tolist(), 1.5)
        exact += reference_divergence(p, q, divergence)
    assert full == pytest.approx(exact * 1.5**2, rel=1e-10)
    if divergence == "forward":  # the plain full KL from torch's log-softmax too
        ls = torch.log_softmax(student.reshape(-1, vocab)[s_rows] / 1.5, -1)
        lt = torch.log_softmax(teacher.reshape(-1, vocab)[t_rows] / 1.5, -1)
        assert full == pytest.approx(float((lt.exp() * (lt - ls)).sum()) * 1.5**2, rel=1e-10)
    for k in (1, 3, 6):  # data-processing inequality: coarse <= full
        coarse = _run(student, teacher, pairing, k=k, temperature=1.5, divergence=divergence)[0]["kl"].item()
        assert coarse <= full + 1e-12


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("k", [4, 12])
def test_zero_at_student_equal_teacher_with_zero_gradient(divergence, k):
    _, teacher, _ = _setup(seed=2)
    pairing = pack_pairs([[(0, 0), (1, 1), (3, 3)], [(2, 2), (4, 4)]])
    student = teacher.clone().requires_grad_(True)
    out = _run(student, teacher, pairing, k=k, temperature=2.0, divergence=divergence)[0]
    assert abs(out["kl"].item()) < 1e-12
    out["kl"].backward()
    assert student.grad.abs().max().item() < 1e-12


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("k", [3, 12])
def test_gradcheck_student_side(divergence, k):
    student, teacher, pairing = _setup(seed=3)
    student.requires_grad_(True)
    s_rows, t_rows = pair_rows(pairing, student.shape[1], teacher.shape[1])
    vocab = teacher.shape[-1]
    summary = teacher_topk(lambda r: teacher.reshape(-1, vocab).index_select(0, r), t_rows, vocab=vocab, k=k,
                           temperature=2.0)
    assert torch.autograd.gradcheck(
        lambda x: topk_kl(x, s_rows, summary, divergence=divergence, temperature=2.0, chunk_elements=13)["kl"],
        (student,))


def test_coarse_divergence_closed_forms_on_two_outcomes():
    p, q = 0.3, 0.6
    log_p = torch.tensor([[math.log(p), math.log(1 - p)]], dtype=torch.float64)
    log_q = torch.tensor([[math.log(q), math.log(1 - q)]], dtype=torch.float64)
    bern = lambda a, b: a * math.log(a / b) + (1 - a) * math.log((1 - a) / (1 - b))
    expected = {
        "forward": bern(p, q),
        "reverse": bern(q, p),
        "skew_forward": bern(p, 0.1 * p + 0.9 * q),
        "skew_reverse": bern(q, 0.1 * q + 0.9 * p),
        "jsd": 0.5 * bern(p, (p + q) / 2) + 0.5 * bern(q, (p + q) / 2),
    }
    for name, value in expected.items():
        assert coarse_divergence(log_p, log_q, divergence=name).item() == pytest.approx(value, rel=1e-12)
    # generalised JSD with another beta: M = beta p + (1 - beta) q
    m = 0.3 * p + 0.7 * q
    assert coarse_divergence(log_p, log_q, divergence="jsd", beta=0.3).item() == pytest.approx(
        0.3 * bern(p, m) + 0.7 * bern(q, m), rel=1e-12)


def test_rows_in_any_order_and_validation():
    student, teacher, pairing = _setup(seed=4)
    s_rows, t_rows = pair_rows(pairing, student.shape[1], teacher.shape[1])
    vocab = teacher.shape[-1]
    read = lambda r: teacher.reshape(-1, vocab).index_select(0, r)
    forward = topk_kl(student, s_rows, teacher_topk(read, t_rows, vocab=vocab, k=5))["kl"]
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    permuted = topk_kl(student, s_rows[perm], teacher_topk(read, t_rows[perm], vocab=vocab, k=5))["kl"]
    assert permuted.item() == pytest.approx(forward.item(), rel=1e-12)
    summary = teacher_topk(read, t_rows, vocab=vocab, k=5, temperature=2.0)
    with pytest.raises(ValueError):
        topk_kl(student, s_rows, summary)  # temperature 1 vs the summary's 2
    with pytest.raises(ValueError):
        topk_kl(student, s_rows, summary, temperature=2.0, divergence="kl")
    duplicated = s_rows.clone()
    duplicated[1] = duplicated[0]
    with pytest.raises(ValueError):
        topk_kl(student, duplicated, summary, temperature=2.0)
