"""Frozen teachers: one no-optimizer DeepSpeed engine each (or a plain replica, or an offline cache),
run in a fixed order.

Collective discipline: :meth:`TeacherPool.run` is called by every rank for every micro-batch and
every teacher, in the recipe's order, exactly once. Nothing here branches on rank, so the ZeRO-3
parameter gathers line up across ranks. A cached teacher (``source: cache``) runs no forward and
no collective, the same on every rank.

Two live paths give the same results: the hidden-state path (``chunked_logits``, the default)
applies the output layer to the needed rows only, a chunk at a time (:mod:`mlot_ds.teachers.chunked`,
:mod:`mlot_ds.losses.head`); the full-logits path materialises the ``[B, T, V]`` logits first.

A method that reads more than logits (``teacher_features``) gets them captured by forward hooks
during the same forward (:mod:`mlot_ds.teachers.features`); a teacher's output-layer weight is handed
to the method once (``bind_teacher_constants``) as a :class:`~mlot_ds.teachers.features.PartitionedWeight`
it gathers only while it uses it. Without features nothing is hooked.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import deepspeed
import torch

from mlot_ds.config import TeacherConfig
from mlot_ds.losses.method import OUTPUT_WEIGHT, LogitSource, Method, TeacherOutput, TeacherView
from mlot_ds.teachers import chunked
from mlot_ds.teachers.features import FeatureCapture, PartitionedWeight, check_captured
from mlot_ds.teachers.loading import load_causal_lm, resolve_dtype, teacher_ds_config


@dataclass
class Teacher:
    name: str
    config: TeacherConfig
    module: torch.nn.Module | None
    """A DeepSpeed inference engine (``shard``/``offload``), the model itself (``replicate``), or
    ``None`` for a cached teacher."""
    model_path: str
    hidden_path: bool = False
    """Apply the output layer in chunks to the needed rows (see :mod:`mlot_ds.teachers.chunked`)."""
    cache: object = None
    """A :class:`mlot_ds.teachers.cache.TeacherCache` when ``source: cache``."""


class TeacherPool:
    """The teachers of a run, loaded partitioned and frozen."""

    def __init__(self, teachers: list[Teacher], device: torch.device):
        self.teachers = teachers
        self.device = device

    @classmethod
    def load(cls, configs: list[TeacherConfig], model_paths: list[str], student_ds_config: dict,
             micro_batch_size: int, device: torch.device, caches: dict | None = None,
             methods: dict | None = None) -> "TeacherPool":
        """Load the live teachers; ``caches`` maps each ``source: cache`` teacher's name to its opened cache.

        ``methods`` (teacher name -> method, or a list of methods per name) receive the run constants
        their ``teacher_features`` name, from each live teacher right after it is loaded (collective).
        """

        bf16 = bool(student_ds_config.get("bf16", {}).get("enabled", False))
        teachers = []
        for index, (config, path) in enumerate(zip(configs, model_paths)):
            where = f"teachers[{index}] ({config.name})"
            if config.source == "cache":
                teachers.append(Teacher(config.name, config, None, str(path), cache=(caches or {})[config.name]))
                continue
            dtype = resolve_dtype(config.dtype, bf16)
            if config.placement == "replicate":
                model = load_causal_lm(path, dtype=dtype, trust_remote_code=config.trust_remote_code,
                                       ds_config=None, where=where)
                module = model.to(device)
            else:
                ds_config = teacher_ds_config(student_ds_config, config.placement, micro_batch_size)
                model = load_causal_lm(path, dtype=dtype, trust_remote_code=config.trust_remote_code,
                                       ds_config=ds_config, where=where)
                module, *_ = deepspeed.initialize(model=model, config=ds_config)
            module.eval()
            for parameter in module.parameters():
                parameter.requires_grad_(False)
            reason = chunked.unsupported_reason(chunked.inner_model(module)) if config.chunked_logits else None
            if reason is not None:
                warnings.warn(f"{where}: chunked_logits falls back to full logits: {reason}", stacklevel=2)
            teachers.append(Teacher(config.name, config, module, str(path),
                                    hidden_path=config.chunked_logits and reason is None))
            bind_constants(module, _as_list((methods or {}).get(config.name)))
        return cls(teachers, device)

    def __iter__(self):
        return iter(self.teachers)

    def __len__(self) -> int:
        return len(self.teachers)

    @torch.no_grad()
    def _forward(self, teacher: Teacher, inputs, reduce, features: frozenset[str]):
        """One forward of ``teacher``: ``reduce(source)`` on its logits source, with ``features`` captured."""
        with FeatureCapture(teacher.module, _forward_features(features)) as capture:
            if teacher.hidden_path:
                return chunked.reduce_with_output_layer(
                    teacher.module, inputs.input_ids.to(self.device), inputs.attention_mask.to(self.device),
                    lambda hidden, weight, bias: reduce(LogitSource(
                        hidden=hidden, weight=weight, bias=bias, features=check_captured(capture, teacher.name))))
            logits = self.logits(teacher, inputs.input_ids, inputs.attention_mask)
            try:
                return reduce(LogitSource(logits=logits, features=check_captured(capture, teacher.name)))
            finally:
                del logits

    @torch.no_grad()
    def logits(self, teacher: Teacher, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """One teacher's logits ``[B, T, m]``."""
        output = teacher.module(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
                                use_cache=False)
        return output.logits

    @torch.no_grad()
    def run(self, teacher: Teacher, view: TeacherView, method: Method, *, gold: bool, record_ids=None) -> TeacherOutput:
        """One teacher's contribution to a micro-batch: what its method keeps of the logits, and
        (``gold``) its cross-entropy on the gold response per sequence, for dynamic weights.

        Args:
            view: the micro-batch as the method sees it (pairing, both sides' tensors).
            record_ids: ``[B]`` record ids (``-1`` = filler); needed by a cached teacher.

        No ``[B, T, V]`` tensor outlives this call.
        """
        inputs = view.teacher
        if teacher.cache is not None:
            return teacher.cache.read(record_ids, view, method, self.device)
        features = method.teacher_features()
        if features:
            return self._forward(teacher, inputs, lambda source: method.teacher(source, view, gold), features)
        if teacher.hidden_path:
            return chunked.reduce_with_output_layer(
                teacher.module, inputs.input_ids.to(self.device), inputs.attention_mask.to(self.device),
                lambda hidden, weight, bias: method.teacher(LogitSource(hidden=hidden, weight=weight, bias=bias),
                                                            view, gold))
        logits = self.logits(teacher, inputs.input_ids, inputs.attention_mask)
        output = method.teacher(LogitSource(logits=logits), view, gold)
        del logits
        return output

    @torch.no_grad()
    def run_shared(self, teacher: Teacher, items: list[tuple[TeacherView, Method]], *, gold: bool) -> list[TeacherOutput]:
        """One forward of ``teacher`` serving several methods (``items``: each with its own view of the
        same teacher inputs), e.g. to build the caches of several losses of one teacher model at once."""
        inputs = items[0][0].teacher
        features = frozenset().union(*(method.teacher_features() for _, method in items))
        if features:
            return self._forward(teacher, inputs, lambda source: [method.teacher(source, view, gold)
                                                                  for view, method in items], features)
        if teacher.hidden_path:
            return chunked.reduce_with_output_layer(
                teacher.module, inputs.input_ids.to(self.device), inputs.attention_mask.to(self.device),
                lambda hidden, weight, bias: [method.teacher(LogitSource(hidden=hidden, weight=weight, bias=bias),
                                                             view, gold) for view, method in items])
        logits = self.logits(teacher, inputs.input_ids, inputs.attention_mask)
        outputs = [method.teacher(LogitSource(logits=logits), view, gold) for view, method in items]
        del logits
        return outputs


def _as_list(methods) -> list:
    if methods is None:
        return []
    return list(methods) if isinstance(methods, (list, tuple)) else [methods]


def bind_constants(module: torch.nn.Module, methods: list) -> None:
    """Hand each method the teacher's run constants it names (``output_weight``, gathered on use)."""
    for method in methods:
        if OUTPUT_WEIGHT in method.teacher_features():
            method.bind_teacher_constants({OUTPUT_WEIGHT: PartitionedWeight(module)})


def _forward_features(features: frozenset[str]) -> frozenset[str]:
    """What the hooks capture per forward: everything but the run constants."""
    return frozenset(features) - {OUTPUT_WEIGHT}

