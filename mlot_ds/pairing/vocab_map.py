"""MinED's static vocabulary map: each student token id -> the teacher id at minimum edit distance.

Tokens are compared by their normalised strings (surface bytes, :mod:`mlot_ds.pairing.surface`),
so ``▁the``, ``Ġthe`` and `` the`` are equal. The map is exact: every text token of the student
gets a teacher text token at the smallest Levenshtein distance (over bytes), ties broken by the
smaller length difference, then by the lower teacher id. Special tokens map by role (EOS to EOS,
BOS to BOS, UNK, PAD), otherwise to a teacher token with the same literal string, otherwise like a
text token whose string is the literal (``<|im_start|>``). Every student id gets a teacher id.

The search never compares the two vocabularies pair by pair in Python:
1. exact matches through a dict;
2. distance 1 through hashed neighbourhoods (the string with one byte removed, keyed with and
   without its position), which finds every substitution, insertion and deletion neighbour;
3. the remaining tokens (distance >= 2) against teacher tokens of nearby lengths, widening the
   length window ring by ring until no closer match can exist (a length difference of ``d``
   forces a distance of at least ``d``). The distances of a ring come from rapidfuzz's C++
   Levenshtein (``backend="rapidfuzz"``, the default) or, with ``backend="numpy"``, from Myers'
   bit-parallel edit distance vectorised over all (token, candidate) pairs (a plain vectorised
   table for tokens longer than 64 bytes). Both give the same distances, so the same map.

Maps are cached on disk, keyed by both tokenizers' fingerprints.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

if TYPE_CHECKING:  # transformers is heavy; only the type is needed here
    from transformers import PreTrainedTokenizerBase

from mlot_ds.pairing.dtw import check_backend, edit_distances, rapidfuzz_edit_distances
from mlot_ds.pairing.surface import token_surface_bytes, tokenizer_fingerprint

MAP_FORMAT_VERSION = 1
_ROLES = ("eos_token_id", "bos_token_id", "unk_token_id", "pad_token_id")


def mined_vocab_map(
    student_tokenizer: PreTrainedTokenizerBase,
    teacher_tokenizer: PreTrainedTokenizerBase,
    cache_dir: str | Path | None = None,
    *,
    progress: bool = True,
    table_budget: int = 4_000_000,
    backend: str = "rapidfuzz",
    workers: int = 1,
) -> torch.Tensor:
    """Map every student token id to a teacher token id by minimum edit distance (MinED).

    Args:
        student_tokenizer: the student's tokenizer (``n = len(student_tokenizer)`` ids).
        teacher_tokenizer: the teacher's tokenizer.
        cache_dir: where to keep the map; ``None`` computes it every time.
        progress: show a progress bar over the distance >= 2 search.
        table_budget: cells of one vectorised Levenshtein table (bounds memory: 4 bytes a cell,
            about three tables alive at once; rapidfuzz keeps only the ``[queries, candidates]``
            result).
        backend: edit-distance kernel of the distance >= 2 search, ``rapidfuzz`` or ``numpy``
            (the same map; the cache does not depend on it).
        workers: rapidfuzz threads. 1 by default: every rank of a run builds its maps, and
            several ranks share a node's cores; ``-1`` uses all cores.

    Returns:
        ``[n]`` long tensor of teacher ids in ``[0, len(teacher_tokenizer))``.
    """
    check_backend(backend)
    cache_file = None
    if cache_dir is not None:
        student_key = tokenizer_fingerprint(student_tokenizer)[:20]
        teacher_key = tokenizer_fingerprint(teacher_tokenizer)[:20]
        cache_file = Path(cache_dir) / f"mined-v{MAP_FORMAT_VERSION}-{student_key}-{teacher_key}.pt"
        if cache_file.exists():
            cached = torch.load(cache_file, map_location="cpu", weights_only=True)
            if cached.shape == (len(student_tokenizer),):
                return cached
    mapping = _compute_map(student_tokenizer, teacher_tokenizer, progress, table_budget, backend, workers)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        partial = cache_file.with_suffix(f".tmp{os.getpid()}")
        torch.save(mapping, partial)
        os.replace(partial, cache_file)  # atomic: concurrent ranks never read half a file
    return mapping


def _compute_map(student, teacher, progress: bool, table_budget: int, backend: str, workers: int) -> torch.Tensor:
    student_surfaces = token_surface_bytes(student)
    teacher_surfaces = token_surface_bytes(teacher)
    mapping = np.full(len(student_surfaces), -1, dtype=np.int64)

    for role in _ROLES:
        student_id, teacher_id = getattr(student, role, None), getattr(teacher, role, None)
        if student_id is not None and teacher_id is not None and mapping[student_id] < 0:
            mapping[student_id] = teacher_id
    teacher_literals: dict[str, int] = {}
    for teacher_id, token in enumerate(teacher.convert_ids_to_tokens(list(range(len(teacher_surfaces))))):
        teacher_literals.setdefault(token, teacher_id)
    student_tokens = student.convert_ids_to_tokens(list(range(len(student_surfaces))))
    queries: list[bytes | None] = list(student_surfaces)
    for student_id, surface in enumerate(student_surfaces):
        if surface is None and mapping[student_id] < 0:
            mapping[student_id] = teacher_literals.get(student_tokens[student_id], -1)
            if mapping[student_id] < 0:  # no counterpart: match its literal string like a text token
                queries[student_id] = str(student_tokens[student_id]).encode("utf-8")

    candidates = [(s, i) for i, s in enumerate(teacher_surfaces) if s is not None]
    if not candidates:
        raise ValueError("the teacher tokenizer has no text tokens to map to")
    exact: dict[bytes, int] = {}
    substitution: dict[tuple[int, bytes], int] = {}
    deletion: dict[bytes, int] = {}
    for surface, teacher_id in candidates:  # ids ascending, so setdefault keeps the lowest id
        exact.setdefault(surface, teacher_id)
        for k in range(len(surface)):
            shorter = surface[:k] + surface[k + 1 :]
            substitution.setdefault((k, shorter), teacher_id)
            deletion.setdefault(shorter, teacher_id)

    remaining: list[tuple[int, bytes]] = []
    for student_id, surface in enumerate(queries):
        if surface is None or mapping[student_id] >= 0:
            continue
        if surface in exact:
            mapping[student_id] = exact[surface]
            continue
        same_length = [substitution.get((k, surface[:k] + surface[k + 1 :]), -1) for k in range(len(surface))]
        same_length = [t for t in same_length if t >= 0]
        if same_length:
            mapping[student_id] = min(same_length)
            continue
        off_by_one = [exact.get(surface[:k] + surface[k + 1 :], -1) for k in range(len(surface))]
        off_by_one.append(deletion.get(surface, -1))
        off_by_one = [t for t in off_by_one if t >= 0]
        if off_by_one:
            mapping[student_id] = min(off_by_one)
        else:
            remaining.append((student_id, surface))

    if remaining:
        _search_far(remaining, candidates, mapping, progress, table_budget, backend, workers)
    return torch.from_numpy(mapping)


_WORD_BITS = 64
_BIT_PARALLEL_ARRAYS = 8  # [Q, C] uint64 arrays alive at once, counted in units of table cells


def bit_parallel_distances(query_codes: np.ndarray, candidate_codes: np.ndarray) -> np.ndarray:
    """Levenshtein distances ``[Q, C]`` between queries of one length ``m <= 64`` and candidates of
    one length ``n``, with Myers' bit-vector algorithm (Myers 1999, in Hyyro's global form).

    Column ``j`` of the DP table is held as two bit vectors of vertical +1/-1 steps over the
    ``m`` query positions, so one candidate character costs a dozen word operations for all
    ``m`` rows at once, done for every (query, candidate) pair with numpy.

    Args:
        query_codes: ``[Q, m]`` uint8, all of length ``m`` (1 <= m <= 64).
        candidate_codes: ``[C, n]`` uint8, all of length ``n``.
    """
    queries, length = query_codes.shape
    if not 1 <= length <= _WORD_BITS:
        raise ValueError(f"bit-parallel distances need query length in [1, {_WORD_BITS}], got {length}")
    one = np.uint64(1)
    # match[q, c]: bit i set where query q has byte c at position i
    match = np.zeros((queries, 256), dtype=np.uint64)
    rows = np.arange(queries)
    for i in range(length):
        np.bitwise_or.at(match, (rows, query_codes[:, i]), one << np.uint64(i))
    top = np.uint64(length - 1)
    shape = (queries, candidate_codes.shape[0])
    positive = np.full(shape, np.uint64((1 << length) - 1) if length < _WORD_BITS else ~np.uint64(0))
    negative = np.zeros(shape, dtype=np.uint64)
    score = np.full(shape, length, dtype=np.int32)
    for j in range(candidate_codes.shape[1]):
        equal = match[:, candidate_codes[:, j]]
        vertical = equal | negative
        horizontal = (((equal & positive) + positive) ^ positive) | equal
        plus = negative | ~(horizontal | positive)
        minus = positive & horizontal
        score += ((plus >> top) & one).astype(np.int32)
        score -= ((minus >> top) & one).astype(np.int32)
        plus = (plus << one) | one  # row 0 of the table grows by one per candidate byte
        minus = minus << one
        positive = minus | ~(vertical | plus)
        negative = plus & vertical
    return score


def _search_far(
    remaining, candidates, mapping: np.ndarray, progress: bool, table_budget: int, backend: str, workers: int
) -> None:
    """Exact nearest teacher string for tokens with no neighbour within distance 1.

    The numpy kernels read right-padded uint8 codes, rapidfuzz reads the byte strings themselves.
    """
    numpy_kernels = backend == "numpy"
    buckets: dict[int, list[tuple[bytes, int]]] = defaultdict(list)
    for surface, teacher_id in candidates:
        buckets[len(surface)].append((surface, teacher_id))
    packed = {}
    for length, items in buckets.items():
        codes = np.zeros((len(items) if numpy_kernels else 0, max(length, 1)), dtype=np.uint8)
        for row, (surface, _) in enumerate(items if numpy_kernels else ()):
            codes[row, :length] = np.frombuffer(surface, dtype=np.uint8)
        ids = np.array([teacher_id for _, teacher_id in items], dtype=np.int64)
        packed[length] = (codes, np.full(len(items), length, dtype=np.int64), ids, [surface for surface, _ in items])
    longest = max(buckets)

    by_length: dict[int, list[tuple[int, bytes]]] = defaultdict(list)
    for student_id, surface in remaining:
        by_length[len(surface)].append((student_id, surface))
    bar = tqdm(total=len(remaining), desc="MinED vocab map (distance >= 2)", disable=not progress)
    for query_length, queries in sorted(by_length.items()):
        codes = np.zeros((len(queries) if numpy_kernels else 0, max(query_length, 1)), dtype=np.uint8)
        for row, (_, surface) in enumerate(queries if numpy_kernels else ()):
            codes[row, :query_length] = np.frombuffer(surface, dtype=np.uint8)
        lengths = np.full(len(queries), query_length, dtype=np.int64)
        query_strings = [surface for _, surface in queries]
        best = np.full(len(queries), np.iinfo(np.int64).max, dtype=np.int64)
        best_id = np.full(len(queries), -1, dtype=np.int64)
        best_ring = np.zeros(len(queries), dtype=np.int64)
        ring = 0
        # Ring `ring` holds teacher strings whose length differs by `ring`: their distance is
        # at least `ring`, so a query whose best distance is <= ring cannot improve further.
        while ring <= max(longest, query_length):
            active = np.nonzero(best > ring)[0]
            if active.size == 0:
                break
            for length in sorted({query_length - ring, query_length + ring}):
                if length not in packed:
                    continue
                cand_codes, cand_lengths, cand_ids, cand_strings = packed[length]
                bit_parallel = 1 <= query_length <= _WORD_BITS and length >= 1
                if numpy_kernels:
                    cells = len(cand_ids) * (_BIT_PARALLEL_ARRAYS if bit_parallel else length + 1)
                else:
                    cells = len(cand_ids)  # rapidfuzz: only the int32 result table is ours
                chunk = max(1, table_budget // cells)
                for begin in range(0, active.size, chunk):
                    rows = active[begin : begin + chunk]
                    if not numpy_kernels:
                        distances = rapidfuzz_edit_distances([query_strings[r] for r in rows], cand_strings,
                                                             workers=workers)
                    elif bit_parallel:
                        distances = bit_parallel_distances(codes[rows], cand_codes)
                    else:
                        distances = edit_distances(codes[rows], lengths[rows], cand_codes, cand_lengths)
                    nearest = distances.argmin(axis=1)  # first minimum = lowest id in the bucket
                    nearest_distance = distances[np.arange(rows.size), nearest]
                    nearest_id = cand_ids[nearest]
                    tie = (nearest_distance == best[rows]) & (best_ring[rows] == ring)
                    better = (nearest_distance < best[rows]) | (tie & (nearest_id < best_id[rows]))
                    best[rows[better]] = nearest_distance[better]
                    best_id[rows[better]] = nearest_id[better]
                    best_ring[rows[better]] = ring
            ring += 1
        mapping[[student_id for student_id, _ in queries]] = best_id
        bar.update(len(queries))
    bar.close()
