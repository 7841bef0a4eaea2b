"""From a recipe, a DeepSpeed JSON and a cluster to the planner's :class:`~mlot_ds.plan.memory.Job`.

Model references resolve to local folders the way a run resolves them, without building or
converting anything: ``zoo:<member>`` through :mod:`mlot_ds.zoo` (the folder exists once the zoo is
built), a packaged model or a ``.gguf`` file to its conversion's folder in the cache, anything
else as a path. Only each folder's ``config.json`` is read.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from mlot_ds.config import Recipe
from mlot_ds.errors import BadInput
from mlot_ds.plan.memory import CPU, CUDA, Job, Platform, StudentSpec, TeacherSpec, dtype_bytes
from mlot_ds.plan.model_shapes import ModelShape, PlanError, model_shape
from mlot_ds.plan.zero3 import zero_settings
from mlot_ds.zoo import ALL_MEMBERS, PACKAGED, ZooSettings, find_gguf, gguf_folder, names_gguf, packaged_file, zoo_member_path

ZOO_PREFIX = "zoo:"
_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


@dataclass(frozen=True)
class Cluster:
    """Where the job runs: ``gpu_memory`` per GPU and ``cpu_memory`` per node, in bytes.

    ``reserve``: the share of each GPU's memory the plan leaves to what it does not count (the CUDA
    context, NCCL's buffers, the caching allocator's fragmentation).
    """

    nodes: int = 1
    gpus_per_node: int = 1
    gpu_memory: int = 80 * 2**30
    cpu_memory: int | None = None
    device: str = "cuda"
    reserve: float = 0.10

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def platform(self) -> Platform:
        return CPU if self.device == "cpu" else CUDA

    @property
    def usable(self) -> int:
        return int(self.gpu_memory * (1 - self.reserve))


def parse_size(text: str, where: str) -> int:
    """``80GB``, ``80GiB``, ``1TB``, ``512M`` -> bytes (binary units: a "80 GB" GPU has 80 GiB)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgtKMGT]?)(i?[bB])?\s*", str(text))
    if not match:
        raise PlanError(f"{where}: expected a size such as 80GB, 1TB or 512MB; got {text!r}")
    size = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if size <= 0:
        raise PlanError(f"{where}: expected a size above zero; got {text!r}")
    return size


def read_json(path: str | Path, where: str = "--config") -> dict:
    """The DeepSpeed JSON, parsed; a missing or broken file is one :class:`PlanError` with file:line."""
    source = Path(path)
    if not source.is_file():
        raise PlanError(f"{where}: DeepSpeed config not found: {source}")
    try:
        config = json.loads(source.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise PlanError(f"{source}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PlanError(f"{source}: cannot read ({exc})") from None
    if not isinstance(config, dict):
        raise PlanError(f"{source}: expected a JSON object at the top level")
    return config


def model_folder(reference: str, recipe: Recipe, where: str) -> Path:
    """The local folder a recipe model reference stands for (nothing is built or converted)."""
    cache_dir = Path(recipe.zoo.cache_dir).expanduser() if recipe.zoo.cache_dir else None
    try:
        if reference.startswith(ZOO_PREFIX):
            name = reference[len(ZOO_PREFIX):]
            if name in PACKAGED:
                return gguf_folder(find_gguf(packaged_file(name, where), where), cache_dir)
            if name not in ALL_MEMBERS:
                raise PlanError(f"{where}: unknown zoo member {name!r}")
            return zoo_member_path(name, ZooSettings(profile=recipe.zoo.profile, seed=recipe.zoo.seed), cache_dir=cache_dir)
        if names_gguf(reference):
            return gguf_folder(find_gguf(reference, where), cache_dir)
    except PlanError:
        raise
    except BadInput as exc:
        raise PlanError(str(exc)) from None
    return Path(reference).expanduser()


def recipe_shapes(recipe: Recipe, folders: dict[str, Path] | None = None) -> dict[str, ModelShape]:
    """``{"student": shape, <teacher name>: shape}`` from each model's ``config.json``.

    ``folders`` (same keys) overrides the resolution (the dry run passes the folders it resolved).
    """
    folders = dict(folders or {})
    shapes = {"student": model_shape(folders.get("student") or model_folder(recipe.student.model, recipe, "student.model"),
                                     "student.model")}
    for index, teacher in enumerate(recipe.teachers):
        where = f"teachers[{index}].model"
        shapes[teacher.name] = model_shape(folders.get(teacher.name) or model_folder(teacher.model, recipe, where), where)
    return shapes


def build_job(recipe: Recipe, ds_config: dict, cluster: Cluster, shapes: dict[str, ModelShape], *,
              seq_len: int | None = None, teacher_seq_len: dict[str, int] | None = None, pairs: int | None = None,
              padded: bool = True, source: str = "ds_config") -> Job:
    """The step the recipe runs on ``cluster``.

    Args:
        seq_len: tokens per student sequence (default ``data.max_length``: the longest a batch can be).
        teacher_seq_len: per teacher (default ``seq_len``).
        pairs: paired rows per sequence (default ``seq_len``: every token a response token, an upper bound).
        padded: a batch mixes lengths, so the attention takes a padding mask (the usual case).
    """
    # Imported here: mlot_ds.teachers loads DeepSpeed, which the planner's own modules do not need.
    from mlot_ds.teachers.chunked import VERIFIED_MODEL_TYPES

    zero = zero_settings(ds_config, source)
    bf16 = zero.bf16 if isinstance(zero.bf16, bool) else cluster.platform.bf16_auto
    seq_len = seq_len or recipe.data.max_length
    student = StudentSpec(shapes["student"], dtype_bytes(recipe.student.dtype, bf16), recipe.student.gradient_checkpointing)
    teachers = []
    for teacher in recipe.teachers:
        shape = shapes[teacher.name]
        teachers.append(TeacherSpec(
            name=teacher.name, shape=shape, dtype_bytes=dtype_bytes(teacher.dtype, bf16), placement=teacher.placement,
            source=teacher.source, chunked=teacher.chunked_logits and shape.model_type in VERIFIED_MODEL_TYPES,
            kind=teacher.loss.kind, params=teacher.loss.params, method_class=teacher.loss.method,
            seq_len=(teacher_seq_len or {}).get(teacher.name, seq_len)))
    return Job(student=student, teachers=tuple(teachers), micro_batch=recipe.train.micro_batch_size,
               grad_accum=recipe.train.grad_accum, seq_len=seq_len, pairs=min(pairs or seq_len, seq_len), padded=padded,
               zero=zero, world=cluster.world)


__all__ = ["Cluster", "build_job", "model_folder", "parse_size", "read_json", "recipe_shapes"]
