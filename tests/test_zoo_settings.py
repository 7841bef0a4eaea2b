"""Zoo settings (cache key), the bundled corpus and the task format."""

from __future__ import annotations

import json

import pytest

from mlot_ds.data.dialogsum import corpus_dir, read_records, reference_summaries
from mlot_ds.zoo import MEMBERS, PROFILES, ZooSettings, corpus_path, render_context, render_prompt, render_response


def test_fingerprint_keys_on_resolved_values_only():
    tiny = ZooSettings(profile="tiny")
    spelled_out = ZooSettings(profile="tiny", batch_size=PROFILES["tiny"].batch_size, members={"student": {"hidden_size": 16}})
    assert tiny.fingerprint() == spelled_out.fingerprint()
    assert tiny == ZooSettings(profile="tiny") and hash(tiny) == hash(ZooSettings(profile="tiny"))
    variants = [
        ZooSettings(profile="tiny", seed=1),
        ZooSettings(profile="tiny", batch_size=5),
        ZooSettings(profile="tiny", members={"teacher-opt": {"vocab_size": 350}}),
        ZooSettings(),
    ]
    fingerprints = {tiny.fingerprint(), *(v.fingerprint() for v in variants)}
    assert len(fingerprints) == 1 + len(variants)
    assert ZooSettings(members={"student": {"hidden_size": 128}}).resolved().members["student"].hidden_size == 128


def test_describe_is_json_and_complete():
    description = json.loads(json.dumps(ZooSettings(profile="tiny").describe()))
    assert set(description["members"]) == set(MEMBERS)
    assert description["profile"] == "tiny" and description["seed"] == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"profile": "huge"}, "ZooSettings.profile must be one of"),
        ({"members": {"teacher-gpt5": {"vocab_size": 10}}}, "unknown member 'teacher-gpt5'"),
        ({"members": {"student": {"width": 10}}}, r"ZooSettings.members\['student'\]: unknown field 'width'"),
        ({"batch_size": 0}, "ZooSettings.batch_size must be a positive integer"),
        ({"block_length": 1024}, "block_length .* must not exceed context_length"),
        ({"members": {"student": {"data_fraction": 0.0}}}, "data_fraction must be in"),
        ({"members": {"student": {"num_heads": 5}}}, "not divisible by num_heads 5"),
    ],
)
def test_bad_settings_raise_one_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ZooSettings(**kwargs)


def test_default_profile_sizes_differ_and_student_is_smallest():
    members = PROFILES["default"].members
    assert len({spec.vocab_size for spec in members.values()}) == len(MEMBERS)
    student = members["student"]
    assert student.tune_steps == 0
    for teacher in ("teacher-llama", "teacher-qwen", "teacher-opt"):
        assert members[teacher].hidden_size > student.hidden_size
        assert members[teacher].tune_steps > 0


def test_bundled_corpus_has_the_dialogsum_schema():
    sizes = {}
    for split in ("train", "dev", "test"):
        assert corpus_path(split).is_file()
        records = read_records(split)
        sizes[split] = len(records)
        keys = (
            {"fname", "dialogue", "summary1", "summary2", "summary3"}
            if split == "test"
            else {"fname", "dialogue", "summary", "topic"}
        )
        for record in records:
            assert keys <= set(record), (split, record.get("fname"))
            assert record["fname"].startswith(f"{split}_")
            assert "#Person1#:" in record["dialogue"]
        assert len({r["fname"] for r in records}) == len(records)
    assert 100 <= sizes["train"] <= 2000 and 100 <= sizes["dev"] <= 200 and sizes["test"] == 100
    assert all(len(reference_summaries(r)) == 3 for r in read_records("test"))
    licence = (corpus_dir() / "LICENCE.md").read_text()
    assert "CC BY-NC-SA 4.0" in licence and "sample" in licence and "Chen" in licence
    with pytest.raises(ValueError, match="corpus split must be one of"):
        corpus_path("validation")


def test_task_format_is_exact():
    dialogue = "#Person1#: Hi.\n#Person2#: Hello."
    assert render_prompt(dialogue) == "Summarize the dialogue.\n#Person1#: Hi.\n#Person2#: Hello.\nSummary:"
    assert render_context(dialogue) == render_prompt(dialogue) + "\n"
    assert render_response("  They greet.\n") == "They greet."
