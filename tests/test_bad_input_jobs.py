"""Bad input and non-finite steps in real jobs: one line on two ranks, a skip that needs no scheduler,
and a log without DeepSpeed's deprecation noise."""

from __future__ import annotations

import json
import os

import pytest

from tests.helpers import REPO, deepspeed_command, free_port, job_env, metrics, run_job, tiny_recipe_overrides

pytestmark = [pytest.mark.slow, pytest.mark.multirank]
ZERO3 = str(REPO / "ds_configs" / "zero3.json")


def test_a_bad_input_on_two_ranks_is_one_line_and_exit_2(tmp_path, tiny_zoo):
    occupied = tmp_path / "occupied.txt"
    occupied.write_text("not a folder\n")
    for label, overrides in (("before start-up", ["train.lr=nan"]),
                             ("after start-up", [f"train.output_dir={occupied}"])):
        log = tmp_path / f"{label.replace(' ', '-')}.log"
        result = run_job(deepspeed_command(2, ["--config", ZERO3, *tiny_recipe_overrides(tmp_path / "run"), *overrides],
                                           free_port()), job_env(tiny_zoo), log)
        errors = [line for line in result.log_text.splitlines() if "error:" in line]
        assert result.returncode == 2, (label, result.log_text[-2000:])
        assert len(errors) == 1 and "Traceback" not in result.log_text, (label, errors)
    assert occupied.read_text() == "not a folder\n"


def test_a_non_finite_step_is_skipped_without_a_scheduler(tmp_path, tiny_zoo):
    """Step 2 has a NaN loss: its update is skipped (weights after step 2 equal those after step 1),
    the learning rate stays as configured (no scheduler to restore it), and step 3 trains."""
    from mlot_ds.engine.checkpoint import consolidate

    config = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    del config["scheduler"]
    ds_json = tmp_path / "no_scheduler.json"
    ds_json.write_text(json.dumps(config))
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import mlot_ds.engine.trainer as t\n"
        "original = t.Trainer.train_step\n"
        "def poisoned(self, step):\n"
        "    if step == 1:\n"
        "        self.recipe.train.ce_weight = float('nan')\n"
        "    try:\n"
        "        return original(self, step)\n"
        "    finally:\n"
        "        self.recipe.train.ce_weight = 1.0\n"
        "t.Trainer.train_step = poisoned\n"
    )
    out = tmp_path / "run"
    overrides = tiny_recipe_overrides(out, **{"train.max_steps": 3, "train.save_every": 1, "train.keep_last": 5,
                                              "train.lr": 1e-3, "export.enabled": "false", "data.eval": "null"})
    env = job_env(tiny_zoo, PYTHONPATH=f"{hook}{os.pathsep}{REPO}", MASTER_PORT=str(free_port()))
    import sys

    result = run_job([sys.executable, str(REPO / "launch" / "train.py"), "--config", str(ds_json), *overrides], env,
                     tmp_path / "run.log")
    assert result.returncode == 0, result.log_text[-3000:]
    rows = metrics(out)
    assert [rows[s]["train/skipped_steps"] for s in (1, 2, 3)] == [0, 1, 1]
    assert rows[3]["train/lr"] == pytest.approx(1e-3) and rows[1]["train/lr"] == pytest.approx(1e-3)
    weights = {}
    old = os.environ.get("MLOT_DS_CACHE")
    os.environ["MLOT_DS_CACHE"] = str(tiny_zoo)
    try:
        for step in (1, 2, 3):
            model, _, _ = consolidate(out / "checkpoints" / f"step_{step:08d}")
            weights[step] = {name: p.detach().clone() for name, p in model.state_dict().items()}
    finally:
        if old is None:
            os.environ.pop("MLOT_DS_CACHE")
        else:
            os.environ["MLOT_DS_CACHE"] = old
    import torch

    assert all(torch.equal(weights[1][n], weights[2][n]) for n in weights[1])  # the skipped update
    assert any(not torch.equal(weights[2][n], weights[3][n]) for n in weights[2])  # training went on
    assert "is deprecated" not in result.log_text  # DeepSpeed's FutureWarnings are filtered
