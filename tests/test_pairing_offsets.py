"""The ``offsets`` rule and the byte spans it works on, across real tokenizer kinds."""

from __future__ import annotations

import itertools

import pytest
import torch
from data_fixtures import BUILDERS, LOSSLESS, UNICODE_SAMPLES

from mlot_ds.data.offsets import _partition_from_char_offsets, response_spans, spans_by_decoding
from mlot_ds.pairing import offset_groups, offsets_pairs, position_pairing
from mlot_ds.pairing.surface import token_surface_bytes_cached

TEXTS = UNICODE_SAMPLES
KINDS = list(BUILDERS)


@pytest.fixture(scope="module", params=KINDS)
def tokenizer(request):
    return BUILDERS[request.param]()


def _spans(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    spans, method = response_spans(tokenizer, text, ids)
    return ids, spans, method


def _assert_partition(spans, text):
    total = len(text.encode("utf-8"))
    assert spans[0][0] == 0 and spans[-1][1] == total
    for (start, end), (next_start, next_end) in zip(spans, spans[1:]):
        assert start <= end
        # either a clean cut, or both tokens inside the same character span
        assert next_start == end or (next_start, next_end) == (start, end)


@pytest.mark.parametrize("text", TEXTS)
def test_spans_partition_the_response_bytes(tokenizer, text):
    ids, spans, method = _spans(tokenizer, text)
    assert len(spans) == len(ids)
    _assert_partition(spans, text)


@pytest.mark.parametrize("kind", LOSSLESS)
@pytest.mark.parametrize("text", TEXTS)
def test_surface_spans_hold_each_tokens_own_bytes(kind, text):
    """For tokenizers that spell the text, a token's span is exactly its surface bytes."""
    tokenizer = BUILDERS[kind]()
    ids, spans, method = _spans(tokenizer, text)
    if tokenizer.decode(ids, clean_up_tokenization_spaces=False) != text:
        # GPT-SW3's slow tokenizer rewrites tabs and runs of spaces before encoding
        assert (kind, method) == ("sp_slow", "decoding") and "\t" in text
        return
    assert method == "surface"
    surfaces = token_surface_bytes_cached(tokenizer)
    data = text.encode("utf-8")
    for position, (token_id, (start, end)) in enumerate(zip(ids, spans)):
        surface = surfaces[token_id]
        if position == 0 and surface.startswith(b" ") and not data.startswith(b" "):
            surface = surface[1:]  # the SentencePiece dummy prefix has no text
        assert data[start:end] == surface


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_decoding_agrees_with_surface_spans_at_character_cuts(text):
    """The slow-tokenizer path cuts where the exact spans cut, except inside a character."""
    from data_fixtures import sp_slow

    tokenizer = sp_slow()
    ids = tokenizer.encode(text, add_special_tokens=False)
    exact, _ = response_spans(tokenizer, text, ids)
    decoded = spans_by_decoding(tokenizer, text, ids)
    _assert_partition(decoded, text)
    boundaries = {0}
    position = 0
    for character in text:
        position += len(character.encode("utf-8"))
        boundaries.add(position)
    assert _cuts(decoded) == {c for c in _cuts(exact) if c in boundaries}


def _cuts(spans):
    """Byte positions > 0 where one token ends and the next starts (or the text ends)."""
    following = [start for start, _ in spans[1:]] + [spans[-1][1]]
    return {end for (_, end), nxt in zip(spans, following) if nxt >= end and end > 0}


def test_char_offsets_become_a_partition_hand_case():
    # "a世 b": tokens 'a', two halves of 世 (both report the character), ' b' trimmed to 'b'.
    text = "a世 b"
    offsets = [(0, 1), (1, 2), (1, 2), (3, 4)]
    assert _partition_from_char_offsets(offsets, text) == [(0, 1), (1, 4), (1, 4), (4, 6)]


def test_groups_hand_computed():
    # "Hello world": student "Hel|lo| world", teacher "Hello| wor|ld"
    student = [(0, 3), (3, 5), (5, 11)]
    teacher = [(0, 5), (5, 9), (9, 11)]
    groups = offset_groups(student, teacher)
    assert [(list(g.student_tokens), list(g.teacher_tokens), g.start, g.end) for g in groups] == [
        ([0, 1], [0], 0, 5),
        ([2], [1, 2], 5, 11),
    ]
    assert offsets_pairs(student, teacher) == [(0, 0), (2, 1)]


def test_groups_reject_spans_of_different_texts():
    with pytest.raises(ValueError, match="same response"):
        offset_groups([(0, 3)], [(0, 4)])
    with pytest.raises(ValueError, match="start at byte 0"):
        offset_groups([(1, 3)], [(0, 3)])


@pytest.mark.parametrize("student_kind,teacher_kind", list(itertools.permutations(KINDS, 2)))
def test_every_group_covers_the_same_text_on_both_sides(student_kind, teacher_kind):
    student, teacher = BUILDERS[student_kind](), BUILDERS[teacher_kind]()
    for text in TEXTS:
        _, student_spans, _ = _spans(student, text)
        _, teacher_spans, _ = _spans(teacher, text)
        groups = offset_groups(student_spans, teacher_spans)
        data = text.encode("utf-8")
        assert b"".join(data[g.start : g.end] for g in groups) == data
        for group in groups:
            assert len(group.student_tokens) >= 1 and len(group.teacher_tokens) >= 1
            for spans, tokens in ((student_spans, group.student_tokens), (teacher_spans, group.teacher_tokens)):
                assert spans[tokens[0]][0] == group.start or spans[tokens[0]][0] < group.start == 0
                assert spans[tokens[-1]][1] == group.end
        # the groups use every token exactly once, in order
        assert [i for g in groups for i in g.student_tokens] == list(range(len(student_spans)))
        assert [i for g in groups for i in g.teacher_tokens] == list(range(len(teacher_spans)))


@pytest.mark.parametrize("kind", LOSSLESS)
def test_identical_tokenizers_offsets_equal_position(kind):
    """Same tokenizer on both sides (different prompts): the two rules give the same pairs.

    (Exact byte spans are needed for that; the pipeline also pairs identical token sequences of
    one tokenizer directly, see test_data_pipeline.)"""
    tokenizer = BUILDERS[kind]()
    for text in TEXTS:
        ids, spans, method = _spans(tokenizer, text)
        if method != "surface":
            continue
        pairs = offsets_pairs(spans, spans)
        student_prompt, teacher_prompt = 3, 7
        student_labels = torch.tensor([[-100] * student_prompt + ids])
        teacher_labels = torch.tensor([[-100] * teacher_prompt + ids])
        by_position = position_pairing(student_labels, teacher_labels)
        rows = [(student_prompt + s - 1, teacher_prompt + t - 1) for s, t in pairs]
        assert rows == list(zip(by_position.student_index[0].tolist(), by_position.teacher_index[0].tolist()))


def test_multibyte_split_at_the_same_byte_is_shared():
    # Two byte-level sides that both split a 3-byte character after its second byte pair there.
    student = [(0, 2), (2, 3)]
    teacher = [(0, 2), (2, 3)]
    assert offsets_pairs(student, teacher) == [(0, 0), (1, 1)]
    # One side keeps the character whole: the halves form one group with it.
    assert offsets_pairs(student, [(0, 3)]) == [(0, 0)]
