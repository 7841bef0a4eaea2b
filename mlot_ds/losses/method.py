"""The one interface every distillation method implements, and what the engine hands it.

A method is one file in ``losses/``: pure tensor functions plus one small class with this shape
(``MultiLevelOT`` in ``mlot.py`` is the model). The engine, the offline cache and the recipe ask
the class; none of them switches on a method's name. Per teacher and micro-batch, on every rank::

    view    = TeacherView(pairing, student, teacher, groups, overlaps)   # from the data pipeline
    out     = method.teacher(LogitSource(...), view, gold=...)   # right after the teacher forward
    counts  = method.counts(out.reduced, view)                   # summed over ranks and steps
    terms   = method.student(student_logits, out.reduced, view, ce_labels)   # sums, with grad
    KD      = sum_t weights[t] * terms[t] / global counts[method.denominator]

What a class declares:

- ``name``: the recipe's ``loss.kind``; ``Params``: a frozen dataclass of its typed
  hyper-parameters with the paper's defaults (the recipe validates ``loss.<param>`` against it);
  ``terms`` and ``default_weights(params)``: its loss terms and their multipliers (the recipe's
  ``loss.weights`` replaces them one by one); ``denominator``: the count key its sums are divided by
  (``term_denominator(term)`` may name another count for one term).
- ``pairings``: the pairing rules it works with (``None`` = any); ``needs``: the extra alignment
  views it reads (``"groups"``, ``"overlaps"``), the token surfaces (``"surfaces"``) and the two
  models' sizes (``"dims"``, in the :class:`MethodContext`); ``cacheable``: whether its teacher side can be
  stored per record by ``tools/cache_teachers.py``; ``fuses_ce``: whether :meth:`student` can also
  return the student's CE sum from the same pass over the logits.
- ``teacher(source, view, gold)``: what the loss keeps of the teacher's logits (never the
  ``[B, T, V]`` tensor), from full logits or from the hidden states and the output layer.
- ``counts(reduced, view)``: this micro-batch's denominators, known before the student forward.
- ``student(logits, reduced, view, ce_labels)``: the term sums (and ``"ce"`` when asked and fused).
- ``cache_rows(view)``, ``to_cache(reduced, view)``, ``from_cache(records, rows, view)`` and
  ``cache_settings()``: the offline cache's per-record and per-row arrays and binding.

Optional, for methods that align hidden states through small trainable modules (all empty by default,
and then the engine changes nothing):

- ``teacher_features()`` / ``student_features()``: what the engine captures beside the logits, by
  forward hooks on the named modules (:data:`FEATURES`): the final hidden states, the input embeddings,
  one layer's output, one layer's head-averaged attention, the output layer's weight. The teacher's
  reach :meth:`teacher` as ``LogitSource.features``; the student's reach :meth:`student` as
  ``TeacherView.features`` (captured during the student's own forward, with their gradients).
  The teacher's output-layer weight is frozen and handed over once by :meth:`bind_teacher_constants`
  as a :class:`FrozenWeight`, read inside ``with weight.gathered() as w`` (under ZeRO-3 an all-gather
  there and a release after it: every rank, same order; stored once in the offline cache).
- ``module_specs()``: the trainable linear maps it needs (:class:`LinearSpec`: sizes from
  ``MethodContext.student_dims`` / ``teacher_dims``, initialisation, learning rate). The engine builds
  them inside the student's DeepSpeed engine (ZeRO-3 partitioned, their own optimizer group, saved in
  its checkpoints, left out of the exported student) and hands them over by :meth:`attach_modules`;
  :meth:`student` calls them (every micro-batch, on every rank, each module once, in a fixed order).

Nothing here imports DeepSpeed, transformers, logging or the recipe.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, NamedTuple

import torch
import torch.nn.functional as F

from mlot_ds.losses.ce import ce_per_sequence
from mlot_ds.losses.head import (
    ce_per_sequence_from_hidden,
    head_chunk_rows,
    rows_logits,
)
from mlot_ds.pairing import ModelBatch, Pairing

EMBEDDINGS = "embeddings"
"""Feature: the input embedding layer's output ``[B, T, E]`` (the token embeddings, before any scaling
or positions the model adds); the embedding of the next token at row ``t`` is the one at ``t + 1``."""
HIDDEN = "hidden"
"""Feature: the final hidden states ``[B, T, H]``, the output layer's input."""
OUTPUT_WEIGHT = "output_weight"
"""Feature: the output layer's weight ``[V, H]``: the student's as a detached copy made in each forward; the
teacher's as a :class:`FrozenWeight` handed over once (:meth:`Method.bind_teacher_constants`)."""


def layer_output(layer: int) -> str:
    """Feature: decoder layer ``layer``'s output hidden states ``[B, T, H]`` (negative counts from the end)."""
    return f"layer@{int(layer)}"


def attention(layer: int) -> str:
    """Feature: decoder layer ``layer``'s attention, averaged over heads, ``[B, T, T]`` float32
    (row ``t``: how position ``t`` attends to every position; padding columns 0)."""
    return f"attention@{int(layer)}"


FEATURES = (EMBEDDINGS, HIDDEN, OUTPUT_WEIGHT, "layer@<L>", "attention@<L>")


class TeacherView(NamedTuple):
    """Everything a method may read about one teacher and the student in one micro-batch.

    Attributes:
        pairing: the teacher's pairing rule's pairs (logit rows; see :class:`~mlot_ds.pairing.Pairing`).
        student, teacher: each side's tensors.
        groups: ``needs`` has ``"groups"``: per pair, the exclusive end rows ``(student_stop [B, P],
            teacher_stop [B, P])`` of its offsets group (the group's tokens are predicted by the rows
            ``index .. stop - 1``); 1:1 rules give ``index + 1``.
        overlaps: ``needs`` has ``"overlaps"``: per student response token ``i`` (``[B, Ns]``, in
            order, padded), the teacher response tokens ``lo[b, i] .. hi[b, i] - 1`` whose bytes
            overlap its bytes (``lo == hi``: none), and a ``mask``.
    """

    pairing: Pairing
    student: ModelBatch
    teacher: ModelBatch
    groups: tuple[torch.Tensor, torch.Tensor] | None = None
    overlaps: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    features: dict[str, torch.Tensor] | None = None
    """At :meth:`Method.student` time: the student's features of this micro-batch (``student_features``),
    captured during its forward, with their gradients; ``None`` when the method asks for none."""


class TeacherOutput(NamedTuple):
    """``reduced``: what :meth:`student` needs; ``gold``: the teacher's gold-response CE per sequence,
    ``{"ce": [B], "tokens": [B]}``, when it was asked for (``None`` otherwise)."""

    reduced: Any
    gold: dict[str, torch.Tensor] | None


@dataclass
class LogitSource:
    """A frozen teacher's logits, either whole (``logits [B, T, V]``) or as the final hidden states
    ``hidden [B, T, H]`` and the output layer ``weight [V, H]``, ``bias [V]`` (chunked path: the
    logits of the rows a method needs are computed a block at a time and never kept whole).
    """

    logits: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    head_chunk_elements: int | None = None
    features: dict[str, torch.Tensor] | None = None
    """The teacher's features of this forward that the method asked for (``teacher_features``)."""

    def __post_init__(self):
        if (self.logits is None) == (self.hidden is None):
            raise ValueError("LogitSource takes either logits or hidden + weight")
        if self.hidden is not None and self.weight is None:
            raise ValueError("LogitSource: hidden states need the output layer's weight")

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(B, T, V)``."""
        if self.logits is not None:
            return tuple(self.logits.shape)
        return (*self.hidden.shape[:2], self.weight.shape[0])

    @property
    def device(self) -> torch.device:
        return (self.logits if self.logits is not None else self.hidden).device

    @property
    def dtype(self) -> torch.dtype:
        return self.logits.dtype if self.logits is not None else self.weight.dtype

    def read(self, flat_rows: torch.Tensor) -> torch.Tensor:
        """Logits ``[r, V]`` of the flat rows ``b * T + t`` (in the source's dtype)."""
        batch, seq_len, vocab = self.shape
        if self.logits is not None:
            return self.logits.reshape(batch * seq_len, vocab).index_select(0, flat_rows)
        hidden2d = self.hidden.reshape(batch * seq_len, -1)
        with torch.no_grad():
            return F.linear(hidden2d.index_select(0, flat_rows), self.weight, self.bias)

    def rows_per_block(self) -> int:
        """How many rows :meth:`read` should be asked for at a time (about ``head_chunk_elements`` logits)."""
        return head_chunk_rows(self.shape[2], self.head_chunk_elements, self.device)

    def gold_ce(self, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The teacher's CE on its gold labels per sequence, ``{"ce": [B], "tokens": [B]}`` float32."""
        if self.logits is not None:
            return ce_per_sequence(self.logits, labels)
        return ce_per_sequence_from_hidden(self.hidden, self.weight, self.bias, labels,
                                           head_chunk_elements=self.head_chunk_elements)


@dataclass(frozen=True)
class NoParams:
    """A method without hyper-parameters."""


class FrozenWeight:
    """A frozen teacher's output-layer weight ``[V, H]``, read on demand: ``with weight.gathered() as w``.

    This one holds the tensor (a replicated teacher, or the offline cache's copy); the engine's
    ZeRO-3 teachers gather their partitions inside the block and release them after it, so the
    weight is whole only while a method uses it.
    """

    def __init__(self, tensor: torch.Tensor | None = None):
        self.tensor = tensor

    @contextmanager
    def gathered(self):
        yield self.tensor


class ModelDims(NamedTuple):
    """One model's sizes, read from its modules (not from config names, which differ per architecture).

    Attributes:
        hidden: the output layer's input size (the final hidden state).
        embedding: the input embedding's size.
        vocab: the output layer's rows.
        layers: the number of decoder layers.
    """

    hidden: int
    embedding: int
    vocab: int
    layers: int


@dataclass(frozen=True)
class LinearSpec:
    """A trainable linear map ``y = x W^T + b`` a method declares (``W [out, in]``).

    Attributes:
        in_features, out_features: its sizes (from the two models' :class:`ModelDims`).
        bias: with a bias.
        init: ``uniform``: PyTorch's ``nn.Linear`` default, ``W, b ~ U(-1/sqrt(in), 1/sqrt(in))``;
            ``lecun_normal``: Flax's ``Dense`` default, ``W ~ N(0, 1/in)`` truncated at 2 standard
            deviations (rescaled to keep the variance), ``b = 0``.
        lr: its learning rate (``None``: ``lr_scale * train.lr``); it follows the student's schedule,
            scaled by ``lr / train.lr``.
        lr_scale: used when ``lr`` is ``None``.
    """

    in_features: int
    out_features: int
    bias: bool = True
    init: Literal["uniform", "lecun_normal"] = "uniform"
    lr: float | None = None
    lr_scale: float = 1.0

    def learning_rate(self, base_lr: float) -> float:
        return float(self.lr) if self.lr is not None else float(self.lr_scale) * float(base_lr)


@dataclass(frozen=True)
class MethodContext:
    """What a method may need beyond tensors, fixed for a run (built by the engine).

    Attributes:
        student_to_teacher: MinED's static vocabulary map ``[n]`` (``dtw`` pairing), else ``None``.
        student_surfaces, teacher_surfaces: each token id's surface bytes (``None`` for special
            tokens; see :func:`mlot_ds.pairing.surface.token_surface_bytes`), for methods that
            compare token strings or need word-boundary masks.
        student_vocab, teacher_vocab: the models' output sizes (embedding rows).
        same_tokenizer: both sides use one tokenizer (fingerprints equal).
        student_dims, teacher_dims: the models' sizes (:class:`ModelDims`) when ``"dims" in needs``.
    """

    student_to_teacher: torch.Tensor | None = None
    student_surfaces: tuple | None = None
    teacher_surfaces: tuple | None = None
    student_vocab: int | None = None
    teacher_vocab: int | None = None
    same_tokenizer: bool = False
    student_dims: ModelDims | None = None
    teacher_dims: ModelDims | None = None


class Method:
    """Defaults shared by every method class; see the module docstring for the interface."""

    name: ClassVar[str]
    Params: ClassVar[type] = NoParams
    terms: ClassVar[tuple[str, ...]]
    denominator: ClassVar[str] = "pairs"
    pairings: ClassVar[tuple[str, ...] | None] = None
    needs: ClassVar[frozenset[str]] = frozenset()
    cacheable: ClassVar[bool] = True
    fuses_ce: ClassVar[bool] = False
    description: ClassVar[str] = ""

    def __init__(self, params=None, weights: dict[str, float] | None = None, context: MethodContext = MethodContext()):
        self.params = params if params is not None else self.Params()
        self.context = context
        self.term_weights = dict(self.default_weights(self.params))
        self.term_weights.update({term: float(value) for term, value in (weights or {}).items()})
        self.trainable: dict[str, torch.nn.Module] = {}
        self.teacher_constants: dict[str, FrozenWeight] = {}

    @classmethod
    def default_weights(cls, params) -> dict[str, float]:
        return {term: 1.0 for term in cls.terms}

    @classmethod
    def needs_for(cls, params) -> frozenset[str]:
        """``needs`` with these hyper-parameters (a method may need more when an option is on)."""
        return cls.needs

    @classmethod
    def check(cls, params, context: MethodContext) -> None:
        """Raise ``ValueError`` for settings this method cannot run with (the recipe names the field)."""

    @classmethod
    def cache_problem(cls, params) -> str | None:
        """Why ``source: cache`` cannot serve this method with these settings (``None``: it can)."""
        return None if cls.cacheable else f"loss {cls.name!r} has no offline cache"

    # The engine calls these four.
    def teacher(self, source: LogitSource, view: TeacherView, gold: bool) -> TeacherOutput:
        raise NotImplementedError

    def counts(self, reduced, view: TeacherView) -> dict[str, float]:
        return {"pairs": float(view.pairing.mask.sum())}

    def student(self, logits: torch.Tensor, reduced, view: TeacherView, ce_labels=None) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def term_denominator(self, term: str) -> str:
        """The count key ``term`` is divided by (``denominator`` unless a method says otherwise)."""
        return self.denominator

    # Hidden states and trainable modules (empty by default: the engine then adds nothing).
    def teacher_features(self) -> frozenset[str]:
        """The teacher features :meth:`teacher` reads from ``source.features`` (see :data:`FEATURES`)."""
        return frozenset()

    def student_features(self) -> frozenset[str]:
        """The student features :meth:`student` reads from ``view.features``."""
        return frozenset()

    def module_specs(self) -> dict[str, LinearSpec]:
        """The trainable modules this method needs, by name (built once per run by the engine)."""
        return {}

    def attach_modules(self, modules) -> None:
        """The engine's modules of :meth:`module_specs` (``name -> nn.Module``), before the first step."""
        self.trainable = dict(modules)

    def bind_teacher_constants(self, constants: dict[str, FrozenWeight]) -> None:
        """The frozen teacher's run constants (``output_weight``: a :class:`FrozenWeight`), once per run."""
        self.teacher_constants = dict(constants)

    # The offline cache calls these.
    def cache_settings(self) -> dict:
        """What decides the cached content (bound into the cache's manifest)."""
        return {"kind": self.name, "params": dataclasses.asdict(self.params)}

    def cache_rows(self, view: TeacherView) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher rows whose per-row arrays :meth:`to_cache` returns: ``(index [B, P], mask [B, P])``."""
        return view.pairing.teacher_index, view.pairing.mask

    def to_cache(self, reduced, view: TeacherView) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """``(per_record, per_row)``: arrays ``[B, ...]`` and ``[B, P, ...]`` (``P`` as :meth:`cache_rows`)."""
        raise NotImplementedError(f"loss {self.name!r} has no offline cache")

    def from_cache(self, records: dict[str, torch.Tensor], rows: dict[str, torch.Tensor], view: TeacherView):
        """The ``reduced`` of :meth:`teacher` from cached arrays (shapes as :meth:`to_cache`)."""
        raise NotImplementedError(f"loss {self.name!r} has no offline cache")


def gold_if(source: LogitSource, labels: torch.Tensor, gold: bool) -> dict[str, torch.Tensor] | None:
    """The teacher's gold CE when asked for (for methods that do not compute it in their own pass)."""
    return source.gold_ce(labels) if gold else None


def compact_pairing(pairing: Pairing) -> Pairing:
    """The pairing against a ``[B, P, ...]`` tensor of gathered teacher rows: teacher index = column."""
    columns = torch.arange(pairing.mask.shape[1], device=pairing.mask.device).unsqueeze(0).expand_as(pairing.mask)
    return Pairing(pairing.student_index, columns, pairing.mask)


def gather_rows(source: LogitSource, index: torch.Tensor, columns: torch.Tensor | None = None) -> torch.Tensor:
    """Teacher logits ``[B, P, V]`` (or ``[B, P, C]`` at ``columns``) at rows ``index [B, P]`` of each sequence."""
    if source.logits is not None:
        logits = source.logits
        if columns is None:
            return torch.gather(logits, 1, index.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
        sequence = torch.arange(index.shape[0], device=logits.device).view(-1, 1, 1)
        return logits[sequence, index.unsqueeze(2), columns.view(1, 1, -1)]

    return rows_logits(source.hidden, source.weight, source.bias, index, columns)


__all__ = ["EMBEDDINGS", "FEATURES", "FrozenWeight", "HIDDEN", "LinearSpec", "LogitSource", "Method", "MethodContext",
           "ModelDims", "NoParams", "OUTPUT_WEIGHT", "TeacherOutput", "TeacherView", "attention", "compact_pairing",
           "gather_rows", "gold_if", "layer_output"]
