"""Entropy-weighted DTW and the logit groups of CDM (Chen et al., ACL Findings 2025, arXiv 2502.11104).

CDM aligns the two response token sequences with dynamic time warping, like MinED
(:mod:`mlot_ds.pairing.dtw`), but every cell cost is scaled by a weight of each side's prediction
at that position, so that misaligning uncertain positions costs more:

    c(s, t) = ED(str_s, str_t) * w_s * w_t,
    w = floor(3 * sigmoid(4 * Hhat - 2) + 3),   Hhat = (H - min H) / (max H - min H) per sequence.

``H`` is the entropy of the full softmax of the logit row that belongs to the token (see "Rows"
below). The weights take the values 3, 4 and 5 only (sigmoid(-2) = 0.12, sigmoid(2) = 0.88).
``ED`` is the Levenshtein distance over the tokens' surface bytes with spaces removed (the
reconstructed reference compares Unicode characters; the two agree on ASCII). Any two strings from
``zero_cost_markers`` (the EOS-like special tokens ``</s>``, ``<|im_end|>``, ``<|endoftext|>`` by
default) cost 0 against each other.

The warping path follows the textbook recurrence
``D(s, t) = c(s, t) + min(D(s-1, t), D(s, t-1), D(s-1, t-1))`` evaluated one anti-diagonal at a
time (every cell of an anti-diagonal depends only on the two previous ones, so each step is a few
numpy operations and every value is exactly what the double loop computes). The backtrack starts at
the last cell and, among equal predecessors, prefers the diagonal, then the step back along the
teacher, then the step back along the student: the order of the circulating copies, whose table is
indexed ``[teacher, student]`` and which take ``argmin`` over (diagonal, up, left).

Groups (:func:`cdm_groups`): each student token ``s`` gets the mean of the teacher logits of its
aligned teacher tokens ``A(s)``; then, for every distinct list of student tokens that one teacher
token is aligned to (``merge="teacher_lists"``, the copies' rule, in teacher order), the student
logits and those per-student teacher means are averaged over the list. Both averages are linear in
the logit rows, so a group is a weighted sum of rows on each side::

    student row of group g = sum_{s in g} z_s / |g|
    teacher row of group g = sum_{s in g} sum_{t in A(s)} z_t / (|g| |A(s)|)

and that is what :class:`CdmGroups` stores. The lists of ``teacher_lists`` can overlap, so a
student token can enter several groups and the number of groups can exceed the number of student
tokens (a "staircase" path such as (0,0), (1,0), (1,1), (1,2), (2,2), (2,3) in (student, teacher)
terms has 3 student tokens and 4 distinct lists). ``merge="components"`` uses the connected
components of the path instead (a partition; the path splits at its diagonal steps); it is not the
copies' rule and is offered as an ablation.

Rows: row ``n`` of a side's logits must belong to token ``n`` of its strings. With Hugging Face
labels (:func:`mlot_ds.losses.ce.labelled_rows`) we use the row that *predicts* the token (spec
§1.1, as MinED here); the copies take the row *at* the token (which predicts the next one).
"""

from __future__ import annotations

from typing import Collection, Literal, NamedTuple, Sequence

import numpy as np
import torch

from mlot_ds.pairing.dtw import string_edit_distances

EOS_MARKERS: tuple[bytes, ...] = (b"</s>", b"<|im_end|>", b"<|endoftext|>")
"""The copies' zero-cost special pairs (``</s>`` <-> ``<|im_end|>``, ``<|endoftext|>`` <->
``<|endoftext|>``), as a set of markers any two of which cost 0. Add e.g. ``<|eot_id|>`` for
Llama-3 chat data."""

ENTROPY_WEIGHT_SCALE = 3.0
ENTROPY_WEIGHT_OFFSET = 3.0

try:  # an optional C++ backend, about 50x faster than the numpy tables on short strings
    from rapidfuzz import process as _rf_process
    from rapidfuzz.distance import Levenshtein as _rf_levenshtein
except ImportError:  # pragma: no cover - exercised only without rapidfuzz
    _rf_process = _rf_levenshtein = None


# ----------------------------------------------------------------------------------- weights


def entropy_weights(entropy: Sequence[float] | np.ndarray | torch.Tensor) -> np.ndarray:
    """CDM's DTW weight of every position of one sequence: ``floor(3 * sigmoid(4 * Hhat - 2) + 3)``.

    ``Hhat = (H - min H) / (max H - min H)`` over the sequence. When all entropies are equal (or
    there is one position) the min-max normalisation is undefined (0 / 0 in the copies); every
    position then gets ``Hhat = 0``, i.e. weight 3. A constant weight on one side scales all costs
    by the same factor and leaves the path unchanged, so the value chosen does not matter.

    Args:
        entropy: ``[R]`` entropies (nats) of the rows of one sequence's response tokens.

    Returns:
        ``[R]`` int64 in ``{3, 4, 5}`` (``Hhat >= 0.3267`` gives 4, ``Hhat >= 0.6733`` gives 5).
    """
    if torch.is_tensor(entropy):
        entropy = entropy.detach().to("cpu", torch.float64).numpy()
    values = np.asarray(entropy, dtype=np.float64).reshape(-1)
    if values.size == 0:
        return np.zeros(0, dtype=np.int64)
    if not np.isfinite(values).all():
        raise ValueError("entropy_weights: entropies must be finite")
    low, span = values.min(), values.max() - values.min()
    normalised = (values - low) / span if span > 0 else np.zeros_like(values)
    squashed = 1.0 / (1.0 + np.exp(-(4.0 * normalised - 2.0)))
    return np.floor(ENTROPY_WEIGHT_SCALE * squashed + ENTROPY_WEIGHT_OFFSET).astype(np.int64)


# ----------------------------------------------------------------------------- edit distances


def strip_spaces(strings: Sequence[bytes]) -> list[bytes]:
    """The strings with every ASCII space removed (CDM compares tokens without spaces)."""
    return [s.replace(b" ", b"") for s in strings]


def dtw_token_strings(
    token_ids: Sequence[int], surfaces: Sequence[bytes | None], literals: Sequence[str | None] | None = None
) -> list[bytes]:
    """The strings of a response to align: surface bytes, or the literal for non-text tokens.

    Args:
        token_ids: the response token ids.
        surfaces: :func:`mlot_ds.pairing.surface.token_surface_bytes` of the tokenizer.
        literals: ``tokenizer.convert_ids_to_tokens(range(V))`` (so that ``</s>`` is spelled
            ``</s>`` and can match a marker); ``None``: non-text tokens become ``b""``.
    """
    out = []
    for token_id in token_ids:
        surface = surfaces[token_id]
        if surface is None:
            literal = literals[token_id] if literals is not None else None
            surface = literal.encode("utf-8") if literal is not None else b""
        out.append(surface)
    return out


def _pack(strings: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.fromiter((len(s) for s in strings), dtype=np.int64, count=len(strings))
    codes = np.zeros((len(strings), max(int(lengths.max()) if len(strings) else 0, 1)), dtype=np.uint8)
    for row, s in enumerate(strings):
        codes[row, : len(s)] = np.frombuffer(s, dtype=np.uint8)
    return codes, lengths


def _resolve_backend(backend: str) -> str:
    if backend == "auto":
        return "rapidfuzz" if _rf_process is not None else "numpy"
    if backend not in ("rapidfuzz", "numpy"):
        raise ValueError(f"unknown edit-distance backend {backend!r} (auto, rapidfuzz, numpy)")
    if backend == "rapidfuzz" and _rf_process is None:
        raise ImportError("rapidfuzz is not installed")
    return backend


def pairwise_edit_distances(a: Sequence[bytes], b: Sequence[bytes], *, backend: str = "auto") -> np.ndarray:
    """Levenshtein distance (over bytes) of every pair ``(a[i], b[j])``: ``[len(a), len(b)]`` int64.

    Distinct strings are compared once (responses repeat tokens a lot). ``backend``: ``rapidfuzz``
    (C++, if installed), ``numpy`` (:func:`mlot_ds.pairing.dtw.string_edit_distances`) or ``auto``.
    """
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)), dtype=np.int64)
    unique_a, index_a = np.unique(np.array(a, dtype=object), return_inverse=True)
    unique_b, index_b = np.unique(np.array(b, dtype=object), return_inverse=True)
    if _resolve_backend(backend) == "rapidfuzz":
        table = _rf_process.cdist(list(unique_a), list(unique_b), scorer=_rf_levenshtein.distance, dtype=np.int64,
                                  workers=1)
    else:
        table = string_edit_distances(list(unique_a), list(unique_b)).astype(np.int64)
    return table[index_a.reshape(-1)][:, index_b.reshape(-1)]


def paired_edit_distances(a: Sequence[bytes], b: Sequence[bytes], *, backend: str = "auto") -> np.ndarray:
    """Levenshtein distance (over bytes) of ``a[p]`` and ``b[p]`` for every ``p``: ``[P]`` int64.

    The numpy backend runs the classic table for all pairs at once, one row per byte of ``a``;
    within a row ``D_i[j] = j + min_{k<=j}(X[k] - k)``, with ``X`` the deletion and substitution
    candidates (the same unrolling as :func:`mlot_ds.pairing.dtw.edit_distances`).
    """
    if len(a) != len(b):
        raise ValueError(f"paired_edit_distances: {len(a)} and {len(b)} strings")
    if len(a) == 0:
        return np.zeros(0, dtype=np.int64)
    if _resolve_backend(backend) == "rapidfuzz":
        return _rf_process.cpdist(list(a), list(b), scorer=_rf_levenshtein.distance, dtype=np.int64, workers=1)
    a_codes, a_len = _pack(a)
    b_codes, b_len = _pack(b)
    width = b_codes.shape[1]
    steps = np.arange(width + 1, dtype=np.int64)
    row = np.broadcast_to(steps, (len(a), width + 1)).copy()
    result = np.where(a_len == 0, b_len, 0)
    read = np.minimum(b_len, width)
    pairs = np.arange(len(a))
    for i in range(a_codes.shape[1]):
        mismatch = (a_codes[:, i : i + 1] != b_codes).astype(np.int64)
        candidates = np.empty_like(row)
        candidates[:, 0] = i + 1
        candidates[:, 1:] = np.minimum(row[:, 1:] + 1, row[:, :-1] + mismatch)
        row = steps + np.minimum.accumulate(candidates - steps, axis=1)
        done = a_len == i + 1
        result[done] = row[pairs[done], read[done]]
    return result


# ------------------------------------------------------------------------------------- DTW


def weighted_cost_matrix(
    student_strings: Sequence[bytes],
    teacher_strings: Sequence[bytes],
    student_weights: Sequence[float] | np.ndarray,
    teacher_weights: Sequence[float] | np.ndarray,
    *,
    zero_cost_markers: Collection[bytes] = EOS_MARKERS,
    remove_spaces: bool = True,
    backend: str = "auto",
) -> np.ndarray:
    """``c[s, t] = ED(s, t) * w_s * w_t`` (float64 ``[Rs, Rt]``); 0 between any two markers.

    Markers are recognised on the strings as given (before spaces are removed).
    """
    ws = np.asarray(student_weights, dtype=np.float64).reshape(-1)
    wt = np.asarray(teacher_weights, dtype=np.float64).reshape(-1)
    if ws.shape != (len(student_strings),) or wt.shape != (len(teacher_strings),):
        raise ValueError(f"weights {ws.shape} / {wt.shape} do not match {len(student_strings)} / "
                         f"{len(teacher_strings)} strings")
    a = strip_spaces(student_strings) if remove_spaces else list(student_strings)
    b = strip_spaces(teacher_strings) if remove_spaces else list(teacher_strings)
    cost = pairwise_edit_distances(a, b, backend=backend).astype(np.float64) * ws[:, None] * wt[None, :]
    markers = set(zero_cost_markers)
    if markers:
        ms = np.fromiter((s in markers for s in student_strings), dtype=bool, count=len(student_strings))
        mt = np.fromiter((t in markers for t in teacher_strings), dtype=bool, count=len(teacher_strings))
        cost[np.ix_(ms, mt)] = 0.0
    return cost


def dtw_table(cost: np.ndarray) -> np.ndarray:
    """Cumulative costs ``D`` (float64 ``[n, m]``) of the textbook recurrence, by anti-diagonals.

    ``D(i, j) = cost(i, j) + min(D(i-1, j), D(i, j-1), D(i-1, j-1))`` with ``D(-1, -1) = 0`` and
    every other out-of-range cell infinite.
    """
    cost = np.asarray(cost, dtype=np.float64)
    n, m = cost.shape
    padded = np.full((n + 1, m + 1), np.inf)
    padded[0, 0] = 0.0
    for diagonal in range(2, n + m + 1):  # 1-based i + j
        i = np.arange(max(1, diagonal - m), min(n, diagonal - 1) + 1)
        j = diagonal - i
        best = np.minimum(np.minimum(padded[i - 1, j], padded[i, j - 1]), padded[i - 1, j - 1])
        padded[i, j] = cost[i - 1, j - 1] + best
    return padded[1:, 1:]


def dtw_backtrack(table: np.ndarray) -> list[tuple[int, int]]:
    """The warping path ``[(s, t), ...]`` from ``(0, 0)`` to the last cell of ``table`` ``[Rs, Rt]``.

    Among equal predecessors: diagonal, then ``(s, t-1)`` (back along the teacher), then ``(s-1, t)``.
    """
    n, m = table.shape
    if n == 0 or m == 0:
        return []
    s, t = n - 1, m - 1
    path = [(s, t)]
    while s > 0 or t > 0:
        if s == 0:
            t -= 1
        elif t == 0:
            s -= 1
        else:
            diagonal, back_teacher, back_student = table[s - 1, t - 1], table[s, t - 1], table[s - 1, t]
            if diagonal <= back_teacher and diagonal <= back_student:
                s, t = s - 1, t - 1
            elif back_teacher <= back_student:
                t -= 1
            else:
                s -= 1
        path.append((s, t))
    path.reverse()
    return path


class DtwAlignment(NamedTuple):
    """A warping path between the student's ``Rs`` and the teacher's ``Rt`` response tokens.

    Attributes:
        path: ``(student, teacher)`` index pairs in order, from ``(0, 0)`` to ``(Rs-1, Rt-1)``.
        cost: the path's total weighted cost ``D(Rs-1, Rt-1)``.
        student_to_teacher: for each student token, its aligned teacher tokens (ascending).
        teacher_to_student: for each teacher token, its aligned student tokens (ascending).
    """

    path: list[tuple[int, int]]
    cost: float
    student_to_teacher: list[list[int]]
    teacher_to_student: list[list[int]]


def alignment_from_path(path: Sequence[tuple[int, int]], student_count: int, teacher_count: int,
                        cost: float = float("nan")) -> DtwAlignment:
    """The per-token lists of a warping path."""
    student_to_teacher: list[list[int]] = [[] for _ in range(student_count)]
    teacher_to_student: list[list[int]] = [[] for _ in range(teacher_count)]
    for s, t in path:
        student_to_teacher[s].append(t)
        teacher_to_student[t].append(s)
    return DtwAlignment(list(path), cost, student_to_teacher, teacher_to_student)


def weighted_dtw(
    student_strings: Sequence[bytes],
    teacher_strings: Sequence[bytes],
    student_weights: Sequence[float] | np.ndarray,
    teacher_weights: Sequence[float] | np.ndarray,
    *,
    zero_cost_markers: Collection[bytes] = EOS_MARKERS,
    remove_spaces: bool = True,
    backend: str = "auto",
) -> DtwAlignment:
    """Align two token sequences by DTW on the weighted edit-distance costs (module docstring).

    Args:
        student_strings, teacher_strings: surface bytes of the response tokens (e.g. from
            :func:`dtw_token_strings`); spaces are removed here unless ``remove_spaces=False``.
        student_weights, teacher_weights: per-token multipliers (:func:`entropy_weights`).
        zero_cost_markers: strings that cost 0 against each other (EOS-like specials).
        backend: edit-distance backend, see :func:`pairwise_edit_distances`.

    Returns:
        A :class:`DtwAlignment`; empty lists when either side has no token.
    """
    if not student_strings or not teacher_strings:
        return alignment_from_path([], len(student_strings), len(teacher_strings), 0.0)
    cost = weighted_cost_matrix(student_strings, teacher_strings, student_weights, teacher_weights,
                                zero_cost_markers=zero_cost_markers, remove_spaces=remove_spaces, backend=backend)
    table = dtw_table(cost)
    return alignment_from_path(dtw_backtrack(table), len(student_strings), len(teacher_strings), float(table[-1, -1]))


# ----------------------------------------------------------------------------------- groups


class CdmGroups(NamedTuple):
    """The aligned rows of CDM: each group is a weighted sum of student rows and of teacher rows.

    Attributes:
        student_group, student_row, student_weight: ``[Es]`` entries ``(group, row, weight)``;
            group ``g``'s student logits are ``sum_e weight_e * z_S[row_e]`` over its entries.
            Sorted by group.
        teacher_group, teacher_row, teacher_weight: ``[Et]``, the same for the teacher rows.
        num_groups: number of groups ``N``.
        student_tokens: number of student response tokens covered (the engine's divisor).

    Rows are local token indices for one sequence (:func:`cdm_groups`) or, after
    :func:`pack_cdm_groups`, flat rows of the batch's logits and of the teacher's row arrays.
    """

    student_group: torch.Tensor
    student_row: torch.Tensor
    student_weight: torch.Tensor
    teacher_group: torch.Tensor
    teacher_row: torch.Tensor
    teacher_weight: torch.Tensor
    num_groups: int
    student_tokens: int

    def to(self, device: torch.device | str) -> CdmGroups:
        moved = [x.to(device) for x in self[:6]]
        return CdmGroups(*moved, self.num_groups, self.student_tokens)


MergeRule = Literal["teacher_lists", "components"]


def _group_members(alignment: DtwAlignment, merge: MergeRule) -> list[list[int]]:
    if merge == "teacher_lists":
        seen: dict[tuple[int, ...], None] = {}
        for students in alignment.teacher_to_student:
            seen.setdefault(tuple(students), None)
        return [list(members) for members in seen]
    if merge == "components":
        groups: list[list[int]] = []
        previous = None
        for s, t in alignment.path:
            if previous is None or (s != previous[0] and t != previous[1]):
                groups.append([])
            if not groups[-1] or groups[-1][-1] != s:
                groups[-1].append(s)
            previous = (s, t)
        return groups
    raise ValueError(f"unknown merge rule {merge!r} (teacher_lists, components)")


def cdm_groups(alignment: DtwAlignment, *, merge: MergeRule = "teacher_lists") -> CdmGroups:
    """The groups of one sequence from its alignment, with local row indices (module docstring).

    Args:
        alignment: from :func:`weighted_dtw`.
        merge: ``teacher_lists`` (the copies: distinct per-teacher-token student lists, may overlap)
            or ``components`` (connected components of the path: a partition).
    """
    s_group, s_row, s_weight, t_group, t_row, t_weight = [], [], [], [], [], []
    members_of = _group_members(alignment, merge) if alignment.path else []
    for g, members in enumerate(members_of):
        share = 1.0 / len(members)
        teacher_mass: dict[int, float] = {}
        for s in members:
            s_group.append(g)
            s_row.append(s)
            s_weight.append(share)
            aligned = alignment.student_to_teacher[s]
            for t in aligned:
                teacher_mass[t] = teacher_mass.get(t, 0.0) + share / len(aligned)
        for t in sorted(teacher_mass):
            t_group.append(g)
            t_row.append(t)
            t_weight.append(teacher_mass[t])
    index, weight = torch.long, torch.float64
    return CdmGroups(torch.tensor(s_group, dtype=index), torch.tensor(s_row, dtype=index),
                     torch.tensor(s_weight, dtype=weight), torch.tensor(t_group, dtype=index),
                     torch.tensor(t_row, dtype=index), torch.tensor(t_weight, dtype=weight),
                     len(members_of), len(alignment.student_to_teacher))


def pack_cdm_groups(
    groups: Sequence[CdmGroups],
    student_rows: Sequence[torch.Tensor | Sequence[int]],
    teacher_rows: Sequence[torch.Tensor | Sequence[int]],
) -> CdmGroups:
    """Concatenate per-sequence groups, mapping local token indices to global rows.

    Args:
        groups: one :class:`CdmGroups` per sequence, with local rows (:func:`cdm_groups`).
        student_rows: per sequence, ``[Rs_b]`` flat rows of the student logits ``[B * T, V]``
            (e.g. from :func:`mlot_ds.losses.ce.labelled_rows`) for its response tokens, in order.
        teacher_rows: per sequence, ``[Rt_b]`` rows of the teacher's per-row arrays
            (:class:`mlot_ds.losses.cdm.TeacherTopK`).
    """
    if not (len(groups) == len(student_rows) == len(teacher_rows)):
        raise ValueError("pack_cdm_groups: one entry per sequence in each argument")
    parts: list[list[torch.Tensor]] = [[] for _ in range(6)]
    offset, tokens = 0, 0
    for group, s_rows, t_rows in zip(groups, student_rows, teacher_rows):
        s_rows = torch.as_tensor(s_rows, dtype=torch.long).cpu()
        t_rows = torch.as_tensor(t_rows, dtype=torch.long).cpu()
        if group.student_tokens != s_rows.numel():
            raise ValueError(f"{s_rows.numel()} student rows for {group.student_tokens} student tokens")
        parts[0].append(group.student_group + offset)
        parts[1].append(s_rows[group.student_row])
        parts[2].append(group.student_weight)
        parts[3].append(group.teacher_group + offset)
        parts[4].append(t_rows[group.teacher_row])
        parts[5].append(group.teacher_weight)
        offset += group.num_groups
        tokens += group.student_tokens
    dtypes = (torch.long, torch.long, torch.float64, torch.long, torch.long, torch.float64)
    tensors = [torch.cat(p) if p else torch.zeros(0, dtype=d) for p, d in zip(parts, dtypes)]
    return CdmGroups(*tensors, offset, tokens)


def cdm_align(
    student_strings: Sequence[bytes],
    teacher_strings: Sequence[bytes],
    student_entropy: Sequence[float] | np.ndarray | torch.Tensor,
    teacher_entropy: Sequence[float] | np.ndarray | torch.Tensor,
    *,
    merge: MergeRule = "teacher_lists",
    zero_cost_markers: Collection[bytes] = EOS_MARKERS,
    remove_spaces: bool = True,
    backend: str = "auto",
) -> CdmGroups:
    """One sequence end to end: entropy weights, weighted DTW, groups (local rows)."""
    alignment = weighted_dtw(student_strings, teacher_strings, entropy_weights(student_entropy),
                             entropy_weights(teacher_entropy), zero_cost_markers=zero_cost_markers,
                             remove_spaces=remove_spaces, backend=backend)
    return cdm_groups(alignment, merge=merge)


__all__ = [
    "EOS_MARKERS",
    "CdmGroups",
    "DtwAlignment",
    "alignment_from_path",
    "cdm_align",
    "cdm_groups",
    "dtw_backtrack",
    "dtw_table",
    "dtw_token_strings",
    "entropy_weights",
    "pack_cdm_groups",
    "paired_edit_distances",
    "pairwise_edit_distances",
    "strip_spaces",
    "weighted_cost_matrix",
    "weighted_dtw",
]
