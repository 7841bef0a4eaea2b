"""Masked cross-entropy with the same "sum + token count" contract as the distillation terms."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mlot_ds.losses.ranking import compute_dtype_for
from mlot_ds.pairing import IGNORE_INDEX


def masked_ce(student_logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Summed next-token cross-entropy over the distilled labels.

    ``CE = -sum_{b, t : labels[b, t+1] != -100} log softmax(z[b, t])[labels[b, t+1]]``: Hugging Face
    unshifted labels, row ``t`` predicts label ``t + 1``. Only the labelled rows are read (prompt rows
    never enter the softmax), and the labels are shifted, not the logits.

    Args:
        student_logits: ``[B, T, n]`` float logits.
        labels: ``[B, T]`` long, -100 = ignored.

    Returns:
        ``{"ce": float32 sum, "tokens": float32 count of labelled tokens}``; the engine divides by the
        global token count.
    """
    if student_logits.dim() != 3 or labels.shape != student_logits.shape[:2]:
        raise ValueError(
            f"masked_ce: labels {tuple(labels.shape)} must be [B, T] matching student_logits "
            f"{tuple(student_logits.shape)}"
        )
    rows, targets = labelled_rows(labels)
    picked = student_logits.reshape(-1, student_logits.shape[-1]).index_select(0, rows)
    ce = F.cross_entropy(picked.to(compute_dtype_for(student_logits.dtype)), targets, reduction="sum")
    tokens = torch.tensor(float(rows.numel()), device=student_logits.device)
    return {"ce": ce, "tokens": tokens}


def _shifted(labels: torch.Tensor) -> torch.Tensor:
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    return targets


def labelled_rows(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat logit rows ``b * T + t`` whose next label is not -100 (HF shift), and those labels.

    Args:
        labels: ``[B, T]`` long, Hugging Face unshifted labels.

    Returns:
        ``rows [N]`` long (ascending) and ``targets [N]`` long.
    """
    flat = _shifted(labels).reshape(-1)
    rows = (flat != IGNORE_INDEX).nonzero().squeeze(1)
    return rows, flat[rows]


def ce_per_sequence(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """:func:`masked_ce` split by sequence, without gradient: ``{"ce": [B], "tokens": [B]}`` float32.

    ``ce[b] = -sum_{t : labels[b, t+1] != -100} log softmax(z[b, t])[labels[b, t+1]]``. Only the
    labelled rows are read (a copy of those rows, not of the whole batch).
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"ce_per_sequence: labels {tuple(labels.shape)} must be [B, T] matching logits {tuple(logits.shape)}")
    batch, seq_len, vocab = logits.shape
    rows, targets = labelled_rows(labels)
    with torch.no_grad():
        picked = logits.reshape(batch * seq_len, vocab).index_select(0, rows).to(compute_dtype_for(logits.dtype))
        per_row = torch.logsumexp(picked, dim=1) - picked.gather(1, targets.unsqueeze(1)).squeeze(1)
    sequence = torch.div(rows, seq_len, rounding_mode="floor")
    ce = torch.zeros(batch, dtype=per_row.dtype, device=logits.device).index_add_(0, sequence, per_row)
    tokens = torch.zeros(batch, dtype=torch.float32, device=logits.device).index_add_(
        0, sequence, torch.ones_like(sequence, dtype=torch.float32))
    return {"ce": ce.float(), "tokens": tokens}
