"""Teacher-side statistics from the final hidden states and the output layer, a chunk of rows at a time.

A causal LM's logits are ``z = h W^T + b``: final hidden states ``h [B, T, H]``, output layer
``W [V, H]`` and optional bias ``b [V]``. The teacher side of every loss reads ``z`` at a few rows
only (the paired ones, plus the gold-labelled ones for dynamic weights), and MultiLevelOT reads
only ``k`` columns per sequence once the ranking is known. So instead of the ``[B, T, V]`` logits:

1. walk the needed rows in chunks of about ``head_chunk_elements`` logits; each chunk's ``[r, V]``
   logits give every row's log-normaliser ``logsumexp(z / tau)`` and add the rows' probabilities
   into the per-sequence sums of eq. (10) (:func:`head_row_statistics`), and are then freed;
2. take each sequence's top-k ids of the sums (eq. 11);
3. read ``t^k(i) = exp(z_i[ids] / tau - lse_i)`` (eq. 12) from ``h_i . W[ids] + b[ids]``: a
   ``[P, H] x [H, k]`` product per sequence, never a full row.

Extra memory: one chunk of logits (float32), the sums ``[G, B, V]`` and ``O(B P k)`` values. The
products are computed in the weight's dtype, as the model's own output layer computes them, so
the results equal the full-logits computations on ``h W^T + b`` up to float rounding. No autograd
graph is built (teachers are frozen). MultiLevelOT's own use of these pieces is
:func:`mlot_ds.losses.mlot.teacher_summary_from_hidden`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mlot_ds.losses.ce import labelled_rows
from mlot_ds.losses.ranking import (
    RowSet,
    build_row_set,
    compute_dtype_for,
    row_statistics,
)

# CPU: 16M logits (64 MB in float32, 128 rows of a 128k vocabulary) per chunk. Each chunk reads the
# whole output layer, so fewer rows make the product memory-bound: with 32 rows it ran 2.6x slower
# per row at hidden 64 (1.8x at hidden 512) on this machine. Accelerators: 64M logits.
_CPU_HEAD_CHUNK_ELEMENTS = 1 << 24
_ACCELERATOR_HEAD_CHUNK_ELEMENTS = 1 << 26


def head_chunk_rows(vocab: int, head_chunk_elements: int | None, device: torch.device) -> int:
    """Rows per chunk: ``head_chunk_elements // vocab`` (at least 1), with a per-device default."""
    if head_chunk_elements is None:
        head_chunk_elements = _CPU_HEAD_CHUNK_ELEMENTS if device.type == "cpu" else _ACCELERATOR_HEAD_CHUNK_ELEMENTS
    return max(1, head_chunk_elements // max(vocab, 1))


def check_head(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if hidden.dim() != 3 or weight.dim() != 2 or hidden.shape[2] != weight.shape[1]:
        raise ValueError(f"hidden [B, T, H] and weight [V, H] expected, got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")


def rows_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, row_index: torch.Tensor,
                columns: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of the rows ``row_index [B, P]`` of each sequence, at ``columns [C]`` (all by default).

    Returns ``[B, P, C]`` (or ``[B, P, V]``) in the weight's dtype: ``h[b, row_index[b, p]] . W[c] + b[c]``.
    """
    check_head(hidden, weight, bias)
    picked = hidden.gather(1, row_index.unsqueeze(2).expand(-1, -1, hidden.shape[2]))
    if columns is not None:
        weight = weight.index_select(0, columns)
        bias = bias.index_select(0, columns) if bias is not None else None
    with torch.no_grad():
        return F.linear(picked, weight, bias)


def head_row_statistics(
    hidden2d: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    row_set: RowSet,
    batch: int,
    inv_temperatures: tuple[float, ...],
    *,
    head_chunk_elements: int | None = None,
    chunk_elements: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`~mlot_ds.losses.ranking.row_statistics` of ``hidden2d W^T + b`` without the full logits.

    Args:
        hidden2d: ``[B * T, H]`` final hidden states.
        weight, bias: the output layer, ``[V, H]`` and ``[V]`` or ``None``.
        row_set, batch, inv_temperatures, chunk_elements: as ``row_statistics``.
        head_chunk_elements: logits per chunk (``None``: a per-device default, :func:`head_chunk_rows`).

    Returns:
        ``lse [G, R]`` and ``sums [G, B, V]``, as ``row_statistics``.
    """
    vocab, count = weight.shape[0], row_set.rows.numel()
    dtype = compute_dtype_for(weight.dtype)
    lse = torch.empty(len(inv_temperatures), count, dtype=dtype, device=hidden2d.device)
    sums = torch.zeros(len(inv_temperatures), batch, vocab, dtype=dtype, device=hidden2d.device)
    step = head_chunk_rows(vocab, head_chunk_elements, hidden2d.device)
    with torch.no_grad():
        for start in range(0, count, step):
            stop = min(start + step, count)
            chunk_logits = F.linear(hidden2d.index_select(0, row_set.rows[start:stop]), weight, bias)
            # The chunk is its own little logit matrix: rows 0..r-1, read as views block by block.
            local = RowSet(torch.arange(stop - start, device=hidden2d.device), row_set.sequence[start:stop],
                           row_set.pair_weight[start:stop], row_set.pair_slot[:0], row_set.pair_sequence[:0])
            chunk_lse, chunk_sums = row_statistics(chunk_logits, local, batch, inv_temperatures, chunk_elements)
            lse[:, start:stop] = chunk_lse
            sums += chunk_sums
            del chunk_logits, chunk_sums
    return lse, sums


def gold_ce_from_rows(hidden2d, weight, bias, lse_t1, ce_slot, ce_rows, ce_targets, batch, seq_len) -> dict[str, torch.Tensor]:
    """Per-sequence CE sums from temperature-1 log-normalisers and the target logits."""
    picked = hidden2d.index_select(0, ce_rows).unsqueeze(1)
    target_logits = torch.bmm(picked, weight.index_select(0, ce_targets).unsqueeze(2)).reshape(-1)
    if bias is not None:
        target_logits = target_logits + bias.index_select(0, ce_targets)
    per_row = lse_t1[ce_slot] - target_logits.to(lse_t1.dtype)
    sequence = torch.div(ce_rows, seq_len, rounding_mode="floor")
    ce = torch.zeros(batch, dtype=lse_t1.dtype, device=hidden2d.device).index_add_(0, sequence, per_row)
    tokens = torch.zeros(batch, dtype=torch.float32, device=hidden2d.device).index_add_(
        0, sequence, torch.ones_like(sequence, dtype=torch.float32))
    return {"ce": ce.float(), "tokens": tokens}


def ce_per_sequence_from_hidden(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                labels: torch.Tensor, *, head_chunk_elements: int | None = None) -> dict[str, torch.Tensor]:
    """:func:`~mlot_ds.losses.ce.ce_per_sequence` of ``h W^T + b``, chunked: ``{"ce": [B], "tokens": [B]}``."""
    check_head(hidden, weight, bias)
    batch, seq_len, _ = hidden.shape
    if labels.shape != (batch, seq_len):
        raise ValueError(f"labels {tuple(labels.shape)} must be [B, T] = {(batch, seq_len)}")
    rows, targets = labelled_rows(labels)
    hidden2d = hidden.reshape(batch * seq_len, -1)
    empty = torch.zeros(batch, 0, dtype=torch.long, device=hidden.device)
    row_set = build_row_set(empty, empty.bool(), seq_len, rows)
    with torch.no_grad():
        lse, _ = head_row_statistics(hidden2d, weight, bias, row_set, batch, (1.0,), head_chunk_elements=head_chunk_elements)
        return gold_ce_from_rows(hidden2d, weight, bias, lse[0], torch.arange(rows.numel(), device=rows.device), rows, targets,
                        batch, seq_len)
