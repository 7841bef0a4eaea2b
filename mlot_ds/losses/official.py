"""The ``official`` method: MultiLevelOT as the released code computes it (2018cx/Multi-Level-OT HEAD).

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

from dataclasses import dataclass
from typing import NamedTuple

import torch

from mlot_ds.fields import PositiveFloat, PositiveInt
from mlot_ds.losses.head import rows_logits
from mlot_ds.losses.method import (
    LogitSource,
    Method,
    MethodContext,
    TeacherOutput,
    TeacherView,
    gold_if,
)
from mlot_ds.losses.presets import PRESETS, MlotPreset, resolve_preset
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


class OfficialSummary(NamedTuple):
    """The teacher side of the released code: the span softmax's top-k (``indices [1, B, k]``,
    ``values [1, B, Lt, k]``, temperature ``tau_had``) and both sides' spans."""

    temperatures: tuple[float, ...]
    indices: torch.Tensor
    values: torch.Tensor
    spans: OfficialSpans


def _teacher_summary(source: LogitSource, spans: OfficialSpans, cfg: MlotPreset) -> OfficialSummary:
    with torch.no_grad():
        if source.logits is not None:
            indices, values = teacher_side(source.logits, spans, cfg)
        else:
            # Every span row at every column: the [B, L, m] span logits, never the [B, Tt, m] ones.
            span_logits = rows_logits(source.hidden, source.weight, source.bias, spans.teacher_rows)
            local = torch.arange(span_logits.shape[1], device=span_logits.device).unsqueeze(0).expand(span_logits.shape[0], -1)
            indices, values = teacher_side(span_logits, spans._replace(teacher_rows=local), cfg)
    return OfficialSummary((cfg.tau_had,), indices, values, spans)


def official_multilevel_ot(student_logits: torch.Tensor, teacher_logits: torch.Tensor, student_labels: torch.Tensor,
                           teacher_labels: torch.Tensor, **overrides) -> dict[str, torch.Tensor]:
    """The released code's HAD, SL and SD sums for one teacher (see the module docstring).

    Args:
        student_logits ``[B, Ts, n]``, teacher_logits ``[B, Tt, m]``; HF unshifted labels of both.
        overrides: fields of the official :class:`~mlot_ds.losses.presets.MlotPreset` (``k``, ``sinkhorn_lambda``, ...).

    Returns:
        ``{"had", "sl", "sd", "tokens", "sequences"}``; the loss is ``sum_t w_t * out[t] / sequences``.
    """
    cfg = resolve_preset("official", overrides)
    spans = official_spans(student_labels, teacher_labels, skip_student_eos=cfg.skip_student_eos)
    summary = _teacher_summary(LogitSource(logits=teacher_logits), spans, cfg)
    return student_side(student_logits, summary.values[0], spans, cfg)


@dataclass(frozen=True)
class OfficialParams:
    """The released code's settings (``loss: {kind: official, k: 50, ...}``)."""

    k: PositiveInt = 50
    tau_had: PositiveFloat = 1.0
    tau_sl: PositiveFloat = 1.0
    tau_sd: PositiveFloat = 2.0
    sinkhorn_lambda: PositiveFloat = 0.1
    sinkhorn_iters: PositiveInt = 10
    std_eps: PositiveFloat = 1e-4
    skip_student_eos: bool = True

    def to_preset(self) -> MlotPreset:
        base = PRESETS["official"]
        changed = {name: getattr(self, name) for name in self.__dataclass_fields__ if getattr(base, name) != getattr(self, name)}
        return resolve_preset(base, changed)


class OfficialMultiLevelOT(Method):
    """MultiLevelOT with the released code's numerics: whole answer spans (not pairs), batch ranking."""

    name = "official"
    Params = OfficialParams
    terms = ("had", "sl", "sd")
    denominator = "sequences"
    cacheable = False
    description = "MultiLevelOT as the released code computes it (spans, batch ranking, double softmax)"

    def __init__(self, params=None, weights=None, context=None):

        super().__init__(params, weights, context or MethodContext())
        self.preset = self.params.to_preset()

    @classmethod
    def default_weights(cls, params) -> dict[str, float]:
        return dict(PRESETS["official"].weights)

    @classmethod
    def cache_problem(cls, params) -> str | None:
        return "the official method ranks over the whole batch, so nothing per record can be stored"

    def teacher(self, source: LogitSource, view: TeacherView, gold: bool) -> TeacherOutput:
        # The released code re-derives both answer spans from the labels; the pairing rule is not used.
        spans = official_spans(view.student.labels, view.teacher.labels, skip_student_eos=self.preset.skip_student_eos)
        return TeacherOutput(_teacher_summary(source, spans, self.preset), gold_if(source, view.teacher.labels, gold))

    def counts(self, reduced: OfficialSummary, view: TeacherView) -> dict[str, float]:
        pairs = torch.minimum(reduced.spans.student_count, reduced.spans.teacher_count)
        return {"sequences": float((pairs > 0).sum())}

    def student(self, logits, reduced: OfficialSummary, view: TeacherView, ce_labels=None) -> dict[str, torch.Tensor]:
        out = student_side(logits, reduced.values[0], reduced.spans, self.preset)
        return {name: out[name] for name in self.terms}
