"""The ``official`` preset against a float64 transcription of the released loss.

The transcription follows shared/research/anchors-loss.md §1.3 and §1.5 step by step, in the
released code's own order (normalise, span softmax into zero-padded rows, cut to Lmax, batch-level
argsort, truncate, HAD / swapped double-softmax SL / plain-domain Sinkhorn summed over the batch).
"""

from __future__ import annotations

import pytest
import torch

from mlot_ds.losses import PRESETS, official_multilevel_ot
from tests.helpers import make_batch


def spans(labels, skip_last):
    """(start row, size) per row: start = (leading -100 run) - 1, size = number of labels."""
    out = []
    for row in labels.tolist():
        lead = next(q for q, y in enumerate(row) if y != -100)
        size = sum(y != -100 for y in row) - (1 if skip_last else 0)
        out.append((lead - 1, size))
    return out


def released_loss(student_logits, teacher_logits, s_labels, t_labels, k, iters=10, lam=0.1):
    """Returns (HAD, SL, SD) exactly as the released code combines them: mean, mean, sum over batch."""
    s_spans, t_spans = spans(s_labels, True), spans(t_labels, False)

    def prepared(logits, row_spans):
        normalised = logits / (logits.std(dim=-1, keepdim=True) + 1e-4)
        rows = torch.zeros_like(normalised)
        for i, (start, size) in enumerate(row_spans):
            rows[i, :size] = torch.softmax(normalised[i, start : start + size], dim=-1)
        return rows

    student, teacher = prepared(student_logits, s_spans), prepared(teacher_logits, t_spans)
    lmax = max(max(s for _, s in s_spans), max(s for _, s in t_spans))
    student, teacher = student[:, :lmax], teacher[:, :lmax]
    teacher = teacher[:, :, torch.argsort(teacher.sum(dim=(0, 1)), descending=True)][:, :, :k]
    student = student[:, :, torch.argsort(student.sum(dim=(0, 1)), descending=True)][:, :, :k]

    had = []
    for i in range(student.shape[0]):
        size = min(s_spans[i][1], t_spans[i][1])
        had.append((student[i, :size] - teacher[i, :size]).abs().sum(-1).mean(-1))
    had = torch.stack(had).mean()
    # KL_wo(teacher, student): log-softmax of the teacher rows weighted by the softmax of the student rows.
    sl = -(torch.softmax(student, dim=-1) * torch.log_softmax(teacher, dim=-1)).sum(-1).mean()
    sd = 0.0
    for i in range(student.shape[0]):
        x, y = torch.softmax(teacher[i] / 2, dim=-1), torch.softmax(student[i] / 2, dim=-1)
        cost = torch.cdist(x, y, p=1)
        plan = torch.exp(-cost / lam)
        for _ in range(iters):
            plan = plan / plan.sum(dim=1, keepdim=True)
            plan = plan / plan.sum(dim=0, keepdim=True)
        sd = sd + (plan * cost).sum()
    return had, sl, sd


# The re-softmaxed vectors are nearly uniform, so at lambda = 0.1 the plan is almost flat after one
# round; lambda = 1e-3 makes the comparison sensitive to the iteration count and the plan itself.
@pytest.mark.parametrize("lam", [0.1, 1e-3])
@pytest.mark.parametrize("layout", [
    ([(3, 5), (2, 7), (4, 3)], [(2, 6), (3, 4), (1, 8)], 11, 12),
    ([(4, 6)], [(2, 3)], 12, 9),
])
def test_official_preset_reproduces_released_formulas(layout, lam):
    s_spec, t_spec, ts, tt = layout
    gen = torch.Generator().manual_seed(21)
    student, s_labels = make_batch(s_spec, ts, 40, gen)
    teacher, t_labels = make_batch(t_spec, tt, 30, gen)
    student, teacher = student * 3, teacher * 3
    had, sl, sd = released_loss(student, teacher, s_labels, t_labels, k=12, lam=lam)
    out = official_multilevel_ot(student, teacher, s_labels, t_labels, k=12, sinkhorn_lambda=lam)
    batch = len(s_spec)
    assert out["sequences"] == batch  # no empty sequence: the reduction mapping is exact
    preset = PRESETS["official"]
    torch.testing.assert_close(out["had"] / out["sequences"], had, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(out["sl"] / out["sequences"], sl, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(out["sd"] / out["sequences"], sd, rtol=1e-9, atol=1e-12)
    ours = sum(preset.weights[t] * out[t] for t in ("had", "sl", "sd")) / out["sequences"]
    released = 1.5 * (had + 0.1 * sl + 0.1 * 0.001 * sd)
    torch.testing.assert_close(ours, released, rtol=1e-9, atol=1e-12)


def test_official_gradient_matches_transcription():
    gen = torch.Generator().manual_seed(22)
    student, s_labels = make_batch([(2, 4), (3, 3)], 8, 15, gen)
    teacher, t_labels = make_batch([(1, 5), (2, 3)], 8, 13, gen)
    a = student.clone().requires_grad_()
    b = student.clone().requires_grad_()
    out = official_multilevel_ot(a, teacher, s_labels, t_labels, k=6)
    (sum(PRESETS["official"].weights[t] * out[t] for t in ("had", "sl", "sd")) / out["sequences"]).backward()
    had, sl, sd = released_loss(b, teacher, s_labels, t_labels, k=6)
    (1.5 * (had + 0.1 * sl + 0.1 * 0.001 * sd)).backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-8, atol=1e-12)
