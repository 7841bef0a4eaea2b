"""The ``official`` preset: MultiLevelOT as the released code computes it (2018cx/Multi-Level-OT HEAD).

Written from our reading of ``DistillationLoss.forward`` (shared/research/anchors-loss.md §1.3).
Deviations from the paper that this preset reproduces on purpose:

1. Spans, not pairs. Each side uses its whole answer span (labels != -100, rows ``q - 1``), front
   aligned; the student's last answer token (its EOS) is dropped (``skip_student_eos``). HAD uses
   the first ``n_i = min(len_s, len_t)`` rows; SL and SD use all ``Lmax`` rows (``Lmax`` = longest
   span of either side in the batch), zero rows included.
2. Logits are divided by ``std over the vocabulary + std_eps`` (unbiased std, 1e-4) before the
   softmax (at temperature ``tau_had``, 1 in the code).
3. Ranking over the whole batch: the top-k ids of the probabilities summed over batch and time.
4. SL has the roles swapped and a second softmax: ``-softmax(S^k / tau_sl) . log_softmax(T^k / tau_sl)``
   per row (probabilities re-softmaxed), averaged over all ``B * Lmax`` rows.
5. SD re-softmaxes too: ``X = softmax(T^k / tau_sd)``, ``Y = softmax(S^k / tau_sd)``, ``C = cdist(X, Y,
   p=1)`` over all ``Lmax x Lmax`` rows (padding rows become uniform vectors and carry mass), N = 10
   rounds, the plan is differentiated through, and the per-sequence ``<P, C>`` is summed over the
   batch, not averaged. The code's ``1e-3`` factor lives in the preset's SD weight.

One numerical difference: the code runs the Sinkhorn in the plain domain; we run the same rounds in
the log domain (equal in exact arithmetic; the test checks against a plain-domain float64
transcription).

Reductions. The engine computes ``sum_term w_term * result[term] / global sequences``. We return
``had = sum_i HAD_i`` (per-sequence means), ``sl = sum_i mean_t SL_it`` and ``sd = S * sum_i SD_i``
with ``S = result["sequences"]``. With world size 1, no accumulation and no empty sequence, the
global count is ``S = B`` and this equals the code exactly: ``mean_i HAD_i``, ``(1 / (B Lmax))
sum_{i,t} SL_it`` and ``sum_i SD_i``. Under data parallelism or accumulation the code's own loss
depends on how the batch is split; ours is then the average over sequences of the same quantities.
A sequence with no pair gives NaN in the code; here it adds nothing to HAD (SL still counts its rows).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from mlot_ds.losses.ranking import compute_dtype_for
from mlot_ds.losses.sinkhorn import sinkhorn_distance
from mlot_ds.pairing import IGNORE_INDEX


class OfficialSpans(NamedTuple):
    """Each side's answer span: left-aligned logit rows ``[B, L]`` (0-padded) and lengths ``[B]``."""

    student_rows: torch.Tensor
    student_count: torch.Tensor
    teacher_rows: torch.Tensor
    teacher_count: torch.Tensor


def _span_rows(labels: torch.Tensor, drop_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    distilled = labels != IGNORE_INDEX
    distilled[:, 0] = False  # a label at position 0 has no predicting row
    count = distilled.sum(dim=1)
    if drop_last:
        count = (count - 1).clamp(min=0)
    width = int(count.max()) if count.numel() else 0
    # A stable sort brings the distilled positions to the front in text order; row = position - 1.
    order = torch.sort((~distilled).to(torch.int8), dim=1, stable=True).indices[:, :width]
    keep = torch.arange(width, device=labels.device).unsqueeze(0) < count.unsqueeze(1)
    return torch.where(keep, order - 1, 0), count


def official_spans(
    student_labels: torch.Tensor, teacher_labels: torch.Tensor, *, skip_student_eos: bool = True
) -> OfficialSpans:
    """Answer spans of both sides from HF unshifted labels (-100 = not in the answer)."""
    if student_labels.dim() != 2 or teacher_labels.shape[0] != student_labels.shape[0]:
        raise ValueError(
            f"labels must be [B, T] with equal B, got {tuple(student_labels.shape)} and {tuple(teacher_labels.shape)}"
        )
    return OfficialSpans(*_span_rows(student_labels, skip_student_eos), *_span_rows(teacher_labels, False))


def _span_probs(logits: torch.Tensor, rows: torch.Tensor, count: torch.Tensor, cfg) -> torch.Tensor:
    """Standardised span softmax, zero rows past each span: ``[B, L, V]`` (deviation 2)."""
    batch = logits.shape[0]
    span = logits[torch.arange(batch, device=logits.device).unsqueeze(1), rows].to(compute_dtype_for(logits.dtype))
    span = span / (span.std(dim=-1, keepdim=True) + cfg.std_eps)
    valid = torch.arange(rows.shape[1], device=logits.device).unsqueeze(0) < count.unsqueeze(1)
    return torch.softmax(span / cfg.tau_had, dim=-1) * valid.unsqueeze(2)


def _check_spans(spans) -> None:
    if not isinstance(spans, OfficialSpans):
        raise ValueError("preset 'official' needs official_spans(student_labels, teacher_labels) as its pairing")


def teacher_side(teacher_logits: torch.Tensor, spans: OfficialSpans, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch-ranked top-k of the teacher span: ``indices [1, B, k]``, ``values [1, B, Lt, k]``."""
    _check_spans(spans)
    probs = _span_probs(teacher_logits, spans.teacher_rows, spans.teacher_count, cfg)
    ids = probs.sum(dim=(0, 1)).topk(cfg.k).indices  # deviation 3
    batch = teacher_logits.shape[0]
    return ids.expand(batch, -1).unsqueeze(0), probs[..., ids].unsqueeze(0)


def student_side(student_logits: torch.Tensor, teacher_values: torch.Tensor, spans: OfficialSpans, cfg) -> dict:
    """HAD, SL, SD of the released code from the teacher's ``[B, Lt, k]`` values (see module doc)."""
    _check_spans(spans)
    student = _span_probs(student_logits, spans.student_rows, spans.student_count, cfg)
    longest = max(student.shape[1], teacher_values.shape[1])
    student = torch.nn.functional.pad(student, (0, 0, 0, longest - student.shape[1]))
    teacher = torch.nn.functional.pad(teacher_values, (0, 0, 0, longest - teacher_values.shape[1]))
    with torch.no_grad():
        ids = student.sum(dim=(0, 1)).topk(cfg.k).indices
    student = student[..., ids]

    pairs = torch.minimum(spans.student_count, spans.teacher_count)
    paired = torch.arange(longest, device=pairs.device).unsqueeze(0) < pairs.unsqueeze(1)
    per_row = (student - teacher).abs().sum(dim=2) * paired
    had = (per_row.sum(dim=1)[pairs > 0] / pairs[pairs > 0]).sum()

    sl_rows = -(torch.softmax(student / cfg.tau_sl, dim=2) * torch.log_softmax(teacher / cfg.tau_sl, dim=2)).sum(2)
    sl = sl_rows.mean(dim=1).sum() if longest else sl_rows.sum()

    cost = torch.cdist(torch.softmax(teacher / cfg.tau_sd, dim=2), torch.softmax(student / cfg.tau_sd, dim=2), p=1)
    everything = torch.ones(cost.shape[:2], dtype=torch.bool, device=cost.device)
    per_sequence = sinkhorn_distance(
        cost,
        everything,
        everything,
        sinkhorn_lambda=cfg.sinkhorn_lambda,
        sinkhorn_iters=cfg.sinkhorn_iters,
        differentiate=cfg.differentiate_sinkhorn,
    )
    sequences = (pairs > 0).sum().to(torch.float32)
    return {
        "had": had,
        "sl": sl,
        "sd": sequences * per_sequence.sum(),
        "tokens": pairs.sum().to(torch.float32),
        "sequences": sequences,
    }
