"""Checkpoints of the student engine (teachers excluded), atomic ``latest`` pointer, and HF export.

Layout of ``<output_dir>/checkpoints``::

    step_00000010/            DeepSpeed's ZeRO-3 shards (student only) + our files:
        trainer_state.json    global step, weighting state, skip counters
        rng_rank<r>.pt        every rank's RNG states
        recipe.yaml           the resolved recipe
        teachers.json         the teacher manifest (names, paths, tokenizer hashes, weights, losses)
        modules.json          only when a loss trains modules (projectors): their names and sizes
                              (their weights and optimizer moments are in DeepSpeed's shards)
        COMPLETE              written last: a folder without it is ignored
        universal/            only after a resume on another number of ranks: the same state in
                              DeepSpeed's universal format (converted once, then reused)
    latest                    the name of the newest COMPLETE folder, replaced atomically

A save never touches an older checkpoint until the new one is complete, so a crash mid-save leaves
the previous ``latest`` loadable.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import deepspeed
import numpy as np
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from mlot_ds import dist, outputs
from mlot_ds.config import load_recipe
from mlot_ds.engine import modules as trainable
from mlot_ds.engine.resolve import local_model
from mlot_ds.errors import BadInput

COMPLETE = "COMPLETE"
LATEST = "latest"
UNIVERSAL = "universal"
BEST = "best"
EXPORT_KIND = "export"


class CheckpointError(BadInput, RuntimeError):
    """A checkpoint cannot be used. The message names its folder (or the damaged file)."""


def read_json(folder: Path, name: str) -> dict:
    """One of our JSON files of a checkpoint; a damaged one is a :class:`CheckpointError` that names
    it and the earlier checkpoint to resume from instead (the files themselves are left as they are)."""
    path = folder / name
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: not a complete checkpoint (no {name})") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: damaged or truncated ({exc}); {_earlier_hint(folder)}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: damaged (expected a JSON object, got {type(value).__name__}); "
                              f"{_earlier_hint(folder)}")
    return value


def _earlier_hint(folder: Path) -> str:
    """How to go on without ``folder``: the newest complete checkpoint before it, if there is one."""
    earlier = [p for p in sorted(folder.parent.glob("step_*")) if (p / COMPLETE).is_file() and p.name < folder.name]
    if earlier:
        return f"nothing was changed; resume from the previous checkpoint with --resume {earlier[-1]}"
    return "nothing was changed; start a fresh run with train.resume=none and a new train.output_dir"


def step_of(folder: Path) -> int:
    """The global step in a ``step_N`` folder name."""
    return int(folder.name.split("_", 1)[1])


def complete_checkpoints(root: Path) -> list[Path]:
    """Every complete ``step_N`` checkpoint under ``root``, oldest first."""
    return sorted(p for p in root.glob("step_*") if (p / COMPLETE).is_file())


def check_nothing_overwritten(root: Path, start_step: int, resuming: bool) -> None:
    """Refuse a run that would later save over a complete checkpoint it did not write.

    A fresh run (``resuming=False``) into a folder with checkpoints, or a resume from an earlier
    checkpoint while later ones exist, would replace (and then prune) them.
    """
    later = [p for p in complete_checkpoints(root) if not resuming or step_of(p) > start_step]
    if later:
        what = "holds checkpoints of an earlier run" if not resuming else \
            f"holds checkpoints after step {start_step}, the one this run resumes from"
        raise CheckpointError(f"{root} {what} ({', '.join(p.name for p in later[-3:])}); this run would overwrite "
                              f"them: use another train.output_dir, or resume from the newest with train.resume=auto")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def folder_hash(folder: str | Path, patterns: tuple[str, ...] = ("tokenizer*", "*.model", "vocab*", "merges*",
                                                                 "special_tokens_map.json", "added_tokens.json")) -> str:
    """A short content hash of a tokenizer (or any) folder's matching files."""
    digest = hashlib.sha256()
    root = Path(folder)
    files = sorted({p for pattern in patterns for p in root.glob(pattern) if p.is_file()})
    for path in files:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(engine, root: Path, step: int, trainer_state: dict, recipe_yaml: str, manifest: dict,
         keep_last: int, modules: dict | None = None) -> Path:
    """Collective: every rank calls it. Returns the checkpoint folder. ``modules``: the run's
    trainable-module manifest (:func:`mlot_ds.engine.modules.module_manifest`), recorded when not empty."""
    tag = tag_for(step)
    folder = root / tag
    if dist.is_rank0() and folder.exists():
        if (folder / COMPLETE).is_file():  # checked at setup; never replace a complete checkpoint
            raise CheckpointError(f"{folder}: a complete checkpoint is already there; refusing to overwrite it")
        shutil.rmtree(folder)  # an incomplete leftover of a crashed save of the same step
    dist.barrier()
    engine.save_checkpoint(str(root), tag=tag, exclude_frozen_parameters=True, save_latest=False)
    torch.save(rng_state(), folder / f"rng_rank{dist.rank()}.pt")
    dist.barrier()
    if dist.is_rank0():
        (folder / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
        (folder / "recipe.yaml").write_text(recipe_yaml)
        (folder / "teachers.json").write_text(json.dumps(manifest, indent=2))
        trainable.write_manifest(folder, modules or {})
        (folder / COMPLETE).write_text("ok\n")
        _replace_text(root / LATEST, tag + "\n")
        _prune(root, keep_last)
    dist.barrier()
    return folder


def _replace_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _prune(root: Path, keep_last: int) -> None:
    best = root / BEST
    keep = {best.read_text().split()[0]} if best.is_file() else set()
    complete = sorted(p for p in root.glob("step_*") if (p / COMPLETE).is_file())
    for old in complete[:-keep_last]:
        if old.name not in keep:
            shutil.rmtree(old, ignore_errors=True)


def mark_best(root: Path, folder: Path, metric: str, value: float) -> None:
    """Rank 0: record ``folder`` as the best checkpoint so far (pruning keeps it)."""
    _replace_text(root / BEST, f"{folder.name} {metric} {value!r}\n")


def find_latest(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (by the ``latest`` pointer, else by scanning)."""
    pointer = root / LATEST
    if pointer.is_file():
        folder = root / pointer.read_text().strip()
        if (folder / COMPLETE).is_file():
            return folder
    complete = sorted(p for p in root.glob("step_*") if (p / COMPLETE).is_file())
    return complete[-1] if complete else None


def check_manifest(saved: dict, current: dict, folder: Path, allow_change: bool) -> None:
    """Refuse to resume with a different teacher set unless the recipe allows it."""
    if allow_change:
        return
    saved_teachers = {t["name"]: t for t in saved.get("teachers", [])}
    current_teachers = {t["name"]: t for t in current.get("teachers", [])}
    if saved_teachers.keys() != current_teachers.keys():
        raise CheckpointError(
            f"{folder}: saved with teachers {sorted(saved_teachers)} but this run has {sorted(current_teachers)}; "
            f"set train.allow_teacher_change=true to resume anyway"
        )
    for name, before in saved_teachers.items():
        now = current_teachers[name]
        for key in ("model", "tokenizer_hash", "loss", "pairing"):
            if before.get(key) != now.get(key):
                raise CheckpointError(
                    f"{folder}: teacher {name!r} changed its {key} ({before.get(key)!r} -> {now.get(key)!r}); "
                    f"set train.allow_teacher_change=true to resume anyway"
                )


def saved_world_size(folder: Path) -> int | None:
    """The number of ranks that wrote the checkpoint ``folder`` (``None`` if it does not say)."""
    if not (folder / "trainer_state.json").is_file():
        return None
    return read_json(folder, "trainer_state.json").get("world_size")


def check_compatible(folder: Path, manifest: dict, allow_teacher_change: bool, world_size: int,
                     steps_per_epoch: int, reshard: bool = False, modules: dict | None = None) -> None:
    """Everything that can be checked before DeepSpeed touches the checkpoint, with clear errors.

    ``modules``: this run's trainable modules; they must be the ones the checkpoint was saved with
    (whatever ``allow_teacher_change`` says: their weights and moments are in the shards)."""
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint folder (train.resume names a step_N folder of a run)")
    for name in (COMPLETE, "trainer_state.json", "teachers.json"):
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder}: not a complete checkpoint (no {name})")
    check_manifest(read_json(folder, "teachers.json"), manifest, folder, allow_teacher_change)
    try:
        trainable.check_same_modules(folder, modules or {})
    except trainable.ModuleConfigError as exc:
        raise CheckpointError(str(exc)) from None
    state = read_json(folder, "trainer_state.json")
    _check_rng_files(folder, int(state.get("world_size", world_size)))
    saved_world = state.get("world_size", world_size)
    if saved_world != world_size and not reshard:
        raise CheckpointError(
            f"{folder}: saved by {saved_world} ranks, this run has {world_size}. Resume with {saved_world} ranks, "
            f"or set train.reshard_on_resume=true to convert the checkpoint to DeepSpeed's universal format"
        )
    if state.get("steps_per_epoch", steps_per_epoch) != steps_per_epoch:
        hint = ""
        if saved_world != world_size:
            saved_batch = state.get("global_batch")
            hint = (f"; with {world_size} rank{'s' if world_size != 1 else ''} keep the global batch"
                    + (f" of {saved_batch} records" if saved_batch else "")
                    + " (train.micro_batch_size * train.grad_accum * ranks)")
        raise CheckpointError(
            f"{folder}: saved with {state['steps_per_epoch']} steps per epoch, this run has {steps_per_epoch} "
            f"(different data or batch size): the data position cannot be restored{hint}"
        )


def _check_rng_files(folder: Path, saved_world: int) -> None:
    """Every rank's RNG file is a whole torch zip (a truncated one would fail only at load)."""

    for rank_index in range(saved_world):
        path = folder / f"rng_rank{rank_index}.pt"
        if path.is_file() and not zipfile.is_zipfile(path):
            raise CheckpointError(f"{path}: damaged or truncated (not a readable torch file); {_earlier_hint(folder)}")


def universal_copy(folder: Path) -> Path:
    """Collective: ``folder`` converted to DeepSpeed's universal format, in ``folder/universal``.

    Rank 0 converts once, in a staging folder beside the checkpoint (DeepSpeed's converter also writes
    a pointer file next to its output), then moves the result in; every rank waits for it. The
    checkpoint's own files are only read, so a failed or killed conversion leaves them intact.
    """
    target = folder / UNIVERSAL

    def convert() -> None:
        if target.is_dir():
            return
        staging = folder.parent / f".{folder.name}.{UNIVERSAL}"
        shutil.rmtree(staging, ignore_errors=True)
        partial = staging / UNIVERSAL
        workers = max(1, min(8, os.cpu_count() or 1))
        command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(folder),
                   "--output_folder", str(partial), "--num_extract_workers", str(workers),
                   "--num_merge_workers", str(max(1, workers // 2))]
        # The converter's own progress bars stay visible: a large student takes minutes.
        result = subprocess.run(command)
        if result.returncode != 0:
            shutil.rmtree(staging, ignore_errors=True)
            raise CheckpointError(f"{folder}: conversion to the universal format failed (exit {result.returncode}; "
                                  f"the converter's output is above); the checkpoint itself is unchanged")
        for name in ("trainer_state.json", "teachers.json", "recipe.yaml", trainable.MODULES_FILE):
            if (folder / name).is_file():
                shutil.copy2(folder / name, partial / name)
        (partial / COMPLETE).write_text("")
        os.replace(partial, target)
        shutil.rmtree(staging, ignore_errors=True)

    failure = None
    if dist.is_rank0():
        try:
            convert()
        except CheckpointError as exc:
            failure = exc
    # A collective: no rank passes it before rank 0 has finished converting.
    if dist.any_rank(failure is not None):
        raise failure or CheckpointError(f"{folder}: conversion to the universal format failed on rank 0")
    return target


def load(engine, folder: Path) -> dict:
    """Collective: load the student engine and this rank's RNG; return the trainer state."""
    if not (folder / COMPLETE).is_file():
        raise CheckpointError(f"{folder}: not a complete checkpoint (no {COMPLETE} marker)")
    try:
        load_path, _ = engine.load_checkpoint(str(folder.parent), tag=folder.name,
                                              load_module_strict=False, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
    except Exception as exc:  # DeepSpeed raises many kinds; the user needs the path and the cause
        raise CheckpointError(f"{folder}: failed to load ({type(exc).__name__}: {exc})") from exc
    if load_path is None:
        raise CheckpointError(f"{folder}: DeepSpeed found no checkpoint files there")
    _restore_group_hyperparameters(engine, folder)
    rng_file = folder / f"rng_rank{dist.rank()}.pt"
    if rng_file.is_file():
        try:
            set_rng_state(torch.load(rng_file, weights_only=False))
        except (OSError, RuntimeError, EOFError, ValueError) as exc:
            raise CheckpointError(f"{rng_file}: damaged or truncated ({type(exc).__name__}); "
                                  f"{_earlier_hint(folder)}") from None
    return read_json(folder, "trainer_state.json")


def _restore_group_hyperparameters(engine, folder: Path) -> None:
    """Give every optimizer parameter group its own saved hyper-parameters after a universal load.

    DeepSpeed's ZeRO-3 universal loader sets every group's learning rate (and betas, eps, ...) from
    the first group's, which is right only with one group; with the trainable modules' groups the
    first step after a re-sharded resume would train them at the student's rate. The universal
    folder keeps each group's values (``zero/optimizer_state.pt``); they are read back memory-mapped.
    """
    saved_path = folder / "zero" / "optimizer_state.pt"
    groups = getattr(getattr(engine, "optimizer", None), "param_groups", None)
    if not saved_path.is_file() or not groups or len(groups) < 2:
        return
    try:
        saved = torch.load(saved_path, map_location="cpu", weights_only=False, mmap=True).get("param_groups")
    except (OSError, RuntimeError, ValueError, EOFError) as exc:
        raise CheckpointError(f"{saved_path}: damaged or truncated ({type(exc).__name__}); {_earlier_hint(folder)}") from None
    if not saved or len(saved) != len(groups):
        raise CheckpointError(f"{saved_path}: holds {len(saved or [])} optimizer parameter groups, this run has "
                              f"{len(groups)}")
    for group, values in zip(groups, saved):
        group.update({key: value for key, value in values.items() if key != "params"})


def export_hf(engine, tokenizer, out_dir: Path, modules: dict | None = None) -> Path:
    """Collective: gather the ZeRO-3 shards and write a Hugging Face folder (safetensors) on rank 0.

    ``out_dir`` is replaced only if it is absent, empty, or an earlier export (see :mod:`mlot_ds.outputs`).
    With trainable modules (``modules``: the run's manifest) the export holds the student's own weights
    only, and the modules go to the ``projectors/`` folder beside it.
    """

    module = engine.module
    failure = None
    if dist.is_rank0():
        try:
            outputs.check_folder(out_dir, EXPORT_KIND, "export.dir")
            if modules:
                trainable.check_projectors_target(out_dir, "export.dir")
        except outputs.OutputError as exc:
            failure = exc
    if dist.any_rank(failure is not None):  # every rank stops before the gathers, none half-way
        raise failure or CheckpointError(f"{out_dir}: the export target was refused on rank 0")
    state = {}
    for name, parameter in module.named_parameters():
        with deepspeed.zero.GatheredParameters([parameter], modifier_rank=None):
            if dist.is_rank0():
                state[name] = parameter.detach().to("cpu").clone()
    for name, buffer in module.named_buffers():
        if dist.is_rank0():
            state[name] = buffer.detach().to("cpu").clone()
    if dist.is_rank0():
        module_state = {}
        if modules:
            state, module_state = trainable.split_state(state)

        def fill(staging: Path) -> None:
            module.save_pretrained(staging, state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(staging)

        outputs.replace_folder(out_dir, EXPORT_KIND, fill, "export.dir")
        if modules:
            trainable.write_projectors(out_dir, module_state, modules, "export.dir")
    dist.barrier()
    return out_dir


def resolve_checkpoint(path: Path) -> Path:
    """``path`` itself when it is a complete ``step_N`` checkpoint, else the newest one inside it."""
    if (path / COMPLETE).is_file():
        return path
    latest = find_latest(path) if path.is_dir() else None
    if latest is None:
        raise CheckpointError(f"{path}: not a complete checkpoint folder, and no complete checkpoint inside it")
    return latest


def consolidate(folder: Path, with_modules: bool = False):
    """The student of a checkpoint as a plain Hugging Face model on the CPU, with its tokenizer and recipe.

    The ZeRO-3 shards are merged in memory (DeepSpeed's ``zero_to_fp32``); the student's config and
    tokenizer come from the base folder its recipe names. Used by ``tools/export_hf.py`` and
    ``tools/evaluate.py``. Returns ``(model, tokenizer, recipe)``; with ``with_modules`` also the
    trainable modules' tensors and manifest ``(state, manifest)`` (empty when there are none), which
    are never part of the model.
    """

    folder = resolve_checkpoint(Path(folder))
    try:
        recipe = load_recipe(folder / "recipe.yaml")
        # A GGUF base (a .gguf file or a packaged zoo name) is converted again if the cache lost it.
        student_dir = local_model(recipe.student.model, recipe, "student.model")
        tokenizer_dir = local_model(recipe.student.tokenizer or recipe.student.model, recipe, "student.tokenizer")
    except BadInput as exc:  # the recipe, or a base model it names (a zoo name, a GGUF file, its package)
        raise CheckpointError(f"{folder / 'recipe.yaml'}: {exc}") from None
    if not (student_dir / "config.json").is_file():
        raise CheckpointError(f"{folder}: the student's base folder {student_dir} (named by its recipe) is missing; "
                              f"its config and tokenizer are needed")

    try:
        state = get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
    except Exception as exc:  # a damaged shard surfaces as torch's zip errors, KeyError, ValueError...
        raise CheckpointError(f"{folder}: cannot read its ZeRO-3 shards ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}); {_earlier_hint(folder)}") from None
    state, module_state = trainable.split_state(state)
    trust = recipe.student.trust_remote_code
    config = AutoConfig.from_pretrained(student_dir, local_files_only=True, trust_remote_code=trust)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [name for name in missing if name not in tied]
    if missing or unexpected:
        raise CheckpointError(f"{folder}: checkpoint does not match the student architecture "
                              f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    model.tie_weights()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    if with_modules:
        return model.eval(), tokenizer, recipe, (module_state, trainable.read_manifest(folder))
    return model.eval(), tokenizer, recipe
