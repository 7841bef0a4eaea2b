"""The two data tools run as a user would run them: output format and clear failures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from data_fixtures import sp_bpe_dir, unigram_dir

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "data"


def run_tool(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / name), *args], capture_output=True, text=True,
                          timeout=300, cwd=REPO)


def test_preview_data_prints_records_then_a_summary():
    result = run_tool("preview_data.py", "--adapter", "fairytaleqa", "--path", str(FIXTURES / "fairytaleqa_valid.csv"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().split("\n")
    records = [json.loads(line) for line in lines[:-1]]
    assert records[0] == {
        "prompt": "Story: there was once an old man and his wife .\nQuestion: who lived in the cottage ?\nAnswer:",
        "response": "an old man and his wife .",
        "references": ["an old man and his wife .", "the old man and the old woman ."],
    }
    assert lines[-1] == "kept 2 records, dropped 0"


def test_preview_data_generic_fields_limit_and_skip(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"q": f"question {i}", "a": f"answer {i}" if i != 1 else ""}) + "\n" for i in range(5)))
    result = run_tool(
        "preview_data.py",
        "--adapter",
        "jsonl",
        "--path",
        str(path),
        "--prompt-field",
        "q",
        "--response-field",
        "a",
        "--limit",
        "2",
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().split("\n")
    assert [json.loads(line)["response"] for line in lines[:-1]] == ["answer 0", "answer 2"]
    assert lines[-1] == "kept 2 records, dropped 1 (empty_response: 1)"
    skipped = run_tool("preview_data.py", "--adapter", "jsonl", "--path", str(FIXTURES / "bad_rows.jsonl"), "--bad-rows", "skip")
    assert skipped.stdout.strip().split("\n")[-1] == (
        "kept 2 records, dropped 6 (empty_response: 1, malformed_json: 2, missing_field:response: 1, non_utf8: 1, "
        "wrong_type:response: 1)"
    )


def test_preview_data_fails_clearly():
    bad = run_tool("preview_data.py", "--adapter", "jsonl", "--path", str(FIXTURES / "bad_rows.jsonl"))
    assert bad.returncode == 1 and "bad_rows.jsonl:2: invalid JSON" in bad.stderr
    missing = run_tool("preview_data.py", "--adapter", "qed", "--path", "/no/such/file.jsonl")
    assert missing.returncode == 1 and "no such file" in missing.stderr


@pytest.mark.slow  # a fresh interpreter imports torch and transformers (seconds)
def test_inspect_pairing_shows_both_sides_and_groups():
    result = run_tool(
        "inspect_pairing.py",
        "--student",
        str(sp_bpe_dir()),
        "--teacher",
        str(unigram_dir()),
        "--prompt",
        "Question: where?\\nAnswer:",
        "--response",
        "Café 東京 😀",
        "--pairing",
        "offsets",
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "student:" in out and "teacher:" in out and "byte spans by surface" in out
    groups = [line for line in out.split("\n") if line.strip().startswith("group")]
    assert groups and "rows" in groups[0]
    texts = [line.split("'")[1] for line in groups]
    assert "".join(texts) == "Café 東京 😀"  # the groups spell the response exactly


@pytest.mark.slow  # a fresh interpreter imports torch and transformers (seconds)
def test_inspect_pairing_position_and_dtw_run():
    for rule in ("position", "dtw"):
        result = run_tool(
            "inspect_pairing.py",
            "--student",
            str(unigram_dir()),
            "--teacher",
            str(sp_bpe_dir()),
            "--prompt",
            "p",
            "--response",
            "the quick fox",
            "--pairing",
            rule,
            "--distill-final-eos",
        )
        assert result.returncode == 0, result.stderr
        assert f"pairing {rule}:" in result.stdout and "'<EOS>'" in result.stdout


@pytest.mark.slow  # a fresh interpreter imports torch and transformers (seconds)
def test_inspect_pairing_bad_path_exits_nonzero(tmp_path):
    result = run_tool(
        "inspect_pairing.py",
        "--student",
        str(tmp_path / "missing"),
        "--teacher",
        str(unigram_dir()),
        "--prompt",
        "p",
        "--response",
        "r",
    )
    assert result.returncode == 1
    assert "does not exist" in result.stderr and "Traceback" not in result.stderr
