"""Real DeepSpeed jobs of the methods with trainable modules, all three in one run (issue 16): DSKD on
qwen, EMO on llama (dtw pairing), ALM with its hidden-state term on opt.

One set of jobs serves every test here (a job costs its start-up, not its steps): 2 ranks == 1 rank x 2
accumulation steps == every teacher from an offline cache; an exact resume with the modules on 2 ranks
and re-sharded onto 1; the export without the modules and the ``projectors/`` folder beside it; a resume
with other modules refused; a non-finite step skipping the modules' update too. The methods' own
float64, gradient and cache tests are in ``test_method_dskd.py``, ``test_method_emo.py`` and
``test_features_alm_latents.py``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from mlot_ds.engine import modules as trainable
from mlot_ds.teachers import cache
from tests.helpers import REPO, ZERO3, deepspeed_command, free_port, job_env, metrics, run_job, tiny_recipe_overrides

pytestmark = [pytest.mark.slow, pytest.mark.multirank]

LOSSES = {"teachers.qwen.loss": "{kind: dskd}", "teachers.llama.loss": "{kind: emo}", "teachers.llama.pairing": "dtw",
          "teachers.opt.loss": "{kind: alm, latents: true}"}
RUN = {**LOSSES, "train.max_steps": 4, "train.save_every": 2, "data.eval": "null", "train.lr": 5e-4}
KEYS = ["train/loss", "train/ce",
        "teacher/qwen/t2s_ce", "teacher/qwen/t2s_kd", "teacher/qwen/s2t_kd", "teacher/qwen/kd",
        "teacher/llama/ira", "teacher/llama/otis", "teacher/llama/kd",
        "teacher/opt/alm", "teacher/opt/latents", "teacher/opt/kd"]
MODULES = {"llama": ("t2s",), "qwen": ("query", "t2s", "s2t"), "opt": ("latents",)}
DESCRIBED = ("llama.t2s [32 -> 16], qwen.query [32 -> 64], qwen.t2s [32 -> 16], qwen.s2t [16 -> 32], "
             "opt.latents [16 -> 32]")


@pytest.fixture(scope="module")
def jobs(tmp_path_factory, tiny_zoo):
    """2 ranks (checkpoints at steps 2 and 4, export), 1 rank x 2 accumulation steps, the same with every
    teacher from an offline cache built by tools/cache_teachers.py, and the 2-rank step-2 checkpoint
    resumed on 2 ranks and re-sharded onto 1."""
    tmp = tmp_path_factory.mktemp("projectors")
    shared = {**RUN, "data.cache_dir": str(tmp / "cache")}

    def train(name, ranks, **extra):
        command = deepspeed_command(ranks, ["--config", ZERO3, *tiny_recipe_overrides(tmp / name, **shared, **extra)],
                                    free_port())
        result = run_job(command, job_env(tiny_zoo), tmp / f"{name}.log")
        assert result.returncode == 0, result.log_text[-4000:]
        return result

    out = {"tmp": tmp}
    out["two"] = train("two", 2)
    out["one"] = train("one", 1, **{"train.grad_accum": 2, "export.enabled": "false"})
    tool = [sys.executable, str(REPO / "tools" / "cache_teachers.py"), "--chunk-records", "8",
            *tiny_recipe_overrides(tmp / "build", **shared)]
    built = run_job(tool, job_env(tiny_zoo), tmp / "build.log")
    assert built.returncode == 0, built.log_text[-4000:]
    from_cache = {f"teachers.{name}.source": "cache" for name in MODULES}
    out["cached"] = train("cached", 1, **{"train.grad_accum": 2, "export.enabled": "false", **from_cache})
    for name, ranks, extra in (("resumed", 2, {}), ("resharded", 1, {"train.grad_accum": 2})):
        shutil.copytree(tmp / "two" / "checkpoints" / "step_00000002", tmp / name / "checkpoints" / "step_00000002")
        out[name] = train(name, ranks, **{"export.enabled": "false", **extra})
        assert "at step 2" in out[name].log_text
    return out


def test_two_ranks_equal_one_rank_and_the_cache_equals_live(jobs):
    two, one, cached = (metrics(jobs["tmp"] / name) for name in ("two", "one", "cached"))
    assert sorted(two) == [1, 2, 3, 4]
    assert f"trainable modules: {DESCRIBED}" in jobs["two"].log_text
    # t2s_kd needs rows where the projected teacher predicts the label: at this size only a few, early on
    assert two[1]["teacher/qwen/t2s_kd"] > 0
    for step in (1, 2, 3, 4):
        for key in ("teacher/qwen/t2s_ce", "teacher/qwen/s2t_kd", "teacher/llama/ira", "teacher/llama/otis",
                    "teacher/opt/alm", "teacher/opt/latents"):
            assert two[step][key] > 0 and math.isfinite(two[step][key]), (step, key)
        for key in KEYS:
            assert two[step][key] == pytest.approx(one[step][key], rel=1e-5, abs=1e-7), (step, key)
            assert cached[step][key] == pytest.approx(one[step][key], rel=1e-5, abs=1e-7), ("cache", step, key)
    # DSKD's cache holds the teacher's output layer once, and the rows in the model's dtype (float32 here)
    folder = jobs["tmp"] / "cache" / "teachers" / "qwen"
    assert (folder / cache.CONSTANTS).is_file()
    from safetensors import safe_open

    with safe_open(str(cache.chunk_path(folder, 0)), framework="pt") as handle:
        assert handle.get_slice("row.keys").get_dtype() == "F32" and handle.get_slice("row.keys").get_shape()[1] == 64


def test_a_resume_with_the_modules_is_exact_on_two_ranks_and_resharded_on_one(jobs):
    reference = metrics(jobs["tmp"] / "two")
    for name in ("resumed", "resharded"):
        after = metrics(jobs["tmp"] / name)
        for step in (3, 4):
            for key in KEYS:
                assert after[step][key] == pytest.approx(reference[step][key], rel=1e-5, abs=1e-7), (name, step, key)
    assert "was saved by 2 ranks, this run has 1" in jobs["resharded"].log_text
    folder = jobs["tmp"] / "two" / "checkpoints" / "step_00000002"
    saved = json.loads((folder / "modules.json").read_text())["modules"]
    assert {teacher: tuple(modules) for teacher, modules in saved.items()} == MODULES
    # The student's group at train.lr; the projectors' at projector_lr 1e-3 (DSKD, EMO) and ALM's at
    # latents_lr_scale 2 x train.lr (the schedule is flat without warmup).
    for shard in folder.glob("*optim_states.pt"):
        state = torch.load(shard, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        assert [g["lr"] for g in state["optimizer_state_dict"]["param_groups"]] == pytest.approx([5e-4] + [1e-3] * 5)


def test_the_export_holds_the_student_alone_and_the_projectors_beside_it(jobs, tiny_zoo, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    run = jobs["tmp"] / "two"
    exported = load_file(run / "export" / "model.safetensors")
    assert not any(trainable.MODULES_ATTR in key for key in exported)
    AutoModelForCausalLM.from_pretrained(run / "export", local_files_only=True)
    projectors = load_file(run / "projectors" / trainable.PROJECTORS_WEIGHTS)
    assert sorted(projectors) == sorted(f"{teacher}.{m}.{p}" for teacher, names in MODULES.items() for m in names
                                        for p in ("bias", "weight"))
    assert projectors["qwen.query.weight"].shape == (64, 32) and projectors["opt.latents.weight"].shape == (32, 16)
    manifest = json.loads((run / "projectors" / trainable.PROJECTORS_MANIFEST).read_text())
    assert manifest["export"] == "export" and manifest["modules"]["qwen"]["t2s"]["lr"] == 1e-3
    # every module was trained in the ZeRO-3 job (each moved away from its seeded initialisation, train.seed 42)
    initial = trainable.build_modules(manifest["modules"], seed=42, dtype=torch.float32)
    for teacher, names in MODULES.items():
        for name in names:
            moved = (projectors[f"{teacher}.{name}.weight"].float() - initial[teacher][name].weight).abs().max().item()
            assert 1e-6 < moved < 0.1, (teacher, name, moved)
    # the export tool gives the same two folders from the final checkpoint
    out = tmp_path / "tool" / "student"
    result = subprocess.run([sys.executable, str(REPO / "tools" / "export_hf.py"), str(run / "checkpoints"), str(out)],
                            env=job_env(tiny_zoo), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    offline = load_file(out / "model.safetensors")
    assert offline.keys() == exported.keys()
    assert all(torch.equal(offline[k], exported[k]) for k in exported)
    tool_projectors = load_file(tmp_path / "tool" / "projectors" / trainable.PROJECTORS_WEIGHTS)
    assert tool_projectors.keys() == projectors.keys()
    assert all(torch.equal(tool_projectors[k], projectors[k]) for k in projectors)


def test_a_resume_with_other_modules_is_refused_with_one_line(jobs, tiny_zoo):
    tmp = jobs["tmp"]
    target = tmp / "other" / "checkpoints" / "step_00000002"
    shutil.copytree(tmp / "two" / "checkpoints" / "step_00000002", target)
    # qwen moves to MultiLevelOT: llama's and opt's modules stay, DSKD's three are gone
    overrides = tiny_recipe_overrides(tmp / "other", **{**RUN, "teachers.qwen.loss": "{kind: mlot}",
                                                        "train.allow_teacher_change": "true"})
    result = run_job(deepspeed_command(1, ["--config", ZERO3, *overrides], free_port()), job_env(tiny_zoo),
                     tmp / "other.log")
    assert result.returncode == 2, result.log_text[-3000:]
    assert result.log_text.count("error:") == 1
    assert (f"saved with trainable modules {DESCRIBED}, but this run's losses declare llama.t2s [32 -> 16], "
            f"opt.latents [16 -> 32]") in result.log_text


def test_a_non_finite_step_skips_the_modules_too(tiny_zoo, tmp_path):
    """Rank 1 alone has a NaN loss in step 2: every rank backpropagates NaN into the student and every
    module (no rank waits for a gradient the other never sends), ZeRO-3 skips that update, and the run
    goes on."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == '1':\n"
        "    import mlot_ds.engine.trainer as t\n"
        "    original = t.Trainer.train_step\n"
        "    def poisoned(self, step):\n"
        "        if step == 1:\n"
        "            self.recipe.train.ce_weight = float('nan')\n"
        "        try:\n"
        "            return original(self, step)\n"
        "        finally:\n"
        "            self.recipe.train.ce_weight = 1.0\n"
        "    t.Trainer.train_step = poisoned\n"
    )
    out = tmp_path / "nan"
    overrides = tiny_recipe_overrides(out, **{**RUN, "train.max_steps": 3, "train.save_every": 0,
                                              "export.enabled": "false"})
    env = job_env(tiny_zoo, PYTHONPATH=f"{hook}{os.pathsep}{REPO}")
    result = run_job(deepspeed_command(2, ["--config", ZERO3, *overrides], free_port()), env, tmp_path / "nan.log",
                     timeout=400)
    assert result.returncode == 0, result.log_text[-3000:]
    rows = metrics(out)
    assert [rows[s]["train/skipped_steps"] for s in (1, 2, 3)] == [0, 1, 1]
    for step in (1, 3):
        assert all(math.isfinite(rows[step][key]) for key in KEYS), step
