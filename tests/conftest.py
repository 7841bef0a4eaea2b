"""Shared fixtures: ../shared (skipped when absent), the tiny zoo, and the private SLURM cluster.
Helpers that are not fixtures (paths, job runners, float64 references) are in tests/helpers.py."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from tests.helpers import SHARED

# No test writes to the user's home folder: HOME and every library cache point into one folder of
# this session. The one exception is DeepSpeed's compiled CPU op (built once per machine, ~1 min).
_REAL_HOME = Path.home()
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(_REAL_HOME / ".cache" / "torch_extensions"))
SESSION_HOME = Path(tempfile.mkdtemp(prefix="mlot-tests-home-"))
os.environ["HOME"] = str(SESSION_HOME)
os.environ["XDG_CACHE_HOME"] = str(SESSION_HOME / ".cache")
os.environ["HF_HOME"] = str(SESSION_HOME / ".cache" / "huggingface")
os.environ["MLOT_DS_CACHE"] = os.environ.get("MLOT_DS_TEST_CACHE") or str(SESSION_HOME / ".cache" / "mlot_ds")

pytest_plugins = ["tests.slurm_cluster"]  # the session fixture that starts a private SLURM cluster


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
