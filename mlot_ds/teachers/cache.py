"""Offline teacher cache: what a teacher's method needs, computed once, stored memory-mapped and sharded.

One folder per teacher (``TeacherConfig.cache_dir``)::

    manifest.json               what the cache is bound to (see :func:`binding`) and its layout
    chunk-00000.safetensors     the kept training records [0, R), written atomically when complete
    chunk-00001.safetensors     records [R, 2R) ...

Ranks build different chunks; a chunk file exists only once complete, so an interrupted build
resumes with the missing ones. Every chunk holds, per record: ``record_ids`` and ``digests``
(int64; the digest covers the teacher's input ids and the teacher rows the method reads),
``row_offsets`` (int64, ``[r + 1]``, into the per-row arrays), ``gold_ce`` and ``gold_tokens``
(float32, the teacher's summed cross-entropy on the gold response, for dynamic weights); and what
the method stores (:meth:`~mlot_ds.losses.method.Method.to_cache`): ``record.<name>`` arrays
``[r, ...]`` and ``row.<name>`` arrays ``[N, ...]``, one row per entry of the method's
:meth:`~mlot_ds.losses.method.Method.cache_rows` (pairs for MultiLevelOT, ULD and MinED; response
rows for the likelihood methods), in row-major order. What each method stores, and how exact it is,
is in its class (e.g. MultiLevelOT: the ranked ids per record and ``t^k`` per pair in bf16).

A method whose student side needs a run constant of the teacher (the output layer's weight, for
DSKD's teacher-space term) also gets ``constants.safetensors``: those tensors, in the model's dtype,
written once by rank 0 and handed back on opening (``Method.bind_teacher_constants``). Caches of
every other method have no such file.

Files are read through ``safetensors.safe_open`` (memory-mapped): only the records of a
micro-batch are copied out. Methods whose teacher side spans the whole batch (``official``)
have no per-record cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mlot_ds import dist
from mlot_ds.config import Recipe, RecipeError
from mlot_ds.data.encode import ENCODE_FORMAT_VERSION, PAIRS_FORMAT_VERSION
from mlot_ds.data.sources import resolve_data_path
from mlot_ds.losses.method import OUTPUT_WEIGHT, FrozenWeight, TeacherOutput
from mlot_ds.pairing.surface import tokenizer_fingerprint

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
CONSTANTS = "constants.safetensors"
RECORD_PREFIX, ROW_PREFIX = "record.", "row."
BINDING_KEYS = ("checkpoint", "tokenizer", "template", "data", "pairing", "loss")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
SAMPLED_BLOCKS, BLOCK_BYTES = 16, 1 << 16


class TeacherCacheError(RecipeError):
    """A teacher cache is missing, incomplete, or was built for a different setup."""


# ------------------------------------------------------------------------------------ binding


def _sha(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def checkpoint_hash(folder: str | Path) -> str:
    """``config.json`` in full, and every weight file's name, size and 16 evenly spaced 64 KiB blocks.

    Sampling keeps this fast on multi-GB checkpoints; any re-trained or re-saved model changes it.
    """
    root = Path(folder)
    digest = hashlib.sha256((root / "config.json").read_bytes())
    for path in sorted(p for p in root.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file()):
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as handle:
            for block in range(SAMPLED_BLOCKS):
                handle.seek(max(0, (size - BLOCK_BYTES) * block // (SAMPLED_BLOCKS - 1)))
                digest.update(handle.read(BLOCK_BYTES))
    return digest.hexdigest()[:16]


def _files_hash(path: Path) -> str:
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def data_fingerprint(recipe: Recipe, student_tokenizer) -> str:
    """The training records (file contents and loading settings) and how the student side sees them."""
    train, student = recipe.data.train, recipe.student
    return _sha({
        "files": _files_hash(resolve_data_path(train.path, "data.train.path")), "adapter": train.adapter, "fields": train.fields,
        "limit": train.limit, "bad_rows": recipe.data.bad_rows, "max_length": recipe.data.max_length,
        "student_tokenizer": tokenizer_fingerprint(student_tokenizer), "student_template": dataclasses.asdict(student.template),
        "student_append_eos": student.append_eos, "distill_final_eos": student.distill_final_eos,
        "encoding": [ENCODE_FORMAT_VERSION, PAIRS_FORMAT_VERSION],
    })


def binding(recipe: Recipe, index: int, model_path, teacher_tokenizer, student_tokenizer, method) -> dict:
    """What a cache is bound to: teacher checkpoint, tokenizer, prompt template, data, pairing, loss."""
    teacher = recipe.teachers[index]
    return {
        "checkpoint": checkpoint_hash(model_path),
        "tokenizer": tokenizer_fingerprint(teacher_tokenizer)[:16],
        "template": {**dataclasses.asdict(teacher.template), "append_eos": teacher.append_eos},
        "data": data_fingerprint(recipe, student_tokenizer),
        "pairing": teacher.pairing,
        "loss": method.cache_settings(),
    }


def check_binding(found: dict, expected: dict, where: str, folder: Path) -> None:
    """Raise one :class:`TeacherCacheError` naming every bound setting that differs."""
    differences = [f"{key} (cache: {found.get(key)!r}, this run: {expected[key]!r})"
                   for key in BINDING_KEYS if found.get(key) != expected[key]]
    if differences:
        raise TeacherCacheError(
            f"{where}: the teacher cache {folder} was built for a different setup; differs: "
            f"{'; '.join(differences)}. Rebuild it with tools/cache_teachers.py (same recipe and overrides), "
            f"or set the teacher's source to live"
        )


def record_digests(input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: torch.Tensor,
                   mask: torch.Tensor) -> list[int]:
    """Per sequence: a 64-bit hash of the teacher's input ids and the teacher rows ``rows[mask]`` read."""
    ids, lengths = input_ids.cpu(), attention_mask.sum(dim=1).cpu()
    rows, mask = rows.cpu(), mask.cpu()
    digests = []
    for b in range(ids.shape[0]):
        digest = hashlib.blake2b(ids[b, : int(lengths[b])].numpy().tobytes(), digest_size=8)
        digest.update(rows[b][mask[b]].numpy().tobytes())
        digests.append(int.from_bytes(digest.digest(), "little", signed=True))
    return digests


def chunk_path(folder: Path, chunk: int) -> Path:
    return folder / f"chunk-{chunk:05d}.safetensors"


# ------------------------------------------------------------------------------------ reading


class TeacherCache:
    """A complete cache folder, opened for reading; :meth:`read` gives what the live teacher gives."""

    def __init__(self, folder: Path, manifest: dict, where: str):

        self.folder, self.manifest, self.where = folder, manifest, where
        self._handles, self._records = [], {}
        for chunk in range(manifest["num_chunks"]):
            try:
                handle = safe_open(str(chunk_path(folder, chunk)), framework="pt")
                names = list(handle.keys())
                small = {name: handle.get_tensor(name) for name in names if not name.startswith(ROW_PREFIX)}
            except (OSError, SafetensorError) as exc:
                raise TeacherCacheError(f"{where}: {chunk_path(folder, chunk)} is damaged ({str(exc).splitlines()[0]}); "
                                        f"delete that chunk and run tools/cache_teachers.py again to rebuild it") from None
            self._handles.append(handle)
            self._row_names = [name for name in names if name.startswith(ROW_PREFIX)]
            self._record_names = [name for name in names if name.startswith(RECORD_PREFIX)]
            for row, record in enumerate(small["record_ids"].tolist()):
                self._records[record] = (chunk, row, small)

    @classmethod
    def open(cls, folder: Path, expected: dict, where: str, num_records: int) -> "TeacherCache":
        """Open and verify: the manifest's binding equals ``expected`` and every chunk is there."""
        manifest_path = folder / MANIFEST
        if not manifest_path.is_file():
            raise TeacherCacheError(f"{where}.source: 'cache' but {manifest_path} does not exist; build it with "
                                    f"tools/cache_teachers.py --recipe <this recipe> (or set {where}.cache_dir)")
        manifest = _read_manifest(manifest_path)
        if manifest is None:
            raise TeacherCacheError(f"{where}: {manifest_path} is damaged or not a teacher-cache manifest; rebuild "
                                    f"the cache with tools/cache_teachers.py --overwrite")
        if manifest.get("format") != FORMAT_VERSION:
            raise TeacherCacheError(f"{where}: {manifest_path} has format {manifest.get('format')}, expected "
                                    f"{FORMAT_VERSION}; rebuild it")
        check_binding(manifest["binding"], expected, where, folder)
        if manifest["num_records"] != num_records:
            raise TeacherCacheError(
                f"{where}: the cache {folder} holds {manifest['num_records']} records, this run "
                f"trains on {num_records} (the data, its limits or the few-shot examples changed); "
                f"rebuild it"
            )
        missing = [c for c in range(manifest["num_chunks"]) if not chunk_path(folder, c).is_file()]
        if missing:
            raise TeacherCacheError(
                f"{where}: the cache {folder} is incomplete ({len(missing)} of {manifest['num_chunks']} "
                f"chunks missing); run tools/cache_teachers.py again to finish it"
            )
        return cls(folder, manifest, where)

    def read(self, record_ids: torch.Tensor, view, method, device: torch.device):
        """The :class:`~mlot_ds.losses.method.TeacherOutput` of one micro-batch, as the live teacher
        gives it (up to the storage precision the method chose), with the gold CE."""

        if record_ids is None:
            raise ValueError(f"{self.where}: a cached teacher needs the batch's record_ids")
        row_index, mask = method.cache_rows(view)
        mask = mask.cpu()
        batch, width = mask.shape
        counts = mask.sum(dim=1).tolist()
        digests = record_digests(view.teacher.input_ids, view.teacher.attention_mask, row_index, mask)
        gold = {"ce": torch.zeros(batch), "tokens": torch.zeros(batch)}
        parts = []
        for b, record in enumerate(record_ids.tolist()):
            if record < 0:  # filler row: no labels, no rows
                continue
            if record not in self._records:
                raise TeacherCacheError(f"{self.where}: record {record} is not in the cache {self.folder}; rebuild it")
            chunk, row, small = self._records[record]
            start, stop = small["row_offsets"][row : row + 2].tolist()
            if stop - start != counts[b] or int(small["digests"][row]) != digests[b]:
                raise TeacherCacheError(
                    f"{self.where}: record {record} was cached from other tokens or rows than this "
                    f"run's ({stop - start} vs {counts[b]} rows); rebuild {self.folder}"
                )
            gold["ce"][b], gold["tokens"][b] = small["gold_ce"][row], small["gold_tokens"][row]
            parts.append((b, chunk, row, small, start, stop))
        records, rows = {}, {}
        for name in self._record_names:
            example = self._records[next(iter(self._records))][2][name]
            records[name[len(RECORD_PREFIX) :]] = out = torch.zeros((batch, *example.shape[1:]), dtype=example.dtype)
            for b, chunk, row, small, start, stop in parts:
                out[b] = small[name][row]
        for name in self._row_names:
            shape = self._handles[0].get_slice(name).get_shape()
            first = self._handles[0].get_slice(name)[0:1]
            rows[name[len(ROW_PREFIX) :]] = out = torch.zeros((batch, width, *shape[1:]), dtype=first.dtype)
            for b, chunk, row, small, start, stop in parts:
                out[b, : stop - start] = self._handles[chunk].get_slice(name)[start:stop]
        records = {name: value.to(device) for name, value in records.items()}
        rows = {name: value.to(device) for name, value in rows.items()}
        return TeacherOutput(method.from_cache(records, rows, view), {name: v.to(device) for name, v in gold.items()})


def open_caches(recipe: Recipe, inputs, methods: dict) -> dict[str, TeacherCache]:
    """Open and verify the cache of every ``source: cache`` teacher (``inputs``: a ``RunInputs``)."""
    caches = {}
    for index, teacher in enumerate(recipe.teachers):
        if teacher.source != "cache":
            continue
        where = f"teachers[{index}]"
        expected = binding(
            recipe,
            index,
            inputs.teachers[index].model,
            inputs.teacher_tokenizers[teacher.name],
            inputs.student_tokenizer,
            methods[teacher.name],
        )
        caches[teacher.name] = TeacherCache.open(
            recipe.paths().teacher_caches[teacher.name], expected, where, inputs.data.num_records
        )
        bind_cached_constants(caches[teacher.name].folder, methods[teacher.name], where)
    return caches


def write_constants(folder: Path, constants: dict[str, torch.Tensor]) -> None:
    """Rank 0: the teacher's run constants, atomically (nothing is written when there are none)."""
    if not constants:
        return
    temporary = folder / (CONSTANTS + ".tmp")
    save_file({name: value.detach().cpu().contiguous() for name, value in constants.items()}, str(temporary),
              metadata={"format": str(FORMAT_VERSION)})
    os.replace(temporary, folder / CONSTANTS)


def bind_cached_constants(folder: Path, method, where: str) -> None:
    """Give ``method`` the run constants its teacher features name, from the cache's constants file."""
    if OUTPUT_WEIGHT not in method.teacher_features():
        return
    path = folder / CONSTANTS
    try:
        with safe_open(str(path), framework="pt") as handle:
            constants = {name: handle.get_tensor(name) for name in handle.keys()}
    except (OSError, SafetensorError) as exc:
        raise TeacherCacheError(f"{where}: {path} is missing or damaged ({str(exc).splitlines()[0]}); rebuild the "
                                f"cache with tools/cache_teachers.py --overwrite") from None
    if OUTPUT_WEIGHT not in constants:
        raise TeacherCacheError(f"{where}: {path} has no {OUTPUT_WEIGHT}; rebuild the cache with tools/cache_teachers.py "
                                f"--overwrite")
    method.bind_teacher_constants({OUTPUT_WEIGHT: FrozenWeight(constants[OUTPUT_WEIGHT])})


# ------------------------------------------------------------------------------------ building


def chunk_tensors(method, output, view, record_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """One micro-batch's real records as cache arrays (CPU); rows stay in row-major ``(b, p)`` order."""
    row_index, mask = method.cache_rows(view)
    mask, real = mask.cpu(), record_ids.cpu() >= 0
    if mask[~real].any():
        raise ValueError("a filler row has pairs")
    digests = record_digests(view.teacher.input_ids, view.teacher.attention_mask, row_index, mask)
    gold = output.gold
    out = {
        "record_ids": record_ids.cpu()[real],
        "digests": torch.tensor(digests, dtype=torch.long)[real],
        "row_counts": mask.sum(dim=1)[real],
        "gold_ce": gold["ce"].float().cpu()[real],
        "gold_tokens": gold["tokens"].float().cpu()[real],
    }
    records, rows = method.to_cache(output.reduced, view)
    for name, value in records.items():
        out[RECORD_PREFIX + name] = value.cpu()[real]
    for name, value in rows.items():
        out[ROW_PREFIX + name] = value.cpu()[mask]
    return out


def write_chunk(folder: Path, chunk: int, parts: list[dict[str, torch.Tensor]]) -> None:
    """Concatenate a chunk's micro-batch arrays and write them atomically (temporary file, rename)."""

    tensors = {name: torch.cat([part[name] for part in parts]).contiguous() for name in parts[0] if name != "row_counts"}
    counts = torch.cat([part["row_counts"] for part in parts])
    tensors["row_offsets"] = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    temporary = folder / f".chunk-{chunk:05d}.rank{dist.rank()}.tmp"
    save_file(tensors, str(temporary), metadata={"format": str(FORMAT_VERSION)})
    os.replace(temporary, chunk_path(folder, chunk))


def prepare_folder(folder: Path, manifest: dict, where: str, overwrite: bool) -> None:
    """Collective: check an existing cache's manifest (every rank), then rank 0 (re)writes it.

    A cache with the same binding and layout is resumed; a different one is an error unless
    ``overwrite``, which removes that cache's own files (its manifest and chunks) first. A folder
    that holds anything but a cache is refused, with or without ``overwrite``: nothing in it is touched.
    """
    existing = folder / MANIFEST
    if folder.exists() and not folder.is_dir():
        raise TeacherCacheError(f"{where}.cache_dir: {folder} is a file; expected a folder for the teacher cache")
    found = _read_manifest(existing) if existing.is_file() else None
    foreign = sorted(p.name for p in folder.iterdir() if not _is_cache_file(p.name)) if folder.is_dir() else []
    if (existing.is_file() and found is None) or (foreign and found is None):
        what = (
            f"{existing} is not a teacher-cache manifest"
            if existing.is_file()
            else f"it holds other files ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''})"
        )
        raise TeacherCacheError(
            f"{where}.cache_dir: {folder} is not a teacher cache ({what}); refusing to write "
            f"into it: set {where}.cache_dir to a new or empty folder"
        )
    layout = ("format", "num_records", "chunk_records")
    stale = found is not None and (
        found.get("binding") != manifest["binding"] or any(found.get(key) != manifest[key] for key in layout)
    )
    if stale and not overwrite:
        check_binding(found.get("binding", {}), manifest["binding"], where, folder)
        raise TeacherCacheError(
            f"{where}: the cache {folder} has another layout "
            f"({', '.join(f'{k}={found.get(k)}' for k in layout)}); pass --overwrite to rebuild it"
        )

    def write():
        if stale:
            for path in folder.iterdir():
                if _is_cache_file(path.name) and path.is_file():
                    path.unlink()
        folder.mkdir(parents=True, exist_ok=True)
        temporary = folder / (MANIFEST + ".tmp")
        temporary.write_text(json.dumps(manifest, indent=2))
        os.replace(temporary, existing)

    dist.rank0_then_barrier(write)


def _read_manifest(path: Path) -> dict | None:
    """A teacher-cache manifest, or ``None`` when the file is not one (it is then never removed)."""
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and "binding" in manifest and "format" in manifest else None


def _is_cache_file(name: str) -> bool:
    """The files a cache build writes: its manifest and its chunks (complete or in progress)."""
    return (
        name in (MANIFEST, MANIFEST + ".tmp", CONSTANTS, CONSTANTS + ".tmp")
        or (name.startswith("chunk-") and name.endswith(".safetensors"))
        or (name.startswith(".chunk-") and name.endswith(".tmp"))
    )


def pending_chunks(folder: Path, num_chunks: int, max_chunks: int | None) -> list[int]:
    """Collective: the chunks still to build, as rank 0 sees them (every rank gets the same list)."""
    missing = [c for c in range(num_chunks) if not chunk_path(folder, c).is_file()]
    return dist.broadcast_object(missing[:max_chunks] if max_chunks is not None else missing)


def rounds(pending: list[int], chunk_sizes: list[int], micro_batch_size: int, world: int):
    """Lockstep schedule: per round, each rank's chunk (or ``None``) and the forwards every rank runs."""
    for start in range(0, len(pending), world):
        group = pending[start : start + world]
        forwards = max(math.ceil(chunk_sizes[c] / micro_batch_size) for c in group)
        yield group + [None] * (world - len(group)), forwards
