"""The ``dtw`` rule of MinED (Wan et al. 2024, FuseLLM; DSKD's ``min_edit_dis_kld``).

The two response token sequences are aligned by dynamic time warping whose local cost is the
Levenshtein distance between the tokens' normalised strings (their surface bytes, see
:mod:`mlot_ds.pairing.surface`, so ``▁the`` and ``Ġthe`` are the same string `` the``). The
warping path may match one token with several on the other side; only **1:1 matches** are kept
(a student token and a teacher token that the path matches with each other and nothing else),
as MinED does before it uses a teacher distribution. Tokens in many-to-one stretches are not
paired (MinED falls back to the one-hot target there, which our cross-entropy term already is).

The cost matrix comes from rapidfuzz's C++ Levenshtein (``backend="rapidfuzz"``, the default) or
from the vectorised numpy table below (``backend="numpy"``); both give the same integers. The DTW
recursion is vectorised with numpy; only the backtrack walks the path in Python (``n + m`` steps).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

try:
    from rapidfuzz import process as _rf_process
    from rapidfuzz.distance import Levenshtein as _rf_levenshtein
except ImportError:  # pragma: no cover - exercised only without rapidfuzz
    _rf_process = _rf_levenshtein = None

EDIT_DISTANCE_BACKENDS = ("rapidfuzz", "numpy")


def _pack(strings: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ``[n, L]`` uint8 codes and ``[n]`` lengths."""
    lengths = np.fromiter((len(s) for s in strings), dtype=np.int64, count=len(strings))
    width = int(lengths.max()) if len(strings) else 0
    codes = np.zeros((len(strings), max(width, 1)), dtype=np.uint8)
    for row, s in enumerate(strings):
        codes[row, : len(s)] = np.frombuffer(s, dtype=np.uint8)
    return codes, lengths


def edit_distances(
    a_codes: np.ndarray, a_lengths: np.ndarray, b_codes: np.ndarray, b_lengths: np.ndarray
) -> np.ndarray:
    """Levenshtein distance of every pair ``(a[i], b[j])``: ``[n, m]`` int32.

    Row ``i`` of the classic table is ``D_i[j] = min(D_{i-1}[j] + 1, D_i[j-1] + 1,
    D_{i-1}[j-1] + [a_i != b_j])``. The in-row dependency is a running minimum:
    ``D_i[j] = j + min_{k<=j}(X[k] - k)`` with ``X`` the first and third candidates, so each row
    is a handful of array operations over all ``n x m`` pairs at once.

    Args:
        a_codes: ``[n, La]`` uint8, right-padded byte strings; ``a_lengths``: ``[n]`` their lengths.
        b_codes: ``[m, Lb]`` uint8; ``b_lengths``: ``[m]``.
    """
    n, m = a_codes.shape[0], b_codes.shape[0]
    width_b = b_codes.shape[1]
    steps = np.arange(width_b + 1, dtype=np.int32)
    row = np.broadcast_to(steps, (n, m, width_b + 1)).copy()  # D_0[j] = j
    result = np.zeros((n, m), dtype=np.int32)
    gather_b = np.minimum(b_lengths, width_b)[None, :, None]
    done = a_lengths == 0
    if done.any():
        result[done] = np.broadcast_to(b_lengths.astype(np.int32), (int(done.sum()), m))
    for i in range(a_codes.shape[1]):
        mismatch = (a_codes[:, i][:, None, None] != b_codes[None, :, :]).astype(np.int32)  # [n, m, Lb]
        candidates = np.empty_like(row)
        candidates[..., 0] = i + 1
        candidates[..., 1:] = np.minimum(row[..., 1:] + 1, row[..., :-1] + mismatch)
        row = steps + np.minimum.accumulate(candidates - steps, axis=2)
        finished = a_lengths == i + 1
        if finished.any():
            result[finished] = np.take_along_axis(row[finished], np.broadcast_to(gather_b, (1, m, 1)), axis=2)[..., 0]
    return result


def string_edit_distances(a: Sequence[bytes], b: Sequence[bytes]) -> np.ndarray:
    """:func:`edit_distances` on lists of byte strings (always numpy; see :func:`token_edit_distances`)."""
    return edit_distances(*_pack(a), *_pack(b))


def check_backend(backend: str) -> None:
    """Raise unless ``backend`` is one of :data:`EDIT_DISTANCE_BACKENDS` and usable here."""
    if backend not in EDIT_DISTANCE_BACKENDS:
        raise ValueError(f"unknown edit-distance backend {backend!r} (one of {', '.join(EDIT_DISTANCE_BACKENDS)})")
    if backend == "rapidfuzz" and _rf_process is None:
        raise ImportError("the rapidfuzz edit-distance backend needs rapidfuzz (pip install rapidfuzz), or pass backend='numpy'")


def rapidfuzz_edit_distances(a: Sequence[bytes], b: Sequence[bytes], *, workers: int = 1) -> np.ndarray:
    """Levenshtein distance (over bytes) of every pair ``(a[i], b[j])`` by rapidfuzz: ``[n, m]`` int32.

    ``workers`` is rapidfuzz's thread count (``-1``: all cores). Keep 1 inside the engine: every
    rank computes its own maps and pairs, and several ranks share a node's cores.
    """
    check_backend("rapidfuzz")
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)), dtype=np.int32)
    return _rf_process.cdist(a, b, scorer=_rf_levenshtein.distance, dtype=np.int32, workers=workers)


def token_edit_distances(
    a: Sequence[bytes], b: Sequence[bytes], *, backend: str = "rapidfuzz", workers: int = 1
) -> np.ndarray:
    """Levenshtein distance of every pair ``(a[i], b[j])`` of byte strings: ``[n, m]`` int32.

    Args:
        a, b: byte strings (token surfaces).
        backend: ``rapidfuzz`` (C++, :func:`rapidfuzz_edit_distances`) or ``numpy``
            (:func:`string_edit_distances`); the two give identical tables.
        workers: rapidfuzz threads; 1 by default (see :func:`rapidfuzz_edit_distances`).
    """
    check_backend(backend)
    if backend == "rapidfuzz":
        return rapidfuzz_edit_distances(a, b, workers=workers)
    return string_edit_distances(a, b)


def dtw_path(cost: np.ndarray) -> list[tuple[int, int]]:
    """Minimum-cost monotone warping path through ``cost`` (``[n, m]``), from (0, 0) to (n-1, m-1).

    ``D[i, j] = cost[i, j] + min(D[i-1, j], D[i, j-1], D[i-1, j-1])``. Within a row the
    horizontal dependency unrolls to ``D[i, j] = S[j] + min_{k<=j}(Y[k] - S[k-1])`` with ``S`` the
    running sum of the row's costs and ``Y[k] = min(D[i-1, k], D[i-1, k-1])``. Ties in the
    backtrack prefer the diagonal step, then the step that advances the student.
    """
    n, m = cost.shape
    if n == 0 or m == 0:
        return []
    cost = cost.astype(np.float64)
    table = np.empty((n, m))
    table[0] = np.cumsum(cost[0])
    for i in range(1, n):
        above = table[i - 1]
        best_entry = np.empty(m)
        best_entry[0] = above[0]
        best_entry[1:] = np.minimum(above[1:], above[:-1])
        running = np.cumsum(cost[i])
        shifted = np.concatenate(([0.0], running[:-1]))
        table[i] = running + np.minimum.accumulate(best_entry - shifted)
    path = [(n - 1, m - 1)]
    i, j = n - 1, m - 1
    while i > 0 or j > 0:
        if i == 0:
            j -= 1
        elif j == 0:
            i -= 1
        else:
            options = ((table[i - 1, j - 1], 0), (table[i - 1, j], 1), (table[i, j - 1], 2))
            step = min(options)[1]
            if step == 0:
                i, j = i - 1, j - 1
            elif step == 1:
                i -= 1
            else:
                j -= 1
        path.append((i, j))
    path.reverse()
    return path


def dtw_pairs(
    student_strings: Sequence[bytes], teacher_strings: Sequence[bytes], *, backend: str = "rapidfuzz", workers: int = 1
) -> list[tuple[int, int]]:
    """1:1 DTW matches ``(student token, teacher token)`` between two normalised token sequences.

    Args:
        student_strings: normalised strings (bytes) of the student's response tokens, in order.
        teacher_strings: the same for the teacher.
        backend: edit-distance backend of the cost matrix, ``rapidfuzz`` or ``numpy`` (same result).
        workers: rapidfuzz threads (1: the engine runs this on every rank).

    Returns:
        The matched index pairs in text order; a token that the warping path matches with more
        than one token of the other side is left out.
    """
    check_backend(backend)
    if not student_strings or not teacher_strings:
        return []
    path = dtw_path(token_edit_distances(student_strings, teacher_strings, backend=backend, workers=workers))
    student_count = np.bincount([i for i, _ in path], minlength=len(student_strings))
    teacher_count = np.bincount([j for _, j in path], minlength=len(teacher_strings))
    return [(i, j) for i, j in path if student_count[i] == 1 and teacher_count[j] == 1]
