"""The ``dtw`` rule (MinED): edit distances, the warping path, 1:1 matches, the vocabulary map."""

from __future__ import annotations

import random

import numpy as np
import pytest

from data_fixtures import sp_bpe, unigram
from mlot_ds.pairing import dtw_pairs, mined_vocab_map
from mlot_ds.pairing import vocab_map as vocab_map_module
from mlot_ds.pairing.dtw import dtw_path, string_edit_distances
from mlot_ds.pairing.vocab_map import bit_parallel_distances
from mlot_ds.pairing.surface import token_surface_bytes


def levenshtein(a: bytes, b: bytes) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        previous, row[0] = row[:], i
        for j, y in enumerate(b, 1):
            row[j] = min(previous[j] + 1, row[j - 1] + 1, previous[j - 1] + (x != y))
    return row[-1]


def test_edit_distances_match_the_textbook_table():
    generator = random.Random(3)
    a = [bytes(generator.choice(b"abc\xe4") for _ in range(generator.randint(0, 7))) for _ in range(25)]
    b = [bytes(generator.choice(b"abcd") for _ in range(generator.randint(0, 9))) for _ in range(30)]
    table = string_edit_distances(a, b)
    expected = np.array([[levenshtein(x, y) for y in b] for x in a])
    np.testing.assert_array_equal(table, expected)


@pytest.mark.parametrize("query_length", [1, 2, 7, 33, 64])
@pytest.mark.parametrize("candidate_length", [1, 4, 9, 70])
def test_bit_parallel_distances_match_the_textbook_table(query_length, candidate_length):
    generator = random.Random(query_length * 100 + candidate_length)
    queries = [bytes(generator.choice(b"abc\xe4\xff") for _ in range(query_length)) for _ in range(6)]
    candidates = [bytes(generator.choice(b"abcd\xe4") for _ in range(candidate_length)) for _ in range(8)]
    table = bit_parallel_distances(np.frombuffer(b"".join(queries), np.uint8).reshape(6, query_length),
                                   np.frombuffer(b"".join(candidates), np.uint8).reshape(8, candidate_length))
    np.testing.assert_array_equal(table, [[levenshtein(q, c) for c in candidates] for q in queries])


def test_edit_distance_hand_cases():
    # kitten -> sitting: k/s, e/i, +g; kitten -> the: drop k, i, n and t/h; " the" -> sitting:
    # " "/s, +i, t, h/t, e/i, +n, +g
    table = string_edit_distances([b"kitten", b"", b" the"], [b"sitting", b"the", b""])
    np.testing.assert_array_equal(table, [[3, 4, 6], [7, 3, 0], [6, 1, 4]])


def _dtw_cost_by_recursion(cost: np.ndarray) -> float:
    n, m = cost.shape
    table = np.full((n + 1, m + 1), np.inf)
    table[0, 0] = 0.0
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            table[i, j] = cost[i - 1, j - 1] + min(table[i - 1, j], table[i, j - 1], table[i - 1, j - 1])
    return float(table[n, m])


def test_dtw_path_is_optimal_and_monotone():
    generator = np.random.default_rng(0)
    for _ in range(40):
        cost = generator.random((generator.integers(1, 10), generator.integers(1, 10)))
        path = dtw_path(cost)
        assert path[0] == (0, 0) and path[-1] == (cost.shape[0] - 1, cost.shape[1] - 1)
        for (i, j), (k, l) in zip(path, path[1:]):
            assert (k - i, l - j) in {(1, 1), (1, 0), (0, 1)}
        assert sum(cost[i, j] for i, j in path) == pytest.approx(_dtw_cost_by_recursion(cost))


def test_dtw_pairs_keep_only_one_to_one_matches():
    student = [b"Hello", b" world", b"!"]
    teacher = [b"Hel", b"lo", b" world", b"!"]
    assert dtw_pairs(student, teacher) == [(1, 2), (2, 3)]  # "Hello" matches two tokens: left out
    assert dtw_pairs(student, student) == [(0, 0), (1, 1), (2, 2)]
    assert dtw_pairs([], teacher) == []


def _reference_map(student, teacher) -> dict[int, int]:
    """Brute force over all pairs (float64-free integer loop): text tokens only."""
    student_surfaces, teacher_surfaces = token_surface_bytes(student), token_surface_bytes(teacher)
    candidates = [(s, i) for i, s in enumerate(teacher_surfaces) if s is not None]
    expected = {}
    for student_id, surface in enumerate(student_surfaces):
        if surface is None:
            continue
        expected[student_id] = min(
            candidates, key=lambda c: (levenshtein(surface, c[0]), abs(len(surface) - len(c[0])), c[1])
        )[1]
    return expected


@pytest.mark.parametrize("direction", ["sp_to_unigram", "unigram_to_sp"])
def test_vocab_map_equals_brute_force(direction):
    student, teacher = (sp_bpe(), unigram()) if direction == "sp_to_unigram" else (unigram(), sp_bpe())
    mapping = mined_vocab_map(student, teacher, progress=False, table_budget=5_000)
    assert mapping.shape == (len(student),)
    expected = _reference_map(student, teacher)
    got = {i: int(mapping[i]) for i in expected}
    assert got == expected
    # the map exercised every stage: exact, distance 1 and the far search
    surfaces_s, surfaces_t = token_surface_bytes(student), token_surface_bytes(teacher)
    distances = {levenshtein(surfaces_s[i], surfaces_t[t]) for i, t in expected.items()}
    assert {0, 1} <= distances and max(distances) >= 2


def test_vocab_map_special_tokens_by_role_and_always_valid():
    student, teacher = sp_bpe(), unigram()
    mapping = mined_vocab_map(student, teacher, progress=False)
    assert int(mapping[student.eos_token_id]) == teacher.eos_token_id
    assert int(mapping[student.bos_token_id]) == teacher.bos_token_id
    assert int(mapping[student.unk_token_id]) == teacher.unk_token_id
    assert int(mapping.min()) >= 0 and int(mapping.max()) < len(teacher)


def test_vocab_map_is_cached_on_disk(tmp_path, monkeypatch):
    student, teacher = unigram(), sp_bpe()
    first = mined_vocab_map(student, teacher, tmp_path, progress=False)
    files = list(tmp_path.glob("mined-*.pt"))
    assert len(files) == 1

    def must_not_run(*args, **kwargs):
        raise AssertionError("the cached map should have been loaded")

    monkeypatch.setattr(vocab_map_module, "_compute_map", must_not_run)
    second = mined_vocab_map(student, teacher, tmp_path, progress=False)
    assert second.tolist() == first.tolist()
    # the other direction is a different map, under a different name
    monkeypatch.undo()
    mined_vocab_map(teacher, student, tmp_path, progress=False)
    assert len(list(tmp_path.glob("mined-*.pt"))) == 2
