"""tools/gpu_check.sh --cpu on this machine (CI): every section runs, the summary table is printed
at the end, the GPU-only quality slice says why it was skipped, and nothing fails."""

from __future__ import annotations

import subprocess

import pytest

from tests.helpers import REPO, job_env


@pytest.mark.slow
@pytest.mark.multirank
def test_the_gpu_check_runs_on_this_cpu_and_passes(tiny_zoo_cache, tmp_path):
    command = ["bash", str(REPO / "tools" / "gpu_check.sh"), "--cpu", "--work", str(tmp_path / "work"),
               "--zoo-cache", str(tiny_zoo_cache)]
    done = subprocess.run(command, cwd=REPO, env=job_env(tiny_zoo_cache), capture_output=True, text=True, timeout=2400)
    summary = done.stdout.split("== summary")[-1]
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    rows = {line.split("  ")[0].strip(): line for line in summary.splitlines()[3:] if line.strip()}
    assert set(rows) == {"environment", "zoo", "bf16 vs fp32", "bench_loss", "bench_step", "planner", "quality"}
    assert all(" PASS " in line for name, line in rows.items() if name != "quality")
    assert " SKIP " in rows["quality"] and "needs a GPU" in rows["quality"]
