"""A step-time estimate from FLOPs and bytes moved, with every assumption named and printed.

Per rank and optimizer step, with ``M`` the parameters a forward multiplies (the looked-up
embeddings excluded, a tied output layer counted once as a matrix), ``n = B T`` tokens of a
micro-batch, ``L`` layers, ``a d`` the query width and ``A`` the grad_accum micro-batches::

    student  A * (6 M n + 6 L n T a d)        (forward + backward = 3 forwards; causal attention
                                               costs 2 L T a d per token and forward)
             + one more forward under gradient checkpointing
    teacher  A * (2 M n + 2 L n T a d)        per live teacher (cached: 0); the chunked output layer
                                               multiplies only the P paired rows of each sequence
    losses   A * B P * LOSS_FLOPS_PER_LOGIT * (G V_s + V_t)   per teacher (softmax passes over the
                                               paired rows, both sides)

Compute time = FLOPs / (``gpu_tflops`` x ``mfu``). ZeRO-3 moves, per micro-batch, each sharded
model's parameters ``(N-1)/N x P x b`` into every rank for each forward (and backward, and the
recomputation under checkpointing) and the student's gradients out once; across nodes the
inter-node bandwidth is the limit. With ``overlap_comm`` that runs beside the compute, so the step
takes the longer of the two; host transfers (``offload``) and the CPU optimizer are added on top.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from mlot_ds.plan.memory import Job, partition
from mlot_ds.plan.methods import temperatures
from mlot_ds.plan.model_shapes import ModelShape

LOSS_FLOPS_PER_LOGIT = 10
"""Elementwise work per logit of a paired row: scaling, exp, the sums and their backward."""


@dataclass(frozen=True)
class Assumptions:
    """The hardware figures of the estimate (defaults: one H100 SXM node type on InfiniBand)."""

    gpu_tflops: float = 989.0
    """Dense bf16 peak per GPU, TFLOP/s (H100 SXM: 989; A100: 312)."""
    mfu: float = 0.40
    """Share of the peak the model's matrix products reach."""
    intra_node_gbps: float = 150.0
    """All-gather / reduce-scatter bandwidth per GPU inside a node, GB/s (NVLink)."""
    inter_node_gbps: float = 25.0
    """The same across nodes, GB/s per GPU (200 Gb/s InfiniBand per GPU)."""
    pcie_gbps: float = 20.0
    """Host <-> device per GPU, GB/s (offloaded partitions)."""
    cpu_adam_elements_per_s: float = 1.0e9
    """DeepSpeedCPUAdam's update rate per rank (offload_optimizer)."""


@dataclass(frozen=True)
class StepEstimate:
    flops: dict[str, float]
    compute_s: float
    communication_s: float
    host_s: float
    step_s: float
    tokens_per_s: float
    assumptions: Assumptions

    def to_dict(self) -> dict:
        out = asdict(self)
        out["assumptions"] = asdict(self.assumptions)
        return out


def forward_flops_per_token(shape: ModelShape, seq_len: int, *, rows_fraction: float = 1.0) -> float:
    """``2 M + 2 L T a d``; ``rows_fraction``: the share of rows the output layer is applied to."""
    head = shape.vocab * shape.head_input_size
    matmul = shape.matmul_params - head * (1 - rows_fraction)
    return 2 * matmul + 2 * shape.layers * seq_len * shape.heads * shape.head_dim


def estimate(job: Job, nodes: int, assumptions: Assumptions = Assumptions()) -> StepEstimate:
    student = job.student
    a, b_tokens = job.grad_accum, job.micro_batch
    n = b_tokens * job.seq_len
    passes = 4 if student.checkpointing else 3
    flops = {"student": a * n * passes * forward_flops_per_token(student.shape, job.seq_len)}
    bandwidth = (assumptions.inter_node_gbps if nodes > 1 else assumptions.intra_node_gbps) * 1e9
    world = job.world
    share = (world - 1) / world
    gathers = passes - 1  # forward, backward (and the recomputation); then the gradients go out once
    moved = a * (gathers + 1) * student.shape.params * student.dtype_bytes * share
    host = 0.0
    for teacher in job.teachers:
        pairs = teacher.pairs or job.pairs
        rows = b_tokens * pairs
        flops[f"loss {teacher.name}"] = a * rows * LOSS_FLOPS_PER_LOGIT * (
            temperatures(teacher.kind, teacher.params) * student.shape.vocab + teacher.shape.vocab)
        if teacher.source == "cache":
            continue
        fraction = min(1.0, pairs / teacher.seq_len) if teacher.chunked else 1.0
        tokens = b_tokens * teacher.seq_len
        flops[f"teacher {teacher.name}"] = a * tokens * forward_flops_per_token(teacher.shape, teacher.seq_len,
                                                                                rows_fraction=fraction)
        if teacher.placement != "replicate":
            moved += a * teacher.shape.params * teacher.dtype_bytes * share
        if teacher.placement == "offload":
            host += a * partition(teacher.shape, world) * teacher.dtype_bytes / (assumptions.pcie_gbps * 1e9)
    zero = job.zero
    part = partition(student.shape, world)
    if zero.offload_param:
        host += a * (passes - 1) * part * student.dtype_bytes / (assumptions.pcie_gbps * 1e9)
    if zero.offload_optimizer:
        host += part * (student.dtype_bytes + (zero.grad_accum_dtype_bytes or student.dtype_bytes)) / (
            assumptions.pcie_gbps * 1e9) + part / assumptions.cpu_adam_elements_per_s
    compute = sum(flops.values()) / (assumptions.gpu_tflops * 1e12 * assumptions.mfu)
    communication = moved / bandwidth if world > 1 else 0.0
    step = max(compute, communication) + host
    tokens_per_s = world * a * n / step if step > 0 else 0.0
    return StepEstimate(flops, compute, communication, host, step, tokens_per_s, assumptions)


__all__ = ["Assumptions", "LOSS_FLOPS_PER_LOGIT", "StepEstimate", "estimate", "forward_flops_per_token"]
