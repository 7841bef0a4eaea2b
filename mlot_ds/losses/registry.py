"""Every distillation method, by the name a recipe gives as ``loss.kind``.

Adding a method: one file in ``losses/`` (pure functions + one :class:`~mlot_ds.losses.method.Method`
class), its tests, and one entry below. The engine, the offline cache and the recipe read this table.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Mapping

from mlot_ds.losses.alm import ApproximateLikelihoodMatching
from mlot_ds.losses.cdm import ContextualDynamicMapping
from mlot_ds.losses.dskd import DualSpaceKD
from mlot_ds.losses.emo import IntraModelRelationOT
from mlot_ds.losses.kl import SameTokenizerKL
from mlot_ds.losses.method import Method
from mlot_ds.losses.mined import MinimumEditDistance
from mlot_ds.losses.mlot import MultiLevelOT
from mlot_ds.losses.official import OfficialMultiLevelOT
from mlot_ds.losses.uld import UniversalLogitDistillation
from mlot_ds.losses.vocagnolm import VocAgnoLM

METHODS: Mapping[str, type[Method]] = MappingProxyType({cls.name: cls for cls in (
    MultiLevelOT,
    OfficialMultiLevelOT,
    UniversalLogitDistillation,
    MinimumEditDistance,
    ApproximateLikelihoodMatching,
    SameTokenizerKL,
    VocAgnoLM,
    ContextualDynamicMapping,
    DualSpaceKD,
    IntraModelRelationOT,
)})


def method_class(kind: str) -> type[Method]:
    """The class registered as ``kind``; ``KeyError`` names the valid kinds."""
    if kind not in METHODS:
        raise KeyError(f"unknown loss kind {kind!r}; expected one of {', '.join(METHODS)}")
    return METHODS[kind]


__all__ = ["METHODS", "method_class"]
