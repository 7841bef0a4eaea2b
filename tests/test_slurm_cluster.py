"""Real multi-process jobs along every SLURM path, with the tiny zoo on the CPU.

* On a real one-node SLURM (tests/slurm_cluster.py): the rendered launch/slurm/train.sbatch with 2
  CPU ranks runs to COMPLETED; a second job is preempted with USR1, checkpoints, is requeued,
  resumes and completes with one continuous step count.
* Without SLURM: two DeepSpeed node launchers (--no_ssh, node rank 0 and 1, one rank each) form one
  2-rank ZeRO-3 job, and so do two bare ``python launch/train.py`` processes that only have srun's
  variables (SLURM_PROCID, ...). When one of those dies or freezes, the other ends within
  train.dist_timeout_s instead of hanging.

All 2-rank runs use the same recipe and world size, so their losses must agree.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO, job_env, tiny_recipe_overrides


pytestmark = [pytest.mark.slow]

DEMO = REPO / "mlot_ds" / "recipes" / "demo.yaml"
ZERO3 = str(REPO / "ds_configs" / "zero3.json")
TRAIN = str(REPO / "launch" / "train.py")
TEACHERS = ("llama", "qwen", "opt")
# Fast runs: no generation eval, no export (the first SLURM job keeps both, as a user's job would).
QUICK = {"data.eval": "null", "export.enabled": "false"}
COMPARED = ("train/loss", "train/ce", "teacher/llama/had", "teacher/qwen/sd", "teacher/opt/sl")
JOB_TIMEOUT_S = 420


def free_port(low: int = 20000, high: int = 60000) -> int:
    for _ in range(200):
        port = random.randint(low, high - 1)
        with socket.socket() as sock:
            try:
                sock.bind(("", port))
            except OSError:
                continue
            return port
    raise AssertionError(f"no free port in [{low}, {high})")


def metric_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "tensorboard" / "metrics.jsonl").read_text().splitlines()]


def train_rows(out: Path) -> dict[int, dict]:
    return {row["step"]: row for row in metric_rows(out) if "train/loss" in row}


def assert_same_losses(run: Path, reference: Path) -> None:
    got, expected = train_rows(run), train_rows(reference)
    assert sorted(got) == sorted(expected) == [1, 2, 3, 4, 5, 6]
    for step in expected:
        for key in COMPARED:
            assert got[step][key] == pytest.approx(expected[step][key], rel=1e-5, abs=1e-7), (step, key)


def assert_two_rank_checkpoint(out: Path, step: int) -> None:
    folder = out / "checkpoints" / f"step_{step:08d}"
    assert (folder / "COMPLETE").is_file()
    assert (out / "checkpoints" / "latest").read_text().strip() == folder.name
    assert json.loads((folder / "trainer_state.json").read_text())["global_step"] == step
    # One RNG state per rank: the job had exactly ranks 0 and 1.
    assert {p.name for p in folder.glob("rng_rank*.pt")} == {"rng_rank0.pt", "rng_rank1.pt"}


def wait_for_step(out: Path, step: int, alive, timeout: float) -> None:
    path = out / "tensorboard" / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        alive()
        if path.is_file() and any(json.loads(line).get("step", 0) >= step for line in path.read_text().splitlines()):
            return
        time.sleep(0.2)
    raise AssertionError(f"step {step} not reached in {timeout} s")


# ------------------------------------------------------------------------------------ real SLURM
def submit(cluster, zoo: Path, out: Path, overrides: dict) -> str:
    """``python -m mlot_ds.slurm submit`` for 2 CPU ranks on the one node; returns the job id."""
    command = [sys.executable, "-m", "mlot_ds.slurm", "submit", "--nodes", "1", "--gpus-per-node", "2", "--cpu-only",
               "--cpus-per-task", str(cluster.cpus), "--time", "00:20:00", "--signal-seconds", "120",
               "--recipe", str(DEMO), "--output-dir", str(out), "--", *tiny_recipe_overrides(out, **overrides)]
    result = subprocess.run(command, env=cluster.env(job_env(zoo)), cwd=out.parent, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    return re.search(r"submitted job (\d+)", result.stdout)[1]


def job_log(out: Path, job_id: str) -> str:
    path = out / "slurm" / f"slurm-{job_id}.out"
    return path.read_text(errors="replace") if path.is_file() else f"(no {path})"


def wait_completed(cluster, job_id: str, out: Path, **kwargs) -> dict:
    try:
        return cluster.wait_for_state(job_id, {"COMPLETED"}, timeout=JOB_TIMEOUT_S, **kwargs)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- job log, progress bars left out\n{log_without_progress(out, job_id)[-6000:]}") from None


def log_without_progress(out: Path, job_id: str) -> str:
    """The job log without tqdm's lines, so that a failure shows what the ranks printed at the end."""
    lines = job_log(out, job_id).replace("\r", "\n").splitlines()
    return "\n".join(line for line in lines if not re.match(r"\s*(train|eval|generate)\S*:\s+\d+%", line))


@pytest.fixture(scope="module")
def sbatch_run(slurm_cluster, tiny_zoo, tmp_path_factory):
    out = tmp_path_factory.mktemp("slurm") / "complete"
    out.parent.mkdir(exist_ok=True)
    job_id = submit(slurm_cluster, tiny_zoo, out, {"train.save_every": 3})
    job = wait_completed(slurm_cluster, job_id, out)
    return {"out": out, "job": job, "log": job_log(out, job_id)}


@pytest.mark.slurm
def test_the_rendered_sbatch_runs_two_cpu_ranks_to_completed(sbatch_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, log = sbatch_run["out"], sbatch_run["log"]
    assert sbatch_run["job"]["ExitCode"] == "0:0" and sbatch_run["job"]["Restarts"] == "0"
    assert "1 node(s) x 2 rank(s)" in log and "done in" in log and "training ended with status 0" in log
    assert_two_rank_checkpoint(out, 6)
    assert (out / "export" / "model.safetensors").is_file()
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {"train/loss", "train/ce", "train/lr", "train/grad_norm"}
    expected |= {f"teacher/{t}/{term}" for t in TEACHERS for term in ("had", "sl", "sd", "kd", "weight")}
    assert expected <= tags, expected - tags
    assert any(tag.startswith("eval/") for tag in tags)
    assert [event.step for event in events.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slurm
def test_usr1_checkpoints_requeues_resumes_and_completes_with_one_step_count(slurm_cluster, tiny_zoo, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cluster, out, total = slurm_cluster, tmp_path / "preempted", 40
    job_id = submit(cluster, tiny_zoo, out, {"train.max_steps": total, "data.train.limit": 200, **QUICK})

    def still_running():
        state = cluster.job(job_id)["JobState"]
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"{state}\n{job_log(out, job_id)[-4000:]}"

    wait_for_step(out, 2, still_running, timeout=JOB_TIMEOUT_S)
    # The same route as --signal=B:USR1@T at the time limit: USR1 to the batch shell only.
    cluster.run("scancel", "--signal=USR1", "--batch", job_id)
    requeued = cluster.wait_for_state(job_id, {"PENDING"}, timeout=180)
    assert requeued["Restarts"] == "1"
    # A requeued job waits about 2 min (BeginTime). Start it now, but only once the old run's
    # steps are gone: slurmd refuses a relaunch in the same second ("Job credential revoked").
    deadline = time.time() + 120
    while cluster.run("squeue", "--steps", "-h", "-j", job_id).stdout.strip() and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(2)
    cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
    job = wait_completed(cluster, job_id, out)

    log = job_log(out, job_id)
    stopped = int(re.search(r"stopped by signal at step (\d+)", log)[1])
    assert 2 <= stopped < total, log[-4000:]
    assert "USR1 forwarded to" in log and f"requeueing job {job_id}" in log
    assert f"job {job_id}, run 2:" in log and f"at step {stopped}" in re.search(r"resumed from .*", log)[0]
    assert job["Restarts"] == "1" and job["ExitCode"] == "0:0"
    assert_two_rank_checkpoint(out, total)
    # The step count never restarts: every step was logged once, in order, across both runs.
    rows = [row for row in metric_rows(out) if "train/loss" in row]
    assert [row["step"] for row in rows] == list(range(1, total + 1))
    resumed_at = rows[stopped]["time"]
    assert all(row["time"] < resumed_at for row in rows[:stopped])
    # TensorBoard: one curve 1..N, its first part written by the first run (two event files).
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    curve = events.Scalars("train/loss")
    assert [event.step for event in curve] == list(range(1, total + 1))
    assert max(e.wall_time for e in curve[:stopped]) < min(e.wall_time for e in curve[stopped:])
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) >= 2


# --------------------------------------------------------------------------------- without SLURM
@pytest.fixture(scope="module")
def node_launchers_run(tiny_zoo, tmp_path_factory):
    """Two DeepSpeed node launchers on this machine, as the template starts them on two nodes."""
    tmp = tmp_path_factory.mktemp("nodes")
    out = tmp / "two_nodes"
    # --no_ssh numbers ranks from a hostfile listing every node; the names are never contacted.
    hostfile = tmp / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    port = free_port()
    processes = []
    for node_rank in (0, 1):
        command = [sys.executable, "-m", "deepspeed.launcher.runner", "--no_ssh", f"--hostfile={hostfile}",
                   f"--node_rank={node_rank}", "--num_nodes=2", "--num_gpus=1", "--master_addr=127.0.0.1",
                   f"--master_port={port}", TRAIN, "--config", ZERO3, *tiny_recipe_overrides(out, **QUICK)]
        log = open(tmp / f"node{node_rank}.log", "w")
        processes.append(subprocess.Popen(command, env=job_env(tiny_zoo), cwd=REPO, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True))
        log.close()
    statuses = _wait_all(processes, JOB_TIMEOUT_S)
    logs = [(tmp / f"node{r}.log").read_text(errors="replace") for r in (0, 1)]
    assert statuses == [0, 0], "\n".join(text[-3000:] for text in logs)
    return {"out": out, "logs": logs}


def assert_running(processes: list[subprocess.Popen], log: Path) -> None:
    for process in processes:
        assert process.poll() is None, f"ended early with status {process.returncode}:\n{log.read_text()[-3000:]}"


def _wait_all(processes: list[subprocess.Popen], timeout: float) -> list[int]:
    deadline = time.time() + timeout
    try:
        return [process.wait(timeout=max(deadline - time.time(), 1)) for process in processes]
    finally:
        _kill_all(processes)


def _kill_all(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


def srun_style_env(zoo: Path, procid: int, ntasks: int, job_id: int, **extra: str) -> dict:
    env = job_env(zoo, SLURM_PROCID=str(procid), SLURM_NTASKS=str(ntasks), SLURM_LOCALID=str(procid),
                  SLURM_JOB_NODELIST="localhost,node[1-3]", SLURM_JOB_ID=str(job_id), **extra)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def srun_style_job_id() -> int:
    """A job id whose derived port (29500 + id % 1000, mlot_ds.dist) is free right now."""
    port = free_port(29500, 30500)
    return 7000 + port - 29500


def start_srun_style(zoo: Path, out: Path, tmp: Path, name: str, **overrides) -> list[subprocess.Popen]:
    job_id = srun_style_job_id()
    processes = []
    for procid in (0, 1):
        log = open(tmp / f"{name}{procid}.log", "w")
        processes.append(subprocess.Popen(
            [sys.executable, TRAIN, "--config", ZERO3, *tiny_recipe_overrides(out, **overrides)],
            env=srun_style_env(zoo, procid, 2, job_id), cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True))
        log.close()
    return processes


@pytest.fixture(scope="module")
def srun_style_run(tiny_zoo, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("srun")
    out = tmp / "srun_style"
    statuses = _wait_all(start_srun_style(tiny_zoo, out, tmp, "task", **QUICK), JOB_TIMEOUT_S)
    logs = [(tmp / f"task{r}.log").read_text(errors="replace") for r in (0, 1)]
    assert statuses == [0, 0], "\n".join(text[-3000:] for text in logs)
    return {"out": out, "logs": logs}


def test_two_node_launchers_form_one_two_rank_zero3_job(node_launchers_run):
    out, logs = node_launchers_run["out"], node_launchers_run["logs"]
    for node_rank, log in enumerate(logs):
        assert f"nnodes=2, num_local_procs=1, node_rank={node_rank}" in log
        assert "dist_world_size=2" in log
    assert "done in" in logs[0]
    assert_two_rank_checkpoint(out, 6)


def test_srun_variables_alone_form_one_two_rank_job(srun_style_run):
    assert "done in" in srun_style_run["logs"][0]
    assert_two_rank_checkpoint(srun_style_run["out"], 6)


def test_every_launch_path_gives_the_same_losses(node_launchers_run, srun_style_run):
    assert_same_losses(node_launchers_run["out"], srun_style_run["out"])


@pytest.mark.slurm
def test_the_sbatch_job_gives_the_same_losses_as_the_other_paths(sbatch_run, node_launchers_run):
    assert_same_losses(sbatch_run["out"], node_launchers_run["out"])


def test_when_one_srun_task_dies_or_freezes_the_other_ends_within_the_dist_timeout(tiny_zoo, tmp_path):
    # Two jobs at once. A killed rank closes its sockets (gloo notices at once); a frozen one keeps
    # them open, so only train.dist_timeout_s can end its partner.
    timeout_s = 30
    ways = {"killed": signal.SIGKILL, "frozen": signal.SIGSTOP}
    jobs = {way: start_srun_style(tiny_zoo, tmp_path / way, tmp_path, way, **{
        "train.max_steps": 200, "data.train.limit": 100, "train.dist_timeout_s": timeout_s, **QUICK}) for way in ways}
    ended = {}
    try:
        for way, processes in jobs.items():
            wait_for_step(tmp_path / way, 2, lambda: assert_running(processes, tmp_path / f"{way}0.log"),
                          timeout=JOB_TIMEOUT_S)
        struck = time.time()
        for way, processes in jobs.items():
            os.killpg(processes[1].pid, ways[way])
        # Not a speed check: a generous bound past the configured timeout tells "ended" from "hangs".
        for way, processes in jobs.items():
            try:
                ended[way] = (processes[0].wait(timeout=max(struck + timeout_s + 60 - time.time(), 1)),
                              time.time() - struck)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"rank 0 still running {time.time() - struck:.0f} s after rank 1 was {way} "
                                     f"(train.dist_timeout_s={timeout_s})") from None
    finally:
        for processes in jobs.values():
            if processes[1].poll() is None:
                os.killpg(processes[1].pid, signal.SIGCONT)
            _kill_all(processes)
    for way, (status, seconds) in ended.items():
        print(f"rank 0 ended {seconds:.1f} s after rank 1 was {way}, status {status}")
        assert status != 0, (tmp_path / f"{way}0.log").read_text()[-3000:]
