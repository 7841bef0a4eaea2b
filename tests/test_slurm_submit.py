"""``python -m mlot_ds.slurm submit`` and the logic of launch/slurm/train.sbatch, without a cluster.

The template's shell logic (hostfile, one node launcher per node with its own node rank, the USR1
forward, status 75 -> ``scontrol requeue``) runs here for real under bash, with ``srun``,
``scontrol`` and the Python interpreter replaced by small stubs that record what they were given.
tests/test_slurm_cluster.py runs the same file on a real SLURM.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mlot_ds import slurm
from tests.helpers import REPO

DEMO = REPO / "mlot_ds" / "recipes" / "demo.yaml"
ZERO3 = REPO / "ds_configs" / "zero3.json"


@pytest.fixture
def submit_cli(capsys, monkeypatch):
    """``python -m mlot_ds.slurm submit ARGS`` in this process (imports once: the suite stays fast)."""
    def run(*args: str, cwd: Path | None = None, path: str | None = None) -> subprocess.CompletedProcess:
        monkeypatch.chdir(cwd or REPO)
        if path is not None:
            monkeypatch.setenv("PATH", path)
        capsys.readouterr()
        status = slurm.main(["submit", *args])
        captured = capsys.readouterr()
        return subprocess.CompletedProcess(args, status, captured.out, captured.err)
    return run


def required(out: Path, **changes: str) -> list[str]:
    options = {"--nodes": "2", "--gpus-per-node": "4", "--time": "24:00:00", "--recipe": str(DEMO),
               "--output-dir": str(out)}
    options.update(changes)
    return [item for pair in options.items() for item in pair]


def sbatch_values(text: str) -> dict[str, str]:
    values = {}
    for line in text.splitlines():
        if line.startswith("#SBATCH --"):
            name, _, value = line[len("#SBATCH --"):].partition("=")
            values[name] = value
    return values


def test_dry_run_renders_writes_and_prints_the_job(tmp_path):
    # The real entry point, once, as a user types it.
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "mlot_ds.slurm", "submit",
                             *required(out, **{"--partition": "gpu", "--account": "proj1", "--cpus-per-task": "40"}),
                             "--dry-run", "--", "train.max_steps=7", "data.train.path=/data/with space/x.jsonl"],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    script = out / "slurm" / "train.sbatch"
    text = script.read_text()
    assert text in result.stdout and "not submitted" in result.stdout
    assert sbatch_values(text) == {
        "job-name": "mlot-ds-demo", "nodes": "2", "ntasks-per-node": "1", "gpus-per-node": "4", "cpus-per-task": "40",
        "time": "24:00:00", "partition": "gpu", "account": "proj1", "output": f"{out}/slurm/slurm-%j.out",
        "open-mode": "append", "requeue": "", "signal": f"B:USR1@{slurm.DEFAULT_SIGNAL_SECONDS}",
    }
    # The settings block, read back by bash itself.
    probe = subprocess.run(["bash", "-c", text.split("# ---- End of settings.")[0] +
                            '\nprintf "%s\\n" "$REPO" "$PYTHON" "$RECIPE" "$DS_CONFIG" "$OUTPUT_DIR" "$RANKS_PER_NODE"'
                            ' "${OVERRIDES[@]}"'], capture_output=True, text=True, env={"PATH": os.environ["PATH"]})
    assert probe.stdout.splitlines() == [str(REPO), sys.executable, str(DEMO), str(ZERO3), str(out), "4",
                                         "train.max_steps=7", "data.train.path=/data/with space/x.jsonl"]
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


def test_the_rendered_file_differs_from_the_template_only_in_values(submit_cli, tmp_path):
    out = tmp_path / "run"
    assert submit_cli(*required(out), "--dry-run").returncode == 0
    template = slurm.TEMPLATE.read_text().splitlines()
    rendered = (out / "slurm" / "train.sbatch").read_text().splitlines()
    assert rendered[1].startswith("# Rendered ")
    rendered = rendered[:1] + rendered[2:]
    assert len(rendered) == len(template)
    changed = {a.split("=")[0] for a, b in zip(template, rendered) if a != b}
    assert changed <= {"#SBATCH --job-name", "#SBATCH --nodes", "#SBATCH --gpus-per-node", "#SBATCH --cpus-per-task",
                       "#SBATCH --time", "#SBATCH --output", "#SBATCH --signal", "##SBATCH --partition",
                       "##SBATCH --account", "REPO", "PYTHON", "RECIPE", "DS_CONFIG", "OUTPUT_DIR", "RANKS_PER_NODE",
                       "OVERRIDES"}, changed


def test_cpu_only_requests_no_gpus_and_one_cpu_per_rank(submit_cli, tmp_path):
    out = tmp_path / "run"
    result = submit_cli(*required(out, **{"--gpus-per-node": "2", "--nodes": "1"}), "--cpu-only", "--dry-run")
    assert result.returncode == 0, result.stderr
    text = (out / "slurm" / "train.sbatch").read_text()
    values = sbatch_values(text)
    assert "gpus-per-node" not in values and "##SBATCH --gpus-per-node=" in text
    assert values["cpus-per-task"] == "2"
    assert "\nRANKS_PER_NODE=2\n" in text


def test_the_output_dir_defaults_to_the_recipes(submit_cli, tmp_path):
    result = submit_cli(*[a for a in required(tmp_path) if a not in ("--output-dir", str(tmp_path))], "--dry-run",
                        "--", "train.output_dir=runs/from-recipe", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "runs" / "from-recipe" / "slurm" / "train.sbatch").is_file()


@pytest.mark.parametrize("changes,extra,message", [
    ({"--time": "24:00"}, [], "--time '24:00': expected HH:MM:SS"),
    ({"--time": "1:61:00"}, [], "expected HH:MM:SS"),
    ({"--time": "aa:bb:cc"}, [], "expected HH:MM:SS"),
    ({"--nodes": "0"}, [], "--nodes 0: expected an integer >= 1"),
    ({"--gpus-per-node": "-1"}, [], "--gpus-per-node -1: expected an integer >= 1"),
    ({"--recipe": "no/such/recipe.yaml"}, [], "--recipe no/such/recipe.yaml: file not found"),
    ({"--time": "00:04:00"}, [], "--signal-seconds 300: the preemption signal must come before the time limit"),
    ({"--partition": "gpu;rm -rf"}, [], "--partition 'gpu;rm -rf': expected letters"),
    ({}, ["--config", "no/such.json"], "DeepSpeed config not found"),
    ({}, ["--", "train.max_stepz=3"], "max_stepz"),
])
def test_bad_options_fail_before_anything_is_written(submit_cli, tmp_path, changes, extra, message):
    out = tmp_path / "run"
    result = submit_cli(*required(out, **changes), *extra)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.count("error:") == 1 and message in result.stderr, result.stderr
    assert not out.exists()


def test_without_sbatch_on_path_the_error_says_so(submit_cli, tmp_path):
    out = tmp_path / "run"
    result = submit_cli(*required(out), path=str(tmp_path / "empty"))
    assert result.returncode == 1
    assert "sbatch not found on PATH" in result.stderr


# ----------------------------------------------------------------------------- the template's shell logic
STUB_SRUN = r"""#!/bin/bash
# Records its options, then runs the command after them once per node with that node's SLURM_NODEID.
printf '%s\n' "$*" > "$STUB_LOG/srun.args"
while [[ "$1" == --* ]]; do shift; done
status=0; pids=()
for (( node = 0; node < SLURM_NNODES; node++ )); do SLURM_NODEID=$node "$@" & pids+=($!); done
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""
STUB_SCONTROL = r"""#!/bin/bash
case "$1 $2" in
  "show hostnames") printf '%s\n' $STUB_HOSTS ;;
  *) echo "$*" >> "$STUB_LOG/scontrol.calls" ;;
esac
"""
# Stands in for the interpreter: records how the node launcher was called, then becomes one "rank".
STUB_PYTHON = r"""#!/bin/bash
{ echo "node=$SLURM_NODEID omp=$OMP_NUM_THREADS"; printf '%s\n' "$@"; } > "$STUB_LOG/node$SLURM_NODEID.args"
exec "$REAL_PYTHON" "$STUB_RANK" --local_rank=0
"""
STUB_RANK = r"""
import os, signal, sys, time
log = os.environ["STUB_LOG"]
open(os.path.join(log, "rank.started"), "w").close()
time.sleep(float(os.environ.get("STUB_HANDLER_DELAY", "0")))
signal.signal(signal.SIGUSR1, lambda *_: sys.exit(75))
open(os.path.join(log, "rank.ready"), "w").close()
time.sleep(float(os.environ.get("STUB_RUN_SECONDS", "0")))
sys.exit(int(os.environ.get("STUB_EXIT", "0")))
"""


def stub_job(tmp_path: Path, nodes: int, ranks_per_node: int, **env: str):
    """Render the real template with stub srun/scontrol/python; returns (script, env, log dir)."""
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    log.mkdir()
    for name, text in {"srun": STUB_SRUN, "scontrol": STUB_SCONTROL, "python": STUB_PYTHON}.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (tmp_path / "rank.py").write_text(STUB_RANK)
    out = tmp_path / "run"
    spec = slurm.JobSpec(nodes=nodes, gpus_per_node=ranks_per_node, time="01:00:00", recipe=DEMO, output_dir=out,
                         ds_config=ZERO3, cpus_per_task=8, overrides=("train.max_steps=9",),
                         python=str(bin_dir / "python"))
    script = tmp_path / "train.sbatch"
    script.write_text(slurm.render(slurm.TEMPLATE.read_text(), spec))
    hosts = " ".join(f"n{i + 1}" for i in range(nodes))
    job_env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HOME": str(tmp_path), "STUB_LOG": str(log),
               "STUB_HOSTS": hosts, "STUB_RANK": str(tmp_path / "rank.py"), "REAL_PYTHON": sys.executable,
               "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": f"n[1-{nodes}]", "SLURM_NNODES": str(nodes),
               "SLURM_CPUS_PER_TASK": "8", "SLURM_SUBMIT_DIR": str(tmp_path), **env}
    return script, job_env, log, out


def wait_for_file(path: Path, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert process.poll() is None, f"the job script ended early with status {process.returncode}"
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def test_one_node_launcher_per_node_with_its_node_rank_and_a_shared_hostfile(tmp_path):
    script, env, log, out = stub_job(tmp_path, nodes=2, ranks_per_node=4)
    result = subprocess.run(["bash", str(script), "eval.limit=2"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (out / "slurm" / "hostfile-4242").read_text() == "n1 slots=4\nn2 slots=4\n"
    srun_args = (log / "srun.args").read_text().split()
    assert {"--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=8", "--kill-on-bad-exit=1"} <= set(srun_args)
    for node in (0, 1):
        lines = (log / f"node{node}.args").read_text().splitlines()
        assert lines[0] == f"node={node} omp=2"  # 8 CPUs shared by 4 ranks
        assert lines[1:] == ["-m", "deepspeed.launcher.runner", f"--node_rank={node}", "--no_ssh",
                             f"--hostfile={out}/slurm/hostfile-4242", "--num_nodes=2", "--num_gpus=4",
                             "--master_addr=n1", f"--master_port={29500 + 4242 % 1000}", str(REPO / "launch" / "train.py"),
                             "--config", str(ZERO3), "--recipe", str(DEMO), f"train.output_dir={out}",
                             "train.max_steps=9", "eval.limit=2"]
    assert not (log / "scontrol.calls").exists()


@pytest.mark.parametrize("handler_delay", ["0", "3"])
def test_usr1_reaches_the_rank_which_exits_75_and_the_job_is_requeued(tmp_path, handler_delay):
    # With a delay, USR1 arrives while the rank is "still loading" (no handler yet): the forward
    # must wait for the handler instead of killing the rank with the default action.
    script, env, log, _ = stub_job(tmp_path, nodes=1, ranks_per_node=1, STUB_RUN_SECONDS="60",
                                   STUB_HANDLER_DELAY=handler_delay)
    with open(tmp_path / "job.out", "w") as output:
        job = subprocess.Popen(["bash", str(script)], env=env, stdout=output, stderr=subprocess.STDOUT)
        try:
            wait_for_file(log / ("rank.started" if handler_delay != "0" else "rank.ready"), job)
            job.send_signal(signal.SIGUSR1)
            status = job.wait(timeout=60)
        finally:
            if job.poll() is None:
                job.kill()
    text = (tmp_path / "job.out").read_text()
    assert status == 0, text
    assert "USR1 forwarded to 1 rank(s)" in text
    assert (log / "scontrol.calls").read_text().split("\n")[0] == "requeue 4242", text


@pytest.mark.parametrize("exit_status", [0, 3])
def test_other_exit_statuses_are_passed_on_without_requeue(tmp_path, exit_status):
    script, env, log, _ = stub_job(tmp_path, nodes=1, ranks_per_node=1, STUB_EXIT=str(exit_status))
    result = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == exit_status, result.stdout + result.stderr
    assert f"training ended with status {exit_status}" in result.stdout
    assert not (log / "scontrol.calls").exists()


def test_by_hand_the_template_needs_an_output_dir(tmp_path):
    env = {"PATH": os.environ["PATH"], "SLURM_JOB_ID": "1", "SLURM_SUBMIT_DIR": str(REPO), "RANKS_PER_NODE": "1"}
    result = subprocess.run(["bash", str(slurm.TEMPLATE)], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "set OUTPUT_DIR to the run folder" in result.stderr
