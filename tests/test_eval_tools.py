"""tools/evaluate.py on an exported folder and on a checkpoint; tools/generate_teacher_responses.py
round trip through the jsonl adapter and a recipe."""

from __future__ import annotations

import importlib.util
import json
import re
import socket
import subprocess
import sys

import pytest

from tests.helpers import REPO, job_env, run_job, tiny_recipe_overrides

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tool(name: str, args: list, zoo, tmp_path, label: str) -> subprocess.CompletedProcess:
    return run_job([sys.executable, str(REPO / "tools" / name), *map(str, args)], job_env(zoo),
                   tmp_path / f"{label}.log", timeout=300)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_zoo):
    """A 4-step single-process run of the demo on the tiny zoo, with its checkpoint and export."""
    tmp = tmp_path_factory.mktemp("eval-tools")
    out = tmp / "run"
    overrides = tiny_recipe_overrides(out, **{"train.max_steps": 4})
    result = run_job([sys.executable, str(REPO / "launch" / "train.py"), "--config", str(REPO / "ds_configs" / "zero3.json"),
                      *overrides], job_env(tiny_zoo, MASTER_PORT=str(free_port())), tmp / "train.log", timeout=600)
    assert result.returncode == 0, result.log_text[-3000:]
    return out


def read_report(path):
    report = json.loads(path.read_text())
    for key in ("model", "source", "adapter", "path", "n_records", "metrics", "bits_per_byte", "settings",
                "command", "timings", "predictions"):
        assert key in report, key
    return report


def recomputed_rouge(report) -> float:
    """Mean over records of the best ROUGE-LSum over references, with rouge-score called directly."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeLsum"], use_stemmer=True)

    def lines(text):
        return "\n".join(part for part in re.split(r"(?<=[.!?])\s+", text.strip()) if part)

    scores = [max(scorer.score(lines(ref), lines(row["prediction"]))["rougeLsum"].fmeasure for ref in row["references"])
              for row in report["predictions"]]
    return 100 * sum(scores) / len(scores)


def test_evaluate_an_export_and_its_checkpoint_agree(trained, tiny_zoo, tmp_path):
    common = ["--adapter", "dialogsum", "--path", "builtin:dialogsum/test", "--limit", 5, "--max-new-tokens", 6,
              "--batch-size", 2, "--max-length", 160]
    export = tool("evaluate.py", [trained / "export", *common, "--out", tmp_path / "export.json"], tiny_zoo, tmp_path, "export")
    assert export.returncode == 0, export.log_text[-3000:]
    checkpoint = tool("evaluate.py", [trained / "checkpoints", *common, "--out", tmp_path / "ckpt.json"], tiny_zoo,
                      tmp_path, "ckpt")
    assert checkpoint.returncode == 0, checkpoint.log_text[-3000:]
    from_export, from_checkpoint = read_report(tmp_path / "export.json"), read_report(tmp_path / "ckpt.json")
    assert from_export["source"] == "model_folder" and from_checkpoint["source"] == "checkpoint:step_00000004"
    assert from_export["n_records"] == from_checkpoint["n_records"] == 5
    # The export is the consolidated checkpoint: same weights, same settings, same numbers.
    assert from_checkpoint["bits_per_byte"] == pytest.approx(from_export["bits_per_byte"], rel=1e-5)
    for report in (from_export, from_checkpoint):
        assert report["metrics"]["eval/rouge_lsum"] == pytest.approx(recomputed_rouge(report), abs=1e-9)
        assert len(report["predictions"]) == 5 and len(report["predictions"][0]["references"]) == 3


def test_evaluate_bad_paths_fail_with_one_clear_error(tiny_zoo, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("evaluate_tool", REPO / "tools" / "evaluate.py")
    evaluate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate)
    test_set = ["--adapter", "dialogsum", "--path", "builtin:dialogsum/test"]

    assert evaluate.main([str(tmp_path / "nope"), *test_set]) == 2
    assert f"{tmp_path / 'nope'}: no such file or folder" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert evaluate.main([str(empty), *test_set]) == 2
    assert "neither a model folder" in capsys.readouterr().err
    from mlot_ds.zoo import ZooSettings, zoo_member_path

    student = zoo_member_path("student", ZooSettings(profile="tiny"), cache_dir=tiny_zoo)
    assert evaluate.main([str(student), "--adapter", "dialogsum", "--path", str(tmp_path / "missing.jsonl")]) == 2
    assert f"--path: no such file or folder: {tmp_path / 'missing.jsonl'}" in capsys.readouterr().err
    assert evaluate.main([str(student), *test_set, "--limit", "0"]) == 2
    assert "--limit must be >= 1" in capsys.readouterr().err


def test_teacher_responses_round_trip_through_the_jsonl_adapter_and_a_recipe(tiny_zoo, tmp_path, monkeypatch):
    from mlot_ds.zoo import ZooSettings, zoo_member_path

    teacher = zoo_member_path("teacher-qwen", ZooSettings(profile="tiny"), cache_dir=tiny_zoo)
    out = tmp_path / "qwen.jsonl"
    result = tool("generate_teacher_responses.py", ["--model", teacher, "--adapter", "dialogsum", "--path",
                                                    "builtin:dialogsum/test", "--limit", 6, "--max-new-tokens", 5,
                                                    "--out", out], tiny_zoo, tmp_path, "gen")
    assert result.returncode == 0, result.log_text[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and all(set(row) == {"prompt", "response", "references", "written_by"} for row in rows)

    from mlot_ds.config import load_recipe
    from mlot_ds.data import load_records
    from mlot_ds.engine.setup import prepare_inputs

    gold = {r.prompt: r for r in load_records("dialogsum", REPO / "mlot_ds" / "data" / "corpus" / "dialogsum.test.jsonl").records}
    records = load_records("jsonl", out).records
    assert len(records) == len(rows)
    for record, row in zip(records, rows):
        assert record.response == row["response"] and record.response
        assert record.references == gold[record.prompt].references  # the gold summaries, all three
    monkeypatch.setenv("MLOT_DS_CACHE", str(tiny_zoo))
    recipe = load_recipe(None, ["zoo.profile=tiny", f"train.output_dir={tmp_path / 'run'}", "data.train.adapter=jsonl",
                                f"data.train.path={out}"])
    inputs = prepare_inputs(recipe, check_only=True)
    assert inputs.student_tokenizer is not None  # the tiny zoo exists, so the dry run read everything
