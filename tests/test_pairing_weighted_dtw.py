"""CDM's entropy-weighted DTW: weights, edit distances, the warping path, and the logit groups."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest
import torch

from mlot_ds.pairing.weighted_dtw import (
    EOS_MARKERS,
    alignment_from_path,
    cdm_align,
    cdm_groups,
    dtw_backtrack,
    dtw_table,
    dtw_token_strings,
    entropy_weights,
    pack_cdm_groups,
    paired_edit_distances,
    pairwise_edit_distances,
    weighted_cost_matrix,
    weighted_dtw,
)

BACKENDS = ["numpy", "rapidfuzz"]


def levenshtein(a: bytes, b: bytes) -> int:
    """The textbook table, one row at a time."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        previous, row[0] = row[:], i
        for j, y in enumerate(b, 1):
            row[j] = min(previous[j] + 1, row[j - 1] + 1, previous[j - 1] + (x != y))
    return row[-1]


def _random_strings(generator: random.Random, count: int, longest: int, alphabet: bytes = b"ab c\xe4") -> list[bytes]:
    return [bytes(generator.choice(alphabet) for _ in range(generator.randint(0, longest))) for _ in range(count)]


# ---------------------------------------------------------------------------- weights


def test_entropy_weights_hand_table():
    # H = 2 + 3 * Hhat, so min 2 and max 5 give back Hhat exactly.
    hhat = np.array([0.0, 0.3, 0.33, 0.5, 0.67, 0.68, 1.0])
    # floor(3 * sigmoid(4 Hhat - 2) + 3): 3.36, 3.93, 4.01, 4.5, 4.99, 5.02, 5.64
    expected = [3, 3, 4, 4, 4, 5, 5]
    assert entropy_weights(2.0 + 3.0 * hhat).tolist() == expected
    assert entropy_weights(torch.tensor(2.0 + 3.0 * hhat, dtype=torch.float32)).tolist() == expected
    # order does not matter, only the min-max position
    assert entropy_weights((2.0 + 3.0 * hhat)[::-1]).tolist() == expected[::-1]


def test_entropy_weights_guard_when_all_equal():
    assert entropy_weights([1.7, 1.7, 1.7]).tolist() == [3, 3, 3]
    assert entropy_weights([0.4]).tolist() == [3]
    assert entropy_weights([]).tolist() == []
    with pytest.raises(ValueError):
        entropy_weights([1.0, float("nan")])


# ---------------------------------------------------------------------- edit distances


@pytest.mark.parametrize("backend", BACKENDS)
def test_edit_distances_match_the_textbook_table(backend):
    generator = random.Random(11)
    a = _random_strings(generator, 23, 7)
    b = _random_strings(generator, 19, 9) + [a[3]]  # repeated strings go through the de-duplication
    table = pairwise_edit_distances(a + [a[0]], b, backend=backend)
    np.testing.assert_array_equal(table, [[levenshtein(x, y) for y in b] for x in a + [a[0]]])
    left, right = _random_strings(generator, 200, 9), _random_strings(generator, 200, 6)
    paired = paired_edit_distances(left, right, backend=backend)
    np.testing.assert_array_equal(paired, [levenshtein(x, y) for x, y in zip(left, right)])
    assert paired_edit_distances([b"kitten", b"", b"ing"], [b"sitting", b"abc", b"ings"], backend=backend).tolist() == [3, 3, 1]


def test_weighted_cost_matrix_hand_case():
    student = [b" the", b"ing", b"</s>"]
    teacher = [b"the", b"in", b" g", b"<|im_end|>"]
    ws, wt = [3, 4, 5], [3, 3, 4, 5]
    cost = weighted_cost_matrix(student, teacher, ws, wt)
    stripped_s, stripped_t = [b"the", b"ing", b"</s>"], [b"the", b"in", b"g", b"<|im_end|>"]
    expected = np.array([[levenshtein(a, b) * x * y for b, y in zip(stripped_t, wt)] for a, x in zip(stripped_s, ws)],
                        dtype=np.float64)
    expected[2, 3] = 0.0  # two EOS-like markers
    np.testing.assert_array_equal(cost, expected)
    assert cost[0, 0] == 0 and cost[1, 1] == 1 * 4 * 3 and cost[2, 0] > 0
    # spaces kept: " the" vs "the" costs one edit; no markers: the EOS pair costs its edit distance
    kept = weighted_cost_matrix(student, teacher, ws, wt, remove_spaces=False, zero_cost_markers=())
    assert kept[0, 0] == 1 * 3 * 3 and kept[2, 3] == levenshtein(b"</s>", b"<|im_end|>") * 5 * 5


def test_dtw_token_strings_use_literals_for_specials():
    surfaces = [None, b" the", b"ing"]
    assert dtw_token_strings([1, 2, 0], surfaces, ["</s>", "▁the", "ing"]) == [b" the", b"ing", b"</s>"]
    assert dtw_token_strings([0], surfaces) == [b""]
    assert b"</s>" in EOS_MARKERS and b"<|im_end|>" in EOS_MARKERS


# --------------------------------------------------------------------------------- DTW


def _monotone_paths(n: int, m: int):
    """Every path from (0, 0) to (n-1, m-1) with steps (1, 0), (0, 1), (1, 1)."""
    def extend(path):
        i, j = path[-1]
        if (i, j) == (n - 1, m - 1):
            yield list(path)
            return
        for di, dj in ((1, 1), (1, 0), (0, 1)):
            if i + di < n and j + dj < m:
                path.append((i + di, j + dj))
                yield from extend(path)
                path.pop()
    yield from extend([(0, 0)])


def test_dtw_equals_brute_force_over_all_monotone_paths():
    generator = np.random.default_rng(5)
    checked = 0
    for n, m in itertools.product(range(1, 7), repeat=2):
        cost = generator.random((n, m)) * 10
        best_path, best_cost = None, math.inf
        for path in _monotone_paths(n, m):
            total = sum(cost[i, j] for i, j in path)
            if total < best_cost:
                best_path, best_cost = path, total
        table = dtw_table(cost)
        assert table[-1, -1] == pytest.approx(best_cost, rel=1e-12, abs=1e-12)
        path = dtw_backtrack(table)
        assert path == best_path  # random float costs: the optimum is unique
        checked += 1
    assert checked == 36


def _copy_style_dtw(cost_st: np.ndarray, prefer_teacher: bool = True) -> list[tuple[int, int]]:
    """Double loop on the [teacher, student] table, argmin over (diagonal, up, left), as the copies."""
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
        diagonal = matrix[i - 1, j - 1] if i > 0 and j > 0 else np.inf
        up = matrix[i - 1, j] if i > 0 else np.inf  # back along the teacher
        left = matrix[i, j - 1] if j > 0 else np.inf  # back along the student
        options = [diagonal, up, left] if prefer_teacher else [diagonal, left, up]
        move = int(np.argmin(options))
        if move == 0:
            i, j = i - 1, j - 1
        elif (move == 1) == prefer_teacher:
            i -= 1
        else:
            j -= 1
        path.append((j, i))
    path.reverse()
    return path


def test_dtw_tie_break_is_the_copies():
    generator = np.random.default_rng(2)
    differs = 0
    for _ in range(300):
        cost = generator.integers(0, 3, size=(generator.integers(1, 8), generator.integers(1, 8))).astype(float)
        ours = dtw_backtrack(dtw_table(cost))
        assert ours == _copy_style_dtw(cost)
        differs += ours != _copy_style_dtw(cost, prefer_teacher=False)
    assert differs > 0  # the tie rule is exercised: the other order gives other paths


def test_weighted_dtw_hand_case():
    student = [b"Hello", b" world"]
    teacher = [b"Hel", b"lo", b" wor", b"ld"]
    alignment = weighted_dtw(student, teacher, [3, 3], [3, 3, 3, 3])
    assert alignment.path == [(0, 0), (0, 1), (1, 2), (1, 3)]
    assert alignment.student_to_teacher == [[0, 1], [2, 3]]
    assert alignment.teacher_to_student == [[0], [0], [1], [1]]
    assert alignment.cost == (2 + 3 + 2 + 3) * 9  # ED(Hello, Hel)=2, (Hello, lo)=3, (world, wor)=2, (world, ld)=3
    assert weighted_dtw([], teacher, [], [3] * 4).path == []


def test_weights_change_the_path():
    # Teacher "ab" costs one edit against either student "a". With equal weights both paths cost 9 and
    # the tie goes to the teacher step back (it joins student 0); a heavier (more uncertain) student 0
    # makes that pair cost 1 * 5 * 3 = 15, so "ab" moves to student 1 (1 * 3 * 3 = 9).
    student, teacher = [b"a", b"a"], [b"a", b"ab", b"a"]
    flat = weighted_dtw(student, teacher, [3, 3], [3, 3, 3])
    heavy = weighted_dtw(student, teacher, [5, 3], [3, 3, 3])
    assert flat.path == [(0, 0), (0, 1), (1, 2)] and flat.cost == 9
    assert heavy.path == [(0, 0), (1, 1), (1, 2)] and heavy.cost == 9
    for alignment, ws in ((flat, [3, 3]), (heavy, [5, 3])):
        cost = weighted_cost_matrix(student, teacher, ws, [3, 3, 3])
        assert alignment.cost == min(sum(cost[i, j] for i, j in p) for p in _monotone_paths(2, 3))


# ------------------------------------------------------------------------------ groups


STAIRCASE = [(0, 0), (1, 0), (1, 1), (1, 2), (2, 2), (2, 3)]  # (student, teacher)


def _dense(groups, side: str, rows: int) -> np.ndarray:
    g = getattr(groups, f"{side}_group").numpy()
    r = getattr(groups, f"{side}_row").numpy()
    w = getattr(groups, f"{side}_weight").numpy()
    out = np.zeros((groups.num_groups, rows))
    np.add.at(out, (g, r), w)
    return out


def test_groups_teacher_lists_by_hand():
    groups = cdm_groups(alignment_from_path(STAIRCASE, 3, 4))
    assert groups.num_groups == 4 and groups.student_tokens == 3  # more groups than student tokens
    np.testing.assert_allclose(_dense(groups, "student", 3), [[.5, .5, 0], [0, 1, 0], [0, .5, .5], [0, 0, 1]])
    np.testing.assert_allclose(_dense(groups, "teacher", 4), [
        [2 / 3, 1 / 6, 1 / 6, 0],
        [1 / 3, 1 / 3, 1 / 3, 0],
        [1 / 6, 1 / 6, 5 / 12, 1 / 4],
        [0, 0, 1 / 2, 1 / 2],
    ])


def test_group_weights_equal_the_copies_two_stage_means():
    generator = np.random.default_rng(0)
    paths = [STAIRCASE, [(0, 0), (1, 1), (1, 2), (2, 3), (3, 3), (4, 4)], [(0, 0), (0, 1), (0, 2), (1, 3)]]
    for path in paths:
        rs, rt = path[-1][0] + 1, path[-1][1] + 1
        alignment = alignment_from_path(path, rs, rt)
        zs, zt = generator.normal(size=(rs, 6)), generator.normal(size=(rt, 5))
        # the copies: per student the mean of its teachers' rows, then per distinct teacher list the means
        per_student = np.stack([zt[alignment.student_to_teacher[s]].mean(0) for s in range(rs)])
        lists = []
        for students in alignment.teacher_to_student:
            if students not in lists:
                lists.append(students)
        groups = cdm_groups(alignment)
        np.testing.assert_allclose(_dense(groups, "teacher", rt) @ zt, np.stack([per_student[g].mean(0) for g in lists]))
        np.testing.assert_allclose(_dense(groups, "student", rs) @ zs, np.stack([zs[g].mean(0) for g in lists]))
        assert (np.diff(groups.student_group.numpy()) >= 0).all()


def test_groups_components_partition_the_student_tokens():
    groups = cdm_groups(alignment_from_path([(0, 0), (1, 1), (1, 2), (2, 3)], 3, 4), merge="components")
    np.testing.assert_allclose(_dense(groups, "student", 3), np.eye(3))
    np.testing.assert_allclose(_dense(groups, "teacher", 4), [[1, 0, 0, 0], [0, .5, .5, 0], [0, 0, 0, 1]])
    staircase = cdm_groups(alignment_from_path(STAIRCASE, 3, 4), merge="components")
    assert staircase.num_groups == 1  # no diagonal step: one component
    np.testing.assert_allclose(_dense(staircase, "student", 3), [[1 / 3] * 3])
    with pytest.raises(ValueError):
        cdm_groups(alignment_from_path(STAIRCASE, 3, 4), merge="union")


def test_pack_cdm_groups_offsets_and_rows():
    first = cdm_groups(alignment_from_path([(0, 0), (0, 1), (1, 2)], 2, 3))  # groups [0], [1]
    second = cdm_groups(alignment_from_path(STAIRCASE, 3, 4))  # 4 groups
    packed = pack_cdm_groups([first, second], [[10, 11], [20, 21, 22]], [[0, 1, 2], [3, 4, 5, 6]])
    assert packed.num_groups == 6 and packed.student_tokens == 5
    assert packed.student_group.tolist() == first.student_group.tolist() + (second.student_group + 2).tolist()
    assert packed.student_row.tolist() == [10, 11] + [20 + r for r in second.student_row.tolist()]
    assert packed.teacher_row.tolist() == [0, 1, 2] + [3 + r for r in second.teacher_row.tolist()]
    with pytest.raises(ValueError):
        pack_cdm_groups([first], [[1, 2, 3]], [[0, 1, 2]])


def test_cdm_align_runs_the_whole_chain():
    student = [b" The", b" cat", b"s", b"</s>"]
    teacher = [b" The", b" ca", b"ts", b"<|im_end|>"]
    groups = cdm_align(student, teacher, [0.1, 2.0, 1.0, 0.5], [1.0, 1.0, 1.0, 1.0])
    expected = cdm_groups(weighted_dtw(student, teacher, entropy_weights([0.1, 2.0, 1.0, 0.5]), [3, 3, 3, 3]))
    for got, want in zip(groups[:6], expected[:6]):
        assert torch.equal(got, want)
    assert groups.num_groups == 4  # 1:1 everywhere, the EOS markers paired at zero cost
