"""``ranking="token"`` (Table 3's TR row): each token ranked by its own probabilities, against float64 loops."""

from __future__ import annotations

import math

import pytest
import torch

from mlot_ds.losses import multilevel_ot, multilevel_ot_from_summary, teacher_summary
from mlot_ds.losses.mlot import teacher_summary_from_hidden
from mlot_ds.pairing import pack_pairs, position_pairing
from tests.helpers import CASES, make_batch, position_pairs, reference_sinkhorn_distance, softmax


def reference_token_ranked(student_logits, teacher_logits, pairs, *, k, tau_had=1.0, tau_sl=1.0, tau_sd=2.0,
                           lam=0.1, iters=20):
    """HAD, SL, SD with every token's vector sorted descending on its own and cut to k (plain floats)."""
    had = sl = sd = 0.0

    def own_top_k(logits, b, row, tau):
        return sorted(softmax(logits[b, row].tolist(), tau), reverse=True)[:k]

    for b, seq_pairs in enumerate(pairs):
        if not seq_pairs:
            continue
        for s_row, t_row in seq_pairs:
            t_had, s_had = own_top_k(teacher_logits, b, t_row, tau_had), own_top_k(student_logits, b, s_row, tau_had)
            had += sum(abs(a - c) for a, c in zip(t_had, s_had))
            t_sl, s_sl = own_top_k(teacher_logits, b, t_row, tau_sl), own_top_k(student_logits, b, s_row, tau_sl)
            sl -= sum(a * math.log(c) for a, c in zip(t_sl, s_sl))
        t_sd = [own_top_k(teacher_logits, b, t, tau_sd) for _, t in seq_pairs]
        s_sd = [own_top_k(student_logits, b, s, tau_sd) for s, _ in seq_pairs]
        sd += reference_sinkhorn_distance(t_sd, s_sd, lam, iters)
    return had, sl, sd


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_token_ranking_matches_float64_loop(case, dtype):
    s_spec, t_spec, ts, tt, n, m, k = case
    gen = torch.Generator().manual_seed(len(s_spec) * 7 + m)
    student, s_labels = make_batch(s_spec, ts, n, gen)
    teacher, t_labels = make_batch(t_spec, tt, m, gen)
    expected = reference_token_ranked(student, teacher, position_pairs(s_labels, t_labels), k=k)
    out = multilevel_ot(student.to(dtype), teacher.to(dtype), s_labels, t_labels, preset="paper", k=k, ranking="token")
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    for name, value in zip(("had", "sl", "sd"), expected):
        torch.testing.assert_close(out[name].double(), torch.tensor(value, dtype=torch.float64), **tol, msg=name)


def test_token_ranking_with_reused_rows_and_other_temperatures_matches_loop():
    gen = torch.Generator().manual_seed(13)
    student = torch.randn(2, 7, 10, generator=gen, dtype=torch.float64) * 2
    teacher = torch.randn(2, 6, 12, generator=gen, dtype=torch.float64) * 2
    pairs = [[(0, 1), (1, 1), (2, 3), (5, 4)], [(3, 0), (3, 2), (6, 5)]]
    expected = reference_token_ranked(student, teacher, pairs, k=3, tau_had=1.5, tau_sl=0.7, tau_sd=3.0, lam=0.3, iters=7)
    dummy = torch.full((2, 7), -100), torch.full((2, 6), -100)
    out = multilevel_ot(student, teacher, *dummy, pairing=pack_pairs(pairs), k=3, tau_had=1.5, tau_sl=0.7, tau_sd=3.0,
                        sinkhorn_lambda=0.3, sinkhorn_iters=7, ranking="token")
    for name, value in zip(("had", "sl", "sd"), expected):
        torch.testing.assert_close(out[name], torch.tensor(value, dtype=torch.float64), rtol=1e-9, atol=1e-9)


def test_token_and_sequence_ranking_differ_but_agree_with_one_token_per_sequence():
    """With a single paired token, its own ranking is the sequence ranking; with many they differ."""
    gen = torch.Generator().manual_seed(21)
    student = torch.randn(2, 6, 9, generator=gen, dtype=torch.float64) * 2
    teacher = torch.randn(2, 6, 11, generator=gen, dtype=torch.float64) * 2
    dummy = torch.full((2, 6), -100), torch.full((2, 6), -100)
    single = pack_pairs([[(2, 3)], [(4, 1)]])
    token = multilevel_ot(student, teacher, *dummy, pairing=single, k=4, ranking="token")
    sequence = multilevel_ot(student, teacher, *dummy, pairing=single, k=4)
    for name in ("had", "sl", "sd"):
        torch.testing.assert_close(token[name], sequence[name], rtol=1e-12, atol=1e-12)
    many = pack_pairs([[(0, 0), (1, 2), (3, 3), (5, 4)], [(1, 1), (2, 5)]])
    token = multilevel_ot(student, teacher, *dummy, pairing=many, k=4, ranking="token")
    sequence = multilevel_ot(student, teacher, *dummy, pairing=many, k=4)
    assert not torch.allclose(token["had"], sequence["had"])


def test_token_ranking_gradient_passes_gradcheck():
    gen = torch.Generator().manual_seed(5)
    student = (torch.randn(2, 5, 7, generator=gen, dtype=torch.float64) * 2).requires_grad_()
    teacher = torch.randn(2, 6, 8, generator=gen, dtype=torch.float64) * 2
    pairing = pack_pairs([[(0, 1), (1, 2), (3, 4)], [(2, 0), (4, 5)]])
    dummy = torch.full((2, 5), -100), torch.full((2, 6), -100)

    def total(logits):
        out = multilevel_ot(logits, teacher, *dummy, pairing=pairing, k=3, ranking="token", differentiate_sinkhorn=True)
        return out["had"] + 0.3 * out["sl"] + 0.7 * out["sd"]

    assert torch.autograd.gradcheck(total, (student,), eps=1e-6, atol=1e-6)


def test_token_ranked_fused_ce_equals_the_plain_ce():
    gen = torch.Generator().manual_seed(8)
    student, s_labels = make_batch([(2, 5), (3, 4)], 10, 12, gen)
    teacher, t_labels = make_batch([(1, 6), (2, 3)], 9, 8, gen)
    with_ce = multilevel_ot(student, teacher, s_labels, t_labels, k=4, ranking="token", with_ce=True)
    expected = 0.0
    for b in range(2):
        for t in range(9):
            if s_labels[b, t + 1] != -100:
                expected -= math.log(softmax(student[b, t].tolist(), 1.0)[s_labels[b, t + 1]])
    torch.testing.assert_close(with_ce["ce"].double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-9, atol=1e-9)
    assert with_ce["ce_tokens"] == 9


@pytest.mark.parametrize("chunk", [1, 40, 10**6])
def test_token_ranked_summary_from_hidden_equals_the_full_logits_path(chunk):
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(3, 12, 5, generator=gen, dtype=torch.float64)
    weight = torch.randn(23, 5, generator=gen, dtype=torch.float64)
    bias = torch.randn(23, generator=gen, dtype=torch.float64)
    labels = torch.full((3, 12), -100)
    labels[0, 2:9], labels[1, 1:12], labels[2, 6:8] = 1, 2, 3
    pairing = position_pairing(labels, labels)
    reference = teacher_summary(hidden @ weight.T + bias, pairing, preset="default", k=6, ranking="token")
    summary, gold = teacher_summary_from_hidden(hidden, weight, bias, pairing, preset="default", k=6, ranking="token",
                                                ce_labels=labels, head_chunk_elements=chunk)
    assert reference.indices.shape == (len(reference.temperatures), 3, pairing.mask.shape[1], 6)
    assert torch.equal(summary.indices, reference.indices)
    torch.testing.assert_close(summary.values, reference.values)
    assert gold["tokens"].tolist() == [7.0, 11.0, 2.0]
    # Padded pairs hold zeros, and each real pair's values are its own largest probabilities.
    assert not summary.values[:, ~pairing.mask].any()
    for g, tau in enumerate(summary.temperatures):
        row = (hidden[1, 0] @ weight.T + bias) / tau
        top = torch.softmax(row, dim=0).sort(descending=True).values[:6]
        torch.testing.assert_close(summary.values[g, 1, 0], top)


def test_a_summary_of_the_other_ranking_is_refused():
    gen = torch.Generator().manual_seed(1)
    student, s_labels = make_batch([(2, 5)], 9, 11, gen)
    teacher, t_labels = make_batch([(3, 4)], 10, 7, gen)
    pairing = position_pairing(s_labels, t_labels)
    sequence_summary = teacher_summary(teacher, pairing, k=4)
    with pytest.raises(ValueError, match="ranking='sequence'.*ranking='token'"):
        multilevel_ot_from_summary(student, sequence_summary, pairing, k=4, ranking="token")
    token_summary = teacher_summary(teacher, pairing, k=4, ranking="token")
    with pytest.raises(ValueError, match="ranking='token'.*ranking='sequence'"):
        multilevel_ot_from_summary(student, token_summary, pairing, k=4)
