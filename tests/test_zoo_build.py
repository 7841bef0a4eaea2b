"""The tiny zoo end to end: artefacts, offline loading, special tokens, distinct tokenizers, reuse."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mlot_ds.zoo import MEMBERS, TEACHERS, ZooSettings, build_zoo, zoo_member_path, zoo_report_path
from mlot_ds.zoo.build import MEMBER_RECORD

REPO = Path(__file__).resolve().parents[1]
TINY = ZooSettings(profile="tiny")
FIXED_SENTENCE = "#Person1#: Hello, Mr. Smith! Your appointment is at 10:30 tomorrow.\n#Person2#: Thanks, doctor."


@pytest.fixture(scope="session")
def tiny_zoo(request):
    # The session's tiny zoo from conftest.py (built once for every test file), with its paths.
    cache = request.getfixturevalue("tiny_zoo_cache")
    return cache, build_zoo(TINY, cache_dir=cache, progress=False)


@pytest.fixture(scope="session")
def tokenizers(tiny_zoo):
    _, paths = tiny_zoo
    return {member: AutoTokenizer.from_pretrained(paths[member]) for member in MEMBERS}


@pytest.fixture(scope="session")
def loaded_models(tiny_zoo):
    _, paths = tiny_zoo
    return {member: AutoModelForCausalLM.from_pretrained(paths[member]) for member in MEMBERS}


def test_every_member_is_a_complete_safetensors_checkpoint(tiny_zoo):
    cache, paths = tiny_zoo
    assert tuple(paths) == MEMBERS
    for member, path in paths.items():
        assert path == zoo_member_path(member, TINY, cache)
        for name in (
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
            MEMBER_RECORD,
        ):
            assert (path / name).is_file(), f"{member}: {name} missing"
        assert not list(path.glob("*.bin")), f"{member}: pickle weights written"
    assert not list(paths["student"].parent.glob(".tmp-*")), "staging folders left behind"


def test_architectures_and_tokenizer_families(loaded_models, tokenizers):
    expected = {
        "teacher-llama": ("LlamaForCausalLM", "LlamaTokenizer"),
        "teacher-qwen": ("Qwen2ForCausalLM", "Qwen2Tokenizer"),
        "teacher-opt": ("OPTForCausalLM", "TokenizersBackend"),
        "student": ("GPT2LMHeadModel", "GPT2Tokenizer"),
    }
    for member, (architecture, tokenizer_class) in expected.items():
        assert type(loaded_models[member]).__name__ == architecture
        assert type(tokenizers[member]).__name__ == tokenizer_class
    backends = {member: json.loads(tokenizers[member].backend_tokenizer.to_str())["model"]["type"] for member in MEMBERS}
    assert backends == {"teacher-llama": "BPE", "teacher-qwen": "BPE", "teacher-opt": "Unigram", "student": "BPE"}
    assert json.loads(tokenizers["teacher-llama"].backend_tokenizer.to_str())["model"]["byte_fallback"] is True


def test_loads_and_generates_offline_in_a_fresh_process(tiny_zoo, tmp_path):
    _, paths = tiny_zoo
    script = textwrap.dedent(
        """
        import json, sys
        from transformers import AutoModelForCausalLM, AutoTokenizer
        out = {}
        for member, path in json.loads(sys.argv[1]).items():
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path)
            batch = tokenizer(["Summarize the dialogue.\\n#Person1#: Hi.\\nSummary:\\n"], return_tensors="pt")
            generated = model.generate(**batch, max_new_tokens=5, do_sample=False)
            out[member] = [generated.shape[1] - batch["input_ids"].shape[1], tokenizer.decode(generated[0])]
        print(json.dumps(out))
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty-hf-home")}
    result = subprocess.run(
        [sys.executable, "-c", script, json.dumps({m: str(p) for m, p in paths.items()})],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    generated = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(generated) == set(MEMBERS)
    for member, (new_tokens, text) in generated.items():
        assert 1 <= new_tokens <= 5, member
        assert text.strip(), member


def test_special_token_ids_agree_between_tokenizer_model_and_generation_config(loaded_models, tokenizers):
    for member in MEMBERS:
        tokenizer, model = tokenizers[member], loaded_models[member]
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            token_id = getattr(tokenizer, name)
            assert getattr(model.config, name) == token_id, f"{member} config.{name}"
            assert getattr(model.generation_config, name) == token_id, f"{member} generation_config.{name}"
        assert tokenizer.eos_token_id is not None and tokenizer.pad_token_id is not None
        assert tokenizer.pad_token_id != tokenizer.eos_token_id, f"{member}: padding must not hide EOS labels"

    def first_id(member):
        return tokenizers[member]("Hello there")["input_ids"][0]

    assert first_id("teacher-llama") == tokenizers["teacher-llama"].bos_token_id == 1
    assert first_id("teacher-opt") == tokenizers["teacher-opt"].bos_token_id
    assert tokenizers["teacher-qwen"].bos_token_id is None
    assert first_id("teacher-qwen") not in tokenizers["teacher-qwen"].all_special_ids
    # GPT-2 style: BOS exists (and equals EOS) but is not added.
    assert tokenizers["student"].bos_token_id == tokenizers["student"].eos_token_id
    assert first_id("student") not in tokenizers["student"].all_special_ids


def test_vocabularies_and_splits_all_differ(tiny_zoo, tokenizers, loaded_models):
    sizes = {member: len(tokenizers[member]) for member in MEMBERS}
    assert len(set(sizes.values())) == len(MEMBERS), sizes
    for first, second in itertools.combinations(MEMBERS, 2):
        assert set(tokenizers[first].get_vocab()) != set(tokenizers[second].get_vocab()), (first, second)
        pieces = [tokenizers[m].tokenize(FIXED_SENTENCE) for m in (first, second)]
        assert pieces[0] != pieces[1], (first, second)
        ids = [tokenizers[m](FIXED_SENTENCE, add_special_tokens=False)["input_ids"] for m in (first, second)]
        assert ids[0] != ids[1], (first, second)
    for member in MEMBERS:
        rows = loaded_models[member].get_input_embeddings().weight.shape[0]
        assert rows == loaded_models[member].config.vocab_size
        if member == "teacher-qwen":
            assert rows > len(tokenizers[member]), "Qwen-style padded embedding expected"
        else:
            assert rows == len(tokenizers[member])


def test_text_round_trips_and_unigram_maps_unseen_characters_to_unk(tokenizers):
    for member in MEMBERS:
        ids = tokenizers[member](FIXED_SENTENCE, add_special_tokens=False)["input_ids"]
        assert tokenizers[member].decode(ids) == FIXED_SENTENCE, member
    exotic = "café 😀"
    for member in ("teacher-llama", "teacher-qwen", "student"):  # byte fallback / byte level: lossless
        ids = tokenizers[member](exotic, add_special_tokens=False)["input_ids"]
        assert tokenizers[member].decode(ids) == exotic, member
    assert tokenizers["teacher-opt"].unk_token_id in tokenizers["teacher-opt"](exotic)["input_ids"]


def test_qwen_chat_template(tokenizers):
    rendered = tokenizers["teacher-qwen"].apply_chat_template(
        [{"role": "user", "content": "Summarize: hi"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == "<|im_start|>user\nSummarize: hi<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizers["teacher-qwen"].convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert tokenizers["teacher-qwen"].unk_token_id not in ids


def test_logits_cover_the_model_vocabulary(loaded_models, tokenizers):
    for member in MEMBERS:
        batch = tokenizers[member](["Hello there, how are you"], return_tensors="pt")
        with torch.no_grad():
            logits = loaded_models[member](**batch).logits
        assert logits.shape[-1] == loaded_models[member].config.vocab_size
        assert torch.isfinite(logits).all()


def test_report_lists_every_member(tiny_zoo):
    cache, paths = tiny_zoo
    report = json.loads(zoo_report_path(TINY, cache).read_text())
    assert report["fingerprint"] == TINY.fingerprint()
    assert set(report["bits_per_byte"]) == set(MEMBERS)
    assert set(report["teacher_margin_over_student"]) == set(TEACHERS)
    for member in MEMBERS:
        record = report["members"][member]
        assert record == json.loads((paths[member] / MEMBER_RECORD).read_text())
        assert record["bits_per_byte"] > 0 and record["parameters"] > 0 and record["build_seconds"] >= 0
    assert report["members"]["teacher-qwen"]["model_vocab"] > report["members"]["teacher-qwen"]["tokenizer_vocab"]
    assert report["settings"]["members"]["student"]["tune_steps"] == 0


def test_second_build_reuses_everything(tiny_zoo):
    cache, paths = tiny_zoo
    files = [f for path in paths.values() for f in path.iterdir()] + [zoo_report_path(TINY, cache)]
    before = {f: f.stat().st_mtime_ns for f in files}
    again = build_zoo(TINY, cache_dir=cache, progress=False)
    assert again == paths
    assert {f: f.stat().st_mtime_ns for f in files} == before


def test_cache_dir_comes_from_the_environment_when_not_given(tiny_zoo, monkeypatch):
    cache, paths = tiny_zoo
    monkeypatch.setenv("MLOT_DS_CACHE", str(cache))
    assert zoo_member_path("student", TINY) == paths["student"]
    assert zoo_member_path("student", TINY) == cache / "zoo" / TINY.fingerprint() / "student"
    with pytest.raises(ValueError, match="unknown zoo member 'teacher-gpt5'"):
        zoo_member_path("teacher-gpt5", TINY)
