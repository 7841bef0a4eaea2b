"""Distillation methods: pure functions of tensors, and one class per method registered in :data:`METHODS`.

Every function returns sums over its items plus their counts; the engine divides each sum by the
global count (over ranks and accumulation steps) that the method names as its ``denominator``.
Nothing here imports DeepSpeed, transformers, logging or the recipe. ``docs/METHOD.md`` gives each
method's equations and our decisions.
"""

from mlot_ds.losses.ce import masked_ce
from mlot_ds.losses.method import (
    LogitSource,
    Method,
    MethodContext,
    TeacherOutput,
    TeacherView,
)
from mlot_ds.losses.mined import mined_kl
from mlot_ds.losses.mlot import (
    TeacherSummary,
    multilevel_ot,
    multilevel_ot_from_summary,
    teacher_summary,
)
from mlot_ds.losses.official import (
    OfficialSpans,
    official_multilevel_ot,
    official_spans,
)
from mlot_ds.losses.presets import (
    PRESETS,
    TERMS,
    MlotPreset,
    overridable_names,
    resolve_preset,
)
from mlot_ds.losses.registry import METHODS, method_class
from mlot_ds.losses.sinkhorn import sinkhorn_distance, sinkhorn_plan
from mlot_ds.losses.uld import uld

__all__ = [
    "LogitSource",
    "METHODS",
    "Method",
    "MethodContext",
    "MlotPreset",
    "OfficialSpans",
    "PRESETS",
    "TERMS",
    "TeacherOutput",
    "TeacherSummary",
    "TeacherView",
    "masked_ce",
    "method_class",
    "mined_kl",
    "multilevel_ot",
    "multilevel_ot_from_summary",
    "official_multilevel_ot",
    "official_spans",
    "overridable_names",
    "resolve_preset",
    "sinkhorn_distance",
    "sinkhorn_plan",
    "teacher_summary",
    "uld",
]
