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
the results equal :func:`~mlot_ds.losses.mlot.teacher_summary` on ``h W^T + b`` up to float
rounding. No autograd graph is built (teachers are frozen).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mlot_ds.losses import official
from mlot_ds.losses.ce import labelled_rows
from mlot_ds.losses.mlot import TeacherSummary, token_ranked_summary
from mlot_ds.losses.presets import resolve_preset
from mlot_ds.losses.ranking import RowSet, build_row_set, compute_dtype_for, row_statistics
from mlot_ds.pairing import Pairing

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


def _check_head(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if hidden.dim() != 3 or weight.dim() != 2 or hidden.shape[2] != weight.shape[1]:
        raise ValueError(f"hidden [B, T, H] and weight [V, H] expected, got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")


def rows_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, row_index: torch.Tensor,
                columns: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of the rows ``row_index [B, P]`` of each sequence, at ``columns [C]`` (all by default).

    Returns ``[B, P, C]`` (or ``[B, P, V]``) in the weight's dtype: ``h[b, row_index[b, p]] . W[c] + b[c]``.
    """
    _check_head(hidden, weight, bias)
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


def _gold_ce(hidden2d, weight, bias, lse_t1, ce_slot, ce_rows, ce_targets, batch, seq_len) -> dict[str, torch.Tensor]:
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
    _check_head(hidden, weight, bias)
    batch, seq_len, _ = hidden.shape
    if labels.shape != (batch, seq_len):
        raise ValueError(f"labels {tuple(labels.shape)} must be [B, T] = {(batch, seq_len)}")
    rows, targets = labelled_rows(labels)
    hidden2d = hidden.reshape(batch * seq_len, -1)
    empty = torch.zeros(batch, 0, dtype=torch.long, device=hidden.device)
    row_set = build_row_set(empty, empty.bool(), seq_len, rows)
    with torch.no_grad():
        lse, _ = head_row_statistics(hidden2d, weight, bias, row_set, batch, (1.0,), head_chunk_elements=head_chunk_elements)
        return _gold_ce(hidden2d, weight, bias, lse[0], torch.arange(rows.numel(), device=rows.device), rows, targets,
                        batch, seq_len)


def teacher_summary_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    pairing,
    *,
    preset="default",
    ce_labels: torch.Tensor | None = None,
    head_chunk_elements: int | None = None,
    **overrides,
) -> tuple[TeacherSummary, dict[str, torch.Tensor] | None]:
    """:func:`~mlot_ds.losses.mlot.teacher_summary` of the logits ``h W^T + b``, never materialised.

    Args:
        hidden: ``[B, Tt, H]`` final hidden states; weight ``[m, H]``, bias ``[m]`` or ``None``.
        pairing: as ``teacher_summary`` (``official``: :func:`~mlot_ds.losses.official.official_spans`;
            that preset needs every span row at every column, so it computes the ``[B, L, m]``
            span logits, still never the ``[B, Tt, m]`` ones).
        ce_labels: ``[B, Tt]`` HF unshifted labels: also return the teacher's gold-response CE per
            sequence, ``{"ce": [B], "tokens": [B]}`` (from the same pass for the non-official presets).
        head_chunk_elements: logits per chunk (see :func:`head_chunk_rows`).

    Returns:
        ``(summary, gold)``; ``gold`` is ``None`` without ``ce_labels``.
    """
    cfg = resolve_preset(preset, overrides)
    _check_head(hidden, weight, bias)
    batch, seq_len, _ = hidden.shape
    if cfg.k > weight.shape[0]:
        raise ValueError(f"k={cfg.k} exceeds the vocabulary size {weight.shape[0]} of the teacher's output layer")
    gold = None
    with torch.no_grad():
        if cfg.is_official:
            if not isinstance(pairing, official.OfficialSpans):
                raise ValueError("preset 'official' needs official_spans(student_labels, teacher_labels) as its pairing")
            span_logits = rows_logits(hidden, weight, bias, pairing.teacher_rows)
            local = torch.arange(span_logits.shape[1], device=hidden.device).unsqueeze(0).expand(batch, -1)
            summary = TeacherSummary((cfg.tau_had,), *official.teacher_side(span_logits, pairing._replace(teacher_rows=local), cfg))
            if ce_labels is not None:
                gold = ce_per_sequence_from_hidden(hidden, weight, bias, ce_labels, head_chunk_elements=head_chunk_elements)
            return summary, gold
        if not isinstance(pairing, Pairing) or pairing.teacher_index.shape != pairing.mask.shape:
            raise ValueError("pairing must be a mlot_ds.pairing.Pairing with [B, P] teacher_index and mask")
        real = pairing.teacher_index[pairing.mask]
        if real.numel() and (int(real.min()) < 0 or int(real.max()) >= seq_len):
            raise ValueError(f"pairing.teacher_index out of range [0, {seq_len}): {int(real.min())}..{int(real.max())}")
        temperatures = cfg.temperatures()
        groups = temperatures if ce_labels is None or 1.0 in temperatures else temperatures + (1.0,)
        ce_rows = ce_targets = None
        if ce_labels is not None:
            if ce_labels.shape != (batch, seq_len):
                raise ValueError(f"ce_labels {tuple(ce_labels.shape)} must be [B, T] = {(batch, seq_len)}")
            ce_rows, ce_targets = labelled_rows(ce_labels)
        hidden2d = hidden.reshape(batch * seq_len, -1)
        if cfg.ranking == "token":
            rows_per_block = head_chunk_rows(weight.shape[0], head_chunk_elements, hidden.device)
            summary = token_ranked_summary(lambda rows: F.linear(hidden2d.index_select(0, rows), weight, bias), pairing,
                                           seq_len, temperatures, cfg.k, rows_per_block, compute_dtype_for(weight.dtype))
            if ce_labels is not None:
                gold = ce_per_sequence_from_hidden(hidden, weight, bias, ce_labels, head_chunk_elements=head_chunk_elements)
            return summary, gold
        row_set = build_row_set(pairing.teacher_index, pairing.mask, seq_len, ce_rows)
        inv = tuple(1.0 / t for t in groups)
        lse, sums = head_row_statistics(hidden2d, weight, bias, row_set, batch, inv,
                                        head_chunk_elements=head_chunk_elements, chunk_elements=cfg.chunk_elements)
        indices = sums[: len(temperatures)].topk(cfg.k, dim=2).indices  # [G, B, k]
        del sums
        # z at the ranked ids of each pair's own sequence: [G, B, P, H] x [G, B, H, k].
        pair_hidden = hidden.gather(1, pairing.teacher_index.unsqueeze(2).expand(-1, -1, hidden.shape[2]))
        ranked_weight = weight[indices]  # [G, B, k, H]
        z_at = torch.matmul(pair_hidden.unsqueeze(0), ranked_weight.transpose(2, 3))
        if bias is not None:
            z_at = z_at + bias[indices].unsqueeze(2)
        slot = torch.zeros(pairing.mask.shape, dtype=torch.long, device=hidden.device)
        slot[pairing.mask] = row_set.pair_slot
        inv_t = torch.tensor(inv[: len(temperatures)], dtype=lse.dtype, device=hidden.device).view(-1, 1, 1, 1)
        values = (z_at.to(lse.dtype) * inv_t - lse[: len(temperatures), slot].unsqueeze(3)).exp_()
        values = values * pairing.mask.unsqueeze(0).unsqueeze(3)
        if ce_labels is not None:
            ce_slot = torch.searchsorted(row_set.rows, ce_rows)
            gold = _gold_ce(hidden2d, weight, bias, lse[groups.index(1.0)], ce_slot, ce_rows, ce_targets, batch, seq_len)
    return TeacherSummary(temperatures, indices, values), gold
