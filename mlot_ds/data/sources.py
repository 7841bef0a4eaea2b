"""Reading rows from local files, each row with the place it came from (``file:line``).

Supported: JSON lines (``.jsonl``, ``.jsonlines``, ``.ndjson``), JSON (``.json``: an array of
objects, or JSON lines), CSV with a header (``.csv``), each optionally gzipped (``.gz``); Parquet
(``.parquet``); and a directory written by ``datasets.Dataset.save_to_disk``. Nothing is
downloaded.

A row that cannot be read (invalid JSON, bytes that are not UTF-8, a CSV row with the wrong
number of fields) is yielded as a :class:`BadRow` so that the caller can apply its policy.
"""

from __future__ import annotations

import csv
import gzip
import json
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from mlot_ds.data.dialogsum import CORPUS_FILES, corpus_path
from mlot_ds.errors import BadInput

# What a damaged or truncated gzip file raises while it is read.
_COMPRESSION_ERRORS = (gzip.BadGzipFile, EOFError, zlib.error)


class DataError(BadInput, ValueError):
    """A data file or row that does not have the expected shape; the message names where."""


@dataclass(frozen=True)
class Row:
    index: int  # 0-based position among the data rows of the source
    where: str  # "file:line" or "file: row N"
    values: dict


@dataclass(frozen=True)
class BadRow:
    index: int
    where: str
    reason: str  # short key for the dropped counter, e.g. "non_utf8"
    message: str


BUILTIN_PREFIX = "builtin:"


def resolve_data_path(path: str, where: str) -> Path:
    """A data source's local path: ``builtin:dialogsum/<train|dev|test>`` (the bundled sample) or a
    file/folder that must exist. Raises :class:`DataError` naming ``where``."""
    if path.startswith(BUILTIN_PREFIX):

        dataset, _, split = path[len(BUILTIN_PREFIX):].partition("/")
        if dataset != "dialogsum" or split not in CORPUS_FILES:
            raise DataError(f"{where}: unknown built-in data {path!r}; expected builtin:dialogsum/<train|dev|test>")
        return corpus_path(split)
    resolved = Path(path).expanduser()
    if not resolved.exists():
        raise DataError(f"{where}: no such file or folder: {resolved}")
    return resolved


def _suffixes(path: Path) -> list[str]:
    suffixes = [s.lower() for s in path.suffixes]
    return suffixes[:-1] if suffixes and suffixes[-1] == ".gz" else suffixes


@contextmanager
def _open_bytes(path: Path):
    """The file's bytes (decompressed for ``.gz``); a damaged file or one that cannot be read is a
    :class:`DataError` naming it (and the line reached, for a gzip file cut short)."""
    lines_read = [0]
    try:
        handle = gzip.open(path, "rb") if path.suffix.lower() == ".gz" else open(path, "rb")
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error.strerror or error})") from None
    try:
        with handle:
            yield _CountingReader(handle, lines_read)
    except _COMPRESSION_ERRORS as error:
        reason = "is cut short" if isinstance(error, EOFError) else "is not a valid gzip file"
        raise DataError(f"{path}:{lines_read[0] + 1}: {reason} ({error})") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, not a data file") from None


class _CountingReader:
    """A binary file whose line iteration counts the lines handed out (for error messages)."""

    def __init__(self, handle, counter: list[int]):
        self._handle, self._counter = handle, counter

    def __iter__(self):
        for line in self._handle:
            yield line
            self._counter[0] += 1

    def read(self, *args):
        return self._handle.read(*args)


def iter_rows(path: str | Path) -> Iterator[Row | BadRow]:
    """Yield every data row of ``path`` in order (see the module docstring for the formats)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if path.is_dir():
        yield from _dataset_rows(path)
        return
    suffixes = _suffixes(path)
    kind = suffixes[-1] if suffixes else ""
    if kind in (".jsonl", ".jsonlines", ".ndjson"):
        yield from _json_lines(path)
    elif kind == ".json":
        yield from _json_file(path)
    elif kind == ".csv":
        yield from _csv_rows(path)
    elif kind == ".parquet":
        yield from _parquet_rows(path)
    else:
        raise DataError(
            f"{path}: unknown file type {''.join(path.suffixes) or '(none)'}; expected .jsonl, .json, .csv "
            "(optionally .gz), .parquet, or a directory saved with datasets"
        )


def _decode_lines(path: Path) -> Iterator[tuple[int, str | None, str | None]]:
    """``(line number, text or None, error or None)`` for each physical line."""
    with _open_bytes(path) as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                yield number, raw.decode("utf-8"), None
            except UnicodeDecodeError as error:
                yield number, None, f"bytes that are not UTF-8 at column {error.start + 1}"


def _json_lines(path: Path) -> Iterator[Row | BadRow]:
    index = 0
    for number, text, error in _decode_lines(path):
        where = f"{path}:{number}"
        if error is not None:
            yield BadRow(index, where, "non_utf8", f"{where}: {error}")
            index += 1
            continue
        if not text.strip():
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as decode_error:
            yield BadRow(index, where, "malformed_json", f"{where}: invalid JSON ({decode_error.msg})")
        else:
            if isinstance(value, dict):
                yield Row(index, where, value)
            else:
                yield BadRow(index, where, "malformed_json", f"{where}: expected a JSON object, got {type(value).__name__}")
        index += 1


def _json_file(path: Path) -> Iterator[Row | BadRow]:
    with _open_bytes(path) as handle:
        head = handle.read(4096).lstrip()
    if not head.startswith(b"["):
        yield from _json_lines(path)
        return
    with _open_bytes(path) as handle:
        raw = handle.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: bytes that are not UTF-8") from None
    try:
        items = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}:{error.lineno}: invalid JSON ({error.msg})") from None
    for index, item in enumerate(items):
        where = f"{path}: item {index}"
        if isinstance(item, dict):
            yield Row(index, where, item)
        else:
            yield BadRow(index, where, "malformed_json", f"{where}: expected a JSON object, got {type(item).__name__}")


def _csv_rows(path: Path) -> Iterator[Row | BadRow]:
    pending_bad: list[BadRow] = []
    consumed = [0]  # physical line number of the last line handed to the csv reader

    def lines() -> Iterator[str]:
        for number, text, error in _decode_lines(path):
            consumed[0] = number
            if error is None:
                yield text
            else:
                pending_bad.append(BadRow(-1, f"{path}:{number}", "non_utf8", f"{path}:{number}: {error}"))

    reader = csv.reader(lines())
    try:
        header = next(reader)
    except StopIteration:
        raise DataError(f"{path}: empty CSV file, expected a header row") from None
    if pending_bad:
        raise DataError(pending_bad[0].message + " (in the header)")
    index = 0
    row_start = consumed[0] + 1
    try:
        for fields in reader:
            for bad in pending_bad:
                yield BadRow(index, bad.where, bad.reason, bad.message)
                index += 1
            pending_bad.clear()
            where = f"{path}:{row_start}"
            row_start = consumed[0] + 1
            if not fields:
                continue
            if len(fields) != len(header):
                yield BadRow(index, where, "malformed_csv", f"{where}: expected {len(header)} fields, got {len(fields)}")
            else:
                yield Row(index, where, dict(zip(header, fields)))
            index += 1
    except csv.Error as error:
        raise DataError(f"{path}:{consumed[0]}: malformed CSV ({error})") from None
    for bad in pending_bad:
        yield BadRow(index, bad.where, bad.reason, bad.message)
        index += 1


def _parquet_rows(path: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq  # only Parquet files need pyarrow

    try:
        table = pq.read_table(path)
    except Exception as error:  # pyarrow raises several types for a damaged file
        raise DataError(f"{path}: cannot read Parquet ({error})") from None
    for index, values in enumerate(table.to_pylist()):
        yield Row(index, f"{path}: row {index}", values)


def _dataset_rows(path: Path) -> Iterator[Row]:
    import datasets  # only saved-dataset folders need it here

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as error:  # datasets raises FileNotFoundError or its own errors
        raise DataError(f"{path}: not a directory written by datasets.save_to_disk ({error})") from None
    if isinstance(loaded, datasets.DatasetDict):
        raise DataError(f"{path}: holds splits {sorted(loaded)}; pass the directory of one split, "
                        f"e.g. {path}/{next(iter(loaded))}")
    for index, values in enumerate(loaded):
        yield Row(index, f"{path}: row {index}", values)
