"""Command line of ``launch/train.py`` (also installed as ``mlot-train``).

    deepspeed launch/train.py --config ds_configs/zero3.json [--recipe R.yaml] [key.path=value ...]

Without ``--recipe`` the embedded default runs: build (or reuse) the tiny zoo, distil three
teachers with different tokenizers into the student, evaluate, save and export.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from mlot_ds import dist
from mlot_ds.engine.signals import REQUEUE_EXIT_CODE, install_stop_handlers

DESCRIPTION = """\
Multi-teacher cross-tokenizer distillation (MultiLevelOT) on DeepSpeed ZeRO-3.

Overrides use dotted paths into the recipe, e.g.:
  train.max_steps=20  train.output_dir=runs/x  teachers.llama.weight=2  teachers.0.loss.preset=paper
  weighting.mode=dynamic  data.train.path=/data/dialogsum.train.jsonl.gz  student.model=/ckpt/pythia-410m

Exit status: 0 done, 2 bad input (nothing was trained), 75 stopped by SIGUSR1/SIGTERM after a
checkpoint (SLURM: requeue), 1 any other failure.
"""


def methods_help() -> str:
    """Every loss kind with its hyper-parameters, defaults and term weights (from the registry)."""
    # Imported here so that --help lists the methods without importing the engine's heavier modules.
    import dataclasses

    from mlot_ds.losses.registry import METHODS

    lines = ["Losses (teachers.<name>.loss = {kind: ..., <parameter>: value, weights: {<term>: w}}):"]
    for kind, method in METHODS.items():
        params = method.Params()
        values = ", ".join(f"{f.name}={getattr(params, f.name)!r}" for f in dataclasses.fields(params)) or "none"
        weights = ", ".join(f"{t}={w:g}" for t, w in method.default_weights(params).items())
        lines += [f"  {kind}: {method.description}", f"      parameters: {values}", f"      weights: {weights}"]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="launch/train.py", description=DESCRIPTION, epilog=methods_help(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="DeepSpeed JSON (e.g. ds_configs/zero3.json); its batch, "
                        "clipping, optimizer and schedule keys are filled from the recipe")
    parser.add_argument("--recipe", default=None, help="YAML recipe (default: the embedded demo, "
                        "mlot_ds/recipes/demo.yaml)")
    parser.add_argument("--dry-run", action="store_true", help="validate the recipe, the DeepSpeed config, "
                        "every path and every tokenizer, then exit without training")
    parser.add_argument("--resume", default=None, help="auto | none | CHECKPOINT_DIR (overrides train.resume)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="recipe overrides")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.dry_run:
        install_stop_handlers()  # idempotent; launch/train.py already did it before importing torch
    # The engine's modules pull in transformers and deepspeed: imported after the stop handlers, so
    # that a SIGTERM while they load ends in a clean exit, not a traceback.
    from mlot_ds.config import load_recipe
    from mlot_ds.engine.ds_config import read_ds_config, student_ds_config
    from mlot_ds.engine.setup import prepare_inputs
    from mlot_ds.errors import BAD_INPUT_EXIT_CODE, BadInput

    dist.map_slurm_environment()
    overrides = list(args.overrides) + ([f"train.resume={args.resume}"] if args.resume else [])
    try:
        recipe = load_recipe(args.recipe, overrides)
        ds_template = read_ds_config(args.config)
        if args.dry_run:
            inputs = prepare_inputs(recipe, check_only=True)
            student_ds_config(ds_template, recipe, int(os.environ.get("WORLD_SIZE", "1")), 1, torch.device("cpu"),
                              source=args.config)
            dist.print0(f"dry run OK: recipe {args.recipe or 'embedded demo'}, DeepSpeed config {args.config}, "
                  f"student {inputs.student.model}, teachers {', '.join(t.name for t in recipe.teachers)}")
            if dist.is_rank0():
                # The planner reads only config.json files: a few lines, never a failure of the dry run.
                from mlot_ds.plan import dry_run_lines

                folders = {"student": inputs.student.model,
                           **{t.name: r.model for t, r in zip(recipe.teachers, inputs.teachers)}}
                for line in dry_run_lines(recipe, ds_template, int(os.environ.get("WORLD_SIZE", "1")), folders,
                                          args.config):
                    print(line)
            return 0
    except BadInput as exc:
        if dist.is_rank0():  # every rank found the same problem; one line is enough
            print(f"error: {exc}", file=sys.stderr)
        return BAD_INPUT_EXIT_CODE

    from mlot_ds.engine.trainer import (  # as above
        NonFiniteLossError,
        StoppedBySignal,
        Trainer,
    )

    dist.init(recipe.train.dist_timeout_s)
    trainer = Trainer(recipe, ds_template, args.config)
    try:
        summary = trainer.run()
    except BadInput as exc:
        dist.fail(str(exc))
    except NonFiniteLossError as exc:
        dist.fail(str(exc), code=1)
    except StoppedBySignal as exc:
        dist.print0(f"{exc}; exiting with status {REQUEUE_EXIT_CODE} (requeue)")
        return REQUEUE_EXIT_CODE
    dist.print0(_summary(summary))
    dist.barrier()
    dist.destroy()
    return 0


def _summary(summary) -> str:
    out, export_dir = summary.output_dir, summary.export_dir
    lines = [f"done in {summary.seconds / 60:.1f} min",
             f"  TensorBoard logs : {out / 'tensorboard'}   (view: tensorboard --logdir {out / 'tensorboard'} --host 127.0.0.1)",
             f"  metrics (JSONL)  : {out / 'tensorboard' / 'metrics.jsonl'}",
             f"  checkpoints      : {out / 'checkpoints'}"]
    if (out / "eval").is_dir():
        lines.append(f"  predictions      : {out / 'eval'}   (step_N.jsonl: prediction and references per record)")
    if export_dir is not None:
        lines.append(f"  exported student : {Path(export_dir).resolve()}   (AutoModelForCausalLM.from_pretrained)")
    for key, value in sorted(summary.results.items()):
        lines.append(f"  {key:<17}: {value:.4f}")
    return "\n".join(lines)
