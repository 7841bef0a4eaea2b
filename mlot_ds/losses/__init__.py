"""Distillation losses: pure functions of tensors that return per-term sums and their counts.

Normalisation lives in one place, the engine: ``loss = sum_term weight * sum / global count``
(:func:`compose`). Nothing here imports DeepSpeed, transformers, logging or the config.
"""

from mlot_ds.losses.ce import masked_ce
from mlot_ds.losses.compose import compose
from mlot_ds.losses.mined import mined_kl
from mlot_ds.losses.mlot import TeacherSummary, multilevel_ot, multilevel_ot_from_summary, teacher_summary
from mlot_ds.losses.official import OfficialSpans, official_spans
from mlot_ds.losses.presets import PRESETS, TERMS, MlotPreset, overridable_names, resolve_preset
from mlot_ds.losses.sinkhorn import sinkhorn_distance, sinkhorn_plan
from mlot_ds.losses.uld import uld

__all__ = [
    "MlotPreset",
    "OfficialSpans",
    "PRESETS",
    "TERMS",
    "TeacherSummary",
    "compose",
    "masked_ce",
    "mined_kl",
    "multilevel_ot",
    "multilevel_ot_from_summary",
    "official_spans",
    "overridable_names",
    "resolve_preset",
    "sinkhorn_distance",
    "sinkhorn_plan",
    "teacher_summary",
    "uld",
]
