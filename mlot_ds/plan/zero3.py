"""ZeRO-3 as the planner models it: the DeepSpeed JSON's settings, and which parameters are gathered when.

Two things decide how much of a ZeRO-3 model is whole on a rank at once, beyond its partition:

1. **Prefetch.** When a module is fetched, DeepSpeed's parameter coordinator also starts gathering
   the next parameters of the step's trace until at least ``stage3_prefetch_bucket_size`` elements
   are in flight (it adds whole parameters, so one large parameter can overshoot the bucket; at
   most ``stage3_max_live_parameters`` may be whole at once).
2. **Reuse distance.** After a module runs, its parameters are released unless they are used
   again within the next ``stage3_max_reuse_distance`` elements of the trace. With the default
   (1e9) the student's layers stay gathered from their forward until their backward whenever
   less than 1e9 elements are fetched in between: every layer of a model below ~0.5B parameters,
   and the last layers of larger ones.

:func:`gathered_peak` replays that logic (``PartitionedParameterCoordinator.fetch_sub_module``,
``__params_to_release``; DeepSpeed 0.19) over a module trace built from :mod:`model_shapes`:
forward only for a frozen teacher; forward then backward (with each layer re-run before its
backward under gradient checkpointing) for the student. A coalesced gather is one buffer, freed
when every parameter in it has been released. Parameters below ``stage3_param_persistence_threshold``
are whole on every rank all the time (:meth:`ModelShape.persistent_params`). On one rank nothing
is gathered: a parameter's data is its partition.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from mlot_ds.plan.model_shapes import Module, ModelShape, PlanError


@dataclass(frozen=True)
class ZeroSettings:
    """The DeepSpeed JSON keys the memory model reads (DeepSpeed 0.19's defaults where a key is absent).

    Attributes:
        reduce_bucket_size: elements of the gradient bucket (allocated once, in the parameters' dtype,
            with ``contiguous_gradients``).
        prefetch_bucket_size, param_persistence_threshold, max_live_parameters, max_reuse_distance:
            ``stage3_*`` keys (see the module docstring).
        sub_group_size: elements the optimizer steps at a time (its float32 gradient copy).
        offload_optimizer, offload_param: ``"cpu"``, ``"nvme"`` or ``None``.
        pin_memory: the offload buffers are page-locked host memory.
        bf16: ``bf16.enabled`` (``"auto"`` resolved by the caller: bf16 on a GPU that has it).
        grad_accum_dtype_bytes: ``data_types.grad_accum_dtype`` (default: the model's dtype).
        optimizer: ``optimizer.type`` (lower case), e.g. ``adamw``.
    """

    reduce_bucket_size: int = int(5e8)
    prefetch_bucket_size: int = int(5e7)
    param_persistence_threshold: int = int(1e5)
    max_live_parameters: int = int(1e9)
    max_reuse_distance: int = int(1e9)
    contiguous_gradients: bool = True
    sub_group_size: int = int(1e9)
    offload_optimizer: str | None = None
    offload_param: str | None = None
    pin_memory: bool = False
    bf16: bool | str = "auto"
    grad_accum_dtype_bytes: int | None = None
    optimizer: str = "adamw"


_DTYPE_BYTES = {"fp32": 4, "float32": 4, "fp16": 2, "float16": 2, "bf16": 2, "bfloat16": 2}


def zero_settings(config: dict, source: str = "ds_config") -> ZeroSettings:
    """The :class:`ZeroSettings` of a DeepSpeed JSON (already parsed); a wrong value is one :class:`PlanError`."""
    zero = config.get("zero_optimization", {})
    if not isinstance(zero, dict) or zero.get("stage", 0) != 3:
        raise PlanError(f"{source}: zero_optimization.stage must be 3 (the planner models ZeRO-3)")

    def number(key: str, default: float) -> int:
        value = zero.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise PlanError(f"{source}: zero_optimization.{key} must be a non-negative number; got {value!r}")
        return int(value)

    def offload(key: str) -> tuple[str | None, bool]:
        section = zero.get(key) or {}
        device = section.get("device", "none") if isinstance(section, dict) else "none"
        return (None if device in (None, "none") else str(device)), bool(section.get("pin_memory", False))

    optimizer_device, optimizer_pin = offload("offload_optimizer")
    param_device, param_pin = offload("offload_param")
    accum = (config.get("data_types") or {}).get("grad_accum_dtype")
    if accum is not None and accum not in _DTYPE_BYTES:
        raise PlanError(f"{source}: data_types.grad_accum_dtype must be one of {', '.join(_DTYPE_BYTES)}; got {accum!r}")
    return ZeroSettings(
        reduce_bucket_size=number("reduce_bucket_size", 5e8),
        prefetch_bucket_size=number("stage3_prefetch_bucket_size", 5e7),
        param_persistence_threshold=number("stage3_param_persistence_threshold", 1e5),
        max_live_parameters=number("stage3_max_live_parameters", 1e9),
        max_reuse_distance=number("stage3_max_reuse_distance", 1e9),
        contiguous_gradients=bool(zero.get("contiguous_gradients", True)),
        sub_group_size=number("sub_group_size", 1e9),
        offload_optimizer=optimizer_device, offload_param=param_device, pin_memory=optimizer_pin or param_pin,
        bf16=(config.get("bf16") or {}).get("enabled", "auto"),
        grad_accum_dtype_bytes=_DTYPE_BYTES[accum] if accum is not None else None,
        optimizer=str((config.get("optimizer") or {}).get("type", "adamw")).lower(),
    )


# ---------------------------------------------------------------------------------------------
# Traces


def forward_trace(shape: ModelShape) -> list[Module]:
    return list(shape.modules)


def training_trace(shape: ModelShape, checkpointing: bool) -> list[Module]:
    """Forward, then backward in reverse order; under gradient checkpointing each layer's forward
    runs again right before its backward."""
    modules = list(shape.modules)
    if not checkpointing:
        return modules + modules[::-1]
    backward: list[Module] = []
    index = len(modules) - 1
    while index >= 0:
        layer = modules[index].layer
        if layer is None:
            backward.append(modules[index])
            index -= 1
            continue
        start = index
        while start - 1 >= 0 and modules[start - 1].layer == layer:
            start -= 1
        block = modules[start:index + 1]
        backward += block + block[::-1]
        index = start - 1
    return modules + backward


# ---------------------------------------------------------------------------------------------
# The coordinator's replay


@dataclass(frozen=True)
class GatherPeak:
    """Elements whole on a rank beyond its partition, at the worst moment of one trace.

    Attributes:
        gathered: non-persistent elements gathered at the peak (current module, prefetched, retained).
        largest_fetch: the largest single gather (one coalesced buffer), for the collective's own copy.
        persistent: elements below the persistence threshold (whole all the time).
    """

    gathered: int
    largest_fetch: int
    persistent: int


def gathered_peak(shape: ModelShape, trace: list[Module], settings: ZeroSettings, world: int) -> GatherPeak:
    """Replay ZeRO-3's fetch, prefetch and release over ``trace`` in steady state (a complete trace)."""
    persistent_keys = {p.key for m in trace for p in m.params if p.numel < settings.param_persistence_threshold}
    persistent = shape.persistent_params(settings.param_persistence_threshold)
    if world == 1:
        return GatherPeak(0, 0, persistent)  # one partition is the whole parameter: nothing to gather
    numel = {p.key: p.numel for m in trace for p in m.params}
    queue = deque((p.key, step) for step, m in enumerate(trace) for p in m.params)
    # Release test: the module at position j is examined iff the elements of trace[s+1 .. j-1] < max_reuse.
    prefix = [0]
    for module in trace:
        prefix.append(prefix[-1] + module.numel)
    next_use: list[dict[str, int]] = [{} for _ in trace]
    upcoming: dict[str, int] = {}
    for step in range(len(trace) - 1, -1, -1):
        next_use[step] = dict(upcoming)
        for p in trace[step].params:
            upcoming[p.key] = step

    available: dict[str, int] = {}  # key -> buffer id
    buffers: dict[int, list] = {}  # id -> [elements, members still whole]
    fetched_for: dict[str, int] = {}
    peak = largest = 0
    next_id = iter(range(1, 1 << 62))

    def gather(keys: list[str]) -> None:
        nonlocal largest
        if not keys:
            return
        buffer = next(next_id)
        size = sum(numel[k] for k in keys)
        buffers[buffer] = [size, set(keys)]
        largest = max(largest, size)
        for key in keys:
            available[key] = buffer

    def release(key: str) -> None:
        buffer = available.pop(key)
        members = buffers[buffer][1]
        members.discard(key)
        if not members:
            del buffers[buffer]

    for step, module in enumerate(trace):
        keys = list(dict.fromkeys(p.key for p in module.params))
        gather([k for k in keys if k not in available and k not in persistent_keys])
        wanted = {k for k in keys if fetched_for.get(k, -1) < step}
        popped: set[str] = set()
        while queue and len(popped) < len(wanted):
            key, used_at = queue.popleft()
            fetched_for[key] = used_at
            popped.add(key)
        whole = sum(size for size, _ in buffers.values())
        limit = min(settings.max_live_parameters - whole, settings.prefetch_bucket_size)
        prefetch: list[str] = []
        in_flight = 0
        while queue and in_flight < limit:
            key, used_at = queue.popleft()
            fetched_for[key] = max(fetched_for.get(key, -1), used_at)
            if key not in available and key not in persistent_keys and key not in prefetch:
                prefetch.append(key)
                in_flight += numel[key]
        gather(prefetch)
        peak = max(peak, sum(size for size, _ in buffers.values()))
        after = step + 1
        for key in keys:
            if key in persistent_keys or key not in available or fetched_for.get(key, -1) > after:
                continue
            reuse = next_use[step].get(key)
            if reuse is not None and prefix[reuse] - prefix[after] < settings.max_reuse_distance:
                continue
            release(key)
    return GatherPeak(peak, largest, persistent)


__all__ = ["GatherPeak", "ZeroSettings", "forward_trace", "gathered_peak", "training_trace", "zero_settings"]
