"""The text each token id stands for, as UTF-8 bytes ("surface bytes").

Token strings are spelled differently by each tokenizer family: GPT-2-style byte-level BPE writes
the byte ``0x20`` as ``Ġ``, SentencePiece writes a space as ``▁`` and a byte it cannot spell as
``<0xE4>``, WordPiece marks a word continuation with ``##``. Cross-tokenizer code has to compare
tokens by what they mean, so every rule here first maps a token to the bytes it decodes to.

The bytes come from the tokenizer's own decoder description (``tokenizer.json``) or, for slow
SentencePiece tokenizers, from the SentencePiece model. A token whose surface is not text (BOS,
EOS, UNK, other special tokens) maps to ``None``.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # transformers is heavy; only the type is needed here
    from transformers import PreTrainedTokenizerBase

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_WORDPIECE_CONTINUATION = "##"


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte, inverted (character -> byte)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    characters = list(printable)
    shift = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            characters.append(256 + shift)
            shift += 1
    return {chr(c): b for b, c in zip(printable, characters)}


_BYTE_LEVEL_DECODER = _byte_level_alphabet()


def _decoder_steps(tokenizer: PreTrainedTokenizerBase) -> list[dict]:
    """The flat list of decoder steps of a fast tokenizer (empty for slow ones)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return []
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    steps, pending = [], [decoder]
    while pending:
        step = pending.pop(0)
        if step.get("type") == "Sequence":
            pending = list(step.get("decoders", [])) + pending
        elif step:
            steps.append(step)
    return steps


def _piece_rewriter(steps: list[dict], tokenizer: PreTrainedTokenizerBase):
    """A function token string -> surface bytes following the decoder steps."""
    kinds = {step["type"] for step in steps}
    if "ByteLevel" in kinds or (not steps and hasattr(tokenizer, "byte_decoder")):

        def byte_level(piece: str) -> bytes:
            if all(ch in _BYTE_LEVEL_DECODER for ch in piece):
                return bytes(_BYTE_LEVEL_DECODER[ch] for ch in piece)
            return piece.encode("utf-8")

        return byte_level
    replacements = []
    for step in steps:
        if step["type"] == "Replace":
            pattern = step.get("pattern", {})
            if "String" in pattern:
                replacements.append((pattern["String"], step.get("content", "")))
        elif step["type"] == "Metaspace":
            replacements.append((step.get("replacement", "▁"), " "))
    if not steps:  # slow tokenizer without a SentencePiece model: assume the common "▁" marker
        replacements.append(("▁", " "))
    byte_fallback = "ByteFallback" in kinds or not steps
    wordpiece_prefix = next((s.get("prefix", "##") for s in steps if s["type"] == "WordPiece"), None)

    def rewrite(piece: str) -> bytes:
        if byte_fallback:
            match = _BYTE_PIECE.fullmatch(piece)
            if match:
                return bytes([int(match.group(1), 16)])
        if wordpiece_prefix is not None and piece.startswith(wordpiece_prefix):
            piece = piece[len(wordpiece_prefix) :]
        for old, new in replacements:
            piece = piece.replace(old, new)
        return piece.encode("utf-8")

    return rewrite


def token_surface_bytes(tokenizer: PreTrainedTokenizerBase) -> list[bytes | None]:
    """Surface bytes of every id in ``range(len(tokenizer))``; ``None`` for non-text tokens.

    Args:
        tokenizer: any Hugging Face tokenizer (fast or slow).

    Returns:
        A list indexed by token id. Special tokens and the unknown token map to ``None``; a
        non-special added token maps to its content.
    """
    size = len(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(size)))
    special_ids = set(tokenizer.all_special_ids)
    if tokenizer.unk_token_id is not None:
        special_ids.add(tokenizer.unk_token_id)
    added = {i: tok for i, tok in tokenizer.added_tokens_decoder.items()}
    sp_model = getattr(tokenizer, "sp_model", None)
    rewrite = _piece_rewriter(_decoder_steps(tokenizer), tokenizer)
    surfaces: list[bytes | None] = []
    for token_id, piece in enumerate(pieces):
        if token_id in special_ids or piece is None:
            surfaces.append(None)
        elif token_id in added:
            surfaces.append(None if added[token_id].special else added[token_id].content.encode("utf-8"))
        elif sp_model is not None and token_id < sp_model.get_piece_size():
            if sp_model.IsByte(token_id):
                surfaces.append(bytes([int(_BYTE_PIECE.fullmatch(piece).group(1), 16)]))
            elif sp_model.IsControl(token_id) or sp_model.IsUnknown(token_id):
                surfaces.append(None)
            else:
                surfaces.append(piece.replace("▁", " ").encode("utf-8"))
        else:
            surfaces.append(rewrite(piece))
    return surfaces


def token_display_strings(tokenizer: PreTrainedTokenizerBase, token_ids: list[int]) -> list[str]:
    """Readable per-token strings for tools: surface text, or the token string for specials."""
    surfaces = token_surface_bytes_cached(tokenizer)
    shown = []
    for token_id in token_ids:
        surface = surfaces[token_id] if token_id < len(surfaces) else None
        if surface is None:
            shown.append(tokenizer.convert_ids_to_tokens(token_id))
        else:
            shown.append(surface.decode("utf-8", errors="backslashreplace"))
    return shown


_SURFACE_CACHE: dict[int, tuple[PreTrainedTokenizerBase, list[bytes | None]]] = {}


def token_surface_bytes_cached(tokenizer: PreTrainedTokenizerBase) -> list[bytes | None]:
    """:func:`token_surface_bytes`, computed once per tokenizer object (and its current size)."""
    key = id(tokenizer)
    cached = _SURFACE_CACHE.get(key)
    if cached is None or cached[0] is not tokenizer or len(cached[1]) != len(tokenizer):
        cached = (tokenizer, token_surface_bytes(tokenizer))
        _SURFACE_CACHE[key] = cached
    return cached[1]


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A sha256 hex digest of everything that decides how ``tokenizer`` encodes and renders text.

    Covers the tokenizer class, its model (``tokenizer.json`` for fast tokenizers, the
    SentencePiece model for slow ones, else the vocabulary), added and special tokens, and the
    chat template. Used as the cache key of tokenized datasets and vocabulary maps.
    """

    digest = hashlib.sha256()
    digest.update(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    sp_model = getattr(tokenizer, "sp_model", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    elif sp_model is not None:
        digest.update(sp_model.serialized_model_proto())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    added = {i: [t.content, t.special] for i, t in tokenizer.added_tokens_decoder.items()}
    extra = {
        "added": sorted(added.items()),
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "chat_template": getattr(tokenizer, "chat_template", None),
        "leading_special_ids": leading_special_ids(tokenizer),
        "size": len(tokenizer),
    }
    digest.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def leading_special_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The ids the tokenizer puts before a text when asked to add special tokens (its BOS, if any).

    Probed by encoding a short text with and without special tokens; trailing additions (an EOS
    or SEP some tokenizers append) are not included.
    """
    probe = "a"
    plain = tokenizer.encode(probe, add_special_tokens=False)
    full = tokenizer.encode(probe, add_special_tokens=True)
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start])
    return []
