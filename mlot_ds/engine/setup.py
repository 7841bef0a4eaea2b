"""Everything a run needs before any model is loaded: paths, tokenizers, records, batches, manifest.

:func:`prepare_inputs` is also the whole of ``--dry-run`` (with ``check_only=True``): it resolves and
validates every path and tokenizer, so a bad recipe fails here, in seconds, with one clear error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mlot_ds import dist
from mlot_ds.config import Recipe, RecipeError
from mlot_ds.data import (
    DistillationData,
    ModelSide,
    Template,
    load_records,
    load_tokenizer,
)
from mlot_ds.engine import preflight, resolve
from mlot_ds.engine.checkpoint import folder_hash
from mlot_ds.errors import BadInput
from mlot_ds.losses.method import MethodContext
from mlot_ds.pairing.surface import token_surface_bytes_cached, tokenizer_fingerprint
from mlot_ds.teachers.loading import check_model_folder, embedding_rows, model_dims_of_folder


@dataclass
class RunInputs:
    student: resolve.ResolvedModel
    teachers: list[resolve.ResolvedModel]
    student_tokenizer: object
    teacher_tokenizers: dict
    data: object = None  # DistillationData
    eval_records: list = field(default_factory=list)
    manifest: dict = field(default_factory=dict)
    methods: dict = field(default_factory=dict)
    """Teacher name -> its :class:`~mlot_ds.losses.method.Method` (built once the data is known)."""


def build_methods(recipe: Recipe, inputs: RunInputs) -> dict:
    """Every teacher's method object, with what it needs of the tokenizers and the data."""

    methods = {}
    student_fingerprint = tokenizer_fingerprint(inputs.student_tokenizer)
    student_dims = None
    for index, (teacher, resolved) in enumerate(zip(recipe.teachers, inputs.teachers)):
        method = teacher.loss.method
        tokenizer = inputs.teacher_tokenizers[teacher.name]
        wants_surfaces = "surfaces" in method.needs
        teacher_dims = None
        if "dims" in method.needs_for(teacher.loss.params):
            student_dims = student_dims or model_dims_of_folder(
                inputs.student.model, trust_remote_code=recipe.student.trust_remote_code, where="student.model")
            teacher_dims = model_dims_of_folder(resolved.model, trust_remote_code=teacher.trust_remote_code,
                                                where=f"teachers[{index}].model")
        context = MethodContext(
            student_to_teacher=inputs.data.vocab_maps.get(teacher.name) if inputs.data is not None else None,
            student_surfaces=tuple(token_surface_bytes_cached(inputs.student_tokenizer)) if wants_surfaces else None,
            teacher_surfaces=tuple(token_surface_bytes_cached(tokenizer)) if wants_surfaces else None,
            student_vocab=embedding_rows(inputs.student.model), teacher_vocab=embedding_rows(resolved.model),
            same_tokenizer=tokenizer_fingerprint(tokenizer) == student_fingerprint,
            student_dims=student_dims if teacher_dims is not None else None, teacher_dims=teacher_dims,
        )
        try:
            method.check(teacher.loss.params, context)
        except ValueError as exc:
            raise RecipeError(f"teachers[{index}].loss: {exc}") from None
        methods[teacher.name] = method(teacher.loss.params, teacher.loss.weights, context)
    return methods


def _model_side(name, tokenizer, template_cfg, *, pairing, append_eos, distill_final_eos, vocab_rows, views=frozenset()):
    template = Template(kind=template_cfg.kind, system=template_cfg.system, few_shot=template_cfg.few_shot)
    return ModelSide(name=name, tokenizer=tokenizer, template=template, pairing=pairing, views=frozenset(views),
                     append_eos=append_eos, distill_final_eos=distill_final_eos, model_vocab_size=vocab_rows)


def prepare_inputs(recipe: Recipe, *, check_only: bool = False, progress: bool = True,
                   check_run_paths: bool = True) -> RunInputs:
    """Resolve the recipe into local inputs. Collective when not ``check_only`` (the zoo and the
    tokenization cache are built on rank 0 first, then the other ranks reuse them).

    ``check_run_paths=False`` skips the training run's own folders (output, resume, export, built
    caches): ``tools/cache_teachers.py`` writes none of them.
    """

    train_path = resolve.data_path(recipe.data.train, "data.train")
    eval_path = resolve.data_path(recipe.data.eval, "data.eval") if recipe.data.eval is not None else None
    if check_run_paths:
        preflight.check_run_paths(recipe)
    student, teachers = _resolve_without_building(recipe)
    preflight.check_model_files(recipe, student, teachers)
    records = load_records(recipe.data.train.adapter, train_path, fields=recipe.data.train.fields,
                           bad_rows=recipe.data.bad_rows, limit=recipe.data.train.limit)
    if not records.records:
        raise RecipeError(f"data.train: no usable records in {train_path} (dropped: {dict(records.dropped)})")
    _check_few_shot(recipe, len(records.records))
    eval_records = []
    if eval_path is not None:
        eval_records = load_records(recipe.data.eval.adapter, eval_path, fields=recipe.data.eval.fields,
                                    bad_rows=recipe.data.bad_rows, limit=recipe.data.eval.limit).records
        if not eval_records:
            raise RecipeError(f"data.eval: no usable records in {eval_path}; fix the file or its adapter, or set "
                              f"data.eval=null to train without evaluating")
    if not check_only:
        _build_models(recipe, progress)

    def tokenizer_for(resolved: resolve.ResolvedModel, trust: bool):
        check_model_folder(resolved.model, f"{resolved.where}.model")
        try:
            return load_tokenizer(resolved.tokenizer, trust_remote_code=trust)
        except (OSError, ValueError) as exc:
            raise RecipeError(f"{resolved.where}.tokenizer: cannot load a tokenizer from {resolved.tokenizer}: {exc}") from None

    if check_only and not all(r.model.exists() for r in [student, *teachers]):
        # The zoo is built on the first real run; a dry run only checks its names.
        return RunInputs(student, teachers, None, {})

    student_tokenizer = tokenizer_for(student, recipe.student.trust_remote_code)
    teacher_tokenizers = {t.name: tokenizer_for(r, t.trust_remote_code) for t, r in zip(recipe.teachers, teachers)}
    student_side = _model_side("student", student_tokenizer, recipe.student.template, pairing=None,
                               append_eos=recipe.student.append_eos,
                               distill_final_eos=recipe.student.distill_final_eos,
                               vocab_rows=embedding_rows(student.model))
    teacher_sides = [
        _model_side(t.name, teacher_tokenizers[t.name], t.template, pairing=t.pairing, append_eos=t.append_eos,
                    distill_final_eos=True, vocab_rows=embedding_rows(r.model),
                    views=t.loss.method.needs & {"groups", "overlaps"})
        for t, r in zip(recipe.teachers, teachers)
    ]
    for side, where in [(student_side, "student")] + [(s, f"teachers[{i}]") for i, s in enumerate(teacher_sides)]:
        if side.template.kind == "chat" and not getattr(side.tokenizer, "chat_template", None):
            raise RecipeError(f"{where}.template.kind: 'chat' but the tokenizer has no chat template")
        if len(side.tokenizer) > side.model_vocab_size:
            raise RecipeError(
                f"{where}.tokenizer: {len(side.tokenizer)} tokens but the model has only "
                f"{side.model_vocab_size} embedding rows; tokenizer and model do not match"
            )

    manifest = {"teachers": [
        {"name": t.name, "model": str(r.model), "tokenizer_hash": folder_hash(r.tokenizer), "weight": t.weight,
         "loss": t.loss.to_dict(),
         "pairing": t.pairing, "placement": t.placement}
        for t, r in zip(recipe.teachers, teachers)
    ]}
    inputs = RunInputs(student, teachers, student_tokenizer, teacher_tokenizers, None, eval_records, manifest)
    if check_only:
        build_methods(recipe, inputs)  # the checks that need the tokenizers (e.g. same-tokenizer KD)
        return inputs

    cache_dir = recipe.paths().data_cache

    def build_data(show: bool):
        return DistillationData(records, student_side, teacher_sides, max_length=recipe.data.max_length,
                                micro_batch_size=recipe.train.micro_batch_size, grad_accum=recipe.train.grad_accum,
                                world_size=dist.world_size(), rank=dist.rank(), seed=recipe.train.seed,
                                cache_dir=cache_dir, progress=show)

    # Rank 0 tokenizes and fills the cache; the others then read it instead of racing to write it.
    data = dist.rank0_then_barrier(lambda: build_data(progress))
    inputs.data = data if data is not None else build_data(False)
    dropped = dict(inputs.data.dropped)
    dist.print0(f"data: {inputs.data.num_records} training records"
                + (f", dropped {dropped}" if dropped else "") + f", {inputs.data.steps_per_epoch} steps per epoch")
    inputs.methods = build_methods(recipe, inputs)
    return inputs


def _resolve_without_building(recipe: Recipe):
    student, teachers = resolve.resolve_models(recipe)
    configs = [recipe.student, *recipe.teachers]
    for resolved, config in zip([student, *teachers], configs):
        if not resolve.built_on_first_use(config.model):
            check_model_folder(resolved.model, f"{resolved.where}.model")
        if not resolve.built_on_first_use(config.tokenizer or config.model) and not Path(resolved.tokenizer).is_dir():
            raise RecipeError(f"{resolved.where}.tokenizer: folder not found: {resolved.tokenizer}")
    return student, teachers


def _build_models(recipe: Recipe, progress: bool) -> None:
    """Collective: rank 0 builds the zoo and converts GGUF files (once, into the cache), the other
    ranks wait and then use the folders. A bad file found only now (e.g. a GGUF architecture
    transformers cannot read) stops every rank, not only rank 0."""
    failure = None
    if dist.is_rank0():
        try:
            resolve.build_models_if_needed(recipe, progress=progress)
        except BadInput as exc:
            failure = exc
    if dist.any_rank(failure is not None):
        raise failure or RecipeError("preparing the recipe's models failed on rank 0 (its error is printed there)")


def _check_few_shot(recipe: Recipe, num_records: int) -> None:
    """Few-shot examples come from the head of the training data; some must be left to train on."""
    models = [("student", recipe.student)] + [(f"teachers[{i}]", t) for i, t in enumerate(recipe.teachers)]
    where, config = max(models, key=lambda item: item[1].template.few_shot)
    if config.template.few_shot and config.template.few_shot >= num_records:
        raise RecipeError(f"{where}.template.few_shot: {config.template.few_shot} examples are taken from the head of "
                          f"data.train, which has only {num_records} records (none would be left to train on); "
                          f"lower few_shot or add data")
