"""Byte spans of response tokens: where in ``response.encode("utf-8")`` each token's text lies.

The spans of one response always form a *partition* of its bytes: token ``i`` covers
``[start_i, end_i)``, the first starts at 0, the last ends at the byte length, and a token that
holds part of a character (byte-level BPE splits ``世`` into two tokens) is cut at the byte where
its bytes end when that is known, else it shares the character's span with its neighbours.

Three ways, tried in order:

1. ``surface``: concatenate the tokens' surface bytes (:mod:`mlot_ds.pairing.surface`). When they
   spell the response exactly (allowing the one leading space of a SentencePiece dummy prefix),
   the spans are exact to the byte. This holds for byte-level BPE (GPT-2, Llama 3, Qwen),
   SentencePiece with byte fallback (Llama 2, Mistral, Gemma) and Metaspace Unigram models.
2. ``tokenizer``: the character offsets of a fast tokenizer (``return_offsets_mapping``), for
   tokenizers that normalise text (lower-casing, NFKC) so that tokens no longer spell it. The
   caller may pass the offsets it already has (those of the response cut out of the prompt +
   response encoding, :mod:`mlot_ds.data.tokenize`); else the response is encoded alone and used
   when that gives the same ids. Text that the offsets leave out between two tokens (a space the
   pre-tokenizer dropped, an accent a normaliser removed) is split by kind: a non-whitespace
   start (such as the combining accent of ``cafe\u0301``) goes to the token before, whose
   character it modifies; from its first whitespace character on it goes to the following token,
   as ``Ġ``/``▁`` tokens carry their leading space.
3. ``decoding``: for slow tokenizers without offsets, incremental decoding: the text decoded from
   the tokens so far, compared with the response, gives each clean cut. Where decoding does not
   reproduce the response, the remaining tokens form one span. A few prompt tokens may be given
   as context, so that a SentencePiece decoder does not strip the leading space of the response's
   first token (it does so only at the start of a text).
"""

from __future__ import annotations

from typing import Sequence

from transformers import PreTrainedTokenizerBase

from mlot_ds.pairing.surface import token_surface_bytes_cached

REPLACEMENT_CHARACTER = "\ufffd"
DECODE_CONTEXT_TOKENS = 4  # tokens decoded before a cut so SentencePiece keeps a word's leading space


def _from_surfaces(surfaces: Sequence[bytes | None], token_ids: Sequence[int], target: bytes) -> list[tuple[int, int]] | None:
    parts = [surfaces[i] if 0 <= i < len(surfaces) else None for i in token_ids]
    if any(part is None for part in parts):
        return None
    joined = b"".join(parts)
    skip = 0
    if joined != target:
        if parts and parts[0].startswith(b" ") and joined[1:] == target:
            skip = 1  # SentencePiece dummy prefix: a space the response does not have
        else:
            return None
    spans, position = [], -skip
    for part in parts:
        start = max(position, 0)
        position += len(part)
        spans.append((start, max(position, 0)))
    return spans


def _char_to_byte(text: str) -> list[int]:
    positions = [0]
    for character in text:
        positions.append(positions[-1] + len(character.encode("utf-8")))
    return positions


def _cut_in_gap(text: str, end: int, next_start: int) -> int:
    """Where to cut the text ``text[end:next_start]`` that no token's offsets cover.

    Its non-whitespace start (an accent a normaliser dropped, any other left-out character) goes
    to the token before; from the first whitespace character on, the gap goes to the following
    token (the space a ``Ġ``/``▁`` token stands for, and whatever follows that space).
    """
    cut = end
    while cut < next_start and not text[cut].isspace():
        cut += 1
    return cut


def _partition_from_char_offsets(offsets: Sequence[tuple[int, int]], text: str) -> list[tuple[int, int]]:
    """Turn character offsets (which may overlap inside a character or skip text) into a partition.

    Text before the first token goes to the first token, text after the last to the last one, and
    a gap between two tokens is split by :func:`_cut_in_gap`.
    """
    byte_at = _char_to_byte(text)
    spans: list[tuple[int, int]] = []
    run_start, run_length = 0, 0
    for index, (_, end) in enumerate(offsets):
        run_length += 1
        last = index == len(offsets) - 1
        if not last and end > offsets[index + 1][0]:
            continue  # the next token starts inside this one's character: no cut here
        if last:
            cut = len(text)
        else:
            end = min(max(end, run_start), len(text))
            cut = _cut_in_gap(text, end, min(max(offsets[index + 1][0], end), len(text)))
        spans.extend([(byte_at[run_start], byte_at[cut])] * run_length)
        run_start, run_length = cut, 0
    return spans


def _from_tokenizer_offsets(
    tokenizer, response: str, token_ids: Sequence[int], char_offsets: Sequence[tuple[int, int]] | None = None
) -> list[tuple[int, int]] | None:
    if char_offsets is not None:
        if len(char_offsets) != len(token_ids):
            raise ValueError(f"{len(char_offsets)} character offsets for {len(token_ids)} tokens")
        return _partition_from_char_offsets([tuple(o) for o in char_offsets], response)
    if not getattr(tokenizer, "is_fast", False):
        return None
    encoding = tokenizer(response, add_special_tokens=False, return_offsets_mapping=True)
    offsets = encoding.get("offset_mapping")
    if offsets is None or list(encoding["input_ids"]) != list(token_ids):
        return None
    return _partition_from_char_offsets([tuple(o) for o in offsets], response)


def _clean_context(decode, context: list[int]) -> list[int]:
    """The shortest tail of ``context`` that decodes to some text without a replacement character.

    A tail that starts inside a character (the last bytes of a byte-fallback emoji) decodes to
    replacement characters, and so would the response bytes decoded after it.
    """
    for length in range(1, len(context) + 1):
        text = decode(context[-length:])
        if text and REPLACEMENT_CHARACTER not in text:
            return context[-length:]
    return []


def spans_by_decoding(
    tokenizer: PreTrainedTokenizerBase, response: str, token_ids: Sequence[int], context_ids: Sequence[int] = ()
) -> list[tuple[int, int]]:
    """Spans from incremental decoding (method 3); works for any tokenizer that can decode.

    After ``k`` tokens, the text they add is ``decode(ids[w:k])`` minus ``decode(ids[w:a])``, with
    ``a`` the last clean cut and ``w`` a few tokens before it (so a SentencePiece decoder strips
    the same leading space from both). A cut is clean when that text continues the response
    exactly and does not end in a replacement character (an incomplete UTF-8 sequence).

    ``context_ids``: tokens read before the response (the end of its prompt, which must end at a
    clean cut); the last few are decoded with the first response tokens, so that a leading space
    of the response is not stripped as if the response started the text.
    """

    def decode(ids: Sequence[int]) -> str:
        return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    context = _clean_context(decode, list(context_ids)[-DECODE_CONTEXT_TOKENS:])
    skip = len(context)
    token_ids = context + list(token_ids)
    cuts: list[tuple[int, int]] = []  # (token count, character position) of each clean cut
    anchor_tokens, anchor_chars = skip, 0
    for count in range(skip + 1, len(token_ids) + 1):
        window = max(0, anchor_tokens - DECODE_CONTEXT_TOKENS)
        before = decode(token_ids[window:anchor_tokens]) if anchor_tokens > window else ""
        after = decode(token_ids[window:count])
        if not after.startswith(before):
            continue
        added = after[len(before) :]
        if not added or added.endswith(REPLACEMENT_CHARACTER) or not response.startswith(added, anchor_chars):
            continue
        anchor_tokens, anchor_chars = count, anchor_chars + len(added)
        cuts.append((anchor_tokens, anchor_chars))
    if not cuts or cuts[-1][0] != len(token_ids):
        cuts.append((len(token_ids), len(response)))
    else:
        cuts[-1] = (len(token_ids), len(response))
    byte_at = _char_to_byte(response)
    spans: list[tuple[int, int]] = []
    previous_tokens, previous_chars = skip, 0
    for tokens, chars in cuts:
        spans.extend([(byte_at[previous_chars], byte_at[chars])] * (tokens - previous_tokens))
        previous_tokens, previous_chars = tokens, chars
    return spans


def response_spans(
    tokenizer: PreTrainedTokenizerBase,
    response: str,
    token_ids: Sequence[int],
    *,
    char_offsets: Sequence[tuple[int, int]] | None = None,
    context_ids: Sequence[int] = (),
) -> tuple[list[tuple[int, int]], str]:
    """Byte spans of ``token_ids`` (the response's tokens, no special tokens) and the method used.

    Args:
        char_offsets: the tokens' character offsets in ``response``, when the caller has them
            (fast tokenizers); else they are looked up by encoding the response alone.
        context_ids: the prompt tokens read before the response, for incremental decoding.

    Returns:
        ``(spans, method)`` with ``method`` in ``{"surface", "tokenizer", "decoding"}``.
    """
    if not token_ids:
        return [], "surface"
    spans = _from_surfaces(token_surface_bytes_cached(tokenizer), token_ids, response.encode("utf-8"))
    if spans is not None:
        return spans, "surface"
    spans = _from_tokenizer_offsets(tokenizer, response, token_ids, char_offsets)
    if spans is not None:
        return spans, "tokenizer"
    return spans_by_decoding(tokenizer, response, token_ids, context_ids), "decoding"
