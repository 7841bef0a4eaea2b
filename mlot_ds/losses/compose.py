"""Turn per-term sums and weights into one loss scalar and a dict of detached terms for logging."""

from __future__ import annotations

from typing import Mapping

import torch


def compose(
    terms: Mapping[str, torch.Tensor], weights: Mapping[str, float], denominator
) -> tuple[torch.Tensor, dict[str, float]]:
    """``loss = sum_name weights[name] * terms[name] / denominator``.

    Args:
        terms: per-term sums (e.g. ``{"had", "sl", "sd"}`` of one teacher, or ``{"ce"}``).
        weights: a weight for every term; a term without a weight, or a weight without a term,
            raises ``ValueError`` (a silent zero weight hides typos).
        denominator: the global count the sums are normalised by (number or tensor). A count of 0
            means every sum is 0 as well; it is clamped to 1 so the result is 0, not NaN.

    Returns:
        ``(loss, logged)``: ``loss`` keeps the graph; ``logged[name] = terms[name] / denominator``
        (unweighted, detached Python floats) plus ``logged["total"]``.
    """
    missing = sorted(set(terms) - set(weights))
    unused = sorted(set(weights) - set(terms))
    if missing or unused:
        raise ValueError(f"compose: terms without a weight {missing}, weights without a term {unused}")
    if not terms:
        raise ValueError("compose: no terms given")
    denom = torch.as_tensor(denominator, dtype=torch.float32).clamp(min=1)
    loss = None
    logged: dict[str, float] = {}
    for name, value in terms.items():
        normalised = value / denom.to(value.device)
        logged[name] = float(normalised.detach())
        loss = weights[name] * normalised if loss is None else loss + weights[name] * normalised
    logged["total"] = float(loss.detach())
    return loss, logged
