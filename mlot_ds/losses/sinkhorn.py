"""Log-domain Sinkhorn plan and distance, batched over sequences with masks (paper eq. 17-20).

The paper's eq. (19) alternately rescales ``K = exp(-C / lambda)`` so that every row sums to 1, then
every column sums to 1, and stops after N rounds: ``P = K^N``. In the log domain that is the
classic pair of dual updates with unit marginals,

    u_i = -logsumexp_j(-C_ij / lambda + v_j)        (rows to 1)
    v_j = -logsumexp_i(-C_ij / lambda + u_i)        (columns to 1)
    P_ij = exp(-C_ij / lambda + u_i + v_j),

which is the same plan as the plain-domain iteration in exact arithmetic but never under- or
overflows. Rows and columns outside the masks are excluded: their kernel entries are a large
negative log value and their dual variables are pinned to 0, so padding never carries mass.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

# Log-kernel value of masked entries. Costs here are L1 distances between probability vectors
# (at most 2), so -C/lambda stays far above this for any lambda > 2e-9; exp() of it is exactly 0.
_MASKED_LOG_KERNEL = -1e9


def sinkhorn_plan(
    cost: torch.Tensor,
    row_mask: torch.Tensor,
    col_mask: torch.Tensor,
    *,
    sinkhorn_lambda: float = 0.1,
    sinkhorn_iters: int = 20,
    differentiate: bool = False,
) -> torch.Tensor:
    """Entropic transport plan after ``sinkhorn_iters`` row-then-column normalisations (eq. 18-19).

    Args:
        cost: ``[B, I, J]`` float cost ``C`` (eq. 20), rows = teacher tokens, columns = student tokens.
        row_mask: ``[B, I]`` bool, valid rows. col_mask: ``[B, J]`` bool, valid columns.
        sinkhorn_lambda: entropy weight ``lambda`` (eq. 17, paper 0.1).
        sinkhorn_iters: number ``N`` of rounds (paper 20).
        differentiate: if False (default) the plan is computed from a detached cost and carries no
            gradient, so ``<P, C>`` backpropagates only through ``C`` (envelope-theorem gradient).
            If True the iterations are recorded by autograd.

    Returns:
        ``[B, I, J]`` plan ``P^lambda``; zero outside ``row_mask x col_mask``. After the last round
        every valid column sums to exactly 1; valid rows sum to 1 up to the convergence error.
    """
    if cost.dim() != 3 or row_mask.shape != cost.shape[:2] or col_mask.shape != (cost.shape[0], cost.shape[2]):
        raise ValueError(
            f"sinkhorn_plan: cost must be [B, I, J] with row_mask [B, I] and col_mask [B, J], got "
            f"{tuple(cost.shape)}, {tuple(row_mask.shape)}, {tuple(col_mask.shape)}"
        )
    if not sinkhorn_lambda > 0:
        raise ValueError(f"sinkhorn_lambda must be > 0, got {sinkhorn_lambda}")
    valid = row_mask.unsqueeze(2) & col_mask.unsqueeze(1)
    with nullcontext() if differentiate else torch.no_grad():
        source = cost if differentiate else cost.detach()
        log_kernel = torch.where(valid, -source / sinkhorn_lambda, _MASKED_LOG_KERNEL)  # eq. 18
        row_dual = torch.zeros(row_mask.shape, dtype=cost.dtype, device=cost.device)
        col_dual = torch.zeros(col_mask.shape, dtype=cost.dtype, device=cost.device)
        for _ in range(sinkhorn_iters):  # eq. 19
            row_dual = torch.where(row_mask, -torch.logsumexp(log_kernel + col_dual.unsqueeze(1), dim=2), 0.0)
            col_dual = torch.where(col_mask, -torch.logsumexp(log_kernel + row_dual.unsqueeze(2), dim=1), 0.0)
        log_plan = log_kernel + row_dual.unsqueeze(2) + col_dual.unsqueeze(1)
        return torch.where(valid, torch.exp(log_plan), 0.0)


def sinkhorn_distance(
    cost: torch.Tensor,
    row_mask: torch.Tensor,
    col_mask: torch.Tensor,
    *,
    sinkhorn_lambda: float = 0.1,
    sinkhorn_iters: int = 20,
    differentiate: bool = False,
) -> torch.Tensor:
    """Per-sequence Sinkhorn distance ``L_SD = <P^lambda, C>`` (eq. 20), shape ``[B]``.

    Arguments as :func:`sinkhorn_plan`. A sequence with no valid row or column gives exactly 0.
    """
    plan = sinkhorn_plan(
        cost,
        row_mask,
        col_mask,
        sinkhorn_lambda=sinkhorn_lambda,
        sinkhorn_iters=sinkhorn_iters,
        differentiate=differentiate,
    )
    return (plan * cost).sum(dim=(1, 2))
