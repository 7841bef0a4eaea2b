"""The chunked output-layer path (mlot_ds.losses.head) against the full logits, and ULD's sorted-head form."""

from __future__ import annotations

import math

import pytest
import torch

from mlot_ds.losses import LogitSource, TeacherView, masked_ce, teacher_summary, uld
from mlot_ds.losses.ce import ce_per_sequence
from mlot_ds.losses.head import ce_per_sequence_from_hidden, rows_logits
from mlot_ds.losses.mlot import teacher_summary_from_hidden
from mlot_ds.losses.official import OfficialMultiLevelOT, OfficialParams
from mlot_ds.losses.uld import teacher_sorted_head, uld_sorted_head
from mlot_ds.pairing import ModelBatch, pack_pairs, position_pairing
from tests.helpers import position_pairs, softmax


def head_batch(seed=0, vocab=97, hidden_size=6, dtype=torch.float64, with_bias=True):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 14, hidden_size, generator=gen, dtype=dtype)
    weight = torch.randn(vocab, hidden_size, generator=gen, dtype=dtype)
    bias = torch.randn(vocab, generator=gen, dtype=dtype) if with_bias else None
    labels = torch.full((3, 14), -100)
    for b, (start, stop) in enumerate([(3, 11), (1, 14), (9, 10)]):
        labels[b, start:stop] = torch.randint(0, vocab, (stop - start,), generator=gen)
    student_labels = labels.clone()
    student_labels[0, 10] = -100  # sequences of unequal pair counts
    return hidden, weight, bias, labels, student_labels


def full_logits(hidden, weight, bias):
    return hidden @ weight.T + (bias if bias is not None else 0)


@pytest.mark.parametrize("preset", ["default", "paper", "official"])
@pytest.mark.parametrize("chunk", [1, 50, 10**6])  # elements per chunk: one row at a time ... everything at once
def test_summary_from_hidden_equals_the_full_logits_path(preset, chunk):
    hidden, weight, bias, labels, student_labels = head_batch(1)
    pairing = position_pairing(student_labels, labels)
    if preset == "official":  # its own method, which reads both answer spans from the labels
        method = OfficialMultiLevelOT(OfficialParams(k=7))
        ones = torch.ones_like(labels)
        view = TeacherView(pairing, ModelBatch(student_labels, ones, student_labels), ModelBatch(labels, ones, labels))
        reference = method.teacher(LogitSource(logits=full_logits(hidden, weight, bias)), view, gold=False).reduced
        summary, gold = method.teacher(LogitSource(hidden=hidden, weight=weight, bias=bias, head_chunk_elements=chunk),
                                       view, gold=True)
    else:
        reference = teacher_summary(full_logits(hidden, weight, bias), pairing, preset=preset, k=7)
        summary, gold = teacher_summary_from_hidden(hidden, weight, bias, pairing, preset=preset, k=7, ce_labels=labels,
                                                    head_chunk_elements=chunk)
    assert summary.temperatures == reference.temperatures
    assert torch.equal(summary.indices, reference.indices)
    torch.testing.assert_close(summary.values, reference.values)
    expected_ce = masked_ce(full_logits(hidden, weight, bias), labels)
    torch.testing.assert_close(gold["ce"].sum().double(), expected_ce["ce"].double())
    torch.testing.assert_close(gold["tokens"].sum(), expected_ce["tokens"])


def test_summary_values_match_a_loop_over_the_explicit_logits():
    hidden, weight, bias, labels, student_labels = head_batch(2, with_bias=False)
    logits = full_logits(hidden, weight, bias)
    summary, gold = teacher_summary_from_hidden(hidden, weight, bias, position_pairing(student_labels, labels),
                                                preset="paper", k=5, head_chunk_elements=200)
    assert gold is None
    for g, tau in enumerate(summary.temperatures):
        for b, pairs in enumerate(position_pairs(student_labels, labels)):
            probs = [softmax(logits[b, t].tolist(), tau) for _, t in pairs]
            sums = [sum(p[v] for p in probs) for v in range(weight.shape[0])]
            ranking = sorted(range(len(sums)), key=lambda v: -sums[v])[:5]
            assert summary.indices[g, b].tolist() == ranking
            for p, row in enumerate(probs):
                assert summary.values[g, b, p].tolist() == pytest.approx([row[v] for v in ranking], rel=1e-9)


def test_gold_ce_per_sequence_from_hidden_matches_a_loop():
    hidden, weight, bias, labels, _ = head_batch(3)
    logits = full_logits(hidden, weight, bias)
    expected = []
    for b in range(3):
        total = 0.0
        for t in range(13):
            if labels[b, t + 1] != -100:
                row = logits[b, t].tolist()
                total += math.log(sum(math.exp(x) for x in row)) - row[int(labels[b, t + 1])]
        expected.append(total)
    for result in (ce_per_sequence_from_hidden(hidden, weight, bias, labels, head_chunk_elements=97 * 2),
                   ce_per_sequence(logits, labels)):
        assert result["ce"].tolist() == pytest.approx(expected, rel=1e-5)
        assert result["tokens"].tolist() == [8.0, 13.0, 1.0]


def test_rows_logits_reads_the_paired_rows_at_the_asked_columns():
    hidden, weight, bias, labels, student_labels = head_batch(4)
    pairing = position_pairing(student_labels, labels)
    columns = torch.tensor([5, 0, 96, 5])
    compact = rows_logits(hidden, weight, bias, pairing.teacher_index, columns)
    logits = full_logits(hidden, weight, bias)
    for b in range(3):
        for p in range(pairing.mask.shape[1]):
            torch.testing.assert_close(compact[b, p], logits[b, pairing.teacher_index[b, p], columns])


def test_bf16_head_matches_bf16_logits_to_bf16_precision():
    hidden, weight, bias, labels, student_labels = head_batch(5, vocab=300, hidden_size=32, dtype=torch.float32)
    hidden, weight, bias = (hidden * 0.25).bfloat16(), weight.bfloat16(), bias.bfloat16()  # logits within about +-6
    pairing = position_pairing(student_labels, labels)
    reference = teacher_summary(torch.nn.functional.linear(hidden, weight, bias), pairing, k=8)
    summary, _ = teacher_summary_from_hidden(hidden, weight, bias, pairing, k=8)
    assert summary.values.dtype == torch.float32
    # bf16 products of different shapes may round a logit differently by one ulp (1/32 for logits in
    # [4, 8)), which moves a probability by up to ~3% and can swap near-tied ranks: compare the values
    # id by id, over the ids both rankings keep (almost all of them), to that precision.
    for g in range(len(summary.temperatures)):
        for b in range(3):
            ours, theirs = summary.indices[g, b].tolist(), reference.indices[g, b].tolist()
            common = [v for v in ours if v in theirs]
            assert len(common) >= 6
            mine = summary.values[g, b][:, [ours.index(v) for v in common]]
            other = reference.values[g, b][:, [theirs.index(v) for v in common]]
            torch.testing.assert_close(mine, other, atol=1e-3, rtol=6e-2)


def test_bad_head_shapes_give_one_clear_error():
    hidden, weight, bias, labels, student_labels = head_batch(6)
    pairing = position_pairing(student_labels, labels)
    with pytest.raises(ValueError, match=r"weight \[V, H\]"):
        teacher_summary_from_hidden(hidden, weight[:, :3], bias, pairing)
    with pytest.raises(ValueError, match="bias must be"):
        teacher_summary_from_hidden(hidden, weight, bias[:5], pairing)
    with pytest.raises(ValueError, match="k=200 exceeds"):
        teacher_summary_from_hidden(hidden, weight, bias, pairing, k=200)
    out_of_range = pairing._replace(teacher_index=pairing.teacher_index + 14)
    with pytest.raises(ValueError, match="teacher_index out of range"):
        teacher_summary_from_hidden(hidden, weight, bias, out_of_range)


# ------------------------------------------------------------------------------ ULD, sorted head


def uld_case(seed, student_vocab, teacher_vocab):
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(2, 9, student_vocab, generator=gen, dtype=torch.float64) * 2
    teacher = torch.randn(2, 9, teacher_vocab, generator=gen, dtype=torch.float64) * 3
    pairing = pack_pairs([[(1, 2), (2, 3), (5, 4)], [(0, 0), (7, 8)]])
    rows = teacher.gather(1, pairing.teacher_index.unsqueeze(2).expand(-1, -1, teacher_vocab))
    return student, teacher, rows, pairing


@pytest.mark.parametrize("student_vocab,teacher_vocab", [(40, 60), (60, 40)])
def test_sorted_head_with_every_probability_is_exact_uld(student_vocab, teacher_vocab):
    student, teacher, rows, pairing = uld_case(0, student_vocab, teacher_vocab)
    exact = uld(student, teacher, None, None, pairing=pairing)["uld"]
    for head in (teacher_vocab, teacher_vocab + 25):
        probs, tail = teacher_sorted_head(rows, head)
        assert probs.shape[-1] == teacher_vocab and float(tail.abs().max()) < 1e-12
        torch.testing.assert_close(uld_sorted_head(student, probs, tail, pairing)["uld"], exact)


@pytest.mark.parametrize("head", [1, 5, 30, 45])
def test_truncated_sorted_head_is_below_uld_by_at_most_twice_the_tail(head):
    student, teacher, rows, pairing = uld_case(head, 50, 60)
    exact = float(uld(student, teacher, None, None, pairing=pairing)["uld"])
    probs, tail = teacher_sorted_head(rows, head)
    assert (probs[..., :-1] >= probs[..., 1:]).all()
    torch.testing.assert_close(probs.sum(-1) + tail, torch.ones_like(tail))
    approx = float(uld_sorted_head(student, probs, tail, pairing)["uld"])
    assert approx <= exact + 1e-12
    assert exact - approx <= 2 * float(tail[pairing.mask].sum()) + 1e-12


def test_sorted_head_uld_gradient_matches_the_exact_one_when_nothing_is_cut():
    student, teacher, rows, pairing = uld_case(7, 30, 20)
    probs, tail = teacher_sorted_head(rows, 20)
    student.requires_grad_()
    (exact,) = torch.autograd.grad(uld(student, teacher, None, None, pairing=pairing)["uld"], student)
    (approx,) = torch.autograd.grad(uld_sorted_head(student, probs, tail, pairing)["uld"], student)
    torch.testing.assert_close(approx, exact)
