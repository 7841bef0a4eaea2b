"""Token-level overlaps (VocAgnoLM's lexical alignment): two-pointer pass vs brute force, and coverage."""

from __future__ import annotations

import random

import pytest
from data_fixtures import BUILDERS, UNICODE_SAMPLES

from mlot_ds.data.offsets import response_spans
from mlot_ds.pairing.overlaps import token_overlaps


def brute_force(student_spans, teacher_spans):
    """O(N M): every pair tested on its own, with the rule c < b and a < d."""
    ranges = []
    for a, b in student_spans:
        hits = [j for j, (c, d) in enumerate(teacher_spans) if c < b and a < d]
        if hits:
            assert hits == list(range(hits[0], hits[-1] + 1))  # contiguous
            ranges.append((hits[0], hits[-1] + 1))
        else:
            ranges.append(None)
    return ranges


def random_segmentation(characters: list[int], rng: random.Random, zero_length: bool) -> list[tuple[int, int]]:
    """Spans over a text whose characters have the given byte lengths.

    Cuts fall at random byte positions; a token that ends inside a character shares that
    character's span with the next ones (as the offsets layer does) unless the cut is exact.
    """
    starts = [0]
    for length in characters:
        starts.append(starts[-1] + length)
    total = starts[-1]
    spans = []
    position = 0
    while position < total:
        char = max(i for i, s in enumerate(starts[:-1]) if s <= position)
        if characters[char] > 1 and rng.random() < 0.4:
            # several tokens inside one multi-byte character share its span
            start, end = starts[char], starts[char + 1]
            spans.extend([(start, end)] * rng.randint(2, 3))
            position = end
            continue
        end = min(total, position + rng.randint(1, 4))
        # round the end up to the next character boundary (cuts between characters)
        end = min(s for s in starts if s >= end)
        spans.append((position, end))
        if zero_length and rng.random() < 0.15:
            spans.append((end, end))  # an empty token at a cut
        position = end
    return spans


@pytest.mark.parametrize("seed", range(60))
def test_two_pointer_equals_brute_force_and_covers_every_byte(seed):
    rng = random.Random(seed)
    characters = [rng.choice([1, 1, 1, 2, 3, 4]) for _ in range(rng.randint(1, 25))]
    student = random_segmentation(characters, rng, zero_length=seed % 2 == 0)
    teacher = random_segmentation(characters, rng, zero_length=seed % 3 == 0)
    got = token_overlaps(student, teacher)
    want = brute_force(student, teacher)
    assert len(got) == len(student)
    for (lo, hi), expected in zip(got, want):
        if expected is None:
            assert lo == hi
        else:
            assert (lo, hi) == expected
    for (a, b), (lo, hi) in zip(student, got):  # coverage (IoS = 1)
        covered = set()
        for c, d in teacher[lo:hi]:
            covered.update(range(c, d))
        assert set(range(a, b)) <= covered
        if b > a:
            assert hi > lo  # every non-empty student token is mapped


def test_hand_examples():
    # "Hello world": student "Hel" "lo" " world", teacher "Hello" " wor" "ld"
    student = [(0, 3), (3, 5), (5, 11)]
    teacher = [(0, 5), (5, 9), (9, 11)]
    assert token_overlaps(student, teacher) == [(0, 1), (0, 1), (1, 3)]
    # a 3-byte character split by the student into two tokens that share its span
    assert token_overlaps([(0, 1), (1, 4), (1, 4)], [(0, 2), (2, 4)]) == [(0, 1), (0, 2), (0, 2)]
    # a zero-length student span at a shared cut is unmapped; inside a teacher token it is mapped
    assert token_overlaps([(0, 2), (2, 2), (2, 4)], [(0, 2), (2, 4)]) == [(0, 1), (1, 1), (1, 2)]
    assert token_overlaps([(0, 1), (1, 1), (1, 4)], [(0, 4)]) == [(0, 1), (0, 1), (0, 1)]


def test_rejects_spans_out_of_order():
    with pytest.raises(ValueError):
        token_overlaps([(0, 3), (1, 2)], [(0, 3)])
    with pytest.raises(ValueError):
        token_overlaps([(0, 3)], [(2, 1)])


@pytest.mark.parametrize("pair", [("sp_bpe", "unigram"), ("gpt2", "sp_bpe"), ("unigram", "wordpiece")])
@pytest.mark.parametrize("text", UNICODE_SAMPLES)
def test_real_tokenizers(pair, text):
    spans = []
    for name in pair:
        tokenizer = BUILDERS[name]()
        ids = tokenizer.encode(text, add_special_tokens=False)
        spans.append(response_spans(tokenizer, text, ids)[0])
    student, teacher = spans
    got = token_overlaps(student, teacher)
    assert [None if lo == hi else (lo, hi) for lo, hi in got] == brute_force(student, teacher)
    assert all(hi > lo for (a, b), (lo, hi) in zip(student, got) if b > a)
