"""ALM (tokenkit's merge_by_space_prob + append_space, binary CE): float64 loops, properties, boundary mask."""

from __future__ import annotations

import math

import pytest
import torch
from data_fixtures import gpt2, sp_bpe

from mlot_ds.losses.alm import DIVERGENCES, alm, alm_chunk_count, alm_divergence, merge_groups
from mlot_ds.losses.rowstats import student_token_stats, teacher_token_stats
from mlot_ds.pairing.boundary import boundary_token_mask
from mlot_ds.pairing.surface import token_surface_bytes

VOCAB, TS, TT = 30, 9, 7


def _log1mexp(x: float) -> float:
    return math.log(-math.expm1(x))


def reference_divergence(lt: float, ls: float, divergence: str, tau=100.0, eps=1e-6) -> float:
    if divergence == "abs":
        return abs(lt - ls)
    if divergence == "joschu_k2":
        return ((lt - ls) / tau) ** 2 / 2
    if divergence == "joschu_k3":
        r = (lt - ls) / tau
        return math.exp(r) - 1 - r
    if divergence == "binary_kl_temp_limit":
        a, b = lt - eps, ls - eps
        return (a - b) + a * math.log(-b) - a * math.log(-a)
    a, b = lt / tau - eps, ls / tau - eps
    pa, pb = math.exp(a), math.exp(b)
    if divergence == "binary_ce":
        return -(pa * b + (1 - pa) * _log1mexp(b))
    if divergence == "reverse_binary_kl":
        return pb * (b - a) + (1 - pb) * (_log1mexp(b) - _log1mexp(a))
    assert divergence == "abs_exp"
    return abs(pa - pb)


def _lse(values):
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def _token_values(logits, labels, mask):
    """Per token t: log p(label t | row t-1) and log boundary mass at row t (explicit loops)."""
    out = {}
    for b in range(logits.shape[0]):
        for t in range(1, logits.shape[1]):
            if labels[b][t] == -100:
                continue
            prev = logits[b, t - 1].tolist()
            own = logits[b, t].tolist()
            out[b, t] = (prev[labels[b][t]] - _lse(prev),
                         _lse([v for v, m in zip(own, mask) if m]) - _lse(own))
    return out


def reference_alm(t_logits, t_labels, t_chunk, s_logits, s_labels, s_chunk, t_mask, s_mask, *, divergence,
                  threshold, merge=True, append=True):
    """Float64 loops: chunk sums, clip, boundary at the last token, merge at teacher boundaries, D."""
    t_values = _token_values(t_logits, t_labels, t_mask)
    s_values = _token_values(s_logits, s_labels, s_mask)
    total, groups = 0.0, 0
    for b in range(t_chunk.shape[0]):
        chunk_ids = sorted({c for c in t_chunk[b].tolist() if c >= 0})
        sides = []
        for values, chunk in ((t_values, t_chunk), (s_values, s_chunk)):
            table = {}
            for c in chunk_ids:
                positions = [t for t in range(chunk.shape[1]) if chunk[b, t] == c]
                log_prob = min(0.0, sum(values[b, t][0] for t in positions))
                table[c] = (log_prob, min(0.0, values[b, positions[-1]][1]))
            sides.append(table)
        teacher, student = sides
        members = []
        for index, c in enumerate(chunk_ids):
            members.append(c)
            is_boundary = math.exp(teacher[c][1]) > threshold if merge else True
            if is_boundary or index == len(chunk_ids) - 1:
                lt = sum(teacher[m][0] for m in members) + (teacher[members[-1]][1] if append else 0.0)
                ls = sum(student[m][0] for m in members) + (student[members[-1]][1] if append else 0.0)
                total += reference_divergence(lt, ls, divergence)
                groups += 1
                members = []
    return total, groups


def _case(seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    t_logits = (torch.randn(2, TT, VOCAB, generator=generator, dtype=torch.float64) * 2).to(dtype)
    s_logits = (torch.randn(2, TS, VOCAB, generator=generator, dtype=torch.float64) * 2).to(dtype)
    t_labels = torch.randint(0, VOCAB, (2, TT), generator=generator)
    s_labels = torch.randint(0, VOCAB, (2, TS), generator=generator)
    t_labels[:, :2] = -100
    s_labels[:, :3] = -100
    # "Hel" + "lo" <-> "Hello" style chunks over the response tokens (teacher 2..6, student 3..8)
    t_chunk = torch.full((2, TT), -1, dtype=torch.long)
    s_chunk = torch.full((2, TS), -1, dtype=torch.long)
    t_chunk[0, 2:] = torch.tensor([0, 1, 1, 2, 3])
    s_chunk[0, 3:] = torch.tensor([0, 0, 1, 2, 3, 3])
    t_chunk[1, 2:] = torch.tensor([0, 0, 1, 2, 2])
    s_chunk[1, 3:] = torch.tensor([0, 1, 1, 1, 2, 2])
    t_mask = torch.zeros(VOCAB, dtype=torch.bool)
    t_mask[[0, 5, 9]] = True
    s_mask = torch.zeros(VOCAB, dtype=torch.bool)
    s_mask[[1, 5, 20, 21]] = True
    return t_logits, t_labels, t_chunk, s_logits, s_labels, s_chunk, t_mask, s_mask


def _pipeline(t_logits, t_labels, t_chunk, s_logits, s_labels, s_chunk, t_mask, s_mask, **kwargs):
    teacher = teacher_token_stats(lambda r: t_logits.reshape(-1, VOCAB).index_select(0, r), t_labels, vocab=VOCAB,
                                  boundary_mask=t_mask, rows_per_block=3)
    student = student_token_stats(s_logits, s_labels, boundary_mask=s_mask, chunk_elements=2 * VOCAB)
    return alm(teacher.log_prob, teacher.boundary_log_mass, t_chunk, student.log_prob, student.boundary_log_mass,
               s_chunk, **kwargs)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("threshold", [0.1, 0.25, 0.0, 1.0])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_matches_the_float64_loop(divergence, threshold, seed, dtype):
    case = _case(seed, dtype)
    out = _pipeline(*case, divergence=divergence, threshold=threshold)
    t_logits, t_labels, t_chunk, s_logits, s_labels, s_chunk, t_mask, s_mask = case
    want, groups = reference_alm(t_logits.double(), t_labels.tolist(), t_chunk, s_logits.double(), s_labels.tolist(),
                                 s_chunk, t_mask.tolist(), s_mask.tolist(), divergence=divergence, threshold=threshold)
    tol = 1e-9 if dtype == torch.float64 else 2e-4
    assert out["alm"].item() == pytest.approx(want, rel=tol, abs=tol * 1e-3)
    assert out["chunks"].item() == groups
    teacher = teacher_token_stats(lambda r: t_logits.reshape(-1, VOCAB).index_select(0, r), t_labels, vocab=VOCAB,
                                  boundary_mask=t_mask)
    assert alm_chunk_count(teacher.boundary_log_mass, t_chunk, threshold=threshold).item() == groups
    if threshold == 1.0:
        assert groups == 2  # nothing is a boundary: one group per sequence
    if threshold == 0.0:
        assert groups == 7  # everything is: the 4 + 3 chunks


def test_merging_happens_in_the_reference_case():
    case = _case(0)
    merged = _pipeline(*case, threshold=0.1)["chunks"].item()
    assert 2 < merged < 7, merged  # some chunks merged, some not: the loop comparison above is not trivial


@pytest.mark.parametrize("options", [{"merge_by_boundary": False}, {"append_boundary": False},
                                     {"merge_by_boundary": False, "append_boundary": False}])
def test_modes_without_merge_or_append(options):
    case = _case(1)
    out = _pipeline(*case, **options)
    t_logits, t_labels, t_chunk, s_logits, s_labels, s_chunk, t_mask, s_mask = case
    want, groups = reference_alm(t_logits, t_labels.tolist(), t_chunk, s_logits, s_labels.tolist(), s_chunk,
                                 t_mask.tolist(), s_mask.tolist(), divergence="binary_ce", threshold=0.1,
                                 merge=options.get("merge_by_boundary", True),
                                 append=options.get("append_boundary", True))
    assert out["alm"].item() == pytest.approx(want, rel=1e-9)
    assert out["chunks"].item() == groups


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_gradcheck_through_the_student_kernel(divergence):
    t_logits, t_labels, t_chunk, s_logits, s_labels, s_chunk, t_mask, s_mask = _case(3)
    s_logits.requires_grad_(True)
    # Scaled up so that the random projection of fast mode sits well above gradcheck's atol
    # (with tau = 100 the raw gradient entries are ~1e-3).
    assert torch.autograd.gradcheck(
        lambda x: 1e4 * _pipeline(t_logits, t_labels, t_chunk, x, s_labels, s_chunk, t_mask, s_mask,
                                  divergence=divergence)["alm"], (s_logits,), fast_mode=True)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_gradient_equals_plain_autograd(divergence):
    t_logits, t_labels, t_chunk, s_logits, s_labels, s_chunk, t_mask, s_mask = _case(4)
    teacher = teacher_token_stats(lambda r: t_logits.reshape(-1, VOCAB).index_select(0, r), t_labels, vocab=VOCAB,
                                  boundary_mask=t_mask)
    kernel_logits = s_logits.clone().requires_grad_(True)
    student = student_token_stats(kernel_logits, s_labels, boundary_mask=s_mask, chunk_elements=VOCAB)
    alm(teacher.log_prob, teacher.boundary_log_mass, t_chunk, student.log_prob, student.boundary_log_mass, s_chunk,
        divergence=divergence)["alm"].backward()
    plain_logits = s_logits.clone().requires_grad_(True)
    log_softmax = torch.log_softmax(plain_logits, -1)
    valid = s_labels != -100
    valid[:, 0] = False
    log_prob = torch.zeros(s_labels.shape, dtype=torch.float64)
    log_prob[:, 1:] = log_softmax[:, :-1].gather(2, s_labels[:, 1:].clamp(min=0).unsqueeze(2)).squeeze(2)
    boundary = torch.logsumexp(log_softmax[..., s_mask], -1)
    alm(teacher.log_prob, teacher.boundary_log_mass, t_chunk, log_prob * valid, boundary * valid, s_chunk,
        divergence=divergence)["alm"].backward()
    torch.testing.assert_close(kernel_logits.grad, plain_logits.grad, rtol=1e-9, atol=1e-13)
    assert plain_logits.grad.abs().max() > 1e-4


def test_divergences_closed_forms():
    for lt, ls in [(-0.5, -2.0), (-3.0, -0.1), (-1.0, -1.0), (-25.0, -30.0)]:
        for divergence in DIVERGENCES:
            got = alm_divergence(torch.tensor(lt, dtype=torch.float64), torch.tensor(ls, dtype=torch.float64),
                                 divergence=divergence).item()
            assert got == pytest.approx(reference_divergence(lt, ls, divergence), rel=1e-10, abs=1e-15)


def _per_token_case(seed=0):
    generator = torch.Generator().manual_seed(seed)
    chunk = torch.tensor([[0, 0, 1, 2, 2, 3, 4, -1], [0, 1, 1, 2, -1, -1, -1, -1]])
    log_prob = -torch.rand(chunk.shape, generator=generator, dtype=torch.float64) * 3
    boundary = -torch.rand(chunk.shape, generator=generator, dtype=torch.float64) * 4
    return log_prob, boundary, chunk


@pytest.mark.parametrize("divergence", ["binary_ce", "reverse_binary_kl", "binary_kl_temp_limit"])
def test_zero_gradient_when_student_equals_teacher(divergence):
    log_prob, boundary, chunk = _per_token_case()
    student_lp = log_prob.clone().requires_grad_(True)
    student_boundary = boundary.clone().requires_grad_(True)
    out = alm(log_prob, boundary, chunk, student_lp, student_boundary, chunk, divergence=divergence)
    out["alm"].backward()
    assert student_lp.grad.abs().max().item() < 1e-9
    assert student_boundary.grad.abs().max().item() < 1e-9
    # ... and not zero elsewhere (the check can fail)
    shifted = (log_prob - 0.3).requires_grad_(True)
    alm(log_prob, boundary, chunk, shifted, boundary, chunk, divergence=divergence)["alm"].backward()
    assert shifted.grad.abs().max().item() > 1e-4


def test_resplitting_a_student_chunk_keeps_the_loss():
    log_prob, boundary, chunk = _per_token_case(1)
    student_lp = -torch.rand(chunk.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    student_boundary = -torch.rand(chunk.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    base = alm(log_prob, boundary, chunk, student_lp, student_boundary, chunk)["alm"].item()
    # split token 2 of sequence 0 (chunk 1) into two tokens with the same total log-prob; the new
    # last token of the chunk carries the old boundary mass
    split_chunk = torch.cat([chunk[:, :3], chunk[:, 2:3], chunk[:, 3:]], dim=1)
    split_lp = torch.cat([student_lp[:, :2], student_lp[:, 2:3] * 0.3, student_lp[:, 2:3] * 0.7, student_lp[:, 3:]], 1)
    split_boundary = torch.cat([student_boundary[:, :3], student_boundary[:, 2:3], student_boundary[:, 3:]], 1)
    split_boundary[:, 2] = -9.0  # inside the chunk now: must not matter
    split = alm(log_prob, boundary, chunk, split_lp, split_boundary, split_chunk)["alm"].item()
    assert split == pytest.approx(base, rel=1e-12)


def test_hand_worked_merge_example():
    flags = torch.tensor([[False, True, False, False, True], [True, False, False, False, False]])
    assert merge_groups(flags).tolist() == [[0, 0, 1, 1, 1], [0, 1, 1, 1, 1]]
    # through alm: five one-token chunks, teacher boundary probabilities [.05, .5, .05, .05, .5]
    chunk = torch.arange(5).unsqueeze(0)
    t_lp = torch.tensor([[-1.0, -2.0, -0.5, -0.25, -1.5]], dtype=torch.float64)
    t_boundary = torch.tensor([[0.05, 0.5, 0.05, 0.05, 0.5]], dtype=torch.float64).log()
    s_lp = torch.tensor([[-0.5, -1.0, -1.0, -2.0, -0.5]], dtype=torch.float64)
    s_boundary = torch.tensor([[0.2, 0.3, 0.4, 0.1, 0.6]], dtype=torch.float64).log()
    out = alm(t_lp, t_boundary, chunk, s_lp, s_boundary, chunk)
    want = (reference_divergence(-3.0 + math.log(0.5), -1.5 + math.log(0.3), "binary_ce")
            + reference_divergence(-2.25 + math.log(0.5), -3.5 + math.log(0.6), "binary_ce"))
    assert out["chunks"].item() == 2
    assert out["alm"].item() == pytest.approx(want, rel=1e-12)
    assert alm_chunk_count(t_boundary, chunk).item() == 2


def test_chunk_log_probs_are_clipped_at_zero():
    chunk = torch.tensor([[0, 0]])
    t_lp = torch.tensor([[0.4, -0.1]], dtype=torch.float64)  # sums to 0.3 > 0: clipped to 0
    zeros = torch.zeros(1, 2, dtype=torch.float64)
    s_lp = torch.tensor([[-0.5, -0.5]], dtype=torch.float64)
    out = alm(t_lp, zeros, chunk, s_lp, zeros, chunk, divergence="abs", append_boundary=False)
    assert out["alm"].item() == pytest.approx(1.0)


def test_rejects_chunks_on_one_side_only():
    log_prob, boundary, chunk = _per_token_case()
    student_chunk = chunk.clone()
    student_chunk[0, 6] = -1  # chunk 4 of sequence 0 vanishes on the student side
    with pytest.raises(ValueError):
        alm(log_prob, boundary, chunk, log_prob, boundary, student_chunk)


def test_boundary_token_mask_by_hand():
    surfaces = [b" the", b"the", None, b"\tx", b"\nx", b"", b"x ", "é".encode(), b"\r"]
    assert boundary_token_mask(surfaces, 11).tolist() == [True, False, True, True, True, False, False, False,
                                                          False, False, False]
    with pytest.raises(ValueError):
        boundary_token_mask(surfaces, 5)


@pytest.mark.parametrize("builder", [sp_bpe, gpt2])
def test_boundary_token_mask_on_real_tokenizers(builder):
    tokenizer = builder()
    surfaces = token_surface_bytes(tokenizer)
    mask = boundary_token_mask(surfaces, len(surfaces) + 3)
    assert not mask[len(surfaces):].any()
    assert all(mask[i] for i in tokenizer.all_special_ids)
    word = tokenizer.encode(" the", add_special_tokens=False)[-1]  # "▁the" / "Ġthe"
    assert tokenizer.convert_ids_to_tokens(word)[0] in "▁Ġ"
    assert mask[word]
    newline = [i for i, s in enumerate(surfaces) if s == b"\n"]
    assert newline and all(mask[i] for i in newline)
    letters = [i for i, s in enumerate(surfaces) if s and s[:1].isalpha()]
    assert letters and not mask[letters].any()
