"""The ``position`` rule of ULD and of MultiLevelOT's released code (docs/METHOD.md, "Pairing teacher and student tokens").

Take each side's response tokens in order and pair them by index; keep the first
``min(n_student, n_teacher)`` pairs. The logit row that predicts response token ``q`` is ``q - 1``.
"""

from __future__ import annotations

import torch

from mlot_ds.pairing.types import Pairing

IGNORE_INDEX = -100


def position_pairing(student_labels: torch.Tensor, teacher_labels: torch.Tensor) -> Pairing:
    """Pair the i-th distilled student token with the i-th distilled teacher token.

    Args:
        student_labels: ``[B, Ts]`` long, Hugging Face (unshifted) labels, ``-100`` = not distilled.
        teacher_labels: ``[B, Tt]`` long, same convention for the teacher.

    Returns:
        A :class:`Pairing` with ``P = max_b min(n_s[b], n_t[b])`` columns.

    A label at position 0 has no predicting logit row; it is skipped.
    """
    if student_labels.dim() != 2 or teacher_labels.dim() != 2:
        raise ValueError("labels must be [B, T] tensors")
    if student_labels.shape[0] != teacher_labels.shape[0]:
        raise ValueError(f"batch sizes differ: {student_labels.shape[0]} vs {teacher_labels.shape[0]}")
    student_rows = _predicting_rows(student_labels)
    teacher_rows = _predicting_rows(teacher_labels)
    counts = torch.minimum(student_rows.count, teacher_rows.count)
    width = int(counts.max()) if counts.numel() else 0
    columns = torch.arange(width, device=student_labels.device)
    mask = columns.unsqueeze(0) < counts.unsqueeze(1)
    student_index = torch.where(mask, student_rows.rows[:, :width], 0)
    teacher_index = torch.where(mask, teacher_rows.rows[:, :width], 0)
    return Pairing(student_index, teacher_index, mask)


class _Rows:
    def __init__(self, rows: torch.Tensor, count: torch.Tensor):
        self.rows = rows
        self.count = count


def _predicting_rows(labels: torch.Tensor) -> _Rows:
    """Left-aligned logit rows (``q - 1``) of the distilled tokens, padded with zeros."""
    distilled = labels != IGNORE_INDEX
    distilled[:, 0] = False  # position 0 has no predicting row
    count = distilled.sum(dim=1)
    width = max(int(count.max()) if count.numel() else 0, 1)
    # Stable sort puts the distilled positions first, in their original order.
    order = torch.sort((~distilled).to(torch.int8), dim=1, stable=True).indices[:, :width]
    rows = order - 1
    keep = torch.arange(width, device=labels.device).unsqueeze(0) < count.unsqueeze(1)
    return _Rows(torch.where(keep, rows, 0), count)
