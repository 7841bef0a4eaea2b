"""Time MinED's vocabulary map (``mined_vocab_map``) with both edit-distance backends, 128k x 50k.

    flock /tmp/mlot-heavy.lock python tools/bench_vocab_map.py                        # 128,256-token teacher
    flock /tmp/mlot-heavy.lock python tools/bench_vocab_map.py --teacher-size 20000   # quick run

The student is the real GPT-2 tokenizer (50,257 tokens) from ``../shared/tokenizers/gpt2``. No
128k tokenizer is on this machine and nothing is downloaded, so the teacher is synthetic and
deterministic (``--seed``): a byte-level vocabulary of

- the 256 single bytes (ids 0-255, as in byte-level BPEs),
- GPT-2's own text tokens, each kept with probability ``--keep`` (the rest are the student tokens
  a real teacher lacks; most of them end up in the distance >= 2 search),
- one to three random edits (substitution, insertion, deletion; bytes drawn from GPT-2's tokens)
  of random GPT-2 tokens, ``--mutations`` of the new tokens,
- concatenations of two random GPT-2 tokens (the second without a leading space, as a larger
  BPE merges a word with its continuation), at most 48 bytes, the rest,

shuffled after the single bytes, up to ``--teacher-size`` ids including two special tokens at
the end (``<|begin_of_text|>``, ``<|end_of_text|>``). It is a ``tokenizers`` WordLevel model over
GPT-2's byte-to-character alphabet with a ByteLevel decoder, inside a ``PreTrainedTokenizerFast``;
the tool checks that ``token_surface_bytes`` reads back exactly the intended bytes.

``mined_vocab_map(student, teacher, cache_dir=None)`` then runs once per backend, in the order of
``--backends`` (numpy first by default), in one process. The tool prints the wall and process CPU
time of each whole map and of its distance >= 2 search alone, the ratios, how many student tokens
reached that search, the map's distance histogram, the load average before and after, and
whether the maps are identical (exit 1 if not).
"""

from __future__ import annotations

import argparse
import os
import random
import shlex
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
from rapidfuzz.distance import Levenshtein
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from mlot_ds.data import load_tokenizer
from mlot_ds.pairing import vocab_map as vocab_map_module
from mlot_ds.pairing.dtw import EDIT_DISTANCE_BACKENDS
from mlot_ds.pairing.surface import token_surface_bytes

REPO = Path(__file__).resolve().parents[1]
DEFAULT_GPT2 = REPO.parent / "shared" / "tokenizers" / "gpt2"
SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>")
LONGEST_CONCATENATION = 48


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (bytes that print as themselves keep their character)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table = {byte: chr(byte) for byte in printable}
    shift = 0
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(256 + shift)
            shift += 1
    return table


def mutate(token: bytes, generator: random.Random, byte_pool: bytes) -> bytes:
    """One to three random edits of ``token``."""
    out = bytearray(token)
    for _ in range(generator.randint(1, 3)):
        kind = generator.choice(("substitute", "insert", "delete") if len(out) > 1 else ("substitute", "insert"))
        position = generator.randrange(len(out) + (kind == "insert"))
        if kind == "substitute":
            out[position] = generator.choice(byte_pool)
        elif kind == "insert":
            out.insert(position, generator.choice(byte_pool))
        else:
            del out[position]
    return bytes(out)


def synthetic_teacher_surfaces(student_surfaces: list[bytes], size: int, keep: float, mutations: float,
                               seed: int) -> tuple[list[bytes], Counter]:
    """``size`` distinct non-empty byte strings: the vocabulary described in the module docstring."""
    if size < 256 + 1:
        raise SystemExit(f"--teacher-size must leave room for the 256 single bytes, got {size}")
    generator = random.Random(seed)
    singles = [bytes([b]) for b in range(256)]
    seen = set(singles)
    kinds: Counter = Counter(single=256)
    others: list[bytes] = []
    for surface in student_surfaces:
        if surface and surface not in seen and generator.random() < keep:
            seen.add(surface)
            others.append(surface)
            kinds["gpt2 kept"] += 1
    if len(others) > size - 256:
        raise SystemExit(f"--teacher-size {size} is smaller than the kept GPT-2 tokens ({len(others) + 256}); lower --keep")
    byte_pool = b"".join(student_surfaces)
    continuations = [s for s in student_surfaces if s and not s.startswith(b" ")]
    while len(others) < size - 256:
        if generator.random() < mutations:
            candidate, kind = mutate(generator.choice(student_surfaces), generator, byte_pool), "mutation"
        else:
            candidate, kind = generator.choice(student_surfaces) + generator.choice(continuations), "concatenation"
            if len(candidate) > LONGEST_CONCATENATION:
                continue
        if candidate and candidate not in seen:
            seen.add(candidate)
            others.append(candidate)
            kinds[kind] += 1
    generator.shuffle(others)
    return singles + others, kinds


def build_teacher(surfaces: list[bytes]) -> PreTrainedTokenizerFast:
    """A fast tokenizer whose ids ``0..len(surfaces)-1`` decode to ``surfaces``, then the two specials."""
    alphabet = bytes_to_unicode()
    vocab = {"".join(alphabet[b] for b in surface): token_id for token_id, surface in enumerate(surfaces)}
    for offset, special in enumerate(SPECIALS):
        vocab[special] = len(surfaces) + offset
    model = Tokenizer(models.WordLevel(vocab, unk_token=SPECIALS[1]))
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    teacher = PreTrainedTokenizerFast(tokenizer_object=model, bos_token=SPECIALS[0], eos_token=SPECIALS[1])
    read_back = token_surface_bytes(teacher)
    if len(teacher) != len(surfaces) + len(SPECIALS) or read_back[: len(surfaces)] != surfaces or read_back[-2:] != [None, None]:
        raise SystemExit("the synthetic teacher's token_surface_bytes differ from the intended bytes")
    return teacher


def timed_map(student, teacher, backend: str, workers: int) -> dict:
    """One ``mined_vocab_map`` run, with its distance >= 2 search timed and counted on the side."""
    far_search = vocab_map_module._search_far
    far = {"tokens": 0, "wall": 0.0, "cpu": 0.0}

    def counted(remaining, *args):
        far["tokens"] += len(remaining)
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            return far_search(remaining, *args)
        finally:
            far["wall"] += time.perf_counter() - wall
            far["cpu"] += time.process_time() - cpu

    vocab_map_module._search_far = counted
    try:
        wall, cpu = time.perf_counter(), time.process_time()
        mapping = vocab_map_module.mined_vocab_map(student, teacher, cache_dir=None, progress=False, backend=backend,
                                                   workers=workers)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    finally:
        vocab_map_module._search_far = far_search
    return {"map": mapping, "wall": wall, "cpu": cpu, "far": far}


def distance_histogram(student_surfaces, teacher_surfaces, mapping: np.ndarray) -> Counter:
    histogram: Counter = Counter()
    for student_id, surface in enumerate(student_surfaces):
        if surface is not None:
            distance = Levenshtein.distance(surface, teacher_surfaces[mapping[student_id]] or b"")
            histogram[distance if distance < 4 else "4+"] += 1
    return histogram


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpt2", type=Path, default=DEFAULT_GPT2, help="the GPT-2 tokenizer folder (the student)")
    parser.add_argument("--teacher-size", type=int, default=128_256, help="teacher ids, the two specials included")
    parser.add_argument("--keep", type=float, default=0.8, help="share of GPT-2's tokens the teacher keeps")
    parser.add_argument("--mutations", type=float, default=0.3, help="share of edited GPT-2 tokens among the new ones")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backends", default="numpy,rapidfuzz", help="comma-separated, run in this order")
    parser.add_argument("--workers", type=int, default=1, help="rapidfuzz threads (the engine's default is 1)")
    args = parser.parse_args(argv)
    backends = args.backends.split(",")
    unknown = [b for b in backends if b not in EDIT_DISTANCE_BACKENDS]
    if unknown or not backends:
        parser.error(f"--backends: unknown {unknown} (choose from {', '.join(EDIT_DISTANCE_BACKENDS)})")
    if not (args.gpt2 / "tokenizer.json").exists() and not (args.gpt2 / "vocab.json").exists():
        print(f"bench_vocab_map: the GPT-2 tokenizer is not at {args.gpt2} (pass --gpt2 PATH); nothing is downloaded.",
              file=sys.stderr)
        return 2
    command = "python tools/bench_vocab_map.py" + "".join(f" {shlex.quote(a)}" for a in (sys.argv[1:] if argv is None else argv))

    student = load_tokenizer(args.gpt2)
    student_surfaces = token_surface_bytes(student)
    teacher_text, kinds = synthetic_teacher_surfaces([s for s in student_surfaces if s is not None],
                                                     args.teacher_size - len(SPECIALS), args.keep, args.mutations, args.seed)
    teacher = build_teacher(teacher_text)
    lengths = np.array([len(s) for s in teacher_text])
    print(f"student: GPT-2, {len(student):,} ids; teacher: synthetic byte-level WordLevel, {len(teacher):,} ids "
          f"(seed {args.seed}; {', '.join(f'{k} {v:,}' for k, v in kinds.items())}; specials {len(SPECIALS)}); "
          f"teacher token length mean {lengths.mean():.1f}, median {int(np.median(lengths))}, max {lengths.max()}")

    load_before = os.getloadavg()
    runs = {}
    for backend in backends:
        print(f"running mined_vocab_map with backend={backend} ...", flush=True)
        runs[backend] = timed_map(student, teacher, backend, args.workers)
    load_after = os.getloadavg()

    first = runs[backends[0]]
    identical = all(run["map"].tolist() == first["map"].tolist() for run in runs.values())
    histogram = distance_histogram(student_surfaces, teacher_text + [None] * len(SPECIALS), first["map"].numpy())
    far_tokens = {run["far"]["tokens"] for run in runs.values()}

    print()
    print(f"order: {' then '.join(backends)} (one run each, one process); rapidfuzz workers={args.workers}")
    print(f"student tokens that reached the distance >= 2 search: {', '.join(f'{t:,}' for t in sorted(far_tokens))}")
    print("distance of each student text token to its teacher token: "
          + ", ".join(f"{k}: {histogram[k]:,}" for k in (0, 1, 2, 3, "4+")))
    print()
    print("| backend | map wall (s) | map cpu (s) | distance >= 2 search wall (s) | search cpu (s) |")
    print("|---|---:|---:|---:|---:|")
    for backend, run in runs.items():
        print(f"| {backend} | {run['wall']:.2f} | {run['cpu']:.2f} | {run['far']['wall']:.2f} | {run['far']['cpu']:.2f} |")
    if "numpy" in runs and "rapidfuzz" in runs:
        slow, fast = runs["numpy"], runs["rapidfuzz"]
        print(f"| numpy / rapidfuzz | {slow['wall'] / fast['wall']:.1f}x | {slow['cpu'] / fast['cpu']:.1f}x | "
              f"{slow['far']['wall'] / max(fast['far']['wall'], 1e-9):.1f}x | "
              f"{slow['far']['cpu'] / max(fast['far']['cpu'], 1e-9):.1f}x |")
    print()
    print(f"maps identical: {'yes' if identical else 'NO'}")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in load_before)}; after: {' '.join(f'{x:.2f}' for x in load_after)}")
    print(f"command: {command}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
