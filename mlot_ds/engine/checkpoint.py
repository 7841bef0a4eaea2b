"""Checkpoints of the student engine (teachers excluded), atomic ``latest`` pointer, and HF export.

Layout of ``<output_dir>/checkpoints``::

    step_00000010/            DeepSpeed's ZeRO-3 shards (student only) + our files:
        trainer_state.json    global step, weighting state, skip counters
        rng_rank<r>.pt        every rank's RNG states
        recipe.yaml           the resolved recipe
        teachers.json         the teacher manifest (names, paths, tokenizer hashes, weights, losses)
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
from pathlib import Path

import numpy as np
import torch

from mlot_ds import dist

COMPLETE = "COMPLETE"
LATEST = "latest"
UNIVERSAL = "universal"
BEST = "best"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used. The message names its folder."""


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
         keep_last: int) -> Path:
    """Collective: every rank calls it. Returns the checkpoint folder."""
    tag = tag_for(step)
    folder = root / tag
    if dist.is_rank0() and folder.exists():
        shutil.rmtree(folder)  # an incomplete leftover of a crashed save of the same step
    dist.barrier()
    engine.save_checkpoint(str(root), tag=tag, exclude_frozen_parameters=True, save_latest=False)
    torch.save(rng_state(), folder / f"rng_rank{dist.rank()}.pt")
    dist.barrier()
    if dist.is_rank0():
        (folder / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
        (folder / "recipe.yaml").write_text(recipe_yaml)
        (folder / "teachers.json").write_text(json.dumps(manifest, indent=2))
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
    state_file = folder / "trainer_state.json"
    if not state_file.is_file():
        return None
    return json.loads(state_file.read_text()).get("world_size")


def check_compatible(folder: Path, manifest: dict, allow_teacher_change: bool, world_size: int,
                     steps_per_epoch: int, reshard: bool = False) -> None:
    """Everything that can be checked before DeepSpeed touches the checkpoint, with clear errors."""
    for name in (COMPLETE, "trainer_state.json", "teachers.json"):
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder}: not a complete checkpoint (no {name})")
    check_manifest(json.loads((folder / "teachers.json").read_text()), manifest, folder, allow_teacher_change)
    state = json.loads((folder / "trainer_state.json").read_text())
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
        for name in ("trainer_state.json", "teachers.json", "recipe.yaml"):
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
    rng_file = folder / f"rng_rank{dist.rank()}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return json.loads((folder / "trainer_state.json").read_text())


def export_hf(engine, tokenizer, out_dir: Path) -> Path:
    """Collective: gather the ZeRO-3 shards and write a Hugging Face folder (safetensors) on rank 0."""
    import deepspeed

    module = engine.module
    state = {}
    for name, parameter in module.named_parameters():
        with deepspeed.zero.GatheredParameters([parameter], modifier_rank=None):
            if dist.is_rank0():
                state[name] = parameter.detach().to("cpu").clone()
    for name, buffer in module.named_buffers():
        if dist.is_rank0():
            state[name] = buffer.detach().to("cpu").clone()
    if dist.is_rank0():
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        module.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
    dist.barrier()
    return out_dir
