"""Properties of the MultiLevelOT terms, the Sinkhorn plan, the split API and the presets."""

from __future__ import annotations

import pytest
import torch

from mlot_ds.losses import (
    PRESETS,
    TERMS,
    multilevel_ot,
    multilevel_ot_from_summary,
    official_multilevel_ot,
    overridable_names,
    sinkhorn_plan,
    teacher_summary,
)
from mlot_ds.pairing import position_pairing
from tests.helpers import make_batch

SMALL = dict(k=4)


def batch(seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    student, s_labels = make_batch([(2, 5), (3, 3), (1, 6)], 10, 12, gen, dtype)
    teacher, t_labels = make_batch([(3, 4), (1, 5), (2, 6)], 11, 9, gen, dtype)
    return student, teacher, s_labels, t_labels


def terms(out):
    return torch.stack([out[name] for name in TERMS])


def test_identical_distributions_give_zero_had():
    student, _, s_labels, _ = batch()
    out = multilevel_ot(student, student.clone(), s_labels, s_labels.clone(), **SMALL)
    assert out["had"].item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("side", ["student", "teacher"])
def test_permuting_a_vocabulary_changes_nothing(side):
    student, teacher, s_labels, t_labels = batch(1)
    reference = terms(multilevel_ot(student, teacher, s_labels, t_labels, **SMALL))
    if side == "student":
        student = student[..., torch.randperm(student.shape[-1], generator=torch.Generator().manual_seed(2))]
    else:
        teacher = teacher[..., torch.randperm(teacher.shape[-1], generator=torch.Generator().manual_seed(2))]
    torch.testing.assert_close(terms(multilevel_ot(student, teacher, s_labels, t_labels, **SMALL)), reference)


def test_sinkhorn_marginals():
    gen = torch.Generator().manual_seed(0)
    cost = torch.rand(3, 6, 6, generator=gen) * 0.5
    rows = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4], dtype=torch.bool)
    plan = sinkhorn_plan(cost, rows, rows, sinkhorn_lambda=0.1, sinkhorn_iters=200)
    torch.testing.assert_close(plan.sum(dim=1), rows.float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(plan.sum(dim=2), rows.float(), atol=1e-5, rtol=0)
    assert (plan[~(rows.unsqueeze(2) & rows.unsqueeze(1))] == 0).all()
    # After the paper's N = 20 rounds the last (column) normalisation is exact.
    plan20 = sinkhorn_plan(cost, rows, rows)
    torch.testing.assert_close(plan20.sum(dim=1), rows.float(), atol=1e-5, rtol=0)


def test_padding_and_prompt_positions_change_nothing():
    student, teacher, s_labels, t_labels = batch(3)
    student.requires_grad_()
    reference = multilevel_ot(student, teacher, s_labels, t_labels, **SMALL)
    (grad,) = torch.autograd.grad(sum(reference[name] for name in TERMS), student)
    pairing = position_pairing(s_labels, t_labels)
    used = torch.zeros(student.shape[:2], dtype=torch.bool)
    used[torch.arange(3).unsqueeze(1).expand_as(pairing.mask)[pairing.mask], pairing.student_index[pairing.mask]] = True
    assert (grad[~used] == 0).all()
    # Scramble every unpaired row and append padding columns on both sides.
    noisy_student = torch.where(used.unsqueeze(2), student.detach(), torch.randn_like(student) * 9)
    noisy_student = torch.cat([noisy_student, torch.randn(3, 4, student.shape[2], dtype=student.dtype)], dim=1)
    noisy_teacher = torch.cat([teacher, torch.randn(3, 2, teacher.shape[2], dtype=teacher.dtype)], dim=1)
    pad = lambda labels, extra: torch.cat([labels, torch.full((3, extra), -100)], dim=1)  # noqa: E731
    out = multilevel_ot(noisy_student, noisy_teacher, pad(s_labels, 4), pad(t_labels, 2), **SMALL)
    torch.testing.assert_close(terms(out), terms(reference).detach())


def test_batch_equals_sum_of_samples():
    student, teacher, s_labels, t_labels = batch(4)
    whole = multilevel_ot(student, teacher, s_labels, t_labels, **SMALL)
    parts = [
        multilevel_ot(student[b : b + 1], teacher[b : b + 1], s_labels[b : b + 1], t_labels[b : b + 1], **SMALL) for b in range(3)
    ]
    for name in (*TERMS, "tokens", "sequences"):
        torch.testing.assert_close(whole[name], sum(part[name] for part in parts))


@pytest.mark.parametrize("term", TERMS)
def test_gradcheck_float64(term):
    gen = torch.Generator().manual_seed(6)
    student, s_labels = make_batch([(1, 4), (2, 3)], 6, 7, gen)
    teacher, t_labels = make_batch([(2, 3), (1, 4)], 6, 8, gen)
    student.requires_grad_()

    def value(logits):
        out = multilevel_ot(logits, teacher, s_labels, t_labels, k=3, differentiate_sinkhorn=True, with_ce=True)
        return out[term] + 0.5 * out["ce"]

    assert torch.autograd.gradcheck(value, (student,), eps=1e-6, atol=1e-6)


def test_default_sd_gradient_holds_the_plan_fixed():
    student, teacher, s_labels, t_labels = batch(7)
    student.requires_grad_()
    detached = multilevel_ot(student, teacher, s_labels, t_labels, **SMALL)
    through = multilevel_ot(student, teacher, s_labels, t_labels, differentiate_sinkhorn=True, **SMALL)
    torch.testing.assert_close(detached["sd"], through["sd"])
    (g_fixed,) = torch.autograd.grad(detached["sd"], student)
    (g_through,) = torch.autograd.grad(through["sd"], student)
    assert not torch.allclose(g_fixed, g_through)


def test_bf16_close_to_float32():
    student, teacher, s_labels, t_labels = batch(8, torch.float32)
    reference = terms(multilevel_ot(student, teacher, s_labels, t_labels, **SMALL))
    out = multilevel_ot(student.bfloat16(), teacher.bfloat16(), s_labels, t_labels, **SMALL)
    assert all(out[name].dtype == torch.float32 for name in TERMS)
    torch.testing.assert_close(terms(out), reference, rtol=1e-2, atol=1e-3)


def test_sequence_without_pairs_contributes_nothing():
    student, teacher, s_labels, t_labels = batch(9)
    student.requires_grad_()
    empty_s, empty_t = s_labels.clone(), t_labels.clone()
    empty_s[1] = -100
    out = multilevel_ot(student, teacher, empty_s, empty_t, **SMALL)
    keep = [0, 2]
    expected = multilevel_ot(student[keep], teacher[keep], s_labels[keep], t_labels[keep], **SMALL)
    torch.testing.assert_close(terms(out), terms(expected))
    assert out["sequences"] == 2
    (grad,) = torch.autograd.grad(sum(out[name] for name in TERMS), student)
    assert torch.isfinite(grad).all() and (grad[1] == 0).all()
    nothing = multilevel_ot(student, teacher, torch.full_like(s_labels, -100), t_labels, **SMALL)
    assert all(nothing[name].item() == 0 for name in (*TERMS, "tokens", "sequences"))


def test_inputs_are_not_modified():
    student, teacher, s_labels, t_labels = batch(10)
    copies = [x.clone() for x in (student, teacher, s_labels, t_labels)]
    multilevel_ot(student, teacher, s_labels, t_labels, with_ce=True, **SMALL)
    official_multilevel_ot(student, teacher, s_labels, t_labels, **SMALL)
    for original, copy in zip((student, teacher, s_labels, t_labels), copies):
        assert torch.equal(original, copy)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_split_equals_composed(preset):
    from mlot_ds.losses import METHODS, LogitSource, TeacherView
    from mlot_ds.losses.official import OfficialParams
    from mlot_ds.pairing import ModelBatch

    student, teacher, s_labels, t_labels = batch(11, torch.float32)
    if preset == "official":  # its own method: the split goes through the method class
        composed = official_multilevel_ot(student, teacher, s_labels, t_labels, **SMALL)
        method = METHODS["official"](OfficialParams(k=SMALL["k"]))
        ones = torch.ones_like(s_labels)
        view = TeacherView(
            position_pairing(s_labels, t_labels),
            ModelBatch(s_labels, ones, s_labels),
            ModelBatch(t_labels, torch.ones_like(t_labels), t_labels),
        )
        summary = method.teacher(LogitSource(logits=teacher), view, gold=False).reduced
        del teacher
        split = method.student(student, summary, view)
        composed = {name: composed[name] for name in split}
    else:
        composed = multilevel_ot(student, teacher, s_labels, t_labels, preset=preset, **SMALL)
        pairing = position_pairing(s_labels, t_labels)
        summary = teacher_summary(teacher, pairing, preset=preset, **SMALL)
        del teacher  # the student side must not need the teacher's logits
        split = multilevel_ot_from_summary(student, summary, pairing, preset=preset, **SMALL)
    for name in composed:
        assert torch.equal(split[name], composed[name]), name


def test_summary_shapes_and_no_graph():
    student, teacher, s_labels, t_labels = batch(12, torch.float32)
    teacher.requires_grad_()
    pairing = position_pairing(s_labels, t_labels)
    summary = teacher_summary(teacher, pairing, k=4)
    assert summary.temperatures == (1.0, 2.0)
    assert summary.indices.shape == (2, 3, 4) and summary.values.shape == (2, *pairing.mask.shape, 4)
    assert summary.values.dtype == torch.float32 and not summary.values.requires_grad
    assert (summary.values[:, ~pairing.mask] == 0).all()


def test_bad_inputs_raise_one_clear_error():
    student, teacher, s_labels, t_labels = batch(13)
    with pytest.raises(ValueError, match="valid names: .*sinkhorn_lambda"):
        multilevel_ot(student, teacher, s_labels, t_labels, sinkhorn_lamda=0.1)
    with pytest.raises(ValueError, match="unknown preset"):
        multilevel_ot(student, teacher, s_labels, t_labels, preset="papr")
    with pytest.raises(ValueError, match="k=50 exceeds the vocabulary size"):
        multilevel_ot(student, teacher, s_labels, t_labels)
    with pytest.raises(ValueError, match="student_labels"):
        multilevel_ot(student, teacher, s_labels[:, :-1], t_labels, **SMALL)
    with pytest.raises(ValueError, match="same preset"):
        summary = teacher_summary(teacher, position_pairing(s_labels, t_labels), **SMALL)
        multilevel_ot_from_summary(student, summary, position_pairing(s_labels, t_labels), k=3)
    with pytest.raises(ValueError, match="the official preset is its own method"):
        multilevel_ot(student, teacher, s_labels, t_labels, preset="official", **SMALL)


def test_presets_expose_weights_and_basis():
    for name, preset in PRESETS.items():
        assert set(preset.weights) == set(TERMS) and preset.normalize_by in ("tokens", "sequences")
        assert preset.rationale
    assert PRESETS["official"].normalize_by == "sequences" and PRESETS["official"].sinkhorn_iters == 10
    assert PRESETS["paper"].weights["had"] == 0.15 and PRESETS["paper"].sinkhorn_iters == 20
    assert {"k", "tau_sl", "tau_sd", "sinkhorn_lambda", "sinkhorn_iters"} <= set(overridable_names())
    with pytest.raises(Exception):
        PRESETS["default"].weights["had"] = 0.0


def test_non_contiguous_logits_give_the_same_terms_and_gradient():
    student, teacher, s_labels, t_labels = batch(14)
    wide = torch.cat([student, torch.randn(3, 2, student.shape[2], dtype=student.dtype)], dim=1).requires_grad_()
    view = wide.transpose(0, 1).transpose(0, 1)[:, : student.shape[1]]  # a strided view
    dense = student.clone().requires_grad_()
    a = multilevel_ot(view, teacher, s_labels, t_labels, with_ce=True, **SMALL)
    b = multilevel_ot(dense, teacher, s_labels, t_labels, with_ce=True, **SMALL)
    torch.testing.assert_close(terms(a), terms(b))
    sum(a[name] for name in (*TERMS, "ce")).backward()
    sum(b[name] for name in (*TERMS, "ce")).backward()
    torch.testing.assert_close(wide.grad[:, : student.shape[1]], dense.grad)
    assert (wide.grad[:, student.shape[1] :] == 0).all()


@pytest.mark.parametrize("scattered", [False, True])
def test_block_size_changes_nothing(scattered):
    """Blocks of one row, of several rows, contiguous (views) or scattered (gathered)."""
    student, teacher, s_labels, t_labels = batch(15)
    pairing = position_pairing(s_labels, t_labels)
    if scattered:
        from mlot_ds.pairing import pack_pairs

        pairing = pack_pairs([[(0, 1), (3, 2), (7, 9)], [(2, 0), (5, 5), (9, 3)], [(1, 1), (8, 4), (4, 7)]])
    results = []
    for chunk in (1, 5 * student.shape[2], None):
        logits = student.clone().requires_grad_()
        out = multilevel_ot(logits, teacher, s_labels, t_labels, pairing=pairing, with_ce=True, chunk_elements=chunk, **SMALL)
        sum(out[name] for name in (*TERMS, "ce")).backward()
        results.append((terms(out).detach(), out["ce"].detach(), logits.grad))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_wrong_pairing_type_raises():
    from mlot_ds.losses import official_spans

    student, teacher, s_labels, t_labels = batch(16)
    with pytest.raises(ValueError, match="pairing must be a mlot_ds.pairing.Pairing"):
        teacher_summary(teacher, official_spans(s_labels, t_labels), **SMALL)
