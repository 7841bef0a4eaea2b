"""Print the records an adapter yields, as JSON lines, then one summary line.

    python tools/preview_data.py --adapter dialogsum --path ../shared/data/dialogsum/dialogsum.dev.jsonl --limit 3
    python tools/preview_data.py --adapter jsonl --path rows.csv --prompt-field question --response-field answer

Each line is ``{"prompt": ..., "response": ..., "references": [...]}``; the last line reads
``kept N records, dropped M (reason: count, ...)``. A bad path or a bad row (with the default
``--bad-rows error``) exits with status 1 and one message naming the file and line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlot_ds.data.records import ADAPTERS, BAD_ROW_POLICIES, load_records  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", required=True, choices=ADAPTERS)
    parser.add_argument("--path", required=True, help="a .jsonl/.json/.csv(.gz), .parquet file or a save_to_disk directory")
    parser.add_argument("--limit", type=int, default=None, help="stop after this many kept records")
    parser.add_argument("--bad-rows", default="error", choices=BAD_ROW_POLICIES)
    parser.add_argument("--prompt-field", help="jsonl adapter: column holding the prompt (default 'prompt')")
    parser.add_argument("--response-field", help="jsonl adapter: column holding the response (default 'response')")
    parser.add_argument("--references-field", help="jsonl adapter: column holding the references (default: the response)")
    args = parser.parse_args(argv)

    fields = {key: value for key, value in (("prompt", args.prompt_field), ("response", args.response_field),
                                            ("references", args.references_field)) if value}
    if fields and args.adapter != "jsonl":
        parser.error("--prompt-field/--response-field/--references-field are for --adapter jsonl")
    try:
        result = load_records(args.adapter, args.path, fields=fields or None, bad_rows=args.bad_rows, limit=args.limit)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for record in result.records:
        print(json.dumps({"prompt": record.prompt, "response": record.response, "references": list(record.references)},
                         ensure_ascii=False))
    reasons = ", ".join(f"{reason}: {count}" for reason, count in sorted(result.dropped.items()))
    dropped = sum(result.dropped.values())
    print(f"kept {len(result.records)} records, dropped {dropped}" + (f" ({reasons})" if reasons else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
