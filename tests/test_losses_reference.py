"""MultiLevelOT, ULD, MinED and CE against slow, obviously correct float64 loops written here."""

from __future__ import annotations

import math

import pytest
import torch

from mlot_ds.losses import masked_ce, mined_kl, multilevel_ot, sinkhorn_plan, uld
from mlot_ds.pairing import pack_pairs
from tests.helpers import CASES, make_batch, position_pairs, reference_sinkhorn_distance, softmax


def reference_mlot(student_logits, teacher_logits, pairs, *, k, tau_had=1.0, tau_sl=1.0, tau_sd=2.0, lam=0.1, iters=20):
    """Paper eq. (10)-(20), one sequence at a time, plain Python floats, plain-domain Sinkhorn."""
    had = sl = sd = 0.0
    for b, seq_pairs in enumerate(pairs):
        if not seq_pairs:
            continue

        def truncated(logits, rows, tau):
            probs = [softmax(logits[b, r].tolist(), tau) for r in rows]
            sums = [sum(p[v] for p in probs) for v in range(len(probs[0]))]
            ranking = sorted(range(len(sums)), key=lambda v: -sums[v])[:k]
            return [[p[v] for v in ranking] for p in probs]

        s_rows = [s for s, _ in seq_pairs]
        t_rows = [t for _, t in seq_pairs]
        t_had, s_had = truncated(teacher_logits, t_rows, tau_had), truncated(student_logits, s_rows, tau_had)
        had += sum(abs(a - c) for ta, sa in zip(t_had, s_had) for a, c in zip(ta, sa))
        t_sl, s_sl = truncated(teacher_logits, t_rows, tau_sl), truncated(student_logits, s_rows, tau_sl)
        sl -= sum(a * math.log(c) for ta, sa in zip(t_sl, s_sl) for a, c in zip(ta, sa))
        t_sd, s_sd = truncated(teacher_logits, t_rows, tau_sd), truncated(student_logits, s_rows, tau_sd)
        sd += reference_sinkhorn_distance(t_sd, s_sd, lam, iters)
    return had, sl, sd


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_multilevel_ot_matches_float64_loop(case, dtype):
    s_spec, t_spec, ts, tt, n, m, k = case
    gen = torch.Generator().manual_seed(len(s_spec) * 100 + n)
    student, s_labels = make_batch(s_spec, ts, n, gen)
    teacher, t_labels = make_batch(t_spec, tt, m, gen)
    expected = reference_mlot(student, teacher, position_pairs(s_labels, t_labels), k=k)
    out = multilevel_ot(student.to(dtype), teacher.to(dtype), s_labels, t_labels, preset="paper", k=k)
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    for name, value in zip(("had", "sl", "sd"), expected):
        torch.testing.assert_close(out[name].double(), torch.tensor(value, dtype=torch.float64), **tol, msg=name)
    assert out["tokens"] == sum(len(p) for p in position_pairs(s_labels, t_labels))


def test_custom_pairing_and_temperatures_match_loop():
    """A many-to-one pairing (rows reused) and non-default temperatures, lambda and N."""
    gen = torch.Generator().manual_seed(3)
    student = torch.randn(2, 7, 10, generator=gen, dtype=torch.float64)
    teacher = torch.randn(2, 6, 12, generator=gen, dtype=torch.float64)
    pairs = [[(0, 1), (1, 1), (2, 3), (5, 4)], [(3, 0), (3, 2), (6, 5)]]
    expected = reference_mlot(student, teacher, pairs, k=3, tau_had=1.5, tau_sl=0.7, tau_sd=3.0, lam=0.3, iters=7)
    dummy = torch.full((2, 7), -100), torch.full((2, 6), -100)
    out = multilevel_ot(
        student, teacher, *dummy, pairing=pack_pairs(pairs), k=3, tau_had=1.5, tau_sl=0.7, tau_sd=3.0,
        sinkhorn_lambda=0.3, sinkhorn_iters=7,
    )
    for name, value in zip(("had", "sl", "sd"), expected):
        torch.testing.assert_close(out[name], torch.tensor(value, dtype=torch.float64), rtol=1e-9, atol=1e-9)


def test_log_domain_plan_equals_plain_domain_iterations():
    gen = torch.Generator().manual_seed(5)
    cost = torch.rand(2, 5, 5, generator=gen, dtype=torch.float64) * 2
    plan = sinkhorn_plan(cost, torch.ones(2, 5, dtype=torch.bool), torch.ones(2, 5, dtype=torch.bool), sinkhorn_iters=9)
    expected = torch.exp(-cost / 0.1)
    for _ in range(9):
        expected = expected / expected.sum(dim=2, keepdim=True)
        expected = expected / expected.sum(dim=1, keepdim=True)
    torch.testing.assert_close(plan, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", CASES)
def test_uld_matches_loop_with_explicit_zero_padding(case):
    s_spec, t_spec, ts, tt, n, m, _ = case
    gen = torch.Generator().manual_seed(11)
    student, s_labels = make_batch(s_spec, ts, n, gen)
    teacher, t_labels = make_batch(t_spec, tt, m, gen)
    expected = 0.0
    for b, seq_pairs in enumerate(position_pairs(s_labels, t_labels)):
        for s_row, t_row in seq_pairs:
            s_sorted = sorted(softmax(student[b, s_row].tolist(), 1.0), reverse=True) + [0.0] * max(0, m - n)
            t_sorted = sorted(softmax(teacher[b, t_row].tolist(), 1.0), reverse=True) + [0.0] * max(0, n - m)
            expected += sum(abs(a - c) for a, c in zip(s_sorted, t_sorted))
    out = uld(student, teacher, s_labels, t_labels)
    torch.testing.assert_close(out["uld"], torch.tensor(expected, dtype=torch.float64), rtol=1e-10, atol=1e-10)


def test_masked_ce_matches_loop():
    gen = torch.Generator().manual_seed(2)
    logits, labels = make_batch([(2, 4), (1, 6)], 8, 9, gen)
    expected = 0.0
    for b in range(2):
        for t in range(7):
            if labels[b, t + 1] != -100:
                expected -= math.log(softmax(logits[b, t].tolist(), 1.0)[labels[b, t + 1]])
    out = masked_ce(logits, labels)
    torch.testing.assert_close(out["ce"], torch.tensor(expected, dtype=torch.float64), rtol=1e-10, atol=1e-10)
    assert out["tokens"] == 10 - 0  # answer tokens at position >= 1: 4 + 6


def test_fused_ce_equals_masked_ce_in_value_and_gradient():
    gen = torch.Generator().manual_seed(4)
    student, s_labels = make_batch([(2, 5), (3, 4)], 10, 12, gen)
    teacher, t_labels = make_batch([(1, 6), (2, 3)], 9, 8, gen)
    fused_input = student.clone().requires_grad_()
    plain_input = student.clone().requires_grad_()
    fused = multilevel_ot(fused_input, teacher, s_labels, t_labels, k=4, with_ce=True)
    plain = multilevel_ot(plain_input, teacher, s_labels, t_labels, k=4)
    ce = masked_ce(plain_input, s_labels)
    torch.testing.assert_close(fused["ce"], ce["ce"], rtol=1e-12, atol=1e-12)
    assert fused["ce_tokens"] == ce["tokens"]
    (fused["ce"] + fused["had"] + fused["sl"] + fused["sd"]).backward()
    (ce["ce"] + plain["had"] + plain["sl"] + plain["sd"]).backward()
    torch.testing.assert_close(fused_input.grad, plain_input.grad, rtol=1e-10, atol=1e-12)


def test_mined_kl_matches_loop():
    gen = torch.Generator().manual_seed(9)
    student = torch.randn(2, 5, 6, generator=gen, dtype=torch.float64)
    teacher = torch.randn(2, 4, 9, generator=gen, dtype=torch.float64)
    mapping = torch.randint(0, 9, (6,), generator=gen)
    pairs = [[(0, 0), (2, 1), (3, 3)], [(1, 2)]]
    expected = 0.0
    for b, seq_pairs in enumerate(pairs):
        for s_row, t_row in seq_pairs:
            p = softmax([teacher[b, t_row, mapping[v]].item() for v in range(6)], 2.0)
            q = softmax(student[b, s_row].tolist(), 2.0)
            expected += 4.0 * sum(pv * math.log(pv / qv) for pv, qv in zip(p, q))
    out = mined_kl(student, teacher, pack_pairs(pairs), mapping)
    torch.testing.assert_close(out["mined"], torch.tensor(expected, dtype=torch.float64), rtol=1e-10, atol=1e-10)
    assert out["tokens"] == 4
