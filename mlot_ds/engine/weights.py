"""Per-teacher weights ``w_j`` in ``L = CE + sum_j w_j * KD_j`` (docs/METHOD.md, "Several teachers").

``static``: the recipe's weights, divided by their sum when ``normalize`` is on (so they sum to 1),
or used raw.

``dynamic``: ``w_j ∝ prior_j * exp(-CE_j / temperature)``, a softmin over each teacher's
cross-entropy on the gold response (nats per token), normalised to sum to 1. The statistics of
step ``s`` are summed over every rank and micro-batch, then set the weights of step ``s + 1``. Using
the previous step keeps the weights identical on every rank (so every rank optimises the same loss)
and independent of how the global batch is split over ranks and accumulation steps. Step 0 uses the
normalised priors.
"""

from __future__ import annotations

import math


class TeacherWeights:
    def __init__(self, names: list[str], priors: list[float], mode: str, normalize: bool, temperature: float):
        self.names = list(names)
        self.priors = [float(p) for p in priors]
        self.mode = mode
        self.normalize = normalize
        self.temperature = temperature
        self.current = self._static()

    def _static(self) -> dict[str, float]:
        if self.mode == "static" and not self.normalize:
            return dict(zip(self.names, self.priors))
        total = sum(self.priors)
        return {name: prior / total for name, prior in zip(self.names, self.priors)}

    def update(self, ce_sum: dict[str, float], ce_tokens: dict[str, float]) -> None:
        """Dynamic mode: set the next step's weights from this step's global teacher CE."""
        if self.mode != "dynamic":
            return
        scores = {}
        for name, prior in zip(self.names, self.priors):
            tokens = ce_tokens.get(name, 0.0)
            if tokens <= 0 or prior <= 0:
                scores[name] = float("-inf") if prior <= 0 else math.log(prior)
                continue
            scores[name] = math.log(prior) - (ce_sum[name] / tokens) / self.temperature
        top = max(scores.values())
        exps = {name: math.exp(score - top) for name, score in scores.items()}
        total = sum(exps.values())
        self.current = {name: value / total for name, value in exps.items()}

    def state_dict(self) -> dict:
        return {"current": dict(self.current)}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("current", {})
        if set(saved) == set(self.names):
            self.current = {name: float(saved[name]) for name in self.names}
