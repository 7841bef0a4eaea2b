"""The teacher cache format: what is written is what the live path gives (to bf16), read back per
record across chunks; bindings, digests and incomplete builds give one clear error each."""

from __future__ import annotations

import json

import pytest
import torch

from mlot_ds.losses import METHODS, LogitSource, MethodContext, TeacherView
from mlot_ds.losses.ce import ce_per_sequence
from mlot_ds.losses.mlot import MlotParams
from mlot_ds.losses.uld import SortedHead, UldParams
from mlot_ds.pairing import ModelBatch, pack_pairs
from mlot_ds.teachers import cache

TEACHER_VOCAB, STUDENT_VOCAB = 70, 50
BINDING = {"checkpoint": "c1", "tokenizer": "t1", "template": {"kind": "plain"}, "data": "d1", "pairing": "offsets",
           "loss": {"kind": "mlot", "k": 6, "temperatures": [1.0, 2.0]}}


def micro_batch(seed: int, record_ids: list[int]):
    """Teacher inputs, logits, labels and a pairing; a record id of -1 is a filler row (no labels, no pairs)."""
    gen = torch.Generator().manual_seed(seed)
    batch = len(record_ids)
    input_ids = torch.randint(0, TEACHER_VOCAB, (batch, 12), generator=gen)
    attention = torch.ones(batch, 12, dtype=torch.long)
    attention[0, 10:] = 0
    labels = torch.full((batch, 12), -100)
    pairs = []
    for b, record in enumerate(record_ids):
        if record < 0:
            pairs.append([])
            continue
        start = 3 + b
        labels[b, start:10] = input_ids[b, start:10]
        pairs.append([(p, p + 1) for p in range(start - 1, 9)])
    logits = torch.randn(batch, 12, TEACHER_VOCAB, generator=gen) * 2
    return ModelBatch(input_ids, attention, labels), logits, pack_pairs(pairs), torch.tensor(record_ids)


def method_for(kind: str):
    if kind == "mlot":
        return METHODS["mlot"](MlotParams(k=6))
    student_to_teacher = torch.randint(0, TEACHER_VOCAB, (STUDENT_VOCAB,), generator=torch.Generator().manual_seed(9))
    params = UldParams(cache_head=TEACHER_VOCAB) if kind == "uld" else None
    return METHODS[kind](params, None, MethodContext(student_to_teacher=student_to_teacher if kind == "mined" else None))


def view_of(inputs, pairing) -> TeacherView:
    return TeacherView(pairing, inputs, inputs)  # the student's tensors are not read by these methods' teacher side


def build(folder, kind, batches):
    """Write one chunk per micro-batch, as tools/cache_teachers.py does, and the manifest."""
    method = method_for(kind)
    folder.mkdir(parents=True, exist_ok=True)
    for chunk, (inputs, logits, pairing, record_ids) in enumerate(batches):
        output = method.teacher(LogitSource(logits=logits), view_of(inputs, pairing), gold=True)
        cache.write_chunk(folder, chunk, [cache.chunk_tensors(method, output, view_of(inputs, pairing), record_ids)])
    binding = dict(BINDING, loss=method.cache_settings())
    manifest = {"format": cache.FORMAT_VERSION, "binding": binding, "num_records": 5, "chunk_records": 3,
                "num_chunks": len(batches)}
    (folder / cache.MANIFEST).write_text(json.dumps(manifest))
    return method, binding


def two_chunks():
    return [micro_batch(0, [4, 0, 7]), micro_batch(1, [2, 9])]


@pytest.mark.parametrize("kind", ["mlot", "uld", "mined"])
def test_a_batch_mixing_records_of_two_chunks_reads_back_as_the_live_teacher(tmp_path, kind):
    method, binding = build(tmp_path / kind, kind, two_chunks())
    opened = cache.TeacherCache.open(tmp_path / kind, binding, "teachers[0]", num_records=5)
    # A new micro-batch: records 9 and 4 (from different chunks), then a filler row.
    first, second = two_chunks()
    rows = [(second, 1), (first, 0), (first, 1)]
    inputs = ModelBatch(
        *(torch.stack([getattr(part[0], f)[b] for part, b in rows]) for f in ("input_ids", "attention_mask", "labels"))
    )
    inputs.labels[2] = -100
    logits = torch.stack([part[1][b] for part, b in rows])
    pairs = [[(p, p + 1) for p in range(3, 9)], [(p, p + 1) for p in range(2, 9)], []]
    pairing, record_ids = pack_pairs(pairs), torch.tensor([9, 4, -1])
    live = method.teacher(LogitSource(logits=logits), view_of(inputs, pairing), gold=False).reduced
    reduced, gold = opened.read(record_ids, view_of(inputs, pairing), method, torch.device("cpu"))
    expected_gold = ce_per_sequence(logits, inputs.labels)
    torch.testing.assert_close(gold["ce"], expected_gold["ce"])
    torch.testing.assert_close(gold["tokens"], expected_gold["tokens"])
    student = torch.randn(3, 12, STUDENT_VOCAB, generator=torch.Generator().manual_seed(5))
    student_view = TeacherView(pairing, inputs, inputs)
    live_terms = method.student(student, live, student_view)
    cached_terms = method.student(student, reduced, student_view)
    for name, value in live_terms.items():
        torch.testing.assert_close(cached_terms[name], value, rtol=1e-2, atol=1e-3)
    if kind == "mlot":
        assert torch.equal(reduced.indices[:, :2], live.indices[:, :2])
        torch.testing.assert_close(reduced.values, live.values, rtol=8e-3, atol=1e-6)  # bf16 storage
    elif kind == "uld":
        assert isinstance(reduced, SortedHead) and reduced.probs.shape == (3, 7, TEACHER_VOCAB)
        assert float(reduced.tail.abs().max()) < 1e-6
    else:
        torch.testing.assert_close(reduced[pairing.mask], live[pairing.mask], rtol=8e-3, atol=1e-2)  # padded pairs: unused


def test_a_record_with_other_tokens_or_pairs_is_refused(tmp_path):
    method, binding = build(tmp_path, "mlot", two_chunks())
    opened = cache.TeacherCache.open(tmp_path, binding, "teachers[1]", num_records=5)
    inputs, _, pairing, record_ids = two_chunks()[0]
    opened.read(record_ids, view_of(inputs, pairing), method, torch.device("cpu"))
    changed = ModelBatch(inputs.input_ids.clone(), inputs.attention_mask, inputs.labels)
    changed.input_ids[1, 0] += 1
    with pytest.raises(cache.TeacherCacheError, match=r"teachers\[1\]: record 0 was cached from other tokens"):
        opened.read(record_ids, view_of(changed, pairing), method, torch.device("cpu"))
    with pytest.raises(cache.TeacherCacheError, match="record 5 is not in the cache"):
        opened.read(torch.tensor([4, 5, 7]), view_of(inputs, pairing), method, torch.device("cpu"))


def test_open_names_every_binding_that_differs(tmp_path):
    _, binding = build(tmp_path, "mlot", two_chunks())
    other = dict(binding, data="d2", loss={"kind": "mlot", "k": 20, "temperatures": [1.0, 2.0]})
    with pytest.raises(cache.TeacherCacheError) as error:
        cache.TeacherCache.open(tmp_path, other, "teachers[2]", num_records=5)
    message = str(error.value)
    assert message.startswith("teachers[2]: the teacher cache")
    assert "data (cache: 'd1', this run: 'd2')" in message and "'k': 20" in message
    assert "checkpoint" not in message and "tokenizer" not in message


def test_open_refuses_a_missing_an_incomplete_or_a_resized_cache(tmp_path):
    with pytest.raises(cache.TeacherCacheError, match="does not exist; build it with tools/cache_teachers.py"):
        cache.TeacherCache.open(tmp_path / "nothing", BINDING, "teachers[0]", num_records=5)
    _, binding = build(tmp_path, "mlot", two_chunks())
    with pytest.raises(cache.TeacherCacheError, match="holds 5 records, this run trains on 6"):
        cache.TeacherCache.open(tmp_path, binding, "teachers[0]", num_records=6)
    cache.chunk_path(tmp_path, 1).unlink()
    with pytest.raises(cache.TeacherCacheError, match=r"incomplete \(1 of 2 chunks missing\)"):
        cache.TeacherCache.open(tmp_path, binding, "teachers[0]", num_records=5)


def test_prepare_folder_resumes_the_same_setup_and_refuses_another(tmp_path):
    manifest = {"format": cache.FORMAT_VERSION, "binding": BINDING, "num_records": 5, "chunk_records": 3, "num_chunks": 2}
    cache.prepare_folder(tmp_path, manifest, "teachers[0]", overwrite=False)
    cache.chunk_path(tmp_path, 0).write_bytes(b"done")
    cache.prepare_folder(tmp_path, manifest, "teachers[0]", overwrite=False)  # same setup: resume
    assert cache.pending_chunks(tmp_path, 2, None) == [1]
    other = dict(manifest, binding=dict(BINDING, tokenizer="t2"))
    with pytest.raises(cache.TeacherCacheError, match="tokenizer"):
        cache.prepare_folder(tmp_path, other, "teachers[0]", overwrite=False)
    with pytest.raises(cache.TeacherCacheError, match="another layout"):
        cache.prepare_folder(tmp_path, dict(manifest, chunk_records=4), "teachers[0]", overwrite=False)
    cache.prepare_folder(tmp_path, other, "teachers[0]", overwrite=True)
    assert cache.pending_chunks(tmp_path, 2, None) == [0, 1]


def test_lockstep_rounds_give_every_rank_the_same_number_of_forwards():
    sizes = [8, 8, 8, 3]
    schedule = list(cache.rounds([0, 2, 3], sizes, micro_batch_size=2, world=2))
    assert schedule == [([0, 2], 4), ([3, None], 2)]
    assert list(cache.rounds([], sizes, 2, 2)) == []


def test_checkpoint_hash_follows_config_and_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(bytes(300_000))
    before = cache.checkpoint_hash(tmp_path)
    assert cache.checkpoint_hash(tmp_path) == before
    data = bytearray(weights.read_bytes())
    data[-1] = 1  # the last block is always sampled
    weights.write_bytes(bytes(data))
    assert cache.checkpoint_hash(tmp_path) != before
    (tmp_path / "config.json").write_text('{"a": 1}')
    assert len({before, cache.checkpoint_hash(tmp_path)}) == 2


def test_the_official_method_and_token_ranking_cannot_be_cached():
    from mlot_ds.losses.official import OfficialParams

    assert "whole batch" in METHODS["official"].cache_problem(OfficialParams())
    assert "ranking 'token'" in METHODS["mlot"].cache_problem(MlotParams(ranking="token"))
    assert METHODS["mlot"].cache_problem(MlotParams()) is None
