"""CDM's KD term: the dynamic vocabulary map, the two slot KLs, against float64 loop references."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from mlot_ds.losses.cdm import (
    TeacherTopK,
    build_cdm_vocab,
    cdm_kd,
    cdm_term_weights,
    near_match_map,
    row_entropy,
    teacher_topk,
)
from mlot_ds.pairing.weighted_dtw import EOS_MARKERS, cdm_align, dtw_token_strings, pack_cdm_groups

MARKERS = set(EOS_MARKERS)


def levenshtein(a: bytes, b: bytes) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        previous, row[0] = row[:], i
        for j, y in enumerate(b, 1):
            row[j] = min(previous[j] + 1, row[j - 1] + 1, previous[j - 1] + (x != y))
    return row[-1]


# ------------------------------------------------------------------------------ references


def _raw(surfaces, literals, token_id):
    if surfaces[token_id] is not None:
        return surfaces[token_id]
    return literals[token_id].encode() if literals and literals[token_id] is not None else None


def _reference_exact(src_surfaces, src_literals, dst_surfaces, dst_literals) -> dict[int, int]:
    """Lowest target id with the same surface (text) or the same literal (non-text); marker fallback."""
    out = {}
    for i, surface in enumerate(src_surfaces):
        for j, other in enumerate(dst_surfaces):
            if surface is not None and other == surface:
                out[i] = j
                break
            if surface is None and other is None and src_literals and dst_literals and src_literals[i] == dst_literals[j]:
                out[i] = j
                break
        if i not in out and surface is None and src_literals and src_literals[i].encode() in MARKERS:
            markers = [j for j in range(len(dst_surfaces)) if dst_surfaces[j] is None and dst_literals
                       and dst_literals[j].encode() in MARKERS]
            if markers:
                out[i] = markers[0]
    return out


def _reference_distance(a_raw: bytes, b_raw: bytes) -> float:
    a, b = a_raw.replace(b" ", b""), b_raw.replace(b" ", b"")
    if not a and not b:
        return 0.0
    return levenshtein(a, b) / (len(a) + len(b))


def _reference_map(src_id, exact, candidates, candidate_values, src_raw, dst_raw, threshold):
    if src_id in exact:
        return exact[src_id], "exact"
    best = None
    for c in candidates:
        if src_raw[src_id] is None or dst_raw[c] is None:
            continue
        d = _reference_distance(src_raw[src_id], dst_raw[c])
        if d < threshold and (best is None or (d, -candidate_values[c], c) < best):
            best = (d, -candidate_values[c], c)
    return (best[2], "near") if best else (-1, "none")


def _reference_weights(h):
    h = [float(x) for x in h]
    lo, hi = min(h), max(h)
    return [math.floor(3 / (1 + math.exp(-(4 * ((x - lo) / (hi - lo) if hi > lo else 0.0) - 2))) + 3) for x in h]


def _reference_path(cost_st: np.ndarray) -> list[tuple[int, int]]:
    """The copies' double loop on the [teacher, student] table and argmin (diagonal, up, left)."""
    cost = cost_st.T
    n, m = cost.shape
    matrix = np.full((n + 1, m + 1), np.inf)
    matrix[0, 0] = 0.0
    for i in range(n):
        for j in range(m):
            matrix[i + 1, j + 1] = cost[i, j] + min(matrix[i, j + 1], matrix[i + 1, j], matrix[i, j])
    matrix = matrix[1:, 1:]
    i, j = n - 1, m - 1
    path = [(j, i)]
    while i > 0 or j > 0:
        options = [matrix[i - 1, j - 1] if i and j else np.inf, matrix[i - 1, j] if i else np.inf,
                   matrix[i, j - 1] if j else np.inf]
        move = int(np.argmin(options))
        i, j = (i - 1, j - 1) if move == 0 else (i - 1, j) if move == 1 else (i, j - 1)
        path.append((j, i))
    return path[::-1]


def _entropy64(rows: torch.Tensor) -> list[float]:
    p = torch.softmax(rows.detach().double(), -1)
    return [float(-(q * q.log()).sum()) for q in p]


def reference_cdm(student_rows, teacher_rows, s_ids, t_ids, toy, *, top_k, threshold=0.3, temperature=0.8,
                  merge="teacher_lists", teacher_entropy=None):
    """Float64 loops: copy-style DTW and merging, top-K by sorting, dict maps, -1e4 fills on both sides.

    ``teacher_rows`` are teacher logits (or any per-row shift of them, e.g. reconstructed log-probs).
    Returns the loss (a differentiable float64 scalar) and counts of the map's outcomes.
    """
    s_raw = [_raw(toy["s_surf"], toy["s_lit"], i) for i in range(len(toy["s_surf"]))]
    t_raw = [_raw(toy["t_surf"], toy["t_lit"], i) for i in range(len(toy["t_surf"]))]
    ws = _reference_weights(_entropy64(student_rows))
    wt = _reference_weights(teacher_entropy if teacher_entropy is not None else _entropy64(teacher_rows))
    cost = np.zeros((len(s_ids), len(t_ids)))
    for a, sid in enumerate(s_ids):
        for b, tid in enumerate(t_ids):
            sa, tb = s_raw[sid], t_raw[tid]
            edits = 0 if (sa in MARKERS and tb in MARKERS) else levenshtein(sa.replace(b" ", b""), tb.replace(b" ", b""))
            cost[a, b] = edits * ws[a] * wt[b]
    path = _reference_path(cost)
    s_to_t = [[t for s, t in path if s == a] for a in range(len(s_ids))]
    t_to_s = [[s for s, t in path if t == b] for b in range(len(t_ids))]
    if merge == "teacher_lists":
        lists = []
        for members in t_to_s:
            if members not in lists:
                lists.append(members)
    else:  # connected components of the path
        lists, previous = [], None
        for s, t in path:
            if previous is None or (s != previous[0] and t != previous[1]):
                lists.append([])
            if s not in lists[-1]:
                lists[-1].append(s)
            previous = (s, t)
    exact_t2s = _reference_exact(toy["t_surf"], toy["t_lit"], toy["s_surf"], toy["s_lit"])
    exact_s2t = _reference_exact(toy["s_surf"], toy["s_lit"], toy["t_surf"], toy["t_lit"])
    per_student_teacher = [torch.stack([teacher_rows[t] for t in s_to_t[s]]).mean(0) for s in range(len(s_ids))]
    total = torch.zeros((), dtype=torch.float64)
    counts = {"exact": 0, "near": 0, "none": 0}

    def kl(teacher_vec, student_vec):
        log_p = torch.log_softmax(teacher_vec, 0)
        log_q = torch.log_softmax(student_vec, 0)
        return sum(log_p[k].exp() * (log_p[k] - log_q[k]) for k in range(len(teacher_vec)))

    fill = torch.tensor(-1e4, dtype=torch.float64)
    for members in lists:
        T = torch.stack([per_student_teacher[s] for s in members]).mean(0)
        S = torch.stack([student_rows[s] for s in members]).mean(0)
        tv, sv = T.tolist(), S.detach().tolist()
        tau = sorted(range(len(tv)), key=lambda v: (-tv[v], v))[:top_k]
        sigma = sorted(range(len(sv)), key=lambda v: (-sv[v], v))[:top_k]
        t_slots, s_slots = [], []
        for t in tau:
            mapped, how = _reference_map(t, exact_t2s, sigma, sv, t_raw, s_raw, threshold)
            counts[how] += 1
            t_slots.append(T[t] if mapped >= 0 else fill)
            s_slots.append(S[mapped] if mapped >= 0 else fill)
        total = total + kl(torch.stack(t_slots), torch.stack(s_slots) / temperature)
        t_slots, s_slots = [], []
        for s in sigma:
            mapped, how = _reference_map(s, exact_s2t, tau, tv, s_raw, t_raw, threshold)
            counts[how] += 1
            t_slots.append(T[mapped] if mapped >= 0 else fill)
            s_slots.append(S[s] if mapped >= 0 else fill)
        total = total + kl(torch.stack(t_slots), torch.stack(s_slots) / temperature)
    return total, counts, len(lists)


def _reconstructed_log_probs(teacher_logits: torch.Tensor, kept: int) -> torch.Tensor:
    """The teacher rows a top-``kept`` cache stands for: kept log-probs, the tail's uniform share elsewhere."""
    log_probs = torch.log_softmax(teacher_logits.double(), -1)
    vocab = log_probs.shape[1]
    out = torch.empty_like(log_probs)
    for r in range(log_probs.shape[0]):
        ids = sorted(range(vocab), key=lambda v: -float(log_probs[r, v]))[:kept]
        values = log_probs[r, ids]
        tail = 1.0 - float(values.exp().sum())
        out[r] = min(math.log(tail / (vocab - kept)), float(values.min()))
        out[r, ids] = values
    return out


# ---------------------------------------------------------------------------------- fixtures


def toy_vocab(seed: int = 0) -> dict:
    """Two 50-token vocabularies over "abc " with 23 shared strings, and an EOS marker each (id 0)."""
    generator = random.Random(seed)
    pool: set[bytes] = set()
    while len(pool) < 75:
        pool.add(bytes(generator.choice(b"abc ") for _ in range(generator.randint(1, 4))))
    strings = sorted(pool)
    generator.shuffle(strings)
    s_surf, t_surf = [None] + strings[:49], [None] + strings[26:75]
    return {
        "s_surf": s_surf, "t_surf": t_surf,
        "s_lit": ["</s>"] + [s.decode() for s in s_surf[1:]],
        "t_lit": ["<|im_end|>"] + [s.decode() for s in t_surf[1:]],
    }


def _vocab(toy):
    return build_cdm_vocab(toy["s_surf"], toy["t_surf"], student_literals=toy["s_lit"], teacher_literals=toy["t_lit"])


def _case(seed: int, rs: int = 5, rt: int = 7, vocab: int = 50):
    generator = torch.Generator().manual_seed(seed)
    s_ids = torch.randint(1, vocab, (rs - 1,), generator=generator).tolist() + [0]  # ends with the EOS markers
    t_ids = torch.randint(1, vocab, (rt - 1,), generator=generator).tolist() + [0]
    student = (torch.randn(rs + 1, vocab, generator=generator, dtype=torch.float64) * 2).requires_grad_()
    teacher = torch.randn(rt, vocab, generator=generator, dtype=torch.float64) * 2
    return s_ids, t_ids, student, teacher


def _ours(student_logits, student_rows, teacher: TeacherTopK, s_ids, t_ids, toy, *, top_k, merge="teacher_lists",
          **kwargs):
    s_strings = dtw_token_strings(s_ids, toy["s_surf"], toy["s_lit"])
    t_strings = dtw_token_strings(t_ids, toy["t_surf"], toy["t_lit"])
    groups = cdm_align(s_strings, t_strings, row_entropy(student_logits.reshape(-1, student_logits.shape[-1])[student_rows]),
                       teacher.entropy, merge=merge)
    packed = pack_cdm_groups([groups], [student_rows], [torch.arange(len(t_ids))])
    return cdm_kd(student_logits, teacher, packed, _vocab(toy), top_k=top_k, **kwargs)


# ------------------------------------------------------------------------------------ tests


def test_exact_map_from_surfaces_and_literals():
    s_surf = [None, b" the", b"the", b"ing", b" the", None, None]
    t_surf = [None, b"the", b" the", b"ings", None]
    vocab = build_cdm_vocab(s_surf, t_surf, student_literals=["</s>", "", "", "", "", "<pad>", "<|x|>"],
                            teacher_literals=["<|endoftext|>", "", "", "", "<pad>"])
    # text by surface (spaces count), lowest id among duplicates; specials by literal; markers to markers
    assert vocab.teacher_to_student.tolist() == [0, 2, 1, -1, 5]
    assert vocab.student_to_teacher.tolist() == [0, 2, 1, -1, 2, 4, -1]
    assert vocab.student.strings[1] == b"the" and vocab.student.marker.tolist() == [True] + [False] * 6
    plain = build_cdm_vocab(s_surf, t_surf)  # no literals: non-text tokens never match
    assert plain.teacher_to_student.tolist() == [-1, 2, 1, -1, -1]


@pytest.mark.parametrize("backend", ["numpy", "rapidfuzz"])
def test_planted_near_matches_in_both_directions(backend):
    t_surf = [b"ing", b"xyz", b" the", b"cat", b"dog", b"abcde", b" "]
    s_surf = [b"ings", b" the", b"the", b"cat", b"qqq", b"do", b"abfgh", b"  "]
    vocab = build_cdm_vocab(s_surf, t_surf)
    tau = torch.tensor([[0, 1, 2, 3, 4, 5, 6]])
    sigma = torch.tensor([[0, 4, 5, 2, 6, 7]])
    sigma_scores = torch.tensor([[6.0, 5.0, 4.0, 3.0, 2.0, 1.0]])
    tau_scores = torch.tensor([[7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0]])
    t2s = near_match_map(tau, vocab.teacher_to_student, sigma, sigma_scores, vocab.teacher, vocab.student, backend=backend)
    # ing -> ings (1/7); xyz: nothing below 0.3; " the", cat: exact; dog -> do (1/5);
    # abcde vs abfgh: 3/10 = 0.3 is not < 0.3; " " and "  " are both empty without spaces: distance 0
    assert t2s.tolist() == [[0, -1, 1, 3, 5, -1, 7]]
    s2t = near_match_map(sigma, vocab.student_to_teacher, tau, tau_scores, vocab.student, vocab.teacher, backend=backend)
    # ings -> ing; qqq: none; do -> dog; "the" has no exact twin but equals " the" without spaces; abfgh: 0.3
    assert s2t.tolist() == [[0, -1, 4, 2, -1, 6]]
    # the map is per row: without "ings" among the student's candidates, "ing" stays unmapped
    assert near_match_map(tau, vocab.teacher_to_student, sigma[:, 1:], sigma_scores[:, 1:], vocab.teacher,
                          vocab.student, backend=backend)[0, 0] == -1
    loose = near_match_map(tau, vocab.teacher_to_student, sigma, sigma_scores, vocab.teacher, vocab.student,
                           simi_threshold=0.31, backend=backend)
    assert loose[0, 5] == 6


def test_near_match_tie_break():
    t_surf = [b"abc"]
    s_surf = [b"abd", b"abe", b"xbc", b"abcd"]
    vocab = build_cdm_vocab(s_surf, t_surf)
    tau = torch.tensor([[0], [0], [0]])
    sigma = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3], [2, 1, 0, 3]])
    scores = torch.tensor([[1.0, 3.0, 2.0, 9.0], [2.0, 2.0, 2.0, 9.0], [1.0, 1.0, 1.0, 9.0]])
    # abcd is the nearest (1/7 < 1/6) whatever its score; here it is left out to compare the ties
    t2s = near_match_map(tau, vocab.teacher_to_student, sigma[:, :3], scores[:, :3], vocab.teacher, vocab.student)
    assert t2s.tolist() == [[1], [0], [0]]  # larger score, then lower id
    assert near_match_map(tau, vocab.teacher_to_student, sigma, scores, vocab.teacher, vocab.student).tolist() == [[3]] * 3


def test_row_entropy_and_teacher_topk():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 30, generator=generator, dtype=torch.float64) * 3
    p = torch.softmax(logits, -1)
    np.testing.assert_allclose(row_entropy(logits, chunk_elements=60).numpy(), (-(p * p.log()).sum(-1)).numpy(), rtol=1e-12)
    top = teacher_topk(logits, 5, chunk_elements=60)
    np.testing.assert_array_equal(top.ids.numpy(), logits.topk(5).indices.numpy())
    np.testing.assert_allclose(top.logsumexp.numpy(), torch.logsumexp(logits, -1).numpy(), rtol=1e-12)
    assert top.vocab_size == 30 and row_entropy(logits.float()).dtype == torch.float32


@pytest.mark.parametrize("chunk_elements", [None, 100])  # 100: the student's top-K two groups at a time
def test_end_to_end_equals_the_float64_reference_and_the_student_gets_gradient(chunk_elements):
    toy = toy_vocab(0)
    s_ids, t_ids, student, teacher_logits = _case(0)
    rows = torch.arange(5)  # row t predicts token t + 1; row 5 is not a response row
    teacher = teacher_topk(teacher_logits, 50)  # every id kept: exact
    out = _ours(student.unsqueeze(0), rows, teacher, s_ids, t_ids, toy, top_k=12, chunk_elements=chunk_elements)
    expected, counts, groups = reference_cdm(student[:5], teacher_logits, s_ids, t_ids, toy, top_k=12)
    assert counts["exact"] > 0 and counts["near"] > 0 and counts["none"] > 0  # every branch of the map ran
    assert out["cdm"].dtype == torch.float64
    assert float(out["cdm"].detach()) == pytest.approx(float(expected.detach()), rel=1e-10)
    assert float(out["rows"]) == groups and float(out["tokens"]) == 5
    assert float(out["mapped_t2s"] + out["mapped_s2t"]) == counts["exact"] + counts["near"]
    assert float(out["cdm_t2s"] + out["cdm_s2t"]) == pytest.approx(float(out["cdm"].detach()), rel=1e-12)
    ours_grad = torch.autograd.grad(out["cdm"], student)[0]
    reference_grad = torch.autograd.grad(expected, student)[0]
    # the regression test for the copies' bug: the student does get a KD gradient, and the right one
    assert ours_grad[:5].abs().sum() > 0 and ours_grad[5].abs().sum() == 0
    np.testing.assert_allclose(ours_grad.numpy(), reference_grad.numpy(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("merge", ["teacher_lists", "components"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_truncated_teacher_equals_the_reference_on_reconstructed_rows(seed, merge):
    toy = toy_vocab(seed)
    s_ids, t_ids, student, teacher_logits = _case(seed, rs=6, rt=8)
    teacher = teacher_topk(teacher_logits, 20)  # 20 of 50 ids kept: the tail approximation is used
    out = _ours(student.unsqueeze(0), torch.arange(6), teacher, s_ids, t_ids, toy, top_k=10, merge=merge)
    expected, counts, _ = reference_cdm(student[:6], _reconstructed_log_probs(teacher_logits, 20), s_ids, t_ids, toy,
                                        top_k=10, merge=merge, teacher_entropy=teacher.entropy.tolist())
    assert counts["near"] > 0
    assert float(out["cdm"].detach()) == pytest.approx(float(expected.detach()), rel=1e-10)
    np.testing.assert_allclose(torch.autograd.grad(out["cdm"], student)[0].numpy(),
                               torch.autograd.grad(expected, student)[0].numpy(), rtol=1e-9, atol=1e-12)


def test_batch_is_the_sum_of_its_sequences_and_teacher_gets_no_gradient():
    toy = toy_vocab(4)
    cases = [_case(10), _case(11, rs=4, rt=6)]
    student = torch.stack([cases[0][2], torch.cat([cases[1][2], torch.zeros(1, 50, dtype=torch.float64)])]).detach()
    student.requires_grad_()
    teacher_logits = torch.cat([cases[0][3], cases[1][3]]).requires_grad_()
    teacher = teacher_topk(teacher_logits, 30)
    vocab = _vocab(toy)
    groups, student_rows, teacher_rows = [], [], []
    t_offset = 0
    for b, (s_ids, t_ids, _, _) in enumerate(cases):
        rows = torch.arange(len(s_ids)) + b * student.shape[1]
        t_rows = torch.arange(len(t_ids)) + t_offset
        groups.append(cdm_align(dtw_token_strings(s_ids, toy["s_surf"], toy["s_lit"]),
                                dtw_token_strings(t_ids, toy["t_surf"], toy["t_lit"]),
                                row_entropy(student.reshape(-1, 50)[rows]), teacher.entropy[t_rows]))
        student_rows.append(rows)
        teacher_rows.append(t_rows)
        t_offset += len(t_ids)
    batch = cdm_kd(student, teacher, pack_cdm_groups(groups, student_rows, teacher_rows), vocab, top_k=8)
    singles = [cdm_kd(student, teacher, pack_cdm_groups([g], [s], [t]), vocab, top_k=8)
               for g, s, t in zip(groups, student_rows, teacher_rows)]
    assert float(batch["cdm"].detach()) == pytest.approx(sum(float(s["cdm"].detach()) for s in singles), rel=1e-12)
    assert float(batch["tokens"]) == 5 + 4
    batch["cdm"].backward()
    assert teacher_logits.grad is None and student.grad.abs().sum() > 0


def test_low_precision_inputs_are_computed_in_float32():
    toy = toy_vocab(5)
    s_ids, t_ids, student, teacher_logits = _case(5)
    half = student.detach().to(torch.bfloat16).requires_grad_()
    wide = half.detach().float().requires_grad_()
    teacher = teacher_topk(teacher_logits.to(torch.bfloat16), 16)
    assert teacher.logits.dtype == torch.float32
    low = _ours(half.unsqueeze(0), torch.arange(5), teacher, s_ids, t_ids, toy, top_k=8)
    full = _ours(wide.unsqueeze(0), torch.arange(5), teacher, s_ids, t_ids, toy, top_k=8)
    assert low["cdm"].dtype == torch.float32 and torch.isfinite(low["cdm"])
    assert float(low["cdm"].detach()) == pytest.approx(float(full["cdm"].detach()), rel=1e-6)
    low["cdm"].backward()
    assert half.grad.dtype == torch.bfloat16 and torch.isfinite(half.grad.float()).all() and half.grad.abs().sum() > 0


def test_unmapped_slots_do_not_leak_and_empty_rows_are_dropped():
    # One aligned row; teacher ids 0 ("zz", unmappable) and 1 ("a" -> student 0); student ids 0 and 1 ("q").
    s_surf, t_surf = [b"a", b"q", b"r"], [b"zz", b"a", b"w"]
    vocab = build_cdm_vocab(s_surf, t_surf)
    student = torch.tensor([[0.3, 2.0, -1.0]], dtype=torch.float64, requires_grad=True)
    t_logits = torch.tensor([[5.0, 1.0, -3.0]], dtype=torch.float64)
    groups = pack_cdm_groups([cdm_align([b"a"], [b"a"], [1.0], [1.0])], [[0]], [[0]])
    out = cdm_kd(student, teacher_topk(t_logits, 3), groups, vocab, top_k=2, kd_temperature=0.8)
    # T->S: slots (zz, a): only "a" is mapped -> a one-slot softmax on both sides: KL 0.
    # S->T: slots (q, a): only "a" is mapped -> KL 0 as well. Nothing of "zz"'s mass leaks in.
    assert float(out["cdm"].detach()) == pytest.approx(0.0, abs=1e-12)
    assert float(out["mapped_t2s"]) == 1 and float(out["mapped_s2t"]) == 1
    # two mapped slots: the KL of the renormalised pair
    vocab2 = build_cdm_vocab([b"a", b"q", b"r"], [b"zz", b"a", b"q"])
    out2 = cdm_kd(student, teacher_topk(t_logits, 3), groups, vocab2, top_k=3, kd_temperature=0.8)
    p = torch.softmax(torch.tensor([1.0, -3.0], dtype=torch.float64), 0)  # teacher at a, q
    q = torch.softmax(torch.tensor([0.3, 2.0], dtype=torch.float64) / 0.8, 0)  # student at a, q
    one_direction = float((p * (p.log() - q.log())).sum())
    assert float(out2["cdm"].detach()) == pytest.approx(2 * one_direction, rel=1e-12)  # T->S and S->T see the same slots
    # no mapped slot at all: the row contributes 0 and the gradient has no NaN
    vocab3 = build_cdm_vocab([b"x", b"y", b"z"], [b"aaaa", b"bbbb", b"cccc"])
    out3 = cdm_kd(student, teacher_topk(t_logits, 3), groups, vocab3, top_k=3)
    out3["cdm"].backward()
    assert float(out3["cdm"].detach()) == 0 and torch.isfinite(student.grad).all() and float(out3["mapped_t2s"]) == 0


def test_argument_checks_and_term_weights():
    vocab = build_cdm_vocab([b"a", b"b"], [b"a", b"b"])
    student = torch.zeros(1, 2)
    groups = pack_cdm_groups([cdm_align([b"a"], [b"a"], [1.0], [1.0])], [[0]], [[0]])
    teacher = teacher_topk(torch.zeros(1, 2), 2)
    with pytest.raises(ValueError):
        cdm_kd(student, teacher, groups, vocab, top_k=3)
    with pytest.raises(ValueError):
        cdm_kd(student, teacher, groups, vocab, top_k=1, kd_temperature=0.0)
    with pytest.raises(ValueError):
        cdm_kd(torch.zeros(1, 3), teacher, groups, vocab, top_k=1)
    assert cdm_term_weights() == pytest.approx({"ce": 0.9, "cdm": 0.1})
    empty = cdm_kd(student, teacher, pack_cdm_groups([], [], []), vocab, top_k=1)
    assert float(empty["cdm"].detach()) == 0 and float(empty["tokens"]) == 0
