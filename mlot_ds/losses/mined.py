"""MinED distillation (Wan et al. 2024, as in DSKD): KL on min-edit-distance-aligned token pairs."""

from __future__ import annotations

import torch

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
        raise ValueError(f"student_to_teacher must be a LongTensor of shape [{vocab}], got {student_to_teacher.dtype} {tuple(student_to_teacher.shape)}")
    if vocab and (int(student_to_teacher.min()) < 0 or int(student_to_teacher.max()) >= teacher_logits.shape[-1]):
        raise ValueError(f"student_to_teacher values must lie in [0, {teacher_logits.shape[-1]})")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    pairing.validate(student_logits.shape[1], teacher_logits.shape[1])
    b = torch.arange(pairing.mask.shape[0], device=pairing.mask.device).unsqueeze(1).expand_as(pairing.mask)[pairing.mask]
    student_logprobs = torch.log_softmax(student_logits[b, pairing.student_index[pairing.mask]].to(compute_dtype_for(student_logits.dtype)) / temperature, -1)
    with torch.no_grad():
        projected = teacher_logits[b, pairing.teacher_index[pairing.mask]].to(compute_dtype_for(teacher_logits.dtype))[:, student_to_teacher]
        teacher_logprobs = torch.log_softmax(projected / temperature, dim=-1)
    kl = (teacher_logprobs.exp() * (teacher_logprobs - student_logprobs)).sum()
    return {"mined": kl * temperature**2, "tokens": pairing.mask.sum().to(torch.float32)}
