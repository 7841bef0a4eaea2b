"""DistillationData end to end: tokenization per model, sampler rules, collation, pairing, counts."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
from data_fixtures import BUILDERS, UNICODE_SAMPLES, gpt2, sp_bpe, sp_slow, unigram, with_chat_template, wordpiece

from mlot_ds.data import DistillationData, ModelSide, Record, RecordSet, Template
from mlot_ds.data import encode as encode_module
from mlot_ds.data.offsets import response_spans
from mlot_ds.data.templates import render_plain

IGNORE = -100
# GPT-SW3's slow tokenizer rewrites runs of whitespace; the warning is checked in its own test.
pytestmark = pytest.mark.filterwarnings("ignore:.*do not decode back:UserWarning")


def make_records(count: int = 23, seed: int = 0) -> RecordSet:
    generator = random.Random(seed)
    records = []
    for index in range(count):
        prompt = f"Question {index}: " + " ".join(generator.choice(UNICODE_SAMPLES) for _ in range(generator.randint(1, 3)))
        response = UNICODE_SAMPLES[index % len(UNICODE_SAMPLES)]
        if index % 3 == 0:
            response += " " + UNICODE_SAMPLES[(index * 5 + 1) % len(UNICODE_SAMPLES)]
        records.append(Record(100 + index, prompt, response, (response,)))
    return RecordSet(records, Counter({"empty_response": 2}))


def build(records=None, *, student=None, teachers=None, world_size=1, rank=0, grad_accum=1, micro_batch_size=2,
          max_length=2048, seed=0, cache_dir=None, distill_final_eos=False):
    records = records or make_records()
    student = student or ModelSide("student", sp_bpe(), Template(), distill_final_eos=distill_final_eos)
    if teachers is None:
        teachers = [
            ModelSide("uni_offsets", unigram(), Template(few_shot=2), pairing="offsets"),
            ModelSide("uni_position", unigram(), Template(), pairing="position"),
            ModelSide("slow_dtw", sp_slow(), Template(), pairing="dtw", append_eos=False),
        ]
    return DistillationData(records, student, teachers, max_length=max_length, micro_batch_size=micro_batch_size,
                            grad_accum=grad_accum, world_size=world_size, rank=rank, seed=seed, cache_dir=cache_dir,
                            progress=False)


@pytest.fixture(scope="module")
def data():
    return build()


@pytest.fixture(scope="module")
def records_by_id():
    return {r.id: r for r in make_records().records}


def all_batches(data, epoch=0):
    for step in range(data.steps_per_epoch):
        yield step, data.micro_batches(epoch, step)


# -- what each model sees ------------------------------------------------------------------------
def test_every_model_decodes_back_to_the_response(data, records_by_id):
    for _, batches in all_batches(data):
        for batch in batches:
            for side in data.sides:
                model_batch = batch.student if side is data.student else batch.teachers[side.name]
                for row, record_id in enumerate(batch.record_ids.tolist()):
                    if record_id < 0:
                        continue
                    labels = model_batch.labels[row]
                    targets = labels[labels != IGNORE].tolist()
                    if side.append_eos:
                        assert targets[-1] == side.tokenizer.eos_token_id
                        targets = targets[:-1]
                    expected = records_by_id[record_id].response
                    if hasattr(side.tokenizer, "preprocess_text"):  # GPT-SW3 rewrites whitespace first
                        expected = side.tokenizer.preprocess_text(expected)
                    assert side.tokenizer.decode(targets, clean_up_tokenization_spaces=False) == expected
                    # labels equal the input ids where they are set (HF unshifted convention)
                    ids = model_batch.input_ids[row]
                    assert torch.equal(ids[labels != IGNORE], labels[labels != IGNORE])
                    assert int(model_batch.attention_mask[row].sum()) == int((labels != IGNORE).nonzero()[-1]) + 1


def test_prompts_follow_each_models_template(data, records_by_id):
    batch = data.micro_batches(0, 0)[0]
    record = records_by_id[int(batch.record_ids[0])]
    examples = make_records().records[:2]
    student_ids = batch.student.input_ids[0][batch.student.attention_mask[0].bool()].tolist()
    tokenizer = data.student.tokenizer
    assert student_ids[0] == tokenizer.bos_token_id and student_ids.count(tokenizer.bos_token_id) == 1
    labels = batch.student.labels[0]
    first_label = int((labels != IGNORE).nonzero()[0])
    assert tokenizer.decode(student_ids[1:first_label], clean_up_tokenization_spaces=False) == render_plain(record.prompt)
    teacher = batch.teachers["uni_offsets"]
    t_first = int((teacher.labels[0] != IGNORE).nonzero()[0])
    decoded = data.teachers[0].tokenizer.decode(teacher.input_ids[0][:t_first].tolist(), clean_up_tokenization_spaces=False)
    assert decoded == render_plain(record.prompt, examples)


def test_few_shot_examples_are_not_trained_on(data):
    seen = {int(i) for _, batches in all_batches(data) for b in batches for i in b.record_ids if i >= 0}
    assert seen == {r.id for r in make_records().records[2:]}
    assert data.num_records == 21 and data.dropped == {"empty_response": 2}


# -- sampler rules -------------------------------------------------------------------------------
def _step_records(datas, epoch, step):
    ids = [int(i) for d in datas for b in d.micro_batches(epoch, step) for i in b.record_ids]
    return Counter(ids)


def test_step_contents_do_not_depend_on_the_rank_and_accumulation_split():
    one_rank = build(world_size=1, grad_accum=2)
    two_ranks = [build(world_size=2, rank=r, grad_accum=1) for r in (0, 1)]
    assert one_rank.steps_per_epoch == two_ranks[0].steps_per_epoch == 6  # ceil(21 / 4)
    for epoch in (0, 1):
        for step in range(one_rank.steps_per_epoch):
            assert _step_records([one_rank], epoch, step) == _step_records(two_ranks, epoch, step)
            assert one_rank.global_counts(epoch, step) == two_ranks[1].global_counts(epoch, step)


def test_each_rank_gets_full_micro_batches_and_fillers_at_the_end():
    ranks = [build(world_size=2, rank=r, grad_accum=2, micro_batch_size=3) for r in (0, 1)]  # G = 12, 21 records
    for epoch in (0, 3):
        seen = Counter()
        for step in range(ranks[0].steps_per_epoch):
            for data in ranks:
                batches = data.micro_batches(epoch, step)
                assert len(batches) == 2 and all(b.record_ids.shape == (3,) for b in batches)
                for batch in batches:
                    seen.update(int(i) for i in batch.record_ids)
                    for row in (batch.record_ids < 0).nonzero().flatten().tolist():
                        assert (batch.student.labels[row] == IGNORE).all()
                        assert all((t.labels[row] == IGNORE).all() for t in batch.teachers.values())
                        assert all(not p.mask[row].any() for p in batch.pairings.values())
        assert seen.pop(-1) == 3  # 2 steps x 12 rows - 21 records
        assert set(seen.values()) == {1} and len(seen) == 21  # every record exactly once


def test_epochs_reshuffle_and_seed_reproduces():
    a, b, c = build(seed=1), build(seed=1), build(seed=2)
    order = lambda d, e: [int(i) for s in range(d.steps_per_epoch) for m in d.micro_batches(e, s) for i in m.record_ids]
    assert order(a, 0) == order(b, 0)
    assert order(a, 0) != order(a, 1)
    assert order(a, 0) != order(c, 0)


def test_micro_batches_are_random_access(data):
    later = data.micro_batches(1, 3)
    data.micro_batches(0, 0)
    again = data.micro_batches(1, 3)
    for x, y in zip(later, again):
        assert torch.equal(x.student.input_ids, y.student.input_ids)
        assert torch.equal(x.pairings["uni_offsets"].student_index, y.pairings["uni_offsets"].student_index)
    with pytest.raises(IndexError):
        data.micro_batches(0, data.steps_per_epoch)


def test_micro_batches_are_length_grouped():
    data = build(micro_batch_size=3, grad_accum=2)
    lengths = [[int(m) for m in b.student.attention_mask.sum(1)] for b in data.micro_batches(0, 0)]
    flat = [length for batch in lengths for length in batch]
    assert flat == sorted(flat, reverse=True)


# -- counts and pairings -------------------------------------------------------------------------
def test_global_counts_equal_the_sums_over_all_ranks():
    ranks = [build(world_size=2, rank=r, grad_accum=2) for r in (0, 1)]
    for step in range(ranks[0].steps_per_epoch):
        totals = Counter()
        for data in ranks:
            for batch in data.micro_batches(0, step):
                totals["student_tokens"] += int((batch.student.labels != IGNORE).sum())
                totals["sequences"] += int((batch.record_ids >= 0).sum())
                for name, pairing in batch.pairings.items():
                    totals[f"{name}/pairs"] += pairing.tokens
                    totals[f"{name}/sequences"] += int(pairing.mask.any(dim=1).sum())
        assert ranks[0].global_counts(0, step) == dict(totals)


def _response_spans_of(side, batch_part, row):
    labels = batch_part.labels[row]
    first = int((labels != IGNORE).nonzero()[0])
    ids = labels[labels != IGNORE].tolist()
    if side.append_eos:
        ids = ids[:-1]
    return first, ids


def test_offsets_pairs_predict_tokens_that_start_the_same_text(data, records_by_id):
    teacher = data.teachers[0]
    for _, batches in all_batches(data):
        for batch in batches:
            pairing = batch.pairings[teacher.name]
            pairing.validate(batch.student.input_ids.shape[1], batch.teachers[teacher.name].input_ids.shape[1])
            for row, record_id in enumerate(batch.record_ids.tolist()):
                if record_id < 0:
                    continue
                response = records_by_id[record_id].response
                s_first, s_ids = _response_spans_of(data.student, batch.student, row)
                t_first, t_ids = _response_spans_of(teacher, batch.teachers[teacher.name], row)
                s_spans, _ = response_spans(data.student.tokenizer, response, s_ids)
                t_spans, _ = response_spans(teacher.tokenizer, response, t_ids)
                rows = list(zip(pairing.student_index[row][pairing.mask[row]].tolist(),
                                pairing.teacher_index[row][pairing.mask[row]].tolist()))
                assert rows, "every real record has at least one group"
                starts = []
                for s_row, t_row in rows:
                    s_token, t_token = s_row + 1 - s_first, t_row + 1 - t_first
                    # the paired rows predict the first token of a group: both start the same bytes
                    assert s_spans[s_token][0] == t_spans[t_token][0] or s_token == t_token == 0
                    starts.append(s_spans[s_token][0])
                assert starts == sorted(starts) and starts[0] == 0


def test_position_pairing_pairs_response_tokens_by_index(data):
    for _, batches in all_batches(data):
        for batch in batches:
            pairing = batch.pairings["uni_position"]
            for row in range(batch.record_ids.shape[0]):
                if batch.record_ids[row] < 0:
                    continue
                s_first, s_ids = _response_spans_of(data.student, batch.student, row)
                t_first, t_ids = _response_spans_of(data.teachers[1], batch.teachers["uni_position"], row)
                expected = [(s_first + i - 1, t_first + i - 1) for i in range(min(len(s_ids), len(t_ids)))]
                got = list(zip(pairing.student_index[row][pairing.mask[row]].tolist(),
                               pairing.teacher_index[row][pairing.mask[row]].tolist()))
                assert got == expected  # EOS excluded: distill_final_eos is off


def test_dtw_teacher_gets_one_to_one_pairs_and_a_valid_vocab_map(data):
    mapping = data.vocab_maps["slow_dtw"]
    assert mapping.shape == (len(data.student.tokenizer),) and mapping.dtype == torch.long
    assert int(mapping.min()) >= 0 and int(mapping.max()) < len(data.teachers[2].tokenizer)
    for _, batches in all_batches(data):
        for batch in batches:
            pairing = batch.pairings["slow_dtw"]
            for row in range(pairing.mask.shape[0]):
                rows = pairing.student_index[row][pairing.mask[row]].tolist()
                teacher_rows = pairing.teacher_index[row][pairing.mask[row]].tolist()
                assert len(set(rows)) == len(rows) and len(set(teacher_rows)) == len(teacher_rows)
                assert rows == sorted(rows) and teacher_rows == sorted(teacher_rows)


def test_final_eos_is_paired_only_when_asked():
    on = build(distill_final_eos=True)
    off = build(distill_final_eos=False)
    batch_on, batch_off = on.micro_batches(0, 0)[0], off.micro_batches(0, 0)[0]
    eos_row = lambda part, row: int((part.labels[row] != IGNORE).nonzero()[-1]) - 1
    rows_on = batch_on.pairings["uni_offsets"].student_index[0][batch_on.pairings["uni_offsets"].mask[0]].tolist()
    rows_off = batch_off.pairings["uni_offsets"].student_index[0][batch_off.pairings["uni_offsets"].mask[0]].tolist()
    assert rows_on == rows_off + [eos_row(batch_on.student, 0)]
    t_rows = batch_on.pairings["uni_offsets"].teacher_index[0][batch_on.pairings["uni_offsets"].mask[0]].tolist()
    assert t_rows[-1] == eos_row(batch_on.teachers["uni_offsets"], 0)  # EOS pairs with EOS
    # position: the EOS counts as one more response token on each side
    labelled = lambda part: int((part.labels[0] != IGNORE).sum())
    n_student, n_teacher = labelled(batch_on.student), labelled(batch_on.teachers["uni_position"])
    assert int(batch_on.pairings["uni_position"].mask[0].sum()) == min(n_student, n_teacher)
    assert int(batch_off.pairings["uni_position"].mask[0].sum()) == min(n_student, n_teacher) - 1
    # the dtw teacher appends no EOS, so there is no EOS pair for it either way
    dtw_on = batch_on.pairings["slow_dtw"]
    assert eos_row(batch_on.student, 0) not in dtw_on.student_index[0][dtw_on.mask[0]].tolist()


def test_same_tokenizer_offsets_equals_position_even_when_spans_are_per_character():
    tab_records = RecordSet([Record(i, f"p{i}", f"x\t{i}  y   {UNICODE_SAMPLES[i % 3]}", ("r",)) for i in range(6)])
    student = ModelSide("student", sp_slow(), Template())
    teachers = [ModelSide("same_offsets", sp_slow(), Template(few_shot=1), pairing="offsets"),
                ModelSide("same_position", sp_slow(), Template(few_shot=1), pairing="position")]
    data = build(tab_records, student=student, teachers=teachers)
    for _, batches in all_batches(data):
        for batch in batches:
            a, b = batch.pairings["same_offsets"], batch.pairings["same_position"]
            assert torch.equal(a.mask, b.mask)
            assert torch.equal(a.student_index[a.mask], b.student_index[b.mask])
            assert torch.equal(a.teacher_index[a.mask], b.teacher_index[b.mask])


# -- lengths, drops, vocab sizes, templates, cache -------------------------------------------------
def test_overlong_prompts_are_cut_from_the_left_and_long_responses_dropped():
    long_response = " ".join(UNICODE_SAMPLES) * 2
    records = RecordSet([Record(0, "short", "ok", ("ok",)), Record(1, "a long prompt " * 30, "fine answer", ("x",)),
                         Record(2, "p", long_response, ("x",))])
    teachers = [ModelSide("uni", unigram(), Template(), pairing="offsets")]
    data = build(records, teachers=teachers, max_length=40)
    assert data.num_records == 2
    assert data.dropped == {"response_too_long:student": 1}
    assert data.truncated_prompts["student"] == 1
    batch = data.micro_batches(0, 0)[0]
    row = batch.record_ids.tolist().index(1)
    ids = batch.student.input_ids[row][batch.student.attention_mask[row].bool()].tolist()
    assert len(ids) == 40 and ids[0] == data.student.tokenizer.bos_token_id  # BOS kept at the front
    tokenizer = data.student.tokenizer
    full_prompt = tokenizer.encode(render_plain("a long prompt " * 30), add_special_tokens=False)
    # the response is read after the prompt, in one text (no SentencePiece dummy prefix before it)
    joint = tokenizer.encode(render_plain("a long prompt " * 30) + "fine answer", add_special_tokens=False)
    assert joint[: len(full_prompt)] == full_prompt
    response_ids = joint[len(full_prompt) :]
    assert response_ids != tokenizer.encode("fine answer", add_special_tokens=False)  # alone: '▁f...'
    response_length = len(response_ids) + 1
    assert ids[1 : 40 - response_length] == full_prompt[-(39 - response_length):]
    assert ids[40 - response_length :] == response_ids + [tokenizer.eos_token_id]


def test_model_vocab_size_checks_and_padding():
    tokenizer = sp_bpe()
    with pytest.raises(ValueError, match="model_vocab_size 100 < len\\(tokenizer\\)"):
        build(student=ModelSide("student", tokenizer, Template(), model_vocab_size=100))
    padded = len(tokenizer) + 64  # Qwen-style embedding rows beyond the tokenizer
    data = build(student=ModelSide("student", tokenizer, Template(), model_vocab_size=padded))
    mapping = data.vocab_maps["slow_dtw"]
    assert mapping.shape == (padded,) and int(mapping.min()) >= 0
    assert int(mapping.max()) < len(data.teachers[2].tokenizer)


def test_chat_template_with_system_and_few_shot():
    chat_tokenizer = with_chat_template(unigram())
    teachers = [ModelSide("chat", chat_tokenizer, Template("chat", system="Be brief.", few_shot=1), pairing="offsets")]
    data = build(teachers=teachers)
    batch = data.micro_batches(0, 0)[0]
    record_id = int(batch.record_ids[0])
    record = next(r for r in make_records().records if r.id == record_id)
    example = make_records().records[0]
    part = batch.teachers["chat"]
    first = int((part.labels[0] != IGNORE).nonzero()[0])
    text = chat_tokenizer.decode(part.input_ids[0][:first].tolist(), clean_up_tokenization_spaces=False)
    assert text == (f"<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n{example.prompt}<|im_end|>\n"
                    f"<|im_start|>assistant\n{example.response}<|im_end|>\n<|im_start|>user\n{record.prompt}<|im_end|>\n"
                    "<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="template kind 'chat' but the tokenizer .* has no chat template"):
        build(teachers=[ModelSide("plain_only", unigram(), Template("chat"), pairing="offsets")])


def test_bad_sides_are_rejected():
    with pytest.raises(ValueError, match="pairing must be one of"):
        build(teachers=[ModelSide("t", unigram(), Template(), pairing="nearest")])
    with pytest.raises(ValueError, match="names must be unique"):
        build(teachers=[ModelSide("student", unigram(), Template(), pairing="offsets")])
    with pytest.raises(ValueError, match="rank must be in"):
        build(world_size=2, rank=2)
    with pytest.raises(ValueError, match="only used by kind='chat'"):
        Template(system="hi")


def test_tokenization_is_cached_per_distinct_tokenizer(tmp_path, monkeypatch):
    first = build(cache_dir=tmp_path)
    files = sorted(p.name for p in (tmp_path / "tokenized").glob("*.arrow"))
    # student, unigram plain (shared by two teachers), unigram few-shot, slow SentencePiece
    assert len(files) == 4

    def must_not_run(*args, **kwargs):
        raise AssertionError("a cached tokenization should have been loaded")

    monkeypatch.setattr(encode_module, "encode_prompt_responses", must_not_run)
    monkeypatch.setattr(encode_module, "offset_groups", must_not_run)
    monkeypatch.setattr(encode_module, "dtw_pairs", must_not_run)
    second = build(cache_dir=tmp_path)
    for x, y in zip(first.micro_batches(0, 1), second.micro_batches(0, 1)):
        assert torch.equal(x.student.input_ids, y.student.input_ids)
        for name in x.pairings:
            assert torch.equal(x.pairings[name].teacher_index, y.pairings[name].teacher_index)


@pytest.mark.parametrize("kind", ["gpt2", "wordpiece"])
def test_other_tokenizer_kinds_as_teachers(kind, records_by_id):
    tokenizer = BUILDERS[kind]()
    teachers = [ModelSide(kind, tokenizer, Template(), pairing="offsets"),
                ModelSide(f"{kind}_dtw", tokenizer, Template(), pairing="dtw")]
    data = build(teachers=teachers)
    for _, batches in all_batches(data):
        for batch in batches:
            part = batch.teachers[kind]
            for row, record_id in enumerate(batch.record_ids.tolist()):
                if record_id >= 0 and kind == "gpt2":
                    ids = part.labels[row][part.labels[row] != IGNORE].tolist()[:-1]
                    assert tokenizer.decode(ids, clean_up_tokenization_spaces=False) == records_by_id[record_id].response
            assert batch.pairings[kind].tokens > 0


def test_load_tokenizer_errors_and_pad_fix(tmp_path):
    from mlot_ds.data import load_tokenizer

    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="cannot load a tokenizer from"):
        load_tokenizer(tmp_path / "empty")
    assert gpt2().pad_token == "<|endoftext|>"  # GPT-2 has no pad token: EOS stands in
    assert wordpiece().pad_token == "[PAD]"


def test_load_tokenizer_adds_a_pad_only_when_unavoidable(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from mlot_ds.data import load_tokenizer

    bare = Tokenizer(models.WordLevel({"a": 0, "b": 1}, unk_token=None))
    bare.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=bare).save_pretrained(tmp_path / "bare")
    with pytest.warns(UserWarning, match="added '<pad>'"):
        tokenizer = load_tokenizer(tmp_path / "bare")
    assert tokenizer.pad_token == "<pad>" and tokenizer.pad_token_id == 2


def test_a_tokenizer_that_rewrites_text_is_reported():
    records = RecordSet([Record(i, "p", "non\u00a0breaking space", ("r",)) for i in range(3)])
    with pytest.warns(UserWarning, match="slow: for 3 of 3 records the response token ids do not decode back"):
        build(records, teachers=[ModelSide("slow", sp_slow(), Template(), pairing="offsets")])
