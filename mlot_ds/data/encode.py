"""Tokenize records for one model, and pair two models' response tokens; cached with ``datasets``.

Both steps are ``datasets.Dataset.map`` calls with an explicit fingerprint: a sha256 of the
records' content, the tokenizer (:func:`~mlot_ds.pairing.surface.tokenizer_fingerprint`), the
template, the few-shot examples, the EOS and length settings, and a format version. With a cache
directory the result is an Arrow file named after that fingerprint, so a second run (or a second
model with the same tokenizer and template) loads it instead of tokenizing again. A changed
tokenizer, template or record changes the name, so stale files are never read.

Prompt and response are tokenized as the model reads them, in one text cut where the response
starts (:mod:`mlot_ds.data.tokenize`), so a SentencePiece model reads no dummy-prefix space
before the response.

Columns of a tokenized dataset (one row per record, same order as the input):
``prompt_ids`` (left-truncated to fit), ``response_ids`` (no special tokens, no EOS),
``span_starts`` / ``span_ends`` (byte spans of the response tokens, see
:mod:`mlot_ds.data.offsets`), ``prompt_length``, ``response_length``, ``fits`` (the response plus
EOS plus one prompt token fit in ``max_length``), ``prompt_truncated``, ``offsets_method``,
``tokenization`` (``joint``, or ``alone`` where the fallback of :mod:`mlot_ds.data.tokenize` was
needed) and ``decodes_back`` (the response ids, read after the prompt, decode to the response
text exactly).
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

import datasets
from transformers import PreTrainedTokenizerBase

from mlot_ds.data.records import Record
from mlot_ds.data.templates import Template, render_prompt
from mlot_ds.data.tokenize import decodes_to_response, encode_prompt_responses
from mlot_ds.pairing.dtw import dtw_pairs
from mlot_ds.pairing.offsets import offset_groups
from mlot_ds.pairing.surface import (
    leading_special_ids,
    token_surface_bytes_cached,
    tokenizer_fingerprint,
)

ENCODE_FORMAT_VERSION = 3  # 3: prompt + response tokenized in one text; non-whitespace offset gaps go to the token before
PAIRS_FORMAT_VERSION = 4
MAP_BATCH_SIZE = 256


def records_fingerprint(records: Sequence[Record]) -> str:
    digest = hashlib.sha256()
    for record in records:
        digest.update(json.dumps([record.id, record.prompt, record.response]).encode())
    return digest.hexdigest()


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


@contextmanager
def _progress_bars(enabled: bool):
    was_enabled = datasets.is_progress_bar_enabled()
    (datasets.enable_progress_bars if enabled else datasets.disable_progress_bars)()
    try:
        yield
    finally:
        (datasets.enable_progress_bars if was_enabled else datasets.disable_progress_bars)()


_IDS = datasets.Sequence(datasets.Value("int64"))
ENCODED_FEATURES = datasets.Features({
    "prompt_ids": _IDS, "response_ids": _IDS, "span_starts": _IDS, "span_ends": _IDS,
    "prompt_length": datasets.Value("int64"), "response_length": datasets.Value("int64"),
    "fits": datasets.Value("bool"), "prompt_truncated": datasets.Value("bool"),
    "offsets_method": datasets.Value("string"), "tokenization": datasets.Value("string"),
    "decodes_back": datasets.Value("bool"),
})
PAIR_FEATURES = datasets.Features({"pair_student": _IDS, "pair_teacher": _IDS,
                                   "stop_student": _IDS, "stop_teacher": _IDS})


def _run_map(dataset: datasets.Dataset, function, fingerprint: str, cache_dir: Path | None, label: str, progress: bool,
             desc: str, features: datasets.Features):
    cache_file = None
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        cache_file = str(cache_dir / f"{label}-{fingerprint}.arrow")
    with _progress_bars(progress):
        return dataset.map(
            function,
            batched=True,
            batch_size=MAP_BATCH_SIZE,
            remove_columns=dataset.column_names,
            new_fingerprint=fingerprint,
            cache_file_name=cache_file,
            load_from_cache_file=cache_file is not None,
            keep_in_memory=cache_file is None,
            desc=desc,
            features=features,  # explicit: a batch of empty lists must not decide the column type
        )


def truncate_prompt(prompt_ids: list[int], budget: int, keep_first: int) -> list[int]:
    """Drop prompt tokens from the left until ``budget`` remain, keeping the first ``keep_first``
    (leading special tokens such as BOS) when the budget allows."""
    if len(prompt_ids) <= budget:
        return prompt_ids
    if budget > keep_first:
        return prompt_ids[:keep_first] + prompt_ids[len(prompt_ids) - (budget - keep_first) :]
    return prompt_ids[len(prompt_ids) - budget :]


def encode_model(
    base: datasets.Dataset,
    base_fingerprint: str,
    *,
    name: str,
    tokenizer: PreTrainedTokenizerBase,
    template: Template,
    examples: Sequence[Record],
    append_eos: bool,
    max_length: int,
    cache_dir: Path | None,
    progress: bool,
    memo: dict[str, datasets.Dataset] | None = None,
) -> tuple[datasets.Dataset, str]:
    """Tokenize every record of ``base`` (columns ``id``, ``prompt``, ``response``) for one model.

    Returns:
        The tokenized dataset (columns in the module docstring) and its fingerprint. Models with
        the same tokenizer, template and settings share one result (through ``memo`` within a
        run, through the cache file across runs).
    """
    examples = list(examples)[: template.few_shot]
    lead = leading_special_ids(tokenizer) if template.kind == "plain" else []
    special = set(tokenizer.all_special_ids)
    eos = [tokenizer.eos_token_id] if append_eos else []
    if append_eos and tokenizer.eos_token_id is None:
        raise ValueError(f"{name}: append_eos is set but the tokenizer has no EOS token")
    fingerprint = _digest(
        "encode",
        ENCODE_FORMAT_VERSION,
        base_fingerprint,
        tokenizer_fingerprint(tokenizer),
        [template.kind, template.system, template.few_shot],
        [[e.id, e.prompt, e.response] for e in examples],
        append_eos,
        max_length,
    )

    if memo is not None and fingerprint in memo:
        return memo[fingerprint], fingerprint

    def encode(batch: dict) -> dict:
        texts = [render_prompt(template, tokenizer, p, examples, model=name) for p in batch["prompt"]]
        encoded = encode_prompt_responses(tokenizer, texts, batch["response"], leading_ids=lead)
        out = {k: [] for k in ("prompt_ids", "response_ids", "span_starts", "span_ends", "prompt_length",
                               "response_length", "fits", "prompt_truncated", "offsets_method", "tokenization",
                               "decodes_back")}
        for record, response in zip(encoded, batch["response"]):
            prompt_ids, response_ids, spans = record.prompt_ids, record.response_ids, record.spans
            budget = max_length - len(response_ids) - len(eos)
            keep_first = next((i for i, t in enumerate(prompt_ids) if t not in special), len(prompt_ids))
            fits = budget >= 1 and len(response_ids) > 0 and len(prompt_ids) > 0
            kept = truncate_prompt(prompt_ids, max(budget, 1), keep_first) if fits else prompt_ids
            out["prompt_ids"].append(kept)
            out["response_ids"].append(response_ids)
            out["span_starts"].append([s for s, _ in spans])
            out["span_ends"].append([e for _, e in spans])
            out["prompt_length"].append(len(kept))
            out["response_length"].append(len(response_ids))
            out["fits"].append(fits)
            out["prompt_truncated"].append(len(kept) < len(prompt_ids))
            out["offsets_method"].append(record.offsets_method)
            out["tokenization"].append(record.tokenization)
            out["decodes_back"].append(decodes_to_response(tokenizer, prompt_ids, response_ids, response))
        return out

    encoded = _run_map(base, encode, fingerprint, cache_dir, "tokenized", progress, desc=f"tokenizing for {name}",
                       features=ENCODED_FEATURES)
    if memo is not None:
        memo[fingerprint] = encoded
    return encoded, fingerprint


def token_strings(tokenizer: PreTrainedTokenizerBase, token_ids: Sequence[int]) -> list[bytes]:
    """Normalised token strings for MinED: surface bytes, or the token's literal string for specials."""
    surfaces = token_surface_bytes_cached(tokenizer)
    strings = []
    for token_id in token_ids:
        surface = surfaces[token_id] if token_id < len(surfaces) else None
        strings.append(surface if surface is not None else str(tokenizer.convert_ids_to_tokens(token_id)).encode())
    return strings


def pair_responses(
    student: datasets.Dataset,
    student_fingerprint: str,
    teacher: datasets.Dataset,
    teacher_fingerprint: str,
    *,
    rule: str,
    student_tokenizer: PreTrainedTokenizerBase,
    teacher_tokenizer: PreTrainedTokenizerBase,
    teacher_name: str,
    cache_dir: Path | None,
    progress: bool,
) -> datasets.Dataset:
    """Response-token pairs ``(pair_student[k], pair_teacher[k])`` of every record, by ``rule``, and
    the exclusive end ``(stop_student[k], stop_teacher[k])`` of each pair's group (offsets: the
    tokens that spell the same bytes; 1:1 rules: the next token).

    ``rule`` is ``"offsets"`` (:func:`~mlot_ds.pairing.offsets.offsets_pairs`) or ``"dtw"``
    (:func:`~mlot_ds.pairing.dtw.dtw_pairs`). Indices point into each side's response tokens
    (EOS excluded; the caller adds the EOS pair by its policy).
    """
    if rule not in ("offsets", "dtw"):
        raise ValueError(f"pair_responses handles 'offsets' and 'dtw', not {rule!r}")
    columns = ["response_ids", "span_starts", "span_ends"]
    joined = datasets.concatenate_datasets(
        [
            student.select_columns(columns).rename_columns({c: f"s_{c}" for c in columns}),
            teacher.select_columns(columns).rename_columns({c: f"t_{c}" for c in columns}),
        ],
        axis=1,
    )
    fingerprint = _digest("pairs", PAIRS_FORMAT_VERSION, rule, student_fingerprint, teacher_fingerprint)
    # The same tokenizer on both sides gives the same response tokens: pair them one to one, even
    # where the byte spans are only known per character (a normalising or slow tokenizer).
    same_tokenizer = tokenizer_fingerprint(student_tokenizer) == tokenizer_fingerprint(teacher_tokenizer)

    def pair(batch: dict) -> dict:
        out = {"pair_student": [], "pair_teacher": [], "stop_student": [], "stop_teacher": []}
        for row in range(len(batch["s_response_ids"])):
            if not batch["s_response_ids"][row] or not batch["t_response_ids"][row]:
                groups = []  # such a record is dropped; keep the row so indices stay aligned
            elif same_tokenizer and batch["s_response_ids"][row] == batch["t_response_ids"][row]:
                groups = [(i, i, i + 1, i + 1) for i in range(len(batch["s_response_ids"][row]))]
            elif rule == "offsets":
                groups = [(g.student_tokens.start, g.teacher_tokens.start, g.student_tokens.stop, g.teacher_tokens.stop)
                          for g in offset_groups(list(zip(batch["s_span_starts"][row], batch["s_span_ends"][row])),
                                                 list(zip(batch["t_span_starts"][row], batch["t_span_ends"][row])))]
            else:
                groups = [(s, t, s + 1, t + 1) for s, t in dtw_pairs(
                    token_strings(student_tokenizer, batch["s_response_ids"][row]),
                    token_strings(teacher_tokenizer, batch["t_response_ids"][row]))]
            for key, column in zip(("pair_student", "pair_teacher", "stop_student", "stop_teacher"), range(4)):
                out[key].append([group[column] for group in groups])
        return out

    return _run_map(joined, pair, fingerprint, cache_dir, f"pairs-{rule}", progress, desc=f"pairing {teacher_name} ({rule})",
                    features=PAIR_FEATURES)
