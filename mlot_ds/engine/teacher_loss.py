"""One teacher's distillation loss, split around the teacher forward so its logits can be freed.

``reduce(...)`` (from full logits) or ``reduce_hidden(...)`` (from the final hidden states and the
output layer, chunked) runs right after the teacher's forward and keeps only what the loss needs:
for MultiLevelOT the per-sequence top-k summary, for ULD the paired rows, for MinED the paired rows
at the teacher ids its vocabulary map uses. An offline cache stores the same things (ULD: a
:class:`SortedHead`). ``terms(...)`` runs after the student's forward and returns the loss terms as
sums plus their denominator key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from mlot_ds import losses
from mlot_ds.config import LossConfig
from mlot_ds.losses import head as head_losses
from mlot_ds.losses.uld import uld_sorted_head
from mlot_ds.pairing import Pairing

# Reference weights of the baselines: ULD's code uses CE + 1.5 * ULD; DSKD's MinED uses
# 0.5 * CE + 0.5 * KL, i.e. KL weight 1 relative to CE.
ULD_WEIGHT = 1.5
MINED_WEIGHT = 1.0


class SortedHead(NamedTuple):
    """A cached ULD teacher: ``probs [B, P, h]`` largest probabilities (descending), ``tail [B, P]`` the rest."""

    probs: torch.Tensor
    tail: torch.Tensor


@dataclass
class TeacherLoss:
    config: LossConfig
    student_to_teacher: torch.Tensor | None = None  # MinED vocabulary map

    def __post_init__(self):
        if self.config.kind == "mlot":
            self.hparams = losses.resolve_preset(self.config.preset, self.config.overrides)
            self.term_weights = dict(self.hparams.weights)
            self.denominator = "sequences" if self.hparams.normalize_by == "sequences" else "pairs"
        elif self.config.kind == "uld":
            self.term_weights = {"uld": ULD_WEIGHT}
            self.denominator = "pairs"
        else:
            self.term_weights = {"mined": MINED_WEIGHT}
            self.denominator = "pairs"
            if self.student_to_teacher is not None:
                # MinED reads the teacher only at the ids its map uses: keep those columns, and map
                # every student id to its column (``logits[..., map] == columns_logits[..., column_of]``).
                self.teacher_columns, self.column_of_student = torch.unique(self.student_to_teacher, return_inverse=True)
        # The recipe's loss.weights replace the preset's (or the baseline's) multipliers term by term.
        self.term_weights.update({term: float(weight) for term, weight in self.config.weights.items()})

    def pairing_for(self, pairing: Pairing, student_labels: torch.Tensor, teacher_labels: torch.Tensor):
        """The official preset re-derives both answer spans from the labels, as the released code."""
        if self.config.kind == "mlot" and self.hparams.is_official:
            return losses.official_spans(student_labels, teacher_labels, skip_student_eos=self.hparams.skip_student_eos)
        return pairing

    def reduce(self, teacher_logits: torch.Tensor, pairing):
        """Keep what the loss needs from ``[B, Tt, m]`` logits; the caller then drops them."""
        if self.config.kind == "mlot":
            return losses.teacher_summary(teacher_logits, pairing, preset=self.hparams)
        # ULD reads only the paired rows: gather them into a compact [B, P, m] tensor.
        if self.config.kind == "uld":
            rows = pairing.teacher_index.unsqueeze(-1).expand(-1, -1, teacher_logits.shape[-1])
            return torch.gather(teacher_logits, 1, rows)
        # MinED also reads only the U columns its map uses: [B, P, U].
        sequence = torch.arange(pairing.mask.shape[0], device=teacher_logits.device).view(-1, 1, 1)
        columns = self._columns(teacher_logits.device).view(1, 1, -1)
        return teacher_logits[sequence, pairing.teacher_index.unsqueeze(2), columns]

    def reduce_hidden(self, hidden: torch.Tensor, weight: torch.Tensor, bias, pairing, gold_labels=None):
        """:meth:`reduce` from the final hidden states ``[B, Tt, H]`` and the output layer, without
        the full logits; also the per-sequence gold CE ``{"ce", "tokens"}`` when ``gold_labels`` is given."""
        if self.config.kind == "mlot":
            return head_losses.teacher_summary_from_hidden(hidden, weight, bias, pairing, preset=self.hparams,
                                                           ce_labels=gold_labels)
        columns = self._columns(hidden.device) if self.config.kind == "mined" else None
        reduced = head_losses.rows_logits(hidden, weight, bias, pairing.teacher_index, columns)
        gold = None if gold_labels is None else head_losses.ce_per_sequence_from_hidden(hidden, weight, bias, gold_labels)
        return reduced, gold

    def _columns(self, device) -> torch.Tensor:
        if self.student_to_teacher is None:
            raise ValueError("loss 'mined' needs the student-to-teacher vocabulary map (pairing 'dtw')")
        return self.teacher_columns.to(device)

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
            if isinstance(reduced, SortedHead):
                return {"uld": uld_sorted_head(student_logits, reduced.probs, reduced.tail, compact)["uld"]}
            return {"uld": losses.uld(student_logits, reduced, None, None, pairing=compact)["uld"]}
        column_of_student = self.column_of_student.to(student_logits.device)
        return {"mined": losses.mined_kl(student_logits, reduced, compact, column_of_student)["mined"]}


def _arange_like(index: torch.Tensor) -> torch.Tensor:
    return torch.arange(index.shape[1], device=index.device).unsqueeze(0).expand_as(index)
