"""Prompt and response tokenized as a model reads them: one text, cut where the response starts.

Training (:mod:`mlot_ds.data.encode`), bits per byte (:func:`mlot_ds.eval.bits_per_byte`), the
zoo's task tuning (:func:`mlot_ds.zoo.training.tuning_batches`) and ``tools/inspect_pairing.py``
all tokenize a prompt text and its response here, so that every model reads a record the same
way everywhere.

Why not tokenize the response on its own: a SentencePiece tokenizer (Llama 2, Mistral, T5,
Metaspace pipelines of ``tokenizers``) puts a dummy-prefix space ``▁`` before the start of every
text it encodes. Encoded alone, the response ``Ms. Dawson`` becomes ``▁M s .``, and the model
reads ``Summary:\\n Ms. Dawson`` where the text is ``Summary:\\nMs. Dawson``: a shift of the
input distribution on every record for a pretrained SentencePiece model.

The rule (:func:`encode_prompt_responses`):

1. ``joint``: tokenize ``prompt_text + response`` once (fast tokenizers: with offsets) and
   ``prompt_text`` alone. If the joint ids start with the prompt's ids and the remaining ids
   spell exactly the response, those are the response ids: exactly what the model reads. "Spell
   exactly" is checked by the tokens' surface bytes (byte-level BPE, SentencePiece with byte
   fallback, Metaspace models), else by the offsets of a fast tokenizer (normalising ones: the
   remaining tokens lie inside the response, the prompt's inside the prompt), else by decoding
   (slow tokenizers: the joint text decodes to the prompt's text followed by the response, or by
   what the tokenizer makes of the response alone when it rewrites text, as GPT-SW3 does).
2. ``alone`` (the fallback, counted in the ``tokenization`` field): a token straddles the
   boundary (a merge across the end of the prompt), so no cut of the joint encoding is the
   response. The response is then tokenized alone with exactly the dummy prefix removed: the
   tokenizer's own pipeline with its prefix step switched off (``Metaspace`` pre-tokenizers
   get ``prepend_scheme="never"``, a ``Prepend`` normaliser is dropped, a byte-level
   ``add_prefix_space`` is turned off; a slow SentencePiece model gets
   ``add_dummy_prefix=False``). A tokenizer without such a step (GPT-2, Qwen) encodes the
   response as it is.

Either way the prompt ids are the prompt's own ids, after ``leading_ids`` (the BOS of a plain
template), and the byte spans of the response tokens (:mod:`mlot_ds.data.offsets`) are an exact
partition of the response's UTF-8 bytes. Nothing is truncated here: callers cut prompts from the
left and never cut responses.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Sequence

import sentencepiece
from sentencepiece import sentencepiece_model_pb2
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerBase

from mlot_ds.data.offsets import response_spans
from mlot_ds.pairing.surface import token_surface_bytes_cached

TOKENIZATION_METHODS = ("joint", "alone")


@dataclass(frozen=True)
class PromptResponse:
    """One record's tokens as its model reads them (see the module docstring).

    Attributes:
        prompt_ids: ``leading_ids`` then the prompt text's tokens (untruncated).
        response_ids: the response's tokens (no special tokens added, no EOS).
        tokenization: ``"joint"`` (cut from the prompt + response encoding) or ``"alone"`` (the
            fallback: the response tokenized on its own, its dummy prefix removed).
        spans: byte spans of the response tokens (a partition of the response's UTF-8 bytes),
            or ``None`` when not asked for.
        offsets_method: how the spans were found (:func:`mlot_ds.data.offsets.response_spans`).
    """

    prompt_ids: list[int]
    response_ids: list[int]
    tokenization: str
    spans: list[tuple[int, int]] | None = None
    offsets_method: str | None = None


def _decode(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _surfaces_spell(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int], target: bytes) -> bool:
    surfaces = token_surface_bytes_cached(tokenizer)
    parts = [surfaces[i] if 0 <= i < len(surfaces) else None for i in ids]
    return all(part is not None for part in parts) and b"".join(parts) == target


# -- the fallback: the response alone, without the dummy prefix ------------------------------------
def _switch_off_prefix(step: dict | None) -> tuple[dict | None, bool]:
    """A normaliser or pre-tokenizer description with its dummy-prefix step switched off."""
    if not step:
        return step, False
    kind = step.get("type")
    if kind == "Sequence":
        key = "normalizers" if "normalizers" in step else "pretokenizers"
        changed, kept = False, []
        for inner in step.get(key, []):
            if inner.get("type") == "Prepend":
                changed = True
                continue
            inner, inner_changed = _switch_off_prefix(inner)
            changed |= inner_changed
            kept.append(inner)
        return {**step, key: kept}, changed
    if kind == "Prepend":
        return None, True
    if kind == "Metaspace":
        changed = step.get("prepend_scheme", "never") != "never" or bool(step.get("add_prefix_space"))
        step = {**step, "prepend_scheme": "never"}
        if "add_prefix_space" in step:
            step["add_prefix_space"] = False
        return step, changed
    if kind == "ByteLevel" and step.get("add_prefix_space"):
        return {**step, "add_prefix_space": False}, True
    return step, False


def _fast_without_prefix(tokenizer: PreTrainedTokenizerBase):

    description = json.loads(tokenizer.backend_tokenizer.to_str())
    description["normalizer"], normaliser_changed = _switch_off_prefix(description.get("normalizer"))
    description["pre_tokenizer"], pre_changed = _switch_off_prefix(description.get("pre_tokenizer"))
    if not (normaliser_changed or pre_changed):
        return None
    backend = Tokenizer.from_str(json.dumps(description))
    backend.no_truncation()
    backend.no_padding()
    return backend


def _slow_without_prefix(tokenizer: PreTrainedTokenizerBase):
    sp_model = getattr(tokenizer, "sp_model", None)
    if sp_model is None:
        return None

    proto = sentencepiece_model_pb2.ModelProto.FromString(sp_model.serialized_model_proto())
    if not proto.normalizer_spec.add_dummy_prefix:
        return None
    proto.normalizer_spec.add_dummy_prefix = False
    processor = sentencepiece.SentencePieceProcessor()
    processor.LoadFromSerializedProto(proto.SerializeToString())
    variant = copy.copy(tokenizer)  # shares everything but the SentencePiece model
    variant.sp_model = processor
    return variant


_VARIANTS: dict[int, tuple[PreTrainedTokenizerBase, object]] = {}


def _without_prefix(tokenizer: PreTrainedTokenizerBase):
    """The tokenizer with its dummy prefix switched off (cached per object), or ``None`` if it has none."""
    cached = _VARIANTS.get(id(tokenizer))
    if cached is None or cached[0] is not tokenizer:
        variant = _fast_without_prefix(tokenizer) if getattr(tokenizer, "is_fast", False) else _slow_without_prefix(tokenizer)
        cached = (tokenizer, variant)
        _VARIANTS[id(tokenizer)] = cached
    return cached[1]


def encode_response_alone(tokenizer: PreTrainedTokenizerBase, response: str) -> tuple[list[int], list[tuple[int, int]] | None]:
    """The response's ids when tokenized on its own without a dummy prefix, and their character
    offsets when a fast tokenizer gives them."""
    variant = _without_prefix(tokenizer)
    if variant is None:
        if getattr(tokenizer, "is_fast", False):
            encoding = tokenizer(response, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
            return list(encoding["input_ids"]), [tuple(o) for o in encoding["offset_mapping"]]
        return list(tokenizer(response, add_special_tokens=False, verbose=False)["input_ids"]), None
    if getattr(tokenizer, "is_fast", False):
        encoding = variant.encode(response, add_special_tokens=False)
        return list(encoding.ids), [tuple(o) for o in encoding.offsets]
    return list(variant(response, add_special_tokens=False, verbose=False)["input_ids"]), None


# -- the joint cut -----------------------------------------------------------------------------
def _joint_cut(
    tokenizer: PreTrainedTokenizerBase,
    prompt_text: str,
    response: str,
    prompt_ids: list[int],
    full_ids: list[int],
    full_offsets: list[tuple[int, int]] | None,
) -> tuple[list[int], list[tuple[int, int]] | None] | None:
    """The response's ids (and character offsets in it) cut from the joint encoding, or ``None``."""
    if not prompt_text:
        return full_ids, None if full_offsets is None else list(full_offsets)  # the response is the text
    count = len(prompt_ids)
    if full_ids[:count] != prompt_ids:
        return None
    candidate = full_ids[count:]
    if _surfaces_spell(tokenizer, candidate, response.encode("utf-8")):
        return candidate, None
    if full_offsets is not None:
        boundary = len(prompt_text)
        prompt_ok = all(end <= boundary for _, end in full_offsets[:count])
        response_ok = all(start >= boundary for start, _ in full_offsets[count:])
        if prompt_ok and response_ok:
            return candidate, [(start - boundary, end - boundary) for start, end in full_offsets[count:]]
        return None
    # Slow tokenizers without usable surfaces: compare decoded text.
    prompt_decoded, full_decoded = _decode(tokenizer, prompt_ids), _decode(tokenizer, full_ids)
    if not full_decoded.startswith(prompt_decoded):
        return None
    rest = full_decoded[len(prompt_decoded) :]
    if rest == response:
        return candidate, None
    alone = tokenizer(response, add_special_tokens=False, verbose=False)["input_ids"]
    if rest and rest == _decode(tokenizer, alone):  # the tokenizer rewrites the text the same way
        return candidate, None
    return None


def encode_prompt_responses(
    tokenizer: PreTrainedTokenizerBase,
    prompt_texts: Sequence[str],
    responses: Sequence[str],
    *,
    leading_ids: Sequence[int] = (),
    with_spans: bool = True,
) -> list[PromptResponse]:
    """Tokenize each ``prompt_texts[i] + responses[i]`` as one text and cut it at the response.

    Args:
        tokenizer: any Hugging Face tokenizer, fast or slow.
        prompt_texts: rendered prompts (template applied, separator included).
        responses: the responses, in the same order.
        leading_ids: ids put before every prompt (the BOS of a plain template, see
            :func:`mlot_ds.pairing.surface.leading_special_ids`); no other special tokens are added.
        with_spans: also compute the byte spans of the response tokens.

    Returns:
        One :class:`PromptResponse` per pair (the rule is in the module docstring).
    """
    if len(prompt_texts) != len(responses):
        raise ValueError(f"{len(prompt_texts)} prompts but {len(responses)} responses")
    if not prompt_texts:
        return []
    fast = bool(getattr(tokenizer, "is_fast", False))
    lead = list(leading_ids)
    prompts = tokenizer(list(prompt_texts), add_special_tokens=False, verbose=False)["input_ids"]
    joined = [p + r for p, r in zip(prompt_texts, responses)]
    full = tokenizer(joined, add_special_tokens=False, return_offsets_mapping=fast, verbose=False)
    results = []
    for index, (prompt_text, response) in enumerate(zip(prompt_texts, responses)):
        prompt_ids = list(prompts[index])
        offsets = [tuple(o) for o in full["offset_mapping"][index]] if fast else None
        cut = _joint_cut(tokenizer, prompt_text, response, prompt_ids, list(full["input_ids"][index]), offsets)
        if cut is not None:
            (response_ids, char_offsets), tokenization = cut, "joint"
        else:
            (response_ids, char_offsets), tokenization = encode_response_alone(tokenizer, response), "alone"
        spans = method = None
        if with_spans:
            spans, method = response_spans(tokenizer, response, response_ids, char_offsets=char_offsets,
                                           context_ids=lead + prompt_ids)
        results.append(PromptResponse(lead + prompt_ids, response_ids, tokenization, spans, method))
    return results


def encode_prompt_response(
    tokenizer: PreTrainedTokenizerBase,
    prompt_text: str,
    response: str,
    *,
    leading_ids: Sequence[int] = (),
    with_spans: bool = True,
) -> PromptResponse:
    """:func:`encode_prompt_responses` for one prompt and response."""
    return encode_prompt_responses(tokenizer, [prompt_text], [response], leading_ids=leading_ids, with_spans=with_spans)[0]


def decodes_to_response(tokenizer: PreTrainedTokenizerBase, prompt_ids: Sequence[int], response_ids: Sequence[int],
                        response: str) -> bool:
    """Whether the response ids, read after the prompt ids, decode to exactly ``response``.

    Decoded in context: a SentencePiece decoder strips a leading space only at the start of a text.
    """
    prompt_decoded = _decode(tokenizer, prompt_ids)
    return _decode(tokenizer, list(prompt_ids) + list(response_ids)) == prompt_decoded + response
