"""Universal Logit Distillation (Boizard et al. 2024), paper eq. (2)-(6): sorted-probability L1."""

from __future__ import annotations

import torch

from mlot_ds.losses.ranking import compute_dtype_for
from mlot_ds.pairing import Pairing, position_pairing


def uld(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_labels: torch.Tensor,
    teacher_labels: torch.Tensor,
    *,
    pairing: Pairing | None = None,
) -> dict[str, torch.Tensor]:
    """ULD summed over paired tokens: ``sum_i sum_v |sort(s(i))_v - sort(t(i))_v|`` (eq. 6).

    Both full distributions (temperature 1) are sorted in descending order and the smaller vocabulary
    is zero-padded to ``max(n, m)``. The padding is never allocated: past ``min(n, m)`` the L1 is the
    larger side's tail mass.

    Args:
        student_logits: ``[B, Ts, n]``; teacher_logits: ``[B, Tt, m]`` (any float dtypes, float32 inside).
        student_labels, teacher_labels: HF unshifted labels, -100 = not distilled.
        pairing: replaces the ``position`` rule (ULD's own rule: first ``min(n_s, n_t)`` tokens).

    Returns:
        ``{"uld": float32 sum over pairs, "tokens": pair count, "sequences": sequences with pairs}``.
    """
    if pairing is None:
        pairing = position_pairing(student_labels, teacher_labels)
    pairing.validate(student_logits.shape[1], teacher_logits.shape[1])
    batch_of_pair = torch.arange(pairing.mask.shape[0], device=pairing.mask.device).unsqueeze(1).expand_as(pairing.mask)
    b = batch_of_pair[pairing.mask]
    student_rows = student_logits[b, pairing.student_index[pairing.mask]].to(compute_dtype_for(student_logits.dtype))
    with torch.no_grad():
        teacher_sorted = torch.softmax(teacher_logits[b, pairing.teacher_index[pairing.mask]].to(compute_dtype_for(teacher_logits.dtype)), dim=-1)
        teacher_sorted = teacher_sorted.sort(dim=-1, descending=True).values
    student_sorted = torch.softmax(student_rows, dim=-1).sort(dim=-1, descending=True).values
    common = min(student_sorted.shape[-1], teacher_sorted.shape[-1])
    head = (student_sorted[:, :common] - teacher_sorted[:, :common]).abs().sum()
    tail = student_sorted[:, common:].sum() + teacher_sorted[:, common:].sum()
    return {
        "uld": head + tail,
        "tokens": pairing.mask.sum().to(torch.float32),
        "sequences": pairing.mask.any(dim=1).sum().to(torch.float32),
    }
