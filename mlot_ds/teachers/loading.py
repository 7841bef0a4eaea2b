"""Loading Hugging Face models for DeepSpeed: partitioned at construction, never a full copy per rank.

Under ZeRO-3 a ``HfDeepSpeedConfig`` object must be alive while ``from_pretrained`` runs: it makes
transformers build the model inside ``deepspeed.zero.Init`` so every rank only ever materialises its
own shard. A replicated model is loaded with that switch explicitly off.
"""

from __future__ import annotations

import copy
import json
import struct
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.integrations import HfDeepSpeedConfig
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from mlot_ds.errors import BadInput
from mlot_ds.teachers.features import FeatureError, model_dims

SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_INDEX = "pytorch_model.bin.index.json"


class ModelLoadError(BadInput, ValueError):
    """A model folder is missing or unreadable. The message names the folder."""


def resolve_dtype(name: str, bf16_enabled: bool) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if bf16_enabled else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def check_model_folder(path: str | Path, where: str) -> Path:
    folder = Path(path)
    if not folder.is_dir():
        raise ModelLoadError(f"{where}: model folder not found: {folder}")
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{where}: {folder} has no config.json (expected a Hugging Face model folder)")
    return folder


def teacher_ds_config(student_config: dict, placement: str, micro_batch_size: int) -> dict:
    """A frozen teacher's DeepSpeed config: the student's ZeRO-3 settings for inference, no optimizer,
    parameters offloaded to the CPU for ``placement="offload"``."""
    zero = copy.deepcopy(student_config.get("zero_optimization", {}))
    for key in ("offload_optimizer",):
        zero.pop(key, None)
    if placement == "offload":
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    else:
        zero.pop("offload_param", None)
    zero["stage"] = 3
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "bf16": copy.deepcopy(student_config.get("bf16", {"enabled": False})),
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def weight_files(folder: Path) -> list[Path]:
    """The weight files ``from_pretrained`` would read from ``folder`` (safetensors first)."""
    for index_name, single in ((SAFETENSORS_INDEX, "model.safetensors"), (TORCH_INDEX, "pytorch_model.bin")):
        index = folder / index_name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                raise ModelLoadError(f"{index}: not a readable weight index (expected JSON with a weight_map)") from None
            return [folder / shard for shard in shards]
        if (folder / single).is_file():
            return [folder / single]
    return []


def check_model_weights(path: str | Path, where: str) -> list[Path]:
    """The folder's weights exist and their headers are whole, without reading the tensors.

    A safetensors file must hold its 8-byte header length, a JSON header, and every tensor's bytes
    (a file cut short fails here); a pickled ``.bin`` must be a readable zip (its directory sits at
    the end, so a truncated file fails too).
    """
    folder = check_model_folder(path, where)
    files = weight_files(folder)
    if not files:
        raise ModelLoadError(f"{where}: {folder} has a config.json but no weights (expected model.safetensors, "
                             f"sharded safetensors with {SAFETENSORS_INDEX}, or pytorch_model.bin)")
    for file in files:
        if not file.is_file():
            raise ModelLoadError(f"{where}: weight file {file} (named by the index) is missing")
        if file.suffix == ".safetensors":
            _check_safetensors(file, where)
        elif not zipfile.is_zipfile(file):
            raise ModelLoadError(f"{where}: {file} is truncated or not a torch checkpoint (not a readable zip)")
    return files


def _check_safetensors(file: Path, where: str) -> None:
    size = file.stat().st_size
    with open(file, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise ModelLoadError(f"{where}: {file} is truncated ({size} bytes, no safetensors header)")
        (header_length,) = struct.unpack("<Q", head)
        if header_length > size - 8:
            raise ModelLoadError(f"{where}: {file} is truncated or not a safetensors file (its header claims "
                                 f"{header_length} bytes, the file has {size})")
        try:
            header = json.loads(handle.read(header_length))
            end = max((entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            raise ModelLoadError(f"{where}: {file} has a damaged safetensors header") from None
    if 8 + header_length + end > size:
        raise ModelLoadError(f"{where}: {file} is truncated: its tensors need {8 + header_length + end} bytes, the "
                             f"file has {size}")


def load_causal_lm(path: str | Path, *, dtype: torch.dtype, trust_remote_code: bool,
                   ds_config: dict | None, where: str) -> torch.nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` from a local folder.

    Args:
        ds_config: a ZeRO-3 DeepSpeed config to load already partitioned, or ``None`` to load a
            full copy (the ``replicate`` placement).
        where: the recipe field, for error messages.
    """

    folder = check_model_folder(path, where)
    check_model_weights(folder, where)
    keep_alive = HfDeepSpeedConfig(ds_config) if ds_config is not None else None
    if keep_alive is None:
        unset_hf_deepspeed_config()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, trust_remote_code=trust_remote_code, local_files_only=True
        )
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise ModelLoadError(
                f"{where}: {folder} ships its own model code; set {where}.trust_remote_code: true "
                f"only if you trust that folder"
            ) from None
        raise ModelLoadError(f"{where}: cannot load {folder}: {exc}") from None
    except (OSError, RuntimeError, EOFError, KeyError, SafetensorError) as exc:
        raise ModelLoadError(f"{where}: cannot load {folder}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
    finally:
        unset_hf_deepspeed_config()
        del keep_alive
    return model


def embedding_rows(path: str | Path) -> int:
    """The model's output vocabulary size (may exceed ``len(tokenizer)``, Qwen-style)."""

    try:
        config = AutoConfig.from_pretrained(Path(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"{path}/config.json: not a readable model config ({str(exc).splitlines()[0]})") from None
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text_config.vocab_size)


def model_dims_of_folder(path: str | Path, *, trust_remote_code: bool = False, where: str = "model"):
    """The :class:`~mlot_ds.losses.method.ModelDims` of a model folder, from its modules built on the
    meta device (no weights are read, nothing is allocated)."""
    try:
        config = AutoConfig.from_pretrained(Path(path), local_files_only=True, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        return model_dims(model)
    except FeatureError as exc:
        raise ModelLoadError(f"{where}: {exc}") from None
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"{where}: {path}: cannot read the model's sizes ({str(exc).splitlines()[0]})") from None
