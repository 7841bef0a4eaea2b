"""Memory per rank of one training step: every term, in the phase where it is alive, and the peak.

A step (``Trainer.train_step``) runs in three kinds of phases, in this order on every rank:

1. ``teacher:<name>``: each live teacher's forward and reduction, for every micro-batch of the step
   (the outputs are kept until the step ends);
2. ``student``: the student's forward, its losses and its backward;
3. ``step``: the optimizer step.

Memory at a phase = what is always there (partitions, optimizer states, the gradient bucket,
replicated teachers, persistent parameters) + what that phase holds at its worst moment. The peak
is the largest phase; the dominant term is the largest item of that phase. All figures are per
rank: ZeRO-3 partitions are equal on every rank (up to padding), so every rank has the same plan.

The student (``P`` parameters, ``b`` bytes per element, ``N`` ranks, ``P/N`` a partition)::

    parameters       b P/N      (host with offload_param)
    fp32 master      4 P/N      (shared with the parameters in float32; host with offload_optimizer)
    Adam moments     8 P/N      (host with offload_optimizer)
    gradients        g P/N      (g = grad_accum_dtype, default b; host with offload_optimizer)
    gradient bucket  b x reduce_bucket_size   (allocated once, contiguous_gradients)
    step             4 P/N (+ g P/N while converting) float32 gradients of the sub-group being stepped

DeepSpeed's own estimator (``estimate_zero3_model_states_mem_needs``) counts ``18 P/N``: the same
``2 + 4 + 8`` and a float32 gradient (``4``); it leaves out the bf16 gradient partition that ZeRO-3
keeps between steps (``2 P/N``) and the bucket. ``tests/test_plan.py`` checks the two agree on that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from mlot_ds.losses.head import head_chunk_rows
from mlot_ds.plan import activations, methods, zero3
from mlot_ds.plan.activations import Tokens
from mlot_ds.plan.model_shapes import ModelShape
from mlot_ds.plan.zero3 import ZeroSettings

FLOAT32 = 4
ADAM_LIKE = ("adam", "adamw", "fusedadam", "cpuadam", "lamb", "onebitadam", "onebitlamb", "zerooneadam")


@dataclass(frozen=True)
class Platform:
    """What differs between a GPU and this CPU, each a measured mechanism (docs/PLANNING.md).

    Attributes:
        device: ``"cuda"`` or ``"cpu"`` (the chunked output layer's block size depends on it).
        gather_copy: the all-gather holds one more copy of the buffer it fills while it runs (gloo on
            the CPU; NCCL gathers in place).
        step_temporaries: bytes per stepped element the optimizer allocates beyond its states.
        bf16_auto: what ``bf16.enabled: auto`` resolves to.
        written_only: memory counts once written (the CPU's resident set: an ``empty`` buffer costs
            nothing until used); a GPU's allocator counts a buffer whole from its allocation.
    """

    device: str
    gather_copy: bool
    step_temporaries: int
    bf16_auto: bool
    written_only: bool


CUDA = Platform("cuda", gather_copy=False, step_temporaries=0, bf16_auto=True, written_only=False)
CPU = Platform("cpu", gather_copy=True, step_temporaries=0, bf16_auto=False, written_only=True)


@dataclass(frozen=True)
class StudentSpec:
    shape: ModelShape
    dtype_bytes: int
    checkpointing: bool = False


@dataclass(frozen=True)
class TeacherSpec:
    """One teacher as the step sees it (``kind``/``params``/``method_class``: its ``loss``)."""

    name: str
    shape: ModelShape
    dtype_bytes: int
    placement: str
    source: str
    chunked: bool
    kind: str
    params: object
    method_class: type
    seq_len: int
    pairs: int | None = None
    """Paired rows per sequence for this teacher (``None``: the job's ``pairs``)."""
    padded: bool | None = None
    """Its batches take a padding mask (``None``: the job's ``padded``)."""


@dataclass(frozen=True)
class Job:
    """One training step's shapes: ``pairs`` = paired (labelled) rows per sequence, ``padded``: the
    attention needs a padding mask. ``dynamic`` weighting adds the teachers' gold CE (small)."""

    student: StudentSpec
    teachers: tuple[TeacherSpec, ...]
    micro_batch: int
    grad_accum: int
    seq_len: int
    pairs: int
    padded: bool
    zero: ZeroSettings
    world: int
    labelled: int | None = None
    """The student's labelled rows per micro-batch, for CE (``None``: ``micro_batch * pairs``)."""


@dataclass(frozen=True)
class Item:
    label: str
    bytes: int
    where: str = "device"
    owner: str = "student"


@dataclass
class MemoryPlan:
    """Per rank: ``always`` items, and each phase's own items (in step order). ``unified``: the device
    is the host (CPU ranks), so host items count in every total as well."""

    always: list[Item]
    phases: dict[str, list[Item]]
    notes: list[str] = field(default_factory=list)
    unified: bool = False

    def _counts(self, item: Item) -> bool:
        return item.where == "device" or self.unified

    def device_always(self) -> int:
        return sum(i.bytes for i in self.always if self._counts(i))

    def phase_total(self, phase: str) -> int:
        return self.device_always() + sum(i.bytes for i in self.phases[phase] if self._counts(i))

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phase_total)

    @property
    def peak(self) -> int:
        return self.phase_total(self.peak_phase)

    def peak_items(self) -> list[Item]:
        """Every device item alive at the peak, largest first."""
        items = [i for i in self.always + self.phases[self.peak_phase] if self._counts(i)]
        return sorted(items, key=lambda i: -i.bytes)

    @property
    def dominant(self) -> Item:
        return self.peak_items()[0]

    @property
    def host(self) -> int:
        """Host memory this rank pins or holds for offloaded partitions (not its process overhead)."""
        return sum(i.bytes for i in self.always if i.where == "host") + max(
            (sum(i.bytes for i in items if i.where == "host") for items in self.phases.values()), default=0)


def partition(shape: ModelShape, world: int) -> int:
    """Elements of one rank's ZeRO-3 partition: every parameter split in ``world`` (rounded up)."""
    unique = {p.key: p.numel for m in shape.modules for p in m.params}
    return sum(math.ceil(numel / world) for numel in unique.values())


def plan_memory(job: Job, platform: Platform) -> MemoryPlan:
    """The :class:`MemoryPlan` of one step of ``job`` on ``platform``."""
    always, notes = _student_states(job, platform), []
    kept = _kept_per_micro_batch(job, platform, notes)
    phases: dict[str, list[Item]] = {}
    earlier = 0
    for teacher in job.teachers:
        always += _teacher_states(teacher, job, platform)
        if teacher.source == "cache":
            earlier += kept[teacher.name]
            continue
        held = (job.grad_accum - 1) * sum(kept.values()) + earlier
        phases[f"teacher:{teacher.name}"] = _teacher_phase(teacher, job, platform) + (
            [Item("teacher outputs kept so far (this step)", held, owner="teachers")] if held else [])
        earlier += kept[teacher.name]
    all_kept = job.grad_accum * sum(kept.values())
    kept_item = [Item(f"teacher outputs kept for the student (x {job.grad_accum} micro-batches)", all_kept,
                      owner="teachers")] if all_kept else []
    phases["student"] = _student_phase(job, platform) + kept_item
    phases["step"] = _step_phase(job, platform) + kept_item
    always.append(Item("micro-batches (ids, masks, labels, pairings)", _batch_bytes(job), owner="data"))
    return MemoryPlan(always, phases, notes, unified=platform.device == "cpu")


# ---------------------------------------------------------------------------------------------
# The student


def _student_states(job: Job, platform: Platform) -> list[Item]:
    shape, b, zero = job.student.shape, job.student.dtype_bytes, job.zero
    part = partition(shape, job.world)
    grad_bytes = zero.grad_accum_dtype_bytes or b
    optimizer_where = "host" if zero.offload_optimizer else "device"
    moments = 8 if zero.optimizer in ADAM_LIKE else 4
    items = [Item("student parameters (ZeRO-3 partition)", b * part, "host" if zero.offload_param else "device"),
             Item("student gradients (partition)", grad_bytes * part, optimizer_where)]
    if zero.offload_optimizer or b != FLOAT32:
        items.append(Item("student fp32 master weights (partition)", FLOAT32 * part, optimizer_where))
    items.append(Item(f"student optimizer states ({zero.optimizer}, partition)", moments * part, optimizer_where))
    if zero.offload_optimizer:
        items.append(Item("student fp32 gradient buffer for the CPU optimizer", FLOAT32 * part, "host"))
    if zero.contiguous_gradients:
        # Filled with the backward's gradients up to its size, then reduced; on the CPU only that part is resident.
        used = min(zero.reduce_bucket_size, shape.params) if platform.written_only else zero.reduce_bucket_size
        items.append(Item("student gradient bucket (reduce_bucket_size)", b * used))
    persistent = shape.persistent_params(zero.param_persistence_threshold)
    if persistent and job.world > 1:
        items.append(Item("student persistent parameters (below the persistence threshold)", b * persistent))
    return items


def _student_phase(job: Job, platform: Platform) -> list[Item]:
    student, b = job.student, job.student.dtype_bytes
    shape = student.shape
    tokens = Tokens(job.micro_batch, job.seq_len, job.padded)
    gather = zero3.gathered_peak(shape, zero3.training_trace(shape, student.checkpointing), job.zero, job.world)
    items = [Item("student activations" + (" (gradient checkpointing)" if student.checkpointing else ""),
                  activations.training_activations(shape, tokens, b, student.checkpointing))]
    logits = tokens.count * shape.vocab * b
    items.append(Item("student logits [B, T, V]", logits))
    fused = any(methods.fuses_ce(t.kind, t.params, t.method_class) for t in job.teachers)
    contributions = len(job.teachers) + (0 if fused else 1)
    if contributions:
        # Each loss's backward writes a gradient of the logits' size; autograd sums the second into the first
        # out of place, so three are alive while it adds (measured: plain torch, 1 vs 2 vs 4 MultiLevelOT teachers).
        copies = 1 if contributions == 1 else 3
        items.append(Item(f"student logits gradients ({copies} x [B, T, V] while autograd sums {contributions})",
                          copies * logits))
    if not fused:
        labelled = (job.labelled or job.micro_batch * job.pairs) * shape.vocab
        items.append(Item("CE (no method fuses it): float32 log-softmax of the labelled rows and its gradient",
                          2 * FLOAT32 * labelled))
    extra = sum(_method(t, job, platform).student_transient for t in job.teachers)
    if extra:
        items.append(Item("student side of the losses (sorted / softmaxed paired rows)", extra))
    if gather.gathered:
        items.append(Item("student parameters gathered (current, prefetched, kept for reuse)", b * gather.gathered))
    if platform.gather_copy and gather.largest_fetch:
        items.append(Item("the all-gather's own copy of the largest gathered buffer", b * gather.largest_fetch))
    items.append(Item("student full gradient of the largest module (before it is reduced)", b * shape.largest_module))
    return items


def _step_phase(job: Job, platform: Platform) -> list[Item]:
    """The optimizer step (``DeepSpeedZeroOptimizer_Stage3.step``): first the gradient norm, one
    parameter at a time in float64 (a copy of that parameter's gradient partition), then per
    sub-group its gradients flattened to float32 and stepped; the last micro-batch's logits are still
    referenced by the training loop meanwhile."""
    zero, b, shape = job.zero, job.student.dtype_bytes, job.student.shape
    tokens = job.micro_batch * job.seq_len
    items = [Item("student logits of the last micro-batch (still referenced)", tokens * shape.vocab * b)]
    if zero.offload_optimizer:
        return items + [Item("optimizer step on the CPU (device: nothing beyond the states)", 0)]
    stepped = min(partition(shape, job.world), zero.sub_group_size)
    grad_bytes = zero.grad_accum_dtype_bytes or b
    converting = grad_bytes if grad_bytes != FLOAT32 else 0
    largest = max(p.numel for m in shape.modules for p in m.params)
    norm_copy = 8 * math.ceil(largest / job.world)
    flat = (FLOAT32 + converting) * stepped
    items.append(Item("optimizer step: float32 gradients of the sub-group (or, before, the float64 norm copy)",
                      max(flat, norm_copy)))
    if platform.step_temporaries:
        items.append(Item("optimizer step temporaries", platform.step_temporaries * stepped))
    return items


# ---------------------------------------------------------------------------------------------
# The teachers


def _teacher_states(teacher: TeacherSpec, job: Job, platform: Platform) -> list[Item]:
    if teacher.source == "cache":
        return []
    shape, b = teacher.shape, teacher.dtype_bytes
    label = f"teacher {teacher.name}"
    if teacher.placement == "replicate":
        return [Item(f"{label} parameters (full copy)", b * shape.params, owner=teacher.name)]
    where = "host" if teacher.placement == "offload" else "device"
    items = [Item(f"{label} parameters (ZeRO-3 partition{', on the host' if where == 'host' else ''})",
                  b * partition(shape, job.world), where, teacher.name)]
    persistent = shape.persistent_params(job.zero.param_persistence_threshold)
    if persistent and job.world > 1:
        items.append(Item(f"{label} persistent parameters", b * persistent, owner=teacher.name))
    return items


def _method(teacher: TeacherSpec, job: Job, platform: Platform) -> methods.MethodMemory:
    rows = head_chunk_rows(teacher.shape.vocab, None, torch.device(platform.device))
    return methods.method_memory(teacher.kind, teacher.params, teacher.method_class, batch=job.micro_batch,
                                 pairs=teacher.pairs or job.pairs, teacher_vocab=teacher.shape.vocab,
                                 student_vocab=job.student.shape.vocab, teacher_bytes=teacher.dtype_bytes,
                                 block_rows=rows, chunked=teacher.chunked, teacher_seq_len=teacher.seq_len)


def _kept_per_micro_batch(job: Job, platform: Platform, notes: list[str]) -> dict[str, int]:
    kept = {}
    for teacher in job.teachers:
        memory = _method(teacher, job, platform)
        if not memory.known:
            notes.append(f"teacher {teacher.name}: loss {teacher.kind!r} is not in the planner's table; "
                         f"what it keeps per micro-batch is not counted")
        if teacher.source == "cache":
            kept[teacher.name] = methods.cached_read(teacher.kind, teacher.params, batch=job.micro_batch,
                                                     pairs=teacher.pairs or job.pairs,
                                                     teacher_vocab=teacher.shape.vocab,
                                                     student_vocab=job.student.shape.vocab)
        else:
            kept[teacher.name] = memory.kept
    return kept


def _teacher_phase(teacher: TeacherSpec, job: Job, platform: Platform) -> list[Item]:
    shape, b, name = teacher.shape, teacher.dtype_bytes, teacher.name
    tokens = Tokens(job.micro_batch, teacher.seq_len, job.padded if teacher.padded is None else teacher.padded)
    items = [Item(f"teacher {name} forward working set (no grad)", activations.no_grad_working_set(shape, tokens, b),
                  owner=name),
             Item(f"teacher {name} final hidden states [B, T, H]", tokens.count * shape.head_input_size * b, owner=name)]
    memory = _method(teacher, job, platform)
    path = "chunked output layer: one block of logits" if teacher.chunked else "full logits [B, T, V]"
    items.append(Item(f"teacher {name} {path} + the method's own", memory.teacher_transient, owner=name))
    items.append(Item(f"teacher {name} outputs of this micro-batch", memory.kept, owner=name))
    if teacher.placement != "replicate" and job.world > 1:
        gather = zero3.gathered_peak(shape, zero3.forward_trace(shape), job.zero, job.world)
        items.append(Item(f"teacher {name} parameters gathered (current + prefetched)", b * gather.gathered, owner=name))
        if platform.gather_copy and gather.largest_fetch:
            items.append(Item(f"teacher {name}: the all-gather's own copy", b * gather.largest_fetch, owner=name))
    return items


def _batch_bytes(job: Job) -> int:
    per_side = 3 * 8 * job.micro_batch  # input ids, attention mask, labels: int64 per token
    tokens = job.seq_len + sum(t.seq_len for t in job.teachers)
    pairings = sum(3 * 8 * job.micro_batch * (t.pairs or job.pairs) for t in job.teachers)
    return job.grad_accum * (per_side * tokens + pairings)


def dtype_bytes(name: str, bf16: bool) -> int:
    """Bytes per element of a recipe ``dtype`` (``auto`` = bfloat16 when DeepSpeed's bf16 is on)."""
    if name == "auto":
        return 2 if bf16 else 4
    return {"float32": 4, "bfloat16": 2, "float16": 2}[name]


__all__ = ["CPU", "CUDA", "Item", "Job", "MemoryPlan", "Platform", "StudentSpec", "TeacherSpec", "dtype_bytes",
           "partition", "plan_memory"]
