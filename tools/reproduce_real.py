#!/usr/bin/env python
"""The method comparison on a real pretrained teacher: ``python tools/reproduce.py --teacher smollm2``.

The teacher is SmolLM2-135M-Instruct (``zoo:smollm2-135m-instruct``, chat template; needs the ``real``
extra), the students are two zoo members built for this comparison: ``student-smol`` has the
teacher's own tokenizer, so same-tokenizer KD (``kind: kl``) is the upper bound every other method is
measured against, and ``student-wide`` has its own byte-level vocabulary (a real cross-tokenizer
pair). For every student and setting:

1. one offline cache build (``tools/cache_teachers.py``) serves every cached method: the recipe holds
   one teacher entry per method, all reading the same model and text, so one teacher forward per
   micro-batch fills every cache (plus the two zoo teachers of the three-teacher rows);
2. every method runs for ``--seeds`` seeds from those caches (``official`` runs its teacher live:
   its ranking spans the batch, so it cannot be cached);
3. each run's final evaluation gives gold bits per byte and ROUGE-LSum on the bundled test split.

``labeled`` trains on the gold summaries, ``unlabeled`` on the teacher's greedy summaries of the same
prompts (generated once, kept in ``<work-dir>/data``); SFT there is SeqKD. The report
(``<out-dir>/<name>.md`` and ``.json``) has each method's same-seed difference to SFT and, as the
issue asks, the share of the same-tokenizer gain it recovers, ``(SFT - method) / (SFT - KL)`` on bits
per byte with the smol student's KL gain of the same setting.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
ZERO3 = str(REPO / "ds_configs" / "zero3.json")
TEACHER = "zoo:smollm2-135m-instruct"
STUDENTS = {"smol": "zoo:student-smol", "wide": "zoo:student-wide", "core": "zoo:student"}
"""smol: the teacher's tokenizer (49,152 ids); wide: its own byte-level BPE (8,000); core: the demo's
student (1,600 ids), for the vocabulary-size question."""
ZOO_TEACHERS = {"qwen": "zoo:teacher-qwen", "opt": "zoo:teacher-opt"}
BPB, ROUGE = "eval/bits_per_byte", "eval/rouge_lsum"
RUN_KIND = "reproduction run"


@dataclass(frozen=True)
class RealMethod:
    label: str
    cache: tuple[str, ...] = ()
    """The cached teacher entries the run reads (names of :data:`CACHED`); empty: ``live``."""
    live: dict | None = None
    """A live teacher's loss (``official``)."""
    ce_only: bool = False
    weighting: str = "static"
    ce_weight: float = 1.0
    students: tuple[str, ...] = ("smol", "wide", "core")
    weights: tuple[tuple[str, float], ...] = ()


# One teacher entry per cached method: its loss and pairing (the cache is bound to both).
CACHED = {
    "mlot": ({"kind": "mlot"}, "offsets"),
    "uld": ({"kind": "uld"}, "position"),
    "mined": ({"kind": "mined"}, "dtw"),
    "alm": ({"kind": "alm"}, "offsets"),
    "vocagnolm": ({"kind": "vocagnolm"}, "offsets"),
    "cdm": ({"kind": "cdm"}, "offsets"),
    "kl": ({"kind": "kl"}, "position"),
}
METHODS = {
    "sft": RealMethod("SFT", cache=("mlot",), ce_only=True),
    "kl": RealMethod("KL (same tokenizer)", cache=("kl",), students=("smol",)),
    "uld": RealMethod("ULD", cache=("uld",)),
    "mined": RealMethod("MinED", cache=("mined",)),
    "mlot-paper": RealMethod("MLOT (paper)", cache=("mlot",), weights=(("had", 0.15), ("sl", 0.015), ("sd", 0.015))),
    "mlot-default": RealMethod("MLOT (default)", cache=("mlot",)),
    "mlot-official": RealMethod("MLOT (official)", live={"kind": "official"}),
    "alm": RealMethod("ALM", cache=("alm",)),
    "vocagnolm": RealMethod("VocAgnoLM (CE on selected tokens only)", cache=("vocagnolm",), ce_weight=0.0),
    "cdm": RealMethod("CDM", cache=("cdm",)),
    "mlot-3t-static": RealMethod("MLOT, SmolLM2 + 2 zoo teachers, static", cache=("mlot", "qwen", "opt")),
    "mlot-3t-dynamic": RealMethod("MLOT, SmolLM2 + 2 zoo teachers, dynamic", cache=("mlot", "qwen", "opt"),
                                  weighting="dynamic"),
}
DEFAULT_PLAN = {"labeled": list(METHODS), "unlabeled": ["sft", "kl", "uld", "mlot-default", "alm", "cdm"]}

# A planned run is ``method[+key=value...]``: the sweep of the item 4 without new code.
VARIANT_KEYS = {"w": float, "ce": float, "k": int, "lr": float, "steps": int}
"""``w``: every distillation term's weight times this (the KD weight); ``ce``: the CE weight; ``k``: the
loss's ``k`` (a cache of its own); ``lr``, ``steps``: the training run's (SFT of the same ``lr``/``steps``
is the baseline of its same-seed difference)."""
TRAIN_KEYS = ("lr", "steps")


@dataclass(frozen=True)
class Planned:
    key: str
    method: RealMethod
    variant: dict

    @property
    def baseline(self) -> str:
        """The SFT run this run's same-seed difference is taken against."""
        train = [f"{name}={self.variant[name]:g}" for name in TRAIN_KEYS if name in self.variant]
        return "+".join(["sft", *train])

    def caches(self) -> list[str]:
        k = self.variant.get("k")
        if k is None:
            return list(self.method.cache)
        names = [f"{name}-k{k}" for name in self.method.cache if name not in ZOO_TEACHERS and k_field(name)]
        if not names:
            raise SystemExit(f"--real-methods: {self.key!r}: k= needs a cached loss with a k or top_k parameter")
        return names + [name for name in self.method.cache if name in ZOO_TEACHERS]


def k_field(cached: str) -> str | None:
    """The cached loss's truncation parameter: ``k`` (MultiLevelOT), ``top_k`` (KL, CDM) or none."""
    from mlot_ds.losses.registry import METHODS as LOSSES

    names = {f.name for f in dataclasses.fields(LOSSES[CACHED[cached][0]["kind"]].Params)}
    return next((name for name in ("k", "top_k") if name in names), None)


def planned(key: str) -> Planned:
    base, *parts = key.split("+")
    if base not in METHODS:
        raise SystemExit(f"--real-methods: unknown method {base!r} in {key!r} (methods: {', '.join(METHODS)})")
    variant = {}
    for part in parts:
        name, _, value = part.partition("=")
        if name not in VARIANT_KEYS:
            raise SystemExit(f"--real-methods: {part!r} in {key!r}: expected one of {', '.join(VARIANT_KEYS)} = value")
        try:
            variant[name] = VARIANT_KEYS[name](value)
        except ValueError:
            raise SystemExit(f"--real-methods: {part!r} in {key!r}: {value!r} is not a {VARIANT_KEYS[name].__name__}")
    return Planned(key, METHODS[base], variant)


def add_arguments(parser) -> None:
    group = parser.add_argument_group("real teacher (--teacher smollm2)")
    group.add_argument("--students", default="smol,wide", help="comma list of smol, wide, core (default smol,wide)")
    group.add_argument("--real-methods", default=None,
                       help=f"comma list of setting/method (default: the full plan); methods: {', '.join(METHODS)}")


def cache_names(student: str, keys: list[str]) -> list[str]:
    """The cached teachers the planned runs of ``student`` read, in a fixed order."""
    wanted = {name for key in keys if student in planned(key).method.students for name in planned(key).caches()}
    return sorted(wanted, key=lambda name: (list((*CACHED, *ZOO_TEACHERS)).index(name.split("-k")[0]), name))


def teacher_entry(name: str, cache_root: Path) -> dict:
    if name in ZOO_TEACHERS:
        loss, pairing, model, template = {"kind": "mlot"}, "offsets", ZOO_TEACHERS[name], {"kind": "plain"}
    else:
        base, _, k = name.partition("-k")
        (loss, pairing), model, template = CACHED[base], TEACHER, {"kind": "chat"}
        loss = {**loss, **({k_field(base): int(k)} if k else {})}
    return {"name": f"t_{name}", "model": model, "template": template, "pairing": pairing, "loss": dict(loss),
            "weight": 1.0, "placement": "shard", "cache_dir": str(cache_root / name)}


def base_recipe(args, student: str, setting: str, data: dict, root: Path) -> dict:
    raw = yaml.safe_load((REPO / "mlot_ds" / "recipes" / "demo.yaml").read_text(encoding="utf-8"))
    raw["name"] = f"real-{student}-{setting}"
    raw["student"] = {"model": STUDENTS[student], "template": {"kind": "plain"}, "append_eos": True}
    raw["data"] = {"train": data, "eval": {"adapter": "dialogsum", "path": "builtin:dialogsum/test", "limit": args.eval_limit},
                   "max_length": args.max_length, "bad_rows": "error", "cache_dir": str(root / "data-cache")}
    raw["train"].update({"micro_batch_size": args.micro_batch, "grad_accum": 1, "max_steps": args.steps, "lr": args.lr,
                         "warmup_steps": max(1, args.steps // 10), "log_every": max(1, args.steps // 10),
                         "save_every": 0, "keep_last": 1, "resume": "none"})
    raw["eval"] = {"every": 0, "limit": args.eval_limit, "batch_size": 16, "max_new_tokens": args.max_new_tokens}
    raw["export"] = {"enabled": False}
    raw["zoo"] = {"profile": "default", "seed": 0}
    return raw


def build_caches(args, student: str, setting: str, keys: list[str], data: dict, root: Path) -> None:
    """One cache build for every cached teacher the planned methods read (shared forwards).

    A cache already complete for the same binding is kept (the tool resumes it), so a later, larger
    plan only builds what is new.
    """
    raw = base_recipe(args, student, setting, data, root)
    raw["teachers"] = [teacher_entry(name, root / "teachers") for name in cache_names(student, keys)]
    raw["train"]["output_dir"] = str(root / "cache-build")
    recipe = root / "cache-recipe.yaml"
    recipe.parent.mkdir(parents=True, exist_ok=True)
    recipe.write_text(yaml.safe_dump(raw, sort_keys=False))
    started = time.perf_counter()
    with open(root / "cache-build.log", "w") as log:
        result = subprocess.run([sys.executable, str(REPO / "tools" / "cache_teachers.py"), "--recipe", str(recipe),
                                 "--chunk-records", "128"], stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
    if result.returncode != 0:
        raise SystemExit(f"building the caches for {student}/{setting} failed; see {root / 'cache-build.log'}")
    print(f"caches for {student}/{setting} ready in {(time.perf_counter() - started) / 60:.1f} min", flush=True)


def term_weights(teacher: dict, method: RealMethod, scale: float) -> dict[str, float]:
    """The teacher's term weights: the method's (or the loss's defaults) times ``scale``; CE only: zeros."""
    from mlot_ds.losses.registry import METHODS as LOSSES

    loss = LOSSES[teacher["loss"]["kind"]]
    params = loss.Params(**{k: v for k, v in teacher["loss"].items() if k not in ("kind", "weights")})
    weights = dict(loss.default_weights(params))
    weights.update(dict(method.weights))
    return {term: 0.0 if method.ce_only else value * scale for term, value in weights.items()}


def run_recipe(args, student: str, setting: str, key: str, seed: int, data: dict, root: Path) -> dict:
    run = planned(key)
    method, variant = run.method, run.variant
    raw = base_recipe(args, student, setting, data, root)
    teachers = [teacher_entry(name, root / "teachers") for name in run.caches()]
    for teacher in teachers:
        teacher["source"] = "cache"
        teacher["loss"]["weights"] = term_weights(teacher, method, variant.get("w", 1.0))
    if method.live is not None:
        teachers = [{"name": "t_live", "model": TEACHER, "template": {"kind": "chat"}, "pairing": "position",
                     "loss": dict(method.live), "weight": 1.0, "placement": "shard"}]
    raw["teachers"] = teachers
    raw["weighting"] = {"mode": method.weighting, "normalize": True}
    raw["train"].update({"seed": seed, "ce_weight": variant.get("ce", method.ce_weight)})
    if "lr" in variant:
        raw["train"]["lr"] = variant["lr"]
    if "steps" in variant:
        steps = variant["steps"]
        raw["train"].update({"max_steps": steps, "warmup_steps": max(1, steps // 10), "log_every": max(1, steps // 10)})
    return raw


def train_one(args, student: str, setting: str, key: str, seed: int, data: dict, root: Path) -> dict:
    from mlot_ds.engine import cli

    out = Path(args.work_dir) / "runs" / student / setting / key / f"seed{seed}"
    raw = run_recipe(args, student, setting, key, seed, data, root)
    raw["train"]["output_dir"] = str(out)
    text = yaml.safe_dump(raw, sort_keys=False)
    done = out / "row.json"
    if done.is_file() and (out / "recipe.yaml").is_file() and (out / "recipe.yaml").read_text() == text:
        return json.loads(done.read_text())  # the same run finished before: a re-run of the sweep continues
    if out.exists():
        from mlot_ds import outputs

        if outputs.marker_kind(out) != RUN_KIND:
            raise SystemExit(f"{out} exists and is not a run folder of this tool; refusing to replace it")
        import shutil

        shutil.rmtree(out)  # our own run folder from an interrupted or changed run
    out.mkdir(parents=True)
    from mlot_ds import outputs

    outputs.mark_folder(out, RUN_KIND)
    recipe = out / "recipe.yaml"
    recipe.write_text(text)
    started = time.perf_counter()
    with open(out / "run.log", "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            code = cli.main(["--config", ZERO3, "--recipe", str(recipe)])
        except SystemExit as exc:
            code = exc.code
    gc.collect()
    row = {"student": student, "setting": f"{student}-{setting}", "method": key, "seed": seed, "exit": code,
           "seconds": time.perf_counter() - started}
    metrics = out / "tensorboard" / "metrics.jsonl"
    if code == 0 and metrics.is_file():
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        final = [r for r in rows if BPB in r]
        if final:
            row.update({k: v for k, v in final[-1].items() if k.startswith("eval/")})
        row["train/ce_last"] = next((r["train/ce"] for r in reversed(rows) if "train/ce" in r), None)
    for checkpoint in (out / "checkpoints").glob("step_*"):  # keep logs, metrics and predictions, not weights
        if checkpoint.is_dir() and not args.keep_checkpoints:
            import shutil

            shutil.rmtree(checkpoint, ignore_errors=True)
    if code == 0:
        done.write_text(json.dumps(row))
    return row


def teacher_data(args) -> dict:
    """The teacher's greedy summaries of the training prompts (chat template), generated once."""
    path = Path(args.work_dir) / "data" / f"smollm2.train{args.train_records}.jsonl"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        command = [sys.executable, str(REPO / "tools" / "generate_teacher_responses.py"), "--model", TEACHER,
                   "--template", "chat", "--adapter", "dialogsum", "--path", "builtin:dialogsum/train", "--out", str(path),
                   "--limit", str(args.train_records), "--batch-size", "16", "--max-new-tokens", str(args.max_new_tokens),
                   "--max-length", str(args.max_length)]
        result = subprocess.run(command, env={**os.environ, "PYTHONPATH": str(REPO)})
        if result.returncode != 0:
            raise SystemExit("generating the teacher's summaries failed")
        print(f"teacher summaries written in {(time.perf_counter() - started) / 60:.1f} min: {path}", flush=True)
    return {"adapter": "jsonl", "path": str(path)}


def reference_rows(args, records) -> list[dict]:
    """The untrained students and the teacher, evaluated like the runs."""
    from mlot_ds.data import Template
    from mlot_ds.engine.models import load_model, model_folder
    from mlot_ds.eval import evaluate_records
    from mlot_ds.zoo import ZooSettings, build_zoo

    members = [STUDENTS[s].removeprefix("zoo:") for s in args.student_list]
    members += [m.removeprefix("zoo:") for m in ZOO_TEACHERS.values()]
    paths = build_zoo(ZooSettings(profile="default", seed=0), members=members, progress=True)
    rows = []
    models = [(f"Origin {s}", paths[STUDENTS[s].removeprefix("zoo:")], "plain") for s in args.student_list]
    models.append(("Teacher SmolLM2-135M-Instruct", model_folder(TEACHER), "chat"))
    for label, folder, template in models:
        key = {"model": str(folder), "template": template, "eval_limit": args.eval_limit,
               "max_new_tokens": args.max_new_tokens, "max_length": args.max_length}
        kept = Path(args.work_dir) / "reference" / (label.replace(" ", "_") + ".json")
        if kept.is_file() and json.loads(kept.read_text()).get("key") == key:
            rows.append(json.loads(kept.read_text())["row"])  # evaluated by an earlier invocation
            continue
        started = time.perf_counter()
        loaded = load_model(folder, "cpu")
        result = evaluate_records(loaded["model"], loaded["tokenizer"], records, adapter="dialogsum",
                                  template=Template(kind=template), batch_size=16, max_new_tokens=args.max_new_tokens,
                                  max_length=args.max_length, model_name=label)
        rows.append({"student": "reference", "setting": "reference", "method": label, "seed": 0, "exit": 0,
                     "seconds": time.perf_counter() - started, **result.metrics})
        kept.parent.mkdir(parents=True, exist_ok=True)
        kept.write_text(json.dumps({"key": key, "row": rows[-1]}))
        del loaded
        gc.collect()
    return rows


def plan_of(args) -> dict[str, list[str]]:
    if not args.real_methods:
        return {setting: list(methods) for setting, methods in DEFAULT_PLAN.items()}
    plan: dict[str, list[str]] = {}
    for item in args.real_methods.split(","):
        setting, _, method = item.strip().partition("/")
        if setting not in ("labeled", "unlabeled"):
            raise SystemExit(f"--real-methods: {item!r} is not setting/method[+key=value] with setting labeled|unlabeled")
        planned(method)
        plan.setdefault(setting, []).append(method)
    return plan


def main(args) -> int:
    from mlot_ds import dist
    from mlot_ds.data import load_records
    from mlot_ds.data.dialogsum import corpus_path

    sys.path.insert(0, str(REPO / "tools"))
    started, load_before = time.time(), os.getloadavg()
    args.student_list = [s.strip() for s in args.students.split(",") if s.strip()]
    unknown = sorted(set(args.student_list) - set(STUDENTS))
    if unknown:
        raise SystemExit(f"--students: unknown {', '.join(unknown)}; expected smol, wide, core")
    plan = plan_of(args)
    records = load_records("dialogsum", corpus_path("test"), limit=args.eval_limit).records
    print("evaluating the untrained students and the teacher", flush=True)
    rows = reference_rows(args, records)
    data = {"labeled": {"adapter": "dialogsum", "path": "builtin:dialogsum/train", "limit": args.train_records}}
    if "unlabeled" in plan:
        data["unlabeled"] = teacher_data(args)
    jobs = []
    for student in args.student_list:
        for setting, keys in plan.items():
            root = Path(args.work_dir) / "cache" / student / setting
            if cache_names(student, keys):
                build_caches(args, student, setting, keys, data[setting], root)
            jobs += [(student, setting, key, seed, root) for key in keys if student in planned(key).method.students
                     for seed in range(args.seeds)]
    dist.init(600)
    destroy, dist.destroy = dist.destroy, (lambda: None)  # one process group for the whole sweep
    try:
        for index, (student, setting, key, seed, root) in enumerate(jobs, start=1):
            row = train_one(args, student, setting, key, seed, data[setting], root)
            rows.append(row)
            shown = "  ".join(f"{k[5:]}={v:.3f}" for k, v in row.items() if k.startswith("eval/"))
            print(f"[{index}/{len(jobs)}] {student}/{setting}/{key} seed {seed}: exit {row['exit']}  {shown}  "
                  f"({row['seconds']:.0f} s, {(time.time() - started) / 60:.1f} min so far)", flush=True)
            write_report(args, rows, plan, started, load_before, partial=True)
    finally:
        dist.destroy = destroy
        destroy()
    paths = write_report(args, rows, plan, started, load_before, partial=False)
    print("wrote " + ", ".join(str(p) for p in paths))
    return 1 if any(r["exit"] != 0 for r in rows) else 0


# ------------------------------------------------------------------------------------------ report


def same_seed_differences(rows, setting: str, metric: str = BPB) -> dict[str, tuple[float, float | None, int]]:
    """method -> (mean, sample std, n) of ``method - SFT`` on ``metric`` over seeds both finished (SFT of
    the same ``lr``/``steps`` variant)."""
    by = {(r["method"], r["seed"]): r[metric] for r in rows if r["setting"] == setting and r["exit"] == 0 and metric in r}
    out = {}
    for method in sorted({m for m, _ in by}):
        base = planned(method).baseline
        values = [by[(method, seed)] - by[(base, seed)] for m, seed in by if m == method and (base, seed) in by]
        if values:
            out[method] = (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(values))
    return out


MIN_KL_GAIN = 0.01
"""Bits per byte: below this, same-tokenizer KD gained nothing measurable at this scale and a share of it means nothing."""


def share_of_kl_gain(key: str, difference, smol_differences: dict) -> str:
    """``(SFT - method) / (SFT - KL)`` for ``key``, against the KL run of the same lr/steps variant."""
    kl_key = "+".join(["kl", *planned(key).baseline.split("+")[1:]])
    if difference is None or kl_key not in smol_differences:
        return "n/a"
    gain = -smol_differences[kl_key][0]
    if gain < MIN_KL_GAIN:
        return f"n/a (KL gain {gain:+.3f})"
    return f"{-difference[0] / gain:+.0%}"


def write_report(args, rows, plan, started, load_before, *, partial: bool) -> list[Path]:
    from reproduce_report import summarise

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = args.name
    run = {"name": name, "command": "python tools/reproduce.py " + " ".join(sys.argv[1:]), "rows": rows, "plan": plan,
           "partial": partial, "wall_minutes": (time.time() - started) / 60,
           "load_average": {"start": load_before, "end": os.getloadavg()},
           "scale": {k: getattr(args, k) for k in ("seeds", "steps", "micro_batch", "lr", "train_records", "eval_limit",
                                                   "max_new_tokens", "max_length")},
           "methods": {k: dataclasses.asdict(v) for k, v in METHODS.items()}, "written_by": "mlot-ds tools/reproduce.py"}
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    json_path.write_text(json.dumps(run, indent=2) + "\n")
    summary = summarise(rows)
    kept = ""
    if md_path.is_file() and "\n## Analysis" in md_path.read_text():
        kept = md_path.read_text()[md_path.read_text().index("\n## Analysis"):]
    md_path.write_text(markdown(run, summary) + kept)
    return [md_path, json_path]


def _cell(stats, metric, digits):
    if metric not in stats:
        return "n/a"
    mean, spread, _ = stats[metric]
    return f"{mean:.{digits}f}" + (f" ± {spread:.{digits}f}" if spread is not None else "")


def markdown(run: dict, summary: dict) -> str:
    rows, scale = run["rows"], run["scale"]
    lines = [f"# {run['name']}: the methods on a real teacher (SmolLM2-135M-Instruct)", "",
             ("**Partial: the sweep is still running.**" if run["partial"] else ""), "",
             f"Command: `{run['command']}`; {scale['seeds']} seeds, {scale['steps']} steps of {scale['micro_batch']} records "
             f"(lr {scale['lr']}), {scale['train_records']} training records, {scale['eval_limit']} test records "
             f"(bits per byte of the gold summary1, ROUGE-LSum of greedy summaries, {scale['max_new_tokens']} new tokens "
             f"at most). Wall time {run['wall_minutes']:.0f} min on this 2-core CPU (load average "
             f"{run['load_average']['start'][0]:.1f} -> {run['load_average']['end'][0]:.1f}).", "",
             "## Reference models", "", "| model | bits per byte | ROUGE-LSum |", "|---|---|---|"]
    for (setting, method), stats in summary.items():
        if setting == "reference":
            lines.append(f"| {method} | {_cell(stats, BPB, 3)} | {_cell(stats, ROUGE, 2)} |")
    for setting_name in ("labeled", "unlabeled"):
        smol_differences = same_seed_differences(rows, f"smol-{setting_name}")
        for student in STUDENTS:
            setting = f"{student}-{setting_name}"
            entries = [(key, stats) for (s, key), stats in summary.items() if s == setting]
            if not entries:
                continue
            differences = same_seed_differences(rows, setting)
            lines += ["", f"## {setting_name.capitalize()}, student-{student}", "",
                      "| method | runs | bits per byte | ROUGE-LSum | bpb - SFT (same seed) | share of the KL gain |",
                      "|---|---|---|---|---|---|"]
            for key, stats in entries:
                label = run["methods"].get(key.split("+")[0], {}).get("label", key)
                label += "".join(f", {part}" for part in key.split("+")[1:])
                difference = differences.get(key)
                diff = "n/a" if difference is None else f"{difference[0]:+.4f}" + (
                    f" ± {difference[1]:.4f}" if difference[1] is not None else "")
                share = share_of_kl_gain(key, difference, smol_differences)
                runs = f"{stats['runs']}" + (f" ({stats['failed']} failed)" if stats["failed"] else "")
                lines.append(f"| {label} | {runs} | {_cell(stats, BPB, 3)} | {_cell(stats, ROUGE, 2)} | {diff} | {share} |")
    lines += ["", "The share is `(SFT - method) / (SFT - KL)` on same-seed bits-per-byte differences, with the KL gain of "
              "student-smol in the same setting and with the same lr/steps (the gain available through the teacher's own "
              "tokenizer); it compares students trained the same way, on bits per byte, which does not depend on the "
              f"tokenizer. It is n/a where that KL gain is below {MIN_KL_GAIN} bits per byte: there is no upper bound to "
              "take a share of. The wide and core students' shares use student-smol's KL gain.", ""]
    return "\n".join(line for line in lines if line is not None) + "\n"
