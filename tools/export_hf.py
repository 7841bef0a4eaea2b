#!/usr/bin/env python
"""Consolidate a training checkpoint's ZeRO-3 shards into a Hugging Face model folder.

    python tools/export_hf.py runs/demo/checkpoints/step_00000120 runs/demo/export-step120
    python tools/export_hf.py runs/demo/checkpoints latest-export      # the newest complete checkpoint

Runs in one process on the CPU (no launcher needed). Writes safetensors weights, the student's config
and tokenizer; ``AutoModelForCausalLM.from_pretrained(OUT)`` loads the result. OUT must be a new or
empty folder, or an earlier export (it is then replaced atomically); any other folder or file is
refused and left untouched. A checkpoint whose losses trained modules (projectors: DSKD, ALM's
latents...) exports the student alone, and the modules to a ``projectors/`` folder beside OUT
(``projectors.safetensors`` and ``projectors.json``). Exit status: 0 done, 2 bad input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a step_N checkpoint folder, or the checkpoints folder (uses latest)")
    parser.add_argument("out", help="output folder: new, empty, or an earlier export (replaced atomically)")
    args = parser.parse_args(argv)

    from mlot_ds import outputs
    from mlot_ds.engine import modules
    from mlot_ds.engine.checkpoint import EXPORT_KIND, consolidate, resolve_checkpoint
    from mlot_ds.errors import BadInput

    try:
        folder = resolve_checkpoint(Path(args.checkpoint).expanduser())
        out = outputs.check_folder(args.out, EXPORT_KIND, "OUT")  # before minutes of merging shards
        if modules.read_manifest(folder):
            modules.check_projectors_target(out, "OUT")
        model, tokenizer, _, (module_state, manifest) = consolidate(folder, with_modules=True)

        def fill(staging: Path) -> None:
            model.save_pretrained(staging, safe_serialization=True)
            tokenizer.save_pretrained(staging)

        outputs.replace_folder(out, EXPORT_KIND, fill, "OUT")
        if manifest:
            modules.write_projectors(out, module_state, manifest, "OUT")
    except BadInput as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"exported {folder} -> {out.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
