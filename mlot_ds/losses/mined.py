"""MinED distillation (Wan et al. 2024, as in DSKD): KL on min-edit-distance-aligned token pairs."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from mlot_ds.fields import PositiveFloat
from mlot_ds.losses.method import (
    LogitSource,
    Method,
    MethodContext,
    TeacherOutput,
    TeacherView,
    compact_pairing,
    gather_rows,
    gold_if,
)
from mlot_ds.losses.ranking import compute_dtype_for
from mlot_ds.pairing import Pairing


def mined_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    pairing: Pairing,
    student_to_teacher: torch.Tensor,
    *,
    temperature: float = 2.0,
) -> dict[str, torch.Tensor]:
    """``T^2 * sum_pairs KL(softmax(t_proj / T) || softmax(z_s / T))`` with ``T = temperature``.

    The teacher's logits are projected into the student vocabulary, ``t_proj = teacher_logits[...,
    student_to_teacher]`` (student id ``v`` reads the teacher id mapped to it), and compared with the
    student's at the paired rows only. The data side builds the 1:1 DTW pairing and the map. The
    ``T^2`` factor (Hinton et al.) keeps the gradient scale independent of ``T``.

    Args:
        student_logits: ``[B, Ts, n]``; teacher_logits: ``[B, Tt, m]``.
        pairing: paired rows (a student row should appear at most once).
        student_to_teacher: ``[n]`` long, teacher id for every student id, in ``[0, m)``.
        temperature: softmax temperature of both sides (DSKD: 2.0).

    Returns:
        ``{"mined": float32 sum over pairs, "tokens": pair count}``.
    """
    vocab = student_logits.shape[-1]
    if student_to_teacher.shape != (vocab,) or student_to_teacher.dtype != torch.long:
        raise ValueError(
            f"student_to_teacher must be a LongTensor of shape [{vocab}], got {student_to_teacher.dtype} "
            f"{tuple(student_to_teacher.shape)}"
        )
    if vocab and (int(student_to_teacher.min()) < 0 or int(student_to_teacher.max()) >= teacher_logits.shape[-1]):
        raise ValueError(f"student_to_teacher values must lie in [0, {teacher_logits.shape[-1]})")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    pairing.validate(student_logits.shape[1], teacher_logits.shape[1])
    b = torch.arange(pairing.mask.shape[0], device=pairing.mask.device).unsqueeze(1).expand_as(pairing.mask)[pairing.mask]
    student_logprobs = torch.log_softmax(
        student_logits[b, pairing.student_index[pairing.mask]].to(compute_dtype_for(student_logits.dtype)) / temperature, -1
    )
    with torch.no_grad():
        projected = teacher_logits[b, pairing.teacher_index[pairing.mask]].to(compute_dtype_for(teacher_logits.dtype))[
            :, student_to_teacher
        ]
        teacher_logprobs = torch.log_softmax(projected / temperature, dim=-1)
    kl = (teacher_logprobs.exp() * (teacher_logprobs - student_logprobs)).sum()
    return {"mined": kl * temperature**2, "tokens": pairing.mask.sum().to(torch.float32)}


@dataclass(frozen=True)
class MinedParams:
    temperature: PositiveFloat = 2.0
    """Softmax temperature of both sides (DSKD's MinED: 2.0)."""


class MinimumEditDistance(Method):
    """MinED (Wan et al. 2024, as in DSKD): KL on DTW-aligned 1:1 pairs through a static vocabulary map."""

    name = "mined"
    Params = MinedParams
    terms = ("mined",)
    pairings = ("dtw",)
    description = "MinED: KL on 1:1 DTW pairs through a min-edit-distance vocabulary map (Wan et al. 2024)"

    def __init__(self, params=None, weights=None, context=None):

        super().__init__(params, weights, context or MethodContext())
        if self.context.student_to_teacher is not None:
            # MinED reads the teacher only at the ids its map uses: keep those columns, and map every
            # student id to its column (logits[..., map] == column_logits[..., column_of]).
            self.teacher_columns, self.column_of_student = torch.unique(self.context.student_to_teacher, return_inverse=True)

    @classmethod
    def default_weights(cls, params) -> dict[str, float]:
        return {"mined": 1.0}  # DSKD's MinED: 0.5 * CE + 0.5 * KL, i.e. KL weight 1 relative to CE

    def _columns(self, device) -> torch.Tensor:
        if self.context.student_to_teacher is None:
            raise ValueError("loss 'mined' needs the student-to-teacher vocabulary map (pairing 'dtw')")
        return self.teacher_columns.to(device)

    def teacher(self, source: LogitSource, view: TeacherView, gold: bool) -> TeacherOutput:
        reduced = gather_rows(source, view.pairing.teacher_index, self._columns(source.device))
        return TeacherOutput(reduced, gold_if(source, view.teacher.labels, gold))

    def student(self, logits, reduced, view: TeacherView, ce_labels=None) -> dict[str, torch.Tensor]:
        column_of_student = self.column_of_student.to(logits.device)
        out = mined_kl(logits, reduced, compact_pairing(view.pairing), column_of_student, temperature=self.params.temperature)
        return {"mined": out["mined"]}

    def cache_settings(self) -> dict:
        digest = hashlib.sha256(self.context.student_to_teacher.numpy().tobytes()).hexdigest()[:16]
        return {"kind": self.name, "vocab_map": digest}

    def to_cache(self, reduced, view: TeacherView):
        return {}, {"logits": reduced.to(torch.bfloat16)}

    def from_cache(self, records, rows, view: TeacherView) -> torch.Tensor:
        return rows["logits"].float()
