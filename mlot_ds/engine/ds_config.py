"""The DeepSpeed JSON is a template: batch, clipping, optimizer and schedule keys come from the recipe.

A key may be absent, ``"auto"``, or a number equal to the recipe's value. A different number is an
error that names both places, so there is exactly one source of truth for every value.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from deepspeed.runtime import lr_schedules
from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS
from deepspeed.runtime.zero.utils import ZERO_SUPPORTED_OPTIMIZERS

from mlot_ds.config import Recipe
from mlot_ds.errors import BadInput

# Sections the template may hold, each a JSON object when present.
_OBJECT_SECTIONS = ("zero_optimization", "optimizer", "scheduler", "bf16", "fp16", "checkpoint")


class DeepSpeedConfigError(BadInput, ValueError):
    """The DeepSpeed JSON is unreadable or disagrees with the recipe."""


def read_ds_config(path: str | Path) -> dict:
    """Read and check the DeepSpeed template: JSON, ZeRO stage 3, an optimizer and a scheduler
    DeepSpeed knows. Every problem is one :class:`DeepSpeedConfigError` naming the file and key."""
    source = Path(path)
    if source.is_dir():
        raise DeepSpeedConfigError(f"DeepSpeed config {source} is a folder; expected a JSON file")
    if not source.is_file():
        raise DeepSpeedConfigError(f"DeepSpeed config not found: {source}")
    raw = source.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DeepSpeedConfigError(f"{source}:{line}: not UTF-8 text") from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DeepSpeedConfigError(f"{source}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(config, dict):
        raise DeepSpeedConfigError(f"{source}: expected a JSON object at the top level")
    for section in _OBJECT_SECTIONS:
        if section in config and not isinstance(config[section], dict):
            raise DeepSpeedConfigError(f"{source}: {section} must be a JSON object; got {type(config[section]).__name__} "
                                       f"{config[section]!r}")
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage != 3:
        raise DeepSpeedConfigError(
            f"{source}: zero_optimization.stage must be 3 (student and teachers are sharded); got {stage!r}"
        )
    for key in ("fp16",):
        if config.get(key, {}).get("enabled") is True:
            raise DeepSpeedConfigError(f"{source}: {key}.enabled is not supported; use bf16 (or fp32)")
    _check_optimizer_and_scheduler(config, source)
    return config


def _check_optimizer_and_scheduler(config: dict, source: Path) -> None:
    """The optimizer and scheduler types must be ones DeepSpeed builds (its own, or torch's by name)."""

    for section in ("optimizer", "scheduler"):
        if section in config and not isinstance(config[section].get("params", {}), dict):
            raise DeepSpeedConfigError(f"{source}: {section}.params must be a JSON object")
    optimizer = config.get("optimizer")
    if optimizer is not None:
        name = optimizer.get("type")
        torch_class = getattr(torch.optim, name, None) if isinstance(name, str) else None
        if not isinstance(name, str) or (name.lower() not in DEEPSPEED_OPTIMIZERS and torch_class is None):
            raise DeepSpeedConfigError(
                f"{source}: optimizer.type {name!r} is not an optimizer DeepSpeed can build; expected one of "
                f"{', '.join(sorted(DEEPSPEED_OPTIMIZERS))} or a torch.optim class name (e.g. SGD)")
        untested = torch_class is not None and name.lower() not in DEEPSPEED_OPTIMIZERS and not any(
            isinstance(torch_class, type) and issubclass(torch_class, supported) for supported in ZERO_SUPPORTED_OPTIMIZERS)
        if untested and not config.get("zero_allow_untested_optimizer", False):
            raise DeepSpeedConfigError(
                f"{source}: optimizer.type {name!r} is not tested with ZeRO by DeepSpeed; set "
                f"\"zero_allow_untested_optimizer\": true to use it anyway, or use AdamW")
    scheduler = config.get("scheduler")
    if scheduler is not None:
        name = scheduler.get("type")
        known = isinstance(name, str) and (hasattr(lr_schedules, name) or hasattr(torch.optim.lr_scheduler, name))
        if not known:
            raise DeepSpeedConfigError(
                f"{source}: scheduler.type {name!r} is not a scheduler DeepSpeed knows; expected one of "
                f"{', '.join(lr_schedules.VALID_LR_SCHEDULES)} or a torch.optim.lr_scheduler class name")


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type not in ("cpu",)


def _fill(config: dict, dotted: str, value: Any, recipe_field: str, source: str) -> None:
    node = config
    keys = dotted.split(".")
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    current = node.get(keys[-1], "auto")
    if current != "auto" and current != value:
        raise DeepSpeedConfigError(
            f"{source}: {dotted} = {current!r} conflicts with the recipe's {recipe_field} = {value!r}; "
            f"set it in one place (use \"auto\" in the JSON to take the recipe's value)"
        )
    node[keys[-1]] = value


def student_ds_config(template: dict, recipe: Recipe, world_size: int, total_steps: int,
                      device: torch.device, source: str = "ds_config") -> dict:
    """The student engine's config: the template with every recipe-owned key filled in."""
    config = copy.deepcopy(template)
    train = recipe.train
    _fill(config, "train_micro_batch_size_per_gpu", train.micro_batch_size, "train.micro_batch_size", source)
    _fill(config, "gradient_accumulation_steps", train.grad_accum, "train.grad_accum", source)
    _fill(config, "train_batch_size", train.micro_batch_size * train.grad_accum * world_size,
          "train.micro_batch_size * train.grad_accum * world size", source)
    _fill(config, "gradient_clipping", train.grad_clip, "train.grad_clip", source)
    if "optimizer" in config:
        _fill(config, "optimizer.params.lr", train.lr, "train.lr", source)
        _fill(config, "optimizer.params.weight_decay", train.weight_decay, "train.weight_decay", source)
    scheduler = config.get("scheduler")
    if scheduler is not None:
        kind = scheduler.get("type")
        if kind == "WarmupDecayLR":
            _fill(config, "scheduler.params.total_num_steps", max(total_steps, 1), "the run's total steps", source)
        if kind in ("WarmupDecayLR", "WarmupLR", "WarmupCosineLR"):
            # DeepSpeed needs at least one warmup step; "no warmup" is one step that starts at lr.
            _fill(config, "scheduler.params.warmup_num_steps", max(train.warmup_steps, 1), "train.warmup_steps", source)
        if kind in ("WarmupDecayLR", "WarmupLR"):
            _fill(config, "scheduler.params.warmup_max_lr", train.lr, "train.lr", source)
            _fill(config, "scheduler.params.warmup_min_lr", 0.0 if train.warmup_steps else train.lr,
                  "train.lr (no warmup) or 0", source)
    bf16 = config.setdefault("bf16", {})
    if bf16.get("enabled", "auto") == "auto":
        bf16["enabled"] = bf16_supported(device)
    config.setdefault("steps_per_print", 10**9)
    config.setdefault("wall_clock_breakdown", False)
    return config
