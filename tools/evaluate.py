#!/usr/bin/env python
"""Evaluate a Hugging Face model folder or a training checkpoint on a dataset; write a JSON report.

    python tools/evaluate.py runs/demo/export --adapter dialogsum --path builtin:dialogsum/test --out report.json
    python tools/evaluate.py runs/demo/checkpoints --adapter dialogsum --path dialogsum.test.jsonl --limit 50
    python tools/evaluate.py ~/.cache/mlot_ds/zoo/<hash>/teacher-llama --adapter dialogsum --path builtin:dialogsum/test

MODEL_OR_CHECKPOINT is a folder with ``config.json`` (a model, a teacher works too), a ``.gguf``
file (or a folder holding one) or a packaged model such as ``zoo:smollm2-135m-instruct`` (converted
once into the cache), a ``step_N`` checkpoint folder, or a ``checkpoints`` folder (its newest
complete checkpoint). A checkpoint's
ZeRO-3 shards are consolidated in memory, as ``tools/export_hf.py`` does, and its recipe supplies
the student's tokenizer, template and EOS setting.

The report holds the metrics (``eval/bits_per_byte`` and the adapter's generation metrics), the
number of records, every prediction with its references, the settings, the command and timings.
Bits per byte is comparable across models with different tokenizers. Exit status: 0 done,
2 bad input.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

WRITTEN_BY = "mlot-ds tools/evaluate.py"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", metavar="MODEL_OR_CHECKPOINT")
    parser.add_argument("--adapter", required=True, choices=("dialogsum", "qed", "fairytaleqa", "jsonl"))
    parser.add_argument("--path", required=True, help="data file or folder, or builtin:dialogsum/<train|dev|test>")
    parser.add_argument("--limit", type=int, default=None, help="first N records only")
    parser.add_argument("--out", default=None, help="JSON report path (default: print the metrics only)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--template", choices=("plain", "chat"), default=None,
                        help="prompt template (default: the checkpoint recipe's, else plain)")
    parser.add_argument("--max-length", type=int, default=None,
                        help="longest prompt + continuation (default: the model's positions, at most 1024; "
                             "a checkpoint: its recipe's data.max_length)")
    parser.add_argument("--no-eos", action="store_true", help="do not score EOS after each response in bits per byte")
    parser.add_argument("--no-generate", action="store_true", help="bits per byte only")
    parser.add_argument("--device", default="cpu")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    for name in ("limit", "max_new_tokens", "batch_size", "max_length"):
        value = getattr(args, name)
        if value is not None and value < 1:
            print(f"error: --{name.replace('_', '-')} must be >= 1, got {value}", file=sys.stderr)
            return 2
    from mlot_ds import outputs
    from mlot_ds.errors import BadInput
    from mlot_ds.engine.models import load_data, load_model

    try:
        if args.out:  # before the model is loaded: a refused path costs nothing
            outputs.check_file(args.out, "--out", outputs.json_written_by(WRITTEN_BY), "report")
        records = load_data(args.adapter, args.path, args.limit)
        loaded = load_model(args.model, args.device)
    except BadInput as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    load_seconds = time.perf_counter() - started

    from mlot_ds.data import Template
    from mlot_ds.eval import evaluate_records

    template = Template(kind=args.template or loaded["template"])
    max_length = args.max_length or loaded["max_length"]
    try:
        result = evaluate_records(
            loaded["model"], loaded["tokenizer"], records, adapter=args.adapter, template=template,
            batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, max_length=max_length,
            device=args.device, append_eos=loaded["append_eos"] and not args.no_eos,
            generate=not args.no_generate, progress=True, model_name=str(args.model),
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report = {
        "written_by": WRITTEN_BY,
        "model": args.model if args.model.startswith("zoo:") else str(Path(args.model).expanduser().resolve()),
        "model_folder": str(Path(loaded["folder"]).resolve()),
        "source": loaded["source"],
        "adapter": args.adapter,
        "path": args.path,
        "n_records": len(records),
        "metrics": result.metrics,
        "bits_per_byte": result.metrics["eval/bits_per_byte"],
        "settings": {"template": template.kind, "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
                     "max_length": max_length, "append_eos": loaded["append_eos"] and not args.no_eos,
                     "limit": args.limit, "device": args.device},
        "command": shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(["tools/evaluate.py", *argv]),
        "timings": {"load_s": load_seconds, **{f"{k}_s": v for k, v in result.seconds.items()},
                    "total_s": time.perf_counter() - started},
        "predictions": [{"id": r.id, "prediction": p, "references": list(r.references or (r.response,))}
                        for r, p in zip(records, result.predictions)],
    }
    for key, value in sorted(result.metrics.items()):
        print(f"{key:<20} {value:.4f}")
    print(f"{len(records)} records in {report['timings']['total_s']:.1f} s")
    if args.out:
        out = outputs.write_text(args.out, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        print(f"report: {out.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
