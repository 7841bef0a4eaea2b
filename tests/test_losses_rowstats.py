"""The streaming row-statistics kernel against float64 per-row loops, autograd, gradcheck and its memory contract."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from mlot_ds.losses.rowstats import student_row_stats, student_token_stats, teacher_row_stats, teacher_token_stats

SHAPES = [(2, 5, 7), (3, 4, 33), (1, 9, 50)]
DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def _log_sum_exp(values: list[float]) -> float:
    top = max(values)
    if top == -math.inf:
        return -math.inf
    return top + math.log(sum(math.exp(v - top) for v in values))


def reference_row(z: list[float], inv_t: float, ids: list[int] | None, mask: list[bool] | None):
    """Float64 statistics of one row, written as explicit Python loops."""
    scaled = [v * inv_t for v in z]
    lse = _log_sum_exp(scaled)
    gathered = [scaled[i] for i in ids] if ids is not None else None
    masked = _log_sum_exp([s for s, m in zip(scaled, mask) if m]) if mask is not None else None
    tail = None
    if ids is not None:
        outside = [s for v, s in enumerate(scaled) if v not in set(ids)]
        tail = _log_sum_exp(outside) if outside else -math.inf
    return lse, gathered, masked, tail


def _rows(kind: str, count: int, generator: torch.Generator) -> torch.Tensor:
    if kind == "contiguous":
        start = count // 4
        return torch.arange(start, start + max(1, count // 2))
    if kind == "all":
        return torch.arange(count)
    picked = torch.randperm(count, generator=generator)[: max(1, count // 2)]
    return picked.sort().values  # scattered


def _inputs(shape, dtype, rows_kind, seed=0, k=3):
    generator = torch.Generator().manual_seed(seed)
    batch, seq_len, vocab = shape
    logits = (torch.randn(shape, generator=generator, dtype=torch.float64) * 3).to(dtype)
    rows = _rows(rows_kind, batch * seq_len, generator)
    ids = torch.randint(0, vocab, (rows.numel(), k), generator=generator)
    ids[:, 1] = ids[:, 0]  # a duplicate id in every row
    mask = torch.rand(vocab, generator=generator) < 0.4
    mask[0] = True
    return logits, rows, ids, mask


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows_kind", ["scattered", "contiguous", "all"])
@pytest.mark.parametrize("chunk_elements", [1, 40, None])  # 1: blocks smaller than a row
def test_forward_matches_the_float64_loop(shape, dtype, rows_kind, chunk_elements):
    logits, rows, ids, mask = _inputs(shape, dtype, rows_kind)
    inv_t = 0.5
    stats = student_row_stats(logits, rows, inv_temperature=inv_t, gather_ids=ids, mask=mask, tail=True,
                              chunk_elements=chunk_elements)
    expected_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert stats.lse.dtype == stats.gathered.dtype == stats.masked_lse.dtype == stats.tail_lse.dtype == expected_dtype
    flat = logits.double().reshape(-1, shape[-1])
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    for r, row in enumerate(rows.tolist()):
        lse, gathered, masked, tail = reference_row(flat[row].tolist(), inv_t, ids[r].tolist(), mask.tolist())
        assert stats.lse[r].item() == pytest.approx(lse, abs=tol, rel=tol)
        assert stats.gathered[r].tolist() == pytest.approx(gathered, abs=tol, rel=tol)
        assert stats.masked_lse[r].item() == pytest.approx(masked, abs=tol, rel=tol)
        assert stats.tail_lse[r].item() == pytest.approx(tail, abs=tol, rel=tol)


def test_tail_is_minus_infinity_when_the_ids_cover_the_vocabulary():
    logits = torch.randn(1, 3, 4, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0], [0, 1, 2, 3]])
    stats = student_row_stats(logits, torch.arange(3), gather_ids=ids, tail=True)
    assert torch.isinf(stats.tail_lse).all() and (stats.tail_lse < 0).all()
    (stats.lse.sum() + stats.tail_lse.clamp(min=-1e9).sum()).backward()
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("rows_kind", ["scattered", "contiguous"])
def test_gradcheck_float64(rows_kind):
    logits, rows, ids, mask = _inputs((2, 4, 6), torch.float64, rows_kind)
    logits.requires_grad_(True)

    def fn(x):
        stats = student_row_stats(x, rows, inv_temperature=0.8, gather_ids=ids, mask=mask, tail=True,
                                  chunk_elements=7)
        return stats.lse, stats.gathered, stats.masked_lse, stats.tail_lse

    assert torch.autograd.gradcheck(fn, (logits,))


def _plain(logits, rows, inv_t, ids, mask):
    """The same statistics with plain autograd ops (materialises [R, V])."""
    z = logits.reshape(-1, logits.shape[-1])[rows].to(torch.promote_types(logits.dtype, torch.float32)) * inv_t
    lse = torch.logsumexp(z, 1)
    gathered = z.gather(1, ids)
    masked = torch.logsumexp(z.masked_fill(~mask, float("-inf")), 1)
    outside = torch.ones_like(z, dtype=torch.bool).scatter(1, ids, False)
    tail = torch.logsumexp(z.masked_fill(~outside, float("-inf")), 1)
    return lse, gathered, masked, tail


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows_kind", ["scattered", "contiguous"])
@pytest.mark.parametrize("used", [(0, 1, 2, 3), (0,), (1,), (2,), (3,), (1, 3)])
def test_gradient_equals_plain_autograd(dtype, rows_kind, used):
    logits, rows, ids, mask = _inputs((3, 5, 11), dtype, rows_kind, seed=1)
    weights = [torch.randn(rows.numel(), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    weights.insert(1, torch.randn(rows.numel(), ids.shape[1], generator=torch.Generator().manual_seed(9)))

    def loss(outputs):
        return sum((outputs[i] * weights[i].to(outputs[i].dtype)).sum() for i in used)

    a = logits.clone().requires_grad_(True)
    stats = student_row_stats(a, rows, inv_temperature=1.3, gather_ids=ids, mask=mask, tail=True, chunk_elements=30)
    loss(tuple(stats)).backward()
    b = logits.clone().requires_grad_(True)
    loss(_plain(b, rows, 1.3, ids, mask)).backward()
    assert a.grad.dtype == dtype and a.grad.shape == logits.shape
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(a.grad.double(), b.grad.double(), atol=tol, rtol=tol)
    untouched = torch.ones(logits.shape[0] * logits.shape[1], dtype=torch.bool)
    untouched[rows] = False
    assert (a.grad.reshape(-1, logits.shape[-1])[untouched] == 0).all()


def test_only_the_asked_outputs_are_returned_and_unused_ones_cost_nothing():
    logits, rows, _, _ = _inputs((2, 3, 5), torch.float32, "scattered")
    stats = student_row_stats(logits, rows)
    assert stats.gathered is None and stats.masked_lse is None and stats.tail_lse is None
    with pytest.raises(ValueError):
        student_row_stats(logits, rows, tail=True)
    with pytest.raises(ValueError):
        student_row_stats(logits, rows.flip(0))
    with pytest.raises(ValueError):
        student_row_stats(logits, rows, mask=torch.zeros(5, dtype=torch.bool))


def _big_allocations(fn, threshold_bytes: int) -> list[str]:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return [e.name for e in prof.events() if e.self_cpu_memory_usage >= threshold_bytes]


def test_memory_one_full_size_gradient_and_no_saved_rows():
    batch, seq_len, vocab = 2, 64, 512
    logits = torch.randn(batch, seq_len, vocab, requires_grad=True)
    rows = torch.arange(batch * seq_len)
    ids = torch.randint(0, vocab, (rows.numel(), 2))
    mask = torch.rand(vocab) < 0.5
    full_bytes = logits.numel() * logits.element_size()
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        stats = student_row_stats(logits, rows, gather_ids=ids, mask=mask, tail=True, chunk_elements=4096)
    for tensor in saved:  # only the input logits themselves may be of the size R x V
        assert tensor.data_ptr() == logits.data_ptr() or tensor.numel() < rows.numel() * vocab // 4
    loss = stats.lse.sum() + stats.gathered.sum() + stats.masked_lse.sum() + stats.tail_lse.sum()
    big = _big_allocations(loss.backward, full_bytes // 2)
    assert big == ["aten::empty"], big  # the gradient itself, nothing else of that size

    # The check does catch a plain implementation (several [R, V] temporaries in its backward).
    plain = torch.logsumexp(logits.reshape(-1, vocab)[rows], 1).sum()
    assert len(_big_allocations(plain.backward, full_bytes // 2)) > 1


def _teacher_reference(flat, rows, inv_t, targets, mask, k):
    out = {"lse": [], "target_log_prob": [], "masked_log_mass": [], "topk_log_probs": [], "topk_tail_log_mass": [],
           "entropy": [], "topk_ids": []}
    for r, row in enumerate(rows.tolist()):
        scaled = [v * inv_t for v in flat[row].tolist()]
        lse = _log_sum_exp(scaled)
        log_p = [s - lse for s in scaled]
        order = sorted(range(len(scaled)), key=lambda v: -scaled[v])[:k]
        out["lse"].append(lse)
        out["target_log_prob"].append(log_p[targets[r]])
        out["masked_log_mass"].append(_log_sum_exp([lp for lp, m in zip(log_p, mask.tolist()) if m]))
        out["topk_ids"].append(order)
        out["topk_log_probs"].append([log_p[v] for v in order])
        rest = [lp for v, lp in enumerate(log_p) if v not in order]
        out["topk_tail_log_mass"].append(_log_sum_exp(rest) if rest else -math.inf)
        out["entropy"].append(-sum(math.exp(lp) * lp for lp in log_p))
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows_per_block", [1, 3, None])
@pytest.mark.parametrize("source", ["logits", "hidden"])
def test_teacher_row_stats_matches_the_loop(dtype, rows_per_block, source):
    generator = torch.Generator().manual_seed(3)
    batch, seq_len, hidden_size, vocab = 2, 6, 8, 19
    weight = torch.randn(vocab, hidden_size, generator=generator, dtype=torch.float64).to(dtype)
    bias = torch.randn(vocab, generator=generator, dtype=torch.float64).to(dtype)
    hidden = torch.randn(batch * seq_len, hidden_size, generator=generator, dtype=torch.float64).to(dtype)
    logits2d = F.linear(hidden, weight, bias)
    if source == "logits":
        read_rows = lambda r: logits2d.index_select(0, r)
    else:
        read_rows = lambda r: F.linear(hidden.index_select(0, r), weight, bias)
    rows = torch.tensor([7, 1, 3, 3, 11])  # any order, repeats allowed
    targets = torch.randint(0, vocab, (rows.numel(),), generator=generator)
    mask = torch.rand(vocab, generator=generator) < 0.5
    mask[2] = True
    k = 4
    got = teacher_row_stats(read_rows, rows, vocab=vocab, inv_temperature=0.5, targets=targets, mask=mask,
                            topk=k, entropy=True, rows_per_block=rows_per_block)
    want = _teacher_reference(logits2d.double(), rows, 0.5, targets.tolist(), mask, k)
    tol = 1e-12 if dtype == torch.float64 else 3e-5
    for key, values in want.items():
        if key == "topk_ids":
            assert got[key].tolist() == values
        else:
            torch.testing.assert_close(got[key].double(), torch.tensor(values, dtype=torch.float64), atol=tol, rtol=tol)
    assert not any(v.requires_grad for v in got.values())


def test_teacher_row_stats_returns_only_what_is_asked_and_k_equal_v():
    logits2d = torch.randn(4, 6)
    got = teacher_row_stats(lambda r: logits2d.index_select(0, r), torch.arange(4), vocab=6, topk=6, rows_per_block=2)
    assert set(got) == {"lse", "topk_ids", "topk_log_probs", "topk_tail_log_mass"}
    assert torch.isinf(got["topk_tail_log_mass"]).all()
    torch.testing.assert_close(got["topk_log_probs"].exp().sum(1), torch.ones(4))
    with pytest.raises(ValueError):
        teacher_row_stats(lambda r: logits2d.index_select(0, r)[:, :5], torch.arange(4), vocab=6)


def _token_reference(logits, labels, mask):
    batch, seq_len, _ = logits.shape
    log_prob = torch.zeros(batch, seq_len, dtype=torch.float64)
    boundary = torch.zeros(batch, seq_len, dtype=torch.float64)
    for b in range(batch):
        for t in range(1, seq_len):
            if labels[b, t] == -100:
                continue
            previous = logits[b, t - 1].double().tolist()
            log_prob[b, t] = previous[labels[b, t]] - _log_sum_exp(previous)
            own = logits[b, t].double().tolist()
            boundary[b, t] = _log_sum_exp([v for v, m in zip(own, mask.tolist()) if m]) - _log_sum_exp(own)
    return log_prob, boundary


@pytest.mark.parametrize("dtype", DTYPES)
def test_token_stats_student_and_teacher(dtype):
    generator = torch.Generator().manual_seed(5)
    batch, seq_len, vocab = 2, 7, 13
    logits = (torch.randn(batch, seq_len, vocab, generator=generator, dtype=torch.float64) * 2).to(dtype)
    labels = torch.randint(0, vocab, (batch, seq_len), generator=generator)
    labels[0, :3] = -100  # a prompt
    labels[1, 5] = -100
    mask = torch.rand(vocab, generator=generator) < 0.3
    mask[1] = True
    want_lp, want_boundary = _token_reference(logits, labels, mask)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    student = student_token_stats(logits, labels, boundary_mask=mask, chunk_elements=20)
    teacher = teacher_token_stats(lambda r: logits.reshape(-1, vocab).index_select(0, r), labels, vocab=vocab,
                                  boundary_mask=mask, rows_per_block=2)
    for stats in (student, teacher):
        assert stats.valid.tolist() == [[t >= 1 and labels[b, t] != -100 for t in range(seq_len)] for b in range(batch)]
        torch.testing.assert_close(stats.log_prob.double(), want_lp, atol=tol, rtol=tol)
        torch.testing.assert_close(stats.boundary_log_mass.double(), want_boundary, atol=tol, rtol=tol)


def test_student_token_stats_gradcheck():
    generator = torch.Generator().manual_seed(6)
    logits = torch.randn(2, 5, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 6, (2, 5), generator=generator)
    labels[1, :2] = -100
    mask = torch.tensor([True, False, True, False, False, True])
    assert torch.autograd.gradcheck(
        lambda x: tuple(student_token_stats(x, labels, boundary_mask=mask, chunk_elements=6)[:2]), (logits,))
