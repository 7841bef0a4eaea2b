"""Shared fixtures: the repository paths, ../shared (skipped when absent), the tiny zoo, and a
runner for real multi-process DeepSpeed jobs on the CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not (SHARED / "data").is_dir():
        pytest.skip(f"needs the project's shared data at {SHARED} (present in CI, absent in a user's clone)")
    return SHARED


@pytest.fixture(scope="session")
def tiny_zoo_cache(tmp_path_factory) -> Path:
    """The tiny zoo, built once per session into a private cache (MLOT_DS_CACHE for subprocesses)."""
    from mlot_ds.zoo import ZooSettings, build_zoo

    cache = Path(os.environ.get("MLOT_DS_TEST_ZOO_CACHE") or tmp_path_factory.mktemp("zoo-cache"))
    build_zoo(ZooSettings(profile="tiny"), cache_dir=cache, progress=False)
    return cache


@pytest.fixture(scope="session")
def tiny_zoo(tiny_zoo_cache) -> Path:
    return tiny_zoo_cache


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
