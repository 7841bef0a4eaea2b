"""One sampler for every model: which records make up each global step, length-grouped.

Epoch ``e`` (seed ``s``): shuffle the records with a generator seeded by ``(s, e)``; cut the
shuffled order into mega-batches of ``megabatch_steps`` global steps; sort each mega-batch by
student sequence length (longest first) and cut it into global steps of ``G`` records; shuffle
the order of the full steps (same generator) and put the one short step, if any, last.

So the set of records of a step depends only on ``(seed, epoch, step, G)`` and the records'
lengths, never on how ``G = micro_batch_size * grad_accum * world_size`` is split across ranks
and accumulation steps. Within a step the records stay sorted by length, so each micro-batch
holds records of similar length (little padding).
"""

from __future__ import annotations

import math

import numpy as np

FILLER = -1


class LengthGroupedSteps:
    """Random-access global steps over ``len(lengths)`` records.

    Args:
        lengths: ``[N]`` student sequence length of each record.
        global_batch: ``G``, records per global step.
        seed: base seed; each epoch uses ``(seed, epoch)``.
        megabatch_steps: global steps per length-sorted mega-batch.
    """

    def __init__(self, lengths: np.ndarray, global_batch: int, seed: int, megabatch_steps: int = 50):
        if global_batch < 1:
            raise ValueError(f"global batch must be >= 1, got {global_batch}")
        if megabatch_steps < 1:
            raise ValueError(f"megabatch_steps must be >= 1, got {megabatch_steps}")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.global_batch = global_batch
        self.seed = seed
        self.megabatch_steps = megabatch_steps
        self.steps_per_epoch = math.ceil(len(self.lengths) / global_batch)
        self._cached_epoch: tuple[int, list[np.ndarray]] | None = None

    def _epoch_steps(self, epoch: int) -> list[np.ndarray]:
        if self._cached_epoch is not None and self._cached_epoch[0] == epoch:
            return self._cached_epoch[1]
        generator = np.random.default_rng([self.seed, epoch])
        order = generator.permutation(len(self.lengths))
        chunk = self.global_batch * self.megabatch_steps
        full, short = [], []
        for begin in range(0, len(order), chunk):
            mega = order[begin : begin + chunk]
            mega = mega[np.argsort(-self.lengths[mega], kind="stable")]
            for start in range(0, len(mega), self.global_batch):
                step = mega[start : start + self.global_batch]
                (full if len(step) == self.global_batch else short).append(step)
        steps = [full[i] for i in generator.permutation(len(full))] + short
        self._cached_epoch = (epoch, steps)
        return steps

    def step(self, epoch: int, step: int) -> np.ndarray:
        """``[G]`` record positions of global step ``step`` (0-based), ``FILLER`` (-1) padding the end."""
        if not 0 <= step < self.steps_per_epoch:
            raise IndexError(f"step {step} out of range: an epoch has {self.steps_per_epoch} steps")
        if epoch < 0:
            raise IndexError(f"epoch must be >= 0, got {epoch}")
        records = self._epoch_steps(epoch)[step]
        filler = np.full(self.global_batch - len(records), FILLER, dtype=np.int64)
        return np.concatenate([records.astype(np.int64), filler])
