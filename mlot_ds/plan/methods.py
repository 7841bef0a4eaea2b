"""What each distillation method holds, per teacher and micro-batch, on top of the models.

Per method (``loss.kind``), with ``B`` sequences, ``P`` paired (or labelled) teacher rows per
sequence, the teacher's vocabulary ``V_t`` and the student's ``V_s``, read from each class's
``teacher()`` and ``student()`` in :mod:`mlot_ds.losses`:

==========  ==========================================================  ===========================
kind        kept from the teacher pass to the student's backward        student side, beyond CE
==========  ==========================================================  ===========================
mlot        ids ``[G, B, k]`` int64 + ``t^k`` ``[G, B, P, k]`` float32    one logits gradient
            (``ranking: token``: ids ``[G, B, P, k]``)
official    ``[1, B, P, k]`` float32 + ids                               one logits gradient
uld         the paired rows' logits ``[B, P, V_t]`` (teacher dtype)       sorted softmaxes ``[BP, V]``
mined       the paired rows at the mapped columns ``[B, P, min(V_s, V_t)]``   log-softmax ``[BP, V_s]``
alm         log-probabilities, boundary masses ``[B, P]`` float32         one logits gradient
kl          top-k ids int64 + log-probabilities ``[BP, k]``, tail         one logits gradient
vocagnolm   per-token CE ``[B, P]`` float32                              one logits gradient
cdm         top-k ids int64 + log-probabilities ``[B, P, K]``, entropy    one logits gradient
==========  ==========================================================  ===========================

``G`` is the number of distinct temperatures (MultiLevelOT default: ``tau = 1`` and ``2``). No
method in the registry keeps hidden states (there is no projector method); a kind not in this
table is planned with nothing kept and named in the plan's notes.

The teacher side's own transient: on the chunked path (``chunked_logits``, a verified
architecture) one block of about ``head_chunk_elements`` logits in the output layer's dtype plus
its float32 copy, and MultiLevelOT's per-sequence sums ``[G, B, V_t]`` float32; on the full-logits
path the ``[B, T, V_t]`` logits in the teacher's dtype while the method reads them.
"""

from __future__ import annotations

from dataclasses import dataclass

FLOAT32, INT64 = 4, 8
KNOWN = ("mlot", "official", "uld", "mined", "alm", "kl", "vocagnolm", "cdm")


@dataclass(frozen=True)
class MethodMemory:
    """Bytes of one teacher's method for one micro-batch.

    Attributes:
        kept: held from the teacher pass until the step ends (every micro-batch of the step).
        teacher_transient: the teacher side's working memory beyond the forward itself.
        student_transient: the student side's working memory beyond the logits and their gradients.
        writes_gradient: its backward writes a gradient the size of the student's logits.
        fuses_ce: it can return the student's CE from its own pass (:attr:`Method.fuses_ce`).
        known: the kind is in this module's table.
    """

    kept: int
    teacher_transient: int
    student_transient: int
    writes_gradient: bool
    fuses_ce: bool
    known: bool = True


def temperatures(kind: str, params) -> int:
    """Distinct temperatures the teacher side ranks or normalises at (MultiLevelOT's ``G``)."""
    if kind == "mlot":
        return len({params.tau_had, params.tau_sl, params.tau_sd})
    return 1


def fuses_ce(kind: str, params, method_class) -> bool:
    if kind == "kl":
        return float(params.temperature) == 1.0  # SameTokenizerKL fuses CE at temperature 1 only
    return bool(getattr(method_class, "fuses_ce", False))


def method_memory(kind: str, params, method_class, *, batch: int, pairs: int, teacher_vocab: int,
                  student_vocab: int, teacher_bytes: int, block_rows: int, chunked: bool,
                  teacher_seq_len: int) -> MethodMemory:
    """:class:`MethodMemory` of one teacher's ``loss`` (see the module table)."""
    rows = batch * pairs
    groups = temperatures(kind, params)
    block = _read_block(min(block_rows, rows), teacher_vocab, teacher_bytes) if chunked else (
        batch * teacher_seq_len * teacher_vocab * teacher_bytes)
    fused = fuses_ce(kind, params, method_class)
    if kind in ("mlot", "official"):
        k = params.k
        token_ranked = kind == "mlot" and params.ranking == "token"
        ids = groups * rows * k * INT64 if token_ranked else groups * batch * k * INT64
        kept = groups * rows * k * FLOAT32 + ids
        sums = groups * batch * teacher_vocab * FLOAT32 if not token_ranked else 0
        student = rows * student_vocab * FLOAT32 * groups if token_ranked else 0  # plain autograd on the rows
        return MethodMemory(kept, block + sums, student, True, fused)
    if kind == "uld":
        kept = rows * teacher_vocab * teacher_bytes
        # Both sides' softmax, sorted values and sort indices of every paired row.
        vocab = max(teacher_vocab, student_vocab)
        return MethodMemory(kept, block, rows * vocab * (3 * FLOAT32 + INT64), True, fused)
    if kind == "mined":
        kept = rows * min(student_vocab, teacher_vocab) * teacher_bytes
        return MethodMemory(kept, block, 2 * rows * student_vocab * FLOAT32, True, fused)
    if kind == "alm":
        return MethodMemory(rows * (2 * FLOAT32 + INT64), block, 0, True, fused)
    if kind == "kl":
        k = min(params.top_k, teacher_vocab)
        return MethodMemory(rows * (k * (INT64 + FLOAT32) + FLOAT32), block, 0, True, fused)
    if kind == "vocagnolm":
        return MethodMemory(rows * FLOAT32, block, 0, True, fused)
    if kind == "cdm":
        k = params.top_k
        return MethodMemory(rows * (k * (INT64 + FLOAT32) + FLOAT32 + 1), block, 0, True, fused)
    return MethodMemory(0, block, 0, True, fused, known=False)


def _read_block(rows: int, vocab: int, dtype_bytes: int) -> int:
    """One block of the chunked output layer (``rows`` from :func:`mlot_ds.losses.head.head_chunk_rows`):
    ``rows x V`` logits in the layer's dtype, and their float32 copy when that dtype is narrower (the
    statistics are computed in float32)."""
    elements = rows * vocab
    return elements * dtype_bytes + (elements * FLOAT32 if dtype_bytes != FLOAT32 else 0)


def cached_read(kind: str, params, *, batch: int, pairs: int, teacher_vocab: int, student_vocab: int) -> int:
    """Bytes a cached teacher's read of one micro-batch produces (the same ``reduced`` as live; its
    per-row arrays are memory-mapped, so the file itself is page cache, not counted here)."""
    groups = temperatures(kind, params)
    rows = batch * pairs
    if kind == "mlot":
        return groups * rows * params.k * FLOAT32 + groups * batch * params.k * INT64
    if kind == "kl":
        return rows * (params.top_k * (INT64 + FLOAT32) + FLOAT32)
    if kind == "uld":
        return rows * params.cache_head * FLOAT32 * 2
    if kind == "mined":
        return rows * min(student_vocab, teacher_vocab) * FLOAT32
    if kind in ("alm", "vocagnolm"):
        return rows * 3 * FLOAT32
    if kind == "cdm":
        return rows * (params.top_k * (INT64 + FLOAT32) + FLOAT32)
    return rows * FLOAT32


__all__ = ["KNOWN", "MethodMemory", "cached_read", "fuses_ce", "method_memory", "temperatures"]
