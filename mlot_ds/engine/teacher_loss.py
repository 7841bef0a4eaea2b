"""One teacher's distillation loss, split around the teacher forward so its logits can be freed.

``reduce(...)`` runs right after the teacher's forward and keeps only what the loss needs (for
MultiLevelOT the per-sequence top-k summary, for ULD and MinED the paired rows). ``terms(...)`` runs
after the student's forward and returns the loss terms as sums plus their denominator key.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mlot_ds import losses
from mlot_ds.config import LossConfig
from mlot_ds.pairing import Pairing

# Reference weights of the baselines: ULD's code uses CE + 1.5 * ULD; DSKD's MinED uses
# 0.5 * CE + 0.5 * KL, i.e. KL weight 1 relative to CE.
ULD_WEIGHT = 1.5
MINED_WEIGHT = 1.0


@dataclass
class TeacherLoss:
    config: LossConfig
    student_to_teacher: torch.Tensor | None = None  # MinED vocabulary map

    def __post_init__(self):
        if self.config.kind == "mlot":
            self.overrides = dict(self.config.overrides)
            self.hparams = losses.resolve_preset(self.config.preset, self.overrides)
            self.term_weights = dict(self.hparams.weights)
            self.denominator = "sequences" if self.hparams.normalize_by == "sequences" else "pairs"
        elif self.config.kind == "uld":
            self.term_weights = {"uld": ULD_WEIGHT}
            self.denominator = "pairs"
        else:
            self.term_weights = {"mined": MINED_WEIGHT}
            self.denominator = "pairs"

    def pairing_for(self, pairing: Pairing, student_labels: torch.Tensor, teacher_labels: torch.Tensor):
        """The official preset re-derives both answer spans from the labels, as the released code."""
        if self.config.kind == "mlot" and self.hparams.is_official:
            return losses.official_spans(student_labels, teacher_labels, skip_student_eos=self.hparams.skip_student_eos)
        return pairing

    def reduce(self, teacher_logits: torch.Tensor, pairing):
        """Keep what the loss needs from ``[B, Tt, m]`` logits; the caller then drops them."""
        if self.config.kind == "mlot":
            return losses.teacher_summary(teacher_logits, pairing, preset=self.hparams)
        # ULD and MinED read only the paired rows: gather them into a compact [B, P, m] tensor.
        rows = pairing.teacher_index.unsqueeze(-1).expand(-1, -1, teacher_logits.shape[-1])
        return torch.gather(teacher_logits, 1, rows)

    @property
    def fuses_ce(self) -> bool:
        """MultiLevelOT (not ``official``) can compute the student's CE from the same log-sum-exp."""
        return self.config.kind == "mlot" and not self.hparams.is_official

    def terms(self, student_logits: torch.Tensor, reduced, pairing, student_labels=None) -> dict:
        """Loss term sums over this micro-batch (tensors), keyed like ``term_weights``; plus ``ce``
        (the student's summed CE) when ``student_labels`` is given and :attr:`fuses_ce`."""
        if self.config.kind == "mlot":
            out = losses.multilevel_ot_from_summary(student_logits, reduced, pairing, preset=self.hparams,
                                                    student_labels=student_labels if self.fuses_ce else None)
            names = list(self.term_weights) + (["ce"] if "ce" in out else [])
            return {name: out[name] for name in names}
        compact = Pairing(pairing.student_index, _arange_like(pairing.teacher_index), pairing.mask)
        if self.config.kind == "uld":
            return {"uld": losses.uld(student_logits, reduced, None, None, pairing=compact)["uld"]}
        return {"mined": losses.mined_kl(student_logits, reduced, compact, self.student_to_teacher)["mined"]}


def _arange_like(index: torch.Tensor) -> torch.Tensor:
    return torch.arange(index.shape[1], device=index.device).unsqueeze(0).expand_as(index)
