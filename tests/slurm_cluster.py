"""A real one-node SLURM cluster on this machine, for tests: Debian's slurmctld, slurmd and munge.

``slurm_cluster`` (session scope) installs the packages when missing (apt, as root), writes a
private configuration under a fresh directory (its own ports, state, spool, logs, munge key and
socket), so leftovers of an earlier session or a system SLURM never interfere, starts munged,
slurmctld and slurmd in the foreground, and waits until ``sinfo`` shows the node idle. At teardown
it cancels the jobs still known to it, then stops the three daemons it started, by pid.

Every client command must see ``SLURM_CONF``: use :meth:`SlurmCluster.env` / :meth:`SlurmCluster.run`.
tests/conftest.py registers it (``pytest_plugins``); a test only names ``slurm_cluster``.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
DAEMONS = {"munged": "/usr/sbin/munged", "slurmctld": "/usr/sbin/slurmctld", "slurmd": "/usr/sbin/slurmd"}
CLIENTS = ("sbatch", "srun", "scontrol", "sinfo", "squeue", "scancel")
FINISHED_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                   "DEADLINE", "PREEMPTED"}

SLURM_CONF = """\
ClusterName=mlotds
SlurmctldHost={host}
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmdSpoolDir={root}/spool
StateSaveLocation={root}/state
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
NodeName={host} CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class SlurmCluster:
    root: Path
    conf: Path
    host: str
    cpus: int
    daemons: dict[str, subprocess.Popen] = field(default_factory=dict)

    def env(self, base: dict | None = None, **extra: str) -> dict[str, str]:
        """``base`` (default: this process's environment) with SLURM_CONF pointing at this cluster."""
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        env.update(extra)
        return env

    def run(self, *command: str, check: bool = True, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
        result = subprocess.run(list(command), env=self.env(env), capture_output=True, text=True, timeout=60,
                                **kwargs)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr}{result.stdout}"
                                 f"\n{self.logs()}")
        return result

    def sbatch(self, script: Path, env: dict | None = None, cwd: Path | None = None) -> str:
        return self.run("sbatch", "--parsable", str(script), env=env, cwd=cwd).stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (no accounting is configured, so no sacct)."""
        text = self.run("scontrol", "show", "job", "--oneliner", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait_for_state(self, job_id: str, states: set[str], timeout: float, poll: float = 1.0,
                       while_waiting=None) -> dict[str, str]:
        """Poll until the job's state is in ``states``; ``while_waiting(job)`` runs on every poll."""
        deadline = time.time() + timeout
        job = {}
        while time.time() < deadline:
            job = self.job(job_id)
            if job.get("JobState") in states:
                return job
            if job.get("JobState") in FINISHED_STATES:
                raise AssertionError(f"job {job_id} ended as {job.get('JobState')}, waiting for {states}: {job}")
            if while_waiting is not None:
                while_waiting(job)
            time.sleep(poll)
        raise AssertionError(f"job {job_id} not in {states} after {timeout} s: {job}\n{self.logs()}")

    def logs(self, lines: int = 30) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*.log")) + sorted(self.root.glob("*.out")):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path.name} (last {len(tail)} lines)\n" + "\n".join(tail))
        return "\n".join(parts)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _ensure_installed() -> None:
    missing = [name for name, path in DAEMONS.items() if not Path(path).is_file()]
    missing += [name for name in CLIENTS if shutil.which(name) is None]
    if not missing:
        return
    if shutil.which("apt-get") is None:
        pytest.skip(f"SLURM is not installed ({', '.join(missing)} missing) and there is no apt-get to install it")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            # Root with apt but no repository: a real failure to report, not a reason to skip.
            pytest.fail(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-3000:]}")


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            # slurmd drains a node configured with more memory than it has; leave a margin.
            return int(int(line.split()[1]) / 1024 * 0.9)
    raise AssertionError("/proc/meminfo has no MemTotal")


def _prepare_munge(root: Path) -> Path:
    import grp
    import pwd

    munge_user = pwd.getpwnam("munge")
    folder = root / "munge"
    folder.mkdir()
    key = folder / "munge.key"
    key.write_bytes(os.urandom(1024))
    for path in (folder, key):
        os.chown(path, munge_user.pw_uid, grp.getgrnam("munge").gr_gid)
    # munged checks: key readable by munge only, socket folder traversable by everyone.
    key.chmod(0o400)
    folder.chmod(0o711)
    return folder


def _start(cluster: SlurmCluster, name: str, command: list[str], **kwargs) -> None:
    log = open(cluster.root / f"{name}.out", "w")
    cluster.daemons[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                             start_new_session=True, **kwargs)
    log.close()


def _wait_until(check, timeout: float, what: str, cluster: SlurmCluster) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        for name, process in cluster.daemons.items():
            if process.poll() is not None:
                raise AssertionError(f"{name} exited with status {process.returncode} while waiting for {what}\n"
                                     f"{cluster.logs()}")
        if check():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{cluster.logs()}")


def start_cluster(root: Path) -> SlurmCluster:
    """Start munged, slurmctld and slurmd with a configuration private to ``root``."""
    host = subprocess.run(["hostname", "-s"], capture_output=True, text=True, check=True).stdout.strip()
    cpus = int(subprocess.run(["nproc"], capture_output=True, text=True, check=True).stdout.strip())
    munge_dir = _prepare_munge(root)
    for sub in ("state", "spool", "log"):
        (root / sub).mkdir()
    conf = root / "slurm.conf"
    conf.write_text(SLURM_CONF.format(host=host, ctld_port=_free_port(), slurmd_port=_free_port(),
                                      munge_socket=munge_dir / "munge.socket", root=root, cpus=cpus,
                                      memory_mb=_memory_mb()))
    cluster = SlurmCluster(root=root, conf=conf, host=host, cpus=cpus)
    try:
        _start(cluster, "munged", [DAEMONS["munged"], "--foreground", f"--socket={munge_dir / 'munge.socket'}",
                                   f"--key-file={munge_dir / 'munge.key'}", f"--pid-file={munge_dir / 'munged.pid'}",
                                   f"--log-file={munge_dir / 'munged.log'}", f"--seed-file={munge_dir / 'munged.seed'}"],
               user="munge", group="munge")
        _wait_until((munge_dir / "munge.socket").exists, 30, "the munge socket", cluster)
        _start(cluster, "slurmctld", [DAEMONS["slurmctld"], "-D", "-f", str(conf)])
        _start(cluster, "slurmd", [DAEMONS["slurmd"], "-D", "-f", str(conf)])
        _wait_until(lambda: cluster.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip() == "idle", 90,
                    "sinfo to show the node idle", cluster)
    except BaseException:
        stop_cluster(cluster)
        raise
    return cluster


def stop_cluster(cluster: SlurmCluster) -> None:
    """Cancel the cluster's remaining jobs, then stop the daemons this module started, by pid."""
    if "slurmctld" in cluster.daemons and cluster.daemons["slurmctld"].poll() is None:
        jobs = cluster.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
        if jobs:
            cluster.run("scancel", *jobs, check=False)
            deadline = time.time() + 60
            while time.time() < deadline and cluster.run("squeue", "-h", "-o", "%i", check=False).stdout.split():
                time.sleep(1)
    for name in ("slurmd", "slurmctld", "munged"):
        process = cluster.daemons.get(name)
        if process is None or process.poll() is not None:
            continue
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=20)


@pytest.fixture(scope="session")
def slurm_cluster():
    if os.geteuid() != 0:
        pytest.skip("the SLURM tests install and start slurmctld/slurmd/munge, which needs root")
    _ensure_installed()
    # Not under pytest's tmp dir: its parents are root-only (0700) and munged runs as user munge.
    root = Path(tempfile.mkdtemp(prefix="mlot-ds-slurm-"))
    root.chmod(0o755)
    cluster = start_cluster(root)
    try:
        yield cluster
    finally:
        stop_cluster(cluster)
        shutil.rmtree(root, ignore_errors=True)
