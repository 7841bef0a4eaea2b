#!/usr/bin/env python
"""Training-step time and peak resident memory per rank, with live, chunked and cached teachers.

    python tools/bench_step.py                                  # every variant, 2 ranks, 128k-entry heads
    python tools/bench_step.py --variants sft,live3-chunked,cached3 --rounds 5

Builds (once, in ``--work``) a student (GPT-2, ``--student-vocab`` rows) and three teachers
(Llama, Qwen2, OPT; ``--vocab`` output rows each, default 128256 as Llama 3) with a small hidden
size and random weights, over the tiny zoo's tokenizers; writes a recipe on the bundled DialogSum
sample; builds the three teachers' offline cache with ``tools/cache_teachers.py`` (timed, as one
2-rank job); then runs ONE 2-rank DeepSpeed ZeRO-3 job that sets up the real trainer with the
student, the three live teachers and their caches, and calls ``Trainer.train_step`` for every
variant in turn, ``--rounds`` times (after one warm-up round), so that the load of other
processes hits every variant alike. Per step: the wall time (of the slowest rank) and the growth
of the resident set during the step (``VmHWM`` reset to ``VmRSS`` just before it). Then each live
teacher's reduce alone (full logits, then chunked, twice) on one micro-batch: time, resident-set
growth, and the size of what it keeps for the student side. Variants:

- ``sft``: the student alone (its CE through ``masked_ce``).
- ``live1-full`` / ``live1-chunked``: + the Llama teacher, full logits / output layer in chunks.
- ``live3-full`` / ``live3-chunked``: + all three teachers.
- ``cached3``: + all three teachers read from the offline cache.

All teachers use MultiLevelOT (default preset, k = 50), ZeRO-3 ``shard`` placement and offsets
pairing. Results go to ``<work>/results.json``; the load average during the run is printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("sft", "live1-full", "live1-chunked", "live3-full", "live3-chunked", "cached3")
ZOO_MEMBERS = {"llama": "teacher-llama", "qwen": "teacher-qwen", "opt": "teacher-opt"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/mlot_bench_step", help="models, recipe, cache and results (reused)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timed rounds (one step per variant each)")
    parser.add_argument("--vocab", type=int, default=128256, help="teacher output rows")
    parser.add_argument("--student-vocab", type=int, default=50257)
    parser.add_argument("--hidden", type=int, default=64, help="the student's hidden size")
    parser.add_argument("--teacher-hidden", type=int, default=64)
    parser.add_argument("--teacher-layers", type=int, default=2)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per rank")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------ setup


def build_models(work: Path, args) -> dict[str, Path]:
    """Random-weight models over the tiny zoo's tokenizers, with large output layers (built once)."""
    import torch
    from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM,
                              Qwen2Config, Qwen2ForCausalLM)

    from mlot_ds.zoo import ZooSettings, build_zoo

    zoo = build_zoo(ZooSettings(profile="tiny"), progress=False)
    h, th, layers, positions = args.hidden, args.teacher_hidden, args.teacher_layers, max(args.max_length, 64)
    shared = dict(hidden_size=th, intermediate_size=th * 2, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=positions)
    configs = {
        "student": lambda ids: GPT2LMHeadModel(GPT2Config(vocab_size=args.student_vocab, n_embd=h, n_layer=2, n_head=4,
                                                          n_positions=positions, **ids)),
        "llama": lambda ids: LlamaForCausalLM(LlamaConfig(vocab_size=args.vocab, tie_word_embeddings=False, **shared, **ids)),
        "qwen": lambda ids: Qwen2ForCausalLM(Qwen2Config(vocab_size=args.vocab, tie_word_embeddings=True, **shared, **ids)),
        "opt": lambda ids: OPTForCausalLM(OPTConfig(vocab_size=args.vocab, hidden_size=th, ffn_dim=th * 2,
                                                    num_hidden_layers=layers, num_attention_heads=4, word_embed_proj_dim=th,
                                                    max_position_embeddings=positions, **ids)),
    }
    folders = {}
    for name, make in configs.items():
        size = f"{args.student_vocab}-h{h}" if name == "student" else f"{args.vocab}-h{th}-l{layers}"
        folder = work / "models" / f"{name}-{size}"
        folders[name] = folder
        if (folder / "config.json").is_file():
            continue
        source = zoo["student" if name == "student" else ZOO_MEMBERS[name]]
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}
        torch.manual_seed(0)
        partial = folder.with_suffix(".partial")
        shutil.rmtree(partial, ignore_errors=True)
        make(ids).save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        partial.rename(folder)
    return folders


def write_recipe(work: Path, folders: dict[str, Path], args) -> Path:
    import yaml

    records = args.micro_batch_size * args.ranks * args.rounds  # one global step per round
    teachers = [{"name": name, "model": str(folders[name]), "pairing": "offsets", "loss": {"kind": "mlot", "preset": "default"},
                 "placement": "shard"} for name in ZOO_MEMBERS]
    recipe = {
        "name": "bench-step", "student": {"model": str(folders["student"])}, "teachers": teachers,
        "data": {"train": {"adapter": "dialogsum", "path": "builtin:dialogsum/train", "limit": records},
                 "eval": None, "max_length": args.max_length, "cache_dir": str(work / "cache")},
        "train": {"output_dir": str(work / "run"), "micro_batch_size": args.micro_batch_size, "max_steps": 10**6,
                  "warmup_steps": 0, "resume": "none", "save_every": 0},
        "export": {"enabled": False},
    }
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


# ------------------------------------------------------------------------------------ worker


def rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> float:
    """Make VmHWM (peak resident set) equal to the current resident set; return that, in MB."""
    Path("/proc/self/clear_refs").write_text("5")
    return rss_mb("VmRSS")


def variant_teachers(variant: str, live: list, cached: list) -> list:
    if variant == "sft":
        return []
    if variant == "cached3":
        return cached
    count, mode = variant[len("live"):].split("-")
    return [dataclasses.replace(t, hidden_path=mode == "chunked") for t in live[: int(count)]]


def tensor_bytes(value) -> int:
    """Bytes of every tensor in a method's reduced teacher output (tensors, tuples, dicts, dataclasses)."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (tuple, list)):
        return sum(tensor_bytes(v) for v in value)
    if dataclasses.is_dataclass(value):
        return sum(tensor_bytes(getattr(value, f.name)) for f in dataclasses.fields(value))
    return 0


def worker(args) -> int:
    """Every variant in this one job, interleaved step by step; then each live teacher's reduce alone."""
    import torch
    import torch.distributed as torch_dist

    from mlot_ds import dist
    from mlot_ds.config import load_recipe
    from mlot_ds.engine.ds_config import read_ds_config
    from mlot_ds.engine.trainer import Trainer, teacher_view
    from mlot_ds.teachers.cache import open_caches
    from mlot_ds.teachers.pool import Teacher, TeacherPool

    work, variants = Path(args.work), args.variants.split(",")
    dist.init(600)
    recipe = load_recipe(work / "recipe.yaml")
    config = str(REPO / "ds_configs" / "zero3.json")
    trainer = Trainer(recipe, read_ds_config(config), config)
    trainer.setup()  # the inputs, the student and the three live teachers
    inputs = trainer.inputs
    live = list(trainer.teachers)
    cache_recipe = load_recipe(work / "recipe.yaml", [f"teachers.{t.name}.source=cache" for t in live])
    caches = open_caches(cache_recipe, inputs, trainer.methods)
    cached = [Teacher(t.name, t.config, None, t.model_path, cache=caches[t.name]) for t in live]
    steps_per_epoch = trainer.data.steps_per_epoch

    def run(variant: str, step: int) -> dict:
        teachers = variant_teachers(variant, live, cached)
        trainer.teachers = TeacherPool(teachers, trainer.device)
        # The student's CE comes fused from the first teacher whose method can; none in this variant: computed alone.
        trainer.fused_ce = next((t.name for t in teachers if trainer.methods[t.name].fuses_ce), None)
        dist.barrier()
        before = reset_peak()
        started = time.perf_counter()
        trainer.train_step(step % steps_per_epoch)
        return {"s": time.perf_counter() - started, "growth_mb": rss_mb("VmHWM") - before}

    for variant in variants:  # warm-up
        run(variant, 0)
    samples = {v: [] for v in variants}
    for round_ in range(args.rounds):
        for variant in variants:
            samples[variant].append(run(variant, round_))
    # Each live teacher alone, both paths, on this rank's first micro-batch: time, transient peak, kept size.
    batch = trainer.data.micro_batches(0, 0)[0].to(trainer.device)
    teachers = {}
    for teacher in live:
        method, view = trainer.methods[teacher.name], teacher_view(batch, teacher.name)
        for mode in ("full", "chunked", "full", "chunked"):
            one = dataclasses.replace(teacher, hidden_path=mode == "chunked")
            dist.barrier()
            before = reset_peak()
            started = time.perf_counter()
            reduced = trainer.teachers.run(one, view, method, gold=False).reduced
            seconds, growth = time.perf_counter() - started, rss_mb("VmHWM") - before
            kept = tensor_bytes(reduced) / 2**20
            teachers[f"{teacher.name}/{mode}"] = {"s": seconds, "growth_mb": growth, "kept_mb": kept}
            del reduced
    shape = {"batch": list(batch.teachers[live[0].name].input_ids.shape), "pairs": int(batch.pairings[live[0].name].mask.sum())}
    mine = {"samples": samples, "teachers": teachers, "shape": shape}
    everyone = [mine]
    if dist.world_size() > 1:
        everyone = [None] * dist.world_size()
        torch_dist.all_gather_object(everyone, mine)
    if dist.is_rank0():
        Path(args.out).write_text(json.dumps({"ranks": everyone, "threads": torch.get_num_threads()}))
    trainer.cleanup()
    dist.barrier()
    dist.destroy()
    return 0


# ------------------------------------------------------------------------------------ parent


def launch(command: list[str], args, log: Path) -> tuple[float, str]:
    # A fixed 4 MB mmap threshold: glibc's default threshold grows after large frees, and then keeps
    # freed blocks of up to 32 MB resident, which would hide a step's own allocations from VmHWM.
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               PYTHONUNBUFFERED="1", MALLOC_MMAP_THRESHOLD_=str(4 << 20))
    load = os.getloadavg()[0]
    started = time.perf_counter()
    with open(log, "w") as handle:
        result = subprocess.run(command, env=env, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise SystemExit(f"job failed ({result.returncode}), see {log}:\n{log.read_text()[-3000:]}")
    return time.perf_counter() - started, f"{load:.1f}-{os.getloadavg()[0]:.1f}"


def deepspeed(args, script: str, *rest: str) -> list[str]:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.ranks), "--master_port", str(port),
            str(REPO / script), *rest]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    unknown = sorted(set(args.variants.split(",")) - set(VARIANTS))
    if unknown:
        print(f"error: --variants: unknown {unknown}; choose from {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    recipe = write_recipe(work, build_models(work, args), args)
    print(f"recipe {recipe}; logs in {work}", flush=True)
    shutil.rmtree(work / "cache" / "teachers", ignore_errors=True)  # time a whole build
    build_s, build_load = launch(deepspeed(args, "tools/cache_teachers.py", "--recipe", str(recipe), "--chunk-records", "16"),
                                 args, work / "cache_build.log")
    print(f"cache build: {build_s:.1f} s for the whole job (start-up included), load {build_load}", flush=True)
    out = work / "results.json"
    wall, load = launch(deepspeed(args, "tools/bench_step.py", "--worker", "all", "--work", str(work), "--out", str(out),
                                  "--variants", args.variants, "--rounds", str(args.rounds)), args, work / "steps.log")
    results = json.loads(out.read_text())
    results.update(build_s=build_s, build_load=build_load, steps_job_s=wall, steps_load=load)
    out.write_text(json.dumps(results, indent=1))
    report(results, args)
    return 0


def report(results: dict, args) -> None:
    ranks = results["ranks"]
    variants = list(ranks[0]["samples"])

    def step_s(variant):  # a step ends when its slowest rank ends; the median over rounds
        return statistics.median(max(r["samples"][variant][i]["s"] for r in ranks) for i in range(args.rounds))

    def growth(variant):
        return max(max(sample["growth_mb"] for sample in r["samples"][variant]) for r in ranks)

    shape = ranks[0]["shape"]
    print(f"\n{args.ranks} ranks x {results['threads']} thread(s); micro-batch {shape['batch']} teacher tokens, "
          f"{shape['pairs']} pairs (rank 0, first micro-batch); {args.rounds} interleaved rounds; "
          f"load average {results['steps_load']} (start-end)")
    print("\n| variant | step (s) | x sft | peak growth in a step (MB, max over ranks) |\n|---|---:|---:|---:|")
    for variant in variants:
        ratio = f"{step_s(variant) / step_s('sft'):.2f}" if "sft" in variants else "-"
        print(f"| {variant} | {step_s(variant):.3f} | {ratio} | {growth(variant):.0f} |")
    print()
    for slow, fast in (("live3-full", "cached3"), ("live3-chunked", "cached3"), ("live3-full", "live3-chunked"),
                       ("live1-full", "live1-chunked")):
        if slow in variants and fast in variants:
            print(f"{slow} / {fast}: {step_s(slow) / step_s(fast):.2f}x")
    print("\n| teacher reduce (one micro-batch) | full s | chunked s | full growth MB | chunked growth MB | kept MB |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in ZOO_MEMBERS:
        row = {mode: min((r["teachers"][f"{name}/{mode}"] for r in ranks), key=lambda x: x["s"]) for mode in ("full", "chunked")}
        print(f"| {name} | {row['full']['s']:.3f} | {row['chunked']['s']:.3f} | {row['full']['growth_mb']:.0f} | "
              f"{row['chunked']['growth_mb']:.0f} | {row['chunked']['kept_mb']:.2f} |")
    print(f"\ncache build: {results['build_s']:.1f} s for the whole 2-rank job (load {results['build_load']})")


if __name__ == "__main__":
    sys.exit(main())
