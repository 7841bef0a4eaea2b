"""A plan in words: the per-rank table, the verdict, the estimate and its assumptions, JSON, short lines."""

from __future__ import annotations

from dataclasses import dataclass

from mlot_ds.plan.inputs import Cluster
from mlot_ds.plan.memory import Job, MemoryPlan, plan_memory
from mlot_ds.plan.suggest import Outcome, cheapest_fix, faster_if_fits
from mlot_ds.plan.throughput import Assumptions, StepEstimate, estimate

GIB = 2**30
PROCESS_HOST_OVERHEAD = 4 * GIB
"""Host memory a GPU rank's process needs besides what the plan counts (CUDA context, torch,
transformers, tokenizers, the data): an assumption, printed with the host check."""


@dataclass
class Plan:
    job: Job
    cluster: Cluster
    memory: MemoryPlan
    estimate: StepEstimate
    fix: Outcome | None
    faster: Outcome | None

    @property
    def fits(self) -> bool:
        return self.memory.peak <= self.cluster.usable

    @property
    def headroom(self) -> int:
        return self.cluster.usable - self.memory.peak

    @property
    def host_per_node(self) -> int:
        per_rank = self.memory.host + (PROCESS_HOST_OVERHEAD if self.cluster.device == "cuda" else 0)
        return per_rank * self.cluster.gpus_per_node


def make_plan(job: Job, cluster: Cluster, assumptions: Assumptions = Assumptions()) -> Plan:
    memory = plan_memory(job, cluster.platform)
    fits = memory.peak <= cluster.usable
    return Plan(job, cluster, memory, estimate(job, cluster.nodes, assumptions),
                None if fits else cheapest_fix(job, cluster, assumptions),
                faster_if_fits(job, cluster, assumptions) if fits else None)


def gib(value: int) -> str:
    return f"{value / GIB:.2f}"


def _dtype(b: int) -> str:
    return {2: "bf16", 4: "fp32"}.get(b, f"{b}-byte")


def _count(params: int) -> str:
    """Parameters as 8.03B, or 1.2M / 15.3k for the small models of tests and the CPU."""
    if params >= 10**8:
        return f"{params / 1e9:.2f}B"
    return f"{params / 1e6:.1f}M" if params >= 10**5 else f"{params / 1e3:.1f}k"


def header(plan: Plan) -> str:
    job, cluster = plan.job, plan.cluster
    where = f"{cluster.world} {'GPU' if cluster.device == 'cuda' else 'CPU rank'}{'s' if cluster.world > 1 else ''}"
    if cluster.nodes > 1:
        where += f" ({cluster.nodes} nodes x {cluster.gpus_per_node})"
    teachers = ", ".join(f"{t.name} {_count(t.shape.params)} {t.source if t.source == 'cache' else t.placement}"
                         for t in job.teachers)
    return (f"plan: student {_count(job.student.shape.params)} {_dtype(job.student.dtype_bytes)}; teachers {teachers}; "
            f"{where}, {gib(cluster.gpu_memory)} GiB each; micro-batch {job.micro_batch} x {job.seq_len} tokens "
            f"({job.pairs} paired), grad_accum {job.grad_accum}")


def verdict(plan: Plan) -> str:
    memory, cluster = plan.memory, plan.cluster
    dominant = memory.dominant
    state = "fits" if plan.fits else "does NOT fit"
    return (f"per-rank peak {gib(memory.peak)} GiB ({memory.peak_phase}) of {gib(cluster.usable)} GiB usable "
            f"({cluster.reserve:.0%} of {gib(cluster.gpu_memory)} reserved): {state}, headroom {gib(plan.headroom)} GiB; "
            f"dominant: {dominant.label} ({gib(dominant.bytes)} GiB)")


def advice(plan: Plan) -> str | None:
    if plan.fix is not None:
        return (f"cheapest change that fits: {plan.fix.override}  ({plan.fix.why}; peak {gib(plan.fix.peak)} GiB, "
                f"step ~{plan.fix.step_s:.2f} s)")
    if not plan.fits:
        return "no change tried fits (more GPUs, or a smaller student / teacher)"
    if plan.faster is not None:
        return (f"faster and still fits: {plan.faster.override}  ({plan.faster.why}; peak {gib(plan.faster.peak)} GiB, "
                f"step ~{plan.faster.step_s:.2f} s vs {plan.estimate.step_s:.2f} s)")
    return None


def throughput_line(plan: Plan) -> str:
    e = plan.estimate
    if plan.cluster.device == "cpu":  # the estimate's figures (peak FLOP/s, links) are a GPU cluster's
        return "throughput: not estimated for CPU ranks (the estimate assumes GPUs: plan with --device cuda)"
    return (f"throughput ~{e.tokens_per_s:,.0f} student tokens/s: step ~{e.step_s:.2f} s (compute {e.compute_s:.2f} s, "
            f"ZeRO-3 traffic {e.communication_s:.2f} s, host transfers {e.host_s:.2f} s)")


LABEL_WIDTH, CELL = 60, 10


def _label(text: str) -> str:
    return text if len(text) <= LABEL_WIDTH else text[: LABEL_WIDTH - 3] + "..."


def table(plan: Plan) -> str:
    """The full report: header, the per-rank table of every phase, verdict, advice, throughput, assumptions."""
    memory = plan.memory
    phases = list(memory.phases)
    names = [p.split(":", 1)[1] if p.startswith("teacher:") else p for p in phases]
    lines = [header(plan), "", "per rank (every rank alike), GiB; a column per phase of the step: each live teacher's "
             "pass, the student's forward and backward, the optimizer step"]
    lines.append(f"  {'term':<{LABEL_WIDTH}} {'where':<7}" + "".join(f"{n[:CELL - 1]:>{CELL}}" for n in names))
    for item in memory.always:
        lines.append(f"  {_label(item.label):<{LABEL_WIDTH}} {item.where:<7}" + f"{gib(item.bytes):>{CELL}}" * len(phases))
    for phase in phases:
        for item in memory.phases[phase]:
            cells = "".join(f"{gib(item.bytes) if p == phase else '':>{CELL}}" for p in phases)
            lines.append(f"  {_label(item.label):<{LABEL_WIDTH}} {item.where:<7}{cells}")
    lines.append(f"  {'total on the device':<{LABEL_WIDTH}} {'':<7}"
                 + "".join(f"{gib(memory.phase_total(p)):>{CELL}}" for p in phases))
    lines += ["", verdict(plan)]
    tip = advice(plan)
    if tip:
        lines.append(tip)
    if plan.cluster.device == "cuda":
        host = plan.host_per_node
        check = ""
        if plan.cluster.cpu_memory:
            check = " (fits)" if host <= plan.cluster.cpu_memory else f" (does NOT fit in {gib(plan.cluster.cpu_memory)} GiB)"
        lines.append(f"host memory per node ~{gib(host)} GiB{check}: offloaded partitions and pinned buffers "
                     f"{gib(memory.host)} GiB per rank + an assumed {gib(PROCESS_HOST_OVERHEAD)} GiB per rank process")
    lines += ["", throughput_line(plan)]
    a = plan.estimate.assumptions
    if plan.cluster.device == "cuda":
        lines.append(f"  assumed: {a.gpu_tflops:g} TFLOP/s peak per GPU at {a.mfu:.0%} utilisation; ZeRO-3 traffic at "
                     f"{a.intra_node_gbps:g} GB/s in a node, {a.inter_node_gbps:g} GB/s across nodes, overlapped with "
                     "compute;")
        lines.append(f"           host transfers at {a.pcie_gbps:g} GB/s, not overlapped")
        flops = ", ".join(f"{k} {v / 1e12:.1f}" for k, v in plan.estimate.flops.items())
        lines.append(f"  TFLOP per rank and step: {flops}")
    lines.append("  memory assumes: sequences of data.max_length (or --seq-len), every token paired (or --pairs), a padding")
    lines.append("           mask (or --no-padding), SDPA attention, no dropout; figures are allocated bytes"
                 + ("" if plan.cluster.device == "cuda" else " (CPU ranks: the resident set)"))
    lines += [f"  note: {note}" for note in memory.notes]
    return "\n".join(lines)


def short(plan: Plan) -> list[str]:
    """At most five lines, for ``--dry-run``."""
    lines = [header(plan), verdict(plan)]
    tip = advice(plan)
    if tip:
        lines.append(tip)
    lines.append(throughput_line(plan))
    return lines + [f"note: {n}" for n in plan.memory.notes[:1]]


def to_json(plan: Plan) -> dict:
    memory, job = plan.memory, plan.job

    def items(values):
        return [{"label": i.label, "bytes": i.bytes, "where": i.where, "owner": i.owner} for i in values]

    return {
        "cluster": {"nodes": plan.cluster.nodes, "gpus_per_node": plan.cluster.gpus_per_node,
                    "gpu_memory": plan.cluster.gpu_memory, "usable": plan.cluster.usable,
                    "cpu_memory": plan.cluster.cpu_memory, "device": plan.cluster.device},
        "job": {"student_params": job.student.shape.params, "student_dtype_bytes": job.student.dtype_bytes,
                "micro_batch": job.micro_batch, "grad_accum": job.grad_accum, "seq_len": job.seq_len, "pairs": job.pairs,
                "teachers": [{"name": t.name, "params": t.shape.params, "placement": t.placement, "source": t.source,
                              "chunked": t.chunked, "loss": t.kind} for t in job.teachers]},
        "per_rank": {"always": items(memory.always), "phases": {p: items(v) for p, v in memory.phases.items()},
                     "phase_totals": {p: memory.phase_total(p) for p in memory.phases},
                     "peak": memory.peak, "peak_phase": memory.peak_phase, "dominant": memory.dominant.label,
                     "host": memory.host},
        "fits": plan.fits, "headroom": plan.headroom,
        "fix": None if plan.fix is None else {"override": plan.fix.override, "peak": plan.fix.peak, "step_s": plan.fix.step_s},
        "faster": None if plan.faster is None else {"override": plan.faster.override, "peak": plan.faster.peak,
                                                    "step_s": plan.faster.step_s},
        "throughput": plan.estimate.to_dict(),
        "notes": memory.notes,
    }


__all__ = ["GIB", "Plan", "advice", "header", "make_plan", "short", "table", "to_json", "verdict"]
