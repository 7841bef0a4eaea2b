"""What the tools load on one process: records from a data path, and a model from a Hugging Face
folder, a GGUF file (``x.gguf``, a folder holding one, or a packaged ``zoo:<name>``; converted once
into the cache, :mod:`mlot_ds.zoo.gguf`) or a training checkpoint (its ZeRO-3 shards consolidated
in memory).

Used by ``tools/evaluate.py``, ``tools/generate_teacher_responses.py`` and ``tools/reproduce.py``;
a bad path is one :class:`EvaluateInputError` (exit status 2).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mlot_ds.data import load_records
from mlot_ds.data.sources import resolve_data_path
from mlot_ds.engine.checkpoint import COMPLETE, consolidate, find_latest
from mlot_ds.errors import BadInput
from mlot_ds.eval.report import DEFAULT_MAX_LENGTH
from mlot_ds.teachers.loading import check_model_weights
from mlot_ds.zoo import PACKAGED, names_gguf, packaged_file, resolve_gguf

ZOO_PREFIX = "zoo:"


class EvaluateInputError(BadInput):
    """A model or data path given to an evaluation tool is not what it should be."""


def load_data(adapter: str, path: str, limit: int | None) -> list:
    """The records of ``path`` (a file, a folder or ``builtin:dialogsum/<split>``) through ``adapter``."""
    records = load_records(adapter, resolve_data_path(path, "--path"), limit=limit).records
    if not records:
        raise EvaluateInputError(f"--path {path}: no records")
    return records


def model_folder(reference: str | Path, where: str | None = None, progress: bool = True) -> Path:
    """The local folder for a tool's model argument: a path as given, or the cached conversion of a
    GGUF file or a packaged ``zoo:<name>`` (converted now if it is not in the cache yet)."""
    text = str(reference)
    if text.startswith(ZOO_PREFIX):
        name = text[len(ZOO_PREFIX):]
        if name not in PACKAGED:
            raise EvaluateInputError(f"{where + ': ' if where else ''}{text}: only packaged models can be named "
                                     f"zoo:<name> here ({', '.join(PACKAGED)}); a tiny-zoo member is its folder, "
                                     f"<cache>/zoo/<fingerprint>/<member>")
        return resolve_gguf(packaged_file(name, where), progress=progress, where=where)
    path = Path(text).expanduser()
    return resolve_gguf(path, progress=progress, where=where) if names_gguf(path) else path


def load_model(folder: str | Path, device: str) -> dict:
    """The model, its tokenizer and per-source defaults, from a model folder, a GGUF file, a packaged
    ``zoo:<name>`` or a checkpoint; ``folder`` in the result is the local folder read."""
    folder = model_folder(folder)
    if not folder.exists():
        raise EvaluateInputError(f"{folder}: no such file or folder")
    if (folder / "config.json").is_file():
        return _load_hf_folder(folder, device)
    checkpoint = folder if (folder / COMPLETE).is_file() else (find_latest(folder) if folder.is_dir() else None)
    if checkpoint is None:
        raise EvaluateInputError(f"{folder}: neither a model folder (no config.json) nor a complete checkpoint "
                                 f"(no {COMPLETE}), nor a folder of checkpoints")
    model, tokenizer, recipe = consolidate(checkpoint)
    return {"model": model.to(device), "tokenizer": tokenizer, "template": recipe.student.template.kind,
            "append_eos": recipe.student.append_eos, "max_length": recipe.data.max_length,
            "source": f"checkpoint:{checkpoint.name}", "folder": checkpoint}


def _load_hf_folder(folder: Path, device: str) -> dict:

    check_model_weights(folder, str(folder))
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise EvaluateInputError(f"{folder}: cannot load a causal LM and its tokenizer: {exc}") from None
    return {"model": model.to(device), "tokenizer": tokenizer, "template": "plain", "append_eos": True,
            "max_length": _positions(model.config), "source": "model_folder", "folder": folder}


def _positions(config) -> int:
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return min(value, DEFAULT_MAX_LENGTH)
    return DEFAULT_MAX_LENGTH
