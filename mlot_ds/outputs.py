"""Writing outputs without ever deleting what this tool did not write.

Every writer of the project (the export of a run and ``tools/export_hf.py``, the teacher cache,
evaluation reports, generated datasets, the reproduction's run folders) goes through here:

- A **folder** output is replaced only when it is absent, empty, or carries this project's
  marker file (:data:`MARKER`) naming the same kind of output. Anything else (a run folder, a
  user's folder, a file) is refused with an :class:`OutputError` before any work starts. The new
  content is written into a staging folder beside the target and renamed into place, so a reader
  never sees half an export and a failed write leaves the old one intact.
- A **file** output is replaced only when it is absent or recognised as this tool's own by the
  caller's ``is_own`` check (e.g. a JSON report carrying ``written_by``); it is written to a
  temporary name and renamed.

Nothing here removes a folder it did not create: the only folders deleted are staging folders
made by this process and a previous output that carries the marker.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

from mlot_ds.errors import BadInput

MARKER = ".mlot-ds-output.json"


class OutputError(BadInput):
    """An output path would overwrite something this tool did not write, or cannot be written."""


def marker_kind(folder: Path) -> str | None:
    """The kind recorded in ``folder``'s marker, or ``None`` when it has no readable marker."""
    try:
        return json.loads((folder / MARKER).read_text(encoding="utf-8")).get("kind")
    except (OSError, ValueError, AttributeError):
        return None


def check_writable(path: Path, where: str) -> None:
    """``path`` (a file or folder to be written) can be created: no ancestor is a file, and the
    nearest existing ancestor is a writable folder."""
    path = Path(path).expanduser()
    for ancestor in path.parents:
        if ancestor.exists():
            if not ancestor.is_dir():
                raise OutputError(f"{where}: {ancestor} is a file, so {path} cannot be created below it")
            if not os.access(ancestor, os.W_OK | os.X_OK):
                raise OutputError(f"{where}: {ancestor} is not writable, so {path} cannot be created")
            return


def check_folder(path: str | Path, kind: str, where: str) -> Path:
    """Refuse ``path`` as the target of a ``kind`` output unless it is absent, empty, or ours.

    Returns the path; raises :class:`OutputError` naming ``where`` and what is in the way.
    """
    target = Path(path).expanduser()
    if target.exists() or target.is_symlink():
        if not target.is_dir():
            raise OutputError(f"{where}: {target} is a file; expected a folder (or a path that does not exist yet)")
        found = marker_kind(target)
        if found is None and any(target.iterdir()):
            raise OutputError(f"{where}: {target} is not empty and was not written as a {kind} by mlot-ds; refusing "
                              f"to replace it (nothing was changed): choose a new or empty folder")
        if found is not None and found != kind:
            raise OutputError(f"{where}: {target} holds a mlot-ds {found}, not a {kind}; refusing to replace it: "
                              f"choose another folder")
        if not os.access(target, os.W_OK | os.X_OK) or not os.access(target.parent, os.W_OK | os.X_OK):
            raise OutputError(f"{where}: {target} cannot be replaced (no write permission)")
    else:
        check_writable(target, where)
    return target


def check_disjoint(path: str | Path, protected: dict[str, Path], where: str) -> None:
    """Refuse an output folder that is, contains, or lies inside one of the ``protected`` folders."""
    target = Path(path).expanduser().resolve()
    for label, folder in protected.items():
        other = Path(folder).expanduser().resolve()
        if target == other or other.is_relative_to(target) or target.is_relative_to(other):
            raise OutputError(f"{where}: {target} overlaps {label} ({other}); writing it would replace or mix with "
                              f"that folder: choose a separate folder")


def replace_folder(path: str | Path, kind: str, fill: Callable[[Path], None], where: str) -> Path:
    """Write a ``kind`` output into ``path`` through a staging folder, replacing only our own output.

    ``fill(staging)`` writes the content. The marker is written first, so a staging folder left
    by a crash is recognisable as ours.
    """
    target = check_folder(path, kind, where)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.partial-{os.getpid()}")
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    for leftover in (staging, old):
        if leftover.exists() and marker_kind(leftover) == kind:
            shutil.rmtree(leftover)
    staging.mkdir()
    try:
        _write_marker(staging, kind)
        fill(staging)
        if target.exists():
            os.replace(target, old)  # ours (marker) or empty: checked above
        os.replace(staging, target)
    except BaseException:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
        if old.exists() and not target.exists():
            os.replace(old, target)  # put the previous output back
        raise
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)
    return target


def mark_folder(folder: str | Path, kind: str) -> None:
    """Record ``folder`` (created by the caller) as a ``kind`` output of mlot-ds."""
    _write_marker(Path(folder), kind)


def _write_marker(folder: Path, kind: str) -> None:
    (folder / MARKER).write_text(json.dumps({"kind": kind, "written_by": "mlot-ds"}) + "\n", encoding="utf-8")


def check_file(path: str | Path, where: str, is_own: Callable[[Path], bool], what: str) -> Path:
    """Refuse ``path`` as a ``what`` output file unless it is absent, empty, or ``is_own(path)``."""
    target = Path(path).expanduser()
    if target.is_dir():
        raise OutputError(f"{where}: {target} is a folder; expected a file path")
    if target.exists() and target.stat().st_size > 0 and not is_own(target):
        raise OutputError(f"{where}: {target} exists and is not a {what} written by mlot-ds; refusing to overwrite "
                          f"it: choose another path")
    check_writable(target, where)
    return target


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder (atomic rename)."""
    target = Path(path).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    try:
        partial.write_text(text, encoding="utf-8")
        os.replace(partial, target)
    finally:
        if partial.exists():
            partial.unlink()
    return target


def json_written_by(tool: str) -> Callable[[Path], bool]:
    """An ``is_own`` check for JSON files that carry ``"written_by": tool``."""

    def is_own(path: Path) -> bool:
        try:
            return json.loads(path.read_text(encoding="utf-8")).get("written_by") == tool
        except (OSError, ValueError, AttributeError):
            return False

    return is_own


def jsonl_written_by(tool: str) -> Callable[[Path], bool]:
    """An ``is_own`` check for JSON-lines files whose first line carries ``"written_by": tool``."""

    def is_own(path: Path) -> bool:
        try:
            with open(path, encoding="utf-8") as handle:
                return json.loads(handle.readline()).get("written_by") == tool
        except (OSError, ValueError, AttributeError):
            return False

    return is_own


__all__ = ["MARKER", "OutputError", "check_disjoint", "check_file", "check_folder", "check_writable",
           "json_written_by", "jsonl_written_by", "mark_folder", "marker_kind", "replace_folder", "write_text"]
