#!/usr/bin/env python
"""Write a teacher's greedy responses as a dataset a recipe can train on (SeqKD, unlabeled setting).

    python tools/generate_teacher_responses.py --model /models/teacher --adapter dialogsum \\
        --path builtin:dialogsum/train --out runs/seqkd/llama.train.jsonl

Each output line is ``{"prompt": ..., "response": <the teacher's generation>, "references": [gold ...]}``,
which the ``jsonl`` adapter reads with its default field names::

    data: {train: {adapter: jsonl, path: runs/seqkd/llama.train.jsonl}}

Training on it is SeqKD (supervised fine-tuning on the teacher's outputs), or, with distillation
losses on, the paper's unlabeled setting (its Table 2: gold responses replaced by a teacher's). The
prompt is the adapter's prompt text (before any template), so the recipe's own templates apply.
Records whose generation is empty are left out and counted (no response to train on).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

WRITTEN_BY = "mlot-ds tools/generate_teacher_responses.py"

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the teacher's Hugging Face folder (model + tokenizer), a "
                        ".gguf file, or a packaged zoo:<name> (converted once into the cache)")
    parser.add_argument("--adapter", required=True, choices=("dialogsum", "qed", "fairytaleqa", "jsonl"))
    parser.add_argument("--path", required=True, help="data file or folder, or builtin:dialogsum/<split>")
    parser.add_argument("--out", required=True, help="output .jsonl (written atomically)")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--template", choices=("plain", "chat"), default="plain")
    parser.add_argument("--max-length", type=int, default=None, help="longest prompt + response (default: the "
                        "model's positions, at most 1024)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    from mlot_ds import outputs
    from mlot_ds.data import Template, prompt_token_ids
    from mlot_ds.errors import BadInput
    from mlot_ds.eval import greedy_generate
    from mlot_ds.engine.models import load_data, load_model, model_folder
    from mlot_ds.zoo import names_gguf

    started = time.perf_counter()
    given = Path(args.model).expanduser()
    if not args.model.startswith("zoo:") and not names_gguf(given) and not (given / "config.json").is_file():
        print(f"error: --model {given}: not a Hugging Face model folder (no config.json) nor a .gguf file",
              file=sys.stderr)
        return 2
    try:
        out = outputs.check_file(args.out, "--out", outputs.jsonl_written_by(WRITTEN_BY), "generated dataset")
        records = load_data(args.adapter, args.path, args.limit)
        folder = model_folder(args.model, "--model")  # a GGUF file: converted once, then read from the cache
        loaded = load_model(folder, args.device)
        template = Template(kind=args.template)
        prompt_ids = [prompt_token_ids(template, loaded["tokenizer"], r.prompt, model=str(folder)) for r in records]
    except (BadInput, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    responses = greedy_generate(loaded["model"], loaded["tokenizer"], prompt_ids, batch_size=args.batch_size,
                                max_new_tokens=args.max_new_tokens, device=args.device,
                                max_length=args.max_length or loaded["max_length"], progress=True,
                                description=f"generate ({given.name})")
    lines, empty = [], 0
    for record, response in zip(records, responses):
        if not response:
            empty += 1
            continue
        row = {"prompt": record.prompt, "response": response,
               "references": list(record.references or (record.response,)), "written_by": WRITTEN_BY}
        lines.append(json.dumps(row, ensure_ascii=False) + "\n")
    written = len(lines)
    outputs.write_text(out, "".join(lines))
    print(f"wrote {written} records to {out.resolve()}" + (f" ({empty} empty generations left out)" if empty else "")
          + f" in {time.perf_counter() - started:.1f} s")
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
