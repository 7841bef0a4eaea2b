#!/usr/bin/env python
"""Consolidate a training checkpoint's ZeRO-3 shards into a Hugging Face model folder.

    python tools/export_hf.py runs/demo/checkpoints/step_00000120 runs/demo/export-step120
    python tools/export_hf.py runs/demo/checkpoints latest-export      # the newest complete checkpoint

Runs in one process on the CPU (no launcher needed). Writes safetensors weights, the student's config
and tokenizer; ``AutoModelForCausalLM.from_pretrained(OUT)`` loads the result.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a step_N checkpoint folder, or the checkpoints folder (uses latest)")
    parser.add_argument("out", help="output folder (replaced atomically)")
    args = parser.parse_args(argv)

    from mlot_ds.config import RecipeError, load_recipe
    from mlot_ds.engine.checkpoint import COMPLETE, find_latest
    from mlot_ds.engine.resolve import model_path

    folder = Path(args.checkpoint)
    if not (folder / COMPLETE).is_file():
        latest = find_latest(folder) if folder.is_dir() else None
        if latest is None:
            print(f"error: {folder}: not a complete checkpoint folder, and no complete checkpoint inside it",
                  file=sys.stderr)
            return 2
        folder = latest
    try:
        recipe = load_recipe(folder / "recipe.yaml")
        student_dir = model_path(recipe.student.model, recipe, "student.model")
        tokenizer_dir = model_path(recipe.student.tokenizer or recipe.student.model, recipe, "student.tokenizer")
    except RecipeError as exc:
        print(f"error: {folder / 'recipe.yaml'}: {exc}", file=sys.stderr)
        return 2
    if not (student_dir / "config.json").is_file():
        print(f"error: the student's base folder {student_dir} (from the checkpoint's recipe) is missing; "
              f"its config and tokenizer are needed", file=sys.stderr)
        return 2

    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    state = get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
    config = AutoConfig.from_pretrained(student_dir, local_files_only=True,
                                        trust_remote_code=recipe.student.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=recipe.student.trust_remote_code)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [name for name in missing if name not in tied]
    if missing or unexpected:
        print(f"error: {folder}: checkpoint does not match the student architecture "
              f"(missing {missing[:5]}, unexpected {unexpected[:5]})", file=sys.stderr)
        return 2
    model.tie_weights()
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True).save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    print(f"exported {folder} -> {out.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
