"""VocAgnoLM (Shin, Ji, Liu, Gong, ICML 2025, arXiv 2503.19123): teacher-guided token selection.

The teacher is an importance oracle, not a distribution to match (paper sec. 3, "Teacher Guided Loss";
spec section 6). Each student token ``i`` is mapped to the teacher tokens whose byte spans overlap its
own (:func:`mlot_ds.pairing.overlaps.token_overlaps`, the paper's token-level lexical alignment),
a contiguous range ``M(i) = [lo_i, hi_i)``. With per-token cross-entropies ``CE_S(i)`` (student, token
``i`` predicted from the row before it) and ``CE_T(j)`` (teacher):

    s_i = CE_S(i) - agg_{j in M(i)} CE_T(j),      agg in {max (paper's best, Table 3), mean, min}

The selection keeps the ``ceil(top_fraction * |mapped|)`` mapped tokens with the largest excess loss
``s_i`` (ties: lower flat index ``b * N + i`` first), plus EVERY unmapped token (``M(i)`` empty, e.g.
special tokens; "include" was best in Table 3). ``top_fraction = 0.4`` (top-k 40%, the paper's
implementation details, as reported in the spec). The selection is a stop-gradient mask; the loss is

    L = sum_{i in selected} CE_S(i)

returned as a sum with the selected count; the engine divides by the global count. The count depends
on the alignment only (:func:`vocagnolm_selected_count`), so it is known before the student forward.

Selection scope: per call, i.e. per micro-batch on each rank (as Rho-1 selects within its batch); a
global threshold across ranks and accumulation steps would need the scores of all of them first.

With the same tokenizer on both sides, ``M(i) = {i}`` and any aggregation gives ``s_i = CE_S(i) -
CE_T(i)``: Rho-1's excess loss with the teacher as reference model (Lin et al. 2024).

The method class (:class:`VocAgnoLM`, ``loss.kind: vocagnolm``) reads the data pipeline's
``overlaps`` view (the ranges above, over the student's labelled tokens: response then EOS) and the
teacher's per-token CE at its labelled tokens; see its docstring for the engine's side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Literal

import torch

from mlot_ds.fields import Range
from mlot_ds.losses.ce import masked_ce
from mlot_ds.losses.method import LogitSource, Method, TeacherOutput, TeacherView
from mlot_ds.losses.rowstats import student_token_stats, teacher_token_stats
from mlot_ds.pairing import IGNORE_INDEX

AGGREGATIONS = ("max", "mean", "min")


def keep_count(mapped: int, top_fraction: float) -> int:
    """``ceil(top_fraction * mapped)``, computed on the product rounded to 1e-9 (so 0.7 * 10 keeps 7)."""
    return math.ceil(round(top_fraction * mapped, 9))


def _check(student_mask: torch.Tensor, teacher_range: torch.Tensor, top_fraction: float) -> None:
    if student_mask.dim() != 2 or student_mask.dtype != torch.bool:
        raise ValueError(f"student_mask must be a BoolTensor [B, Ns], got {student_mask.dtype} "
                         f"{tuple(student_mask.shape)}")
    if teacher_range.shape != (*student_mask.shape, 2) or teacher_range.dtype != torch.long:
        raise ValueError(f"teacher_range must be a LongTensor [B, Ns, 2] = {(*student_mask.shape, 2)}, got "
                         f"{teacher_range.dtype} {tuple(teacher_range.shape)}")
    if not 0 < top_fraction <= 1:
        raise ValueError(f"top_fraction must lie in (0, 1], got {top_fraction}")


def _mapped(teacher_range: torch.Tensor, student_mask: torch.Tensor) -> torch.Tensor:
    return student_mask & (teacher_range[..., 1] > teacher_range[..., 0])


def vocagnolm_selected_count(teacher_range: torch.Tensor, student_mask: torch.Tensor, *,
                             top_fraction: float = 0.4) -> int:
    """Number of tokens :func:`vocagnolm` selects: ``ceil(top_fraction * mapped) + unmapped``.

    Args:
        teacher_range: ``[B, Ns, 2]`` long teacher token range ``[lo, hi)`` per student token.
        student_mask: ``[B, Ns]`` bool, the student tokens that are scored at all.
        top_fraction: fraction of the mapped tokens kept.
    """
    _check(student_mask, teacher_range, top_fraction)
    mapped = int(_mapped(teacher_range, student_mask).sum())
    return keep_count(mapped, top_fraction) + int(student_mask.sum()) - mapped


def aggregate_teacher_ce(teacher_ce: torch.Tensor, teacher_range: torch.Tensor, selected: torch.Tensor, *,
                         aggregation: str = "max") -> torch.Tensor:
    """``agg_{j in [lo, hi)} teacher_ce[b, j]`` for every token of ``selected`` (flat order), ``[n]``.

    Every selected token must have a non-empty range inside ``[0, Nt)``.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; choose one of {AGGREGATIONS}")
    batch = torch.arange(selected.shape[0], device=selected.device).unsqueeze(1).expand_as(selected)[selected]
    lo, hi = teacher_range[..., 0][selected], teacher_range[..., 1][selected]
    if lo.numel() and (int(lo.min()) < 0 or int(hi.max()) > teacher_ce.shape[1]):
        raise ValueError(f"teacher ranges reach outside [0, {teacher_ce.shape[1]})")
    lengths = hi - lo
    segment = torch.repeat_interleave(torch.arange(lo.numel(), device=lo.device), lengths)
    starts = torch.cumsum(lengths, 0) - lengths
    teacher_index = lo[segment] + torch.arange(segment.numel(), device=lo.device) - starts[segment]
    values = teacher_ce[batch[segment], teacher_index]
    reduce = {"max": "amax", "min": "amin", "mean": "mean"}[aggregation]
    return values.new_zeros(lo.numel()).scatter_reduce_(0, segment, values, reduce=reduce, include_self=False)


def vocagnolm_selection(
    student_ce: torch.Tensor,
    teacher_ce: torch.Tensor,
    teacher_range: torch.Tensor,
    student_mask: torch.Tensor,
    *,
    top_fraction: float = 0.4,
    aggregation: str = "max",
) -> torch.Tensor:
    """The selected tokens ``[B, Ns]`` bool (no gradient): top ``top_fraction`` mapped by excess loss + unmapped."""
    _check(student_mask, teacher_range, top_fraction)
    if student_ce.shape != student_mask.shape or teacher_ce.dim() != 2 or teacher_ce.shape[0] != student_ce.shape[0]:
        raise ValueError(f"student_ce {tuple(student_ce.shape)} must match student_mask {tuple(student_mask.shape)} "
                         f"and teacher_ce {tuple(teacher_ce.shape)} must be [B, Nt]")
    with torch.no_grad():
        mapped = _mapped(teacher_range, student_mask)
        dtype = torch.promote_types(torch.promote_types(student_ce.dtype, teacher_ce.dtype), torch.float32)
        reference = aggregate_teacher_ce(teacher_ce.to(dtype), teacher_range, mapped, aggregation=aggregation)
        score = student_ce.detach().to(dtype)[mapped] - reference
        keep = keep_count(score.numel(), top_fraction)
        # Stable descending sort: equal scores keep flat order, so the lower flat index wins.
        order = torch.sort(score, descending=True, stable=True).indices[:keep]
        flat_mapped = mapped.reshape(-1).nonzero().squeeze(1)
        selection = student_mask & ~mapped
        selection.view(-1)[flat_mapped[order]] = True
    return selection


def vocagnolm(
    student_ce: torch.Tensor,
    teacher_ce: torch.Tensor,
    teacher_range: torch.Tensor,
    student_mask: torch.Tensor,
    *,
    top_fraction: float = 0.4,
    aggregation: str = "max",
) -> dict[str, torch.Tensor]:
    """VocAgnoLM's teacher-guided loss: the student CE summed over the selected tokens.

    Args:
        student_ce: ``[B, Ns]`` student per-token CE (with gradient); only ``student_mask`` entries are read.
        teacher_ce: ``[B, Nt]`` teacher per-token CE (no gradient).
        teacher_range: ``[B, Ns, 2]`` long, ``[lo, hi)`` into ``teacher_ce[b]`` for each student token
            (``lo == hi``: unmapped), e.g. from :func:`mlot_ds.pairing.overlaps.token_overlaps`.
        student_mask: ``[B, Ns]`` bool, the scored student tokens.
        top_fraction: fraction of mapped tokens kept (0.4).
        aggregation: ``max`` (default), ``mean`` or ``min`` over the mapped teacher tokens.

    Returns:
        ``{"vocagnolm": sum of CE_S over the selected tokens, "selected": their count (float32)}``.
    """
    selection = vocagnolm_selection(student_ce, teacher_ce, teacher_range, student_mask,
                                    top_fraction=top_fraction, aggregation=aggregation)
    dtype = torch.promote_types(student_ce.dtype, torch.float32)
    return {"vocagnolm": student_ce[selection].to(dtype).sum(),
            "selected": selection.sum().to(torch.float32)}


def student_token_ce(logits: torch.Tensor, labels: torch.Tensor, *,
                     chunk_elements: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token student CE at token positions, through the streaming kernel: ``(ce [B, T], valid [B, T])``.

    ``ce[b, t] = -log p(labels[b, t] | row t - 1)`` for ``valid`` tokens (HF unshifted labels), 0 elsewhere.
    """
    stats = student_token_stats(logits, labels, chunk_elements=chunk_elements)
    return -stats.log_prob, stats.valid


def labelled_positions(labels: torch.Tensor, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Position of each row's ``j``-th labelled token (``labels != -100``, in order): ``(position [B, W],
    present [B, W])``, ``W = width`` or the largest count; absent entries hold 0."""
    labelled = labels != IGNORE_INDEX
    count = labelled.sum(dim=1)
    if width is None:
        width = int(count.max()) if count.numel() else 0
    if width > labels.shape[1]:
        raise ValueError(f"{width} labelled tokens asked for, but the labels are only {labels.shape[1]} wide")
    order = torch.sort((~labelled).to(torch.int8), dim=1, stable=True).indices[:, :width]
    present = torch.arange(width, device=labels.device).unsqueeze(0) < count.unsqueeze(1)
    return torch.where(present, order, 0), present


def token_ce_in_label_order(log_prob: torch.Tensor, valid: torch.Tensor, labels: torch.Tensor,
                            width: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token CE ``-log p`` of :class:`~mlot_ds.losses.rowstats.TokenStats` laid out in label order.

    Returns ``(ce [B, W], scored [B, W], present [B, W])``: ``scored`` = the token has a predicting row
    (position >= 1), ``present`` = a labelled token exists there; ``ce`` is 0 where not ``scored``.
    """
    positions, present = labelled_positions(labels, width)
    ce = torch.where(valid, -log_prob, torch.zeros_like(log_prob)).gather(1, positions)
    scored = present & valid.gather(1, positions)
    return ce * scored, scored, present


@dataclass(frozen=True)
class VocAgnoLMParams:
    top_fraction: Annotated[float, Range(gt=0, le=1)] = 0.4
    """Fraction of the mapped student tokens kept per micro-batch (by excess loss), in ``(0, 1]``;
    0.4 = the paper's top-k 40% (implementation details, as reported in the spec). 1 keeps all."""
    aggregation: Literal["max", "mean", "min"] = "max"
    """How the CEs of the teacher tokens overlapping a student token are combined (paper's Table 3: max best)."""


class VocAgnoLM(Method):
    """VocAgnoLM (Shin et al., ICML 2025): the teacher selects which student tokens the CE trains.

    Per micro-batch on each rank (the selection scope of :func:`vocagnolm_selection`: all real tokens
    of this rank's micro-batch compete; no threshold is shared across ranks or accumulation steps):

        s_i = CE_S(i) - agg_{j in M(i)} CE_T(j)
        selected = top ceil(top_fraction * #mapped) mapped tokens by s_i  +  every unmapped token
        term "vocagnolm" = sum_{i in selected} CE_S(i),   denominator "selected" (global count)

    ``M(i)`` comes from the data pipeline's ``overlaps`` view over the student's labelled tokens
    (response then EOS; the EOS has no bytes, so it is unmapped and always selected). Every pairing
    rule works: the pairing is not read. The count is known from the overlaps (and the student's
    labels) before the student forward: :meth:`counts`.

    The engine adds ``train.ce_weight * CE / tokens`` on top of this teacher's term, so with the
    defaults the selected tokens are trained twice over. The paper's setting (only the selected
    tokens are trained) is ``train.ce_weight=0`` with this teacher's weight 1.

    Teacher side: the teacher's CE at each of its labelled tokens (one block of rows at a time through
    ``source.read``), which also gives its gold CE. Student side: per-token CE through the streaming
    kernel; the student's full CE (``"ce"``) is the sum of the same per-token CEs (``fuses_ce``).
    Cache: the teacher's per-token CE in float32, one row per labelled teacher token (exact).
    """

    name = "vocagnolm"
    Params = VocAgnoLMParams
    terms = ("vocagnolm",)
    denominator = "selected"
    needs = frozenset({"overlaps"})
    fuses_ce = True
    description = "VocAgnoLM: CE on the tokens the teacher's loss marks as most improvable (Shin et al. 2025)"

    def _student_view(self, view: TeacherView) -> tuple[torch.Tensor, torch.Tensor]:
        """``(teacher_range [B, Ns, 2], student_mask [B, Ns])`` of the scored student tokens."""
        if view.overlaps is None:
            raise ValueError("loss 'vocagnolm' needs the data pipeline's token overlaps (needs = {'overlaps'})")
        lo, hi, mask = view.overlaps
        labels = view.student.labels.to(mask.device)
        positions, present = labelled_positions(labels, mask.shape[1])
        if not torch.equal(present, mask):
            raise ValueError(f"the overlaps cover {mask.sum(dim=1).tolist()} student tokens per sequence, the "
                             f"student's labels {present.sum(dim=1).tolist()}: they must be the same tokens")
        return torch.stack([lo, hi], dim=-1), mask & (positions >= 1)

    def teacher(self, source: LogitSource, view: TeacherView, gold: bool) -> TeacherOutput:
        labels = view.teacher.labels.to(source.device)
        stats = teacher_token_stats(source.read, labels, vocab=source.shape[2], rows_per_block=source.rows_per_block())
        ce, _, _ = token_ce_in_label_order(stats.log_prob, stats.valid, labels)
        gold_ce = None
        if gold:  # the same per-token CEs, summed per sequence (= ce_per_sequence on these labels)
            per_token = torch.where(stats.valid, -stats.log_prob, torch.zeros_like(stats.log_prob))
            gold_ce = {"ce": per_token.sum(dim=1).float(), "tokens": stats.valid.sum(dim=1).float()}
        return TeacherOutput(ce, gold_ce)

    def counts(self, reduced, view: TeacherView) -> dict[str, float]:
        teacher_range, student_mask = self._student_view(view)
        return {"selected": float(vocagnolm_selected_count(teacher_range, student_mask,
                                                           top_fraction=self.params.top_fraction))}

    def student(self, logits, reduced: torch.Tensor, view: TeacherView, ce_labels=None) -> dict[str, torch.Tensor]:
        labels = view.student.labels
        teacher_range, student_mask = self._student_view(view)
        stats = student_token_stats(logits, labels)
        student_ce, _, _ = token_ce_in_label_order(stats.log_prob, stats.valid, labels, student_mask.shape[1])
        out = vocagnolm(student_ce, reduced, teacher_range, student_mask, top_fraction=self.params.top_fraction,
                        aggregation=self.params.aggregation)
        terms = {"vocagnolm": out["vocagnolm"]}
        if ce_labels is not None:
            if ce_labels is labels or torch.equal(ce_labels, labels):
                terms["ce"] = torch.where(stats.valid, -stats.log_prob, torch.zeros_like(stats.log_prob)).sum()
            else:
                terms["ce"] = masked_ce(logits, ce_labels)["ce"]
        return terms

    def cache_rows(self, view: TeacherView) -> tuple[torch.Tensor, torch.Tensor]:
        # The logit row predicting each labelled teacher token (0 for one at position 0, which has none).
        positions, present = labelled_positions(view.teacher.labels)
        return (positions - 1).clamp(min=0), present

    def cache_settings(self) -> dict:
        return {"kind": self.name}  # the per-token CE does not depend on the selection's parameters

    def to_cache(self, reduced: torch.Tensor, view: TeacherView):
        return {}, {"ce": reduced.float()}

    def from_cache(self, records, rows, view: TeacherView) -> torch.Tensor:
        return rows["ce"].float()
