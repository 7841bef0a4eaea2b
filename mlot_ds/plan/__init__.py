"""Will it fit? Per-rank memory and step time of a recipe's training step on N GPUs, from config.json only.

    python -m mlot_ds.plan --recipe R.yaml --nodes 2 --gpus-per-node 8 --gpu-memory 80GB [--cpu-memory 1TB]

Nothing is loaded but each model's ``config.json`` and the DeepSpeed JSON. The pieces, bottom up:
:mod:`~mlot_ds.plan.model_shapes` (parameters module by module), :mod:`~mlot_ds.plan.activations`
(what autograd keeps), :mod:`~mlot_ds.plan.zero3` (ZeRO-3's gathers, replayed),
:mod:`~mlot_ds.plan.methods` (what each loss keeps), :mod:`~mlot_ds.plan.memory` (the terms per
phase and the peak), :mod:`~mlot_ds.plan.throughput` (FLOPs and bytes moved),
:mod:`~mlot_ds.plan.suggest` (the cheapest change that fits) and :mod:`~mlot_ds.plan.report`.
docs/PLANNING.md has the model, its validation against real jobs and worked examples.
"""

from __future__ import annotations

import os
from pathlib import Path

from mlot_ds.config import Recipe
from mlot_ds.plan.inputs import Cluster, build_job, parse_size, read_json, recipe_shapes
from mlot_ds.plan.report import Plan, make_plan, short, table, to_json
from mlot_ds.plan.throughput import Assumptions


def plan_recipe(recipe: Recipe, ds_config: dict, cluster: Cluster, *, folders: dict[str, Path] | None = None,
                seq_len: int | None = None, pairs: int | None = None, padded: bool = True,
                assumptions: Assumptions = Assumptions(), source: str = "ds_config") -> Plan:
    """The :class:`Plan` of ``recipe`` on ``cluster`` (raises :class:`~mlot_ds.plan.model_shapes.PlanError`)."""
    shapes = recipe_shapes(recipe, folders)
    job = build_job(recipe, ds_config, cluster, shapes, seq_len=seq_len, pairs=pairs, padded=padded, source=source)
    return make_plan(job, cluster, assumptions)


def local_cluster(world: int) -> Cluster:
    """The machine this process runs on, for ``--dry-run``: its GPU (or, without one, its memory shared
    by the local ranks), ``world`` ranks, ``LOCAL_WORLD_SIZE`` of them per node."""
    import torch  # the dry run has imported it already; the planner's modules do not need it at import

    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world) or world)
    nodes = max(1, world // max(per_node, 1))
    if torch.cuda.is_available():
        return Cluster(nodes, per_node, torch.cuda.get_device_properties(0).total_memory, device="cuda")
    available = _meminfo("MemAvailable") or 16 * 2**30
    return Cluster(nodes, per_node, available // max(per_node, 1), device="cpu", reserve=0.0)


def _meminfo(key: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def dry_run_lines(recipe: Recipe, ds_config: dict, world: int, folders: dict[str, Path], source: str) -> list[str]:
    """The dry run's short plan; never raises (a plan that cannot be made is one line saying why)."""
    missing = [f"{name} ({folder})" for name, folder in folders.items() if not (Path(folder) / "config.json").is_file()]
    if missing:
        return [f"plan: skipped, no config.json yet for {', '.join(missing)} (zoo members are built on the first run)"]
    try:
        plan = plan_recipe(recipe, ds_config, local_cluster(world), folders=folders, source=source)
    except Exception as exc:  # the planner must never fail the dry run
        return [f"plan: not made ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"]
    return [line if line.startswith("plan: ") else "plan: " + line for line in short(plan)]


__all__ = ["Assumptions", "Cluster", "Plan", "dry_run_lines", "local_cluster", "make_plan", "parse_size",
           "plan_recipe", "read_json", "short", "table", "to_json"]
