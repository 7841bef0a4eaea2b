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

from mlot_ds.engine.signals import install_stop_handlers

install_stop_handlers()  # before the slow imports below: a signal while torch loads must not kill us

import deepspeed  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from mlot_ds import dist  # noqa: E402
from mlot_ds.config import RecipeError, load_recipe  # noqa: E402
from mlot_ds.data.sampler import FILLER  # noqa: E402
from mlot_ds.engine.ds_config import read_ds_config, student_ds_config  # noqa: E402
from mlot_ds.engine.setup import prepare_inputs  # noqa: E402
from mlot_ds.engine.trainer import teacher_view  # noqa: E402
from mlot_ds.errors import BadInput  # noqa: E402
from mlot_ds.losses.method import OUTPUT_WEIGHT  # noqa: E402
from mlot_ds.teachers import cache  # noqa: E402
from mlot_ds.teachers.features import gathered_output_weight  # noqa: E402
from mlot_ds.teachers.pool import TeacherPool  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=None, help="YAML recipe (default: the embedded demo)")
    parser.add_argument("--config", default=str(REPO / "ds_configs" / "zero3.json"),
                        help="DeepSpeed JSON the teachers' ZeRO-3 settings come from (default: ds_configs/zero3.json)")
    parser.add_argument("--teachers", default=None, help="comma-separated teacher names (default: every teacher)")
    parser.add_argument("--chunk-records", type=int, default=256, help="records per chunk file (default 256)")
    parser.add_argument("--micro-batch-size", type=int, default=None, help="default: the recipe's train.micro_batch_size")
    parser.add_argument("--max-chunks", type=int, default=None, help="build at most this many chunks per teacher in "
                        "this run (e.g. to split a build over jobs); run again to continue")
    parser.add_argument("--overwrite", action="store_true", help="delete a cache built for another setup and rebuild it")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="recipe overrides")
    args = parser.parse_args(argv)
    for name in ("chunk_records",):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def build_group(pool, teacher, data, members: list, args, micro_batch_size: int) -> dict[str, int]:
    """Collective: build the missing chunks of every cache in ``members`` (``(name, method, folder)``
    of teachers that read the same model and the same text), one teacher forward per micro-batch for
    all of them. Returns the chunks built per member, by all ranks."""
    total, per_chunk = data.num_records, args.chunk_records
    sizes = [min(per_chunk, total - start) for start in range(0, total, per_chunk)]
    pending = {name: set(cache.pending_chunks(folder, len(sizes), args.max_chunks)) for name, _, folder in members}
    union = sorted(set().union(*pending.values()))
    # Within a chunk, records of similar teacher length share a micro-batch (little padding).
    lengths = data.column(teacher.name, "prompt_length") + data.column(teacher.name, "response_length")
    filler = np.full(micro_batch_size, FILLER)
    label = ", ".join(name for name, _, _ in members)
    bar = tqdm(total=len(union), desc=f"caching {label}", unit="chunk", disable=not dist.is_rank0())
    for group, forwards in cache.rounds(union, sizes, micro_batch_size, dist.world_size()):
        mine = group[dist.rank()]
        positions = np.arange(mine * per_chunk, mine * per_chunk + sizes[mine]) if mine is not None else filler[:0]
        positions = positions[np.argsort(-lengths[positions], kind="stable")]
        parts = {name: [] for name, _, _ in members}
        for step in range(forwards):  # the same number of forwards on every rank
            chunk_positions = positions[step * micro_batch_size : (step + 1) * micro_batch_size]
            batch = data.collate(chunk_positions if len(chunk_positions) else filler, 0).to(pool.device)
            views = [(teacher_view(batch, name), method) for name, method, _ in members]
            outputs = pool.run_shared(teacher, views, gold=True)
            if len(chunk_positions):
                for (name, method, _), (view, _), output in zip(members, views, outputs):
                    if mine in pending[name]:
                        parts[name].append(cache.chunk_tensors(method, output, view, batch.record_ids))
            del outputs
        for name, _, folder in members:
            if parts[name]:
                cache.write_chunk(folder, mine, parts[name])
        bar.update(sum(c is not None for c in group))
    bar.close()
    dist.barrier()
    return {name: len(chunks) for name, chunks in pending.items()}


def shared_model_key(config) -> tuple:
    """Teachers with the same key read the same model and the same tokens: one forward serves them all."""
    template = (config.template.kind, config.template.system, config.template.few_shot)
    return (config.model, config.tokenizer or config.model, template, config.append_eos, config.dtype,
            config.placement, config.chunked_logits, config.trust_remote_code)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dist.map_slurm_environment()
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        ds_template = read_ds_config(args.config)
        names = [t.name for t in recipe.teachers]
        wanted = args.teachers.split(",") if args.teachers else names
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            raise RecipeError(f"--teachers: no teacher named {', '.join(unknown)} (the recipe has {', '.join(names)})")
    except BadInput as exc:
        if dist.is_rank0():
            print(f"error: {exc}", file=sys.stderr)
        return 2

    dist.init(recipe.train.dist_timeout_s)
    started = time.time()
    try:
        inputs = prepare_inputs(recipe, check_run_paths=False)
        device = torch.device(deepspeed.get_accelerator().current_device_name())
        micro_batch_size = args.micro_batch_size or recipe.train.micro_batch_size
        ds_config = student_ds_config(ds_template, recipe, dist.world_size(), 1, device, source=args.config)
        groups: dict[tuple, list] = {}
        for index, config in enumerate(recipe.teachers):
            if config.name not in wanted:
                continue
            where = f"teachers[{index}]"
            data = inputs.data
            method = inputs.methods[config.name]
            problem = method.cache_problem(config.loss.params)
            if problem:
                raise RecipeError(f"{where}.loss: {config.name!r} cannot be cached: {problem}")
            model_dir = inputs.teachers[index].model
            manifest = {
                "format": cache.FORMAT_VERSION, "teacher": config.name, "model": str(model_dir),
                "binding": cache.binding(recipe, index, model_dir, inputs.teacher_tokenizers[config.name],
                                         inputs.student_tokenizer, method),
                "num_records": data.num_records, "chunk_records": args.chunk_records,
                "num_chunks": -(-data.num_records // args.chunk_records),
                "dtype": str(config.dtype),
            }
            folder = recipe.paths().teacher_caches[config.name]
            cache.prepare_folder(folder, manifest, where, args.overwrite)
            groups.setdefault(shared_model_key(config), []).append((index, config, method, folder, manifest))
        for members in groups.values():
            index, config = members[0][0], members[0][1]
            model_dir = inputs.teachers[index].model
            live = dataclasses.replace(config, source="live")
            pool = TeacherPool.load([live], [str(model_dir)], ds_config, micro_batch_size, device,
                                    methods={config.name: [m for _, _, m, _, _ in members]})
            if any(OUTPUT_WEIGHT in m.teacher_features() for _, _, m, _, _ in members):
                weight = gathered_output_weight(pool.teachers[0].module)  # a collective: every rank
                for _, _, method, folder, _ in members:
                    if OUTPUT_WEIGHT in method.teacher_features():
                        dist.rank0_then_barrier(lambda: cache.write_constants(folder, {OUTPUT_WEIGHT: weight}))
                del weight
            built = build_group(pool, pool.teachers[0], inputs.data, [(c.name, m, f) for _, c, m, f, _ in members], args,
                                micro_batch_size)
            for _, member, _, folder, manifest in members:
                left = len(cache.pending_chunks(folder, manifest["num_chunks"], None))
                dist.print0(f"{member.name}: built {built[member.name]} chunk(s), {left} left, in {folder}")
            del pool
            gc.collect()
    except BadInput as exc:
        dist.fail(str(exc))
    dist.print0(f"done in {(time.time() - started) / 60:.1f} min")
    dist.barrier()
    dist.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
