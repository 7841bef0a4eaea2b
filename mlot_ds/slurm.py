"""Render ``launch/slurm/train.sbatch`` from options, show it, and submit it with ``sbatch``.

    python -m mlot_ds.slurm submit --nodes 2 --gpus-per-node 8 --time 24:00:00 --recipe my.yaml \\
        [--partition P] [--account A] [--output-dir D] [--config ds_configs/zero3.json] [--dry-run] \\
        [-- key.path=value ...]

The template is the one source of truth: rendering rewrites only the values of its ``#SBATCH``
lines and of its settings block, so everything else a job does is in the template itself. Every
option is checked (and the recipe loaded with the overrides) before anything is written or run.
See ``docs/SLURM.md``.
"""

from __future__ import annotations

import argparse
import datetime
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from mlot_ds.config import RecipeError, load_recipe
from mlot_ds.engine.ds_config import DeepSpeedConfigError, read_ds_config

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "launch" / "slurm" / "train.sbatch"
DEFAULT_DS_CONFIG = REPO / "ds_configs" / "zero3.json"
# SLURM signals up to 60 s before the requested time; 300 s leaves room for a step and a save.
DEFAULT_SIGNAL_SECONDS = 300
DEFAULT_CPUS_PER_GPU = 4
TIME_PATTERN = re.compile(r"^(\d+):([0-5]\d):([0-5]\d)$")
SUBMIT_DIRNAME = "slurm"


class SubmitError(ValueError):
    """A bad option, file or template: nothing was written or submitted."""


@dataclass(frozen=True)
class JobSpec:
    """Everything a rendered job depends on; paths are absolute."""

    nodes: int
    gpus_per_node: int
    time: str
    recipe: Path
    output_dir: Path
    ds_config: Path
    cpus_per_task: int
    cpu_only: bool = False
    partition: str | None = None
    account: str | None = None
    job_name: str = "mlot-ds"
    signal_seconds: int = DEFAULT_SIGNAL_SECONDS
    overrides: tuple[str, ...] = ()
    python: str = sys.executable
    repo: Path = REPO

    @property
    def script_path(self) -> Path:
        return self.output_dir / SUBMIT_DIRNAME / "train.sbatch"

    @property
    def log_pattern(self) -> Path:
        return self.output_dir / SUBMIT_DIRNAME / "slurm-%j.out"


def time_limit_seconds(text: str) -> int:
    match = TIME_PATTERN.match(text)
    if match is None:
        raise SubmitError(f"--time {text!r}: expected HH:MM:SS, e.g. 24:00:00")
    hours, minutes, seconds = (int(group) for group in match.groups())
    return hours * 3600 + minutes * 60 + seconds


def render(template: str, spec: JobSpec, source: Path = TEMPLATE) -> str:
    """The template with ``spec``'s values in its ``#SBATCH`` lines and settings block."""
    sbatch = {
        "job-name": spec.job_name, "nodes": spec.nodes, "cpus-per-task": spec.cpus_per_task, "time": spec.time,
        "gpus-per-node": None if spec.cpu_only else spec.gpus_per_node,
        "partition": spec.partition, "account": spec.account,
        "output": spec.log_pattern, "signal": f"B:USR1@{spec.signal_seconds}",
    }
    settings = {
        "REPO": spec.repo, "PYTHON": spec.python, "RECIPE": spec.recipe, "DS_CONFIG": spec.ds_config,
        "OUTPUT_DIR": spec.output_dir, "RANKS_PER_NODE": spec.gpus_per_node,
    }
    text = template
    for name, value in sbatch.items():
        # None disables the line (##SBATCH), so SLURM's or the cluster's default applies.
        line = (lambda m: f"##SBATCH --{m[1]}={m[2]}") if value is None else f"#SBATCH --{name}={value}"
        text = _replace_once(text, rf"^#{{1,2}}SBATCH --({re.escape(name)})=(.*)$", line, source)
    for name, value in settings.items():
        text = _replace_once(text, rf"^{name}=.*$", f"{name}={shlex.quote(str(value))}", source)
    overrides = " ".join(shlex.quote(item) for item in spec.overrides)
    text = _replace_once(text, r"^OVERRIDES=\(\)$", f"OVERRIDES=({overrides})", source)
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    header = f"# Rendered {stamp} by `python -m mlot_ds.slurm submit` from {source}.\n"
    shebang, rest = text.split("\n", 1)
    return f"{shebang}\n{header}{rest}"


def _replace_once(text: str, pattern: str, replacement, source: Path) -> str:
    # A string replacement is used verbatim: paths may hold backslashes that re would interpret.
    replace = replacement if callable(replacement) else (lambda _match: replacement)
    result, count = re.subn(pattern, replace, text, flags=re.M)
    if count != 1:
        raise SubmitError(f"{source}: expected exactly one line matching {pattern!r}, found {count}; "
                          "the template and mlot_ds/slurm.py disagree")
    return result


def submit(script_path: Path) -> str:
    """``sbatch`` the written file from the current directory (it becomes the job's directory)."""
    try:
        result = subprocess.run(["sbatch", "--parsable", str(script_path)], capture_output=True, text=True)
    except FileNotFoundError:
        raise SubmitError("sbatch not found on PATH: run this on a SLURM login node, or use --dry-run") from None
    if result.returncode != 0:
        raise SubmitError(f"sbatch {script_path} failed (status {result.returncode}): {result.stderr.strip()}")
    return result.stdout.strip().split(";")[0]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mlot_ds.slurm", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    sub = commands.add_parser("submit", help="render launch/slurm/train.sbatch, show it, sbatch it",
                              description="Render launch/slurm/train.sbatch, write it to "
                              "<output-dir>/slurm/train.sbatch, print it, and sbatch it from the current directory.")
    sub.add_argument("--nodes", type=int, required=True, help="number of nodes")
    sub.add_argument("--gpus-per-node", type=int, required=True,
                     help="GPUs per node = ranks per node (with --cpu-only: CPU ranks per node)")
    sub.add_argument("--time", required=True, help="time limit, HH:MM:SS")
    sub.add_argument("--recipe", required=True, help="YAML recipe")
    sub.add_argument("--cpus-per-task", type=int, default=None,
                     help=f"CPUs per node for its launcher and ranks (default: {DEFAULT_CPUS_PER_GPU} per GPU, "
                     "1 per rank with --cpu-only)")
    sub.add_argument("--cpu-only", action="store_true",
                     help="the nodes have no GPUs: request none, start --gpus-per-node CPU ranks per node")
    sub.add_argument("--partition", default=None)
    sub.add_argument("--account", default=None)
    sub.add_argument("--job-name", default=None, help="default: mlot-ds-<recipe name>")
    sub.add_argument("--output-dir", default=None, help="run folder (default: the recipe's train.output_dir); "
                     "must be on a filesystem every node sees")
    sub.add_argument("--config", default=str(DEFAULT_DS_CONFIG), help="DeepSpeed JSON template")
    sub.add_argument("--signal-seconds", type=int, default=DEFAULT_SIGNAL_SECONDS,
                     help="send USR1 (checkpoint, exit 75, requeue) this many seconds before the time limit")
    sub.add_argument("--dry-run", action="store_true", help="render, write and print, but do not sbatch")
    sub.add_argument("overrides", nargs="*", metavar="key.path=value", help="recipe overrides (after --)")
    return parser.parse_args(argv)


def build_spec(args: argparse.Namespace) -> JobSpec:
    """Check every option, in the order a reader would, and load the recipe with the overrides."""

    for option, value in (("--nodes", args.nodes), ("--gpus-per-node", args.gpus_per_node),
                          ("--cpus-per-task", args.cpus_per_task), ("--signal-seconds", args.signal_seconds)):
        if value is not None and value < 1:
            raise SubmitError(f"{option} {value}: expected an integer >= 1")
    limit = time_limit_seconds(args.time)
    if args.signal_seconds >= limit:
        raise SubmitError(f"--signal-seconds {args.signal_seconds}: the preemption signal must come before the "
                          f"time limit --time {args.time} ({limit} s)")
    for option, value in (("--partition", args.partition), ("--account", args.account),
                          ("--job-name", args.job_name)):
        if value is not None and not re.fullmatch(r"[\w.,+-]+", value):
            raise SubmitError(f"{option} {value!r}: expected letters, digits and . , + - _ only")
    recipe = Path(args.recipe).resolve()
    if not recipe.is_file():
        raise SubmitError(f"--recipe {args.recipe}: file not found")
    ds_config = Path(args.config).resolve()
    read_ds_config(ds_config)
    loaded = load_recipe(recipe, args.overrides)
    output_dir = Path(args.output_dir or loaded.train.output_dir).resolve()
    if re.search(r"[\s%]", str(output_dir)):
        raise SubmitError(f"--output-dir {output_dir}: SLURM's #SBATCH --output cannot hold spaces or '%'")
    if not (REPO / "launch" / "train.py").is_file() or not TEMPLATE.is_file():
        raise SubmitError(f"{REPO}: no launch/train.py or launch/slurm/train.sbatch; the job needs a clone "
                          "of mlot-ds installed with pip install -e")
    cpus = args.cpus_per_task or args.gpus_per_node * (1 if args.cpu_only else DEFAULT_CPUS_PER_GPU)
    return JobSpec(nodes=args.nodes, gpus_per_node=args.gpus_per_node, time=args.time, recipe=recipe,
                   output_dir=output_dir, ds_config=ds_config, cpus_per_task=cpus, cpu_only=args.cpu_only,
                   partition=args.partition, account=args.account,
                   job_name=args.job_name or f"mlot-ds-{loaded.name}", signal_seconds=args.signal_seconds,
                   overrides=tuple(args.overrides))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    try:
        spec = build_spec(args)
        text = render(TEMPLATE.read_text(encoding="utf-8"), spec)
    except (SubmitError, RecipeError, DeepSpeedConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    spec.script_path.parent.mkdir(parents=True, exist_ok=True)
    spec.script_path.write_text(text, encoding="utf-8")
    print(text)
    print(f"written: {spec.script_path}")
    if args.dry_run:
        print(f"dry run: not submitted (submit with: sbatch {spec.script_path})")
        return 0
    try:
        job_id = submit(spec.script_path)
    except SubmitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    log = str(spec.log_pattern).replace("%j", job_id)
    print(f"submitted job {job_id}\n"
          f"  follow     : tail -f {log}   |   squeue -j {job_id}   |   scontrol show job {job_id}\n"
          f"  TensorBoard: tensorboard --logdir {spec.output_dir / 'tensorboard'}\n"
          f"  preempt    : scancel --signal=USR1 --batch {job_id}   (checkpoint, requeue, resume)\n"
          f"  cancel     : scancel {job_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
