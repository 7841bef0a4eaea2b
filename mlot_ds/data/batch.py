"""The tensors of one micro-batch, per model, plus the pairing of each teacher with the student."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mlot_ds.pairing.types import Pairing


@dataclass
class ModelBatch:
    """One model's view of a micro-batch (right-padded).

    Attributes:
        input_ids: ``[B, T]`` long: rendered prompt, response, and EOS when appended.
        attention_mask: ``[B, T]`` long, 1 on real tokens.
        labels: ``[B, T]`` long, Hugging Face (unshifted) convention: the response ids and the
            final EOS, ``-100`` everywhere else (prompt, padding, and whole filler rows).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def to(self, device: torch.device | str) -> "ModelBatch":
        return ModelBatch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))


@dataclass
class Batch:
    """A micro-batch for the student and every teacher, all holding the same records in order.

    Attributes:
        student: the student's tensors.
        teachers: teacher name -> its tensors, in the order of the teachers list.
        pairings: teacher name -> :class:`Pairing` of student and teacher logit rows.
        record_ids: ``[B]`` long, ``Record.id`` of each row, ``-1`` for filler rows (copies of
            a real record with no labels and no pairs, so that every rank runs every forward).
    """

    student: ModelBatch
    teachers: dict[str, ModelBatch]
    pairings: dict[str, Pairing]
    record_ids: torch.Tensor

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(
            self.student.to(device),
            {name: batch.to(device) for name, batch in self.teachers.items()},
            {name: pairing.to(device) for name, pairing in self.pairings.items()},
            self.record_ids.to(device),
        )
