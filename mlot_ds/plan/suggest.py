"""The cheapest change that makes a plan fit, or that makes a fitting plan faster.

Each candidate is one recipe or DeepSpeed change, written as the override a user would type:

- ``teachers.<name>.placement=shard`` for a replicated teacher (a partition instead of a full copy);
- ``student.gradient_checkpointing=true`` (one more student forward per step);
- ``teachers.<name>.placement=offload`` (its partition on the host; a host-to-device copy per forward);
- ``teachers.<name>.source=cache`` (no forward at all; needs ``tools/cache_teachers.py`` first and a
  method that can be cached);
- ``train.micro_batch_size=<half> train.grad_accum=<double>`` (the same global batch);
- ``zero_optimization.offload_optimizer`` / ``offload_param`` in the DeepSpeed JSON (slowest).

"Cheapest" is the estimated step time (:mod:`mlot_ds.plan.throughput`) of the changed job: among
the single changes that fit, the fastest. If none fits alone, changes are combined greedily (the one
that lowers the peak most, until it fits, at most four). For a plan that already fits, replicating
a sharded teacher that still fits is offered when it makes the step faster (no gathers).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

from mlot_ds.plan.inputs import Cluster
from mlot_ds.plan.memory import Job, plan_memory
from mlot_ds.plan.throughput import Assumptions, estimate


@dataclass(frozen=True)
class Change:
    override: str
    why: str
    apply: Callable[[Job], Job]


@dataclass(frozen=True)
class Outcome:
    changes: tuple[Change, ...]
    peak: int
    step_s: float
    fits: bool

    @property
    def override(self) -> str:
        return " ".join(c.override for c in self.changes)

    @property
    def why(self) -> str:
        return "; ".join(c.why for c in self.changes)


def _teacher(job: Job, name: str, **changes) -> Job:
    teachers = tuple(dataclasses.replace(t, **changes) if t.name == name else t for t in job.teachers)
    return dataclasses.replace(job, teachers=teachers)


def candidates(job: Job) -> list[Change]:
    out = []
    live = [t for t in job.teachers if t.source == "live"]
    for t in live:
        if t.placement == "replicate":
            out.append(Change(f"teachers.{t.name}.placement=shard", f"shard {t.name} instead of a full copy per rank",
                              lambda j, n=t.name: _teacher(j, n, placement="shard")))
    if not job.student.checkpointing:
        out.append(Change("student.gradient_checkpointing=true", "keep only each layer's input (one more forward)",
                          lambda j: dataclasses.replace(j, student=dataclasses.replace(j.student, checkpointing=True))))
    for t in sorted(live, key=lambda t: -t.shape.params):
        if t.placement != "offload":
            out.append(Change(f"teachers.{t.name}.placement=offload", f"keep {t.name}'s partition on the host",
                              lambda j, n=t.name: _teacher(j, n, placement="offload")))
        if t.method_class.cache_problem(t.params) is None:
            out.append(Change(f"teachers.{t.name}.source=cache",
                              f"read {t.name} from an offline cache (build it first with tools/cache_teachers.py)",
                              lambda j, n=t.name: _teacher(j, n, source="cache")))
    if job.micro_batch > 1:
        half = job.micro_batch // 2
        accum = job.grad_accum * job.micro_batch // half if job.micro_batch % half == 0 else job.grad_accum * 2
        out.append(Change(f"train.micro_batch_size={half} train.grad_accum={accum}",
                          "halve the micro-batch (the same global batch)" if half * accum == job.micro_batch * job.grad_accum
                          else "halve the micro-batch",
                          lambda j, h=half, g=accum: dataclasses.replace(j, micro_batch=h, grad_accum=g)))
    if not job.zero.offload_optimizer:
        out.append(Change("zero_optimization.offload_optimizer.device=cpu", "optimizer states on the host (DeepSpeed JSON)",
                          lambda j: dataclasses.replace(j, zero=dataclasses.replace(j.zero, offload_optimizer="cpu"))))
    if not job.zero.offload_param:
        out.append(Change("zero_optimization.offload_param.device=cpu", "student partition on the host (DeepSpeed JSON)",
                          lambda j: dataclasses.replace(j, zero=dataclasses.replace(j.zero, offload_param="cpu"))))
    return out


def _outcome(job: Job, changes: tuple[Change, ...], cluster: Cluster, assumptions: Assumptions) -> Outcome:
    changed = job
    for change in changes:
        changed = change.apply(changed)
    peak = plan_memory(changed, cluster.platform).peak
    return Outcome(changes, peak, estimate(changed, cluster.nodes, assumptions).step_s, peak <= cluster.usable)


def cheapest_fix(job: Job, cluster: Cluster, assumptions: Assumptions = Assumptions(), max_changes: int = 4) -> Outcome | None:
    """The fitting change (or combination) with the shortest estimated step; ``None`` if nothing tried fits."""
    options = candidates(job)
    single = [_outcome(job, (c,), cluster, assumptions) for c in options]
    fitting = [o for o in single if o.fits]
    if fitting:
        return min(fitting, key=lambda o: o.step_s)
    chosen: tuple[Change, ...] = ()
    for _ in range(max_changes):
        remaining = [c for c in candidates(_apply(job, chosen)) if c.override not in {x.override for x in chosen}]
        if not remaining:
            return None
        trials = [_outcome(job, chosen + (c,), cluster, assumptions) for c in remaining]
        fitting = [o for o in trials if o.fits]
        if fitting:
            return min(fitting, key=lambda o: o.step_s)
        chosen = min(trials, key=lambda o: o.peak).changes
    return None


def faster_if_fits(job: Job, cluster: Cluster, assumptions: Assumptions = Assumptions()) -> Outcome | None:
    """For a fitting plan: replicate the sharded teacher whose full copy still fits and saves the most time."""
    base = estimate(job, cluster.nodes, assumptions).step_s
    options = []
    for t in job.teachers:
        if t.source == "live" and t.placement != "replicate" and job.world > 1:
            change = Change(f"teachers.{t.name}.placement=replicate", f"a full copy of {t.name} per rank: no gathers",
                            lambda j, n=t.name: _teacher(j, n, placement="replicate"))
            outcome = _outcome(job, (change,), cluster, assumptions)
            if outcome.fits and outcome.step_s < base * 0.99:
                options.append(outcome)
    return min(options, key=lambda o: o.step_s) if options else None


def _apply(job: Job, changes: tuple[Change, ...]) -> Job:
    for change in changes:
        job = change.apply(job)
    return job


__all__ = ["Change", "Outcome", "candidates", "cheapest_fix", "faster_if_fits"]
