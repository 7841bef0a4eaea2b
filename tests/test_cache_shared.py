"""tools/cache_teachers.py serves several losses of one teacher model with one forward per micro-batch:
both caches are complete, and training from them equals training from the live teachers."""

from __future__ import annotations

import sys

import pytest
import yaml

from mlot_ds.config import DEFAULT_RECIPE
from tests.helpers import REPO, ZERO3, free_port, job_env, metrics, run_job, tiny_recipe_overrides

pytestmark = [pytest.mark.slow]


def test_two_losses_of_one_teacher_share_its_forwards(tmp_path, tiny_zoo):
    raw = yaml.safe_load(DEFAULT_RECIPE.read_text())
    llama = raw["teachers"][0]
    raw["teachers"] = [llama, dict(llama, name="llama_uld", pairing="position", loss={"kind": "uld", "cache_head": 100000})]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    env = job_env(tiny_zoo, MASTER_PORT=str(free_port()))

    def overrides(out, **extra):
        return tiny_recipe_overrides(tmp_path / out, **{"train.max_steps": 3, "data.eval": "null", "export.enabled": "false",
                                                        "data.cache_dir": str(tmp_path / "cache"), **extra})

    build = run_job([sys.executable, str(REPO / "tools" / "cache_teachers.py"), "--recipe", str(recipe), "--chunk-records",
                     "8", *overrides("build")], env, tmp_path / "build.log")
    assert build.returncode == 0, build.log_text[-3000:]
    assert "caching llama, llama_uld" in build.log_text  # one progress bar: one forward for both
    for name in ("llama", "llama_uld"):
        assert f"{name}: built 3 chunk(s), 0 left" in build.log_text
    train = [sys.executable, str(REPO / "launch" / "train.py"), "--config", ZERO3, "--recipe", str(recipe)]
    live = run_job([*train, *overrides("live")], env, tmp_path / "live.log")
    cached = run_job([*train, *overrides("cached", **{"teachers.llama.source": "cache", "teachers.llama_uld.source": "cache"})],
                     env, tmp_path / "cached.log")
    assert live.returncode == 0 and cached.returncode == 0, (live.log_text[-2000:], cached.log_text[-2000:])
    live_rows, cached_rows = metrics(tmp_path / "live"), metrics(tmp_path / "cached")
    for step in (1, 2, 3):
        assert cached_rows[step]["teacher/llama_uld/uld"] == pytest.approx(live_rows[step]["teacher/llama_uld/uld"], rel=1e-2)
        assert cached_rows[step]["teacher/llama/had"] == pytest.approx(live_rows[step]["teacher/llama/had"], rel=1e-2)
        assert cached_rows[step]["train/ce"] == pytest.approx(live_rows[step]["train/ce"], rel=1e-3)
