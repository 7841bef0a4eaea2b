"""The boundary-token set of a tokenizer: ids whose text starts a new word, line or special segment.

ALM's outcome-chunk debiasing (tokenkit's ``space_mask``, mode ``space+tab+newline+special``) needs,
per tokenizer, the set ``S`` of ids that begin at a word boundary: the surface bytes start with a space,
a tab or a newline, or the token is special. The probability that the next token is in ``S`` is the
probability that the current chunk ends there.

The rule works on surface bytes (:func:`mlot_ds.pairing.surface.token_surface_bytes`), which already
decode SentencePiece's ``▁`` and byte-level BPE's ``Ġ`` / ``Ċ`` / ``ĉ`` to real bytes, so one rule
serves both families (tokenkit has to byteify SentencePiece vocabularies first, and its "tab" and
"newline" modes test swapped byte-level characters; here the bytes are tested directly).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

BOUNDARY_BYTES = (0x20, 0x09, 0x0A)  # space, tab, newline


def boundary_token_mask(surfaces: Sequence[bytes | None], vocab_rows: int) -> torch.Tensor:
    """``[vocab_rows]`` bool: ``True`` for ids whose surface starts with a space/tab/newline or is special.

    Args:
        surfaces: the tokenizer's surface bytes per id (``None`` = special, e.g. BOS/EOS/UNK).
        vocab_rows: rows of the model's output layer; ids ``>= len(surfaces)`` (padding rows the
            tokenizer never emits) are ``False``.

    Returns:
        A BoolTensor on the CPU.
    """
    if len(surfaces) > vocab_rows:
        raise ValueError(f"the tokenizer has {len(surfaces)} ids but the output layer only {vocab_rows} rows")
    mask = torch.zeros(vocab_rows, dtype=torch.bool)
    flags = [surface is None or (len(surface) > 0 and surface[0] in BOUNDARY_BYTES) for surface in surfaces]
    mask[: len(flags)] = torch.tensor(flags, dtype=torch.bool)
    return mask
