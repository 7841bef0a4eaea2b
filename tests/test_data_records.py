"""Adapters and file readers: the real DialogSum and QED files, a FairytaleQA fixture, bad rows."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from mlot_ds.data import DataError, Record, load_records

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "data"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared_file(relative: str) -> Path:
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"needs {path} (the project's shared data; absent in a user's clone)")
    return path


def _raw_lines(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


# -- DialogSum -------------------------------------------------------------------------------------
def test_dialogsum_train_dev_and_test_splits():
    train = load_records("dialogsum", shared_file("dialogsum/dialogsum.train.jsonl.gz"))
    dev = load_records("dialogsum", shared_file("dialogsum/dialogsum.dev.jsonl"))
    test = load_records("dialogsum", shared_file("dialogsum/dialogsum.test.jsonl"))
    assert (len(train), len(dev), len(test)) == (12460, 500, 500)
    assert not train.dropped and not dev.dropped and not test.dropped
    raw = _raw_lines(shared_file("dialogsum/dialogsum.dev.jsonl"))[7]
    record = dev.records[7]
    assert record.prompt == "Summarize the dialogue.\n" + raw["dialogue"] + "\nSummary:"
    assert record.response == raw["summary"].strip() and record.references == (raw["summary"].strip(),)
    assert record.id == 7
    raw_test = _raw_lines(shared_file("dialogsum/dialogsum.test.jsonl"))[0]
    assert test.records[0].references == tuple(raw_test[f"summary{i}"].strip() for i in (1, 2, 3))
    assert test.records[0].response == raw_test["summary1"].strip()
    assert all(len(r.references) == 3 for r in test.records)


def test_dialogsum_hidden_test_has_no_summary():
    with pytest.raises(DataError, match=r"dialogsum.hiddentest.dialogue.jsonl:1: expected field 'summary'"):
        load_records("dialogsum", shared_file("dialogsum/dialogsum.hiddentest.dialogue.jsonl"))


# -- QED -------------------------------------------------------------------------------------------
def test_qed_dev_prompt_response_and_references():
    path = shared_file("qed/qed-dev.jsonlines")
    records = load_records("qed", path)
    assert len(records) == 1355 and not records.dropped
    raw = _raw_lines(path)
    first = records.records[0]
    assert first.prompt == (
        "Title: List of Nobel laureates in Physics\nContext: " + raw[0]["paragraph_text"]
        + "\nQuestion: who got the first nobel prize in physics?\nAnswer:"
    )
    assert first.response == "Wilhelm Conrad Röntgen , of Germany"
    assert first.references == ("Wilhelm Conrad Röntgen , of Germany", "Wilhelm Conrad Röntgen")
    # a gold answer made of several spans is their strings joined by a space
    index = next(i for i, r in enumerate(raw) if any(len(a) > 1 for a in r["original_nq_answers"]))
    spans = next(a for a in raw[index]["original_nq_answers"] if len(a) > 1)
    assert " ".join(s["string"] for s in spans) in records.records[index].references


def test_qed_prerelease_shard_schema():
    records = load_records("qed", shared_file("qed/prerelease-train-shards-2020-08/nq-train-00-qed.jsonlines.gz"))
    assert len(records) + records.dropped["empty_response"] == 1608
    assert records.records[0].response == "2010 Green Bay Packers"
    assert records.records[0].prompt.endswith("\nQuestion: when was the last time a wildcard team won the superbowl?\nAnswer:")


# -- FairytaleQA (fixture written from the schema) -------------------------------------------------
def test_fairytaleqa_train_and_valid_csv():
    train = load_records("fairytaleqa", FIXTURES / "fairytaleqa_train.csv")
    assert [r.id for r in train.records] == [0, 1, 2]
    assert train.dropped == {"empty_response": 1}
    second = train.records[1]
    assert second.prompt == (
        "Story: the old woman took down her bakeboard , and put on her girdle , and baked a couple of fine cakes ."
        "\nthen she set them before the fire .\nQuestion: what did the old woman bake ?\nAnswer:"
    )
    assert second.response == "a couple of fine cakes ." and second.references == ("a couple of fine cakes .",)
    assert train.records[2].response == "because it opened its beak to answer ."
    assert '"hello"' in train.records[2].prompt

    valid = load_records("fairytaleqa", FIXTURES / "fairytaleqa_valid.csv")
    assert valid.records[0].references == ("an old man and his wife .", "the old man and the old woman .")
    assert valid.records[1].references == ("baked cakes .",)  # empty answer2 is not a reference


def test_fairytaleqa_hub_column_name():
    record = load_records("fairytaleqa", FIXTURES / "fairytaleqa_hub_columns.csv").records[0]
    assert record.prompt == "Story: the cat sat .\nQuestion: where did the cat sit ?\nAnswer:"
    assert record.references == ("on the mat .", "the mat .")


def test_csv_bad_rows_name_the_line():
    path = FIXTURES / "fairytaleqa_bad.csv"
    with pytest.raises(DataError, match=rf"{path}:3: bytes that are not UTF-8"):
        load_records("fairytaleqa", path)
    kept = load_records("fairytaleqa", path, bad_rows="skip")
    assert len(kept) == 1 and kept.dropped == {"non_utf8": 1, "malformed_csv": 1}


# -- Bad rows in JSON lines ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "skip_before,message",
    [
        (0, r"bad_rows.jsonl:2: invalid JSON"),
        (1, r"bad_rows.jsonl:3: bytes that are not UTF-8 at column 26"),
        (2, r"bad_rows.jsonl:4: missing field 'response'"),
        (3, r"bad_rows.jsonl:5: field 'response' must be a string, got int"),
        (4, r"bad_rows.jsonl:7: expected a JSON object, got list"),
    ],
)
def test_each_bad_row_raises_with_file_and_line(tmp_path, skip_before, message):
    """Rows are removed one by one so each error is the first one met."""
    lines = (FIXTURES / "bad_rows.jsonl").read_bytes().split(b"\n")
    bad_line_numbers = [2, 3, 4, 5, 7]
    for number in sorted(bad_line_numbers[:skip_before], reverse=True):
        lines[number - 1] = b""  # blank lines are skipped and keep the numbering
    path = tmp_path / "bad_rows.jsonl"
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(DataError, match=message):
        load_records("jsonl", path)


def test_bad_rows_skip_policy_counts_each_reason():
    result = load_records("jsonl", FIXTURES / "bad_rows.jsonl", bad_rows="skip")
    assert [r.prompt for r in result.records] == ["good one", "last good"]
    assert result.records[1] == Record(7, "last good", "kept", ("kept", "also"))
    assert result.dropped == {
        "malformed_json": 2, "non_utf8": 1, "missing_field:response": 1, "wrong_type:response": 1, "empty_response": 1,
    }


# -- Generic adapter over every format -------------------------------------------------------------
ROWS = [
    {"question": "2+2?", "answer": " 4 ", "golds": ["4", "four"]},
    {"question": "Capital of France?", "answer": "Paris", "golds": ["Paris"]},
    {"question": "Empty?", "answer": "", "golds": []},
]
FIELDS = {"prompt": "question", "response": "answer", "references": "golds"}


def _write_all_formats(folder: Path) -> dict[str, Path]:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = {"jsonl": folder / "rows.jsonl", "json": folder / "rows.json", "gz": folder / "rows.jsonl.gz",
             "parquet": folder / "rows.parquet", "saved": folder / "saved"}
    paths["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    paths["json"].write_text(json.dumps(ROWS, indent=1))
    with gzip.open(paths["gz"], "wt") as handle:
        handle.write("".join(json.dumps(r) + "\n" for r in ROWS))
    pq.write_table(pa.Table.from_pylist(ROWS), paths["parquet"])
    datasets.Dataset.from_list(ROWS).save_to_disk(str(paths["saved"]))
    return paths


def test_generic_adapter_reads_every_format_alike(tmp_path):
    for kind, path in _write_all_formats(tmp_path).items():
        result = load_records("jsonl", path, fields=FIELDS)
        assert [(r.prompt, r.response, r.references) for r in result.records] == [
            ("2+2?", "4", ("4", "four")), ("Capital of France?", "Paris", ("Paris",)),
        ], kind
        assert result.dropped == {"empty_response": 1}, kind


def test_generic_adapter_csv_defaults_and_limit(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("prompt,response\nhello,world\nfoo,bar\nx,y\n")
    result = load_records("jsonl", path, limit=2)
    expected = [("hello", "world", ("world",)), ("foo", "bar", ("bar",))]
    assert [(r.prompt, r.response, r.references) for r in result.records] == expected


def test_generic_adapter_named_references_column_must_exist(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(DataError, match=r"rows.jsonl:1: missing references field 'golds'"):
        load_records("jsonl", path, fields=FIELDS)


def test_clear_errors_for_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown adapter 'squad'"):
        load_records("squad", tmp_path)
    with pytest.raises(DataError, match="no such file"):
        load_records("jsonl", tmp_path / "missing.jsonl")
    (tmp_path / "rows.txt").write_text("x")
    with pytest.raises(DataError, match=r"unknown file type \.txt"):
        load_records("jsonl", tmp_path / "rows.txt")
    with pytest.raises(ValueError, match="bad_rows must be one of"):
        load_records("jsonl", tmp_path / "rows.txt", bad_rows="ignore")
    with pytest.raises(ValueError, match="only for the generic 'jsonl' adapter"):
        load_records("qed", tmp_path / "rows.txt", fields={"prompt": "x"})
