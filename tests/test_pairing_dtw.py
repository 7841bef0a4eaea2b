"""The ``dtw`` rule (MinED): edit distances, the warping path, 1:1 matches, the vocabulary map."""

from __future__ import annotations

import random

import numpy as np
import pytest
from data_fixtures import BUILDERS, UNICODE_SAMPLES, corpus, sp_bpe, unigram

from mlot_ds.pairing import dtw_pairs, mined_vocab_map
from mlot_ds.pairing import vocab_map as vocab_map_module
from mlot_ds.pairing.dtw import dtw_path, string_edit_distances, token_edit_distances
from mlot_ds.pairing.surface import token_surface_bytes
from mlot_ds.pairing.vocab_map import bit_parallel_distances


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


BACKENDS = ["rapidfuzz", "numpy"]


def _random_strings(generator: random.Random, count: int, longest: int, alphabet: bytes) -> list[bytes]:
    return [bytes(generator.choice(alphabet) for _ in range(generator.randint(0, longest))) for _ in range(count)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_both_backends_match_the_textbook_table(backend):
    generator = random.Random(11)
    alphabet = bytes([0, 32, 97, 98, 99, 0xC3, 0xA4, 0xFF])  # NUL, space, letters, UTF-8 and non-UTF-8 bytes
    a = _random_strings(generator, 20, 90, alphabet) + [b"", b"a" * 65, bytes(range(256))]
    b = _random_strings(generator, 24, 80, alphabet) + [b"", b"a" * 64, bytes(range(255, -1, -1))]
    assert any(len(x) > 64 for x in a) and any(len(y) > 64 for y in b)
    table = token_edit_distances(a, b, backend=backend)
    assert table.dtype == np.int32 and table.shape == (len(a), len(b))
    np.testing.assert_array_equal(table, [[levenshtein(x, y) for y in b] for x in a])
    np.testing.assert_array_equal(token_edit_distances(b, a, backend=backend), table.T)
    assert token_edit_distances([], b, backend=backend).shape == (0, len(b))
    assert token_edit_distances(a, [], backend=backend).shape == (len(a), 0)


def test_rapidfuzz_workers_do_not_change_the_table():
    generator = random.Random(12)
    a, b = _random_strings(generator, 40, 30, b"abcd "), _random_strings(generator, 50, 30, b"abcd ")
    np.testing.assert_array_equal(token_edit_distances(a, b, workers=2), token_edit_distances(a, b, workers=1))


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="backend"):
        token_edit_distances([b"a"], [b"b"], backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        dtw_pairs([b"a"], [b"b"], backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        mined_vocab_map(sp_bpe(), unigram(), progress=False, backend="cuda")


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
        for (i, j), (i_next, j_next) in zip(path, path[1:]):
            assert (i_next - i, j_next - j) in {(1, 1), (1, 0), (0, 1)}
        assert sum(cost[i, j] for i, j in path) == pytest.approx(_dtw_cost_by_recursion(cost))


@pytest.mark.parametrize("backend", BACKENDS)
def test_dtw_pairs_keep_only_one_to_one_matches(backend):
    student = [b"Hello", b" world", b"!"]
    teacher = [b"Hel", b"lo", b" world", b"!"]
    assert dtw_pairs(student, teacher, backend=backend) == [(1, 2), (2, 3)]  # "Hello" matches two tokens: left out
    assert dtw_pairs(student, student, backend=backend) == [(0, 0), (1, 1), (2, 2)]
    assert dtw_pairs([], teacher, backend=backend) == []


def _surfaces_of(tokenizer, surfaces: list[bytes | None], text: str) -> list[bytes]:
    ids = tokenizer.encode(text, add_special_tokens=False)
    return [surfaces[i] if surfaces[i] is not None else b"" for i in ids]


@pytest.mark.parametrize("student_name,teacher_name", [("sp_bpe", "unigram"), ("unigram", "wordpiece"),
                                                       ("wordpiece", "sp_bpe"), ("gpt2", "unigram")])
def test_dtw_pairs_same_with_both_backends(student_name, teacher_name):
    student, teacher = BUILDERS[student_name](), BUILDERS[teacher_name]()
    texts = UNICODE_SAMPLES + corpus(lines=30, seed=5) + [" ".join(corpus(lines=40, seed=6))]
    student_surfaces, teacher_surfaces = token_surface_bytes(student), token_surface_bytes(teacher)
    compared = 0
    for text in texts:
        a, b = _surfaces_of(student, student_surfaces, text), _surfaces_of(teacher, teacher_surfaces, text)
        fast, numpy_pairs = dtw_pairs(a, b), dtw_pairs(a, b, backend="numpy")
        assert fast == numpy_pairs, text
        compared += len(fast)
    assert compared > 200
    generator = random.Random(7)  # random sequences: many ties in the cost matrix
    for _ in range(30):
        a = _random_strings(generator, generator.randint(1, 12), 6, b"ab ")
        b = _random_strings(generator, generator.randint(1, 12), 6, b"ab ")
        assert dtw_pairs(a, b) == dtw_pairs(a, b, backend="numpy")


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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direction", ["sp_to_unigram", "unigram_to_sp"])
def test_vocab_map_equals_brute_force(direction, backend):
    student, teacher = (sp_bpe(), unigram()) if direction == "sp_to_unigram" else (unigram(), sp_bpe())
    mapping = mined_vocab_map(student, teacher, progress=False, table_budget=5_000, backend=backend)
    assert mapping.shape == (len(student),)
    expected = _reference_map(student, teacher)
    got = {i: int(mapping[i]) for i in expected}
    assert got == expected
    # the map exercised every stage: exact, distance 1 and the far search
    surfaces_s, surfaces_t = token_surface_bytes(student), token_surface_bytes(teacher)
    distances = {levenshtein(surfaces_s[i], surfaces_t[t]) for i, t in expected.items()}
    assert {0, 1} <= distances and max(distances) >= 2


FIXTURES = ["sp_bpe", "unigram", "wordpiece", "gpt2", "sp_slow"]


@pytest.mark.parametrize("teacher_name", FIXTURES)
@pytest.mark.parametrize("student_name", FIXTURES)
def test_vocab_map_same_with_both_backends(student_name, teacher_name, monkeypatch):
    student, teacher = BUILDERS[student_name](), BUILDERS[teacher_name]()
    far_search = vocab_map_module._search_far
    reached = []

    def counting(remaining, *args):
        reached.append(len(remaining))
        return far_search(remaining, *args)

    monkeypatch.setattr(vocab_map_module, "_search_far", counting)
    maps = {backend: mined_vocab_map(student, teacher, progress=False, backend=backend) for backend in BACKENDS}
    assert maps["rapidfuzz"].tolist() == maps["numpy"].tolist()
    assert maps["rapidfuzz"].shape == (len(student),)
    assert int(maps["rapidfuzz"].min()) >= 0 and int(maps["rapidfuzz"].max()) < len(teacher)
    assert len(reached) in (0, 2) and len(set(reached)) <= 1  # the far search ran on as many tokens with both, or never
    if student_name == "gpt2" and teacher_name != "gpt2":  # 50k tokens against a 300-token teacher
        assert reached[0] > 10_000
    # a small table budget (many chunks) changes nothing either
    small = mined_vocab_map(student, teacher, progress=False, table_budget=3_000)
    assert small.tolist() == maps["numpy"].tolist()


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
