"""GGUF checkpoints (llama.cpp's one-file format), converted once to a Hugging Face folder in the cache.

A recipe's ``model:`` (and the tools' model arguments) may name a ``.gguf`` file, or a folder that
holds exactly one and no ``config.json``. The file is converted into ``<cache>/gguf/<digest16>/``,
keyed by the first 16 hex digits of the file's SHA-256 (a moved or renamed file reuses its
conversion; a changed file gets a new one). ``<cache>`` is the zoo's: ``zoo.cache_dir`` (or the
``cache_dir`` argument), else ``$MLOT_DS_CACHE``, else ``~/.cache/mlot_ds``. The folder holds:

    config.json, generation_config.json   the model's config, without GGUF's quantization_config
    model.safetensors                     the weights dequantised to float32
    tokenizer.json, tokenizer_config.json the tokenizer, with chat_template.jinja when the file has one
    gguf_source.json                      the source file, its digest and size, the versions that converted it

Conversion goes through transformers' own GGUF loader (it needs the ``gguf`` package, in the
``real`` extra), so the folder's model computes the same logits as
``AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)``. It is done like a zoo build: an
exclusive file lock per digest makes a second process wait instead of converting again, and the
folder is written under a staging name and renamed into place, so a folder that exists is
complete. :func:`find_gguf` and :func:`gguf_folder` only read the file (the dry run's checks);
:func:`convert_gguf` and :func:`resolve_gguf` convert when the folder is missing.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from mlot_ds import outputs
from mlot_ds.errors import BadInput
from mlot_ds.zoo.build import CACHE_ENV, _announce, _exclusive
from mlot_ds.zoo.packaged import EXTRA

MAGIC = b"GGUF"
SUFFIX = ".gguf"
RECORD = "gguf_source.json"
CONVERSION_FORMAT = 1
"""Bumped when the converted folder's content changes; recorded in :data:`RECORD`."""
DIGEST_CHARS = 16
_READ_BYTES = 1 << 23


class GgufError(BadInput):
    """A GGUF reference cannot be used: missing, not GGUF, ambiguous, or ``gguf`` is not installed."""


def _prefix(where: str | None) -> str:
    return f"{where}: " if where else ""


def names_gguf(path: str | Path) -> bool:
    """``path`` is meant as a GGUF model: it ends in ``.gguf``, is a file (a folder is what a
    Hugging Face model is), or is a folder without ``config.json`` that holds ``.gguf`` files."""
    path = Path(path).expanduser()
    if path.suffix.lower() == SUFFIX or path.is_file():
        return True
    return path.is_dir() and not (path / "config.json").exists() and bool(_gguf_files(path))


def _gguf_files(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.suffix.lower() == SUFFIX and p.is_file())
    except OSError:
        return []


def find_gguf(path: str | Path, where: str | None = None) -> Path:
    """The GGUF file ``path`` names: the file itself, or the only ``.gguf`` file of a folder.

    Raises :class:`GgufError` (naming ``where`` and the path) for a missing path, a folder with no
    or several ``.gguf`` files, or a file that does not start with GGUF's magic bytes.
    """
    path = Path(path).expanduser()
    prefix = _prefix(where)
    if path.is_dir():
        found = _gguf_files(path)
        if len(found) != 1:
            what = "no .gguf file" if not found else f"{len(found)} .gguf files ({', '.join(p.name for p in found)})"
            raise GgufError(f"{prefix}{path} holds {what}; expected exactly one (or name the file itself)")
        path = found[0]
    elif not path.exists():
        raise GgufError(f"{prefix}GGUF file not found: {path}")
    try:
        with open(path, "rb") as handle:
            magic = handle.read(len(MAGIC))
    except OSError as exc:
        raise GgufError(f"{prefix}cannot read {path}: {exc.strerror or exc}") from None
    if magic != MAGIC:
        raise GgufError(f"{prefix}{path} is not a GGUF file (it does not start with the bytes 'GGUF'); expected a "
                        f".gguf model file or a Hugging Face model folder")
    return path


def file_digest(path: Path) -> str:
    """The SHA-256 of ``path`` (hex), computed once per process for a given path, size and mtime."""
    resolved = Path(path).resolve()
    stat = resolved.stat()
    return _digest(str(resolved), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_READ_BYTES):
            digest.update(block)
    return digest.hexdigest()


def cache_base(cache_dir: str | Path | None = None) -> Path:
    """``<cache>``: ``cache_dir``, else ``$MLOT_DS_CACHE``, else ``~/.cache/mlot_ds`` (as the zoo)."""
    return Path(cache_dir or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mlot_ds").expanduser()


def gguf_folder(file: Path, cache_dir: str | Path | None = None) -> Path:
    """Where the conversion of the GGUF ``file`` lives (or will live); converts nothing."""
    return cache_base(cache_dir) / "gguf" / file_digest(file)[:DIGEST_CHARS]


def check_converter(where: str | None = None) -> None:
    """The ``gguf`` package transformers converts with is installed (needed only to convert)."""
    if importlib.util.find_spec("gguf") is None:
        raise GgufError(f"{_prefix(where)}reading a GGUF file needs the gguf package: {EXTRA} (or pip install gguf)")


def convert_gguf(file: Path, cache_dir: str | Path | None = None, progress: bool = True,
                 where: str | None = None) -> Path:
    """The converted folder of the GGUF ``file``, converting it first if it is not in the cache yet."""
    target = gguf_folder(file, cache_dir)
    if target.is_dir():
        return target
    check_converter(where)
    root = target.parent
    outputs.check_writable(target, f"{_prefix(where)}the GGUF conversion cache")
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive(root / f".{target.name}.lock", f"gguf: waiting for another process converting {file}", progress):
        if target.is_dir():
            return target
        for stale in root.glob(f".tmp-{target.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        staging = root / f".tmp-{target.name}-{os.getpid()}"
        _announce(f"gguf: converting {file} to a Hugging Face folder (once per file; the cache keeps it)", progress)
        started = time.perf_counter()
        try:
            _convert(file, staging, where)
            os.rename(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        _announce(f"gguf: converted {file.name} -> {target} in {time.perf_counter() - started:.0f} s", progress)
    return target


def resolve_gguf(path: str | Path, cache_dir: str | Path | None = None, progress: bool = True,
                 where: str | None = None) -> Path:
    """A local Hugging Face folder for a ``.gguf`` file (or a folder holding exactly one): its
    conversion in the cache, made now if missing."""
    return convert_gguf(find_gguf(path, where), cache_dir, progress, where)


def _convert(file: Path, folder: Path, where: str | None) -> None:
    started = time.perf_counter()
    unset_hf_deepspeed_config()  # a whole model on this process, even inside a DeepSpeed rank
    source, name = str(file.parent), file.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(source, gguf_file=name, dtype=torch.float32, local_files_only=True)
    except ImportError as exc:  # transformers checks the gguf package's version itself
        raise GgufError(f"{_prefix(where)}reading {file} needs a newer gguf package ({str(exc).splitlines()[0]}): "
                        f"{EXTRA} (or pip install -U gguf)") from None
    except (OSError, ValueError, KeyError, RuntimeError, NotImplementedError) as exc:
        raise GgufError(f"{_prefix(where)}transformers cannot load {file}: {type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    # The dequantised model is a plain one: without these, save_pretrained refuses ("quantized with gguf").
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    folder.mkdir(parents=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    if not (folder / "generation_config.json").is_file():
        model.generation_config.save_pretrained(folder)
    record = {
        "source": str(file.resolve()),
        "sha256": file_digest(file),
        "bytes": file.stat().st_size,
        "format": CONVERSION_FORMAT,
        "dtype": "float32",
        "architecture": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "tokenizer_vocab": len(tokenizer),
        "chat_template": bool(getattr(tokenizer, "chat_template", None)),
        "versions": {package: _version(package) for package in ("transformers", "gguf", "torch")},
        "seconds": round(time.perf_counter() - started, 1),
    }
    (folder / RECORD).write_text(json.dumps(record, indent=2) + "\n")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


__all__ = ["CONVERSION_FORMAT", "GgufError", "MAGIC", "RECORD", "cache_base", "check_converter", "convert_gguf",
           "file_digest", "find_gguf", "gguf_folder", "names_gguf", "resolve_gguf"]
