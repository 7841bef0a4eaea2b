"""CDM, Contextual Dynamical Mapping (Chen et al., ACL Findings 2025, arXiv 2502.11104): the KD term.

The alignment (entropy-weighted DTW and the logit groups) is :mod:`mlot_ds.pairing.weighted_dtw`.
This module takes the groups and computes, for every aligned row ``n`` (a group):

1. The group's logits on both sides: a weighted mean of member rows (``CdmGroups``).
2. Each side's top-K ids at that row: ``tau_n`` (teacher) and ``sigma_n`` (student), ``K = top_k``.
3. The **dynamic vocabulary map**, per row and in both directions:
   - T->S: a teacher id ``t`` in ``tau_n`` maps to the student id with the same surface string
     (a static exact-match map, :func:`build_cdm_vocab`); failing that, to the student id ``s``
     in ``sigma_n`` nearest in normalised edit distance ``ED(t, s) / (|t| + |s|)`` (strings with
     spaces removed), provided it is ``< simi_threshold``; else it stays unmapped. Ties: the smaller
     distance, then the student's larger logit at that row, then the lower id.
   - S->T: symmetric, a student id in ``sigma_n`` through the reverse exact map, else the nearest
     among ``tau_n``.
   The map is recomputed every call (stateless; one copy grows its map in place across steps).
4. Two KLs, teacher as the target in both, over the gathered slots of the row:
   ``KL_t2s(n) = KL(softmax_k T_n[tau_nk] || softmax_k S_n[map(tau_nk)] / kd_temperature)`` over the
   mapped slots ``k`` only, and ``KL_s2t(n)`` with teacher ``T_n[map(sigma_nk)]`` and student
   ``S_n[sigma_nk] / kd_temperature``. Unmapped slots are left out of both softmaxes; that is
   exactly what filling them with -1e4 on *both* sides does in the copies, while a one-sided fill
   would leak probability. The teacher is at temperature 1.
5. ``cdm = sum_n (KL_t2s(n) + KL_s2t(n))``: a sum over rows (spec pitfall 7: the copies divide by
   the number of vocabulary slots instead). The engine divides by the global number of student
   response tokens (``tokens``). At the same weight the term is therefore of the order of ``2K``
   (200) times stronger than in the MLM copy, which averages over ``N * 2K`` slots.

Hyper-parameters (spec defaults): ``top_k=100``, ``simi_threshold=0.3``, ``kd_temperature=0.8`` (the
student only). The paper's total is ``alpha * CE + (1 - alpha) * KD`` with ``alpha = 0.9``:
:func:`cdm_term_weights` gives it as term weights; the engine's CE weight is 1, so the method class
(:class:`ContextualDynamicMapping`, at the end) weighs ``cdm`` by ``(1 - alpha) / alpha = 1/9``.
The copies also multiply the teacher's log-probs by ``kd_temperature**2``; that shifts the loss by
a constant (it changes no gradient) and is not done here, so the value is a true KL.

Teacher side (what a cache or a chunked head must provide per teacher response row, see
:class:`TeacherTopK`): the ``Kc >= top_k`` largest logits and their ids, the row's log-sum-exp
(full softmax) and its entropy (for the DTW weights). Group means are formed on log-probabilities
(``logit - logsumexp``), which differ from the copies' mean of logits by a constant per row and so
give the same softmax over any slot set. A member row's log-prob at an id it did not keep is
approximated by the uniform share of its tail, ``log((1 - sum of kept probs) / (V_t - Kc))``
(capped at its smallest kept log-prob). Consequences, all exact when ``Kc = V_t``:
- the group's ``tau`` is the top-K of the mean over the union of its members' kept ids: the top-K
  *of the average* is approximated from the members' top-Ks (exact for single-member groups, the
  common case, whatever ``Kc``);
- a teacher value at an S->T-mapped id that no member kept is that tail approximation.

Student side: the top-K of each group mean is chosen without gradient, reading the member rows in
blocks (``chunk_elements`` logits per block: never an ``[N, V]`` float32 copy of all rows). The
values at the ``K`` ids per direction are then gathered from the member rows with plain autograd:
``[Es, K]`` values per direction (``Es`` = member entries, about the number of response tokens),
whose backward writes one gradient of the logits' shape (as any loss on the logits). No student
log-sum-exp over the vocabulary is needed because both KLs renormalise over the gathered slots. The
student's DTW weights need its per-row entropy, :func:`row_entropy` (one blocked pass, no grad).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Collection, Literal, NamedTuple, Sequence

import numpy as np
import torch

from mlot_ds.fields import PositiveFloat, PositiveInt, UnitInterval
from mlot_ds.losses.ce import labelled_rows
from mlot_ds.losses.method import LogitSource, Method, MethodContext, TeacherOutput, TeacherView
from mlot_ds.losses.ranking import block_elements, compute_dtype_for
from mlot_ds.losses.rowstats import teacher_row_stats
from mlot_ds.pairing.weighted_dtw import EOS_MARKERS, CdmGroups, cdm_align, pack_cdm_groups, paired_edit_distances

TOP_K = 100
SIMI_THRESHOLD = 0.3
KD_TEMPERATURE = 0.8
KD_ALPHA = 0.9
_PAIR_CHUNK = 1 << 20  # candidate pairs examined at once by the near-match search


def cdm_term_weights(kd_alpha: float = KD_ALPHA) -> dict[str, float]:
    """The paper's ``alpha * CE + (1 - alpha) * KD`` as engine term weights: ``{"ce": a, "cdm": 1 - a}``."""
    if not 0.0 <= kd_alpha <= 1.0:
        raise ValueError(f"kd_alpha must lie in [0, 1], got {kd_alpha}")
    return {"ce": kd_alpha, "cdm": 1.0 - kd_alpha}


# -------------------------------------------------------------------------------- vocabularies


class StringTable(NamedTuple):
    """The strings one vocabulary's ids are near-matched by.

    Attributes:
        strings: per id, the compared bytes (surface, or the literal of a non-text token, with
            spaces removed); ``None`` for an id that is never near-matched.
        lengths: ``[V]`` int64 byte lengths (0 for ``None``).
        valid: ``[V]`` bool, ``strings[id] is not None``.
        marker: ``[V]`` bool, the id is an EOS-like marker (used by the exact map's marker fallback).
        objects: ``strings`` as a numpy object array (fast gathers of many strings at once).
    """

    strings: list[bytes | None]
    lengths: np.ndarray
    valid: np.ndarray
    marker: np.ndarray
    objects: np.ndarray


class CdmVocab(NamedTuple):
    """Static tables of one (student, teacher) pair, built once (:func:`build_cdm_vocab`).

    Attributes:
        teacher_to_student: ``[V_t]`` long, exact-match student id of every teacher id, -1 = none.
        student_to_teacher: ``[V_s]`` long, the reverse, -1 = none.
        student, teacher: the :class:`StringTable` of each side.
    """

    teacher_to_student: torch.Tensor
    student_to_teacher: torch.Tensor
    student: StringTable
    teacher: StringTable


def _side_strings(surfaces, literals) -> tuple[list, list[bytes | None]]:
    """Exact-match keys (text and specials kept apart) and the raw compared strings of one side."""
    keys, raw = [], []
    for token_id, surface in enumerate(surfaces):
        if surface is not None:
            keys.append((0, surface))
            raw.append(surface)
            continue
        literal = literals[token_id] if literals is not None else None
        if literal is None:
            keys.append(None)
            raw.append(None)
        else:
            encoded = literal.encode("utf-8")
            keys.append((1, encoded))
            raw.append(encoded)
    return keys, raw


def _exact_map(source_keys, target_keys, source_marker: np.ndarray, target_marker: np.ndarray) -> torch.Tensor:
    first: dict = {}
    for target_id, key in enumerate(target_keys):
        if key is not None:
            first.setdefault(key, target_id)
    markers = np.nonzero(target_marker)[0]
    fallback = int(markers[0]) if markers.size else -1
    out = np.full(len(source_keys), -1, dtype=np.int64)
    for source_id, key in enumerate(source_keys):
        if key is None:
            continue
        target_id = first.get(key, -1)
        if target_id < 0 and source_marker[source_id]:
            target_id = fallback
        out[source_id] = target_id
    return torch.from_numpy(out)


def _table(raw: list[bytes | None], markers: set[bytes], remove_spaces: bool) -> StringTable:
    strings = [None if s is None else (s.replace(b" ", b"") if remove_spaces else s) for s in raw]
    lengths = np.fromiter((0 if s is None else len(s) for s in strings), dtype=np.int64, count=len(strings))
    valid = np.fromiter((s is not None for s in strings), dtype=bool, count=len(strings))
    marker = np.fromiter((s is not None and s in markers for s in raw), dtype=bool, count=len(raw))
    objects = np.empty(len(strings), dtype=object)
    objects[:] = strings
    return StringTable(strings, lengths, valid, marker, objects)


def build_cdm_vocab(
    student_surfaces: Sequence[bytes | None],
    teacher_surfaces: Sequence[bytes | None],
    *,
    student_literals: Sequence[str | None] | None = None,
    teacher_literals: Sequence[str | None] | None = None,
    zero_cost_markers: Collection[bytes] = EOS_MARKERS,
    remove_spaces: bool = True,
) -> CdmVocab:
    """The static exact-match maps and the near-match string tables of a tokenizer pair.

    Exact match compares full surface bytes (spaces kept: `` the`` and ``the`` differ); among ids
    with the same string the lowest wins. A non-text token (surface ``None``) matches the other
    side's non-text token with the same literal; an EOS-like marker without such a counterpart maps
    to the other side's lowest-id marker. The near match compares strings with spaces removed
    (like the copies), so two tokens that differ only by a leading space are at distance 0.

    Args:
        student_surfaces, teacher_surfaces: :func:`mlot_ds.pairing.surface.token_surface_bytes`.
        student_literals, teacher_literals: ``tokenizer.convert_ids_to_tokens(range(V))``, giving
            non-text tokens a string; ``None``: non-text tokens never match.
        zero_cost_markers: EOS-like literals (:data:`mlot_ds.pairing.weighted_dtw.EOS_MARKERS`).
        remove_spaces: strip ASCII spaces before the near-match edit distance.
    """
    markers = set(zero_cost_markers)
    student_keys, student_raw = _side_strings(student_surfaces, student_literals)
    teacher_keys, teacher_raw = _side_strings(teacher_surfaces, teacher_literals)
    student = _table(student_raw, markers, remove_spaces)
    teacher = _table(teacher_raw, markers, remove_spaces)
    return CdmVocab(
        _exact_map(teacher_keys, student_keys, teacher.marker, student.marker),
        _exact_map(student_keys, teacher_keys, student.marker, teacher.marker),
        student,
        teacher,
    )


# ------------------------------------------------------------------------------- teacher rows


class TeacherTopK(NamedTuple):
    """What CDM needs of a teacher, per teacher response row (cacheable).

    Attributes:
        ids: ``[Rt, Kc]`` long, the ``Kc >= top_k`` ids of the largest logits (distinct, any order).
        logits: ``[Rt, Kc]`` their logits (any float dtype; bf16 is enough).
        logsumexp: ``[Rt]`` the row's log-sum-exp over the full vocabulary (temperature 1).
        entropy: ``[Rt]`` the row's full-softmax entropy (nats), for the DTW weights.
        vocab_size: ``V_t``.
    """

    ids: torch.Tensor
    logits: torch.Tensor
    logsumexp: torch.Tensor
    entropy: torch.Tensor
    vocab_size: int


@torch.no_grad()
def row_entropy(logits: torch.Tensor, *, chunk_elements: int | None = None) -> torch.Tensor:
    """Full-softmax entropy of every row of ``logits`` ``[..., V]`` (float32, float64 for float64), no grad."""
    vocab = logits.shape[-1]
    flat = logits.reshape(-1, vocab)
    dtype = compute_dtype_for(logits.dtype)
    out = torch.empty(flat.shape[0], dtype=dtype, device=logits.device)
    step = max(1, block_elements(chunk_elements, logits.device) // max(vocab, 1))
    for start in range(0, flat.shape[0], step):
        z = flat[start : start + step].to(dtype)
        out[start : start + step] = torch.special.entr(torch.softmax(z, dim=1)).sum(dim=1)
    return out.reshape(logits.shape[:-1])


@torch.no_grad()
def teacher_topk(logits: torch.Tensor, k: int = TOP_K, *, chunk_elements: int | None = None) -> TeacherTopK:
    """:class:`TeacherTopK` of the rows of ``logits`` ``[R, V]`` (a live teacher, or a cache builder)."""
    vocab = logits.shape[-1]
    flat = logits.reshape(-1, vocab)
    dtype = compute_dtype_for(logits.dtype)
    if not 1 <= k <= vocab:
        raise ValueError(f"teacher_topk: k must lie in [1, {vocab}], got {k}")
    rows = flat.shape[0]
    ids = torch.empty(rows, k, dtype=torch.long, device=logits.device)
    values = torch.empty(rows, k, dtype=dtype, device=logits.device)
    lse = torch.empty(rows, dtype=dtype, device=logits.device)
    entropy = torch.empty(rows, dtype=dtype, device=logits.device)
    step = max(1, block_elements(chunk_elements, logits.device) // vocab)
    for start in range(0, rows, step):
        z = flat[start : start + step].to(dtype)
        top = z.topk(k, dim=1)
        ids[start : start + step], values[start : start + step] = top.indices, top.values
        lse[start : start + step] = torch.logsumexp(z, dim=1)
        entropy[start : start + step] = torch.special.entr(torch.softmax(z, dim=1)).sum(dim=1)
    return TeacherTopK(ids, values, lse, entropy, vocab)


class _TeacherGroups(NamedTuple):
    top_ids: torch.Tensor  # [N, K] teacher ids, by descending value
    top_values: torch.Tensor  # [N, K] group-mean log-probs there
    keys: torch.Tensor  # [U] sorted group * V_t + id of every id some member kept
    summed: torch.Tensor  # [U] sum_members w * (lp - fill) at those keys
    base: torch.Tensor  # [N] sum_members w * fill
    vocab_size: int

    def at(self, ids: torch.Tensor) -> torch.Tensor:
        """Group-mean log-probs at ``ids`` ``[N, J]`` (teacher ids >= 0)."""
        groups, width = ids.shape
        query = (torch.arange(groups, device=ids.device).unsqueeze(1) * self.vocab_size + ids).reshape(-1)
        position = torch.searchsorted(self.keys, query).clamp(max=self.keys.numel() - 1)
        found = self.keys[position] == query
        extra = torch.where(found, self.summed[position], torch.zeros((), dtype=self.summed.dtype, device=ids.device))
        return self.base.unsqueeze(1) + extra.view(groups, width)


def _teacher_groups(teacher: TeacherTopK, groups: CdmGroups, k: int, device) -> _TeacherGroups:
    dtype = compute_dtype_for(teacher.logits.dtype)
    ids = teacher.ids.to(device=device, dtype=torch.long)
    log_probs = teacher.logits.to(device, dtype) - teacher.logsumexp.to(device, dtype).unsqueeze(1)
    vocab, kept = teacher.vocab_size, ids.shape[1]
    if kept < vocab:
        tail = (1.0 - log_probs.exp().sum(dim=1)).clamp(min=torch.finfo(dtype).tiny)
        fill = torch.minimum(tail.log() - math.log(vocab - kept), log_probs.min(dim=1).values)
    else:  # every id is kept by every row: the mean is exact and needs no fill
        fill = torch.zeros(ids.shape[0], dtype=dtype, device=device)
    rows, group = groups.teacher_row, groups.teacher_group
    weight = groups.teacher_weight.to(dtype)
    count = groups.num_groups
    base = torch.zeros(count, dtype=dtype, device=device).index_add_(0, group, weight * fill[rows])
    entry_keys = (group.unsqueeze(1) * vocab + ids[rows]).reshape(-1)
    entry_values = (weight.unsqueeze(1) * (log_probs[rows] - fill[rows].unsqueeze(1))).reshape(-1)
    keys, inverse = torch.unique(entry_keys, sorted=True, return_inverse=True)
    summed = torch.zeros(keys.numel(), dtype=dtype, device=device).index_add_(0, inverse, entry_values)
    key_group = torch.div(keys, vocab, rounding_mode="floor")
    values = base[key_group] + summed
    # top-k per group: by group, then value descending, then id ascending (both sorts are stable)
    order = torch.sort(values, descending=True, stable=True).indices
    order = order[torch.sort(key_group[order], stable=True).indices]
    per_group = torch.bincount(key_group, minlength=count)
    if count and int(per_group.min()) < k:
        raise ValueError(f"a CDM group has {int(per_group.min())} teacher ids, fewer than top_k={k} "
                         "(every group needs a teacher member with at least top_k kept ids)")
    start = torch.cumsum(per_group, 0) - per_group
    rank = torch.arange(order.numel(), device=device) - start[key_group[order]]
    chosen = order[rank < k]
    top_ids = (keys[chosen] - key_group[chosen] * vocab).view(count, k)
    return _TeacherGroups(top_ids, values[chosen].view(count, k), keys, summed, base, vocab)


# ------------------------------------------------------------------------------- student rows


def _student_topk(flat: torch.Tensor, groups: CdmGroups, k: int, dtype, chunk_elements) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k ids and values of every group's mean student row, ``[N, k]`` each, without gradient."""
    vocab, count = flat.shape[1], groups.num_groups
    step = max(1, block_elements(chunk_elements, flat.device) // vocab)
    bounds = torch.searchsorted(groups.student_group, torch.arange(count + 1, device=flat.device)).tolist()
    ids = torch.empty(count, k, dtype=torch.long, device=flat.device)
    values = torch.empty(count, k, dtype=dtype, device=flat.device)
    with torch.no_grad():
        for g0 in range(0, count, step):
            g1 = min(count, g0 + step)
            e0, e1 = bounds[g0], bounds[g1]
            rows = flat.index_select(0, groups.student_row[e0:e1]).to(dtype)
            rows = rows * groups.student_weight[e0:e1].to(dtype).unsqueeze(1)
            mean = torch.zeros(g1 - g0, vocab, dtype=dtype, device=flat.device)
            mean.index_add_(0, groups.student_group[e0:e1] - g0, rows)
            top = mean.topk(k, dim=1)
            ids[g0:g1], values[g0:g1] = top.indices, top.values
    return ids, values


def _student_values(flat: torch.Tensor, groups: CdmGroups, ids: torch.Tensor, dtype) -> torch.Tensor:
    """Group-mean student logits at ``ids`` ``[N, J]`` (ids >= 0), differentiable w.r.t. ``flat``."""
    picked = flat[groups.student_row.unsqueeze(1), ids[groups.student_group]].to(dtype)
    weighted = picked * groups.student_weight.to(dtype).unsqueeze(1)
    return torch.zeros(ids.shape, dtype=dtype, device=flat.device).index_add(0, groups.student_group, weighted)


# -------------------------------------------------------------------------------- dynamic map


def near_match_map(
    source_ids: torch.Tensor,
    exact: torch.Tensor,
    candidate_ids: torch.Tensor,
    candidate_scores: torch.Tensor,
    source: StringTable,
    candidates: StringTable,
    *,
    simi_threshold: float = SIMI_THRESHOLD,
    backend: str = "auto",
) -> torch.Tensor:
    """One direction of CDM's dynamic map: every slot's target id, or -1.

    ``out[n, k] = exact[source_ids[n, k]]`` if that is >= 0; otherwise the candidate
    ``c in candidate_ids[n]`` with the smallest ``ED(src, c) / (|src| + |c|)`` below
    ``simi_threshold`` (ties: larger ``candidate_scores``, then lower id); two strings that are empty
    once spaces are removed are at distance 0; ids without a string never near-match. (EOS-like
    markers need no rule here: :func:`build_cdm_vocab` already maps them exactly.)

    Args:
        source_ids: ``[N, K]`` ids of the source vocabulary (e.g. the teacher's top-K per row).
        exact: ``[V_source]`` long exact-match map into the target vocabulary (-1 = none).
        candidate_ids: ``[N, Kc]`` target ids per row (e.g. the student's top-K there).
        candidate_scores: ``[N, Kc]`` the target side's values at those ids (tie-break only).
        source, candidates: the two :class:`StringTable`.
    """
    out = exact.to(source_ids.device)[source_ids]
    missing = (out < 0).nonzero()
    if missing.numel() == 0 or candidate_ids.shape[1] == 0:
        return out
    rows_np, slots_np = missing[:, 0].cpu().numpy(), missing[:, 1].cpu().numpy()
    src_all = source_ids.cpu().numpy()[rows_np, slots_np]
    cand_np = candidate_ids.cpu().numpy()
    score_np = candidate_scores.detach().to("cpu", torch.float64).numpy()
    width = cand_np.shape[1]
    chosen = np.full(rows_np.size, -1, dtype=np.int64)
    owners_per_chunk = max(1, _PAIR_CHUNK // width)
    for begin in range(0, rows_np.size, owners_per_chunk):
        stop = min(rows_np.size, begin + owners_per_chunk)
        owner = np.repeat(np.arange(begin, stop), width)
        src = np.repeat(src_all[begin:stop], width)
        cand = cand_np[rows_np[begin:stop]].reshape(-1)
        score = score_np[rows_np[begin:stop]].reshape(-1)
        la, lb = source.lengths[src], candidates.lengths[cand]
        usable = source.valid[src] & candidates.valid[cand]
        distance = np.full(owner.size, np.inf)
        # Two strings that are empty without their spaces: ED 0 over max(0, 1), distance 0 (the copies).
        safe_total = np.maximum(la + lb, 1)
        # ED >= |la - lb| and float division is monotone: pairs failing this bound cannot pass.
        need = usable & (np.abs(la - lb) / safe_total < simi_threshold)
        where = np.nonzero(need)[0]
        if where.size:  # each distinct (source id, candidate id) pair is compared once
            span = np.int64(len(candidates.strings))
            unique_keys, inverse = np.unique(src[where] * span + cand[where], return_inverse=True)
            edits = paired_edit_distances(source.objects[unique_keys // span].tolist(),
                                          candidates.objects[unique_keys % span].tolist(), backend=backend)
            distance[where] = edits[inverse.reshape(-1)] / safe_total[where]
        accept = np.nonzero(distance < simi_threshold)[0]
        if accept.size == 0:
            continue
        order = np.lexsort((cand[accept], -score[accept], distance[accept], owner[accept]))
        ranked = accept[order]
        first = np.ones(ranked.size, dtype=bool)
        first[1:] = owner[ranked][1:] != owner[ranked][:-1]
        best = ranked[first]
        chosen[owner[best]] = cand[best]
    hit = chosen >= 0
    if hit.any():
        index = torch.from_numpy(np.nonzero(hit)[0]).to(missing.device)
        out[missing[index, 0], missing[index, 1]] = torch.from_numpy(chosen[hit]).to(out.device)
    return out


# --------------------------------------------------------------------------------------- loss


def _slot_kl(teacher_values: torch.Tensor, student_values: torch.Tensor, mapped: torch.Tensor) -> torch.Tensor:
    """Per-row ``KL(softmax(t) || softmax(s))`` over the mapped slots only; rows without one are dropped."""
    keep = mapped.any(dim=1)
    t, s, m = teacher_values[keep], student_values[keep], mapped[keep]
    minus_inf = torch.tensor(float("-inf"), dtype=t.dtype, device=t.device)
    t_log = t - torch.logsumexp(torch.where(m, t, minus_inf), dim=1, keepdim=True)
    s_log = s - torch.logsumexp(torch.where(m, s, minus_inf.to(s.dtype)), dim=1, keepdim=True)
    p = t_log.exp() * m
    return (p * (t_log - s_log)).sum(dim=1)


def cdm_kd(
    student_logits: torch.Tensor,
    teacher: TeacherTopK,
    groups: CdmGroups,
    vocab: CdmVocab,
    *,
    top_k: int = TOP_K,
    simi_threshold: float = SIMI_THRESHOLD,
    kd_temperature: float = KD_TEMPERATURE,
    chunk_elements: int | None = None,
    backend: str = "auto",
) -> dict[str, torch.Tensor]:
    """CDM's KD sum over the aligned rows of a micro-batch (module docstring).

    Args:
        student_logits: ``[..., V_s]`` student logits; ``groups.student_row`` indexes its rows
            flattened to ``[-1, V_s]`` (e.g. ``b * T + t``).
        teacher: the teacher's rows (:class:`TeacherTopK`); ``groups.teacher_row`` indexes them.
            No gradient flows to the teacher.
        groups: the packed groups (:func:`mlot_ds.pairing.weighted_dtw.pack_cdm_groups`).
        vocab: :func:`build_cdm_vocab` of the pair.
        top_k: candidates per row and side (``K``); at most ``V_s`` and the teacher's ``Kc``.
        simi_threshold: the near match needs ``ED / (|a| + |b|) < simi_threshold``.
        kd_temperature: divides the student's logits only.
        chunk_elements: logits per block when choosing the student's top-K (``None``: per device).
        backend: edit-distance backend for the near match (``auto``, ``rapidfuzz``, ``numpy``).

    Returns:
        ``{"cdm": sum over rows of KL_t2s + KL_s2t (float32, float64 for float64 logits),
        "tokens": student response tokens (the divisor), "rows": aligned rows N,
        "cdm_t2s", "cdm_s2t": the two sums (detached), "mapped_t2s", "mapped_s2t": mapped slots}``.
    """
    vocab_s = student_logits.shape[-1]
    flat = student_logits.reshape(-1, vocab_s)
    device, dtype = flat.device, compute_dtype_for(student_logits.dtype)
    if not kd_temperature > 0:
        raise ValueError(f"kd_temperature must be > 0, got {kd_temperature}")
    if not 1 <= top_k <= min(vocab_s, teacher.ids.shape[1]):
        raise ValueError(f"top_k={top_k} must lie in [1, min(V_s={vocab_s}, teacher kept ids={teacher.ids.shape[1]})]")
    if vocab.student_to_teacher.numel() != vocab_s or vocab.teacher_to_student.numel() != teacher.vocab_size:
        raise ValueError(f"vocabulary tables ({vocab.student_to_teacher.numel()}, {vocab.teacher_to_student.numel()}) "
                         f"do not match V_s={vocab_s}, V_t={teacher.vocab_size}")
    groups = groups.to(device)
    tokens = torch.tensor(float(groups.student_tokens), device=device)
    if groups.num_groups == 0:
        zero = flat[:0].to(dtype).sum()
        return {"cdm": zero, "tokens": tokens, "rows": torch.zeros((), device=device), "cdm_t2s": zero.detach(),
                "cdm_s2t": zero.detach(), "mapped_t2s": torch.zeros((), device=device),
                "mapped_s2t": torch.zeros((), device=device)}
    if groups.student_group.numel() > 1 and bool((groups.student_group[1:] < groups.student_group[:-1]).any()):
        raise ValueError("groups.student_group must be sorted (as cdm_groups and pack_cdm_groups build it)")

    with torch.no_grad():
        teacher_groups = _teacher_groups(teacher, groups, top_k, device)
        tau, tau_values = teacher_groups.top_ids, teacher_groups.top_values
        sigma, sigma_values = _student_topk(flat, groups, top_k, dtype, chunk_elements)
        t2s = near_match_map(tau, vocab.teacher_to_student, sigma, sigma_values, vocab.teacher, vocab.student,
                             simi_threshold=simi_threshold, backend=backend)
        s2t = near_match_map(sigma, vocab.student_to_teacher, tau, tau_values, vocab.student, vocab.teacher,
                             simi_threshold=simi_threshold, backend=backend)
        teacher_at_s2t = teacher_groups.at(s2t.clamp(min=0))

    t2s_mapped, s2t_mapped = t2s >= 0, s2t >= 0
    student_at_t2s = _student_values(flat, groups, t2s.clamp(min=0), dtype) / kd_temperature
    student_at_sigma = _student_values(flat, groups, sigma, dtype) / kd_temperature
    kl_t2s = _slot_kl(tau_values.to(dtype), student_at_t2s, t2s_mapped).sum()
    kl_s2t = _slot_kl(teacher_at_s2t.to(dtype), student_at_sigma, s2t_mapped).sum()
    return {
        "cdm": kl_t2s + kl_s2t,
        "tokens": tokens,
        "rows": torch.tensor(float(groups.num_groups), device=device),
        "cdm_t2s": kl_t2s.detach(),
        "cdm_s2t": kl_s2t.detach(),
        "mapped_t2s": t2s_mapped.sum().to(torch.float32),
        "mapped_s2t": s2t_mapped.sum().to(torch.float32),
    }


# ------------------------------------------------------------------------------------ the method


@dataclass(frozen=True)
class CdmParams:
    top_k: PositiveInt = TOP_K
    """Candidates per aligned row and side, ``K`` (the copies' ``topk``: 100); also the teacher ids kept per row."""
    simi_threshold: UnitInterval = SIMI_THRESHOLD
    """The near match needs ``ED(a, b) / (|a| + |b|) < simi_threshold`` (the copies: 0.3)."""
    kd_temperature: PositiveFloat = KD_TEMPERATURE
    """Divides the student's logits only; the teacher stays at temperature 1 (the copies: 0.8)."""
    merge: Literal["teacher_lists", "components"] = "teacher_lists"
    """How the DTW path becomes logit groups: ``teacher_lists`` (the copies' rule: every distinct list of
    student tokens aligned to one teacher token) or ``components`` (the path's connected components)."""


class CdmTeacher(NamedTuple):
    """CDM's teacher side of one micro-batch, per teacher response row (padded ``[B, P]``).

    Attributes:
        ids: ``[B, P, K]`` long, the ``K = top_k`` ids of the row's largest logits, descending.
        log_probs: ``[B, P, K]`` the full-softmax log-probabilities at those ids (float32; float64 for a
            float64 teacher).
        entropy: ``[B, P]`` the row's full-softmax entropy (DTW weights), same dtype.
        mask: ``[B, P]`` bool, real rows; column ``p`` of sequence ``b`` is the row that predicts its
            ``p``-th labelled token.
        vocab_size: ``V_t``, the teacher's output width (for the tail approximation of group means).
    """

    ids: torch.Tensor
    log_probs: torch.Tensor
    entropy: torch.Tensor
    mask: torch.Tensor
    vocab_size: int

    def flat(self) -> TeacherTopK:
        """The real rows in row-major order (sequence, then position) as a :class:`TeacherTopK`."""
        log_probs = self.log_probs[self.mask]
        return TeacherTopK(self.ids[self.mask], log_probs, torch.zeros(log_probs.shape[0], dtype=log_probs.dtype,
                                                                        device=log_probs.device),
                           self.entropy[self.mask], self.vocab_size)


class _Labelled(NamedTuple):
    rows: torch.Tensor  # [R] flat logit rows b * T + t, ascending (sequence-major)
    targets: torch.Tensor  # [R] the token ids they predict
    starts: list[int]  # [B + 1] offsets of each sequence's rows
    seq_len: int


def _labelled(labels: torch.Tensor) -> _Labelled:
    rows, targets = labelled_rows(labels)
    batch, seq_len = labels.shape
    counts = torch.bincount(torch.div(rows, seq_len, rounding_mode="floor"), minlength=batch).tolist()
    return _Labelled(rows, targets, [0, *np.cumsum(counts).tolist()], seq_len)


def _padded_rows(side: _Labelled, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index [B, P], mask [B, P])``: per sequence, its labelled rows' positions ``t``, in order."""
    counts = [side.starts[b + 1] - side.starts[b] for b in range(batch)]
    width = max(counts, default=0)
    device = side.rows.device
    mask = torch.arange(width, device=device).unsqueeze(0) < torch.tensor(counts, device=device).unsqueeze(1)
    index = torch.zeros(batch, width, dtype=torch.long, device=device)
    index[mask] = side.rows % side.seq_len
    return index, mask


def _special_table(surfaces: Sequence[bytes | None], vocab: int) -> np.ndarray:
    """``[V]`` bool: the id has no text (a special token, or an output row beyond the tokenizer)."""
    special = np.ones(vocab, dtype=bool)
    special[: len(surfaces)] = np.fromiter((s is None for s in surfaces), dtype=bool, count=len(surfaces))
    return special


class ContextualDynamicMapping(Method):
    """CDM (Chen et al., ACL Findings 2025): entropy-weighted DTW groups, a per-row dynamic top-K
    vocabulary map in both directions, and two slot KLs per aligned row (module docstring).

    ``cdm = sum over aligned rows of KL_t2s + KL_s2t``, divided by this teacher's global count of the
    student response tokens CDM aligns (``tokens``). Default weight ``(1 - 0.9) / 0.9 = 1/9``: the
    paper's ``0.9 * CE + 0.1 * KD`` relative to the engine's CE weight 1, with KD a per-token KL (the
    scale of every other KL here). The MLM copy instead averages one KL over the ``2K`` concatenated
    slots of every row, which makes its KD about ``1 / (2K)`` of ours at the same weight (measured on
    the tiny zoo at K = 100: 205 times weaker; at that scale KD would be about 1e-3 of the CE, nearly
    inert). ``weights.cdm`` of about ``1 / (9 * 2K)`` = 5.6e-4 reproduces the copy's strength.

    Any pairing rule: its pairs are not read (CDM aligns by its own DTW, after the student forward).

    Tokens aligned: every labelled token of both sides (the response, and the final EOS when a side
    appends one), except that a final special token (EOS) is left out on a side whose partner does not
    end with one: an EOS is aligned with an EOS, never with a text token. When both ends are special,
    that (student id, teacher id) pair is added to the micro-batch's exact map (the copies' EOS-marker
    rule, as the tokenizers' special literals are not part of :class:`MethodContext`). Specials are
    the empty string in the DTW (two EOS cost 0 against each other) and never near-match.

    Teacher side (:meth:`teacher`, cacheable): per labelled teacher row, the top-``top_k`` ids with
    their full-softmax log-probs, and the row's entropy, through ``source.read`` a block of rows at a
    time (one ``[rows, V_t]`` block alive; never ``[B, T, V]``); the gold CE comes from the same pass.
    The cache stores those arrays as they are (int32 ids, float32 log-probs and entropies): a cached
    run equals the live one exactly, given the same teacher logits.

    Student side (:meth:`student`), every step after the forward (the DTW weights depend on the
    student's current entropies): its entropies at the response rows (no grad, blocked), one weighted
    DTW per sequence, the groups, then :func:`cdm_kd`. CPU cost per step, per sequence of ``Rs`` and
    ``Rt`` response tokens: ``Rs * Rt`` edit distances between distinct token strings (rapidfuzz, or a
    vectorised numpy table), a DTW of ``Rs + Rt`` vectorised anti-diagonal steps and a backtrack in
    Python; then per aligned row up to ``2K`` exact-map lookups and, for the unmapped slots, up to
    ``K`` near-match candidates each (pre-filtered by length, each distinct string pair once). Measured
    on one core of a busy 2-core CPU (GPT-2's 50k vocabulary on both sides with a third of the teacher
    strings changed, random logits, ``K = 100``): about 3 ms per aligned row, almost all of it the near
    match (rapidfuzz); e.g. 2 sequences of 512 tokens: student side 3.1 s forward (2.6 s near match,
    0.25 s entropies, 0.2 s top-K) + 0.5 s backward, teacher side 1.1 s; 1 x 256 tokens: 0.8 s + 0.1 s,
    teacher 0.4 s. The DTW itself is a few percent. The vocabulary tables are built once per run, on
    first use (0.1 s at 50k ids).
    """

    name = "cdm"
    Params = CdmParams
    terms = ("cdm",)
    denominator = "tokens"
    needs = frozenset({"surfaces"})
    description = "CDM: entropy-weighted DTW + per-row dynamic top-K vocabulary map, two KLs (Chen et al. 2025)"

    def __init__(self, params=None, weights=None, context=None):
        super().__init__(params, weights, context or MethodContext())
        self._tables = None
        self._vocab_cache: dict = {}

    @classmethod
    def default_weights(cls, params) -> dict[str, float]:
        return {"cdm": (1.0 - KD_ALPHA) / KD_ALPHA}  # 0.9 * CE + 0.1 * KD with the engine's CE weight 1

    @classmethod
    def check(cls, params, context) -> None:
        if context is None:
            return
        if context.student_surfaces is None or context.teacher_surfaces is None:
            raise ValueError("loss 'cdm' needs the token surfaces of both tokenizers")
        for side, vocab in (("student", context.student_vocab), ("teacher", context.teacher_vocab)):
            if vocab is not None and params.top_k > vocab:
                raise ValueError(f"top_k={params.top_k} exceeds the {side}'s vocabulary ({vocab} ids); lower loss.top_k")

    # ---------------------------------------------------------------------------------- tables

    def _static(self):
        """The student/teacher tables of the run, built on first use."""
        if self._tables is None:
            context = self.context
            if context.student_surfaces is None or context.teacher_surfaces is None:
                raise ValueError("loss 'cdm' needs MethodContext.student_surfaces and teacher_surfaces")
            s_surf, t_surf = list(context.student_surfaces), list(context.teacher_surfaces)
            s_vocab = max(len(s_surf), context.student_vocab or 0)
            t_vocab = max(len(t_surf), context.teacher_vocab or 0)
            s_surf += [None] * (s_vocab - len(s_surf))
            t_surf += [None] * (t_vocab - len(t_surf))
            vocab = build_cdm_vocab(s_surf, t_surf)
            strings = []
            for surfaces in (s_surf, t_surf):
                table = np.empty(len(surfaces), dtype=object)
                table[:] = [b"" if s is None else s for s in surfaces]
                strings.append(table)
            self._tables = (vocab, strings[0], strings[1], _special_table(s_surf, s_vocab), _special_table(t_surf, t_vocab))
        return self._tables

    def _vocab_for(self, eos_pairs: frozenset) -> CdmVocab:
        """The static maps, plus this micro-batch's (student EOS, teacher EOS) pairs where they have none."""
        vocab = self._static()[0]
        if not eos_pairs:
            return vocab
        if eos_pairs not in self._vocab_cache:
            t2s, s2t = vocab.teacher_to_student.clone(), vocab.student_to_teacher.clone()
            for s_id, t_id in sorted(eos_pairs):
                if t2s[t_id] < 0:
                    t2s[t_id] = s_id
                if s2t[s_id] < 0:
                    s2t[s_id] = t_id
            self._vocab_cache[eos_pairs] = vocab._replace(teacher_to_student=t2s, student_to_teacher=s2t)
        return self._vocab_cache[eos_pairs]

    def _aligned(self, view: TeacherView):
        """Both sides' labelled tokens, and per sequence how many of each CDM aligns (the EOS rule)."""
        _, _, _, s_special, t_special = self._static()
        student, teacher = _labelled(view.student.labels), _labelled(view.teacher.labels)
        s_targets, t_targets = student.targets.cpu().numpy(), teacher.targets.cpu().numpy()
        keep_s, keep_t, eos_pairs = [], [], set()
        for b in range(view.student.labels.shape[0]):
            s0, s1 = student.starts[b], student.starts[b + 1]
            t0, t1 = teacher.starts[b], teacher.starts[b + 1]
            s_end = s1 > s0 and bool(s_special[s_targets[s1 - 1]])
            t_end = t1 > t0 and bool(t_special[t_targets[t1 - 1]])
            keep_s.append(s1 - s0 - int(s_end and not t_end))
            keep_t.append(t1 - t0 - int(t_end and not s_end))
            if s_end and t_end:
                eos_pairs.add((int(s_targets[s1 - 1]), int(t_targets[t1 - 1])))
        return student, teacher, keep_s, keep_t, frozenset(eos_pairs)

    # ---------------------------------------------------------------------------- engine calls

    def teacher(self, source: LogitSource, view: TeacherView, gold: bool) -> TeacherOutput:
        labels = view.teacher.labels.to(source.device)
        side = _labelled(labels)
        batch, vocab = labels.shape[0], source.shape[2]
        if self.params.top_k > vocab:
            raise ValueError(f"loss 'cdm': top_k={self.params.top_k} exceeds the teacher's vocabulary ({vocab} ids)")
        stats = teacher_row_stats(source.read, side.rows, vocab=vocab, targets=side.targets if gold else None,
                                  topk=self.params.top_k, entropy=True, rows_per_block=source.rows_per_block())
        _, mask = _padded_rows(side, batch)
        k, dtype = self.params.top_k, stats["lse"].dtype  # float32 (float64 for a float64 teacher)
        ids = torch.zeros(*mask.shape, k, dtype=torch.long, device=source.device)
        log_probs = torch.zeros(*mask.shape, k, dtype=dtype, device=source.device)
        entropy = torch.zeros(mask.shape, dtype=dtype, device=source.device)
        ids[mask], log_probs[mask], entropy[mask] = stats["topk_ids"], stats["topk_log_probs"], stats["entropy"]
        gold_ce = None
        if gold:
            sequence = torch.div(side.rows, side.seq_len, rounding_mode="floor")
            ce = torch.zeros(batch, dtype=dtype, device=source.device).index_add_(0, sequence, -stats["target_log_prob"])
            gold_ce = {"ce": ce.float(), "tokens": mask.sum(dim=1).to(torch.float32)}
        return TeacherOutput(CdmTeacher(ids, log_probs, entropy, mask, vocab), gold_ce)

    def counts(self, reduced: CdmTeacher, view: TeacherView) -> dict[str, float]:
        return {"tokens": float(sum(self._aligned(view)[2]))}

    def student(self, logits, reduced: CdmTeacher, view: TeacherView, ce_labels=None) -> dict[str, torch.Tensor]:
        vocab, s_strings, t_strings, _, _ = self._static()
        student, teacher, keep_s, keep_t, eos_pairs = self._aligned(view)
        flat_logits = logits.reshape(-1, logits.shape[-1])
        s_rows = torch.cat([student.rows[student.starts[b] : student.starts[b] + n] for b, n in enumerate(keep_s)]) \
            if keep_s else student.rows[:0]
        s_entropy = _rows_entropy(flat_logits, s_rows.to(flat_logits.device)).cpu().numpy()
        teacher_rows = reduced.flat()
        t_entropy = teacher_rows.entropy.detach().cpu().numpy()
        s_targets, t_targets = student.targets.cpu().numpy(), teacher.targets.cpu().numpy()
        groups, student_rows, teacher_rows_of = [], [], []
        done = 0
        for b, (ns, nt) in enumerate(zip(keep_s, keep_t)):
            s0, t0 = student.starts[b], teacher.starts[b]
            groups.append(cdm_align(list(s_strings[s_targets[s0 : s0 + ns]]), list(t_strings[t_targets[t0 : t0 + nt]]),
                                    s_entropy[done : done + ns], t_entropy[t0 : t0 + nt], merge=self.params.merge))
            student_rows.append(student.rows[s0 : s0 + ns].cpu())
            teacher_rows_of.append(torch.arange(t0, t0 + nt))
            done += ns
        packed = pack_cdm_groups(groups, student_rows, teacher_rows_of)
        out = cdm_kd(logits, teacher_rows, packed, self._vocab_for(eos_pairs), top_k=self.params.top_k,
                     simi_threshold=self.params.simi_threshold, kd_temperature=self.params.kd_temperature)
        return {"cdm": out["cdm"]}

    # ---------------------------------------------------------------------------- offline cache

    def cache_settings(self) -> dict:
        return {"kind": self.name, "top_k": self.params.top_k}  # the other parameters act on the student side

    def cache_rows(self, view: TeacherView) -> tuple[torch.Tensor, torch.Tensor]:
        return _padded_rows(_labelled(view.teacher.labels), view.teacher.labels.shape[0])

    def to_cache(self, reduced: CdmTeacher, view: TeacherView):
        batch = reduced.mask.shape[0]
        return ({"vocab_size": torch.full((batch,), reduced.vocab_size, dtype=torch.long)},
                {"ids": reduced.ids.to(torch.int32), "log_probs": reduced.log_probs.float(), "entropy": reduced.entropy.float()})

    def from_cache(self, records, rows, view: TeacherView) -> CdmTeacher:
        _, mask = self.cache_rows(view)
        vocab = int(records["vocab_size"].max()) if records["vocab_size"].numel() else 0
        if vocab == 0:  # only filler rows (zeros): no row is read, but the tables' width is checked
            vocab = int(self._static()[0].teacher_to_student.numel())
        return CdmTeacher(rows["ids"].long(), rows["log_probs"].float(), rows["entropy"].float(), mask.to(rows["ids"].device),
                          vocab)


@torch.no_grad()
def _rows_entropy(flat: torch.Tensor, rows: torch.Tensor, chunk_elements: int | None = None) -> torch.Tensor:
    """Full-softmax entropy of the rows ``rows`` of ``flat`` ``[N, V]``, a block of rows at a time."""
    step = max(1, block_elements(chunk_elements, flat.device) // max(flat.shape[1], 1))
    parts = [row_entropy(flat.index_select(0, rows[i : i + step])) for i in range(0, rows.numel(), step)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=compute_dtype_for(flat.dtype), device=flat.device)


__all__ = [
    "KD_ALPHA",
    "KD_TEMPERATURE",
    "SIMI_THRESHOLD",
    "TOP_K",
    "CdmParams",
    "CdmTeacher",
    "CdmVocab",
    "ContextualDynamicMapping",
    "StringTable",
    "TeacherTopK",
    "build_cdm_vocab",
    "cdm_kd",
    "cdm_term_weights",
    "near_match_map",
    "row_entropy",
    "teacher_topk",
]
