"""Build (or reuse) the tiny teacher zoo, or regenerate the bundled DialogSum sample.

    python tools/build_zoo.py                      # default profile into the user cache, prints report
    python tools/build_zoo.py --profile tiny --cache-dir /tmp/zoo
    python tools/build_zoo.py --members student-wide,student-smol   # only these (on-demand students too)
    python tools/build_zoo.py --make-corpus        # maintainers only: re-sample ../shared/data/dialogsum

``--make-corpus`` is run once by maintainers and its output committed; the runtime build never reads
``../shared``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mlot_ds.data.dialogsum import CORPUS_FILES, corpus_dir  # noqa: E402

DEFAULT_SOURCE = REPO.parent / "shared" / "data" / "dialogsum"
SAMPLE_SEED = 20210601
SAMPLE_SIZES = {"train": 2000, "dev": 150, "test": 100}
# Short dialogues keep every sequence of the zoo, and of the default distillation job, within a few
# hundred tokens on a 2-core CPU; about 80% of DialogSum's train dialogues qualify.
MAX_DIALOGUE_CHARS = 1000


def make_corpus(source: Path, target: Path) -> None:
    """Sample ``SAMPLE_SIZES`` records per split, keeping the original lines byte for byte and in order."""
    for split, file_name in CORPUS_FILES.items():
        source_file = source / file_name
        if not source_file.is_file():
            raise FileNotFoundError(f"{source_file}: DialogSum {split} file not found (pass --source)")
        opener = gzip.open if source_file.suffix == ".gz" else open
        with opener(source_file, "rt", encoding="utf-8") as handle:
            lines = [line for line in handle if line.strip()]
        eligible = [i for i, line in enumerate(lines) if len(json.loads(line)["dialogue"]) <= MAX_DIALOGUE_CHARS]
        chosen = sorted(random.Random(f"{SAMPLE_SEED}-{split}").sample(eligible, SAMPLE_SIZES[split]))
        target_file = target / file_name
        payload = "".join(lines[i] if lines[i].endswith("\n") else lines[i] + "\n" for i in chosen)
        if target_file.suffix == ".gz":
            # mtime=0 makes the committed archive reproducible byte for byte.
            with open(target_file, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as packed:
                packed.write(payload.encode("utf-8"))
        else:
            target_file.write_text(payload, encoding="utf-8")
        print(f"{split}: {len(chosen)} of {len(lines)} records ({len(eligible)} eligible) -> {target_file}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--make-corpus", action="store_true", help="re-sample the bundled DialogSum corpus")
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="folder of the real DialogSum files")
    parser.add_argument("--profile", default="default", choices=("default", "tiny"), help="zoo profile")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, default=None, help="default: $MLOT_DS_CACHE or ~/.cache/mlot_ds")
    parser.add_argument("--workers", type=int, default=None, help="members built at once (default: one per CPU)")
    parser.add_argument("--members", default=None, help="comma list of members to build (default: the core zoo); "
                        "on-demand: student-wide, student-smol")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    if args.make_corpus:
        make_corpus(args.source, corpus_dir())
        return 0

    from mlot_ds.errors import BadInput
    from mlot_ds.zoo import ON_DEMAND, ZooSettings, build_zoo, zoo_report_path
    from mlot_ds.zoo.build import MEMBER_RECORD

    settings = ZooSettings(profile=args.profile, seed=args.seed)
    names = [name.strip() for name in args.members.split(",") if name.strip()] if args.members else None
    try:
        members = build_zoo(settings, cache_dir=args.cache_dir, progress=not args.no_progress, workers=args.workers,
                            members=names)
    except (BadInput, ValueError) as exc:  # ValueError: an unknown member name
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"{'member':<14} {'architecture':<18} {'tokenizer':<18} {'vocab tok/model':>15} {'params':>9} {'bpb':>7} {'build s':>8}"
    )
    for name, path in members.items():
        record = json.loads((path / MEMBER_RECORD).read_text())
        vocab = f"{record['tokenizer_vocab']}/{record['model_vocab']}"
        print(
            f"{name:<14} {record['architecture']:<18} {record['tokenizer_class']:<18} {vocab:>15} "
            f"{record['parameters']:>9,} {record['bits_per_byte']:>7.3f} {record['build_seconds']:>8.1f}"
        )
        if "untrained_bits_per_byte" in record:
            print(f"{'':<14} untrained: {record['untrained_bits_per_byte']:.3f} bpb")
    report_file = zoo_report_path(settings, args.cache_dir)
    if report_file.is_file() and any(name not in ON_DEMAND for name in members):
        report = json.loads(report_file.read_text())
        margins = ", ".join(f"{t} {m:.1%}" for t, m in report.get("teacher_margin_over_student", {}).items())
        if margins:
            print(f"teachers below the student's bits-per-byte by: {margins}")
        print(f"core zoo build: {report['build_wall_seconds']} s wall (None = reused)")
        print(f"zoo: {report_file.parent}\nreport: {report_file}")
    for name in members:
        if name in ON_DEMAND:
            print(f"{name}: {members[name]}\nreport: {zoo_report_path(settings, args.cache_dir, name)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
