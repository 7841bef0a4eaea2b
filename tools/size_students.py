#!/usr/bin/env python
"""Size the on-demand zoo students: which is the smallest whose greedy outputs after SFT are summaries?

    python tools/size_students.py run --member student-wide --size 128x2:300 --size 192x4:600
    python tools/size_students.py report                 # docs/results/students.md from every run so far

``run`` builds each size as the zoo builds it (``build_zoo(..., members=[member])`` with the
size as a settings override, default profile, one thread, cached under ``--work-dir``), then
fine-tunes a copy with the zoo's own loop (:func:`mlot_ds.zoo.training.train_causal_lm` on
:func:`mlot_ds.zoo.training.tuning_batches`: cross-entropy on summary + EOS, micro-batch 4, lr 1e-3,
10% linear warm-up then cosine decay, gradient clip 1, the bundled DialogSum train sample, 384
positions) for each ``--sft-steps``, and evaluates it on the first ``--eval-limit`` test records
with :func:`mlot_ds.eval.evaluate_records`, as the engine does: bits per byte of the first reference
summary, ROUGE-LSum of the greedy summary (48 new tokens) against the three references, and the
summary measures of :func:`summary_measures`. Each (size, SFT steps) writes one JSON file with its
predictions into ``--work-dir``; ``report`` gathers them into a Markdown report (hand-written text
under ``## Analysis`` is kept) and a JSON file beside it holding every row with its predictions.

A size is ``HIDDENxLAYERS:PRETRAIN_STEPS`` with optional ``,heads=H,inter=I,vocab=V`` (defaults:
hidden/32 heads, at least 2; intermediate 4 x hidden; vocab from the profile).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_WORK_DIR = REPO / "runs" / "size-students"
DEFAULT_REPORT = REPO / "docs" / "results" / "students.md"
TAG = re.compile(r"#?Person\d+#?")
"""A speaker tag, also when tags run together (``#Person1#Person1#`` is two)."""
TURN = re.compile(r"#Person\d+#:")
WORD = re.compile(r"#?Person\d+#?|[A-Za-z0-9]+(?:'[A-Za-z]+)?")
MIN_CONTENT_WORDS = 4
MAX_TAG_SHARE = 0.5
MIN_DISTINCT_TRIGRAMS = 0.6
MIN_GROUNDED_LETTERS = 3
STEM_LETTERS = 5
"""Words are compared on their first 5 letters, a crude stem (interview / interviewing)."""
STOPWORDS = frozenset("""the and for him her his she you are was but not how why who has had its our all can get got let see
say one two new way day about after again also because been before being both could does doing down each from have
having here into just like more most much must next only other over really should some such than that their them then
there these they this those through today tomorrow very want wants were what when where which while will with would
your yours going know think tell tells told talk talks talking asks asked says said summarize dialogue
summary""".split())
"""Words too common to show that an output is about its dialogue (and every word under 3 letters)."""
WRITES_SUMMARIES = 0.8
"""A size "writes summaries" when at least this share of its outputs passes :func:`is_summary`
and at least this share of its outputs are distinct."""


# -- the summary measure ---------------------------------------------------------------------------
def words_of(text: str) -> list[str]:
    """Words of a text, a speaker tag (``#Person1#``) counting as one word."""
    return WORD.findall(text)


def distinct_trigram_ratio(words: list[str]) -> float:
    """Distinct word trigrams / trigrams (1.0 below three words): low for loops and repeated phrases."""
    grams = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
    return len(set(grams)) / len(grams) if grams else 1.0


def grounded_words(text: str, dialogue: str) -> set[str]:
    """The output's content words (3 letters or more, not a tag, not a stop word) whose stem its dialogue uses."""
    used = {word.lower()[:STEM_LETTERS] for word in words_of(dialogue)}
    return {w.lower() for w in words_of(text) if len(w) >= MIN_GROUNDED_LETTERS and not TAG.fullmatch(w)
            and w.lower() not in STOPWORDS and w.lower()[:STEM_LETTERS] in used}


def is_summary(text: str, dialogue: str | None = None) -> bool:
    """A plain test that an output reads as a summary and not as one of the degenerate outputs seen
    (chains of speaker tags, the same phrase in a loop, a continued dialogue, a stock sentence):

    - at least 4 words that are not speaker tags;
    - at most half of its words are speaker tags (a DialogSum summary names the speakers, e.g.
      "#Person1# asks #Person2# for the bill.", but mostly says something about them);
    - at least 60% of its word trigrams are distinct (no loop);
    - no dialogue turn marker ``#PersonN#:`` (it would be continuing the dialogue);
    - with its ``dialogue``: at least one content word of the dialogue (:func:`grounded_words`), so
      that a stock sentence that fits any dialogue does not count.
    """
    words = words_of(text)
    tags = sum(1 for word in words if TAG.fullmatch(word))
    content = len(words) - tags
    shaped = (content >= MIN_CONTENT_WORDS and tags <= MAX_TAG_SHARE * len(words)
              and distinct_trigram_ratio(words) >= MIN_DISTINCT_TRIGRAMS and not TURN.search(text))
    return shaped and (dialogue is None or bool(grounded_words(text, dialogue)))


@functools.lru_cache(maxsize=1)
def corpus_words() -> frozenset[str]:
    """Every word (lower-cased) of the bundled train dialogues and summaries: the words a student can know."""
    from mlot_ds.data.dialogsum import read_records

    return frozenset(w.lower() for r in read_records("train") for text in (r["dialogue"], r["summary"]) for w in words_of(text))


def non_word_share(texts: list[str]) -> float:
    """Share of the outputs' words (tags aside) that no train dialogue or summary uses: made-up words
    such as "prifin", which a small vocabulary spells from pieces."""
    words = [w.lower() for text in texts for w in words_of(text) if not TAG.fullmatch(w)]
    return sum(w not in corpus_words() for w in words) / len(words) if words else 0.0


def summary_measures(texts: list[str], dialogues: list[str]) -> dict[str, float]:
    """Over a set of outputs and their dialogues: the share shaped as summaries (:func:`is_summary`
    without the dialogue: not a tag chain, loop or dialogue turn), the share that are summaries (with
    it), the share of distinct outputs, and means of the tag share, distinct trigrams, grounded words, words."""
    tag_shares, trigrams, grounded, lengths = [], [], [], []
    for text, dialogue in zip(texts, dialogues, strict=True):
        words = words_of(text)
        tag_shares.append(sum(1 for w in words if TAG.fullmatch(w)) / len(words) if words else 1.0)
        trigrams.append(distinct_trigram_ratio(words))
        grounded.append(len(grounded_words(text, dialogue)))
        lengths.append(len(words))
    return {
        "sentence_share": sum(map(is_summary, texts)) / len(texts),
        "summary_share": sum(is_summary(t, d) for t, d in zip(texts, dialogues)) / len(texts),
        "distinct_outputs": len(set(texts)) / len(texts),
        "tag_share": statistics.fmean(tag_shares),
        "distinct_trigrams": statistics.fmean(trigrams),
        "grounded_words": statistics.fmean(grounded),
        "non_words": non_word_share(texts),
        "words": statistics.fmean(lengths),
    }


def writes_summaries(measures: dict[str, float]) -> bool:
    return measures["summary_share"] >= WRITES_SUMMARIES and measures["distinct_outputs"] >= WRITES_SUMMARIES


# -- sizes ------------------------------------------------------------------------------------------
def parse_size(text: str) -> dict:
    """``"128x2:300,heads=4,inter=512,vocab=8000"`` -> member spec overrides."""
    match = re.fullmatch(r"(\d+)x(\d+):(\d+)((?:,\w+=\d+)*)", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"size {text!r}: expected HIDDENxLAYERS:PRETRAIN[,heads=H,inter=I,vocab=V]")
    hidden, layers, pretrain = (int(match.group(i)) for i in (1, 2, 3))
    extra = dict(item.split("=") for item in match.group(4).split(",") if item)
    unknown = set(extra) - {"heads", "inter", "vocab"}
    if unknown:
        raise argparse.ArgumentTypeError(f"size {text!r}: unknown option(s) {', '.join(sorted(unknown))}")
    fields = {
        "hidden_size": hidden,
        "num_layers": layers,
        "num_heads": int(extra.get("heads", max(2, hidden // 32))),
        "intermediate_size": int(extra.get("inter", 4 * hidden)),
        "pretrain_steps": pretrain,
    }
    if "vocab" in extra:
        fields["vocab_size"] = int(extra["vocab"])
    return fields


def size_label(member: str, spec) -> str:
    return f"{member} v{spec.vocab_size} h{spec.hidden_size} l{spec.num_layers} p{spec.pretrain_steps}"


# -- one run -------------------------------------------------------------------------------------------
def sft_and_evaluate(folder: Path, steps: int, args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mlot_ds.data import Template, load_records
    from mlot_ds.data.dialogsum import read_records, render_context, render_response
    from mlot_ds.eval import evaluate_records
    from mlot_ds.zoo import corpus_path
    from mlot_ds.zoo.training import train_causal_lm, tuning_batches

    tokenizer = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    train = read_records("train")
    examples = [(render_context(r["dialogue"]), render_response(r["summary"])) for r in train]
    started = time.perf_counter()
    losses = train_causal_lm(model, tuning_batches(tokenizer, examples, context_length=args.max_length,
                                                   batch_size=args.micro_batch, seed=args.seed),
                             steps=steps, learning_rate=args.lr, warmup_fraction=0.1, progress=not args.no_progress,
                             description=f"SFT {steps}")
    sft_seconds = time.perf_counter() - started
    records = load_records("dialogsum", corpus_path("test"), limit=args.eval_limit).records
    started = time.perf_counter()
    result = evaluate_records(model, tokenizer, records, adapter="dialogsum", template=Template(), batch_size=16,
                              max_new_tokens=args.max_new_tokens, max_length=args.max_length)
    eval_seconds = time.perf_counter() - started
    return {
        "sft_steps": steps,
        "sft_seconds": round(sft_seconds, 1),
        "eval_seconds": round(eval_seconds, 1),
        "final_sft_loss": round(statistics.fmean(losses[-10:]), 4),
        "bits_per_byte": round(result.metrics["eval/bits_per_byte"], 4),
        "rouge_lsum": round(result.metrics["eval/rouge_lsum"], 2),
        **{k: round(v, 4) for k, v in summary_measures(result.predictions, [r.prompt for r in records]).items()},
        "predictions": [{"fname": r.id, "prediction": p, "reference": r.references[0] if r.references else r.response}
                        for r, p in zip(records, result.predictions)],
    }


def run(args) -> int:
    import torch

    from mlot_ds.zoo import ZooSettings, build_zoo

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    sizes = args.size or [{}]
    for fields in sizes:
        settings = ZooSettings(profile=args.profile, members={args.member: fields})
        spec = settings.resolved().spec(args.member)
        label = size_label(args.member, spec)
        started = time.perf_counter()
        folder = build_zoo(settings, cache_dir=work / "cache", progress=not args.no_progress, members=[args.member])[args.member]
        record = json.loads((folder / "zoo_member.json").read_text())
        print(f"{label}: built in {record['build_seconds']:.0f} s ({time.perf_counter() - started:.0f} s this call), "
              f"{record['parameters']:,} parameters, {record['bits_per_byte']:.3f} bits/byte after pretraining", flush=True)
        torch.set_num_threads(args.threads)  # the build ran on one thread and restored ours
        for steps in args.sft_steps:
            out = work / f"{settings.fingerprint(args.member)}-sft{steps}.json"
            if out.is_file() and not args.force:
                print(f"  SFT {steps}: already measured ({out.name})")
                continue
            row = sft_and_evaluate(folder, steps, args)
            row.update(member=args.member, label=label, fingerprint=settings.fingerprint(args.member),
                       spec=settings.describe(args.member)["members"][args.member], parameters=record["parameters"],
                       build_seconds=record["build_seconds"], pretrain_bits_per_byte=round(record["bits_per_byte"], 4),
                       untrained_bits_per_byte=round(record["untrained_bits_per_byte"], 4),
                       final_pretrain_loss=record["final_pretrain_loss"], threads=args.threads,
                       command="python tools/size_students.py " + shlex.join(sys.argv[1:]),
                       load_average=os.getloadavg())
            out.write_text(json.dumps(row, indent=2) + "\n")
            print(f"  SFT {steps}: {row['sft_seconds']:.0f} s, bits/byte {row['bits_per_byte']:.3f}, ROUGE-LSum "
                  f"{row['rouge_lsum']:.2f}, summaries {row['summary_share']:.0%}, distinct {row['distinct_outputs']:.0%}",
                  flush=True)
            for item in row["predictions"][:3]:
                print(f"    {item['fname']}: {item['prediction'][:160]!r}")
    return 0


# -- the report ------------------------------------------------------------------------------------------
def report(args) -> int:
    from mlot_ds.data.dialogsum import read_records, reference_summaries

    test = read_records("test")
    rows = [json.loads(p.read_text()) for p in sorted(Path(args.work_dir).glob("*-sft*.json"))]
    for row in rows:  # recomputed from the predictions, so that every row uses today's measure
        dialogues = [test[item["fname"]]["dialogue"] for item in row["predictions"]]
        row.update(summary_measures([item["prediction"] for item in row["predictions"]], dialogues))
    rows.sort(key=lambda r: (r["member"], r["parameters"], r["spec"]["pretrain_steps"], r["sft_steps"]))
    gold_pairs = [(s, r["dialogue"]) for r in test[:args.eval_limit] for s in reference_summaries(r)]
    calibration = summary_measures([s for s, _ in gold_pairs], [d for _, d in gold_pairs])
    lines = ["# Sizing the on-demand students", "",
             "Produced by `tools/size_students.py`; every number comes from the JSON files it writes (one per "
             "size and SFT length, with the predictions). Summary measures are recomputed from the stored predictions.",
             "", "## Setup", "",
             "- Build: `build_zoo(ZooSettings(profile='default', members={member: size}), members=[member])`, i.e. exactly "
             "the zoo's build (tokenizer, pretraining on the 2,000 bundled train dialogues and summaries in packed blocks "
             "of 256 tokens, batch 8, lr 3e-3, one thread). `build s` is that member's build time on one thread "
             "(`zoo_member.json`), on 2 cores shared with other jobs.",
             "- SFT: in-process, the zoo's own loop (`train_causal_lm` on `tuning_batches`): cross-entropy on summary + "
             "EOS after the plain DialogSum prompt, micro-batch 4, lr 1e-3, 10% linear warm-up then cosine decay to 10%, "
             "clip 1.0, AdamW (0.9, 0.95), 384 positions, the bundled train split shuffled (seed 0); 2 threads. "
             "Each SFT length is its own run (its own schedule).",
             "- Evaluation (`mlot_ds.eval.evaluate_records`, as the engine): the first 40 bundled test records; bits per "
             "byte of the first reference; greedy summaries of at most 48 new tokens, ROUGE-LSum (best of the three "
             "references, 0-100).",
             "- Summary measures (`tools/size_students.py`): *summary-shaped* = at least 4 words that are not speaker "
             "tags, at most half of the words tags (fused `#Person1#Person1#` count as two), at least 60% distinct word "
             "trigrams, no `#PersonN#:` turn; *summaries* = summary-shaped and using at least one content word (3+ "
             "letters, not a stop word, compared on its first 5 letters) of its own dialogue; *distinct outputs* = "
             "distinct predictions / 40; *grounded words* = mean count of such dialogue words per output; *non-words* = "
             "share of output words no train dialogue or summary uses.",
             "", "## Results", "",
             "| student | vocab | hidden | layers | heads / inter | params | pretrain steps | build s | bpb after pretraining | "
             "SFT steps | "
             "SFT s | bits/byte ↓ | ROUGE-LSum ↑ | summary-shaped ↑ | summaries ↑ | distinct outputs ↑ | tag share | "
             "grounded words | non-words | words |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        spec = r["spec"]
        mark = " **✓**" if writes_summaries(r) else ""
        lines.append(f"| {r['member']} | {spec['vocab_size']} | {spec['hidden_size']} | {spec['num_layers']} | "
                     f"{spec['num_heads']} / {spec['intermediate_size']} | "
                     f"{r['parameters'] / 1e6:.2f}M | {spec['pretrain_steps']} | {r['build_seconds']:.0f} | "
                     f"{r['pretrain_bits_per_byte']:.3f} | {r['sft_steps']} | {r['sft_seconds']:.0f} | "
                     f"{r['bits_per_byte']:.3f} | {r['rouge_lsum']:.2f} | {r['sentence_share']:.0%} | "
                     f"{r['summary_share']:.0%}{mark} | "
                     f"{r['distinct_outputs']:.0%} | {r['tag_share']:.2f} | {r['grounded_words']:.1f} | {r['non_words']:.0%} | "
                     f"{r['words']:.1f} |")
    lines += ["", f"✓: writes summaries (at least {WRITES_SUMMARIES:.0%} of the outputs pass the summary test and at "
              f"least {WRITES_SUMMARIES:.0%} are distinct). Calibration of the measure on the {len(gold_pairs)} gold "
              f"references of the same {args.eval_limit} test records: summaries {calibration['summary_share']:.0%}, "
              f"tag share {calibration['tag_share']:.2f}, distinct trigrams {calibration['distinct_trigrams']:.2f}, "
              f"grounded words {calibration['grounded_words']:.1f}, non-words {calibration['non_words']:.0%}, "
              f"{calibration['words']:.1f} words.", "",
              "Commands:", ""]
    lines += [f"    {c}" for c in dict.fromkeys(r["command"] for r in rows)]
    lines += ["    python tools/size_students.py report", ""]
    out = Path(args.out)
    analysis = ""
    if out.is_file() and "\n## Analysis" in out.read_text():
        analysis = "## Analysis" + out.read_text().split("\n## Analysis", 1)[1]
    out.write_text("\n".join(lines) + ("\n" + analysis if analysis else ""))
    data = out.with_suffix(".json")
    compact = [{**r, "predictions": [[item["fname"], item["prediction"]] for item in r["predictions"]]} for r in rows]
    data.write_text(json.dumps({"calibration": calibration, "predictions": "[test record index, greedy output]",
                                "rows": compact}) + "\n")
    print(f"wrote {out}, {data}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("run", help="build, fine-tune and evaluate sizes of one student")
    run_parser.add_argument("--member", choices=("student-wide", "student-smol", "student"), required=True)
    run_parser.add_argument("--size", type=parse_size, action="append", help="HIDDENxLAYERS:PRETRAIN[,heads=,inter=,vocab=]; "
                            "repeat; default: the profile's spec")
    run_parser.add_argument("--profile", choices=("default", "tiny"), default="default")
    run_parser.add_argument("--sft-steps", type=lambda s: [int(x) for x in s.split(",")], default=[250, 500])
    run_parser.add_argument("--micro-batch", type=int, default=4)
    run_parser.add_argument("--lr", type=float, default=1e-3)
    run_parser.add_argument("--max-length", type=int, default=384)
    run_parser.add_argument("--max-new-tokens", type=int, default=48)
    run_parser.add_argument("--threads", type=int, default=1, help="torch threads for SFT and evaluation (builds use 1)")
    run_parser.add_argument("--force", action="store_true", help="measure again sizes already measured")
    run_parser.add_argument("--no-progress", action="store_true")
    for each in (run_parser, sub.add_parser("report", help="write the Markdown report from every run")):
        each.add_argument("--work-dir", default=str(DEFAULT_WORK_DIR))
        each.add_argument("--eval-limit", type=int, default=40)
        each.add_argument("--seed", type=int, default=0)
        each.add_argument("--out", default=str(DEFAULT_REPORT))
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return run(args) if args.command == "run" else report(args)


if __name__ == "__main__":
    sys.exit(main())
