"""Token-level overlaps between two tokenizations of the same text (VocAgnoLM's lexical alignment).

Each side's tokens carry byte spans ``[start, end)`` that partition the same UTF-8 text, in text
order (:mod:`mlot_ds.data.offsets`). Tokens that each hold part of one multi-byte character share
that character's span, so both the starts and the ends are non-decreasing along a side.

Student token ``i`` with span ``[a, b)`` overlaps teacher token ``j`` with span ``[c, d)`` iff

    c < b  and  a < d

which for non-empty spans is exactly "the intersection is non-empty". A shared character span is
non-empty, so every token sharing it overlaps whatever overlaps the character. For a zero-length
span ``(p, p)`` the same test reads "``p`` lies strictly inside the other span" (a cut inside a
character the other side keeps whole); a zero-length span at a cut both sides share overlaps
nothing, and its token is unmapped.

Because both bounds are monotone along each side, the overlapping teacher tokens of a student token
are one contiguous range ``[lo, hi)``: ``lo`` = number of teacher tokens with ``d <= a``, ``hi`` =
number with ``c < b``; both only move forward as ``i`` grows, so one pass is ``O(N + M)``
(VocAgnoLM's paper uses a binary search, ``O(N log M)``, for the same result). ``lo == hi`` marks an
unmapped token.
"""

from __future__ import annotations

from collections.abc import Sequence

Span = tuple[int, int]


def _check(spans: Sequence[Span], side: str) -> None:
    previous = (0, 0)
    for index, (start, end) in enumerate(spans):
        if start < 0 or end < start:
            raise ValueError(f"{side} span {index} is invalid: {(start, end)}")
        if start < previous[0] or end < previous[1]:
            raise ValueError(f"{side} spans are not in text order at token {index}: {previous} then {(start, end)}")
        previous = (start, end)


def token_overlaps(student_spans: Sequence[Span], teacher_spans: Sequence[Span]) -> list[tuple[int, int]]:
    """Teacher token range ``[lo, hi)`` overlapping each student token (``lo == hi``: unmapped).

    Args:
        student_spans: ``[(start, end)]`` byte span of each student token, in text order.
        teacher_spans: the same for the teacher, over the same text.

    Returns:
        One ``(lo, hi)`` per student token, indices into ``teacher_spans``.
    """
    _check(student_spans, "student")
    _check(teacher_spans, "teacher")
    count = len(teacher_spans)
    lo = hi = 0
    ranges = []
    for start, end in student_spans:
        while lo < count and teacher_spans[lo][1] <= start:
            lo += 1
        while hi < count and teacher_spans[hi][0] < end:
            hi += 1
        ranges.append((lo, hi) if hi > lo else (lo, lo))
    return ranges
