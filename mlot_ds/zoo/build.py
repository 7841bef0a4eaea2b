"""Build the zoo into the user cache, once per settings fingerprint, safely across processes.

Layout: ``<cache>/zoo/<fingerprint>/<member>/`` holds ``config.json``, ``generation_config.json``,
``model.safetensors``, the tokenizer files and ``zoo_member.json`` (its build record);
``<cache>/zoo/<fingerprint>/report.json`` gathers the records. ``<cache>`` is ``cache_dir``, else
``$MLOT_DS_CACHE``, else ``~/.cache/mlot_ds``.

A member is built into a temporary folder and renamed into place, so a member folder that exists is
complete. An exclusive ``fcntl`` lock per member makes a second process wait for the first instead
of building the same member again. Every member trains on the CPU with one thread: the models are
small, and one-thread CPU arithmetic gives the same artefacts for a given seed whatever the machine
or the number of workers. Members train side by side in worker processes, one per available CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from mlot_ds.errors import BadInput
from mlot_ds.zoo.corpus import read_records, reference_summaries, render_context, render_response
from mlot_ds.zoo.settings import MEMBERS, STUDENT, TEACHERS, ZooSettings

logger = logging.getLogger(__name__)

CACHE_ENV = "MLOT_DS_CACHE"
MEMBER_RECORD = "zoo_member.json"
REPORT = "report.json"
EVAL_BATCH_SIZE = 16
MIN_STEPS_FOR_WORKERS = 100
"""Below this many training steps in all, building in-process beats paying each worker's imports."""
LOSS_WINDOW = 10
"""The record's final losses are means over this many last steps."""


class ZooError(BadInput):
    """The zoo's cache folder cannot be used (the message names it)."""


def zoo_root(settings: ZooSettings = ZooSettings(), cache_dir: Path | str | None = None) -> Path:
    """``<cache>/zoo/<fingerprint>``: the folder of one zoo build."""
    base = Path(cache_dir or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mlot_ds")
    return base.expanduser() / "zoo" / settings.fingerprint()


def zoo_member_path(name: str, settings: ZooSettings = ZooSettings(), cache_dir: Path | str | None = None) -> Path:
    """Where ``name`` lives (or will live) for these settings; builds nothing."""
    if name not in MEMBERS:
        raise ValueError(f"unknown zoo member {name!r}; expected one of {MEMBERS}")
    return zoo_root(settings, cache_dir) / name


def zoo_report_path(settings: ZooSettings = ZooSettings(), cache_dir: Path | str | None = None) -> Path:
    return zoo_root(settings, cache_dir) / REPORT


def build_zoo(
    settings: ZooSettings = ZooSettings(),
    cache_dir: Path | str | None = None,
    progress: bool = True,
    workers: int | None = None,
) -> dict[str, Path]:
    """Build whatever is missing of the zoo and return ``member -> folder``; idempotent.

    Every member trains on one CPU thread, so its weights are the same on any machine; up to
    ``workers`` members train at once in separate processes (default: one per available CPU, or
    in-process for builds as small as the ``tiny`` profile).
    """
    started = time.perf_counter()
    root = zoo_root(settings, cache_dir)
    for folder in reversed([root, *root.parents]):
        if folder.exists() and not folder.is_dir():
            raise ZooError(f"zoo cache: {folder} is a file; the zoo is built into {root} (set zoo.cache_dir, "
                           f"--cache-dir or ${CACHE_ENV} to a folder)")
    root.mkdir(parents=True, exist_ok=True)
    missing = [member for member in MEMBERS if not (root / member).is_dir()]
    if missing:
        if workers is None:
            steps = sum(spec.pretrain_steps + spec.tune_steps for m, spec in settings.resolved().members.items() if m in missing)
            workers = len(os.sched_getaffinity(0)) if steps >= MIN_STEPS_FOR_WORKERS else 1
        workers = max(1, min(len(missing), workers))
        lanes = [missing[lane::workers] for lane in range(workers)]
        if workers == 1:
            build_lane(missing, settings, root, progress, position=0)
        else:
            _run_lanes_in_subprocesses(lanes, settings, root, progress)
    report = root / REPORT
    if not report.is_file():
        with _exclusive(root / f".{REPORT}.lock", f"zoo: waiting for another process writing {report}", progress):
            if not report.is_file():
                staging = root / f".tmp-{REPORT}-{os.getpid()}"
                wall_seconds = round(time.perf_counter() - started, 2) if missing else None
                staging.write_text(json.dumps(_report(settings, root, wall_seconds), indent=2) + "\n")
                os.replace(staging, report)
    return {member: root / member for member in MEMBERS}


def build_lane(members: list[str], settings: ZooSettings, root: Path, progress: bool, position: int) -> None:
    """Build ``members`` one after the other (each under its lock), single-threaded."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for member in members:
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


def _run_lanes_in_subprocesses(lanes: list[list[str]], settings: ZooSettings, root: Path, progress: bool) -> None:
    # Fresh interpreters (not fork, not multiprocessing's spawn) so that nothing of the caller is
    # inherited or re-imported: the caller may be a DeepSpeed rank or a script without a main guard.
    package_parent = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")]))}
    workers = []
    try:
        for position, lane in enumerate(lanes):
            job = {
                "settings": dataclasses.asdict(settings),
                "root": str(root),
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
        from tqdm.auto import tqdm

        tqdm.write(message, file=sys.stderr)
    else:
        logger.info(message)


@contextlib.contextmanager
def _exclusive(lock_file: Path, waiting_message: str, progress: bool):
    with open(lock_file, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _announce(waiting_message, progress)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build_member(member: str, settings: ZooSettings, folder: Path, progress: bool, position: int) -> None:
    # Heavy imports here so that importing mlot_ds.zoo stays cheap.
    import torch

    from mlot_ds.eval.bpb import bits_per_byte
    from mlot_ds.zoo.models import ARCHITECTURES, build_model
    from mlot_ds.zoo.tokenizer_training import train_tokenizer
    from mlot_ds.zoo.training import pretraining_batches, train_causal_lm, tuning_batches

    started, cpu_started = time.perf_counter(), time.process_time()
    profile = settings.resolved()
    spec = profile.members[member]
    seed = settings.seed * len(MEMBERS) + MEMBERS.index(member)  # distinct for every (seed, member)
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
        if member == STUDENT:
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


def _report(settings: ZooSettings, root: Path, wall_seconds: float | None) -> dict:
    records = {member: json.loads((root / member / MEMBER_RECORD).read_text()) for member in MEMBERS}
    student_bpb = records[STUDENT]["bits_per_byte"]
    return {
        "fingerprint": settings.fingerprint(),
        "settings": settings.describe(),
        "eval": {
            "split": "test (bundled sample)",
            "dialogues": settings.resolved().eval_dialogues,
            "references": records[STUDENT]["eval_references"],
            "bytes": records[STUDENT]["eval_bytes"],
        },
        "members": records,
        "bits_per_byte": {member: round(records[member]["bits_per_byte"], 4) for member in MEMBERS},
        "student_untrained_bits_per_byte": round(records[STUDENT]["untrained_bits_per_byte"], 4),
        "teacher_margin_over_student": {
            teacher: round(1 - records[teacher]["bits_per_byte"] / student_bpb, 4) for teacher in TEACHERS
        },
        # Members build side by side, so the wall time of the whole build is less than their sum.
        "build_wall_seconds": wall_seconds,
        "member_build_seconds_sum": round(sum(r["build_seconds"] for r in records.values()), 2),
        "member_build_cpu_seconds_sum": round(sum(r["build_cpu_seconds"] for r in records.values()), 2),
    }
