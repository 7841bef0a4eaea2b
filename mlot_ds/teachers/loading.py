"""Loading Hugging Face models for DeepSpeed: partitioned at construction, never a full copy per rank.

Under ZeRO-3 a ``HfDeepSpeedConfig`` object must be alive while ``from_pretrained`` runs: it makes
transformers build the model inside ``deepspeed.zero.Init`` so every rank only ever materialises its
own shard. A replicated model is loaded with that switch explicitly off.
"""

from __future__ import annotations

from pathlib import Path

import torch


class ModelLoadError(ValueError):
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


def load_causal_lm(path: str | Path, *, dtype: torch.dtype, trust_remote_code: bool,
                   ds_config: dict | None, where: str) -> torch.nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` from a local folder.

    Args:
        ds_config: a ZeRO-3 DeepSpeed config to load already partitioned, or ``None`` to load a
            full copy (the ``replicate`` placement).
        where: the recipe field, for error messages.
    """
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    folder = check_model_folder(path, where)
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
    except OSError as exc:
        raise ModelLoadError(f"{where}: cannot load {folder}: {exc}") from None
    finally:
        unset_hf_deepspeed_config()
        del keep_alive
    return model


def embedding_rows(path: str | Path) -> int:
    """The model's output vocabulary size (may exceed ``len(tokenizer)``, Qwen-style)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(Path(path), local_files_only=True)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text_config.vocab_size)
