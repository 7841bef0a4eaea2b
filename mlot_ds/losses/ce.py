"""Masked cross-entropy with the same "sum + token count" contract as the distillation terms."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mlot_ds.losses.ranking import compute_dtype_for
from mlot_ds.pairing import IGNORE_INDEX


def masked_ce(student_logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Summed next-token cross-entropy over the distilled labels.

    ``CE = -sum_{b, t : labels[b, t+1] != -100} log softmax(z[b, t])[labels[b, t+1]]``: Hugging Face
    unshifted labels, row ``t`` predicts label ``t + 1``. The labels are shifted, not the logits, so
    no copy of the logits is made (except a float32 copy of bf16/fp16 logits).

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
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    logits = student_logits.to(compute_dtype_for(student_logits.dtype))
    ce = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    tokens = (targets != IGNORE_INDEX).sum().to(torch.float32)
    return {"ce": ce, "tokens": tokens}
