"""Real multi-process DeepSpeed ZeRO-3 runs on the CPU (gloo), with three tiny teachers whose
tokenizers all differ from the student's.

These are the slowest tests of the suite: each job starts real ranks. Runs are shared between
tests through module-scoped fixtures, so each job runs once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import REPO, deepspeed_command, free_port, job_env, metrics, run_job, tiny_recipe_overrides

pytestmark = [pytest.mark.slow, pytest.mark.multirank]

ZERO3 = str(REPO / "ds_configs" / "zero3.json")
TAGS_PER_TEACHER = ("had", "sl", "sd", "kd", "weight")
TEACHERS = ("llama", "qwen", "opt")
# The reference runs also exercise per-token ranking (chunked teacher head) and a recipe term weight.
REFERENCE_LOSS = {"teachers.opt.loss.ranking": "token", "teachers.opt.loss.weights.sd": 0.05}


def train(tmp: Path, name: str, ranks: int, zoo: Path, timeout: float = 600, **overrides):
    out = tmp / name
    command = deepspeed_command(ranks, ["--config", ZERO3, *tiny_recipe_overrides(out, **overrides)], free_port())
    result = run_job(command, job_env(zoo), tmp / f"{name}.log", timeout=timeout)
    return out, result


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_zoo):
    """Two-rank reference run (6 steps, odd record count), and the same global batch on one rank."""
    tmp = tmp_path_factory.mktemp("engine")
    two, result_two = train(tmp, "two_ranks", 2, tiny_zoo, **REFERENCE_LOSS, **{
        "train.save_every": 3, "eval.every": 3, "eval.best_metric": "eval/bits_per_byte"})
    assert result_two.returncode == 0, result_two.log_text[-4000:]
    one, result_one = train(tmp, "one_rank", 1, tiny_zoo, **REFERENCE_LOSS, **{"train.grad_accum": 2, "train.max_steps": 5,
                                                             "export.enabled": "false", "data.eval": "null"})
    assert result_one.returncode == 0, result_one.log_text[-4000:]
    return {"tmp": tmp, "two": two, "one": one, "log_two": result_two.log_text}


def test_two_ranks_equal_one_rank_at_the_same_global_batch(runs):
    two, one = metrics(runs["two"]), metrics(runs["one"])
    for step in range(1, 6):
        for key in ["train/loss", "train/ce"] + [f"teacher/{t}/{term}" for t in TEACHERS for term in ("had", "sl", "sd")]:
            assert two[step][key] == pytest.approx(one[step][key], rel=1e-5, abs=1e-7), (step, key)


def test_each_teacher_kd_is_its_term_weights_times_its_terms(runs):
    """kd = sum_term weight * term: the preset's weights, with opt's SD weight replaced by the recipe's."""
    from mlot_ds.losses import PRESETS

    preset = dict(PRESETS["default"].weights)
    expected_weights = {"llama": preset, "qwen": preset, "opt": {**preset, "sd": 0.05}}
    for step, row in metrics(runs["two"]).items():
        if "train/loss" not in row:
            continue
        for name, weights in expected_weights.items():
            expected = sum(weight * row[f"teacher/{name}/{term}"] for term, weight in weights.items())
            assert row[f"teacher/{name}/kd"] == pytest.approx(expected, rel=1e-5), (step, name)


def test_an_odd_record_count_on_two_ranks_finishes(runs):
    # 21 records, global batch 4: step 6 holds one real record and three filler rows.
    rows = metrics(runs["two"])
    assert sorted(rows) == [1, 2, 3, 4, 5, 6]
    assert "done in" in runs["log_two"]


def test_every_tag_is_in_the_tensorboard_events(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(runs["two"] / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {"train/loss", "train/ce", "train/lr", "train/grad_norm", "train/tokens_per_s"}
    expected |= {f"teacher/{t}/{term}" for t in TEACHERS for term in TAGS_PER_TEACHER}
    assert expected <= tags, expected - tags
    steps = [event.step for event in events.Scalars("train/loss")]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert any("eval/" in tag for tag in tags)


def test_each_evaluation_writes_its_predictions_and_shows_samples(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = metrics(runs["two"])
    for step in (3, 6):  # eval.every = 3, and the final evaluation
        lines = [json.loads(line) for line in (runs["two"] / "eval" / f"step_{step:08d}.jsonl").read_text().splitlines()]
        records, footer = lines[:-1], lines[-1]
        assert len(records) == 4 and [r["id"] for r in records] == [0, 1, 2, 3]  # eval.limit = 4
        assert all(isinstance(r["prediction"], str) and len(r["references"]) == 3 and r["prompt"] for r in records)
        assert footer["metrics"]["eval/rouge_lsum"] == pytest.approx(rows[step]["eval/rouge_lsum"])
    assert not list((runs["two"] / "eval").glob("*.partial"))
    events = EventAccumulator(str(runs["two"] / "tensorboard"))
    events.Reload()
    samples = [tag for tag in events.Tags()["tensors"] if tag.startswith("eval/samples")]
    assert samples, events.Tags()["tensors"]
    text = events.Tensors(samples[0])[-1].tensor_proto.string_val[0].decode()
    assert "prediction:" in text and "reference:" in text and text.count("**record") == 4


def test_a_real_tensorboard_serves_the_logs_on_localhost(runs):
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(runs["two"] / "tensorboard"),
                               "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 90
        body = None
        while time.time() < deadline and body is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/plugin/scalars/tags", timeout=5) as reply:
                    body = json.loads(reply.read())
            except OSError:
                time.sleep(1)
        assert body is not None, "tensorboard did not answer"
        served = {tag for run in body.values() for tag in run}
        assert "teacher/qwen/sd" in served and "train/loss" in served
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_the_exported_student_loads_and_generates(runs):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export = runs["two"] / "export"
    assert (export / "model.safetensors").is_file()
    assert not list(export.glob("*.bin"))
    model = AutoModelForCausalLM.from_pretrained(export, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(export, local_files_only=True)
    inputs = tokenizer("Summarize the dialogue.\n#Person1#: Hello.\nSummary:\n", return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert output.shape[1] > inputs["input_ids"].shape[1]


def test_checkpoint_holds_student_state_manifest_and_latest_pointer(runs):
    root = runs["two"] / "checkpoints"
    latest = (root / "latest").read_text().strip()
    assert latest == "step_00000006"
    folder = root / latest
    assert (folder / "COMPLETE").is_file()
    manifest = json.loads((folder / "teachers.json").read_text())
    assert [t["name"] for t in manifest["teachers"]] == list(TEACHERS)
    assert all(len(t["tokenizer_hash"]) == 16 for t in manifest["teachers"])
    state = json.loads((folder / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    assert {p.name for p in folder.glob("rng_rank*.pt")} == {"rng_rank0.pt", "rng_rank1.pt"}
    best = (root / "best").read_text().split()
    assert best[0] == "step_00000003" and best[1] == "eval/bits_per_byte"
    assert float(best[2]) == pytest.approx(metrics(runs["two"])[3]["eval/bits_per_byte"])
    # keep_last=2: steps 3 and 6 remain; teachers' weights are not in the checkpoint.
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000003", "step_00000006"]
    # Only the student's parameters are saved: the module state names GPT-2 weights, no teacher's.
    import torch

    states = [torch.load(p, map_location="cpu", weights_only=False) for p in folder.glob("*model_states.pt")]
    assert states
    names = set().union(*(set(s.get("param_shapes", [{}])[0]) | set(s.get("module", {}) or {}) for s in states))
    assert any(name.startswith("transformer.") for name in names), sorted(names)[:5]
    assert not any(name.startswith(("model.layers", "model.decoder")) for name in names)


def _wait_for_step(out: Path, step: int, process: subprocess.Popen, timeout: float) -> None:
    path = out / "tensorboard" / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"job ended early with status {process.returncode}")
        if path.is_file() and any(json.loads(line)["step"] >= step for line in path.read_text().splitlines()):
            return
        time.sleep(0.2)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def _rank_pids(launcher_pid: int) -> list[int]:
    import psutil

    return [child.pid for child in psutil.Process(launcher_pid).children(recursive=True)
            if any(arg.startswith("--local_rank") for arg in child.cmdline())]


def test_sigkill_after_step_3_then_resume_matches_the_uninterrupted_run(runs, tiny_zoo):
    tmp = runs["tmp"]
    out = tmp / "killed"
    args = ["--config", ZERO3, *tiny_recipe_overrides(out, **REFERENCE_LOSS, **{"train.save_every": 3})]
    port = free_port()
    with open(tmp / "killed.log", "w") as log:
        process = subprocess.Popen(deepspeed_command(2, args, port), env=job_env(tiny_zoo), cwd=REPO,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_for_step(out, 3, process, timeout=400)
            deadline = time.time() + 120
            while not (out / "checkpoints" / "step_00000003" / "COMPLETE").is_file() and time.time() < deadline:
                time.sleep(0.1)
        finally:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=60)
    assert (out / "checkpoints" / "step_00000003" / "COMPLETE").is_file()
    # Even a killed job leaves none of DeepSpeed's CPU-allreduce files in /dev/shm (66 MB per rank).
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    resumed = run_job(deepspeed_command(2, args, free_port()), job_env(tiny_zoo), tmp / "resumed.log")
    assert resumed.returncode == 0, resumed.log_text[-4000:]
    assert "resumed from" in resumed.log_text and "at step 3" in resumed.log_text
    reference, after = metrics(runs["two"]), metrics(out)
    for step in (4, 5, 6):
        for key in ("train/loss", "train/ce", "teacher/llama/had", "teacher/qwen/sd", "teacher/opt/sl"):
            assert after[step][key] == pytest.approx(reference[step][key], rel=1e-6, abs=1e-8), (step, key)


def test_a_two_rank_checkpoint_resumes_on_one_rank_and_matches_the_uninterrupted_run(runs, tiny_zoo):
    """A requeued job that comes back on fewer ranks: the checkpoint is converted to DeepSpeed's
    universal format beside its own files (which stay byte for byte), and with the same global batch
    (1 rank x 2 accumulation steps) steps 4-6 equal the 2-rank run."""
    import hashlib
    import shutil

    tmp = runs["tmp"]
    source = runs["two"] / "checkpoints" / "step_00000003"
    out = tmp / "resharded"
    saved = out / "checkpoints" / source.name
    shutil.copytree(source, saved)

    def digests():
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in saved.iterdir() if p.is_file()}

    before = digests()
    args = ["--config", ZERO3, *tiny_recipe_overrides(out, **REFERENCE_LOSS, **{
        "train.grad_accum": 2, "export.enabled": "false", "data.eval": "null"})]
    result = run_job(deepspeed_command(1, args, free_port()), job_env(tiny_zoo), tmp / "resharded.log")
    assert result.returncode == 0, result.log_text[-4000:]
    assert "was saved by 2 ranks, this run has 1" in result.log_text and "at step 3" in result.log_text
    assert digests() == before and (saved / "universal" / "COMPLETE").is_file()
    assert not list(saved.parent.glob(".*"))  # no staging folder left behind
    reference, after = metrics(runs["two"]), metrics(out)
    for step in (4, 5, 6):
        for key in ["train/loss", "train/ce"] + [f"teacher/{t}/{term}" for t in TEACHERS for term in ("had", "sl", "sd")]:
            assert after[step][key] == pytest.approx(reference[step][key], rel=1e-5, abs=1e-7), (step, key)


def test_resuming_on_other_ranks_with_another_global_batch_names_the_batch_to_keep(runs, tiny_zoo):
    import shutil

    tmp = runs["tmp"]
    out = tmp / "other_batch"
    shutil.copytree(runs["two"] / "checkpoints" / "step_00000003", out / "checkpoints" / "step_00000003")
    args = ["--config", ZERO3, *tiny_recipe_overrides(out, **REFERENCE_LOSS, **{"data.eval": "null"})]
    result = run_job(deepspeed_command(1, args, free_port()), job_env(tiny_zoo), tmp / "other_batch.log")
    assert result.returncode == 2, result.log_text[-4000:]
    assert "with 1 rank keep the global batch of 4 records" in result.log_text
    assert not (out / "checkpoints" / "step_00000003" / "universal").exists()


def test_sigusr1_checkpoints_and_exits_with_the_requeue_status(runs, tiny_zoo):
    tmp = runs["tmp"]
    out = tmp / "usr1"
    args = ["--config", ZERO3, *tiny_recipe_overrides(out, **{"train.max_steps": 200, "data.train.limit": 400})]
    with open(tmp / "usr1.log", "w") as log:
        process = subprocess.Popen(deepspeed_command(2, args, free_port()), env=job_env(tiny_zoo), cwd=REPO,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_for_step(out, 2, process, timeout=400)
            ranks = _rank_pids(process.pid)
            assert len(ranks) == 2
            os.kill(ranks[0], signal.SIGUSR1)  # one rank is enough: the flag is all-reduced
            status = process.wait(timeout=180)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
    log_text = (tmp / "usr1.log").read_text()
    assert status == 75, log_text[-3000:]
    latest = (out / "checkpoints" / "latest").read_text().strip()
    step = int(latest.split("_")[1])
    assert 2 <= step < 200
    assert (out / "checkpoints" / latest / "COMPLETE").is_file()
    assert "stopped by signal" in log_text


def test_a_rank_that_raises_ends_the_job(runs, tiny_zoo, tmp_path):
    # sitecustomize makes rank 1 raise inside its second training step; the other rank is then
    # blocked in a collective and must not hang the job.
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == '1':\n"
        "    import mlot_ds.engine.trainer as t\n"
        "    original = t.Trainer.train_step\n"
        "    def failing(self, step):\n"
        "        if step == 1:\n"
        "            raise RuntimeError('injected failure on rank 1')\n"
        "        return original(self, step)\n"
        "    t.Trainer.train_step = failing\n"
    )
    out = tmp_path / "fail"
    env = job_env(tiny_zoo, PYTHONPATH=f"{hook}{os.pathsep}{REPO}")
    args = ["--config", ZERO3, *tiny_recipe_overrides(out, **{"train.dist_timeout_s": 60})]
    started = time.time()
    result = run_job(deepspeed_command(2, args, free_port()), env, tmp_path / "fail.log", timeout=400)
    assert result.returncode != 0
    assert "injected failure on rank 1" in result.log_text
    assert time.time() - started < 400


def test_mixed_losses_placements_dynamic_weights_and_nonfinite_skips(tmp_path, tiny_zoo):
    """One 2-rank job exercising the rest of the recipe surface:
    llama: MinED loss over dtw pairing, replicated; qwen: MultiLevelOT `official` preset, parameters
    offloaded; opt: ULD over position pairing; dynamic weights. Rank 1 alone produces a NaN loss in
    step 2 (skipped on both ranks) and again from step 4 on, so the run aborts after 2 consecutive
    skips with a clear message."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == '1':\n"
        "    import torch\n"
        "    import mlot_ds.engine.trainer as t\n"
        "    original = t.Trainer.train_step\n"
        "    def poisoned(self, step):\n"
        "        if step in (1, 3, 4, 5):\n"
        "            self.recipe.train.ce_weight = float('nan')\n"
        "        try:\n"
        "            return original(self, step)\n"
        "        finally:\n"
        "            self.recipe.train.ce_weight = 1.0\n"
        "    t.Trainer.train_step = poisoned\n"
    )
    out = tmp_path / "mixed"
    overrides = tiny_recipe_overrides(out, **{
        "teachers.llama.pairing": "dtw", "teachers.llama.loss": "{kind: mined}", "teachers.llama.placement": "replicate",
        "teachers.qwen.pairing": "position", "teachers.qwen.loss": "{kind: official}",
        "teachers.qwen.placement": "offload",
        "teachers.opt.pairing": "position", "teachers.opt.loss": "{kind: uld}",
        "weighting.mode": "dynamic", "weighting.temperature": 0.5, "train.max_consecutive_skips": 2,
        "export.enabled": "false", "data.eval": "null",
    })
    env = job_env(tiny_zoo, PYTHONPATH=f"{hook}{os.pathsep}{REPO}")
    result = run_job(deepspeed_command(2, ["--config", ZERO3, *overrides], free_port()), env, tmp_path / "mixed.log")
    assert result.returncode != 0
    assert "2 consecutive steps had a non-finite loss" in result.log_text
    rows = metrics(out)
    assert sorted(rows) == [1, 2, 3, 4]
    assert [rows[s]["train/skipped_steps"] for s in (1, 2, 3, 4)] == [0, 1, 1, 2]
    for step in (1, 3):
        assert rows[step]["teacher/llama/mined"] > 0
        assert rows[step]["teacher/opt/uld"] > 0
        assert all(rows[step][f"teacher/qwen/{term}"] > 0 for term in ("had", "sl", "sd"))
    weights = [[rows[s][f"teacher/{t}/weight"] for t in TEACHERS] for s in (1, 3)]
    assert weights[0] == pytest.approx([1 / 3] * 3)  # step 1: normalised priors
    assert sum(weights[1]) == pytest.approx(1.0) and weights[1] != pytest.approx([1 / 3] * 3)


def test_export_tool_consolidates_a_checkpoint_equal_to_the_in_run_export(runs, tiny_zoo, tmp_path):
    import torch
    from safetensors.torch import load_file

    out = tmp_path / "exported"
    result = subprocess.run([sys.executable, str(REPO / "tools" / "export_hf.py"), str(runs["two"] / "checkpoints"),
                             str(out)], env=job_env(tiny_zoo), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step_00000006" in result.stdout
    in_run = load_file(runs["two"] / "export" / "model.safetensors")
    offline = load_file(out / "model.safetensors")
    assert in_run.keys() == offline.keys()
    for name in in_run:
        assert torch.equal(in_run[name], offline[name]), name
    bad = subprocess.run([sys.executable, str(REPO / "tools" / "export_hf.py"), str(tmp_path / "missing"),
                          str(tmp_path / "x")], env=job_env(tiny_zoo), cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and "not a complete checkpoint" in bad.stderr
