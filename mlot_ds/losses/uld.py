"""Universal Logit Distillation (Boizard et al. 2024), paper eq. (2)-(6): sorted-probability L1."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from mlot_ds.fields import PositiveInt
from mlot_ds.losses.method import (
    LogitSource,
    Method,
    TeacherOutput,
    TeacherView,
    compact_pairing,
    gather_rows,
    gold_if,
)
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
        teacher_sorted = torch.softmax(
            teacher_logits[b, pairing.teacher_index[pairing.mask]].to(compute_dtype_for(teacher_logits.dtype)), dim=-1
        )
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


def teacher_sorted_head(teacher_logits: torch.Tensor, head: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``head`` largest teacher probabilities (temperature 1, descending) and the rest's mass.

    Args:
        teacher_logits: ``[..., m]`` logits of the rows ULD reads.
        head: how many sorted probabilities to keep (all ``m`` when ``head >= m``).

    Returns:
        ``head_probs [..., min(head, m)]`` and ``tail_mass [...]`` (float32 or wider).
    """
    if head < 1:
        raise ValueError(f"head must be >= 1, got {head}")
    with torch.no_grad():
        probs = torch.softmax(teacher_logits.to(compute_dtype_for(teacher_logits.dtype)), dim=-1)
        head_probs = probs.topk(min(head, probs.shape[-1]), dim=-1, sorted=True).values
        tail_mass = (1.0 - head_probs.sum(dim=-1)).clamp_(min=0.0)
    return head_probs, tail_mass


def uld_sorted_head(
    student_logits: torch.Tensor, teacher_head_probs: torch.Tensor, teacher_tail_mass: torch.Tensor, pairing: Pairing
) -> dict[str, torch.Tensor]:
    """ULD against a teacher known only by its ``h`` largest probabilities and its tail mass (a cache).

    With ``s`` and ``t`` the sorted, zero-padded rows of eq. (6), ``S = sum_{v >= h} s_v`` and
    ``tau = sum_{v >= h} t_v`` (the stored tail mass):

        ULD~ = sum_i [ sum_{v < h} |s_v - t_v| + |S - tau| ]

    Exact when ``h >= m`` (``tau = 0``). Otherwise ``|S - tau| <= sum_{v >= h} |s_v - t_v| <= S +
    tau``: the approximation never exceeds the exact loss and is below it by at most
    ``2 * min(S, tau) <= 2 tau`` per token, and it is exact whenever one tail dominates the other
    entry by entry. Its gradient pushes the student's tail mass towards the teacher's.

    Args:
        student_logits: ``[B, Ts, n]``.
        teacher_head_probs: ``[B, P, h]`` descending probabilities of the paired teacher rows.
        teacher_tail_mass: ``[B, P]``.
        pairing: pairs; its ``teacher_index`` is not used (the teacher rows are already compact).

    Returns:
        ``{"uld": float32 sum over pairs, "tokens": pair count, "sequences": sequences with pairs}``.
    """
    mask = pairing.mask
    if teacher_head_probs.shape[:2] != mask.shape or teacher_tail_mass.shape != mask.shape:
        raise ValueError(
            f"teacher head {tuple(teacher_head_probs.shape)} and tail {tuple(teacher_tail_mass.shape)} "
            f"must start with the pairing's [B, P] = {tuple(mask.shape)}"
        )
    rows = pairing.student_index[mask]
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= student_logits.shape[1]):
        raise ValueError(f"student pairing index out of range [0, {student_logits.shape[1]}): {rows.min()}..{rows.max()}")
    b = torch.arange(mask.shape[0], device=mask.device).unsqueeze(1).expand_as(mask)[mask]
    dtype = compute_dtype_for(student_logits.dtype)
    student_rows = student_logits[b, rows].to(dtype)
    student_sorted = torch.softmax(student_rows, dim=-1).sort(dim=-1, descending=True).values
    teacher_head = teacher_head_probs[mask].to(dtype)
    common = min(student_sorted.shape[-1], teacher_head.shape[-1])
    head = (student_sorted[:, :common] - teacher_head[:, :common]).abs().sum() + teacher_head[:, common:].sum()
    tail = (student_sorted[:, common:].sum(dim=-1) - teacher_tail_mass[mask].to(dtype)).abs().sum()
    return {
        "uld": head + tail,
        "tokens": mask.sum().to(torch.float32),
        "sequences": mask.any(dim=1).sum().to(torch.float32),
    }


class SortedHead(NamedTuple):
    """A cached ULD teacher: ``probs [B, P, h]`` largest probabilities (descending), ``tail [B, P]`` the rest."""

    probs: torch.Tensor
    tail: torch.Tensor


@dataclass(frozen=True)
class UldParams:
    cache_head: PositiveInt = 1024
    """Offline cache only: sorted teacher probabilities kept per token, the rest stored as one tail
    mass (exact when >= the teacher's vocabulary; see :func:`uld_sorted_head`)."""


class UniversalLogitDistillation(Method):
    """ULD (Boizard et al. 2024): L1 between sorted probability vectors, per paired token."""

    name = "uld"
    Params = UldParams
    terms = ("uld",)
    description = "ULD: L1 distance of the sorted probability vectors (Boizard et al. 2024)"

    @classmethod
    def default_weights(cls, params) -> dict[str, float]:
        return {"uld": 1.5}  # the reference code trains CE + 1.5 * ULD

    def teacher(self, source: LogitSource, view: TeacherView, gold: bool) -> TeacherOutput:
        # ULD reads only the paired rows: a compact [B, P, m] tensor.
        return TeacherOutput(gather_rows(source, view.pairing.teacher_index), gold_if(source, view.teacher.labels, gold))

    def student(self, logits, reduced, view: TeacherView, ce_labels=None) -> dict[str, torch.Tensor]:
        compact = compact_pairing(view.pairing)
        if isinstance(reduced, SortedHead):
            return {"uld": uld_sorted_head(logits, reduced.probs, reduced.tail, compact)["uld"]}
        return {"uld": uld(logits, reduced, None, None, pairing=compact)["uld"]}

    def cache_settings(self) -> dict:
        return {"kind": self.name, "cache_head": self.params.cache_head}

    def to_cache(self, reduced, view: TeacherView):
        head, tail = teacher_sorted_head(reduced, self.params.cache_head)
        return {}, {"head": head.to(torch.bfloat16), "tail": tail.float()}

    def from_cache(self, records, rows, view: TeacherView) -> SortedHead:
        return SortedHead(rows["head"].float(), rows["tail"].float())
