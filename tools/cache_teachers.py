#!/usr/bin/env python
"""Run each teacher once over the training data and store what its loss needs (an offline cache).

    python tools/cache_teachers.py --recipe R.yaml [key.path=value ...]                # one process
    deepspeed --num_gpus 2 tools/cache_teachers.py --recipe R.yaml [overrides]        # sharded over ranks

Use the recipe (and overrides) you will train with: the cache is bound to the teacher checkpoint,
its tokenizer and prompt template, the training data and the loss settings, and training refuses
a cache that does not match. Then set ``source: cache`` on the cached teachers (e.g. the override
``teachers.llama.source=cache``); cached and live teachers can be mixed. Each teacher's cache goes
to its ``cache_dir`` (default ``<data.cache_dir or train.output_dir/cache>/teachers/<name>``).

The records are cut into chunks; ranks build different chunks in lockstep (a ZeRO-3 teacher's
forward is a collective) and each chunk file appears only once complete, so an interrupted build
picks up where it stopped when run again. With several nodes the cache folder must be on a shared
file system. See ``mlot_ds/teachers/cache.py`` for what is stored.

Exit status: 0 done (or --max-chunks reached), 2 bad input.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=None, help="YAML recipe (default: the embedded demo)")
    parser.add_argument("--config", default=str(REPO / "ds_configs" / "zero3.json"),
                        help="DeepSpeed JSON the teachers' ZeRO-3 settings come from (default: ds_configs/zero3.json)")
    parser.add_argument("--teachers", default=None, help="comma-separated teacher names (default: every teacher)")
    parser.add_argument("--chunk-records", type=int, default=256, help="records per chunk file (default 256)")
    parser.add_argument("--micro-batch-size", type=int, default=None, help="default: the recipe's train.micro_batch_size")
    parser.add_argument("--uld-head", type=int, default=1024, help="ULD teachers: sorted probabilities kept per "
                        "token, the rest stored as one tail mass (default 1024; >= the vocabulary size is exact)")
    parser.add_argument("--max-chunks", type=int, default=None, help="build at most this many chunks per teacher in "
                        "this run (e.g. to split a build over jobs); run again to continue")
    parser.add_argument("--overwrite", action="store_true", help="delete a cache built for another setup and rebuild it")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="recipe overrides")
    args = parser.parse_args(argv)
    for name in ("chunk_records", "uld_head"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def build_one(pool, teacher, data, teacher_loss, folder: Path, manifest: dict, args, micro_batch_size: int) -> int:
    """Collective: build the missing chunks of one teacher's cache; returns the chunks built by all ranks."""
    import numpy as np
    from tqdm import tqdm

    from mlot_ds import dist
    from mlot_ds.data.sampler import FILLER
    from mlot_ds.teachers import cache

    total, per_chunk = data.num_records, args.chunk_records
    sizes = [min(per_chunk, total - start) for start in range(0, total, per_chunk)]
    pending = cache.pending_chunks(folder, len(sizes), args.max_chunks)
    # Within a chunk, records of similar teacher length share a micro-batch (little padding).
    lengths = data.column(teacher.name, "prompt_length") + data.column(teacher.name, "response_length")
    filler = np.full(micro_batch_size, FILLER)
    schedule = list(cache.rounds(pending, sizes, micro_batch_size, dist.world_size()))
    bar = tqdm(total=len(pending), desc=f"caching {teacher.name}", unit="chunk", disable=not dist.is_rank0())
    for group, forwards in schedule:
        mine = group[dist.rank()]
        positions = np.arange(mine * per_chunk, mine * per_chunk + sizes[mine]) if mine is not None else filler[:0]
        positions = positions[np.argsort(-lengths[positions], kind="stable")]
        parts = []
        for step in range(forwards):  # the same number of forwards on every rank
            chunk_positions = positions[step * micro_batch_size : (step + 1) * micro_batch_size]
            batch = data.collate(chunk_positions if len(chunk_positions) else filler, 0).to(pool.device)
            inputs = batch.teachers[teacher.name]
            pairing = teacher_loss.pairing_for(batch.pairings[teacher.name], batch.student.labels, inputs.labels)
            reduced, gold = pool.reduce(teacher, inputs, pairing, teacher_loss, with_gold_ce=True)
            if len(chunk_positions):
                digests = cache.record_digests(inputs.input_ids, inputs.attention_mask, pairing)
                parts.append(cache.chunk_tensors(manifest["binding"]["loss"]["kind"], reduced, gold, pairing,
                                                 batch.record_ids, digests, args.uld_head))
            del reduced
        if parts:
            cache.write_chunk(folder, mine, parts)
        bar.update(sum(c is not None for c in group))
    bar.close()
    dist.barrier()
    return len(pending)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from mlot_ds import dist
    from mlot_ds.config import RecipeError, load_recipe
    from mlot_ds.engine.ds_config import read_ds_config, student_ds_config
    from mlot_ds.errors import BadInput

    dist.map_slurm_environment()
    bad_input = BadInput
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        ds_template = read_ds_config(args.config)
        names = [t.name for t in recipe.teachers]
        wanted = args.teachers.split(",") if args.teachers else names
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            raise RecipeError(f"--teachers: no teacher named {', '.join(unknown)} (the recipe has {', '.join(names)})")
    except bad_input as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    import deepspeed
    import torch

    from mlot_ds.engine.setup import prepare_inputs
    from mlot_ds.engine.teacher_loss import TeacherLoss
    from mlot_ds.teachers import cache
    from mlot_ds.teachers.pool import TeacherPool

    from mlot_ds.engine.trainer import quiet_deepspeed_deprecations

    quiet_deepspeed_deprecations()
    dist.init(recipe.train.dist_timeout_s)
    started = time.time()
    try:
        inputs = prepare_inputs(recipe)
        device = torch.device(deepspeed.get_accelerator().current_device_name())
        micro_batch_size = args.micro_batch_size or recipe.train.micro_batch_size
        ds_config = student_ds_config(ds_template, recipe, dist.world_size(), 1, device, source=args.config)
        for index, config in enumerate(recipe.teachers):
            if config.name not in wanted:
                continue
            where = f"teachers[{index}]"
            data = inputs.data
            teacher_loss = TeacherLoss(config.loss, data.vocab_maps.get(config.name) if config.loss.kind == "mined" else None)
            model_dir = inputs.teachers[index].model
            manifest = {
                "format": cache.FORMAT_VERSION, "teacher": config.name, "model": str(model_dir),
                "binding": cache.binding(recipe, index, model_dir, inputs.teacher_tokenizers[config.name],
                                         inputs.student_tokenizer, teacher_loss),
                "num_records": data.num_records, "chunk_records": args.chunk_records,
                "num_chunks": -(-data.num_records // args.chunk_records),
                "uld_head": args.uld_head if config.loss.kind == "uld" else None,
                "dtype": str(config.dtype),
            }
            folder = cache.cache_folder(recipe, index)
            cache.prepare_folder(folder, manifest, where, args.overwrite)
            live = dataclasses.replace(config, source="live")
            pool = TeacherPool.load([live], [str(model_dir)], ds_config, micro_batch_size, device)
            built = build_one(pool, pool.teachers[0], data, teacher_loss, folder, manifest, args, micro_batch_size)
            left = len(cache.pending_chunks(folder, manifest["num_chunks"], None))
            dist.print0(f"{config.name}: built {built} chunk(s), {left} left, in {folder}")
            del pool
            gc.collect()
    except bad_input as exc:
        dist.fail(str(exc))
    dist.print0(f"done in {(time.time() - started) / 60:.1f} min")
    dist.barrier()
    dist.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
