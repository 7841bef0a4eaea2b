"""Sequence-level ranking and top-k truncation of softmax rows (paper eq. 1, 10-12), memory-lean.

For one sequence and one temperature ``tau``, the rows ``x(i) = softmax(z(i) / tau)`` of its paired
tokens are summed over ``i``; the ``k`` vocabulary ids with the largest sums, in descending order,
are the sequence's ranking, and ``x^k(i)`` is ``x(i)`` read at those ids (no renormalisation).

Both models go through :func:`row_statistics`, which walks the needed logit rows in blocks of about
``chunk_elements`` values. Each block yields every row's log-normaliser ``logsumexp(z / tau)`` and adds
its pair-weighted probabilities into a ``[B, V]`` per-sequence sum through one matrix product. No
temporary of the size of the whole batch is allocated, nothing is sorted, and ``topk`` runs on the
``[B, V]`` sums only. The top-k values are then read back from the logits with a small gather.

The student side is a custom autograd function (:class:`StudentTopK`) whose backward writes the
gradient of the logits block by block, optionally fused with the cross-entropy of the same rows so
that both share one log-sum-exp and one full-size gradient tensor.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class RowSet(NamedTuple):
    """The logit rows one side needs, and how the pairs map onto them.

    Attributes:
        rows: ``[R]`` long, distinct flat row ids ``b * T + t`` (ascending).
        sequence: ``[R]`` long, the sequence ``b`` of each row.
        pair_weight: ``[R]`` float, how many real pairs use each row (0 for rows used by CE only).
        pair_slot: ``[N]`` long, position in ``rows`` of each real pair (pairs in row-major ``(b, p)``
            order of the pairing mask).
        pair_sequence: ``[N]`` long, the sequence of each real pair.
    """

    rows: torch.Tensor
    sequence: torch.Tensor
    pair_weight: torch.Tensor
    pair_slot: torch.Tensor
    pair_sequence: torch.Tensor


def build_row_set(
    row_index: torch.Tensor, mask: torch.Tensor, seq_len: int, extra_rows: torch.Tensor | None = None
) -> RowSet:
    """Flatten a pairing side (``[B, P]`` rows and mask) plus optional extra flat rows into a :class:`RowSet`."""
    batch = row_index.shape[0]
    offsets = torch.arange(batch, device=row_index.device).unsqueeze(1) * seq_len
    pair_rows = (row_index + offsets)[mask]
    pair_sequence = torch.arange(batch, device=row_index.device).unsqueeze(1).expand_as(mask)[mask]
    everything = pair_rows if extra_rows is None else torch.cat([pair_rows, extra_rows])
    rows, inverse = torch.unique(everything, sorted=True, return_inverse=True)
    pair_slot = inverse[: pair_rows.numel()]
    pair_weight = torch.zeros(rows.numel(), dtype=torch.float32, device=rows.device)
    pair_weight.index_add_(0, pair_slot, torch.ones_like(pair_slot, dtype=torch.float32))
    return RowSet(rows, torch.div(rows, seq_len, rounding_mode="floor"), pair_weight, pair_slot, pair_sequence)


# CPU: blocks of 1 MB in float32 keep every intermediate in cache, and no full-vocabulary temporary
# of the whole batch is allocated (fresh allocations, not arithmetic, dominate there). Accelerators:
# large blocks, because every block costs a dozen kernel launches.
_CPU_BLOCK_ELEMENTS = 1 << 18
# 1 / tau for the paper's tau_SD = 2: derived from the temperature-1 probabilities by a square root.
_HALF = 0.5
_ACCELERATOR_BLOCK_ELEMENTS = 1 << 26


def block_elements(chunk_elements: int | None, device: torch.device) -> int:
    """The block size to use: ``chunk_elements`` if given, else a per-device default."""
    if chunk_elements is not None:
        return chunk_elements
    return _CPU_BLOCK_ELEMENTS if device.type == "cpu" else _ACCELERATOR_BLOCK_ELEMENTS


def compute_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """float32 for bf16/fp16/fp32 logits, float64 for float64 (used by gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


def row_blocks(rows: torch.Tensor, block_rows: int) -> list[tuple[int, int, int | None]]:
    """Split ``rows`` (sorted, distinct) into blocks of at most ``block_rows`` rows.

    Returns ``(start, stop, first_row)`` triples; ``first_row`` is set when the block's rows are
    consecutive, so it can be read as a slice (a view, no copy) instead of gathered.
    """
    block_rows = max(1, block_rows)
    values = rows.tolist()
    breaks = [i for i in range(1, len(values)) if values[i] != values[i - 1] + 1]
    runs = list(zip([0] + breaks, breaks + [len(values)]))
    if values and len(values) / len(runs) < 4:  # scattered rows: gather them in full blocks
        return [(a, min(a + block_rows, len(values)), None) for a in range(0, len(values), block_rows)]
    blocks = []
    for run_start, run_stop in runs:
        for a in range(run_start, run_stop, block_rows):
            blocks.append((a, min(a + block_rows, run_stop), values[a]))
    return blocks


def _read_block(logits2d, rows, start, stop, first_row, dtype) -> torch.Tensor:
    if first_row is None:
        return logits2d.index_select(0, rows[start:stop]).to(dtype)
    return logits2d[first_row : first_row + stop - start].to(dtype)


def row_statistics(
    logits2d: torch.Tensor,
    row_set: RowSet,
    batch: int,
    inv_temperatures: tuple[float, ...],
    chunk_elements: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-normalisers and per-sequence probability sums of the rows of ``row_set``.

    Args:
        logits2d: ``[B * T, V]`` logits (any float dtype; computed in float32 or wider).
        row_set: the rows to visit; ``pair_weight`` weights each row's contribution to the sums.
        batch: ``B``.
        inv_temperatures: ``1 / tau`` for each of the ``G`` temperatures.
        chunk_elements: block size in logits (``None``: :func:`block_elements`).

    Returns:
        ``lse [G, R]`` with ``lse[g, r] = logsumexp(z_r / tau_g)``, and ``sums [G, B, V]`` with
        ``sums[g, b] = sum over pairs of sequence b of softmax(z / tau_g)`` (eq. 10's ranking key).
    """
    vocab = logits2d.shape[1]
    dtype = compute_dtype_for(logits2d.dtype)
    count = row_set.rows.numel()
    lse = torch.empty(len(inv_temperatures), count, dtype=dtype, device=logits2d.device)
    sums = torch.zeros(len(inv_temperatures), batch, vocab, dtype=dtype, device=logits2d.device)
    block = block_elements(chunk_elements, logits2d.device)
    for start, stop, first_row in row_blocks(row_set.rows, block // vocab):
        z = _read_block(logits2d, row_set.rows, start, stop, first_row, dtype)
        z_max = z.amax(dim=1, keepdim=True)
        # weights[b, r] = number of pairs of sequence b at row r; folding 1/rowsum into it turns the
        # per-sequence sum of normalised rows into a single [B, rows] x [rows, V] product.
        weights = torch.zeros(batch, stop - start, dtype=dtype, device=z.device)
        weights[row_set.sequence[start:stop], torch.arange(stop - start, device=z.device)] = row_set.pair_weight[
            start:stop
        ].to(dtype)
        root = None
        for group, inv_t in enumerate(inv_temperatures):
            if inv_t == 1.0:
                # One fused kernel; the normaliser follows from the largest probability, which is
                # at least 1 / V, so its log is exact to float precision.
                probs = torch.softmax(z, dim=1)
                lse[group, start:stop] = z_max.squeeze(1) - probs.amax(dim=1).log()
                sums[group].addmm_(weights, probs)
                if _HALF in inv_temperatures:
                    root, root_group = probs.sqrt(), group
                continue
            if inv_t == _HALF and root is not None:
                # exp((z - lse_1) / 2) = sqrt(softmax(z)): a square root instead of a second exponential.
                row_sum = root.sum(dim=1)
                lse[group, start:stop] = lse[root_group, start:stop] * _HALF + row_sum.log()
                sums[group].addmm_(weights / row_sum, root)
                continue
            scaled = torch.add(z_max * -inv_t, z, alpha=inv_t).exp_()  # exp((z - max) / tau)
            row_sum = scaled.sum(dim=1)
            lse[group, start:stop] = z_max.squeeze(1) * inv_t + row_sum.log()
            sums[group].addmm_(weights / row_sum, scaled)
    return lse, sums


def gather_log_probs(
    logits2d: torch.Tensor,
    row_set: RowSet,
    lse: torch.Tensor,
    indices: torch.Tensor,
    inv_temperatures: tuple[float, ...],
) -> torch.Tensor:
    """``log x^k`` for every pair: ``z[row, ids] / tau - lse[row]``, shape ``[G, N, k]`` (eq. 12)."""
    dtype = lse.dtype
    pair_rows = row_set.rows[row_set.pair_slot]
    ids = indices[:, row_set.pair_sequence]  # [G, N, k]
    z_at = logits2d[pair_rows.view(1, -1, 1), ids].to(dtype)
    inv = torch.tensor(inv_temperatures, dtype=dtype, device=lse.device).view(-1, 1, 1)
    return z_at * inv - lse[:, row_set.pair_slot].unsqueeze(2)


def token_ranked_log_probs(
    pair_logits: torch.Tensor, inv_temperatures: tuple[float, ...], k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ranking (Table 3's TR, as ULD): each row's own top-k ids and ``log x^k`` there.

    A softmax at any positive temperature keeps the order of the logits, so one ``topk`` of each
    row ranks it for every temperature. Unlike the sequence ranking, dimension ``l`` of two tokens
    of a sequence may be different vocabulary ids.

    Args:
        pair_logits: ``[N, V]`` logits of the paired rows (autograd flows through, e.g. the student).
        inv_temperatures: ``1 / tau`` for each of the ``G`` temperatures.
        k: truncation size.

    Returns:
        ``indices [N, k]`` (descending) and ``log_probs [G, N, k]`` in float32 or wider.
    """
    z = pair_logits.to(compute_dtype_for(pair_logits.dtype))
    indices = z.detach().topk(k, dim=1).indices
    z_at = z.gather(1, indices)
    log_probs = [z_at * inv_t - torch.logsumexp(z * inv_t, dim=1, keepdim=True) for inv_t in inv_temperatures]
    return indices, torch.stack(log_probs)


class StudentTopK(torch.autograd.Function):
    """Student ``log s^k`` at its own ranking for every temperature, plus an optional fused CE sum.

    forward(logits [B, T, V], row_set, inv_temperatures, k, ce_slot [C], ce_target [C], chunk_elements)
    returns ``(log_probs [G, N, k], ce_sum [], indices [G, B, k])``. ``ce_slot`` points into
    ``row_set.rows``; the CE uses temperature group 0, which must be ``1 / tau = 1`` when CE is asked.

    The backward uses ``d log x_l / d z_v = (delta_{v, id_l} - x_v) / tau``: a dense part, a per-row
    coefficient times ``softmax(z / tau)``, and a sparse part at the ``k`` ranked ids. It writes each
    block of rows straight into one gradient tensor of the logits' shape and dtype.
    """

    @staticmethod
    def forward(ctx, logits, row_set, inv_temperatures, k, ce_slot, ce_target, chunk_elements):
        batch, seq_len, vocab = logits.shape
        logits2d = logits.reshape(batch * seq_len, vocab)
        lse, sums = row_statistics(logits2d, row_set, batch, inv_temperatures, chunk_elements)
        indices = sums.topk(k, dim=2).indices
        log_probs = gather_log_probs(logits2d, row_set, lse, indices, inv_temperatures)
        ce_rows = row_set.rows[ce_slot]
        ce_sum = (lse[0, ce_slot] - logits2d[ce_rows, ce_target].to(lse.dtype)).sum()
        ctx.save_for_backward(logits, lse, indices, ce_slot, ce_target)
        ctx.row_set, ctx.inv_temperatures, ctx.chunk_elements = row_set, inv_temperatures, chunk_elements
        ctx.mark_non_differentiable(indices)
        return log_probs, ce_sum, indices

    @staticmethod
    def backward(ctx, grad_log_probs, grad_ce, _grad_indices):
        logits, lse, indices, ce_slot, ce_target = ctx.saved_tensors
        row_set, inv_temperatures = ctx.row_set, ctx.inv_temperatures
        batch, seq_len, vocab = logits.shape
        logits2d = logits.reshape(batch * seq_len, vocab)
        dtype = lse.dtype
        inv = torch.tensor(inv_temperatures, dtype=dtype, device=lse.device)
        groups = len(inv_temperatures)

        # Dense coefficient of softmax(z / tau) for every (temperature, row).
        dense = torch.zeros(groups, row_set.rows.numel(), dtype=dtype, device=lse.device)
        if grad_log_probs is not None:
            dense.index_add_(1, row_set.pair_slot, -inv.view(-1, 1) * grad_log_probs.sum(dim=2))
        if grad_ce is not None and ce_slot.numel():
            dense[0].index_add_(0, ce_slot, grad_ce.to(dtype).expand(ce_slot.numel()))

        grad2d = torch.empty(logits2d.shape, dtype=logits.dtype, device=logits.device)
        untouched = torch.ones(batch * seq_len, dtype=torch.bool, device=logits.device)
        untouched[row_set.rows] = False
        # index_fill_ over whole rows: a boolean-mask assignment of the same rows ran 5x slower on CPU.
        grad2d.index_fill_(0, untouched.nonzero().squeeze(1), 0)
        block = block_elements(ctx.chunk_elements, logits.device)
        for start, stop, first_row in row_blocks(row_set.rows, block // vocab):
            z = _read_block(logits2d, row_set.rows, start, stop, first_row, dtype)
            # Contiguous rows are written straight into the gradient (no block copy).
            direct = first_row is not None and grad2d.dtype == dtype
            target = grad2d[first_row : first_row + stop - start] if direct else None
            root = None
            for group, inv_t in enumerate(inv_temperatures):
                if inv_t == 1.0:
                    probs = torch.softmax(z, dim=1)
                    if _HALF in inv_temperatures:
                        root, root_group = probs.sqrt(), group
                elif inv_t == _HALF and root is not None:
                    # softmax(z / 2) = sqrt(softmax(z)) * exp(lse_1 / 2 - lse_half), as in the forward.
                    scale = (lse[root_group, start:stop] * _HALF - lse[group, start:stop]).exp_().unsqueeze(1)
                    probs = root.mul_(scale)
                else:
                    probs = torch.add(-lse[group, start:stop].unsqueeze(1), z, alpha=inv_t).exp_()
                coefficient = dense[group, start:stop].unsqueeze(1)
                if target is None:
                    target = probs.mul_(coefficient)
                elif group == 0 and direct:
                    torch.mul(probs, coefficient, out=target)
                else:
                    target.addcmul_(probs, coefficient)
            if first_row is None:
                grad2d.index_copy_(0, row_set.rows[start:stop], target.to(grad2d.dtype))
            elif not direct:
                grad2d[first_row : first_row + stop - start].copy_(target)

        # Sparse parts: +grad/tau at the ranked ids, and -grad_ce at the CE targets.
        if grad_log_probs is not None:
            pair_rows = row_set.rows[row_set.pair_slot].unsqueeze(1).expand(-1, indices.shape[2])
            for group in range(groups):
                ids = indices[group, row_set.pair_sequence]
                grad2d.index_put_((pair_rows, ids), (grad_log_probs[group] * inv[group]).to(grad2d.dtype), accumulate=True)
        if grad_ce is not None and ce_slot.numel():
            grad2d.index_put_(
                (row_set.rows[ce_slot], ce_target), (-grad_ce).to(grad2d.dtype).expand(ce_slot.numel()), accumulate=True
            )
        return grad2d.view(batch, seq_len, vocab), None, None, None, None, None, None
