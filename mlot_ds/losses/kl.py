"""Same-tokenizer distillation on paired positions: KL-family divergences on top-k coarse-grained rows.

Teacher and student share the vocabulary, so a paired position compares two distributions over the
same ``V`` ids. At temperature ``T`` the teacher keeps, per paired row, its ``k`` most probable ids
``I`` (descending), their log-probabilities and the log of the mass left outside them (computed
directly as a log-sum-exp over the other ids). Both sides are then read on the same ``k + 1``
outcomes, the ``k`` ids and one tail bucket:

    P = (p_i for i in I, p_tail = 1 - sum_I p_i),   Q = (q_i for i in I, q_tail = 1 - sum_I q_i)

with ``p = softmax(t / T)`` and ``q = softmax(z / T)``. The student's side comes from
:func:`~mlot_ds.losses.rowstats.student_row_stats` (``lse`` at ``1 / T``, ``z[I] / T`` and the tail
log-sum-exp), so no ``[N, V]`` tensor is kept.

Coarse-graining: merging outcomes is a deterministic channel. Every divergence here is a KL (or a
weighted sum of KLs) between mixtures of ``p`` and ``q``, and merging commutes with mixing, so by the
data-processing inequality of the KL the coarse value is a LOWER BOUND of the full one,
``D(P_coarse || Q_coarse) <= D(p || q)``. It is exact when the tail is empty (``k >= V``: the teacher
then keeps every id and there is no tail bucket), and more generally when ``p`` and ``q`` are
proportional on the tail ids. Its gradient moves the student's tail mass as a whole, never the
individual tail ids.

Divergences (``divergence=``), all on ``(P, Q)`` and multiplied by ``T^2`` (Hinton et al. 2015, so the
gradient scale does not depend on ``T``), summed over pairs:

- ``forward``:       KL(P || Q) = sum P log(P / Q)
- ``reverse``:       KL(Q || P)
- ``skew_forward``:  KL(P || lam P + (1 - lam) Q)            (DSKD's skewed KL, ``lam = skew_lambda = 0.1``)
- ``skew_reverse``:  KL(Q || lam Q + (1 - lam) P)            (DSKD's skewed reverse KL)
- ``jsd``:           beta KL(P || M) + (1 - beta) KL(Q || M),  M = beta P + (1 - beta) Q
                     (generalised JSD of GKD, Agarwal et al. 2024, eq. 1, as TRL's ``generalized_jsd_loss``;
                     ``beta = 0.5`` is the symmetric JSD)

The method class (:class:`SameTokenizerKL`, ``loss.kind: kl``) sums ``T^2 * D`` over the teacher's
pairs and the engine divides by the global pair count. With ``T = 1`` the student's CE on its labels
comes from the same kernel call (the target id is one more gathered column per row).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch

from mlot_ds.fields import PositiveFloat, PositiveInt, UnitInterval
from mlot_ds.losses.ce import labelled_rows, masked_ce
from mlot_ds.losses.method import LogitSource, Method, MethodContext, TeacherOutput, TeacherView, gold_if
from mlot_ds.losses.rowstats import student_row_stats, teacher_row_stats
from mlot_ds.pairing import Pairing

DIVERGENCES = ("forward", "reverse", "skew_forward", "skew_reverse", "jsd")


class TopKTeacher(NamedTuple):
    """Teacher side of :func:`topk_kl` for ``N`` paired rows.

    Attributes:
        ids: ``[N, k]`` long, the teacher's top-k ids at temperature ``T`` (descending probability).
        log_probs: ``[N, k]`` ``log softmax(t / T)`` at ``ids``.
        tail_log_mass: ``[N]`` log of the probability outside ``ids`` (``-inf`` when ``k = V``).
        temperature: ``T``.
        vocab: the teacher's ``V`` (the width of its logit rows).
    """

    ids: torch.Tensor
    log_probs: torch.Tensor
    tail_log_mass: torch.Tensor
    temperature: float
    vocab: int


def pair_rows(pairing: Pairing, student_len: int, teacher_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat logit rows ``b * T + t`` of every real pair, student and teacher, in row-major pair order."""
    pairing.validate(student_len, teacher_len)
    batch = torch.arange(pairing.mask.shape[0], device=pairing.mask.device).unsqueeze(1).expand_as(pairing.mask)
    b = batch[pairing.mask]
    return b * student_len + pairing.student_index[pairing.mask], b * teacher_len + pairing.teacher_index[pairing.mask]


def teacher_topk(
    read_rows: Callable[[torch.Tensor], torch.Tensor],
    rows: torch.Tensor,
    *,
    vocab: int,
    k: int = 128,
    temperature: float = 1.0,
    rows_per_block: int | None = None,
) -> TopKTeacher:
    """The teacher's top-``k`` ids, their log-probabilities and the tail log-mass at temperature ``T``.

    Args:
        read_rows: ``flat_rows [r] -> [r, V]`` teacher logits (see
            :func:`~mlot_ds.losses.rowstats.teacher_row_stats`); called without autograd.
        rows: ``[N]`` flat teacher rows of the pairs (:func:`pair_rows`).
        vocab: the teacher's ``V``.
        k: ids kept per row (clamped to ``V``; ``k >= V`` keeps all and makes the loss exact).
        temperature: ``T`` (> 0).
        rows_per_block: rows per block.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    stats = teacher_row_stats(read_rows, rows, vocab=vocab, inv_temperature=1.0 / temperature,
                              topk=min(k, vocab), rows_per_block=rows_per_block)
    return TopKTeacher(stats["topk_ids"], stats["topk_log_probs"], stats["topk_tail_log_mass"],
                       float(temperature), int(vocab))


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """``sum_j a_j (log a_j - log b_j)`` per row, with ``0 log 0 = 0`` (and no NaN gradient there)."""
    present = log_a > float("-inf")
    safe_a = torch.where(present, log_a, torch.zeros_like(log_a))
    safe_b = torch.where(present, log_b, torch.zeros_like(log_b))
    terms = torch.where(present, safe_a.exp() * (safe_a - safe_b), torch.zeros_like(safe_a))
    return terms.sum(dim=-1)


def _mixture(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """``log(w a + (1 - w) b)`` for ``0 < w < 1``."""
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


def coarse_divergence(
    teacher_log: torch.Tensor,
    student_log: torch.Tensor,
    *,
    divergence: str = "forward",
    skew_lambda: float = 0.1,
    beta: float = 0.5,
) -> torch.Tensor:
    """The chosen divergence between two rows of log-probabilities over the same outcomes, per row.

    Args:
        teacher_log: ``[N, J]`` ``log P`` (no gradient expected).
        student_log: ``[N, J]`` ``log Q``.
        divergence, skew_lambda, beta: see the module docstring.

    Returns:
        ``[N]`` divergences (not scaled by ``T^2``).
    """
    if divergence == "forward":
        return _kl(teacher_log, student_log)
    if divergence == "reverse":
        return _kl(student_log, teacher_log)
    if divergence == "skew_forward":
        return _kl(teacher_log, _mixture(teacher_log, student_log, skew_lambda))
    if divergence == "skew_reverse":
        return _kl(student_log, _mixture(student_log, teacher_log, skew_lambda))
    if divergence == "jsd":
        mixture = _mixture(teacher_log, student_log, beta)
        return beta * _kl(teacher_log, mixture) + (1 - beta) * _kl(student_log, mixture)
    raise ValueError(f"unknown divergence {divergence!r}; choose one of {DIVERGENCES}")


def topk_kl(
    student_logits: torch.Tensor,
    student_rows: torch.Tensor,
    teacher: TopKTeacher,
    *,
    divergence: str = "forward",
    temperature: float = 1.0,
    skew_lambda: float = 0.1,
    beta: float = 0.5,
    chunk_elements: int | None = None,
    ce_labels: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """``T^2 * sum_pairs D(P_coarse || Q_coarse)`` on the teacher's top-k ids plus one tail bucket.

    Args:
        student_logits: ``[B, Ts, V]`` (any float dtype; float32 inside, float64 for float64).
        student_rows: ``[N]`` long flat student rows of the pairs, distinct (any order), aligned with
            the teacher's rows (:func:`pair_rows`).
        teacher: :func:`teacher_topk` of the pairs' teacher rows.
        divergence: one of ``forward`` (default), ``reverse``, ``skew_forward``, ``skew_reverse``, ``jsd``.
        temperature: ``T`` of both sides; must equal ``teacher.temperature``.
        skew_lambda: DSKD's ``lambda`` of the skewed KLs (0.1), in ``(0, 1)``.
        beta: GKD's ``beta`` of the generalised JSD (0.5), in ``(0, 1)``.
        chunk_elements: block size of the student kernel.
        ce_labels: ``[B, Ts]`` HF unshifted labels (-100 ignored); only with ``T = 1``: also return the
            student's summed CE on them from the same kernel call. Each labelled row gathers its
            target as one more column; a paired row whose target is outside the teacher's top-k
            adds that column back into its tail (``tail = logaddexp(rest, z_target)``).

    Returns:
        ``{"kl": sum over pairs (float32/float64), "tokens": pair count (float32)}``, plus ``"ce"``
        (sum) and ``"ce_tokens"`` with ``ce_labels``.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; choose one of {DIVERGENCES}")
    if temperature != teacher.temperature:
        raise ValueError(f"temperature {temperature} differs from the teacher summary's {teacher.temperature}")
    if not 0 < skew_lambda < 1 or not 0 < beta < 1:
        raise ValueError(f"skew_lambda and beta must lie in (0, 1), got {skew_lambda} and {beta}")
    if ce_labels is not None and temperature != 1.0:
        raise ValueError(f"the fused CE needs temperature 1 (the CE's), got {temperature}")
    count, k = teacher.ids.shape
    vocab = student_logits.shape[-1]
    if student_rows.shape != (count,):
        raise ValueError(f"student_rows must be [N={count}] like the teacher summary, got {tuple(student_rows.shape)}")
    if count and int(teacher.ids.max()) >= vocab:
        raise ValueError(f"teacher ids reach {int(teacher.ids.max())}, beyond the student vocabulary {vocab}")
    order = torch.argsort(student_rows)
    rows = student_rows[order]
    if count > 1 and not bool((rows[1:] > rows[:-1]).all()):
        raise ValueError("student_rows must be distinct (one teacher row per student row)")
    ids = teacher.ids[order]
    # A tail bucket exists unless both sides' top-k cover their whole vocabulary.
    with_tail = k < teacher.vocab or k < vocab
    inv_t = 1.0 / temperature
    if ce_labels is None:
        stats = student_row_stats(student_logits, rows, inv_temperature=inv_t, gather_ids=ids, tail=with_tail,
                                  chunk_elements=chunk_elements)
        student_log = stats.gathered - stats.lse.unsqueeze(1)
        tail_lse = stats.tail_lse
        lse = stats.lse
    else:
        if ce_labels.shape != student_logits.shape[:2]:
            raise ValueError(f"ce_labels {tuple(ce_labels.shape)} must be [B, Ts] = {tuple(student_logits.shape[:2])}")
        ce_rows, ce_targets = labelled_rows(ce_labels)
        all_rows = torch.unique(torch.cat([rows, ce_rows]), sorted=True)
        pair_slot = torch.searchsorted(all_rows, rows)
        ce_slot = torch.searchsorted(all_rows, ce_rows)
        # Column k holds each row's target; CE-only rows repeat it in the k id columns (duplicates are
        # allowed), paired rows without a target repeat their first teacher id there.
        target = torch.zeros(all_rows.numel(), dtype=torch.long, device=all_rows.device)
        has_target = torch.zeros(all_rows.numel(), dtype=torch.bool, device=all_rows.device)
        target[ce_slot], has_target[ce_slot] = ce_targets, True
        gather = target.unsqueeze(1).repeat(1, k + 1)
        gather[pair_slot, :k] = ids
        gather[pair_slot, k] = torch.where(has_target[pair_slot], target[pair_slot], ids[:, 0])
        stats = student_row_stats(student_logits, all_rows, inv_temperature=1.0, gather_ids=gather, tail=with_tail,
                                  chunk_elements=chunk_elements)
        lse = stats.lse[pair_slot]
        student_log = stats.gathered[pair_slot, :k] - lse.unsqueeze(1)
        tail_lse = None
        if with_tail:
            extra = gather[pair_slot, k]
            outside = ~(ids == extra.unsqueeze(1)).any(dim=1)  # the target was taken out of the tail
            rest = stats.tail_lse[pair_slot]
            tail_lse = torch.where(outside, torch.logaddexp(rest, stats.gathered[pair_slot, k]), rest)
        ce = (stats.lse[ce_slot] - stats.gathered[ce_slot, k]).sum()
    teacher_log = teacher.log_probs[order].to(student_log.dtype)
    if with_tail:
        student_log = torch.cat([student_log, (tail_lse - lse).unsqueeze(1)], dim=1)
        teacher_log = torch.cat([teacher_log, teacher.tail_log_mass[order].to(student_log.dtype).unsqueeze(1)], dim=1)
    per_pair = coarse_divergence(teacher_log, student_log, divergence=divergence, skew_lambda=skew_lambda, beta=beta)
    out = {"kl": per_pair.sum() * temperature**2,
           "tokens": torch.tensor(float(count), dtype=torch.float32, device=student_logits.device)}
    if ce_labels is not None:
        out["ce"] = ce
        out["ce_tokens"] = torch.tensor(float(ce_slot.numel()), dtype=torch.float32, device=student_logits.device)
    return out


@dataclass(frozen=True)
class KLParams:
    divergence: Literal["forward", "reverse", "skew_forward", "skew_reverse", "jsd"] = "forward"
    """Which divergence between the teacher's (P) and the student's (Q) distributions (see the module
    docstring); ``forward`` KL(P || Q) is Hinton et al.'s distillation loss."""
    temperature: PositiveFloat = 1.0
    """Softmax temperature of both sides; the sum is multiplied by ``T^2``. At 1 the student's CE is
    fused into the same kernel call."""
    skew_lambda: UnitInterval = 0.1
    """``skew_forward`` / ``skew_reverse``: the mixture weight of DSKD's skewed KLs (DSKD's 0.1)."""
    beta: UnitInterval = 0.5
    """``jsd``: GKD's interpolation ``beta`` of the generalised JSD (TRL's ``GKDConfig.beta``, 0.5)."""
    top_k: PositiveInt = 128
    """Teacher ids kept per paired row, the rest merged into one tail bucket (a lower bound of the
    full divergence; exact when ``top_k`` >= the vocabulary)."""


class SameTokenizerKL(Method):
    """Same-tokenizer distillation: a KL-family divergence per paired position on top-k ids + tail.

    For a teacher that uses the student's tokenizer (its tokenizer fingerprint equals the student's;
    :meth:`check` refuses any other once the tokenizers are loaded). Every pairing rule gives the same
    1:1 pairs then (``offsets`` and ``dtw`` shortcut identical responses to one pair per token, see
    :func:`mlot_ds.data.encode.pair_responses`); ``pairing: position`` is the recommended, cheapest
    one. The teacher keeps, per pair, its ``top_k`` ids, their log-probabilities at ``T`` and the log
    of the rest (:func:`teacher_topk`, one block of rows at a time through ``source.read``); the
    student side is :func:`topk_kl` through the streaming kernel.

    Loss: ``weights.kl * T^2 * sum_pairs D(P || Q) / (global pair count)``. The default weight 1
    trains the KL beside the engine's CE at equal weight (``train.ce_weight`` 1), i.e. the
    ``(1 - a) CE + a KD`` mix with ``a = 0.5`` of DSKD's vanilla KD (``kd_rate`` 0.5) and of
    DistillKit-style trainers, up to a common factor. TRL's GKD trains the divergence alone: set
    ``train.ce_weight=0`` for that.

    If the two models' output layers have different widths (one padded), the teacher's logits are
    read on the first ``min(V_teacher, V_student)`` columns only (renormalised over them; ids beyond
    the tokenizer are never real tokens).

    Cache: per pair the ``k`` ids (int32), their log-probabilities and the tail log-mass (float32),
    exactly what the live path computes (a cached run equals a live one to float32 rounding). It is
    bound to ``temperature``, ``top_k`` and the column count only, so one cache serves every
    divergence.
    """

    name = "kl"
    Params = KLParams
    terms = ("kl",)
    denominator = "pairs"
    fuses_ce = True
    description = "same-tokenizer KD: forward/reverse/skewed KL or generalised JSD on top-k ids + tail"

    def __init__(self, params=None, weights=None, context=None):
        super().__init__(params, weights, context or MethodContext())
        # The CE shares the kernel's log-normaliser only at temperature 1; otherwise another teacher
        # (or the engine's own pass) computes it.
        self.fuses_ce = self.params.temperature == 1.0

    @classmethod
    def check(cls, params, context) -> None:
        if context is not None and not context.same_tokenizer:
            raise ValueError(
                f"loss 'kl' compares the two models' distributions id by id, so the teacher must use the "
                f"student's tokenizer, but the teacher's tokenizer (output layer of {context.teacher_vocab} rows) "
                f"is not the student's tokenizer (output layer of {context.student_vocab} rows; the tokenizer "
                f"fingerprints differ); use a cross-tokenizer loss for this teacher (e.g. kind: mlot or uld)")

    def _columns(self, teacher_vocab: int) -> int:
        student_vocab = self.context.student_vocab
        return min(teacher_vocab, student_vocab) if student_vocab else teacher_vocab

    def teacher(self, source: LogitSource, view: TeacherView, gold: bool) -> TeacherOutput:
        _, teacher_len, teacher_vocab = source.shape
        _, rows = pair_rows(view.pairing, view.student.input_ids.shape[1], teacher_len)
        columns = self._columns(teacher_vocab)
        read = source.read if columns == teacher_vocab else (lambda flat: source.read(flat)[:, :columns])
        summary = teacher_topk(read, rows, vocab=columns, k=self.params.top_k, temperature=self.params.temperature,
                               rows_per_block=source.rows_per_block())
        return TeacherOutput(summary, gold_if(source, view.teacher.labels, gold))

    def student(self, logits, reduced: TopKTeacher, view: TeacherView, ce_labels=None) -> dict[str, torch.Tensor]:
        rows, _ = pair_rows(view.pairing, logits.shape[1], view.teacher.input_ids.shape[1])
        fused = ce_labels is not None and self.params.temperature == 1.0
        p = self.params
        out = topk_kl(logits, rows, reduced, divergence=p.divergence, temperature=p.temperature,
                      skew_lambda=p.skew_lambda, beta=p.beta, ce_labels=ce_labels if fused else None)
        terms = {"kl": out["kl"]}
        if ce_labels is not None:
            terms["ce"] = out["ce"] if fused else masked_ce(logits, ce_labels)["ce"]
        return terms

    def cache_settings(self) -> dict:
        teacher_vocab = self.context.teacher_vocab
        return {"kind": self.name, "temperature": self.params.temperature, "top_k": self.params.top_k,
                "columns": self._columns(teacher_vocab) if teacher_vocab else None}

    def to_cache(self, reduced: TopKTeacher, view: TeacherView):
        mask = view.pairing.mask.to(reduced.ids.device)
        batch, width = mask.shape
        k = reduced.ids.shape[1]
        ids = torch.zeros(batch, width, k, dtype=torch.int32, device=mask.device)
        log_probs = torch.zeros(batch, width, k, dtype=torch.float32, device=mask.device)
        tail = torch.zeros(batch, width, dtype=torch.float32, device=mask.device)
        ids[mask], log_probs[mask], tail[mask] = (reduced.ids.to(torch.int32), reduced.log_probs.float(),
                                                  reduced.tail_log_mass.float())
        vocab = torch.full((batch,), reduced.vocab, dtype=torch.long, device=mask.device)
        return {"vocab": vocab}, {"ids": ids, "log_probs": log_probs, "tail": tail}

    def from_cache(self, records, rows, view: TeacherView) -> TopKTeacher:
        mask = view.pairing.mask.to(rows["ids"].device)
        vocab = int(records["vocab"].max()) if records["vocab"].numel() else 0
        return TopKTeacher(rows["ids"][mask].long(), rows["log_probs"][mask].float(), rows["tail"][mask].float(),
                           float(self.params.temperature), vocab)
