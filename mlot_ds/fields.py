"""Typed, bounded number fields shared by the recipe and the methods' hyper-parameters.

A field declared ``Annotated[float, Range(gt=0)]`` (``PositiveFloat``) is checked by the recipe
loader (:func:`mlot_ds.config.coerce`): finite, and inside its range, whether the value came from
YAML or from a dotted override. The bottom layer, so both ``config`` and ``losses`` can use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated


@dataclass(frozen=True)
class Range:
    """Bounds of a number field: ``gt``/``ge`` below, ``lt``/``le`` above (``None`` = unbounded)."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None

    def contains(self, value: float) -> bool:
        return ((self.gt is None or value > self.gt) and (self.ge is None or value >= self.ge)
                and (self.lt is None or value < self.lt) and (self.le is None or value <= self.le))

    def describe(self, integer: bool) -> str:
        kind = "an integer" if integer else "a number"
        if self == POSITIVE:
            return "a positive " + kind.split()[-1]
        if self == NON_NEGATIVE:
            return "a non-negative " + kind.split()[-1]
        bounds = [f"> {_num(self.gt)}" if self.gt is not None else None, f">= {_num(self.ge)}" if self.ge is not None else None,
                  f"< {_num(self.lt)}" if self.lt is not None else None, f"<= {_num(self.le)}" if self.le is not None else None]
        return f"{kind} " + " and ".join(b for b in bounds if b)


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


POSITIVE = Range(gt=0)
NON_NEGATIVE = Range(ge=0)
AT_LEAST_ONE = Range(ge=1)

PositiveFloat = Annotated[float, POSITIVE]
NonNegativeFloat = Annotated[float, NON_NEGATIVE]
PositiveInt = Annotated[int, AT_LEAST_ONE]
NonNegativeInt = Annotated[int, NON_NEGATIVE]
UNIT_OPEN = Range(gt=0, lt=1)
UnitInterval = Annotated[float, UNIT_OPEN]
"""A number strictly between 0 and 1 (a threshold or a fraction that must leave both sides)."""


__all__ = ["AT_LEAST_ONE", "NON_NEGATIVE", "NonNegativeFloat", "NonNegativeInt", "POSITIVE", "PositiveFloat",
           "PositiveInt", "Range", "UNIT_OPEN", "UnitInterval"]
