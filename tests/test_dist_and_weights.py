"""SLURM environment mapping, node-list parsing and the per-teacher weighting rules."""

from __future__ import annotations

import math

import pytest

from mlot_ds.dist import first_slurm_host, map_slurm_environment
from mlot_ds.engine.weights import TeacherWeights


@pytest.mark.parametrize("nodelist,first", [
    ("node07", "node07"),
    ("node[03-05,07],gpu1", "node03"),
    ("a,b,c", "a"),
    ("gpu-[12,14]", "gpu-12"),
    ("host[001-004]", "host001"),
])
def test_first_slurm_host(nodelist, first):
    assert first_slurm_host(nodelist) == first


def test_srun_variables_are_mapped_to_torch_variables():
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
           "SLURM_JOB_NODELIST": "n[10-11]", "SLURM_JOB_ID": "4242"}
    set_values = map_slurm_environment(env)
    assert env["RANK"] == "3" and env["WORLD_SIZE"] == "8" and env["LOCAL_RANK"] == "1"
    assert env["MASTER_ADDR"] == "n10"
    assert env["MASTER_PORT"] == str(29500 + 4242 % 1000)
    assert set(set_values) == {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}


def test_launcher_variables_win_over_slurm():
    # The DeepSpeed launcher (one per node under srun) already set RANK/WORLD_SIZE: leave them alone.
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "1",
           "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234"}
    assert map_slurm_environment(env) == {}
    assert env["RANK"] == "5" and env["WORLD_SIZE"] == "16" and env["MASTER_ADDR"] == "10.0.0.1"


def test_outside_slurm_nothing_is_set():
    env = {"HOME": "/root"}
    assert map_slurm_environment(env) == {}
    assert "RANK" not in env


def test_static_weights_normalised_or_raw():
    normalised = TeacherWeights(["a", "b", "c"], [1.0, 1.0, 2.0], "static", True, 1.0)
    assert normalised.current == pytest.approx({"a": 0.25, "b": 0.25, "c": 0.5})
    raw = TeacherWeights(["a", "b"], [1.0, 3.0], "static", False, 1.0)
    assert raw.current == {"a": 1.0, "b": 3.0}
    raw.update({"a": 1.0, "b": 1.0}, {"a": 1.0, "b": 1.0})  # static ignores statistics
    assert raw.current == {"a": 1.0, "b": 3.0}


def test_dynamic_weights_are_a_softmin_of_teacher_ce():
    weights = TeacherWeights(["a", "b", "c"], [1.0, 1.0, 2.0], "dynamic", True, 0.5)
    assert weights.current == pytest.approx({"a": 0.25, "b": 0.25, "c": 0.5})  # step 0: priors
    ce_sum = {"a": 20.0, "b": 30.0, "c": 40.0}
    ce_tokens = {"a": 10.0, "b": 10.0, "c": 10.0}  # 2, 3, 4 nats/token
    weights.update(ce_sum, ce_tokens)
    raw = {"a": 1.0 * math.exp(-2 / 0.5), "b": 1.0 * math.exp(-3 / 0.5), "c": 2.0 * math.exp(-4 / 0.5)}
    total = sum(raw.values())
    assert weights.current == pytest.approx({k: v / total for k, v in raw.items()}, rel=1e-12)
    assert sum(weights.current.values()) == pytest.approx(1.0)


def test_dynamic_weights_survive_a_state_round_trip():
    first = TeacherWeights(["a", "b"], [1.0, 1.0], "dynamic", True, 1.0)
    first.update({"a": 5.0, "b": 9.0}, {"a": 4.0, "b": 4.0})
    second = TeacherWeights(["a", "b"], [1.0, 1.0], "dynamic", True, 1.0)
    second.load_state_dict(first.state_dict())
    assert second.current == first.current
