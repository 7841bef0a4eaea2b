"""``python -m mlot_ds.plan``: will a recipe fit on a cluster, and how fast will it go.

    python -m mlot_ds.plan --recipe R.yaml --nodes 2 --gpus-per-node 8 --gpu-memory 80GB [--cpu-memory 1TB]
    python -m mlot_ds.plan --recipe R.yaml --json ... > plan.json
    python -m mlot_ds.plan --recipe R.yaml ... teachers.llama.placement=offload    # try a change

Exit status: 0 a plan was made (whether or not it fits; ``--json`` says ``"fits"``), 2 bad input.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from pathlib import Path

REPO_CONFIG = Path(__file__).resolve().parents[2] / "ds_configs" / "zero3.json"


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line and exit 2 (like every other bad input), not the usage."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (python -m mlot_ds.plan --help)\n")


def parse_args(argv=None) -> argparse.Namespace:
    parser = OneLineParser(prog="python -m mlot_ds.plan", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=None, help="YAML recipe (default: the embedded demo)")
    parser.add_argument("--config", default=str(REPO_CONFIG) if REPO_CONFIG.is_file() else None,
                        help="DeepSpeed JSON (default: ds_configs/zero3.json of this checkout)")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=1)
    parser.add_argument("--gpu-memory", default="80GB", help="per GPU (binary units: 80GB = 80 GiB)")
    parser.add_argument("--cpu-memory", default=None, help="per node, e.g. 1TB (checks the host side)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cuda (default) or cpu: this machine's CPU ranks (fp32, gloo), as in the validation")
    parser.add_argument("--reserve", type=float, default=None,
                        help="share of GPU memory left for the CUDA context, NCCL and fragmentation (default 0.10; cpu 0)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default data.max_length)")
    parser.add_argument("--pairs", type=int, default=None, help="paired rows per sequence (default: all of them)")
    parser.add_argument("--no-padding", action="store_true", help="batches of equal length (no attention mask)")
    parser.add_argument("--gpu-tflops", type=float, default=989.0, help="dense bf16 peak per GPU (H100 SXM 989, A100 312)")
    parser.add_argument("--mfu", type=float, default=0.40, help="share of the peak the matrix products reach")
    parser.add_argument("--intra-node-gbps", type=float, default=150.0)
    parser.add_argument("--inter-node-gbps", type=float, default=25.0)
    parser.add_argument("--pcie-gbps", type=float, default=20.0)
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="recipe overrides, as launch/train.py")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    # Imported after parsing: --help answers without loading torch.
    from mlot_ds.errors import BAD_INPUT_EXIT_CODE, BadInput

    # DeepSpeed prints its accelerator notice on stdout when it is first imported: stdout is the plan's.
    with contextlib.redirect_stdout(sys.stderr):
        try:
            plan = _plan(args)
        except BadInput as exc:
            print(f"error: {exc}", file=sys.stderr)
            return BAD_INPUT_EXIT_CODE
    from mlot_ds.plan import table, to_json  # loaded above, inside the redirection

    print(json.dumps(to_json(plan), indent=2) if args.json else table(plan))
    return 0


def _plan(args):
    # Imported here, inside main's redirection of stdout (see there).
    from mlot_ds.config import load_recipe
    from mlot_ds.plan import Assumptions, Cluster, parse_size, plan_recipe, read_json
    from mlot_ds.plan.model_shapes import PlanError

    for name in ("nodes", "gpus_per_node", "seq_len", "pairs"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise PlanError(f"--{name.replace('_', '-')}: expected a positive integer; got {value}")
    for name in ("gpu_tflops", "intra_node_gbps", "inter_node_gbps", "pcie_gbps"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value > 0):
            raise PlanError(f"--{name.replace('_', '-')}: expected a positive finite number; got {value}")
    if not (math.isfinite(args.mfu) and 0 < args.mfu <= 1):
        raise PlanError(f"--mfu: expected a share in (0, 1]; got {args.mfu}")
    if args.config is None:
        raise PlanError("--config: no ds_configs/zero3.json here; give the DeepSpeed JSON")
    reserve = args.reserve if args.reserve is not None else (0.0 if args.device == "cpu" else 0.10)
    if not (math.isfinite(reserve) and 0 <= reserve < 1):
        raise PlanError(f"--reserve: expected a share in [0, 1); got {reserve}")
    cluster = Cluster(args.nodes, args.gpus_per_node, parse_size(args.gpu_memory, "--gpu-memory"),
                      parse_size(args.cpu_memory, "--cpu-memory") if args.cpu_memory else None, args.device, reserve)
    assumptions = Assumptions(args.gpu_tflops, args.mfu, args.intra_node_gbps, args.inter_node_gbps, args.pcie_gbps)
    recipe = load_recipe(args.recipe, args.overrides)
    return plan_recipe(recipe, read_json(args.config), cluster, seq_len=args.seq_len, pairs=args.pairs,
                       padded=not args.no_padding, assumptions=assumptions, source=args.config)


if __name__ == "__main__":
    sys.exit(main())
