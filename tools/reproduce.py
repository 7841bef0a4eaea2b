#!/usr/bin/env python
"""A miniature reproduction of the paper's tables on the zoo and the bundled DialogSum sample.

    python tools/reproduce.py                      # the full run (default zoo, 3 seeds; see --help)
    python tools/reproduce.py --ablation           # the paper's Table 3 on the same scale (labeled)
    python tools/reproduce.py --quick              # tiny zoo, 1 seed, 3 methods, 3 steps (a smoke test)

Every training run is a real job of the engine (``mlot_ds.engine.cli.main``) with world size 1,
called repeatedly inside this one process: the imports and the process group are paid once. Each
run writes its recipe and log under ``--work-dir``; its final ``eval/*`` metrics (bits per byte of
the gold test summaries, ROUGE-LSum of greedy summaries against the three references) are collected.
Origin (the untrained student) and the teachers are evaluated the same way, without training.

Settings: ``labeled`` trains on the gold summaries; ``unlabeled`` (the paper's Table 2) replaces them
with the distillation teacher's greedy summaries (``tools/generate_teacher_responses.py``), which is
also the training set of SeqKD. Writes ``<out-dir>/<name>.md`` (tables, scale, command), ``.json``
(every run) and ``.png`` (a bar chart). Text under ``## Analysis`` in an existing report is kept.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib.util
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import reproduce_real  # noqa: E402  (tools/ is not a package)

TEACHER_MEMBERS = {"llama": "teacher-llama", "qwen": "teacher-qwen", "opt": "teacher-opt"}
PAIRING_BY_LOSS = {"mlot": "offsets", "official": "position", "uld": "position", "mined": "dtw"}


@dataclass(frozen=True)
class Method:
    label: str
    loss: str = "mlot"
    preset: str = "default"
    teachers: tuple[str, ...] = ("single",)
    weighting: str = "static"
    data: str = "setting"
    """``setting``: the setting's training data; ``teacher``: always the teacher's generations (SeqKD)."""
    ce_only: bool = False
    """SFT / SeqKD: every teacher's loss weights are 0 (``loss.weights``), so only CE trains."""
    weights: tuple[tuple[str, float], ...] = ()
    """Ablations: the recipe's ``loss.weights`` (replace the preset's term weights; 0 drops a term)."""
    overrides: tuple[tuple[str, object], ...] = ()
    """The recipe's ``loss.overrides``; ``k: FULL_K`` means the smaller of the two vocabularies."""


FULL_K = "smaller vocabulary"
METHODS = {
    "sft": Method("SFT", ce_only=True),
    "seqkd": Method("SeqKD", ce_only=True, data="teacher"),
    "mined": Method("MinED", loss="mined"),
    "uld": Method("ULD", loss="uld"),
    "mlot-paper": Method("MLOT (paper)", preset="paper"),
    "mlot-official": Method("MLOT (official)", loss="official"),
    "mlot-default": Method("MLOT (default)"),
    "mlot-3t-static": Method("MLOT 3 teachers, static", teachers=tuple(TEACHER_MEMBERS)),
    "mlot-3t-dynamic": Method("MLOT 3 teachers, dynamic", teachers=tuple(TEACHER_MEMBERS), weighting="dynamic"),
    # Table 3 (default preset): AD = the absolute difference, TR / SR = token / sequence ranking,
    # Tr = truncation to k = 50 (without it: k = the smaller vocabulary, every id both sides have).
    "ablation-ad-tr": Method("Ablation: AD + TR", weights=(("sl", 0.0), ("sd", 0.0)),
                             overrides=(("ranking", "token"), ("k", FULL_K))),
    "ablation-ad-sr": Method("Ablation: AD + SR", weights=(("sl", 0.0), ("sd", 0.0)), overrides=(("k", FULL_K),)),
    "ablation-had": Method("Ablation: HAD only", weights=(("sl", 0.0), ("sd", 0.0))),
    "ablation-had-token": Method("Ablation: HAD, token ranking", weights=(("sl", 0.0), ("sd", 0.0)),
                                 overrides=(("ranking", "token"),)),
    "ablation-had-sl": Method("Ablation: HAD + SL", weights=(("sd", 0.0),)),
    "ablation-had-sd": Method("Ablation: HAD + SD", weights=(("sl", 0.0),)),
    "ablation-sl-sd": Method("Ablation: SL + SD (no HAD)", weights=(("had", 0.0),)),
    "ablation-token": Method("Ablation: HAD + SL + SD, token ranking", overrides=(("ranking", "token"),)),
    # Weight probes for the default preset (not in the paper): SD made visible, all terms a third.
    "weights-sd-x100": Method("Default, SD weight x100", weights=(("sd", 0.75),)),
    "weights-third": Method("Default, all weights / 3", weights=(("had", 0.5), ("sl", 0.05), ("sd", 0.0025))),
}
FULL_PLAN = {
    "labeled": ["sft", "seqkd", "mined", "uld", "mlot-paper", "mlot-official", "mlot-default", "mlot-3t-static",
                "mlot-3t-dynamic", "ablation-had", "ablation-had-sl"],
    "unlabeled": ["sft", "uld", "mlot-default", "mlot-3t-static"],
}
ABLATION_PLAN = {
    "labeled": ["sft", "ablation-ad-tr", "ablation-ad-sr", "ablation-had", "ablation-had-token", "ablation-had-sl",
                "ablation-had-sd", "ablation-sl-sd", "mlot-default", "ablation-token"],
}
QUICK_PLAN = {"labeled": ["sft", "seqkd", "mlot-default"]}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny zoo, 1 seed, SFT/SeqKD/MLOT, 3 steps")
    parser.add_argument("--ablation", action="store_true", help="the plan of the paper's Table 3 (labeled): "
                        "AD with token / sequence ranking, truncation, HAD, SL, SD, per-token ranking")
    parser.add_argument("--name", default=None, help="report name (default: dialogsum-<profile>, quick: quick)")
    parser.add_argument("--out-dir", default=str(REPO / "docs" / "results"))
    parser.add_argument("--work-dir", default=str(REPO / "runs" / "reproduce"))
    parser.add_argument("--profile", choices=("default", "tiny"), default=None)
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per training run")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--train-records", type=int, default=None, help="default: steps x micro-batch (one pass)")
    parser.add_argument("--eval-limit", type=int, default=None, help="test records evaluated (of 100)")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--max-length", type=int, default=384)
    parser.add_argument("--teacher", choices=(*TEACHER_MEMBERS, "smollm2"), default="llama",
                        help="the teacher of single-teacher methods and of the generated (unlabeled) data; smollm2: the "
                             "real pretrained teacher with its two students (tools/reproduce_real.py; the real extra)")
    parser.add_argument("--keep-checkpoints", action="store_true", help="keep each run's final checkpoint "
                        "(for tools/evaluate.py); by default only recipes, logs and metrics are kept")
    parser.add_argument("--methods", default=None, help="comma list of setting/method, e.g. labeled/sft,unlabeled/uld")
    reproduce_real.add_arguments(parser)
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {"profile": "tiny" if quick else "default", "seeds": 1 if quick else 3, "steps": 3 if quick else 120,
                "eval_limit": 4 if quick else 100, "max_new_tokens": 8 if quick else 48}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.name = args.name or ("quick" if quick else "dialogsum-smollm2" if args.teacher == "smollm2" else
                              f"dialogsum-{args.profile}" + ("-ablation" if args.ablation else ""))
    args.train_records = args.train_records or args.steps * args.micro_batch
    if args.methods:
        plan: dict[str, list[str]] = {}
        for item in args.methods.split(","):
            setting, _, method = item.strip().partition("/")
            if setting not in ("labeled", "unlabeled") or method not in METHODS:
                parser.error(f"--methods: {item!r} is not setting/method with setting labeled|unlabeled and "
                             f"method one of {', '.join(METHODS)}")
            plan.setdefault(setting, []).append(method)
        args.plan = plan
    else:
        args.plan = QUICK_PLAN if quick else ABLATION_PLAN if args.ablation else FULL_PLAN
    for name in ("seeds", "steps", "micro_batch", "train_records", "eval_limit", "max_new_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def recipe_for(args, setting: str, key: str, seed: int, data_paths: dict, out: Path) -> dict:
    """The demo recipe, rewritten for one run."""
    method = METHODS[key]
    raw = yaml.safe_load((REPO / "mlot_ds" / "recipes" / "demo.yaml").read_text(encoding="utf-8"))
    names = [args.teacher] if method.teachers == ("single",) else list(method.teachers)
    teachers = []
    from mlot_ds.zoo.settings import PROFILES

    members = PROFILES[args.profile].members
    for name in names:
        # CE only: ULD is the cheapest loss to run at weight 0 (every teacher still runs its forward).
        kind = "uld" if method.ce_only else method.loss
        loss = {"kind": kind, **({"preset": method.preset} if kind == "mlot" else {})}
        if method.ce_only:
            loss["weights"] = {"uld": 0.0}
        if method.weights:
            loss["weights"] = dict(method.weights)
        if method.overrides:
            smaller = min(members["student"].vocab_size, members[TEACHER_MEMBERS[name]].vocab_size)
            loss.update({key: smaller if value == FULL_K else value for key, value in method.overrides})
        teachers.append({"name": name, "model": f"zoo:{TEACHER_MEMBERS[name]}", "pairing": PAIRING_BY_LOSS[loss["kind"]],
                         "loss": loss, "weight": 1.0, "placement": "shard"})
    raw["name"] = f"{setting}-{key}-s{seed}"
    raw["teachers"] = teachers
    raw["weighting"] = {"mode": method.weighting, "normalize": True}
    source = "teacher" if method.data == "teacher" or setting == "unlabeled" else "gold"
    raw["data"]["train"] = data_paths[source]
    raw["data"]["eval"] = {"adapter": "dialogsum", "path": "builtin:dialogsum/test", "limit": args.eval_limit}
    raw["data"]["max_length"] = args.max_length
    raw["data"]["cache_dir"] = str(Path(args.work_dir) / "cache" / source)
    raw["train"].update({"output_dir": str(out), "seed": seed, "micro_batch_size": args.micro_batch, "grad_accum": 1,
                         "max_steps": args.steps, "lr": args.lr, "warmup_steps": max(1, args.steps // 10),
                         "log_every": max(1, args.steps // 10), "save_every": 0, "keep_last": 1, "resume": "none"})
    raw["eval"] = {"every": 0, "limit": args.eval_limit, "batch_size": 16, "max_new_tokens": args.max_new_tokens}
    raw["export"] = {"enabled": False}
    raw["zoo"] = {"profile": args.profile, "seed": 0}
    return raw


def train_and_evaluate(args, setting: str, key: str, seed: int, data_paths: dict) -> dict:
    from mlot_ds.engine import cli

    out = Path(args.work_dir) / setting / key / f"seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    recipe_path = out / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe_for(args, setting, key, seed, data_paths, out), sort_keys=False))
    started = time.perf_counter()
    with open(out / "run.log", "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            code = cli.main(["--config", str(REPO / "ds_configs" / "zero3.json"), "--recipe", str(recipe_path)])
        except SystemExit as exc:
            code = exc.code
    gc.collect()
    row = {"setting": setting, "method": key, "seed": seed, "exit": code, "seconds": time.perf_counter() - started}
    metrics_file = out / "tensorboard" / "metrics.jsonl"
    if code == 0 and metrics_file.is_file():
        rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
        final = [r for r in rows if "eval/bits_per_byte" in r]
        if final:
            row.update({k: v for k, v in final[-1].items() if k.startswith("eval/")})
        row["train/ce_last"] = next((r["train/ce"] for r in reversed(rows) if "train/ce" in r), None)
    for checkpoint in (out / "checkpoints").glob("*"):  # keep logs and metrics, not the weights
        if checkpoint.is_dir() and not args.keep_checkpoints:
            import shutil

            shutil.rmtree(checkpoint, ignore_errors=True)
    return row


def evaluate_folder(args, folder: Path, records, label: str) -> dict:
    from mlot_ds.data import Template
    from mlot_ds.eval import evaluate_records
    from mlot_ds.engine.models import load_model

    started = time.perf_counter()
    loaded = load_model(folder, "cpu")
    result = evaluate_records(loaded["model"], loaded["tokenizer"], records, adapter="dialogsum", template=Template(),
                              batch_size=16, max_new_tokens=args.max_new_tokens, max_length=args.max_length,
                              model_name=label)
    return {"setting": "reference", "method": label, "seed": 0, "exit": 0,
            "seconds": time.perf_counter() - started, **result.metrics}


def generate_teacher_data(args, teacher_dir: Path) -> Path:
    path = Path(args.work_dir) / "data" / f"{args.teacher}.train{args.train_records}.jsonl"
    spec = importlib.util.spec_from_file_location("generate_teacher_responses",
                                                  REPO / "tools" / "generate_teacher_responses.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    code = tool.main(["--model", str(teacher_dir), "--adapter", "dialogsum", "--path", "builtin:dialogsum/train",
                      "--out", str(path), "--limit", str(args.train_records), "--batch-size", "16",
                      "--max-new-tokens", str(args.max_new_tokens), "--max-length", str(args.max_length)])
    if code != 0:
        raise SystemExit(f"generating the teacher's responses failed (exit {code})")
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.teacher == "smollm2":
        return reproduce_real.main(args)
    started = time.time()
    load_before = os.getloadavg()
    from mlot_ds import dist
    from mlot_ds.data import load_records
    from mlot_ds.zoo import ZooSettings, build_zoo, corpus_path

    sys.path.insert(0, str(REPO / "tools"))
    from reproduce_report import write_report

    members = build_zoo(ZooSettings(profile=args.profile, seed=0), progress=True)
    records = load_records("dialogsum", corpus_path("test"), limit=args.eval_limit).records
    rows = []
    print("evaluating the untrained student and the teachers", flush=True)
    rows.append(evaluate_folder(args, members["student"], records, "Origin"))
    for name, member in TEACHER_MEMBERS.items():
        rows.append(evaluate_folder(args, members[member], records, f"Teacher {name}"))
    data_paths = {"gold": {"adapter": "dialogsum", "path": "builtin:dialogsum/train", "limit": args.train_records}}
    needs_teacher_data = "unlabeled" in args.plan or any(METHODS[m].data == "teacher" for ms in args.plan.values() for m in ms)
    if needs_teacher_data:
        generated = generate_teacher_data(args, members[TEACHER_MEMBERS[args.teacher]])
        data_paths["teacher"] = {"adapter": "jsonl", "path": str(generated)}
    # One process group for the whole sweep: cli.main would destroy it after each job, and DeepSpeed
    # keeps groups derived from the first one, so a second job in this process would fail.
    dist.init(600)
    destroy, dist.destroy = dist.destroy, (lambda: None)
    jobs = [(setting, key, seed) for setting, keys in args.plan.items() for key in keys for seed in range(args.seeds)]
    try:
        for index, (setting, key, seed) in enumerate(jobs, start=1):
            row = train_and_evaluate(args, setting, key, seed, data_paths)
            rows.append(row)
            shown = "  ".join(f"{k[5:]}={v:.3f}" for k, v in row.items() if k.startswith("eval/"))
            print(
                f"[{index}/{len(jobs)}] {setting}/{key} seed {seed}: exit {row['exit']}  {shown}  "
                f"({row['seconds']:.0f} s, {(time.time() - started) / 60:.1f} min so far)",
                flush=True,
            )
    finally:
        dist.destroy = destroy
        destroy()
    command = "python tools/reproduce.py" + (
        "" if argv is None and len(sys.argv) < 2 else " " + shlex.join(argv if argv is not None else sys.argv[1:])
    )
    run = {
        "name": args.name,
        "command": command,
        "scale": scale_of(args, members),
        "rows": rows,
        "wall_minutes": (time.time() - started) / 60,
        "load_average": {"start": load_before, "end": os.getloadavg()},
        "plan": args.plan,
        "teacher": args.teacher,
        "methods": {k: METHODS[k].label for k in METHODS},
    }
    paths = write_report(Path(args.out_dir), run)
    print("wrote " + ", ".join(str(p) for p in paths))
    failed = [r for r in rows if r["exit"] != 0]
    if failed:
        print(f"{len(failed)} runs failed: " + ", ".join(f"{r['setting']}/{r['method']}/s{r['seed']}" for r in failed))
    return 1 if failed else 0


def scale_of(args, members) -> dict:
    from mlot_ds.zoo.settings import PROFILES, ZooSettings

    profile = PROFILES[args.profile]
    fingerprint = ZooSettings(profile=args.profile, seed=0).fingerprint()
    return {
        "zoo_profile": args.profile,
        "zoo_fingerprint": fingerprint,
        "zoo_members": {name: dataclasses.asdict(spec) for name, spec in profile.members.items()},
        "seeds": args.seeds,
        "steps": args.steps,
        "micro_batch": args.micro_batch,
        "lr": args.lr,
        "train_records": args.train_records,
        "eval_records": args.eval_limit,
        "max_new_tokens": args.max_new_tokens,
        "max_length": args.max_length,
        "teacher": args.teacher,
        "world_size": 1,
        "device": "cpu",
    }


if __name__ == "__main__":
    sys.exit(main())
