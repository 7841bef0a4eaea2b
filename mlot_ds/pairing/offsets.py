"""The ``offsets`` rule: pair the two tokenizations wherever they cut the response text alike.

Each side's response tokens come with byte spans that partition ``response.encode("utf-8")``
(see :mod:`mlot_ds.data.offsets`). A *cut* is a byte position where one token ends and the next
begins. Walking both sides, a group closes at every cut the two sides share, so a group holds
1..N student tokens and 1..M teacher tokens that spell exactly the same bytes.

The loss gets one pair per group: the group's *first* token on each side, predicted from the
logit row just before the group. Both rows condition on the same text (everything before the
group) and predict the start of the same text, so the two distributions describe the same event
seen through two vocabularies. Later tokens of a group are not distilled: their predictions
condition on partial text that has no counterpart on the other side. (TRL's GOLD multiplies the
later tokens' probabilities into the first row; we keep the plain first-token distribution, which
is what MultiLevelOT's ranking and Sinkhorn terms expect: a probability vector.)

Byte positions (not characters) make the rule exact on multi-byte characters: two byte-level
tokenizers that both split ``世`` after its second byte share that cut. (When the same tokenizer is
on both sides, the data pipeline pairs the identical token sequences one to one without calling
this rule, so ``offsets`` equals ``position`` there even where spans are only per character.)
"""

from __future__ import annotations

from bisect import bisect_left
from typing import NamedTuple, Sequence

Span = tuple[int, int]


class OffsetGroup(NamedTuple):
    """One aligned group: token indices (into each side's response tokens) and its byte span."""

    student_tokens: range
    teacher_tokens: range
    start: int
    end: int


def _cuts(spans: Sequence[Span], side: str) -> list[int]:
    """Byte positions where a token of this side ends and the next one starts."""
    if not spans:
        raise ValueError(f"{side} spans are empty: a response has at least one token")
    if spans[0][0] != 0:
        raise ValueError(f"{side} spans must start at byte 0, got {tuple(spans[0])}")
    cuts = []
    for index, (start, end) in enumerate(spans):
        if end < start:
            raise ValueError(f"{side} span {index} is reversed: {(start, end)}")
        following = spans[index + 1][0] if index + 1 < len(spans) else None
        if following is None or following >= end:
            if following is not None and following != end:
                raise ValueError(f"{side} spans leave a gap at token {index}: {(start, end)} then {following}")
            cuts.append(end)
    return cuts


def offset_groups(student_spans: Sequence[Span], teacher_spans: Sequence[Span]) -> list[OffsetGroup]:
    """Group both sides' response tokens at their shared byte cuts.

    Args:
        student_spans: ``[(start, end)]`` byte span of each student response token; together a
            partition of the response bytes (tokens inside one character share that span).
        teacher_spans: the same for the teacher, over the same response.

    Returns:
        The groups in text order; concatenating their ``[start, end)`` byte ranges gives the whole
        response, and each group has at least one token on each side.
    """
    student_cuts = _cuts(student_spans, "student")
    teacher_cuts = _cuts(teacher_spans, "teacher")
    if student_cuts[-1] != teacher_cuts[-1]:
        raise ValueError(
            f"student spans cover {student_cuts[-1]} bytes but teacher spans cover {teacher_cuts[-1]}: "
            "they do not describe the same response"
        )
    shared = sorted(set(student_cuts) & set(teacher_cuts))
    student_group = [bisect_left(shared, end) for _, end in student_spans]
    teacher_group = [bisect_left(shared, end) for _, end in teacher_spans]
    groups = []
    s_first = t_first = 0
    for index, end in enumerate(shared):
        s_last = s_first
        while s_last < len(student_group) and student_group[s_last] == index:
            s_last += 1
        t_last = t_first
        while t_last < len(teacher_group) and teacher_group[t_last] == index:
            t_last += 1
        start = shared[index - 1] if index else 0
        groups.append(OffsetGroup(range(s_first, s_last), range(t_first, t_last), start, end))
        s_first, t_first = s_last, t_last
    return groups


def offsets_pairs(student_spans: Sequence[Span], teacher_spans: Sequence[Span]) -> list[tuple[int, int]]:
    """``(student token, teacher token)`` response-token indices: the first token of each group."""
    return [(g.student_tokens[0], g.teacher_tokens[0]) for g in offset_groups(student_spans, teacher_spans)]
