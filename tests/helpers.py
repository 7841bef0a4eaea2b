"""What the tests share: paths, running real DeepSpeed jobs, reading their metrics, and the small
float64 references the loss tests build on. Test files import from here, never from each other."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
ZERO3 = str(REPO / "ds_configs" / "zero3.json")


# ------------------------------------------------------------------------------------------ jobs


def job_env(zoo_cache: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"MLOT_DS_CACHE": str(zoo_cache), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
                "OMP_NUM_THREADS": "1",
                # Subprocesses import this checkout's mlot_ds, whatever `pip install -e` points at.
                "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)})
    env.update(extra)
    return env


def deepspeed_command(num_ranks: int, args: list[str], master_port: int) -> list[str]:
    """``deepspeed --num_gpus N launch/train.py ...`` (N CPU ranks over gloo)."""
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(num_ranks),
            "--master_port", str(master_port), str(REPO / "launch" / "train.py"), *args]


def run_job(command: list[str], env: dict, log: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    with open(log, "w") as handle:
        result = subprocess.run(command, env=env, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT,
                                timeout=timeout)
    result.log_text = log.read_text()
    return result


def tiny_recipe_overrides(output_dir: Path, **extra) -> list[str]:
    """The embedded demo, scaled down to the tiny zoo and a few steps."""
    values = {
        "zoo.profile": "tiny", "train.output_dir": str(output_dir), "train.micro_batch_size": 2,
        "train.max_steps": 6, "train.save_every": 0, "train.warmup_steps": 0, "train.lr": 1e-3,
        "data.max_length": 160, "data.train.limit": 21, "data.eval.limit": 4, "eval.limit": 4,
        "eval.max_new_tokens": 8, "eval.batch_size": 2,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def metrics(output_dir: Path) -> dict[int, dict]:
    rows = {}
    for line in (output_dir / "tensorboard" / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        # A resumed run rewrites later steps, and evaluation adds rows: the newest value wins.
        rows.setdefault(row["step"], {}).update(row)
    return rows


# ------------------------------------------------------------------------------ float64 references


def make_batch(prompt_and_answer, seq_len, vocab, generator, dtype=torch.float64):
    """Random logits and HF labels: row b has ``prompt`` ignored tokens then ``answer`` labels, then padding."""
    logits = torch.randn(len(prompt_and_answer), seq_len, vocab, generator=generator, dtype=dtype) * 2
    labels = torch.full((len(prompt_and_answer), seq_len), -100)
    for b, (prompt, answer) in enumerate(prompt_and_answer):
        labels[b, prompt : prompt + answer] = torch.randint(0, vocab, (answer,), generator=generator)
    return logits, labels


def position_pairs(student_labels, teacher_labels):
    """The position rule, written independently: i-th answer token with i-th answer token."""
    pairs = []
    for s_row, t_row in zip(student_labels.tolist(), teacher_labels.tolist()):
        s_pos = [q - 1 for q, y in enumerate(s_row) if y != -100 and q > 0]
        t_pos = [q - 1 for q, y in enumerate(t_row) if y != -100 and q > 0]
        pairs.append(list(zip(s_pos, t_pos)))
    return pairs


def softmax(row, tau):
    scaled = [x / tau for x in row]
    top = max(scaled)
    exps = [math.exp(x - top) for x in scaled]
    total = sum(exps)
    return [e / total for e in exps]


def reference_sinkhorn_distance(teacher_vectors, student_vectors, lam, iters):
    """<P, C> with C_ij = L1(t_i, s_j) and P = ``iters`` row-then-column normalisations of exp(-C / lam)."""
    n = len(teacher_vectors)
    cost = [[sum(abs(a - c) for a, c in zip(teacher_vectors[i], student_vectors[j])) for j in range(n)] for i in range(n)]
    plan = [[math.exp(-cost[i][j] / lam) for j in range(n)] for i in range(n)]
    for _ in range(iters):
        plan = [[x / sum(row) for x in row] for row in plan]
        col = [sum(plan[i][j] for i in range(n)) for j in range(n)]
        plan = [[plan[i][j] / col[j] for j in range(n)] for i in range(n)]
    return sum(plan[i][j] * cost[i][j] for i in range(n) for j in range(n))


CASES = [
    # (student (prompt, answer) per row, teacher (prompt, answer) per row, Ts, Tt, n, m, k)
    ([(2, 5)], [(3, 4)], 9, 10, 11, 7, 4),
    ([(2, 5), (4, 3), (1, 7)], [(3, 6), (2, 2), (5, 4)], 9, 12, 9, 14, 5),
    ([(3, 2), (1, 6), (2, 4)], [(1, 5), (4, 4), (2, 3)], 8, 9, 16, 6, 6),
]
