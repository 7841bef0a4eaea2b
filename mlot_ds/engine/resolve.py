"""Turn recipe references into local things: ``zoo:<member>`` models, ``builtin:`` data, tokenizers.

Used by the trainer's setup and by ``--dry-run``, which must find every problem before any model
is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mlot_ds.config import DataSourceConfig, Recipe, RecipeError

ZOO_PREFIX = "zoo:"
BUILTIN_PREFIX = "builtin:"


def uses_zoo(recipe: Recipe) -> bool:
    models = [recipe.student.model, recipe.student.tokenizer or ""]
    for teacher in recipe.teachers:
        models += [teacher.model, teacher.tokenizer or ""]
    return any(m.startswith(ZOO_PREFIX) for m in models)


def zoo_settings(recipe: Recipe):
    from mlot_ds.zoo import ZooSettings

    return ZooSettings(profile=recipe.zoo.profile, seed=recipe.zoo.seed)


def zoo_cache_dir(recipe: Recipe) -> Path | None:
    return Path(recipe.zoo.cache_dir).expanduser() if recipe.zoo.cache_dir else None


def build_zoo_if_needed(recipe: Recipe, progress: bool = True) -> None:
    if uses_zoo(recipe):
        from mlot_ds.zoo import build_zoo

        build_zoo(zoo_settings(recipe), cache_dir=zoo_cache_dir(recipe), progress=progress)


def model_path(reference: str, recipe: Recipe, where: str) -> Path:
    """A local folder for a recipe model reference (``zoo:<member>`` or a path)."""
    if reference.startswith(ZOO_PREFIX):
        from mlot_ds.zoo import MEMBERS, zoo_member_path

        member = reference[len(ZOO_PREFIX):]
        if member not in MEMBERS:
            raise RecipeError(f"{where}: unknown zoo member {member!r}; expected one of {', '.join(MEMBERS)}")
        return zoo_member_path(member, zoo_settings(recipe), cache_dir=zoo_cache_dir(recipe))
    return Path(reference).expanduser()


def data_path(source: DataSourceConfig, where: str) -> Path:
    if source.path.startswith(BUILTIN_PREFIX):
        from mlot_ds.zoo import corpus_path

        name = source.path[len(BUILTIN_PREFIX):]
        dataset, _, split = name.partition("/")
        if dataset != "dialogsum" or split not in ("train", "dev", "test"):
            raise RecipeError(f"{where}.path: unknown built-in data {source.path!r}; expected builtin:dialogsum/<train|dev|test>")
        return corpus_path(split)
    path = Path(source.path).expanduser()
    if not path.exists():
        raise RecipeError(f"{where}.path: no such file or folder: {path}")
    return path


@dataclass
class ResolvedModel:
    where: str
    model: Path
    tokenizer: Path


def resolve_models(recipe: Recipe) -> tuple[ResolvedModel, list[ResolvedModel]]:
    student = recipe.student
    resolved_student = ResolvedModel(
        "student", model_path(student.model, recipe, "student.model"),
        model_path(student.tokenizer or student.model, recipe, "student.tokenizer"),
    )
    teachers = []
    for i, teacher in enumerate(recipe.teachers):
        where = f"teachers[{i}]"
        teachers.append(ResolvedModel(
            where, model_path(teacher.model, recipe, f"{where}.model"),
            model_path(teacher.tokenizer or teacher.model, recipe, f"{where}.tokenizer"),
        ))
    return resolved_student, teachers
