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
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from mlot_ds.losses import PRESETS, TERMS, masked_ce, multilevel_ot_from_summary, teacher_summary, uld
from mlot_ds.pairing import position_pairing

SHAPES = {
    "large": dict(batch=4, seq_len=512, response=256, student_vocab=50_000, teacher_vocab=128_000),
    "small": dict(batch=2, seq_len=256, response=128, student_vocab=32_000, teacher_vocab=50_000),
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
LARGE_OPT_IN = ("ce+uld", "naive mlot")
K = 50


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
        student_rows.append(torch.cat((torch.softmax(student[i, start : start + size], -1), torch.zeros_like(student[i, : student.shape[1] - size]))))
    for i, (start, size) in enumerate(t_spans):
        teacher_rows.append(torch.cat((torch.softmax(teacher[i, start : start + size], -1), torch.zeros_like(teacher[i, : teacher.shape[1] - size]))))
    lmax = max(max(s for _, s in s_spans), max(s for _, s in t_spans))
    student, teacher = torch.stack(student_rows)[:, :lmax], torch.stack(teacher_rows)[:, :lmax]
    teacher = teacher[:, :, torch.argsort(teacher.sum(dim=(0, 1)), descending=True)][:, :, :k]
    student = student[:, :, torch.argsort(student.sum(dim=(0, 1)), descending=True)][:, :, :k]
    had = torch.stack([
        (student[i, : min(s_spans[i][1], t_spans[i][1])] - teacher[i, : min(s_spans[i][1], t_spans[i][1])]).abs().sum(-1).mean(-1)
        for i in range(student.shape[0])
    ])
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
    else:
        raise ValueError(f"unknown variant {name!r}; valid: {VARIANTS}")
    loss.backward()
    return float(loss.detach())


class Inputs(tuple):
    summary = None


def _memory_kb(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(variant, shape_name):
    """Peak resident memory of one measured run of ``variant`` (after a warm-up run)."""
    inputs = Inputs(make_inputs(SHAPES[shape_name]))
    student, teacher, s_labels, t_labels = inputs
    inputs.summary = teacher_summary(teacher, position_pairing(s_labels, t_labels))
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
    # The per-token full sort and ULD take about a minute per run at the large shape: opt-in there.
    parser.add_argument(
        "--large-variants", nargs="+", default=[v for v in VARIANTS if v not in LARGE_OPT_IN],
        choices=VARIANTS + ["all"], help="variants at the large shape ('all' for every one)",
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
        inputs = Inputs(make_inputs(shape))
        inputs.summary = teacher_summary(inputs[1], position_pairing(inputs[2], inputs[3]))
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
