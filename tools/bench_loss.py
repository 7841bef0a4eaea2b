"""Time forward + backward and peak memory of the distillation losses, as ratios against CE only.

    python tools/bench_loss.py                      # both shapes of the issue
    python tools/bench_loss.py --shapes small       # B=2, T=256 (128 response tokens), n=32k, m=50k

Times: all variants run in one process on the same inputs, in interleaved rounds (one warm-up
round), and the minimum wall-clock and process CPU time per variant is kept, so that load from
other processes on the machine hits every variant alike. Peak memory: each variant runs again in
its own child process, where the growth of the resident set during one run after a warm-up is read
from /proc (VmHWM reset before the run). Variants:

- ``ce``: masked CE only (the baseline).
- ``ce+mlot student (fused)``: CE and the MultiLevelOT student side from a precomputed teacher
  summary, CE fused into the same pass (``student_labels=``).
- ``ce+mlot student (separate)``: the same with CE computed by ``masked_ce``.
- ``ce+mlot whole``: teacher summary from full teacher logits + the fused student side.
- ``ce+uld``: CE + ULD.
- ``naive mlot``: CE + a per-token full-sort MultiLevelOT that materialises every intermediate.
- ``released code``: our transcription of the released ``DistillationLoss`` (std-normalised full
  logits, zero-padded span softmax, batch argsort, plain Sinkhorn per sample) with HF-style CE.
- ``ce+<kind> student`` for ``kind`` in ``kl``, ``alm``, ``vocagnolm``, ``cdm``: the student side of
  ``METHODS[kind]`` (``method.student``) from its teacher side, which is computed once from the full
  teacher logits outside the timed region (``method.teacher``, like the MultiLevelOT summary), plus
  CE: fused into the same pass where the class fuses it (``fuses_ce``: kl at temperature 1, alm,
  vocagnolm), else ``masked_ce`` on its own (cdm). The loss is ``CE / tokens + sum_t w_t * term_t /
  count`` with the class's default weights and its own denominator (``method.counts``, also outside).
- ``ce+<kind> student`` for ``kind`` in ``dskd``, ``emo``, ``alm+latents`` (ALM with ``latents: true``):
  the methods with trainable projectors, the same way, plus what they read beside the logits: the
  student's final hidden states, input embeddings (DSKD), output-layer weight (DSKD) and last-layer
  head-averaged attention (EMO), and the teacher's hidden states, embeddings, output-layer weight and
  attention, all random tensors made outside the timed region (the student's hidden states and
  attention as leaves that receive their gradient, as the student model's would). The projectors are
  the engine's (``mlot_ds.engine.modules.build_modules``, float32) and get their gradients too.

Inputs of the method variants, all synthetic and deterministic: ``kl`` gets a teacher of the
student's vocabulary (random logits, ``same_tokenizer``) and position pairing. ``alm``,
``vocagnolm``, ``cdm`` and the projector methods get the shape's teacher and a made-up response text: words of 2-9 bytes
(half with a leading space), each cut into 1-3 tokens independently on each side, until one side
has its ``response`` tokens; the offsets pairing, its group stops and the token overlaps come from
those byte spans (``offset_groups``, ``token_overlaps``, as the data pipeline builds them), so
groups have 1-3 tokens on each side and most student tokens overlap one teacher token. Token
surfaces: unique strings of 1-9 letters, about half with a leading space, the last id special; the
teacher reuses 80% of the student's strings (the exact matches CDM maps by) and makes up the rest.
The labels stay the random ids of the other variants. The projector methods' model sizes are the
shape's ``student_hidden`` / ``teacher_hidden`` (embedding width = hidden width, 2 student and 4
teacher layers); EMO's 1:1 pairs are the offsets groups' first tokens (a stand-in for MinED's pairs:
its cost does not depend on which tokens are paired, only on how many).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from mlot_ds.engine import modules as trainable
from mlot_ds.losses import PRESETS, TERMS, masked_ce, multilevel_ot_from_summary, teacher_summary, uld
from mlot_ds.losses.method import (
    EMBEDDINGS,
    HIDDEN,
    OUTPUT_WEIGHT,
    FrozenWeight,
    LogitSource,
    MethodContext,
    ModelDims,
    TeacherView,
    attention,
)
from mlot_ds.losses.registry import METHODS
from mlot_ds.pairing import IGNORE_INDEX, ModelBatch, Pairing, position_pairing
from mlot_ds.pairing.offsets import offset_groups
from mlot_ds.pairing.overlaps import token_overlaps

SHAPES = {
    "large": dict(batch=4, seq_len=512, response=256, student_vocab=50_000, teacher_vocab=128_000,
                  student_hidden=768, teacher_hidden=2048),
    "small": dict(batch=2, seq_len=256, response=128, student_vocab=32_000, teacher_vocab=50_000,
                  student_hidden=512, teacher_hidden=1024),
}
VARIANTS = [
    "ce",
    "ce+mlot student (fused)",
    "ce+mlot student (separate)",
    "ce+mlot whole",
    "ce+uld",
    "naive mlot",
    "released code",
]
METHOD_KINDS = ("kl", "alm", "vocagnolm", "cdm", "dskd", "emo", "alm+latents")
# A label of METHOD_KINDS -> (its loss kind, its hyper-parameters besides the defaults)
METHOD_SETTINGS = {"alm+latents": ("alm", {"latents": True})}
PROJECTOR_KINDS = ("dskd", "emo", "alm+latents")
STUDENT_LAYERS, TEACHER_LAYERS = 2, 4
METHOD_VARIANTS = {f"ce+{kind} student": kind for kind in METHOD_KINDS}
VARIANTS += list(METHOD_VARIANTS)
LARGE_OPT_IN = ("ce+uld", "naive mlot", "ce+dskd student")
K = 50
SHARED_SURFACES = 0.8  # fraction of the student's token strings the synthetic teacher vocabulary reuses


def make_inputs(shape):
    gen = torch.Generator().manual_seed(0)
    b, t, r = shape["batch"], shape["seq_len"], shape["response"]
    student = torch.randn(b, t, shape["student_vocab"], generator=gen) * 3
    teacher = torch.randn(b, t, shape["teacher_vocab"], generator=gen) * 3
    s_labels = torch.full((b, t), -100)
    t_labels = torch.full((b, t), -100)
    s_labels[:, t - r :] = torch.randint(0, shape["student_vocab"], (b, r), generator=gen)
    t_labels[:, t - r :] = torch.randint(0, shape["teacher_vocab"], (b, r), generator=gen)
    return student, teacher, s_labels, t_labels


def weighted(out, preset="default"):
    weights = PRESETS[preset].weights
    return sum(weights[name] * out[name] for name in TERMS) / out["tokens"]


def naive_mlot(student_logits, teacher_logits, pairing, k=K, lam=0.1, iters=20):
    """Per-token full sort (the released code's first upload), every intermediate materialised."""
    mask = pairing.mask
    b = torch.arange(mask.shape[0]).unsqueeze(1).expand_as(mask)
    s_rows = student_logits[b, pairing.student_index]  # [B, P, n], padded pairs included
    t_rows = teacher_logits[b, pairing.teacher_index]
    top = {}
    for tau in (1.0, 2.0):
        s_sorted = torch.softmax(s_rows / tau, dim=-1).sort(dim=-1, descending=True).values
        t_sorted = torch.softmax(t_rows / tau, dim=-1).sort(dim=-1, descending=True).values
        top[tau] = (s_sorted[..., :k], t_sorted[..., :k])
    m = mask.unsqueeze(2)
    had = ((top[1.0][1] - top[1.0][0]).abs() * m).sum()
    sl = -(top[1.0][1] * top[1.0][0].log() * m).sum()
    cost = torch.cdist(top[2.0][1], top[2.0][0], p=1)
    with torch.no_grad():
        plan = torch.exp(-cost / lam) * (mask.unsqueeze(2) & mask.unsqueeze(1))
        for _ in range(iters):
            plan = plan / plan.sum(dim=2, keepdim=True).clamp(min=1e-30)
            plan = plan / plan.sum(dim=1, keepdim=True).clamp(min=1e-30)
    sd = (plan * cost).sum()
    return {"had": had, "sl": sl, "sd": sd, "tokens": mask.sum().float()}


def released_code_loss(student_logits, teacher_logits, s_labels, t_labels, k=K):
    """Our transcription of the released loss, run the way that code runs it (incl. its CE)."""
    vocab = student_logits.shape[-1]
    ce = F.cross_entropy(student_logits[:, :-1].contiguous().view(-1, vocab), s_labels[:, 1:].contiguous().view(-1))

    def spans(labels, skip):
        out = []
        for row in labels.tolist():
            lead = next(q for q, y in enumerate(row) if y != -100)
            out.append((lead - 1, sum(y != -100 for y in row) - skip))
        return out

    s_spans, t_spans = spans(s_labels, 1), spans(t_labels, 0)
    student = student_logits / (student_logits.std(dim=-1, keepdim=True) + 1e-4)
    teacher = teacher_logits / (teacher_logits.std(dim=-1, keepdim=True) + 1e-4)
    student_rows, teacher_rows = [], []
    for i, (start, size) in enumerate(s_spans):
        student_rows.append(
            torch.cat(
                (torch.softmax(student[i, start : start + size], -1), torch.zeros_like(student[i, : student.shape[1] - size]))
            )
        )
    for i, (start, size) in enumerate(t_spans):
        teacher_rows.append(
            torch.cat(
                (torch.softmax(teacher[i, start : start + size], -1), torch.zeros_like(teacher[i, : teacher.shape[1] - size]))
            )
        )
    lmax = max(max(s for _, s in s_spans), max(s for _, s in t_spans))
    student, teacher = torch.stack(student_rows)[:, :lmax], torch.stack(teacher_rows)[:, :lmax]
    teacher = teacher[:, :, torch.argsort(teacher.sum(dim=(0, 1)), descending=True)][:, :, :k]
    student = student[:, :, torch.argsort(student.sum(dim=(0, 1)), descending=True)][:, :, :k]
    had = torch.stack(
        [
            (student[i, : min(s_spans[i][1], t_spans[i][1])] - teacher[i, : min(s_spans[i][1], t_spans[i][1])])
            .abs()
            .sum(-1)
            .mean(-1)
            for i in range(student.shape[0])
        ]
    )
    sl = -(torch.softmax(student, -1) * torch.log_softmax(teacher, -1)).sum(-1).mean()
    sd = 0.0
    for i in range(student.shape[0]):
        cost = torch.cdist(torch.softmax(teacher[i] / 2, -1), torch.softmax(student[i] / 2, -1), p=1)
        plan = torch.exp(-cost / 0.1)
        for _ in range(10):
            plan = plan / plan.sum(dim=1, keepdim=True)
            plan = plan / plan.sum(dim=0, keepdim=True)
        sd = sd + 0.001 * (plan * cost).sum()
    return ce + 1.5 * ((had + 0.1 * sl).mean() + 0.1 * sd)


LETTERS = b"abcdefghijklmnopqrstuvwxyz"


def synthetic_surfaces(count, seed, shared=()):
    """``count`` token surfaces: unique byte strings of 1-9 letters, about half with a leading space, in
    random id order, and a special last id (``None``). ``shared`` strings are reused first."""
    rng = random.Random(seed)
    strings = list(dict.fromkeys(shared))[: count - 1]
    seen = set(strings)
    while len(strings) < count - 1:
        size = rng.choices(range(1, 10), weights=(3, 6, 8, 8, 7, 6, 4, 3, 2))[0]
        surface = (b" " if rng.random() < 0.5 else b"") + bytes(rng.choices(LETTERS, k=size))
        if surface not in seen:
            seen.add(surface)
            strings.append(surface)
    rng.shuffle(strings)
    return tuple(strings) + (None,)


def _cut(rng, size, whole=False):
    """Byte lengths of the 1-3 tokens one side cuts a word of ``size`` bytes into (1 if ``whole``)."""
    pieces = 1 if whole else min(size, rng.choices((1, 2, 3), weights=(7, 2, 1))[0])
    cuts = sorted(rng.sample(range(1, size), pieces - 1))
    return [b - a for a, b in zip([0, *cuts], [*cuts, size])]


def synthetic_alignment(response, seed):
    """Byte spans of a made-up response on both sides: words of 2-9 bytes, each cut into 1-3 tokens on
    each side independently (a side more than 2 tokens ahead keeps the word whole, so the two stay
    close), until a word kept whole would give one side more than ``response`` tokens."""
    rng = random.Random(seed)
    spans = ([], [])
    start = 0
    while True:
        size = rng.randint(2, 9)
        lead = len(spans[0]) - len(spans[1])
        lengths = (_cut(rng, size, lead > 2), _cut(rng, size, lead < -2))
        if any(len(side) + len(new) > response for side, new in zip(spans, lengths)):
            lengths = ([size], [size])
            if any(len(side) + 1 > response for side in spans):
                return spans
        for side, new in zip(spans, lengths):
            position = start
            for length in new:
                side.append((position, position + length))
                position += length
        start += size


def cross_tokenizer_view(s_labels, t_labels, seed=0):
    """The offsets pairing with its group stops and the student tokens' overlaps, as the data pipeline
    builds them, from :func:`synthetic_alignment` (response tokens outside the text: unpaired, unmapped)."""
    batch, response = s_labels.shape[0], int((s_labels[0] != IGNORE_INDEX).sum())
    s_prompt = int((s_labels[0] != IGNORE_INDEX).nonzero()[0])
    t_prompt = int((t_labels[0] != IGNORE_INDEX).nonzero()[0])
    fields, lo, hi = [], torch.zeros(batch, response, dtype=torch.long), torch.zeros(batch, response, dtype=torch.long)
    for b in range(batch):
        s_spans, t_spans = synthetic_alignment(response, seed + b)
        groups = offset_groups(s_spans, t_spans)
        # Response token q is at position prompt + q; its group [start, stop) is predicted by the rows
        # prompt + start - 1 .. prompt + stop - 2.
        fields.append([(s_prompt + g.student_tokens.start - 1, s_prompt + g.student_tokens.stop - 1,
                        t_prompt + g.teacher_tokens.start - 1, t_prompt + g.teacher_tokens.stop - 1) for g in groups])
        ranges = token_overlaps(s_spans, t_spans)
        ranges += [(len(t_spans), len(t_spans))] * (response - len(ranges))
        lo[b], hi[b] = torch.tensor(ranges).T
    width = max(len(f) for f in fields)
    packed = torch.zeros(4, batch, width, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.bool)
    for b, rows in enumerate(fields):
        packed[:, b, : len(rows)] = torch.tensor(rows).T
        mask[b, : len(rows)] = True
    pairing = Pairing(packed[0], packed[2], mask)
    groups = (packed[1] * mask, packed[3] * mask)
    overlaps = (lo, hi, torch.ones(batch, response, dtype=torch.bool))
    return TeacherView(pairing, model_batch(s_labels), model_batch(t_labels), groups, overlaps)


def model_batch(labels):
    return ModelBatch(labels.clamp(min=0), torch.ones_like(labels), labels)


def causal_attention(batch, seq_len, generator):
    """Random head-averaged attention rows ``[B, T, T]``: a softmax over each row's visible positions."""
    scores = torch.randn(batch, seq_len, seq_len, generator=generator)
    visible = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    return torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)


def synthetic_features(shape, generator):
    """``(student features, teacher features, teacher output weight)``: random stand-ins of what the
    engine's hooks capture (:mod:`mlot_ds.teachers.features`), at the shape's sizes."""
    b, t = shape["batch"], shape["seq_len"]
    hs, ht = shape["student_hidden"], shape["teacher_hidden"]
    student = {EMBEDDINGS: torch.randn(b, t, hs, generator=generator), HIDDEN: torch.randn(b, t, hs, generator=generator),
               OUTPUT_WEIGHT: torch.randn(shape["student_vocab"], hs, generator=generator) / hs**0.5,
               attention(-1): causal_attention(b, t, generator)}
    teacher = {EMBEDDINGS: torch.randn(b, t, ht, generator=generator), HIDDEN: torch.randn(b, t, ht, generator=generator)}
    teacher_attention = causal_attention(b, t, generator)
    for layer in range(TEACHER_LAYERS):
        teacher[attention(layer)] = teacher_attention
    weight = torch.randn(shape["teacher_vocab"], ht, generator=generator) / ht**0.5
    return student, teacher, weight


def setup_method(label, shape, inputs):
    """``(method, reduced, view, counts, ce_tokens)``: ``METHODS[kind]`` (its projectors attached), its
    teacher side from the full teacher logits, its view (with the student's features), its counts and
    CE's token count."""
    _, teacher, s_labels, t_labels = inputs
    n, m = shape["student_vocab"], shape["teacher_vocab"]
    kind, settings = METHOD_SETTINGS.get(label, (label, {}))
    if kind == "kl":
        # Same tokenizer: a teacher of the student's vocabulary, its own random logits, position pairing.
        gen = torch.Generator().manual_seed(1)
        teacher = torch.randn(shape["batch"], shape["seq_len"], n, generator=gen) * 3
        view = TeacherView(position_pairing(s_labels, s_labels), model_batch(s_labels), model_batch(s_labels))
        context = MethodContext(student_vocab=n, teacher_vocab=n, same_tokenizer=True)
    else:
        view = cross_tokenizer_view(s_labels, t_labels)
        student_surfaces = synthetic_surfaces(n, seed=1)
        text = [s for s in student_surfaces if s is not None]
        shared = random.Random(2).sample(text, int(SHARED_SURFACES * len(text)))
        dims = {}
        if label in PROJECTOR_KINDS:
            dims = dict(student_dims=ModelDims(shape["student_hidden"], shape["student_hidden"], n, STUDENT_LAYERS),
                        teacher_dims=ModelDims(shape["teacher_hidden"], shape["teacher_hidden"], m, TEACHER_LAYERS))
        context = MethodContext(student_surfaces=student_surfaces, teacher_surfaces=synthetic_surfaces(m, 3, shared),
                                student_vocab=n, teacher_vocab=m, **dims)
    cls = METHODS[kind]
    method = cls(cls.Params(**settings), None, context)
    teacher_features = None
    if label in PROJECTOR_KINDS:
        student_features, teacher_all, teacher_weight = synthetic_features(shape, torch.Generator().manual_seed(4))
        method.bind_teacher_constants({OUTPUT_WEIGHT: FrozenWeight(teacher_weight)})
        teacher_features = {name: teacher_all[name] for name in method.teacher_features() if name != OUTPUT_WEIGHT}
        view = view._replace(features={name: student_features[name] for name in method.student_features()})
        tree = trainable.build_modules(trainable.module_manifest({"teacher": method}), seed=0, dtype=torch.float32)
        method.attach_modules(dict(tree["teacher"]))
    with torch.no_grad():
        reduced = method.teacher(LogitSource(logits=teacher, features=teacher_features), view, gold=False).reduced
    counts = method.counts(reduced, view)
    return method, reduced, view, counts, float((s_labels[:, 1:] != IGNORE_INDEX).sum())


def method_loss(setup, student, s_labels):
    """CE + one method's weighted student-side terms (each over its own count), CE fused where the class
    fuses it. The student's hidden states and attention are fresh leaves: their gradient is computed."""
    method, reduced, view, counts, ce_tokens = setup
    if view.features:
        view = view._replace(features={name: value if name == OUTPUT_WEIGHT else value.detach().requires_grad_()
                                       for name, value in view.features.items()})
        for module in method.trainable.values():
            module.zero_grad(set_to_none=True)
    terms = method.student(student, reduced, view, ce_labels=s_labels if method.fuses_ce else None)
    ce = terms.pop("ce") if method.fuses_ce else masked_ce(student, s_labels)["ce"]
    kd = sum(method.term_weights[t] * value / max(counts[method.term_denominator(t)], 1.0) for t, value in terms.items())
    return ce / ce_tokens + kd


def run_variant(name, inputs):
    """One forward + backward of ``name``; returns the loss value."""
    student_base, teacher, s_labels, t_labels = inputs
    student = student_base.detach().requires_grad_()
    if name == "ce":
        out = masked_ce(student, s_labels)
        loss = out["ce"] / out["tokens"]
    elif name in ("ce+mlot student (fused)", "ce+mlot whole"):
        pairing = position_pairing(s_labels, t_labels)
        summary = inputs.summary if name.endswith("(fused)") else teacher_summary(teacher, pairing)
        out = multilevel_ot_from_summary(student, summary, pairing, student_labels=s_labels)
        loss = out["ce"] / out["ce_tokens"] + weighted(out)
    elif name == "ce+mlot student (separate)":
        pairing = position_pairing(s_labels, t_labels)
        ce = masked_ce(student, s_labels)
        loss = ce["ce"] / ce["tokens"] + weighted(multilevel_ot_from_summary(student, inputs.summary, pairing))
    elif name == "ce+uld":
        ce = masked_ce(student, s_labels)
        out = uld(student, teacher, s_labels, t_labels)
        loss = ce["ce"] / ce["tokens"] + 1.5 * out["uld"] / out["tokens"]
    elif name == "naive mlot":
        ce = masked_ce(student, s_labels)
        loss = ce["ce"] / ce["tokens"] + weighted(naive_mlot(student, teacher, position_pairing(s_labels, t_labels)))
    elif name == "released code":
        loss = released_code_loss(student, teacher, s_labels, t_labels)
    elif name in METHOD_VARIANTS:
        loss = method_loss(inputs.methods[METHOD_VARIANTS[name]], student, s_labels)
    else:
        raise ValueError(f"unknown variant {name!r}; valid: {VARIANTS}")
    loss.backward()
    return float(loss.detach())


class Inputs(tuple):
    summary = None
    methods = None


def prepare(shape, variants):
    """The shape's inputs with what ``variants`` precompute: the MultiLevelOT teacher summary and the
    method variants' teacher sides (never part of a timed or measured run)."""
    inputs = Inputs(make_inputs(shape))
    _, teacher, s_labels, t_labels = inputs
    if any("mlot student" in v for v in variants):
        inputs.summary = teacher_summary(teacher, position_pairing(s_labels, t_labels))
    inputs.methods = {METHOD_VARIANTS[v]: setup_method(METHOD_VARIANTS[v], shape, inputs) for v in variants
                      if v in METHOD_VARIANTS}
    return inputs


def _memory_kb(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(variant, shape_name):
    """Peak resident memory of one measured run of ``variant`` (after a warm-up run)."""
    inputs = prepare(SHAPES[shape_name], [variant])
    run_variant(variant, inputs)
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # resets VmHWM (peak RSS) to the current RSS
    before = _memory_kb("VmRSS")
    run_variant(variant, inputs)
    print(json.dumps({"peak_mb": (_memory_kb("VmHWM") - before) / 1024}))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["small", "large"], choices=sorted(SHAPES))
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    # The per-token full sort and ULD take about a minute per run at the large shape, DSKD two (its
    # projections through a 128k-row output layer): opt-in there.
    parser.add_argument(
        "--large-variants",
        nargs="+",
        default=[v for v in VARIANTS if v not in LARGE_OPT_IN],
        choices=VARIANTS + ["all"],
        help="variants at the large shape ('all' for every one)",
    )
    parser.add_argument("--reps", type=int, default=5, help="timed rounds (small shape)")
    parser.add_argument("--large-reps", type=int, default=1, help="timed rounds (large shape)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "SHAPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        child(*args.child)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    for shape_name in args.shapes:
        shape = SHAPES[shape_name]
        variants = args.variants if shape_name == "small" else args.large_variants
        variants = VARIANTS if "all" in variants else variants
        reps = args.reps if shape_name == "small" else args.large_reps
        inputs = prepare(shape, variants)
        wall = {v: float("inf") for v in variants}
        cpu = dict(wall)
        # Interleaved rounds: a burst of load from other processes hits every variant alike.
        for _ in tqdm(range(reps + 1), desc=f"{shape_name}: rounds", leave=False):
            for variant in variants:
                start_wall, start_cpu = time.perf_counter(), time.process_time()
                run_variant(variant, inputs)
                wall[variant] = min(wall[variant], time.perf_counter() - start_wall)
                cpu[variant] = min(cpu[variant], time.process_time() - start_cpu)
        del inputs
        print(f"\n== {shape_name}: {shape}, k={K}; {reps} timed rounds + 1 warm-up; load {os.getloadavg()[0]:.1f}")
        print(f"{'variant':28s} {'wall (s)':>9s} {'x CE':>6s} {'cpu (s)':>8s} {'x CE':>6s} {'peak MB':>8s} {'x CE':>6s}")
        peaks = {}
        for variant in variants:
            cmd = [sys.executable, __file__, "--child", variant, shape_name, "--threads", str(args.threads)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            peaks[variant] = json.loads(done.stdout.strip().splitlines()[-1])["peak_mb"] if done.returncode == 0 else float("nan")
            base = variants[0]
            print(
                f"{variant:28s} {wall[variant]:9.3f} {wall[variant] / wall[base]:6.2f} {cpu[variant]:8.3f} "
                f"{cpu[variant] / cpu[base]:6.2f} {peaks[variant]:8.0f} {peaks[variant] / max(peaks[base], 1):6.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
