"""End to end on the tiny zoo: build an offline teacher cache (interrupted on 1 rank, finished on 2
ranks in lockstep), train with three cached teachers and one live one, and compare with an all-live
run; a cache built for other loss settings is refused with a message naming what differs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from mlot_ds.config import DEFAULT_RECIPE
from tests.helpers import REPO, job_env, run_job, tiny_recipe_overrides

pytestmark = [pytest.mark.slow]

ZERO3 = str(REPO / "ds_configs" / "zero3.json")
CACHED = ("llama", "qwen", "opt")
TEACHERS = CACHED + ("llama_live",)


def recipe(tmp: Path) -> Path:
    """The demo with MultiLevelOT (llama), ULD (qwen), MinED (opt) teachers, plus a fourth, always
    live teacher (llama's model again, MultiLevelOT), and dynamic weights (the gold CE is cached too)."""
    raw = yaml.safe_load(DEFAULT_RECIPE.read_text())
    llama, qwen, opt = raw["teachers"]
    qwen["loss"] = {"kind": "uld", "cache_head": 100000}
    opt.update(pairing="dtw", loss={"kind": "mined"})
    raw["teachers"].append(dict(llama, name="llama_live", loss={"kind": "mlot", "preset": "paper"}))
    raw["weighting"] = {"mode": "dynamic", "normalize": True, "temperature": 1.0}
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def overrides(tmp: Path, out: str, **extra) -> list[str]:
    return tiny_recipe_overrides(tmp / out, **{"train.max_steps": 3, "data.eval": "null", "export.enabled": "false",
                                               "data.cache_dir": str(tmp / "cache"), **extra})


def metrics(out: Path) -> dict[int, dict]:
    rows = {}
    for line in (out / "tensorboard" / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows.setdefault(row["step"], {}).update(row)
    return rows


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_zoo):
    tmp = tmp_path_factory.mktemp("teacher-cache")
    env = job_env(tiny_zoo)
    base = ["--recipe", str(recipe(tmp))]
    tool = [str(REPO / "tools" / "cache_teachers.py"), *base, "--teachers", ",".join(CACHED), "--chunk-records", "8",
            *overrides(tmp, "build")]
    first = run_job([sys.executable, *tool, "--max-chunks", "1"], env, tmp / "build1.log")
    assert first.returncode == 0, first.log_text[-3000:]
    first_chunk = tmp / "cache" / "teachers" / "llama" / "chunk-00000.safetensors"
    stamp = first_chunk.stat().st_mtime_ns
    from tests.helpers import free_port

    second = run_job([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
                      str(free_port()), *tool], env, tmp / "build2.log")
    assert second.returncode == 0, second.log_text[-3000:]
    live = run_job([sys.executable, str(REPO / "launch" / "train.py"), "--config", ZERO3, *base, *overrides(tmp, "live")],
                   env, tmp / "live.log")
    assert live.returncode == 0, live.log_text[-3000:]
    sources = {f"teachers.{name}.source": "cache" for name in CACHED}
    cached = run_job([sys.executable, str(REPO / "launch" / "train.py"), "--config", ZERO3, *base,
                      *overrides(tmp, "cached", **sources)], env, tmp / "cached.log")
    assert cached.returncode == 0, cached.log_text[-3000:]
    return {"tmp": tmp, "env": env, "base": base, "first": first.log_text, "second": second.log_text,
            "first_chunk_unchanged": first_chunk.stat().st_mtime_ns == stamp}


def test_an_interrupted_build_resumes_with_the_missing_chunks_on_two_ranks(runs):
    for name in CACHED:
        assert f"{name}: built 1 chunk(s), 2 left" in runs["first"]
        assert f"{name}: built 2 chunk(s), 0 left" in runs["second"]
    assert runs["first_chunk_unchanged"]
    manifest = json.loads((runs["tmp"] / "cache" / "teachers" / "opt" / "manifest.json").read_text())
    assert set(manifest["binding"]) == {"checkpoint", "tokenizer", "template", "data", "pairing", "loss"}
    assert manifest["binding"]["loss"]["kind"] == "mined" and manifest["num_chunks"] == 3


def test_cached_teachers_give_the_live_losses_to_bf16_precision(runs):
    live, cached = metrics(runs["tmp"] / "live"), metrics(runs["tmp"] / "cached")
    keys = ["train/loss", "train/ce", "teacher/llama/had", "teacher/llama/sl", "teacher/llama/sd", "teacher/qwen/uld",
            "teacher/opt/mined", "teacher/llama_live/sd"] + [f"teacher/{t}/weight" for t in TEACHERS]
    for step in (1, 2, 3):
        for key in keys:
            assert cached[step][key] == pytest.approx(live[step][key], rel=3e-3), (step, key)
    # Dynamic weights moved away from the priors, from the cached gold CE.
    assert cached[3]["teacher/opt/weight"] != pytest.approx(0.25)


def test_a_cache_built_for_other_settings_is_refused_naming_what_differs(runs, tiny_zoo):
    from mlot_ds.config import RecipeError, load_recipe
    from mlot_ds.engine.setup import build_methods, prepare_inputs
    from mlot_ds.teachers.cache import TeacherCacheError, open_caches

    tmp = runs["tmp"]
    changed = {"teachers.llama.source": "cache", "teachers.llama.loss.k": 20,
               "teachers.qwen.source": "cache", "teachers.qwen.append_eos": True, "zoo.cache_dir": str(tiny_zoo)}
    recipe_ = load_recipe(runs["base"][1], overrides(tmp, "refused", **changed))
    inputs = prepare_inputs(recipe_, progress=False)
    with pytest.raises(TeacherCacheError) as error:
        open_caches(recipe_, inputs, inputs.methods)
    message = str(error.value)
    assert isinstance(error.value, RecipeError)  # the command line reports it as bad input (exit status 2)
    assert message.startswith("teachers[0]: the teacher cache") and "differs: loss (cache: {'kind': 'mlot', 'k': 50" in message
    assert "'k': 20" in message and "checkpoint" not in message
    import dataclasses

    recipe_.teachers[0].loss.params = dataclasses.replace(recipe_.teachers[0].loss.params, k=50)
    methods = build_methods(recipe_, inputs)
    with pytest.raises(TeacherCacheError, match=r"teachers\[1\]: .* differs: template \(cache: \{.*'append_eos': False"):
        open_caches(recipe_, inputs, methods)
