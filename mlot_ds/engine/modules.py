"""Per-teacher trainable modules (projectors), trained inside the student's DeepSpeed engine.

A method declares its modules (:meth:`~mlot_ds.losses.method.Method.module_specs`: linear maps with
their sizes, initialisation and learning rate). The engine builds them once per run and hangs them
under the student model as one more submodule, ``mlot_modules.<teacher>.<name>``, before
``deepspeed.initialize``: one module tree, so ZeRO-3 partitions them like the student's own layers,
gathers them when a method calls them, reduce-scatters their gradients, and saves and restores them
(and their optimizer moments) in the student's checkpoints, universal re-sharding included. Each
module is its own optimizer parameter group, at its own learning rate, following the student's
schedule scaled by ``module_lr / train.lr`` (DSKD's reference scales its projector group by the same
schedule multiplier as the student's).

Initialisation uses a generator seeded from ``train.seed``, the teacher and the module name: the same
weights on every rank and for every world size, and the global RNG is not touched.

What stays out of the student: the exported Hugging Face folder holds only the student's own
weights; the modules go to a ``projectors/`` folder beside it (:func:`write_projectors`). A
checkpoint records its modules in ``modules.json`` (only when there are any), and a resume whose
methods declare other modules is refused (:func:`check_same_modules`).

With no method declaring modules nothing here runs: no submodule, the same parameter list, the same
DeepSpeed config, the same checkpoint files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from mlot_ds import outputs
from mlot_ds.errors import BadInput
from mlot_ds.losses.method import LinearSpec

MODULES_ATTR = "mlot_modules"
"""The student submodule holding every teacher's modules (state-dict prefix ``mlot_modules.``)."""
MODULES_FILE = "modules.json"
PROJECTORS_KIND = "projectors"
PROJECTORS_WEIGHTS = "projectors.safetensors"
PROJECTORS_MANIFEST = "projectors.json"
# WarmupLR and WarmupDecayLR take per-group lists; WarmupCosineLR scales each group's own lr.
_LIST_SCHEDULERS = ("WarmupLR", "WarmupDecayLR")
_RELATIVE_SCHEDULERS = ("WarmupCosineLR",)


class ModuleConfigError(BadInput, ValueError):
    """The run's trainable modules cannot be set up with this DeepSpeed config or checkpoint."""


def module_manifest(methods: dict) -> dict[str, dict[str, dict]]:
    """``{teacher: {module: spec as a dict}}`` of every method that declares modules (``{}``: none)."""
    manifest = {}
    for teacher, method in methods.items():
        specs = method.module_specs()
        if specs:
            manifest[teacher] = {name: dataclasses.asdict(spec) for name, spec in specs.items()}
    return manifest


def _spec(entry: dict) -> LinearSpec:
    return LinearSpec(**entry)


def module_seed(seed: int, teacher: str, name: str) -> int:
    """The initialisation seed of one module: fixed by the run's seed, the teacher and the module name."""
    digest = hashlib.sha256(f"{int(seed)}/{teacher}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@torch.no_grad()
def init_linear(linear: torch.nn.Linear, spec: LinearSpec, generator: torch.Generator) -> None:
    """Fill ``linear`` as ``spec.init`` says (computed in float32 on the CPU, then cast)."""
    fan_in = spec.in_features
    weight = torch.empty(spec.out_features, spec.in_features, dtype=torch.float32)
    bias = torch.zeros(spec.out_features, dtype=torch.float32) if spec.bias else None
    if spec.init == "uniform":  # torch.nn.Linear.reset_parameters: kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(in))
        bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        weight.uniform_(-bound, bound, generator=generator)
        if bias is not None:
            bias.uniform_(-bound, bound, generator=generator)
    elif spec.init == "lecun_normal":  # flax Dense: variance_scaling(1, fan_in, truncated_normal), zero bias
        # 0.8796... is the standard deviation of a standard normal truncated to [-2, 2].
        std = math.sqrt(1.0 / fan_in) / 0.87962566103423978
        torch.nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-2 * std, b=2 * std, generator=generator)
    else:
        raise ModuleConfigError(f"unknown initialisation {spec.init!r}; expected uniform or lecun_normal")
    linear.weight.copy_(weight)
    if bias is not None:
        linear.bias.copy_(bias)


def build_modules(manifest: dict, seed: int, dtype: torch.dtype) -> torch.nn.ModuleDict:
    """``ModuleDict(teacher -> ModuleDict(name -> nn.Linear))``, initialised deterministically."""
    tree = torch.nn.ModuleDict()
    for teacher, specs in manifest.items():
        group = torch.nn.ModuleDict()
        for name, entry in specs.items():
            spec = _spec(entry)
            # skip_init: nn.Linear's own initialisation would draw from the global RNG
            linear = torch.nn.utils.skip_init(torch.nn.Linear, spec.in_features, spec.out_features, bias=spec.bias,
                                              device="cpu", dtype=torch.float32)
            init_linear(linear, spec, torch.Generator().manual_seed(module_seed(seed, teacher, name)))
            group[name] = linear.to(dtype)
        tree[teacher] = group
    return tree


def attach(student_model: torch.nn.Module, modules: torch.nn.ModuleDict) -> None:
    """Hang the modules under the student model (one module tree for DeepSpeed)."""
    if hasattr(student_model, MODULES_ATTR):
        raise ModuleConfigError(f"the student model already has a submodule named {MODULES_ATTR!r}")
    student_model.add_module(MODULES_ATTR, modules)


def group_ratios(manifest: dict, base_lr: float) -> list[float]:
    """Each optimizer group's learning rate relative to ``base_lr``: 1 for the student, then the modules'."""
    return [1.0] + [_spec(entry).learning_rate(base_lr) / base_lr for specs in manifest.values() for entry in specs.values()]


def parameter_groups(student_model: torch.nn.Module, manifest: dict, base_lr: float) -> tuple[list[dict], list[float]]:
    """The optimizer's parameter groups: the student's own trainable parameters (group 0, in their
    usual order), then one group per module at its learning rate. Also returns each group's learning
    rate relative to ``base_lr`` (1 for the student)."""
    tree = getattr(student_model, MODULES_ATTR)
    own = {id(p) for p in tree.parameters()}
    groups = [{"params": [p for p in student_model.parameters() if p.requires_grad and id(p) not in own]}]
    ratios = [1.0]
    for teacher, specs in manifest.items():
        for name, entry in specs.items():
            lr = _spec(entry).learning_rate(base_lr)
            groups.append({"params": list(tree[teacher][name].parameters()), "lr": lr})
            ratios.append(lr / base_lr)
    return groups, ratios


def scale_schedule(ds_config: dict, ratios: list[float], source: str = "ds_config") -> None:
    """Make the DeepSpeed scheduler move every parameter group by the student's schedule times its ratio.

    WarmupLR / WarmupDecayLR get per-group lists of their absolute rates; WarmupCosineLR already
    scales each group's own initial rate; without a scheduler every group keeps its rate.
    """
    scheduler = ds_config.get("scheduler")
    if scheduler is None:
        return
    kind = scheduler.get("type")
    if kind in _RELATIVE_SCHEDULERS:
        return
    if kind not in _LIST_SCHEDULERS:
        raise ModuleConfigError(
            f"{source}: scheduler.type {kind!r} cannot give the trainable modules their own learning rates; use "
            f"{', '.join(_LIST_SCHEDULERS + _RELATIVE_SCHEDULERS)} or no scheduler")
    params = scheduler.setdefault("params", {})
    for key in ("warmup_min_lr", "warmup_max_lr"):
        if key in params:
            value = params[key]
            if isinstance(value, (list, tuple)):
                raise ModuleConfigError(f"{source}: scheduler.params.{key} is a list; with trainable modules it must be "
                                        f"one number (or \"auto\"): each module's rate is derived from it")
            params[key] = [float(value) * ratio for ratio in ratios]


# ------------------------------------------------------------------------------------ resume


def read_manifest(folder: Path) -> dict:
    """The modules a checkpoint was saved with (``{}`` when it has no ``modules.json``)."""
    path = Path(folder) / MODULES_FILE
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModuleConfigError(f"{path}: damaged or truncated ({exc})") from None
    return value.get("modules", {}) if isinstance(value, dict) else {}


def describe(manifest: dict) -> str:
    """``llama.query [256 -> 288], llama.t2s [...]`` or ``none``."""
    items = [f"{teacher}.{name} [{entry['in_features']} -> {entry['out_features']}]"
             for teacher, specs in manifest.items() for name, entry in specs.items()]
    return ", ".join(items) if items else "none"


def _shape_key(manifest: dict) -> dict:
    return {(teacher, name): (entry["in_features"], entry["out_features"], bool(entry["bias"]))
            for teacher, specs in manifest.items() for name, entry in specs.items()}


def check_same_modules(folder: Path, current: dict) -> None:
    """Refuse to resume a checkpoint whose trainable modules (names, sizes) differ from this run's."""
    saved = read_manifest(folder)
    if _shape_key(saved) != _shape_key(current):
        raise ModuleConfigError(
            f"{folder}: saved with trainable modules {describe(saved)}, but this run's losses declare "
            f"{describe(current)}; resume with the losses it was saved with, or start a fresh run "
            f"(train.resume=none and a new train.output_dir)")


def write_manifest(folder: Path, manifest: dict) -> None:
    if manifest:
        (Path(folder) / MODULES_FILE).write_text(json.dumps({"modules": manifest}, indent=2))


# ------------------------------------------------------------------------------------ export


def split_state(state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """``(student's own tensors, the modules' tensors without the prefix)`` of a state dict."""
    prefix = MODULES_ATTR + "."
    own = {k: v for k, v in state.items() if not k.startswith(prefix)}
    modules = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return own, modules


def projectors_dir(export_dir: Path) -> Path:
    """Where the modules of an export go: a ``projectors`` folder beside it."""
    return Path(export_dir).expanduser().parent / PROJECTORS_KIND


def check_projectors_target(export_dir: Path, where: str) -> Path:
    """The projectors folder beside ``export_dir``, refused if it is not ours or belongs to another export."""
    target = outputs.check_folder(projectors_dir(export_dir), PROJECTORS_KIND, where)
    manifest = target / PROJECTORS_MANIFEST
    if manifest.is_file():
        try:
            owner = json.loads(manifest.read_text(encoding="utf-8")).get("export")
        except (OSError, ValueError, AttributeError):
            owner = None
        if owner not in (None, Path(export_dir).name):
            raise outputs.OutputError(f"{where}: {target} holds the projectors of the export {owner!r}, not of "
                                      f"{Path(export_dir).name!r}; export into another folder (nothing was changed)")
    return target


def write_projectors(export_dir: Path, module_state: dict[str, torch.Tensor], manifest: dict, where: str) -> Path:
    """Write the modules' weights beside the export: ``projectors/projectors.safetensors`` (keys
    ``<teacher>.<name>.weight``/``.bias``) and ``projectors.json`` (their specs), replaced atomically."""
    target = check_projectors_target(export_dir, where)
    tensors = {name: value.detach().to("cpu").contiguous() for name, value in module_state.items()}

    def fill(staging: Path) -> None:
        save_file(tensors, str(staging / PROJECTORS_WEIGHTS))
        (staging / PROJECTORS_MANIFEST).write_text(json.dumps({"export": Path(export_dir).name, "modules": manifest},
                                                              indent=2))

    outputs.replace_folder(target, PROJECTORS_KIND, fill, where)
    return target


def nan_touch(modules: torch.nn.ModuleDict) -> torch.Tensor:
    """A NaN scalar that depends on every module (each called once on a zero row), so a skipped step's
    NaN backward reaches their parameters too, on every rank."""
    total = None
    for group in modules.values():
        for linear in group.values():
            row = torch.zeros(1, linear.in_features, dtype=next(iter(linear.parameters())).dtype,
                              device=next(iter(linear.parameters())).device)
            term = linear(row).sum() * float("nan")
            total = term if total is None else total + term
    return total


__all__ = ["MODULES_ATTR", "MODULES_FILE", "ModuleConfigError", "attach", "build_modules", "check_same_modules",
           "describe", "group_ratios", "init_linear", "module_manifest", "module_seed", "nan_touch", "parameter_groups",
           "projectors_dir", "read_manifest", "scale_schedule", "split_state", "write_manifest", "write_projectors"]
