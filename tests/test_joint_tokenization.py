"""Prompt and response tokenized as the model reads them (mlot_ds.data.tokenize), everywhere.

Real tokenizers: the SentencePiece fixtures (fast and slow), the Metaspace Unigram fixture, GPT-2
when present, and the four tokenizers of the tiny zoo; plain and chat templates. Plus hand-built
normalising tokenizers for the rule that splits text the offsets leave out.
"""

from __future__ import annotations

import functools
import unicodedata
from types import SimpleNamespace

import pytest
import torch
from data_fixtures import BUILDERS, sp_bpe, sp_model_file, with_chat_template

from mlot_ds.data import DistillationData, ModelSide, Record, RecordSet, Template, load_tokenizer, render_prompt
from mlot_ds.data.offsets import _partition_from_char_offsets, response_spans
from mlot_ds.data.tokenize import decodes_to_response, encode_prompt_response, encode_prompt_responses
from mlot_ds.eval import bits_per_byte
from mlot_ds.pairing.surface import leading_special_ids, token_surface_bytes_cached
from mlot_ds.zoo import MEMBERS, ZooSettings, zoo_member_path
from mlot_ds.zoo.training import IGNORE_INDEX, tuning_batches

FIXTURE_KINDS = ("sp_bpe", "sp_slow", "unigram", "gpt2")
SENTENCEPIECE_KINDS = ("sp_bpe", "sp_slow", "teacher-llama")
KINDS = FIXTURE_KINDS + MEMBERS
LOSSY = ("unigram", "teacher-opt")  # no byte fallback: characters they never saw become <unk>
PROMPTS = [
    "Summarize the dialogue.\n#Person1#: Hi, Ms. Dawson! Is the 3:45 train late?\n#Person2#: Yes.\nSummary:",
    "Who won?",
    "Frage: Wie spät ist es? Réponds vite.",
]
RESPONSES = [
    "Ms. Dawson takes the train.",
    "(laughs) OK, fine.",
    "#Person1# asks #Person2# about the 3:45 train.",
    "3:45 is when it leaves.",
    "Émile et Zoë vont à Kraków.",
    "東京は日本の首都です。",
    "😀 great news!",
    '"Quoted" start, then more.',
    " a leading space",
    "-dash first",
]


@functools.lru_cache(maxsize=None)
def _zoo_tokenizer(cache: str, member: str):
    return load_tokenizer(zoo_member_path(member, ZooSettings(profile="tiny"), cache))


@functools.lru_cache(maxsize=None)
def _chat(kind: str, tokenizer):
    return tokenizer if getattr(tokenizer, "chat_template", None) else with_chat_template(tokenizer)


def get_tokenizer(request, kind: str):
    if kind in MEMBERS:
        return _zoo_tokenizer(str(request.getfixturevalue("tiny_zoo_cache")), kind)
    return BUILDERS[kind]()


def expected_text(kind: str, tokenizer, text: str, ids) -> str | None:
    """What the ids must decode to: the text itself, or None where a lossy tokenizer cannot spell it."""
    if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids:
        return None  # teacher-opt maps characters it never saw (emoji, CJK) to <unk>
    if kind == "teacher-opt":
        return unicodedata.normalize("NFKC", text)  # its normaliser; every other kind keeps the text
    return text


def rendered(kind: str, tokenizer, template: str, prompt: str) -> tuple[str, list[int], object]:
    """(rendered prompt text, leading ids, the tokenizer to use) as the data pipeline does it."""
    if template == "plain":
        return render_prompt(Template(), tokenizer, prompt), leading_special_ids(tokenizer), tokenizer
    chat = _chat(kind, tokenizer)
    return render_prompt(Template("chat"), chat, prompt), [], chat


def _assert_partition(spans, data: bytes):
    assert spans[0][0] == 0 and spans[-1][1] == len(data)
    for (start, end), (next_start, next_end) in zip(spans, spans[1:]):
        assert start <= end
        assert next_start == end or (next_start, next_end) == (start, end)


# -- the model reads exactly the rendered text ----------------------------------------------------
@pytest.mark.parametrize("template", ["plain", "chat"])
@pytest.mark.parametrize("kind", KINDS)
def test_decoded_input_is_the_rendered_text_byte_for_byte(request, kind, template):
    tokenizer = get_tokenizer(request, kind)
    checked = 0
    for prompt in PROMPTS:
        text, lead, tok = rendered(kind, tokenizer, template, prompt)
        results = encode_prompt_responses(tok, [text] * len(RESPONSES), RESPONSES, leading_ids=lead)
        for response, result in zip(RESPONSES, results):
            ids = result.prompt_ids + result.response_ids
            assert result.prompt_ids[: len(lead)] == lead
            expected = expected_text(kind, tok, text + response, ids)
            if expected is not None:
                decoded = tok.decode(ids[len(lead) :], skip_special_tokens=False, clean_up_tokenization_spaces=False)
                assert decoded.encode("utf-8") == expected.encode("utf-8"), (kind, template, response)
                if template == "plain":  # BOS skipped: what remains is the text
                    assert tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False) == expected
                    assert decodes_to_response(tok, result.prompt_ids, result.response_ids, response) == (
                        expected == text + response)
                checked += 1
            # the prompt ids are the prompt's own tokens; a joint cut is what the full text encodes to
            assert result.prompt_ids[len(lead) :] == tok(text, add_special_tokens=False)["input_ids"]
            if result.tokenization == "joint":
                assert tok(text + response, add_special_tokens=False)["input_ids"] == ids[len(lead) :]
            # spans: an exact partition, each token's span holds its own bytes
            data = response.encode("utf-8")
            assert len(result.spans) == len(result.response_ids)
            _assert_partition(result.spans, data)
            if result.offsets_method == "surface":
                surfaces = token_surface_bytes_cached(tok)
                assert [data[s:e] for s, e in result.spans] == [surfaces[i] for i in result.response_ids]
            elif kind != "teacher-opt" and tok.unk_token_id not in result.response_ids:
                pytest.fail(f"{kind}: spans by {result.offsets_method} for {response!r}")
    if kind not in LOSSY:
        assert checked == len(PROMPTS) * len(RESPONSES)
    elif template == "plain":  # the lossy ones spell most texts (teacher-opt has no '|' for ChatML markers)
        assert checked >= 10


@pytest.mark.parametrize("kind", SENTENCEPIECE_KINDS + ("unigram", "teacher-opt"))
def test_a_sentencepiece_response_after_a_newline_has_no_dummy_prefix(request, kind):
    tokenizer = get_tokenizer(request, kind)
    responses = ["Ms. Dawson asks.", "3 trains", "(laughs) OK"]
    if kind in SENTENCEPIECE_KINDS:  # byte fallback: any character
        responses += ["Émile", "😀 yes"]
    for response in responses:
        result = encode_prompt_response(tokenizer, "Summary:\n", response, leading_ids=leading_special_ids(tokenizer))
        pieces = tokenizer.convert_ids_to_tokens(result.response_ids)
        assert not pieces[0].startswith("▁"), (kind, pieces)
        alone = tokenizer.convert_ids_to_tokens(tokenizer(response, add_special_tokens=False)["input_ids"])
        assert alone[0].startswith("▁")  # the old separate tokenization: a space the text does not have
        decoded = tokenizer.decode(result.prompt_ids + result.response_ids, skip_special_tokens=True,
                                   clean_up_tokenization_spaces=False)
        assert decoded == "Summary:\n" + response
    # a response that does start with a space keeps exactly one
    result = encode_prompt_response(tokenizer, "Summary:\n", " spaced", leading_ids=leading_special_ids(tokenizer))
    assert tokenizer.decode(result.prompt_ids + result.response_ids, skip_special_tokens=True,
                            clean_up_tokenization_spaces=False) == "Summary:\n spaced"


def test_sp_bpe_hand_case():
    tokenizer = sp_bpe()
    result = encode_prompt_response(tokenizer, "Summary:\n", "Ms. Dawson", leading_ids=[tokenizer.bos_token_id])
    full = tokenizer("Summary:\nMs. Dawson", add_special_tokens=False)["input_ids"]
    prompt = tokenizer("Summary:\n", add_special_tokens=False)["input_ids"]
    assert result.tokenization == "joint"
    assert result.prompt_ids == [tokenizer.bos_token_id] + prompt
    assert result.response_ids == full[len(prompt) :]
    assert len(result.response_ids) == len(tokenizer("Ms. Dawson", add_special_tokens=False)["input_ids"]) - 1  # no '▁'
    assert [b"Ms. Dawson"[s:e] for s, e in result.spans] == [b"M", b"s", b".", b" ", b"D", b"a", b"w", b"s", b"on"]


# -- the fallback ------------------------------------------------------------------------------
def _sentencepiece_without_dummy_prefix():
    import sentencepiece
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto.FromString(sp_model_file().read_bytes())
    proto.normalizer_spec.add_dummy_prefix = False
    processor = sentencepiece.SentencePieceProcessor()
    processor.LoadFromSerializedProto(proto.SerializeToString())
    return processor


@pytest.mark.parametrize("kind", ["sp_bpe", "sp_slow"])
def test_a_token_across_the_boundary_falls_back_to_the_response_without_dummy_prefix(kind):
    tokenizer = BUILDERS[kind]()
    prompt, response = "Su", "mmary: ok"  # 'um' is one piece in the joint text
    joint = tokenizer.convert_ids_to_tokens(tokenizer(prompt + response, add_special_tokens=False)["input_ids"])
    assert "um" in joint and "u" in tokenizer.convert_ids_to_tokens(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    result = encode_prompt_response(tokenizer, prompt, response)
    assert result.tokenization == "alone"
    # exactly what SentencePiece itself gives without the dummy prefix
    assert result.response_ids == _sentencepiece_without_dummy_prefix().encode(response)
    assert not tokenizer.convert_ids_to_tokens(result.response_ids)[0].startswith("▁")
    assert tokenizer.decode(result.prompt_ids + result.response_ids, clean_up_tokenization_spaces=False) == prompt + response
    data = response.encode()
    assert b"".join(data[s:e] for s, e in result.spans) == data and result.offsets_method == "surface"


def test_byte_level_fallback_keeps_the_response_as_it_is():
    tokenizer = BUILDERS["gpt2"]()
    result = encode_prompt_response(tokenizer, "Hel", "lo world")  # 'Hello' is one GPT-2 token
    assert result.tokenization == "alone"
    assert result.response_ids == tokenizer("lo world", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(result.prompt_ids + result.response_ids) == "Hello world"


def test_zoo_llama_merges_newline_with_hash_and_the_pipeline_counts_it(request):
    tokenizer = get_tokenizer(request, "teacher-llama")  # its vocabulary has the piece '\n#'
    records = RecordSet([Record(i, f"Dialogue {i}", response, (response,)) for i, response in
                         enumerate(["#Person1# pays.", "Ms. Dawson pays.", "#Person2# waits.", "They agree."])])
    with pytest.warns(UserWarning, match="for 2 of 4 records a token straddles the end of the prompt"):
        data = DistillationData(records, ModelSide("student", tokenizer, Template()), [], max_length=512,
                                micro_batch_size=1, grad_accum=1, world_size=1, rank=0, seed=0, cache_dir=None,
                                progress=False)
    assert data.separate_responses == {"student": 2}
    for position, record in enumerate(records.records):
        row = data.record_tokens("student", position)
        assert row["tokenization"] == ("alone" if record.response.startswith("#") else "joint")
        text = render_prompt(Template(), tokenizer, record.prompt) + record.response
        decoded = tokenizer.decode(row["prompt_ids"] + row["response_ids"], skip_special_tokens=True)
        assert decoded == text and not tokenizer.convert_ids_to_tokens(row["response_ids"])[0].startswith("▁")


# -- training, bits per byte and zoo tuning read the same tokens -------------------------------
class _Recorder(torch.nn.Module):
    """A causal LM with uniform logits that remembers every row it is fed."""

    def __init__(self, vocab: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.vocab, self.rows = vocab, []

    def forward(self, input_ids, attention_mask):
        for ids, mask in zip(input_ids, attention_mask):
            self.rows.append(ids[mask.bool()].tolist())
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab) + self.weight)


@pytest.mark.parametrize("kind", ("sp_bpe", "sp_slow", "unigram") + MEMBERS)
def test_training_bits_per_byte_and_tuning_use_the_same_tokens(request, kind):
    tokenizer = get_tokenizer(request, kind)
    prompts = [f"{PROMPTS[i % len(PROMPTS)]} ({i})" for i in range(len(RESPONSES))]
    records = RecordSet([Record(i, p, r, (r,)) for i, (p, r) in enumerate(zip(prompts, RESPONSES))])
    data = DistillationData(records, ModelSide("student", tokenizer, Template()), [], max_length=1024,
                            micro_batch_size=1, grad_accum=1, world_size=1, rank=0, seed=0, cache_dir=None, progress=False)
    eos = tokenizer.eos_token_id
    by_record = {}
    for position in range(data.num_records):
        row = data.record_tokens("student", position)
        by_record[tuple(row["prompt_ids"] + row["response_ids"] + [eos])] = row["response_ids"] + [eos]
    assert len(by_record) == len(RESPONSES) == data.num_records
    contexts = [render_prompt(Template(), tokenizer, p) for p in prompts]

    model = _Recorder(len(tokenizer))
    bits_per_byte(model, tokenizer, contexts, RESPONSES, batch_size=3, max_length=1024)
    assert sorted(map(tuple, model.rows)) == sorted(by_record)

    batches = tuning_batches(tokenizer, list(zip(contexts, RESPONSES)), context_length=1024, batch_size=1, seed=0)
    tuned = {}
    for _ in range(len(RESPONSES)):
        batch = next(batches)
        length = int(batch["attention_mask"][0].sum())
        labels = batch["labels"][0, :length].tolist()
        tuned[tuple(batch["input_ids"][0, :length].tolist())] = [t for t in labels if t != IGNORE_INDEX]
    assert tuned == by_record


def test_bits_per_byte_of_a_chat_prompt_adds_no_bos():
    tokenizer = with_chat_template(sp_bpe())
    text = render_prompt(Template("chat"), tokenizer, "Who won?")
    model = _Recorder(len(tokenizer))
    bits_per_byte(model, tokenizer, [text], ["Ms. Dawson."], batch_size=1, prompt_special_tokens=False)
    expected = encode_prompt_response(tokenizer, text, "Ms. Dawson.")
    assert model.rows == [expected.prompt_ids + expected.response_ids + [tokenizer.eos_token_id]]
    assert model.rows[0][0] != tokenizer.bos_token_id


# -- text the offsets leave out ------------------------------------------------------------------
def _normalising_tokenizer(normalizer):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "cafe": 1, "ok": 2, ",": 3, "q": 4, ":": 5, "fix": 6}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizer
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


def test_left_out_text_goes_before_unless_it_is_whitespace():
    from tokenizers import normalizers

    tokenizer = _normalising_tokenizer(normalizers.Sequence([normalizers.NFD(), normalizers.StripAccents()]))
    cases = {
        # text: (character offsets the tokenizer reports, byte spans by the rule)
        "cafe\u0301 ok": ([(0, 4), (6, 8)], [(0, 6), (6, 9)]),  # accent to 'cafe', space to 'ok'
        "cafe\u0301,ok": ([(0, 4), (5, 6), (6, 8)], [(0, 6), (6, 7), (7, 9)]),  # a bare accent: the token before
        "caf\u00e9 ok": ([(0, 4), (5, 7)], [(0, 5), (5, 8)]),  # precomposed: the offsets cover the é
        "cafe  ok": ([(0, 4), (6, 8)], [(0, 4), (4, 8)]),  # whitespace only: the token after
        "cafe\u0301\u0301 \u0301ok": ([(0, 4), (8, 10)], [(0, 8), (8, 13)]),  # cut at the first space
    }
    for text, (offsets, spans) in cases.items():
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        assert [tuple(o) for o in encoding["offset_mapping"]] == offsets, text
        assert _partition_from_char_offsets(offsets, text) == spans, text
        assert response_spans(tokenizer, text, encoding["input_ids"]) == (spans, "tokenizer"), text
        joint = encode_prompt_response(tokenizer, "q:\n", text)  # the same spans through the joint cut
        assert joint.tokenization == "joint" and joint.response_ids == encoding["input_ids"]
        assert (joint.spans, joint.offsets_method) == (spans, "tokenizer"), text


def test_nfkc_tokenizer_gaps():
    from tokenizers import normalizers

    tokenizer = _normalising_tokenizer(normalizers.Sequence([normalizers.NFKC(), normalizers.Replace("\u00ad", "")]))
    cases = {
        "cafe\u00ad ok": ([(0, 4), (6, 8)], [(0, 6), (6, 9)]),  # a soft hyphen the normaliser removes: before
        "\ufb01x ok": ([(0, 2), (3, 5)], [(0, 4), (4, 7)]),  # "ﬁ" (3 bytes) reads "fi": its span keeps its bytes
    }
    for text, (offsets, spans) in cases.items():
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        assert tokenizer.unk_token_id not in encoding["input_ids"], text
        assert [tuple(o) for o in encoding["offset_mapping"]] == offsets, text
        assert response_spans(tokenizer, text, encoding["input_ids"]) == (spans, "tokenizer"), text
