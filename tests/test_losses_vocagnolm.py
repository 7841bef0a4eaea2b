"""VocAgnoLM: selection against a float64 full-sort reference, Rho-1 reduction, counts known in advance."""

from __future__ import annotations

import math
import random

import pytest
import torch

from mlot_ds.losses.vocagnolm import (
    keep_count,
    student_token_ce,
    vocagnolm,
    vocagnolm_selected_count,
    vocagnolm_selection,
)
from mlot_ds.pairing.overlaps import token_overlaps


def reference(student_ce, teacher_ce, ranges, mask, top_fraction, aggregation):
    """Python float64 loops: score every mapped token, full sort with (score desc, flat index asc)."""
    batch, length = len(mask), len(mask[0])
    scored, unmapped = [], []
    for b in range(batch):
        for i in range(length):
            if not mask[b][i]:
                continue
            lo, hi = ranges[b][i]
            flat = b * length + i
            if hi <= lo:
                unmapped.append(flat)
                continue
            values = [teacher_ce[b][j] for j in range(lo, hi)]
            agg = {"max": max(values), "min": min(values), "mean": sum(values) / len(values)}[aggregation]
            scored.append((-(student_ce[b][i] - agg), flat))
    scored.sort()
    keep = math.ceil(round(top_fraction * len(scored), 9))
    selected = set(unmapped) | {flat for _, flat in scored[:keep]}
    total = sum(student_ce[f // length][f % length] for f in selected)
    return selected, total


def _random_case(seed, batch=3, student_len=9, teacher_len=7):
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    student_ce = torch.rand(batch, student_len, generator=generator, dtype=torch.float64) * 5
    teacher_ce = torch.rand(batch, teacher_len, generator=generator, dtype=torch.float64) * 5
    if seed % 3 == 0:  # ties: quantised losses
        student_ce = (student_ce * 2).round() / 2
        teacher_ce = (teacher_ce * 2).round() / 2
    ranges = torch.zeros(batch, student_len, 2, dtype=torch.long)
    mask = torch.zeros(batch, student_len, dtype=torch.bool)
    for b in range(batch):
        used = rng.randint(1, student_len)
        mask[b, :used] = True
        lo = 0
        for i in range(used):
            if rng.random() < 0.15:
                ranges[b, i] = torch.tensor([lo, lo])  # unmapped
                continue
            lo = min(max(0, lo + rng.randint(-1, 1)), teacher_len - 1)
            hi = min(teacher_len, lo + rng.randint(1, 3))
            ranges[b, i] = torch.tensor([lo, hi])
    return student_ce, teacher_ce, ranges, mask


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("aggregation", ["max", "mean", "min"])
@pytest.mark.parametrize("top_fraction", [0.4, 0.7, 1.0, 0.05])
def test_selection_and_loss_match_the_reference(seed, aggregation, top_fraction):
    student_ce, teacher_ce, ranges, mask = _random_case(seed)
    student_ce.requires_grad_(True)
    selection = vocagnolm_selection(student_ce, teacher_ce, ranges, mask, top_fraction=top_fraction,
                                    aggregation=aggregation)
    want, total = reference(student_ce.tolist(), teacher_ce.tolist(), ranges.tolist(), mask.tolist(), top_fraction,
                            aggregation)
    assert set(selection.reshape(-1).nonzero().squeeze(1).tolist()) == want
    out = vocagnolm(student_ce, teacher_ce, ranges, mask, top_fraction=top_fraction, aggregation=aggregation)
    assert out["vocagnolm"].item() == pytest.approx(total, rel=1e-12)
    assert out["selected"].item() == len(want) == vocagnolm_selected_count(ranges, mask, top_fraction=top_fraction)
    out["vocagnolm"].backward()  # stop-grad selection: d/d CE_S is the selection mask
    assert student_ce.grad.tolist() == selection.double().tolist()


def test_identical_tokenizations_reduce_to_rho1():
    generator = torch.Generator().manual_seed(0)
    batch, length = 2, 10
    spans = [(i, i + 1) for i in range(length)]
    ranges = torch.tensor([token_overlaps(spans, spans)] * batch)
    assert ranges[0].tolist() == [[i, i + 1] for i in range(length)]
    student_ce = torch.rand(batch, length, generator=generator, dtype=torch.float64)
    teacher_ce = torch.rand(batch, length, generator=generator, dtype=torch.float64)
    mask = torch.ones(batch, length, dtype=torch.bool)
    selection = vocagnolm_selection(student_ce, teacher_ce, ranges, mask, top_fraction=0.4)
    # Rho-1: excess loss against the reference model, top 40% of the batch's tokens
    excess = (student_ce - teacher_ce).reshape(-1)
    rho1 = torch.zeros(batch * length, dtype=torch.bool)
    rho1[excess.topk(math.ceil(0.4 * batch * length)).indices] = True
    assert selection.reshape(-1).tolist() == rho1.tolist()


def test_ties_prefer_the_lower_flat_index():
    student_ce = torch.ones(1, 5, dtype=torch.float64)
    teacher_ce = torch.zeros(1, 5, dtype=torch.float64)
    ranges = torch.tensor([[[i, i + 1] for i in range(5)]])
    mask = torch.ones(1, 5, dtype=torch.bool)
    assert vocagnolm_selection(student_ce, teacher_ce, ranges, mask, top_fraction=0.4).tolist() == [
        [True, True, False, False, False]]


def test_keep_count_is_robust_to_float_products():
    assert keep_count(10, 0.7) == 7  # 0.7 * 10 = 7.000000000000001 in floating point
    assert keep_count(5, 0.4) == 2
    assert keep_count(3, 0.4) == 2
    assert keep_count(0, 0.4) == 0


def test_student_token_ce_through_the_kernel():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 6, 11, generator=generator, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (2, 6), generator=generator)
    labels[0, :2] = -100
    ce, valid = student_token_ce(logits, labels, chunk_elements=11)
    for b in range(2):
        for t in range(6):
            if valid[b, t]:
                want = -torch.log_softmax(logits[b, t - 1].detach(), -1)[labels[b, t]].item()
                assert ce[b, t].item() == pytest.approx(want, rel=1e-12)
            else:
                assert ce[b, t].item() == 0
    teacher_ce = torch.rand(2, 6, dtype=torch.float64)
    ranges = torch.stack([torch.arange(6), torch.arange(1, 7)], -1).expand(2, 6, 2).contiguous()
    assert torch.autograd.gradcheck(
        lambda x: vocagnolm(student_token_ce(x, labels)[0], teacher_ce, ranges, valid)["vocagnolm"], (logits,))
