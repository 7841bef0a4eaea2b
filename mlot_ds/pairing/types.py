"""The pairing contract shared by the data pipeline, the losses and the engine.

Every cross-tokenizer rule (``position``, ``offsets``, ``dtw``) reduces to the same thing: for each
sequence ``b`` a list of pairs ``(student logit row, teacher logit row)``. The loss gathers those
rows from the two logit tensors and never needs to know which rule produced them.

Indices point at *logit rows*, not at tokens: with Hugging Face (unshifted) labels, the logit at
row ``p`` predicts token ``p + 1``, so a response token at position ``q`` is predicted by row
``q - 1``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Pairing(NamedTuple):
    """Paired logit rows of one batch.

    Attributes:
        student_index: ``[B, P]`` long, row of the student logits ``[B, Ts, n]`` for each pair.
        teacher_index: ``[B, P]`` long, row of the teacher logits ``[B, Tt, m]`` for each pair.
        mask: ``[B, P]`` bool, ``True`` for a real pair. Padded pairs hold index 0 and must be
            ignored by every consumer.

    Pairs of one sequence are stored in text order, left-aligned (``mask[b]`` is a prefix of
    ``True`` values).
    """

    student_index: torch.Tensor
    teacher_index: torch.Tensor
    mask: torch.Tensor

    @property
    def tokens(self) -> int:
        """Number of real pairs in the batch."""
        return int(self.mask.sum())

    def to(self, device: torch.device | str) -> "Pairing":
        return Pairing(self.student_index.to(device), self.teacher_index.to(device), self.mask.to(device))

    def validate(self, student_len: int, teacher_len: int) -> None:
        """Raise ``ValueError`` if any real pair points outside ``[0, len)`` on its side."""
        if not (self.student_index.shape == self.teacher_index.shape == self.mask.shape):
            raise ValueError(
                f"pairing tensors disagree in shape: {tuple(self.student_index.shape)}, "
                f"{tuple(self.teacher_index.shape)}, {tuple(self.mask.shape)}"
            )
        for name, index, length in (
            ("student", self.student_index, student_len),
            ("teacher", self.teacher_index, teacher_len),
        ):
            real = index[self.mask]
            if real.numel() and (int(real.min()) < 0 or int(real.max()) >= length):
                raise ValueError(f"{name} pairing index out of range [0, {length}): {real.min()}..{real.max()}")


def pack_pairs(pairs_per_sequence: list[list[tuple[int, int]]]) -> Pairing:
    """Build a left-aligned :class:`Pairing` from Python lists of ``(student_row, teacher_row)``."""
    batch = len(pairs_per_sequence)
    width = max((len(p) for p in pairs_per_sequence), default=0)
    student_index = torch.zeros(batch, width, dtype=torch.long)
    teacher_index = torch.zeros(batch, width, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.bool)
    for b, pairs in enumerate(pairs_per_sequence):
        if pairs:
            rows = torch.tensor(pairs, dtype=torch.long)
            student_index[b, : len(pairs)] = rows[:, 0]
            teacher_index[b, : len(pairs)] = rows[:, 1]
            mask[b, : len(pairs)] = True
    return Pairing(student_index, teacher_index, mask)


class ModelBatch(NamedTuple):
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
