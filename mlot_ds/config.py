"""The recipe: one typed config, loaded from YAML with dotted overrides and validated up front.

Every knob of a run lives here; the DeepSpeed JSON only adds engine tuning (ZeRO buckets, offload)
and its batch/optimizer keys are filled from this recipe (see ``mlot_ds.engine.ds_config``).

    recipe = load_recipe("my.yaml", ["train.max_steps=20", "teachers.llama.weight=2"])

Errors are :class:`RecipeError` and name the field path, e.g. ``teachers[1].loss.preset``.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from mlot_ds.losses.presets import TERMS, resolve_preset

DEFAULT_RECIPE = Path(__file__).parent / "recipes" / "demo.yaml"

PAIRINGS = ("position", "offsets", "dtw")
LOSS_KINDS = ("mlot", "uld", "mined")
MLOT_PRESETS = ("default", "paper", "official")
PLACEMENTS = ("shard", "offload", "replicate")
SOURCES = ("live", "cache")
DTYPES = ("auto", "float32", "bfloat16", "float16")
TEMPLATE_KINDS = ("plain", "chat")
ADAPTERS = ("dialogsum", "qed", "fairytaleqa", "jsonl")


class RecipeError(ValueError):
    """A recipe value is wrong. The message names the field and what was expected."""


@dataclass
class TemplateConfig:
    kind: str = "plain"
    """``plain`` renders ``prompt + "\\n"``; ``chat`` uses the tokenizer's chat template."""
    system: str | None = None
    """System message for ``chat`` templates."""
    few_shot: int = 0
    """Number of training examples shown before the prompt (taken from the head of the train set)."""


@dataclass
class StudentConfig:
    model: str = "zoo:student"
    """Local model folder, or ``zoo:<member>`` for a model of the built-in tiny zoo."""
    tokenizer: str | None = None
    """Tokenizer folder; defaults to ``model``."""
    template: TemplateConfig = field(default_factory=TemplateConfig)
    dtype: str = "auto"
    """``auto`` = bfloat16 on an accelerator that supports it, float32 on the CPU."""
    trust_remote_code: bool = False
    """Run model code shipped in the checkpoint folder. Off unless you trust the folder."""
    append_eos: bool = True
    distill_final_eos: bool = False
    """Also distil the student's final EOS (the reference code drops it; CE always keeps it)."""
    gradient_checkpointing: bool = False


@dataclass
class LossConfig:
    kind: str = "mlot"
    """``mlot`` (MultiLevelOT), ``uld`` or ``mined``."""
    preset: str = "default"
    """MultiLevelOT preset: ``default``, ``paper`` or ``official``."""
    overrides: dict = field(default_factory=dict)
    """Named hyper-parameters of the loss, e.g. ``{k: 50, tau_sd: 2.0, ranking: token}``."""
    weights: dict = field(default_factory=dict)
    """Multipliers of the loss's terms, replacing the preset's: ``had``, ``sl``, ``sd`` (mlot),
    ``uld`` (default 1.5) or ``mined`` (default 1.0); unnamed terms keep their defaults, 0 drops one."""


@dataclass
class TeacherConfig:
    name: str = ""
    """Unique name; used in logs (``teacher/<name>/<term>``) and checkpoints."""
    model: str = ""
    tokenizer: str | None = None
    template: TemplateConfig = field(default_factory=TemplateConfig)
    dtype: str = "auto"
    trust_remote_code: bool = False
    append_eos: bool = False
    pairing: str = "offsets"
    loss: LossConfig = field(default_factory=LossConfig)
    weight: float = 1.0
    """Static weight (``weighting.mode: static``) or prior (``dynamic``)."""
    placement: str = "shard"
    """``shard`` (ZeRO-3), ``offload`` (ZeRO-3, parameters on CPU) or ``replicate`` (full copy per rank)."""
    source: str = "live"
    """``live`` runs the teacher; ``cache`` reads what its loss needs from ``cache_dir``, built by
    ``tools/cache_teachers.py`` (the manifest must match this recipe)."""
    cache_dir: str | None = None
    """This teacher's offline cache; defaults to ``<data.cache_dir or train.output_dir/cache>/teachers/<name>``."""
    chunked_logits: bool = True
    """Live teachers: apply the output layer in chunks to the rows the loss needs, never holding the
    ``[B, T, V]`` logits (falls back, with a warning, for architectures not known to allow it)."""


@dataclass
class WeightingConfig:
    mode: str = "static"
    """``static``: the teachers' ``weight``; ``dynamic``: softmin of each teacher's gold-response CE."""
    normalize: bool = True
    """Static: divide weights by their sum, so they sum to 1. Off: use them raw."""
    temperature: float = 1.0
    """Dynamic: softmin temperature over the teachers' cross-entropies (nats per token)."""


@dataclass
class DataSourceConfig:
    adapter: str = "dialogsum"
    path: str = "builtin:dialogsum/train"
    """A file or folder, or ``builtin:dialogsum/<split>`` for the bundled DialogSum sample."""
    fields: dict | None = None
    """Generic adapter: ``{prompt: col, response: col, references: col}``."""
    limit: int | None = None


@dataclass
class DataConfig:
    train: DataSourceConfig = field(default_factory=DataSourceConfig)
    eval: DataSourceConfig | None = None
    max_length: int = 512
    bad_rows: str = "error"
    """``error``: stop at the first malformed row (file:line); ``skip``: drop and count it."""
    cache_dir: str | None = None
    """Tokenization cache; defaults to ``<output_dir>/cache``."""


@dataclass
class TrainConfig:
    output_dir: str = "runs/demo"
    seed: int = 42
    micro_batch_size: int = 4
    grad_accum: int = 1
    epochs: int = 1
    max_steps: int = 0
    """Stop after this many optimizer steps (0 = run ``epochs`` epochs)."""
    lr: float = 5e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 1.0
    ce_weight: float = 1.0
    log_every: int = 1
    save_every: int = 0
    """Checkpoint every N steps (0 = only at the end and on a signal)."""
    keep_last: int = 2
    resume: str = "auto"
    """``auto`` (newest complete checkpoint in output_dir, if any), ``none``, or a checkpoint folder."""
    allow_teacher_change: bool = False
    reshard_on_resume: bool = True
    """Resuming on a different number of ranks: convert the checkpoint to DeepSpeed's universal format
    (into ``step_N/universal``; the checkpoint's own files are not touched) and load that. Keep
    ``micro_batch_size * grad_accum * ranks`` equal, so the data position carries over."""
    max_consecutive_skips: int = 5
    dist_timeout_s: int = 600


@dataclass
class EvalConfig:
    every: int = 0
    """Evaluate every N steps (0 = only at the end)."""
    limit: int = 64
    batch_size: int = 8
    max_new_tokens: int = 64
    generate: bool = True
    best_metric: str | None = None
    """Keep the checkpoint with the best value of this metric (e.g. ``eval/rouge_lsum``) from the
    periodic evaluations; ``<output_dir>/checkpoints/best`` names it and pruning never removes it.
    ``eval/bits_per_byte`` is minimised, every other metric maximised."""


@dataclass
class ExportConfig:
    enabled: bool = True
    dir: str | None = None
    """Defaults to ``<output_dir>/export``."""


@dataclass
class ZooConfig:
    profile: str = "default"
    seed: int = 0
    cache_dir: str | None = None


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
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Loading


def load_recipe(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a YAML recipe (the embedded default when ``path`` is None), apply overrides, validate."""
    source = Path(path) if path is not None else DEFAULT_RECIPE
    if not source.is_file():
        raise RecipeError(f"recipe file not found: {source}")
    try:
        raw = yaml.safe_load(source.read_text(encoding="utf-8")) or {}
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
    value = yaml.safe_load(text) if text.strip() else ""
    node: Any = raw
    for depth, part in enumerate(parts[:-1]):
        node = _child(node, part, ".".join(parts[: depth + 1]), create=True)
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(node, last, key)] = value
    else:
        node[last] = value


def _child(node: Any, part: str, where: str, create: bool) -> Any:
    if isinstance(node, list):
        return node[_list_index(node, part, where)]
    if not isinstance(node, dict):
        raise RecipeError(f"override {where}: {type(node).__name__} has no field {part!r}")
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
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{where or 'recipe'}: expected a mapping, got {type(raw).__name__} {raw!r}")
    hints = get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in known:
            guess = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean {guess[0]!r}?" if guess else f"; valid fields: {', '.join(sorted(known))}"
            raise RecipeError(f"{path}: unknown field{hint}")
        kwargs[key] = _coerce(hints[key], value, path)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = get_origin(hint)
    args = get_args(hint)
    if origin is not None and type(None) in args:  # Optional[X]
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = get_origin(hint), get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(args[0], item, f"{where}[{i}]") for i, item in enumerate(value)]
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
        return value
    if hint is float:
        if isinstance(value, str):
            # YAML 1.1 reads "1e-4" (no dot) as a string; accept what Python reads as a number.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise RecipeError(f"{where}: expected a string, got {value!r}")
        return value
    return value


# ---------------------------------------------------------------------------------------------
# Validation: every cross-field rule, before any expensive work


def _choice(value: str, options: tuple[str, ...], where: str) -> None:
    if value not in options:
        raise RecipeError(f"{where}: expected one of {', '.join(options)}; got {value!r}")


def _positive(value: float, where: str, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise RecipeError(f"{where}: expected a {'non-negative' if allow_zero else 'positive'} number; got {value!r}")


def validate(recipe: Recipe) -> None:
    """Check ranges and cross-field rules. File paths are checked by the dry run (they may not exist yet)."""
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
        _choice(teacher.pairing, PAIRINGS, f"{where}.pairing")
        _choice(teacher.placement, PLACEMENTS, f"{where}.placement")
        _choice(teacher.source, SOURCES, f"{where}.source")
        if teacher.source == "cache" and teacher.loss.kind == "mlot" and teacher.loss.preset == "official":
            raise RecipeError(f"{where}.source: 'cache' cannot hold preset 'official' (it ranks over the whole batch, "
                              "so nothing per record can be stored); use 'live' or another preset")
        _choice(teacher.loss.kind, LOSS_KINDS, f"{where}.loss.kind")
        _choice(teacher.loss.preset, MLOT_PRESETS, f"{where}.loss.preset")
        if teacher.loss.kind == "mined" and teacher.pairing != "dtw":
            raise RecipeError(f"{where}.pairing: loss 'mined' needs pairing 'dtw'; got {teacher.pairing!r}")
        if teacher.loss.kind != "mlot" and teacher.loss.overrides:
            raise RecipeError(f"{where}.loss.overrides: loss {teacher.loss.kind!r} takes no overrides "
                              f"(its weight is loss.weights.{teacher.loss.kind})")
        if teacher.loss.kind == "mlot":
            try:
                hparams = resolve_preset(teacher.loss.preset, teacher.loss.overrides)
            except (TypeError, ValueError) as exc:
                raise RecipeError(f"{where}.loss.overrides: {exc}") from None
            if teacher.source == "cache" and hparams.ranking != "sequence":
                raise RecipeError(f"{where}.loss.overrides.ranking: a cache stores one ranking per record; "
                                  f"ranking {hparams.ranking!r} needs source 'live'")
        terms = TERMS if teacher.loss.kind == "mlot" else (teacher.loss.kind,)
        for term, value in teacher.loss.weights.items():
            if term not in terms:
                raise RecipeError(f"{where}.loss.weights.{term}: loss {teacher.loss.kind!r} has the terms "
                                  f"{', '.join(terms)}")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise RecipeError(f"{where}.loss.weights.{term}: expected a non-negative number; got {value!r}")
        _positive(teacher.weight, f"{where}.weight", allow_zero=True)
    if recipe.weighting.mode == "static" and sum(t.weight for t in recipe.teachers) <= 0:
        raise RecipeError("teachers[*].weight: static weights must not all be zero")
    _choice(recipe.weighting.mode, ("static", "dynamic"), "weighting.mode")
    _positive(recipe.weighting.temperature, "weighting.temperature")

    data = recipe.data
    for split, source in (("train", data.train), ("eval", data.eval)):
        if source is None:
            continue
        _choice(source.adapter, ADAPTERS, f"data.{split}.adapter")
        if not source.path:
            raise RecipeError(f"data.{split}.path: expected a file, folder or builtin:dialogsum/<split>")
        if source.limit is not None:
            _positive(source.limit, f"data.{split}.limit")
    if data.max_length < 16:
        raise RecipeError(f"data.max_length: expected at least 16 tokens; got {data.max_length}")
    _choice(data.bad_rows, ("error", "skip"), "data.bad_rows")

    train = recipe.train
    for name in ("micro_batch_size", "grad_accum", "epochs", "log_every", "keep_last", "dist_timeout_s",
                 "max_consecutive_skips"):
        value = getattr(train, name)
        if value < 1:
            raise RecipeError(f"train.{name}: expected an integer >= 1; got {value}")
    for name in ("max_steps", "save_every", "warmup_steps"):
        _positive(getattr(train, name), f"train.{name}", allow_zero=True)
    _positive(train.lr, "train.lr")
    _positive(train.weight_decay, "train.weight_decay", allow_zero=True)
    _positive(train.grad_clip, "train.grad_clip", allow_zero=True)
    _positive(train.ce_weight, "train.ce_weight", allow_zero=True)
    if not train.output_dir:
        raise RecipeError("train.output_dir: expected a folder")
    if train.resume not in ("auto", "none") and not train.resume:
        raise RecipeError("train.resume: expected auto, none or a checkpoint folder")
    _positive(recipe.eval.every, "eval.every", allow_zero=True)
    for name in ("limit", "batch_size", "max_new_tokens"):
        if getattr(recipe.eval, name) < 1:
            raise RecipeError(f"eval.{name}: expected an integer >= 1; got {getattr(recipe.eval, name)}")
    best = recipe.eval.best_metric
    if best is not None:
        _choice(best, ("eval/bits_per_byte", "eval/rouge_lsum", "eval/f1", "eval/exact_match"), "eval.best_metric")
        if not recipe.eval.every:
            raise RecipeError("eval.best_metric: needs periodic evaluation; set eval.every to a number of steps")
    _choice(recipe.zoo.profile, ("default", "tiny"), "zoo.profile")


def _validate_model(where: str, model: StudentConfig | TeacherConfig) -> None:
    if not model.model:
        raise RecipeError(f"{where}.model: expected a model folder or zoo:<member>")
    _choice(model.dtype, DTYPES, f"{where}.dtype")
    _choice(model.template.kind, TEMPLATE_KINDS, f"{where}.template.kind")
    if model.template.few_shot < 0:
        raise RecipeError(f"{where}.template.few_shot: expected an integer >= 0; got {model.template.few_shot}")
