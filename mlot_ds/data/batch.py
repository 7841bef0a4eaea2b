"""The tensors of one micro-batch, per model, plus the pairing of each teacher with the student.

:class:`ModelBatch` (one model's tensors) lives in :mod:`mlot_ds.pairing.types`, the contract the
data pipeline, the losses and the engine share.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mlot_ds.pairing.types import ModelBatch, Pairing


@dataclass
class Batch:
    """A micro-batch for the student and every teacher, all holding the same records in order.

    Attributes:
        student: the student's tensors.
        teachers: teacher name -> its tensors, in the order of the teachers list.
        pairings: teacher name -> :class:`Pairing` of student and teacher logit rows.
        record_ids: ``[B]`` long, ``Record.id`` of each row, ``-1`` for filler rows (copies of
            a real record with no labels and no pairs, so that every rank runs every forward).
        groups: teacher name -> ``(student_stop [B, P], teacher_stop [B, P])``, the exclusive end
            row of each pair's offsets group (teachers whose method reads groups).
        overlaps: teacher name -> ``(lo [B, Ns], hi [B, Ns], mask [B, Ns])``, per student response
            token the teacher response tokens overlapping its bytes (methods that read overlaps).
    """

    student: ModelBatch
    teachers: dict[str, ModelBatch]
    pairings: dict[str, Pairing]
    record_ids: torch.Tensor
    groups: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    overlaps: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(
            self.student.to(device),
            {name: batch.to(device) for name, batch in self.teachers.items()},
            {name: pairing.to(device) for name, pairing in self.pairings.items()},
            self.record_ids.to(device),
            {name: tuple(t.to(device) for t in value) for name, value in self.groups.items()},
            {name: tuple(t.to(device) for t in value) for name, value in self.overlaps.items()},
        )
