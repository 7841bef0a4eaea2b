"""Streaming per-row statistics of logit rows: log-normalisers, gathered logits, masked and tail masses.

Every loss of this package that is not a full-distribution match reads a handful of numbers per logit
row ``z`` (one row = one position's ``V`` logits, at inverse temperature ``1 / tau``):

- ``lse = log sum_v exp(z_v / tau)``, the log-normaliser (CE, KL, ALM, VocAgnoLM);
- ``gathered_k = z[id_k] / tau`` at a few ids per row (the CE target, a teacher's top-k ids);
- ``masked_lse = log sum_{v in S} exp(z_v / tau)`` over a fixed id set ``S`` (ALM's boundary tokens);
- ``tail_lse = log sum_{v not in ids(r)} exp(z_v / tau)``, the mass outside the row's gathered ids
  (the tail bucket of a top-k KL, computed directly rather than as ``1 - sum``, which cancels).

So ``log softmax(z / tau)[id] = gathered - lse`` and ``log P(S) = masked_lse - lse``.

Student side (:func:`student_row_stats`): a custom autograd function visits the needed rows in blocks
of about ``chunk_elements`` logits (:func:`~mlot_ds.losses.ranking.block_elements`), keeps only the
per-row scalars, and in the backward recomputes each block and writes it into ONE gradient tensor of
the logits' shape and dtype. With ``s = z / tau`` and ``p = softmax(s)``:

    d lse        / d z_v = p_v / tau
    d gathered_k / d z_v = [v = id_k] / tau
    d masked_lse / d z_v = [v in S] exp(s_v - masked_lse) / tau
    d tail_lse   / d z_v = [v not in ids] exp(s_v - tail_lse) / tau

No ``[R, V]`` softmax is saved and no second full-size temporary exists; rows that are not asked for
get a zero gradient.

Teacher side (:func:`teacher_row_stats`): the same statistics without autograd, from a callback that
produces the logits of a few rows at a time (an ``index_select`` of full logits, or the output layer
applied to the selected hidden states, as :mod:`mlot_ds.losses.head` does), so only one ``[r, V]``
block is alive at any time.

:func:`student_token_stats` / :func:`teacher_token_stats` lay the two quantities ALM and VocAgnoLM
need out per token position: ``log p(token t)`` read at row ``t - 1`` (HF unshifted labels, as
:func:`~mlot_ds.losses.ce.labelled_rows`) and the boundary log-mass read at row ``t`` itself.

Computation is in float32 for bf16/fp16/fp32 logits and in float64 for float64 (gradcheck).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from mlot_ds.losses.head import head_chunk_rows
from mlot_ds.losses.ranking import (
    _read_block,
    block_elements,
    compute_dtype_for,
    row_blocks,
)
from mlot_ds.pairing import IGNORE_INDEX


class RowStats(NamedTuple):
    """Per-row statistics of :func:`student_row_stats` (``None`` where not asked for).

    Attributes:
        lse: ``[R]`` ``logsumexp(z / tau)``.
        gathered: ``[R, K]`` ``z[ids] / tau``.
        masked_lse: ``[R]`` ``logsumexp`` of ``z / tau`` over the mask ids.
        tail_lse: ``[R]`` ``logsumexp`` of ``z / tau`` over the ids NOT in the row's ``gather_ids``
            (``-inf`` when the gathered ids cover the whole vocabulary).
    """

    lse: torch.Tensor
    gathered: torch.Tensor | None
    masked_lse: torch.Tensor | None
    tail_lse: torch.Tensor | None


def _check_rows(rows: torch.Tensor, count: int, name: str = "rows") -> None:
    if rows.dim() != 1 or rows.dtype != torch.long:
        raise ValueError(f"{name} must be a 1-D LongTensor, got {rows.dtype} of shape {tuple(rows.shape)}")
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= count):
        raise ValueError(f"{name} out of range [0, {count}): {int(rows.min())}..{int(rows.max())}")


def _check_mask(mask: torch.Tensor, vocab: int) -> None:
    if mask.shape != (vocab,) or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a BoolTensor of shape [{vocab}], got {mask.dtype} {tuple(mask.shape)}")
    if not bool(mask.any()):
        raise ValueError("mask selects no vocabulary id: its log-sum-exp would be -inf")


class _StudentRowStats(torch.autograd.Function):
    """forward(logits [B, T, V], rows [R], inv_t, gather_ids [R, K] | None, mask [V] | None, tail, chunk_elements)
    -> (lse [R], gathered [R, K] or [R, 0], masked_lse [R] or [0], tail_lse [R] or [0])."""

    @staticmethod
    def forward(ctx, logits, rows, inv_t, gather_ids, mask, tail, chunk_elements):
        vocab = logits.shape[-1]
        logits2d = logits.reshape(-1, vocab)
        dtype = compute_dtype_for(logits.dtype)
        count = rows.numel()
        lse = torch.empty(count, dtype=dtype, device=logits.device)
        masked = torch.empty(count if mask is not None else 0, dtype=dtype, device=logits.device)
        tail_lse = torch.empty(count if tail else 0, dtype=dtype, device=logits.device)
        mask_ids = mask.nonzero().squeeze(1) if mask is not None else None
        step = block_elements(chunk_elements, logits.device) // max(vocab, 1)
        for start, stop, first_row in row_blocks(rows, step):
            scaled = _read_block(logits2d, rows, start, stop, first_row, dtype)
            if inv_t != 1.0 or tail:
                scaled = scaled * inv_t  # a new block (the tail below writes into it)
            lse[start:stop] = torch.logsumexp(scaled, dim=1)
            if mask_ids is not None:
                masked[start:stop] = torch.logsumexp(scaled.index_select(1, mask_ids), dim=1)
            if tail:
                scaled.scatter_(1, gather_ids[start:stop], float("-inf"))
                tail_lse[start:stop] = torch.logsumexp(scaled, dim=1)
        if gather_ids is not None:
            gathered = logits2d[rows.unsqueeze(1), gather_ids].to(dtype) * inv_t
        else:
            gathered = torch.empty(count, 0, dtype=dtype, device=logits.device)
        ctx.set_materialize_grads(False)
        empty_ids = torch.empty(count, 0, dtype=torch.long, device=logits.device)
        ctx.save_for_backward(logits, rows, gather_ids if gather_ids is not None else empty_ids,
                              mask if mask is not None else torch.empty(0, dtype=torch.bool, device=logits.device),
                              lse, masked, tail_lse)
        ctx.inv_t, ctx.chunk_elements = inv_t, chunk_elements
        return lse, gathered, masked, tail_lse

    @staticmethod
    def backward(ctx, grad_lse, grad_gathered, grad_masked, grad_tail):
        logits, rows, gather_ids, mask, lse, masked, tail_lse = ctx.saved_tensors
        inv_t = ctx.inv_t
        shape, vocab = logits.shape, logits.shape[-1]
        logits2d = logits.reshape(-1, vocab)
        dtype = lse.dtype
        if not masked.numel():
            grad_masked = None
        if not tail_lse.numel():
            grad_tail = None
        if not gather_ids.numel():
            grad_gathered = None

        grad2d = torch.empty(logits2d.shape, dtype=logits.dtype, device=logits.device)
        untouched = torch.ones(logits2d.shape[0], dtype=torch.bool, device=logits.device)
        untouched[rows] = False
        grad2d.index_fill_(0, untouched.nonzero().squeeze(1), 0)
        if grad_lse is None and grad_masked is None and grad_tail is None and grad_gathered is None:
            grad2d.index_fill_(0, rows, 0)
            return grad2d.view(shape), None, None, None, None, None, None

        mask_scale = mask.to(dtype) if grad_masked is not None else None
        if grad_tail is not None:
            # Rows whose ids cover the vocabulary have no tail: no gradient, and a finite stand-in
            # normaliser keeps exp() below 1 before those entries are zeroed.
            no_tail = torch.isinf(tail_lse)
            tail_norm = torch.where(no_tail, lse, tail_lse)
            tail_coef = torch.where(no_tail, torch.zeros_like(grad_tail), grad_tail.to(dtype) * inv_t)
        step = block_elements(ctx.chunk_elements, logits.device) // max(vocab, 1)
        for start, stop, first_row in row_blocks(rows, step):
            direct = first_row is not None and grad2d.dtype == dtype
            if direct:  # contiguous rows in the compute dtype: write straight into the gradient
                out = grad2d[first_row : first_row + stop - start]
            else:
                out = torch.empty(stop - start, vocab, dtype=dtype, device=logits.device)
            written = False
            if grad_lse is not None or grad_masked is not None or grad_tail is not None:
                z = _read_block(logits2d, rows, start, stop, first_row, dtype)
                if grad_lse is not None:
                    torch.add(-lse[start:stop].unsqueeze(1), z, alpha=inv_t, out=out).exp_()
                    out.mul_((grad_lse[start:stop].to(dtype) * inv_t).unsqueeze(1))
                    written = True
                if grad_masked is not None:
                    part = torch.add(-masked[start:stop].unsqueeze(1), z, alpha=inv_t).exp_().mul_(mask_scale)
                    coef = (grad_masked[start:stop].to(dtype) * inv_t).unsqueeze(1)
                    if written:
                        out.addcmul_(part, coef)
                    else:
                        torch.mul(part, coef, out=out)
                        written = True
                    del part
                if grad_tail is not None:
                    part = torch.add(-tail_norm[start:stop].unsqueeze(1), z, alpha=inv_t).exp_()
                    part.scatter_(1, gather_ids[start:stop], 0.0)
                    coef = tail_coef[start:stop].unsqueeze(1)
                    if written:
                        out.addcmul_(part, coef)
                    else:
                        torch.mul(part, coef, out=out)
                        written = True
                    del part
            if not written:
                out.zero_()
            if grad_gathered is not None:
                # The sparse part is added in the compute dtype, before any cast to bf16/fp16.
                out.scatter_add_(1, gather_ids[start:stop], grad_gathered[start:stop].to(dtype) * inv_t)
            if first_row is None:
                grad2d.index_copy_(0, rows[start:stop], out.to(grad2d.dtype))
            elif not direct:
                grad2d[first_row : first_row + stop - start].copy_(out)
        return grad2d.view(shape), None, None, None, None, None, None


def student_row_stats(
    logits: torch.Tensor,
    rows: torch.Tensor,
    *,
    inv_temperature: float = 1.0,
    gather_ids: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    tail: bool = False,
    chunk_elements: int | None = None,
) -> RowStats:
    """Differentiable per-row statistics of the logit rows ``rows`` at temperature ``tau``.

    With ``s = z / tau`` for the row ``z = logits.reshape(-1, V)[rows[r]]``:

        lse[r]        = log sum_v exp(s_v)
        gathered[r,k] = s[gather_ids[r, k]]
        masked_lse[r] = log sum_{v : mask[v]} exp(s_v)
        tail_lse[r]   = log sum_{v not in gather_ids[r]} exp(s_v)

    Rows are read in blocks of about ``chunk_elements`` logits; the backward recomputes each block
    and writes it into one gradient of the logits' shape and dtype (zero outside ``rows``). Any
    output may be left unused. Duplicate ids in a row of ``gather_ids`` are allowed (their
    gradients add up).

    Args:
        logits: ``[B, T, V]`` (or any ``[..., V]``) float logits.
        rows: ``[R]`` long, distinct flat row ids ``b * T + t`` in ascending order.
        inv_temperature: ``1 / tau`` (> 0).
        gather_ids: ``[R, K]`` long vocabulary ids to read per row.
        mask: ``[V]`` bool, the id set of ``masked_lse`` (at least one ``True``).
        tail: also return ``tail_lse`` (needs ``gather_ids``).
        chunk_elements: block size in logits (``None``: the per-device default of
            :func:`~mlot_ds.losses.ranking.block_elements`).

    Returns:
        :class:`RowStats` in float32 (float64 for float64 logits).
    """
    if logits.dim() < 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a float tensor [..., V], got {logits.dtype} {tuple(logits.shape)}")
    vocab = logits.shape[-1]
    count = logits.numel() // max(vocab, 1)
    _check_rows(rows, count)
    if rows.numel() > 1 and not bool((rows[1:] > rows[:-1]).all()):
        raise ValueError("rows must be distinct and ascending")
    if not inv_temperature > 0:
        raise ValueError(f"inv_temperature must be > 0, got {inv_temperature}")
    if gather_ids is not None:
        if gather_ids.dim() != 2 or gather_ids.shape[0] != rows.numel() or gather_ids.dtype != torch.long:
            raise ValueError(f"gather_ids must be a LongTensor [R={rows.numel()}, K], got {gather_ids.dtype} "
                             f"{tuple(gather_ids.shape)}")
        if gather_ids.numel() and (int(gather_ids.min()) < 0 or int(gather_ids.max()) >= vocab):
            raise ValueError(f"gather_ids out of range [0, {vocab})")
    if mask is not None:
        _check_mask(mask, vocab)
    if tail and gather_ids is None:
        raise ValueError("tail=True needs gather_ids (the tail is everything outside them)")
    lse, gathered, masked, tail_lse = _StudentRowStats.apply(
        logits, rows, float(inv_temperature), gather_ids, mask, bool(tail), chunk_elements)
    return RowStats(lse, gathered if gather_ids is not None else None, masked if mask is not None else None,
                    tail_lse if tail else None)


def teacher_row_stats(
    read_rows: Callable[[torch.Tensor], torch.Tensor],
    rows: torch.Tensor,
    *,
    vocab: int,
    inv_temperature: float = 1.0,
    targets: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    topk: int | None = None,
    entropy: bool = False,
    rows_per_block: int | None = None,
) -> dict[str, torch.Tensor]:
    """Per-row statistics of a frozen model's logit rows, one ``[r, V]`` block at a time, no autograd.

    ``read_rows(flat_rows [r]) -> [r, V]`` returns the logits of those rows (e.g.
    ``logits2d.index_select(0, flat_rows)`` or ``F.linear(hidden2d.index_select(0, flat_rows), W, b)``).
    With ``s = z / tau`` and ``p = softmax(s)``, the returned dict holds, as asked:

        lse                 [R]     log sum_v exp(s_v)                     (always)
        target_log_prob     [R]     s[target] - lse                        (targets [R] given)
        masked_log_mass     [R]     log sum_{v in mask} p_v                (mask [V] given)
        topk_ids            [R, k]  ids of the k largest p_v, descending   (topk given; k <= V)
        topk_log_probs      [R, k]  log p at those ids
        topk_tail_log_mass  [R]     log sum_{v not in topk_ids} p_v        (-inf when k = V)
        entropy             [R]     -sum_v p_v log p_v                      (entropy=True)

    Args:
        read_rows: the row reader; called once per block with consecutive slices of ``rows``.
        rows: ``[R]`` long flat row ids (any order; repeats allowed), passed through to ``read_rows``.
        vocab: ``V``, the width ``read_rows`` must return.
        inv_temperature: ``1 / tau`` (> 0).
        targets: ``[R]`` long target ids.
        mask: ``[V]`` bool id set (at least one ``True``).
        topk: number of top ids to keep per row (at most ``V``).
        entropy: also return the entropy of ``softmax(s)``.
        rows_per_block: rows per block (``None``: :func:`~mlot_ds.losses.head.head_chunk_rows`).

    Returns:
        The dict above, float32 (float64 when ``read_rows`` returns float64).
    """
    if rows.dim() != 1 or rows.dtype != torch.long:
        raise ValueError(f"rows must be a 1-D LongTensor, got {rows.dtype} of shape {tuple(rows.shape)}")
    if not inv_temperature > 0:
        raise ValueError(f"inv_temperature must be > 0, got {inv_temperature}")
    count = rows.numel()
    if targets is not None:
        if targets.shape != (count,) or targets.dtype != torch.long:
            raise ValueError(f"targets must be a LongTensor [R={count}], got {targets.dtype} {tuple(targets.shape)}")
        if count and (int(targets.min()) < 0 or int(targets.max()) >= vocab):
            raise ValueError(f"targets out of range [0, {vocab})")
    if mask is not None:
        _check_mask(mask, vocab)
    if topk is not None and not 0 < topk <= vocab:
        raise ValueError(f"topk must lie in [1, vocab={vocab}], got {topk}")
    step = max(1, rows_per_block) if rows_per_block is not None else head_chunk_rows(vocab, None, rows.device)
    mask_ids = mask.nonzero().squeeze(1) if mask is not None else None
    out: dict[str, torch.Tensor] | None = None
    with torch.no_grad():
        for start in range(0, count, step):
            stop = min(start + step, count)
            block = read_rows(rows[start:stop])
            if block.shape != (stop - start, vocab):
                raise ValueError(f"read_rows returned {tuple(block.shape)}, expected {(stop - start, vocab)}")
            dtype = compute_dtype_for(block.dtype)
            scaled = block.to(dtype) * inv_temperature
            del block
            if out is None:
                out = _teacher_outputs(count, topk, targets is not None, mask is not None, entropy, dtype, rows.device)
            lse = torch.logsumexp(scaled, dim=1)
            out["lse"][start:stop] = lse
            if targets is not None:
                out["target_log_prob"][start:stop] = scaled.gather(1, targets[start:stop].unsqueeze(1)).squeeze(1) - lse
            if mask_ids is not None:
                out["masked_log_mass"][start:stop] = torch.logsumexp(scaled.index_select(1, mask_ids), dim=1) - lse
            if entropy:
                # H = lse - sum_v p_v s_v
                probs = torch.add(-lse.unsqueeze(1), scaled).exp_()
                out["entropy"][start:stop] = lse - (probs * scaled).sum(dim=1)
                del probs
            if topk is not None:
                values, ids = scaled.topk(topk, dim=1)
                out["topk_ids"][start:stop] = ids
                out["topk_log_probs"][start:stop] = values - lse.unsqueeze(1)
                scaled.scatter_(1, ids, float("-inf"))
                out["topk_tail_log_mass"][start:stop] = torch.logsumexp(scaled, dim=1) - lse
            del scaled
    if out is None:
        out = _teacher_outputs(0, topk, targets is not None, mask is not None, entropy, torch.float32, rows.device)
    return out


def _teacher_outputs(count, topk, with_targets, with_mask, with_entropy, dtype, device) -> dict[str, torch.Tensor]:
    out = {"lse": torch.empty(count, dtype=dtype, device=device)}
    if with_targets:
        out["target_log_prob"] = torch.empty(count, dtype=dtype, device=device)
    if with_mask:
        out["masked_log_mass"] = torch.empty(count, dtype=dtype, device=device)
    if topk is not None:
        out["topk_ids"] = torch.empty(count, topk, dtype=torch.long, device=device)
        out["topk_log_probs"] = torch.empty(count, topk, dtype=dtype, device=device)
        out["topk_tail_log_mass"] = torch.empty(count, dtype=dtype, device=device)
    if with_entropy:
        out["entropy"] = torch.empty(count, dtype=dtype, device=device)
    return out


class TokenStats(NamedTuple):
    """Per-token quantities laid out at token positions ``[B, T]`` (0 where ``valid`` is False).

    Attributes:
        log_prob: ``log p(x_t | x_<t)``, read at logit row ``t - 1`` (the row that predicts token ``t``).
        boundary_log_mass: ``log sum_{v in S} p(v | x_<=t)``, read at token ``t``'s own row ``t``: the
            probability that the token AFTER ``t`` starts at a boundary (``None`` without a mask).
        valid: ``labels[b, t] != -100`` and ``t >= 1`` (token 0 has no predicting row).
    """

    log_prob: torch.Tensor
    boundary_log_mass: torch.Tensor | None
    valid: torch.Tensor


def _token_rows(labels: torch.Tensor):
    """Flat rows and targets needed for the labelled tokens: predicting rows ``t - 1`` and own rows ``t``."""
    valid = labels != IGNORE_INDEX
    valid[:, 0] = False
    own = valid.reshape(-1).nonzero().squeeze(1)  # flat position of every valid token
    predicting = own - 1
    targets = labels.reshape(-1)[own]
    return valid, own, predicting, targets


def _scatter_tokens(values: torch.Tensor, positions: torch.Tensor, shape) -> torch.Tensor:
    out = values.new_zeros(shape[0] * shape[1])
    return out.index_put((positions,), values).view(shape)


def student_token_stats(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    boundary_mask: torch.Tensor | None = None,
    chunk_elements: int | None = None,
) -> TokenStats:
    """:class:`TokenStats` of the student (with gradient), from one pass of :func:`student_row_stats`.

    Args:
        logits: ``[B, T, V]``; labels: ``[B, T]`` HF unshifted labels (-100 = not a scored token).
        boundary_mask: ``[V]`` bool boundary-token set (:func:`mlot_ds.pairing.boundary.boundary_token_mask`).
        chunk_elements: block size of the kernel.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"labels {tuple(labels.shape)} must be [B, T] matching logits {tuple(logits.shape)}")
    valid, own, predicting, targets = _token_rows(labels)
    needed = torch.cat([predicting, own]) if boundary_mask is not None else predicting
    rows, inverse = torch.unique(needed, sorted=True, return_inverse=True)
    slot_pred = inverse[: predicting.numel()]
    ids = torch.zeros(rows.numel(), 1, dtype=torch.long, device=logits.device)
    ids[slot_pred, 0] = targets
    stats = student_row_stats(logits, rows, gather_ids=ids, mask=boundary_mask, chunk_elements=chunk_elements)
    log_prob = _scatter_tokens(stats.gathered[slot_pred, 0] - stats.lse[slot_pred], own, labels.shape)
    boundary = None
    if boundary_mask is not None:
        slot_own = inverse[predicting.numel():]
        boundary = _scatter_tokens(stats.masked_lse[slot_own] - stats.lse[slot_own], own, labels.shape)
    return TokenStats(log_prob, boundary, valid)


def teacher_token_stats(
    read_rows: Callable[[torch.Tensor], torch.Tensor],
    labels: torch.Tensor,
    *,
    vocab: int,
    boundary_mask: torch.Tensor | None = None,
    rows_per_block: int | None = None,
) -> TokenStats:
    """:class:`TokenStats` of a frozen teacher (no gradient), via :func:`teacher_row_stats`.

    ``read_rows`` takes flat rows ``b * T + t`` of the teacher's ``[B, T]`` layout (same as ``labels``).
    """
    if labels.dim() != 2:
        raise ValueError(f"labels must be [B, T], got {tuple(labels.shape)}")
    valid, own, predicting, targets = _token_rows(labels)
    needed = torch.cat([predicting, own]) if boundary_mask is not None else predicting
    rows, inverse = torch.unique(needed, sorted=True, return_inverse=True)
    slot_pred = inverse[: predicting.numel()]
    row_targets = torch.zeros(rows.numel(), dtype=torch.long, device=labels.device)
    row_targets[slot_pred] = targets
    stats = teacher_row_stats(read_rows, rows, vocab=vocab, targets=row_targets, mask=boundary_mask,
                              rows_per_block=rows_per_block)
    log_prob = _scatter_tokens(stats["target_log_prob"][slot_pred], own, labels.shape)
    boundary = None
    if boundary_mask is not None:
        boundary = _scatter_tokens(stats["masked_log_mass"][inverse[predicting.numel():]], own, labels.shape)
    return TokenStats(log_prob, boundary, valid)
