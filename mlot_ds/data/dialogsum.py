"""DialogSum's prompt format, and the bundled DialogSum sample (``builtin:dialogsum/<split>``).

The format is the one text every zoo model is tuned on and the ``dialogsum`` adapter renders, so
that teachers see at distillation time exactly the text they were tuned on. The sample lives in
``mlot_ds/data/corpus/`` (see ``LICENCE.md`` there: CC BY-NC-SA 4.0, a sample of Chen et al. 2021)
so that a fresh clone builds the zoo and runs the demo with no ``../shared`` and no network. Its
files keep the names and the schema of the real DialogSum files, so the ``dialogsum`` adapter
pointed at :func:`corpus_dir` reads them unchanged.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

CORPUS_DIR = Path(__file__).resolve().parent / "corpus"
CORPUS_FILES = {
    "train": "dialogsum.train.jsonl.gz",
    "dev": "dialogsum.dev.jsonl",
    "test": "dialogsum.test.jsonl",
}

# The task format, shared with the data pipeline so that teachers see at distillation time exactly the
# text they were tuned on: the context is ``instruction + dialogue + prompt_suffix + separator``; the
# response is the stripped summary followed by EOS, and only the response carries loss.
SUMMARY_INSTRUCTION = "Summarize the dialogue.\n"
SUMMARY_PROMPT_SUFFIX = "\nSummary:"
RESPONSE_SEPARATOR = "\n"


def render_prompt(dialogue: str) -> str:
    """``"Summarize the dialogue.\\n" + dialogue + "\\nSummary:"`` (without the separator)."""
    return SUMMARY_INSTRUCTION + dialogue + SUMMARY_PROMPT_SUFFIX


def render_context(dialogue: str) -> str:
    """The text a model conditions on before the summary: the prompt followed by the separator."""
    return render_prompt(dialogue) + RESPONSE_SEPARATOR


def render_response(summary: str) -> str:
    """The text whose tokens are trained on (EOS is appended by the tokenizing side)."""
    return summary.strip()


def corpus_dir() -> Path:
    """Folder holding the bundled sample (same file names as the real DialogSum release)."""
    return CORPUS_DIR


def corpus_path(split: str) -> Path:
    """Path of the bundled ``train``, ``dev`` or ``test`` file (jsonl or jsonl.gz, DialogSum schema)."""
    if split not in CORPUS_FILES:
        raise ValueError(f"corpus split must be one of {sorted(CORPUS_FILES)}, got {split!r}")
    return CORPUS_DIR / CORPUS_FILES[split]


def read_records(split: str) -> list[dict]:
    """All records of one bundled split, in file order."""
    path = corpus_path(split)
    if not path.is_file():
        raise FileNotFoundError(f"bundled corpus file missing: {path} (run tools/build_zoo.py --make-corpus)")
    opener = gzip.open if path.suffix == ".gz" else open
    records = []
    with opener(path, "rt", encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number}: not a JSON object ({error.msg})") from None
    return records


def reference_summaries(record: dict) -> list[str]:
    """The reference summaries of a record: ``summary`` (train/dev) or ``summary1..3`` (test)."""
    if "summary" in record:
        return [record["summary"]]
    references = [record[key] for key in ("summary1", "summary2", "summary3") if key in record]
    if not references:
        raise ValueError(f"record {record.get('fname', '?')}: expected 'summary' or 'summary1..3'")
    return references
