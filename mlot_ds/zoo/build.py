"""Build the zoo into the user cache, once per settings fingerprint, safely across processes.

Layout: ``<cache>/zoo/<fingerprint>/<member>/`` holds ``config.json``, ``generation_config.json``,
``model.safetensors``, the tokenizer files and ``zoo_member.json`` (its build record);
``<cache>/zoo/<fingerprint>/report.json`` gathers the records. ``<cache>`` is ``cache_dir``, else
``$MLOT_DS_CACHE``, else ``~/.cache/mlot_ds``.

A member is built into a temporary folder and renamed into place, so a member folder that exists is
complete. An exclusive ``fcntl`` lock per member makes a second process wait for the first instead
of building the same member again. Builds run on the CPU: the models are small, and CPU arithmetic
keeps the artefacts identical on every machine for a given seed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import random
import shutil
import time
from pathlib import Path

import torch

from mlot_ds.zoo.corpus import read_records, reference_summaries, render_context, render_response
from mlot_ds.zoo.settings import MEMBERS, STUDENT, TEACHERS, ZooSettings

logger = logging.getLogger(__name__)

CACHE_ENV = "MLOT_DS_CACHE"
MEMBER_RECORD = "zoo_member.json"
REPORT = "report.json"
EVAL_BATCH_SIZE = 16


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
    settings: ZooSettings = ZooSettings(), cache_dir: Path | str | None = None, progress: bool = True
) -> dict[str, Path]:
    """Build whatever is missing of the zoo and return ``member -> folder``; idempotent."""
    root = zoo_root(settings, cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    for member in MEMBERS:
        target = root / member
        if target.is_dir():
            continue
        with _exclusive(root / f".{member}.lock", f"waiting for another process building {target}"):
            if target.is_dir():
                continue
            for stale in root.glob(f".tmp-{member}-*"):
                shutil.rmtree(stale, ignore_errors=True)
            staging = root / f".tmp-{member}-{os.getpid()}"
            try:
                _build_member(member, settings, staging, progress)
                os.rename(staging, target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            logger.info("zoo: built %s", target)
    report = root / REPORT
    if not report.is_file():
        with _exclusive(root / f".{REPORT}.lock", f"waiting for another process writing {report}"):
            if not report.is_file():
                staging = root / f".tmp-{REPORT}-{os.getpid()}"
                staging.write_text(json.dumps(_report(settings, root), indent=2) + "\n")
                os.replace(staging, report)
    return {member: root / member for member in MEMBERS}


@contextlib.contextmanager
def _exclusive(lock_file: Path, waiting_message: str):
    with open(lock_file, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("zoo: %s", waiting_message)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def member_seed(settings: ZooSettings, member: str) -> int:
    """A distinct seed for every (settings seed, member) pair."""
    return settings.seed * len(MEMBERS) + MEMBERS.index(member)


def _build_member(member: str, settings: ZooSettings, folder: Path, progress: bool) -> None:
    # Heavy imports here so that importing mlot_ds.zoo stays cheap.
    from mlot_ds.eval.bpb import bits_per_byte
    from mlot_ds.zoo.models import ARCHITECTURES, build_model
    from mlot_ds.zoo.tokenizer_training import train_tokenizer
    from mlot_ds.zoo.training import pretraining_batches, train_causal_lm, tuning_batches

    started, cpu_started = time.perf_counter(), time.process_time()
    profile = settings.resolved()
    spec = profile.members[member]
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
        final_pretrain_loss=_tail_mean(pretrain_losses),
        final_tune_loss=_tail_mean(tune_losses) if tune_losses else None,
        eval_references=len(eval_pairs),
        eval_bytes=sum(len(response.encode("utf-8")) for response in eval_responses),
        build_seconds=round(time.perf_counter() - started, 2),
        build_cpu_seconds=round(time.process_time() - cpu_started, 2),
    )
    (folder / MEMBER_RECORD).write_text(json.dumps(record, indent=2) + "\n")


def _tail_mean(losses: list[float], window: int = 10) -> float:
    tail = losses[-window:]
    return round(sum(tail) / len(tail), 4)


def _report(settings: ZooSettings, root: Path) -> dict:
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
        "build_seconds": round(sum(r["build_seconds"] for r in records.values()), 2),
        "build_cpu_seconds": round(sum(r["build_cpu_seconds"] for r in records.values()), 2),
    }
