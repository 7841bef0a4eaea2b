"""Records (prompt + response text) and the adapters that make them from dataset files.

Prompt formats (shared with the model zoo, which tunes teachers on exactly these strings):

- ``dialogsum``: ``"Summarize the dialogue.\\n" + dialogue + "\\nSummary:"``; response = the
  summary; references = ``(summary,)`` on train/dev, ``(summary1, summary2, summary3)`` on test
  (whose response is ``summary1``).
- ``qed``: ``"Title: {title_text}\\nContext: {paragraph_text}\\nQuestion: {question_text}?\\nAnswer:"``
  (the ``?`` is not doubled when the question already ends with one); response = the first gold
  answer, references = all gold answers in file order. A gold answer of several spans is its
  span strings joined by one space. Reads the final schema (``original_nq_answers``) and the
  pre-release train shards (``answer_text``).
- ``fairytaleqa``: ``"Story: {content}\\nQuestion: {question}\\nAnswer:"`` (``content`` may be
  called ``story_section``); response = ``answer1``; references = ``(answer1, answer2)`` when
  ``answer2`` is present and non-empty.
- ``jsonl``: generic; ``fields`` maps ``prompt``, ``response`` and optionally ``references`` to
  column names (default: the same names). A references column may hold a string or a list of
  strings; without one, references = ``(response,)``.

Every response and reference is stripped of surrounding whitespace: templates put the response
right after the prompt's separator, so a leading space would be tokenized differently by each
tokenizer. A record whose response is empty after stripping is dropped and counted
(``empty_response``) under either bad-row policy.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from mlot_ds.data.dialogsum import render_prompt as render_dialogsum_prompt
from mlot_ds.data.sources import BadRow, DataError, iter_rows

ADAPTERS = ("dialogsum", "qed", "fairytaleqa", "jsonl")
BAD_ROW_POLICIES = ("error", "skip")


@dataclass(frozen=True)
class Record:
    """One training or evaluation example. ``id`` is the 0-based row position in its source."""

    id: int
    prompt: str
    response: str
    references: tuple[str, ...]


@dataclass
class RecordSet:
    """The records an adapter kept, and how many rows it dropped for which reason."""

    records: list[Record]
    dropped: Counter = field(default_factory=Counter)

    def __len__(self) -> int:
        return len(self.records)


class _RowProblem(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _text(values: dict, column: str, where: str, *, optional: bool = False) -> str | None:
    if column not in values or values[column] is None:
        if optional:
            return None
        raise _RowProblem(f"missing_field:{column}", f"{where}: missing field {column!r} (has {sorted(values)})")
    value = values[column]
    if not isinstance(value, str):
        raise _RowProblem(f"wrong_type:{column}", f"{where}: field {column!r} must be a string, got {type(value).__name__}")
    return value


def _dialogsum(values: dict, where: str, fields: dict) -> tuple[str, str, tuple[str, ...]]:
    dialogue = _text(values, "dialogue", where)
    prompt = render_dialogsum_prompt(dialogue)  # the zoo's teachers are tuned on exactly this text
    if "summary" in values:
        summary = _text(values, "summary", where).strip()
        return prompt, summary, (summary,)
    if "summary1" in values:
        references = tuple(
            _text(values, name, where).strip() for name in ("summary1", "summary2", "summary3") if name in values
        )
        return prompt, references[0], references
    raise _RowProblem("missing_field:summary", f"{where}: expected field 'summary' (train/dev) or 'summary1' (test)")


def _qed(values: dict, where: str, fields: dict) -> tuple[str, str, tuple[str, ...]]:
    title = _text(values, "title_text", where)
    paragraph = _text(values, "paragraph_text", where)
    question = _text(values, "question_text", where)
    if not question.endswith("?"):
        question += "?"
    prompt = f"Title: {title}\nContext: {paragraph}\nQuestion: {question}\nAnswer:"
    if "original_nq_answers" in values:
        annotations = values["original_nq_answers"]
        try:
            answers = [" ".join(span["string"] for span in annotation) for annotation in annotations]
        except (TypeError, KeyError):
            raise _RowProblem(
                "wrong_type:original_nq_answers",
                f"{where}: 'original_nq_answers' must be a list of lists of {{'string': ...}} spans",
            ) from None
    elif "answer_text" in values:
        answers = values["answer_text"]
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise _RowProblem("wrong_type:answer_text", f"{where}: 'answer_text' must be a list of strings")
    else:
        raise _RowProblem(
            "missing_field:original_nq_answers",
            f"{where}: expected 'original_nq_answers' (final QED schema) or 'answer_text' (pre-release shards)",
        )
    references = tuple(a.strip() for a in answers)
    return prompt, (references[0] if references else ""), references


def _fairytaleqa(values: dict, where: str, fields: dict) -> tuple[str, str, tuple[str, ...]]:
    story_column = "content" if "content" in values else "story_section"
    story = _text(values, story_column, where)
    question = _text(values, "question", where)
    answer = _text(values, "answer1", where).strip()
    second = _text(values, "answer2", where, optional=True)
    references = (answer, second.strip()) if second and second.strip() else (answer,)
    return f"Story: {story}\nQuestion: {question}\nAnswer:", answer, references


def _generic(values: dict, where: str, fields: dict) -> tuple[str, str, tuple[str, ...]]:
    prompt = _text(values, fields["prompt"], where)
    response = _text(values, fields["response"], where).strip()
    column = fields["references"]
    if values.get(column) is None:
        if fields["references_required"]:
            raise _RowProblem(f"missing_field:{column}", f"{where}: missing references field {column!r}")
        return prompt, response, (response,)
    raw = values[column]
    if isinstance(raw, str):
        return prompt, response, (raw.strip(),)
    if isinstance(raw, (list, tuple)) and all(isinstance(r, str) for r in raw):
        return prompt, response, tuple(r.strip() for r in raw)
    raise _RowProblem(f"wrong_type:{column}", f"{where}: references field {column!r} must be a string or a list of strings")


_ADAPTER_FUNCTIONS: dict[str, Callable] = {
    "dialogsum": _dialogsum,
    "qed": _qed,
    "fairytaleqa": _fairytaleqa,
    "jsonl": _generic,
}


def load_records(
    adapter: str,
    path: str | Path,
    *,
    fields: dict | None = None,
    bad_rows: str = "error",
    limit: int | None = None,
) -> RecordSet:
    """Read ``path`` with one of the adapters (``dialogsum``, ``qed``, ``fairytaleqa``, ``jsonl``).

    Args:
        adapter: adapter name; see the module docstring for each prompt format.
        path: a local file or a ``datasets.save_to_disk`` directory (see :mod:`mlot_ds.data.sources`).
        fields: ``jsonl`` only: ``{"prompt": col, "response": col, "references": col}``.
        bad_rows: ``"error"`` raises :class:`DataError` naming ``file:line`` at the first bad
            row; ``"skip"`` drops bad rows and counts them by reason in ``RecordSet.dropped``.
        limit: stop after this many kept records.
    """
    if adapter not in _ADAPTER_FUNCTIONS:
        raise DataError(f"unknown adapter {adapter!r}; expected one of {', '.join(ADAPTERS)}")
    if bad_rows not in BAD_ROW_POLICIES:
        raise DataError(f"bad_rows must be one of {BAD_ROW_POLICIES}, got {bad_rows!r}")
    if fields is not None and adapter != "jsonl":
        raise DataError(f"fields= is only for the generic 'jsonl' adapter, not {adapter!r}")
    unknown = set(fields or {}) - {"prompt", "response", "references"}
    if unknown:
        raise DataError(f"fields has unknown keys {sorted(unknown)}; expected prompt, response, references")
    column_names = {"prompt": "prompt", "response": "response", "references": "references"}
    column_names.update(fields or {})
    column_names["references_required"] = "references" in (fields or {})
    adapt = _ADAPTER_FUNCTIONS[adapter]
    records: list[Record] = []
    dropped: Counter = Counter()
    for row in iter_rows(path):
        if limit is not None and len(records) >= limit:
            break
        if isinstance(row, BadRow):
            if bad_rows == "error":
                raise DataError(row.message)
            dropped[row.reason] += 1
            continue
        try:
            prompt, response, references = adapt(row.values, row.where, column_names)
        except _RowProblem as problem:
            if bad_rows == "error":
                raise DataError(str(problem)) from None
            dropped[problem.reason] += 1
            continue
        if not response:
            dropped["empty_response"] += 1
            continue
        records.append(Record(row.index, prompt, response, references))
    return RecordSet(records, dropped)
