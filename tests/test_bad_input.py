"""Bad input, class by class: nothing is deleted that mlot-ds did not write, every float is finite and in
range, every mistake is one line with exit status 2, and the dry run checks what the run will need."""

from __future__ import annotations

import ast
import gzip
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mlot_ds import outputs
from mlot_ds.config import DEFAULT_RECIPE
from mlot_ds.engine.cli import main as cli_main
from mlot_ds.errors import BadInput
from tests.helpers import REPO, job_env

ZERO3 = REPO / "ds_configs" / "zero3.json"


def tree_digest(root: Path) -> str:
    """Names, sizes and contents of everything under ``root`` (a folder or a file)."""
    digest = hashlib.sha256()
    paths = [root] if root.is_file() else sorted(root.rglob("*"))
    for path in paths:
        digest.update(str(path.relative_to(root.parent)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture
def targets(tmp_path) -> dict[str, Path]:
    """Three things a writer must never replace: a run folder, a file, an unrelated folder."""
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000002").mkdir(parents=True)
    (run / "checkpoints" / "step_00000002" / "COMPLETE").write_text("ok\n")
    (run / "checkpoints" / "latest").write_text("step_00000002\n")
    (run / "tensorboard").mkdir()
    (run / "tensorboard" / "metrics.jsonl").write_text('{"step": 1}\n')
    file = tmp_path / "notes.txt"
    file.write_text("my notes\n")
    unrelated = tmp_path / "photos"
    unrelated.mkdir()
    (unrelated / "cat.jpg").write_bytes(b"\xff\xd8 not really a cat")
    return {"run": run, "file": file, "unrelated": unrelated}


def dry_run(tmp_path: Path, *overrides: str, recipe: dict | None = None) -> tuple[int, str]:
    args = ["--config", str(ZERO3), "--dry-run", *overrides]
    if recipe is not None:
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe))
        args = ["--recipe", str(path), *args]
    import io
    from contextlib import redirect_stderr

    err = io.StringIO()
    with redirect_stderr(err):
        code = cli_main(args)
    return code, err.getvalue()


# ------------------------------------------------------------------------------------- 1. data loss


def test_replace_folder_replaces_only_its_own_kind_and_keeps_the_old_one_on_failure(tmp_path, targets):
    for name, target in targets.items():
        before = tree_digest(target)
        with pytest.raises(outputs.OutputError):
            outputs.replace_folder(target, "export", lambda staging: (staging / "x").write_text("new"), "OUT")
        assert tree_digest(target) == before, name
    out = tmp_path / "export"
    outputs.replace_folder(out, "export", lambda staging: (staging / "a").write_text("1"), "OUT")
    outputs.replace_folder(out, "export", lambda staging: (staging / "b").write_text("2"), "OUT")  # ours: replaced
    assert sorted(p.name for p in out.iterdir()) == sorted([outputs.MARKER, "b"])
    with pytest.raises(outputs.OutputError, match="holds a mlot-ds export, not a cache"):
        outputs.check_folder(out, "cache", "OUT")

    def failing(staging: Path) -> None:
        (staging / "half").write_text("")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        outputs.replace_folder(out, "export", failing, "OUT")
    assert sorted(p.name for p in out.iterdir()) == sorted([outputs.MARKER, "b"])  # the earlier export survives
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".export")] == []  # no staging left behind
    empty = tmp_path / "empty"
    empty.mkdir()
    outputs.replace_folder(empty, "export", lambda staging: None, "OUT")  # an empty folder may be used


@pytest.mark.parametrize("kind", ["run", "file", "unrelated"])
def test_a_training_run_refuses_an_export_folder_that_is_not_an_earlier_export(tmp_path, targets, kind):
    before = tree_digest(targets[kind])
    out = tmp_path / "new-run"
    code, err = dry_run(tmp_path, f"train.output_dir={out}", f"export.dir={targets[kind]}")
    assert code == 2 and err.count("error:") == 1 and "export.dir" in err, err
    assert tree_digest(targets[kind]) == before


def test_the_export_may_not_be_the_run_folder_or_inside_its_checkpoints(tmp_path):
    out = tmp_path / "run"
    for export in (out, out / "checkpoints", out / "tensorboard" / "x", tmp_path):
        code, err = dry_run(tmp_path, f"train.output_dir={out}", f"export.dir={export}")
        assert code == 2 and "export.dir" in err, (export, err)
    assert dry_run(tmp_path, f"train.output_dir={out}", f"export.dir={out / 'hf'}")[0] == 0


def test_a_fresh_run_never_saves_over_the_checkpoints_of_an_earlier_one(tmp_path, targets):
    run = targets["run"]
    before = tree_digest(run)
    code, err = dry_run(tmp_path, f"train.output_dir={run}", "train.resume=none")
    assert code == 2 and "holds checkpoints of an earlier run" in err, err
    assert tree_digest(run) == before


def test_resuming_an_earlier_checkpoint_while_later_ones_exist_is_refused(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    for step in (2, 4):
        folder = root / f"step_{step:08d}"
        folder.mkdir(parents=True)
        (folder / "COMPLETE").write_text("ok\n")
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        (folder / "teachers.json").write_text(json.dumps({"teachers": []}))
    code, err = dry_run(tmp_path, f"train.output_dir={tmp_path / 'run'}", f"train.resume={root / 'step_00000002'}")
    assert code == 2 and "after step 2" in err and "step_00000004" in err, err


def run_tool(name: str, *args, env=None) -> subprocess.CompletedProcess:
    env = dict(env or os.environ, PYTHONPATH=str(REPO))  # this checkout's mlot_ds, whatever pip points at
    return subprocess.run([sys.executable, str(REPO / "tools" / name), *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=env)


def fake_checkpoint(root: Path) -> Path:
    folder = root / "checkpoints" / "step_00000003"
    folder.mkdir(parents=True)
    (folder / "COMPLETE").write_text("ok\n")
    return folder


@pytest.mark.slow  # each starts a tool in a fresh interpreter
@pytest.mark.parametrize("kind", ["run", "file", "unrelated"])
def test_export_tool_refuses_every_target_it_did_not_write(tmp_path, targets, kind):
    checkpoint = fake_checkpoint(tmp_path / "src")
    before = tree_digest(targets[kind])
    result = run_tool("export_hf.py", checkpoint, targets[kind])
    assert result.returncode == 2 and result.stderr.count("error:") == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert tree_digest(targets[kind]) == before


@pytest.mark.slow  # each starts a tool in a fresh interpreter
@pytest.mark.parametrize("kind", ["run", "file", "unrelated"])
def test_evaluate_refuses_to_overwrite_what_is_not_its_report(tmp_path, targets, kind):
    before = tree_digest(targets[kind])
    result = run_tool("evaluate.py", tmp_path / "no-model", "--adapter", "dialogsum", "--path",
                      "builtin:dialogsum/test", "--out", targets[kind])
    assert result.returncode == 2 and "--out" in result.stderr, result.stderr
    assert tree_digest(targets[kind]) == before


@pytest.mark.slow  # each starts a tool in a fresh interpreter
def test_generated_responses_never_overwrite_another_file(tmp_path, targets):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    for kind in ("run", "file"):
        before = tree_digest(targets[kind])
        result = run_tool("generate_teacher_responses.py", "--model", model, "--adapter", "dialogsum", "--path",
                          "builtin:dialogsum/train", "--out", targets[kind])
        assert result.returncode == 2 and "--out" in result.stderr, result.stderr
        assert tree_digest(targets[kind]) == before


def test_teacher_cache_writes_only_into_its_own_folders_and_overwrite_removes_only_its_files(tmp_path, targets):
    from mlot_ds.teachers import cache

    manifest = {"format": cache.FORMAT_VERSION, "binding": {"checkpoint": "a"}, "num_records": 2,
                "chunk_records": 1, "num_chunks": 2, "uld_head": None}
    for kind, target in targets.items():
        before = tree_digest(target)
        for overwrite in (False, True):
            with pytest.raises(cache.TeacherCacheError, match="cache_dir"):
                cache.prepare_folder(target, manifest, "teachers[0]", overwrite=overwrite)
        assert tree_digest(target) == before, kind
    folder = tmp_path / "cache"
    cache.prepare_folder(folder, manifest, "teachers[0]", overwrite=False)
    cache.chunk_path(folder, 0).write_bytes(b"chunk")
    other = dict(manifest, binding={"checkpoint": "b"})
    cache.prepare_folder(folder, other, "teachers[0]", overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == [cache.MANIFEST]
    (folder / "mine.txt").write_text("a user's file")  # put into a cache folder later: never removed
    cache.prepare_folder(folder, manifest, "teachers[0]", overwrite=True)
    assert (folder / "mine.txt").read_text() == "a user's file"


def test_a_zoo_build_into_a_used_cache_folder_deletes_nothing(tiny_zoo, tmp_path, targets):
    import shutil

    from mlot_ds.zoo import ZooSettings, build_zoo

    cache = tmp_path / "shared-cache"
    shutil.copytree(tiny_zoo / "zoo", cache / "zoo")
    for target in targets.values():
        shutil.move(str(target), cache / target.name)
    before = {p.name: tree_digest(p) for p in cache.iterdir() if p.name != "zoo"}
    build_zoo(ZooSettings(profile="tiny"), cache_dir=cache, progress=False)
    assert {p.name: tree_digest(p) for p in cache.iterdir() if p.name != "zoo"} == before
    result = run_tool("build_zoo.py", "--profile", "tiny", "--cache-dir", cache / "notes.txt", "--no-progress")
    assert result.returncode == 2 and result.stderr.count("error:") == 1 and "notes.txt" in result.stderr, result.stderr
    assert (cache / "notes.txt").read_text() == "my notes\n"


# --------------------------------------------------------------------------- 2. non-finite numbers

FLOAT_FIELDS = ["teachers.llama.weight", "teachers.llama.loss.weights.had", "train.ce_weight", "train.lr",
                "weighting.temperature", "train.weight_decay", "train.grad_clip"]


@pytest.mark.parametrize("value", [".nan", "nan", "inf", "-.inf", "1e999"])
@pytest.mark.parametrize("field", FLOAT_FIELDS)
def test_non_finite_numbers_are_refused_from_overrides(tmp_path, field, value):
    code, err = dry_run(tmp_path, f"{field}={value}")
    where = field.replace("teachers.llama", "teachers[0]")
    assert code == 2 and err.count("error:") == 1 and where in err and "finite" in err, err


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_numbers_are_refused_from_yaml(tmp_path, value):
    raw = yaml.safe_load(DEFAULT_RECIPE.read_text())
    raw["train"]["lr"] = value
    raw["teachers"][1]["weight"] = 1.0
    code, err = dry_run(tmp_path, recipe=raw)
    assert code == 2 and "train.lr: expected a finite number" in err, err


def test_every_float_field_of_the_recipe_states_its_range():
    import dataclasses
    from typing import Annotated, get_args, get_origin, get_type_hints

    from mlot_ds import config

    unbounded = []
    for cls in (config.TemplateConfig, config.StudentConfig, config.LossConfig, config.TeacherConfig,
                config.WeightingConfig, config.DataSourceConfig, config.DataConfig, config.TrainConfig,
                config.EvalConfig, config.ExportConfig, config.ZooConfig):
        for name, hint in get_type_hints(cls, include_extras=True).items():
            base = get_args(hint)[0] if get_origin(hint) is Annotated else hint
            if base is float and get_origin(hint) is not Annotated:
                unbounded.append(f"{cls.__name__}.{name}")
        assert dataclasses.is_dataclass(cls)
    assert unbounded == []


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_all_teacher_weights_zero_is_one_line_in_either_mode(tmp_path, mode):
    code, err = dry_run(tmp_path, f"weighting.mode={mode}", *[f"teachers.{i}.weight=0" for i in range(3)])
    assert code == 2 and err.count("error:") == 1 and "must not all be zero" in err, err


# ----------------------------------------------------------------------------- 3. one line, exit 2


def write(path: Path, payload) -> Path:
    path.write_bytes(payload if isinstance(payload, bytes) else payload.encode())
    return path


def test_one_line_errors_for_files_and_fields(tmp_path):
    good_gz = gzip.compress(b"".join(b'{"prompt": "p", "response": "r%d"}\n' % i for i in range(500)))
    cases = {
        "system with plain": (["student.template.system=Be brief."], "student.template.system"),
        "fields with dialogsum": (["data.train.fields={prompt: dialogue}"], "data.train.fields"),
        "unknown fields key": (["data.train.adapter=jsonl", "data.train.fields={question: q}"], "data.train.fields.question"),
        "few_shot too large": (["teachers.llama.template.few_shot=5000"], "teachers[0].template.few_shot"),
        "not gzip": ([f"data.train.path={write(tmp_path / 'a.jsonl.gz', b'plain text')}", "data.train.adapter=jsonl"],
                     "a.jsonl.gz:1: is not a valid gzip file"),
        "gzip cut short": ([f"data.train.path={write(tmp_path / 'b.jsonl.gz', good_gz[: len(good_gz) // 2])}",
                            "data.train.adapter=jsonl"], "b.jsonl.gz:"),
        "scalar indexed": (["train.lr.value=1"], "train.lr is a float"),
        "value not YAML": (["train.lr=[1"], "is not valid YAML"),
        "output is a file": ([f"train.output_dir={write(tmp_path / 'out.txt', 'x')}"], "train.output_dir"),
    }
    for label, (overrides, expected) in cases.items():
        code, err = dry_run(tmp_path, *overrides)
        assert code == 2 and err.count("error:") == 1 and expected in err, (label, err)
        assert "Traceback" not in err, label


@pytest.mark.parametrize("text,expected", [
    (b'{"zero_optimization": {"stage": 3}, "note": "caf\xe9"}', ":1: not UTF-8 text"),
    (b'{"zero_optimization": [3]}', "zero_optimization must be a JSON object"),
    (b'{"zero_optimization": {"stage": 3}, "optimizer": {"type": "Adafactorx", "params": {}}}',
     "optimizer.type 'Adafactorx' is not an optimizer DeepSpeed can build"),
    (b'{"zero_optimization": {"stage": 3}, "scheduler": {"type": "Cosine", "params": {}}}',
     "scheduler.type 'Cosine' is not a scheduler DeepSpeed knows"),
])
def test_deepspeed_json_problems_are_one_line(tmp_path, text, expected):
    config = write(tmp_path / "ds.json", text)
    import io
    from contextlib import redirect_stderr

    err = io.StringIO()
    with redirect_stderr(err):
        code = cli_main(["--config", str(config), "--dry-run"])
    assert code == 2 and expected in err.getvalue(), err.getvalue()


def test_damaged_checkpoint_files_name_the_file_and_the_previous_checkpoint(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    for step in (2, 4):
        folder = root / f"step_{step:08d}"
        folder.mkdir(parents=True)
        (folder / "COMPLETE").write_text("ok\n")
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "world_size": 1}))
        (folder / "teachers.json").write_text(json.dumps({"teachers": []}))
    (root / "latest").write_text("step_00000004\n")
    damaged = root / "step_00000004" / "trainer_state.json"
    damaged.write_text('{"global_step": 4, "wor')
    code, err = dry_run(tmp_path, f"train.output_dir={tmp_path / 'run'}")
    assert code == 2 and str(damaged) in err and "--resume" in err and "step_00000002" in err, err
    assert damaged.read_text() == '{"global_step": 4, "wor'  # left as it was
    from mlot_ds.engine.checkpoint import CheckpointError, check_compatible

    damaged.write_text(json.dumps({"global_step": 4, "world_size": 1, "steps_per_epoch": 3}))
    (root / "step_00000004" / "rng_rank0.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError, match="rng_rank0.pt: damaged or truncated"):
        check_compatible(root / "step_00000004", {"teachers": []}, False, 1, 3)


@pytest.mark.slow  # each starts a tool in a fresh interpreter
def test_evaluate_and_export_on_a_truncated_checkpoint_say_so_in_one_line(tmp_path, tiny_zoo):
    checkpoint = fake_checkpoint(tmp_path / "src")
    (checkpoint / "recipe.yaml").write_text(DEFAULT_RECIPE.read_text().replace("profile: default", "profile: tiny"))
    (checkpoint / "mp_rank_00_model_states.pt").write_bytes(b"PK\x03\x04 cut")
    env = job_env(tiny_zoo)
    results = [run_tool("export_hf.py", checkpoint, tmp_path / "out", env=env),
               run_tool("evaluate.py", checkpoint, "--adapter", "dialogsum", "--path", "builtin:dialogsum/test",
                        "--limit", "2", env=env)]
    for result in results:
        assert result.returncode == 2 and result.stderr.count("error:") == 1, result.stderr
        assert "cannot read its ZeRO-3 shards" in result.stderr and "Traceback" not in result.stderr


# The modules that check and load what users give; every raise in them must be a BadInput (one line).
INPUT_MODULES = ["mlot_ds/config.py", "mlot_ds/outputs.py", "mlot_ds/data/sources.py", "mlot_ds/data/records.py",
                 "mlot_ds/engine/ds_config.py", "mlot_ds/engine/checkpoint.py", "mlot_ds/engine/preflight.py",
                 "mlot_ds/engine/resolve.py", "mlot_ds/engine/setup.py", "mlot_ds/teachers/loading.py",
                 "mlot_ds/teachers/cache.py", "mlot_ds/zoo/gguf.py", "mlot_ds/zoo/packaged.py"]
# Raised and caught inside one module (a bad row becomes a DataError or a skip by the policy).
CAUGHT_WHERE_RAISED = {"_RowProblem"}
# Invariants of the package's own calls (a bug, which keeps its traceback), by their message.
INTERNAL_INVARIANTS = ("a cached teacher needs the batch's record_ids", "a filler row has pairs")


def test_every_raise_in_the_input_checking_code_is_a_one_line_error():
    import importlib

    offenders = []
    for relative in INPUT_MODULES:
        path = REPO / relative
        module = importlib.import_module(relative[:-3].replace("/", "."))
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Raise) or node.exc is None:
                continue
            call = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            name = call.attr if isinstance(call, ast.Attribute) else getattr(call, "id", None)
            if name in (None, "exc", "failure", "error") or name in CAUGHT_WHERE_RAISED:  # re-raised BadInput
                continue
            cls = getattr(module, name, None)
            if cls is None:
                for attribute in ("cache", "outputs", "checkpoint"):
                    cls = getattr(getattr(module, attribute, None), name, None) or cls
            internal = any(text in ast.get_source_segment(path.read_text(), node) for text in INTERNAL_INVARIANTS)
            if not internal and not (isinstance(cls, type) and issubclass(cls, BadInput)):
                offenders.append(f"{relative}:{node.lineno}: raise {name}")
    assert offenders == []
