"""The ``alm`` method class: float64 loops, hidden path == full logits, gradients, the fused CE, the
offline cache round trip, a real offsets chunk layout, bad hyper-parameters, and one real 2-rank job."""

from __future__ import annotations

import json
import math
import os
import sys
from collections import Counter

import numpy as np
import pytest
import torch
from data_fixtures import gpt2, sp_bpe, unigram

from mlot_ds.losses import METHODS, LogitSource, MethodContext, TeacherView
from mlot_ds.losses.alm import (
    DIVERGENCES,
    AlmParams,
    AlmTeacher,
    ApproximateLikelihoodMatching,
    labelled_positions,
    token_chunks,
)
from mlot_ds.losses.ce import ce_per_sequence, masked_ce
from mlot_ds.pairing import ModelBatch, Pairing
from mlot_ds.pairing.surface import token_surface_bytes
from mlot_ds.teachers import cache
from tests.helpers import REPO, deepspeed_command, free_port, job_env, metrics, run_job, tiny_recipe_overrides

IGNORE = -100
S_IDS, S_ROWS = 37, 40  # student tokenizer ids, output rows (3 padding rows the tokenizer never emits)
T_IDS, T_ROWS = 29, 29


def fake_surfaces(count: int, seed: int) -> tuple:
    """Token surfaces: some special (None), some starting at a word boundary, the rest inside a word."""
    gen = np.random.default_rng(seed)
    out = []
    for i in range(count):
        if i % 11 == 0:
            out.append(None)
        else:
            out.append((b" " if gen.random() < 0.1 else b"") + b"x" * int(gen.integers(1, 3)))
    return tuple(out)


CONTEXT = MethodContext(student_surfaces=fake_surfaces(S_IDS, 1), teacher_surfaces=fake_surfaces(T_IDS, 2),
                        student_vocab=S_ROWS, teacher_vocab=T_ROWS)

# Per record: (student prompt length, teacher prompt length, groups as (student tokens, teacher tokens)).
RECORDS = {
    0: (2, 3, [(1, 2), (2, 1), (1, 1), (1, 3), (2, 2)]),
    1: (3, 1, [(2, 1), (1, 1), (1, 2)]),
    2: (1, 2, [(1, 1), (3, 1), (1, 1), (1, 1)]),
    3: (2, 2, [(1, 4)]),
}


def record(rid: int):
    """One record's token ids and logits on both sides (deterministic per record id)."""
    s_prompt, t_prompt, groups = RECORDS[rid]
    gen = torch.Generator().manual_seed(100 + rid)
    s_len = s_prompt + sum(g[0] for g in groups) + 1  # + EOS
    t_len = t_prompt + sum(g[1] for g in groups) + 1
    return {
        "s_ids": torch.randint(0, S_IDS, (s_len,), generator=gen), "t_ids": torch.randint(0, T_IDS, (t_len,), generator=gen),
        "s_logits": torch.randn(s_len, S_ROWS, generator=gen, dtype=torch.float64) * 2,
        "t_logits": torch.randn(t_len, T_ROWS, generator=gen, dtype=torch.float64) * 2,
        "s_prompt": s_prompt, "t_prompt": t_prompt, "groups": groups,
    }


def micro_batch(rids: list[int], *, eos_pair: bool = False, dtype=torch.float64):
    """A right-padded micro-batch as the pipeline builds it: labels (response + EOS), the offsets
    pairing (one pair per group, plus the EOS pair when ``eos_pair``) and its group stops.
    A record id of -1 is a filler row: record 0's tokens, no labels, no pairs."""
    recs = [record(r if r >= 0 else 0) for r in rids]
    s_len = max(len(r["s_ids"]) for r in recs) + 1
    t_len = max(len(r["t_ids"]) for r in recs) + 2
    batch = len(rids)
    out = {side: {"ids": torch.zeros(batch, n, dtype=torch.long), "att": torch.zeros(batch, n, dtype=torch.long),
                  "labels": torch.full((batch, n), IGNORE), "logits": torch.zeros(batch, n, v, dtype=torch.float64)}
           for side, n, v in (("s", s_len, S_ROWS), ("t", t_len, T_ROWS))}
    pairs = []
    for b, (rid, rec) in enumerate(zip(rids, recs)):
        for side in ("s", "t"):
            n = len(rec[f"{side}_ids"])
            out[side]["ids"][b, :n] = rec[f"{side}_ids"]
            out[side]["att"][b, :n] = 1
            out[side]["logits"][b, :n] = rec[f"{side}_logits"]
            if rid >= 0:
                start = rec[f"{side}_prompt"]
                out[side]["labels"][b, start:n] = rec[f"{side}_ids"][start:]
        row_pairs = []
        if rid >= 0:
            s_pos, t_pos = rec["s_prompt"], rec["t_prompt"]
            groups = rec["groups"] + ([(1, 1)] if eos_pair else [])
            for s_n, t_n in groups:
                # rows index .. stop - 1 predict the group's tokens at positions index + 1 .. stop
                row_pairs.append((s_pos - 1, s_pos - 1 + s_n, t_pos - 1, t_pos - 1 + t_n))
                s_pos, t_pos = s_pos + s_n, t_pos + t_n
        pairs.append(row_pairs)
    width = max(1, max(len(p) for p in pairs))
    fields = torch.zeros(4, batch, width, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.bool)
    for b, row_pairs in enumerate(pairs):
        for p, values in enumerate(row_pairs):
            fields[:, b, p] = torch.tensor(values)
            mask[b, p] = True
    pairing = Pairing(fields[0], fields[2], mask)
    view = TeacherView(pairing, ModelBatch(out["s"]["ids"], out["s"]["att"], out["s"]["labels"]),
                       ModelBatch(out["t"]["ids"], out["t"]["att"], out["t"]["labels"]), groups=(fields[1], fields[3]))
    return view, out["s"]["logits"].to(dtype), out["t"]["logits"].to(dtype), torch.tensor(rids), pairs


# ---------------------------------------------------------------------------------- float64 loops


def _lse(values):
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def _log1mexp(x):
    return math.log(-math.expm1(x))


def reference_divergence(lt, ls, divergence, tau, eps):
    if divergence == "abs":
        return abs(lt - ls)
    if divergence in ("joschu_k2", "joschu_k3"):
        r = (lt - ls) / tau
        return r * r / 2 if divergence == "joschu_k2" else math.exp(r) - 1 - r
    if divergence == "binary_kl_temp_limit":
        a, b = lt - eps, ls - eps
        return (a - b) + a * math.log(-b) - a * math.log(-a)
    a, b = lt / tau - eps, ls / tau - eps
    if divergence == "binary_ce":
        return -(math.exp(a) * b + (1 - math.exp(a)) * _log1mexp(b))
    if divergence == "reverse_binary_kl":
        return math.exp(b) * (b - a) + (1 - math.exp(b)) * (_log1mexp(b) - _log1mexp(a))
    return abs(math.exp(a) - math.exp(b))


def boundary_ids(surfaces, rows):
    return [i < len(surfaces) and (surfaces[i] is None or surfaces[i][:1] in (b" ", b"\t", b"\n")) for i in range(rows)]


def reference(view, s_logits, t_logits, pairs, params: AlmParams):
    """Sum of D over merged groups, the group count, and the student CE, with Python loops in float64."""
    s_mask = boundary_ids(CONTEXT.student_surfaces, S_ROWS)
    t_mask = boundary_ids(CONTEXT.teacher_surfaces, T_ROWS)

    def token(logits, ids, mask, b, q):
        """log p(token q) from row q - 1, and the boundary log-mass of row q."""
        prev, own = logits[b, q - 1].tolist(), logits[b, q].tolist()
        return (prev[int(ids[b, q])] - _lse(prev),
                _lse([v for v, m in zip(own, mask) if m]) - _lse(own))

    total, groups = 0.0, 0
    for b, row_pairs in enumerate(pairs):
        chunks = []
        for s_index, s_stop, t_index, t_stop in row_pairs:
            sides = []
            for logits, ids, mask, index, stop in ((t_logits, view.teacher.input_ids, t_mask, t_index, t_stop),
                                                  (s_logits, view.student.input_ids, s_mask, s_index, s_stop)):
                values = [token(logits.double(), ids, mask, b, q) for q in range(index + 1, stop + 1)]
                sides.append((min(0.0, sum(v[0] for v in values)), min(0.0, values[-1][1])))
            chunks.append(sides)
        members = []
        for c, (teacher, _) in enumerate(chunks):
            members.append(c)
            ends = math.exp(teacher[1]) > params.threshold if params.merge_by_boundary else True
            if ends or c == len(chunks) - 1:
                lt = sum(chunks[m][0][0] for m in members)
                ls = sum(chunks[m][1][0] for m in members)
                if params.append_boundary:
                    lt, ls = lt + chunks[members[-1]][0][1], ls + chunks[members[-1]][1][1]
                total += reference_divergence(lt, ls, params.divergence, params.binarization_temp, params.epsilon)
                groups += 1
                members = []
    ce = 0.0
    for b in range(s_logits.shape[0]):
        for q in range(1, s_logits.shape[1]):
            if int(view.student.labels[b, q]) != IGNORE:
                ce -= token(s_logits.double(), view.student.input_ids, s_mask, b, q)[0]
    return total, groups, ce


def method_for(**params) -> ApproximateLikelihoodMatching:
    return ApproximateLikelihoodMatching(AlmParams(**params), None, CONTEXT)


def run(method, view, s_logits, t_logits, *, ce=True):
    output = method.teacher(LogitSource(logits=t_logits), view, gold=True)
    counts = method.counts(output.reduced, view)
    terms = method.student(s_logits, output.reduced, view, ce_labels=view.student.labels if ce else None)
    return output, counts, terms


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("threshold", [0.1, 0.3])
@pytest.mark.parametrize("eos_pair", [False, True])
def test_the_class_matches_the_float64_loops(divergence, threshold, eos_pair):
    method = method_for(divergence=divergence, threshold=threshold)
    view, s_logits, t_logits, _, pairs = micro_batch([0, 1, -1, 2, 3], eos_pair=eos_pair)
    output, counts, terms = run(method, view, s_logits, t_logits)
    want, groups, ce = reference(view, s_logits, t_logits, pairs, method.params)
    assert terms["alm"].item() == pytest.approx(want, rel=1e-9, abs=1e-15)
    assert counts == {"chunks": float(groups)}
    # some chunks merged, not all (at least one group per sequence): the comparison is not trivial
    assert sum(1 for p in pairs if p) < groups < sum(len(p) for p in pairs)
    assert terms["ce"].item() == pytest.approx(ce, rel=1e-10)
    assert terms["ce"].item() == pytest.approx(masked_ce(s_logits, view.student.labels)["ce"].item(), rel=1e-10)
    gold = ce_per_sequence(t_logits, view.teacher.labels)
    torch.testing.assert_close(output.gold["ce"], gold["ce"])
    torch.testing.assert_close(output.gold["tokens"], gold["tokens"])


@pytest.mark.parametrize("options", [{"merge_by_boundary": False}, {"append_boundary": False},
                                     {"merge_by_boundary": False, "append_boundary": False},
                                     {"binarization_temp": 7.0, "epsilon": 1e-3}])
def test_other_modes_match_the_float64_loops(options):
    method = method_for(**options)
    view, s_logits, t_logits, _, pairs = micro_batch([3, 0, 1])
    _, counts, terms = run(method, view, s_logits, t_logits, ce=False)
    want, groups, _ = reference(view, s_logits, t_logits, pairs, method.params)
    assert set(terms) == {"alm"}
    assert terms["alm"].item() == pytest.approx(want, rel=1e-9)
    assert counts["chunks"] == groups
    if not options.get("merge_by_boundary", True):
        assert groups == sum(len(p) for p in pairs)  # one group per chunk


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_logits_stay_close_to_the_float64_loops(dtype):
    method = method_for()
    view, s_logits, t_logits, _, pairs = micro_batch([0, 1, 2], dtype=dtype)
    _, counts, terms = run(method, view, s_logits, t_logits)
    want, groups, ce = reference(view, s_logits, t_logits, pairs, method.params)
    assert terms["alm"].dtype == torch.float32 and terms["ce"].dtype == torch.float32
    assert terms["alm"].item() == pytest.approx(want, rel=2e-4)
    assert terms["ce"].item() == pytest.approx(ce, rel=1e-5)
    assert counts["chunks"] == groups


def test_hidden_states_and_the_output_layer_equal_full_logits():
    gen = torch.Generator().manual_seed(7)
    view, _, _, _, _ = micro_batch([0, 1, -1, 2])
    batch, length = view.teacher.input_ids.shape
    hidden = torch.randn(batch, length, 6, generator=gen)
    weight = torch.randn(T_ROWS, 6, generator=gen)
    bias = torch.randn(T_ROWS, generator=gen)
    method = method_for()
    full = method.teacher(LogitSource(logits=hidden @ weight.T + bias), view, gold=True)
    # head_chunk_elements of 3 rows: the teacher side reads many blocks
    chunked = method.teacher(LogitSource(hidden=hidden, weight=weight, bias=bias, head_chunk_elements=3 * T_ROWS),
                             view, gold=True)
    for name in AlmTeacher._fields:
        torch.testing.assert_close(getattr(chunked.reduced, name), getattr(full.reduced, name), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(chunked.gold["ce"], full.gold["ce"], rtol=1e-6, atol=1e-6)
    assert torch.equal(chunked.gold["tokens"], full.gold["tokens"])
    assert method.counts(chunked.reduced, view) == method.counts(full.reduced, view)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_gradcheck_of_the_student_side(divergence):
    method = method_for(divergence=divergence)
    view, s_logits, t_logits, _, _ = micro_batch([0, 2])
    reduced = method.teacher(LogitSource(logits=t_logits), view, gold=False).reduced
    s_logits.requires_grad_(True)
    # scaled up so that fast mode's random projection sits well above gradcheck's atol (tau = 100)
    assert torch.autograd.gradcheck(lambda x: 1e4 * method.student(x, reduced, view)["alm"], (s_logits,), fast_mode=True)


def test_the_fused_ce_has_the_gradient_of_masked_ce():
    method = method_for()
    view, s_logits, t_logits, _, _ = micro_batch([1, 0, -1])
    reduced = method.teacher(LogitSource(logits=t_logits), view, gold=False).reduced
    fused = s_logits.clone().requires_grad_(True)
    terms = method.student(fused, reduced, view, ce_labels=view.student.labels)
    terms["ce"].backward()
    plain = s_logits.clone().requires_grad_(True)
    masked_ce(plain, view.student.labels)["ce"].backward()
    torch.testing.assert_close(fused.grad, plain.grad, rtol=1e-10, atol=1e-12)
    # and the ALM term's gradient does not change when the CE shares its pass
    alone, shared = s_logits.clone().requires_grad_(True), s_logits.clone().requires_grad_(True)
    method.student(alone, reduced, view)["alm"].backward()
    method.student(shared, reduced, view, ce_labels=view.student.labels)["alm"].backward()
    torch.testing.assert_close(shared.grad, alone.grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("divergence", ["binary_ce", "reverse_binary_kl", "binary_kl_temp_limit"])
def test_a_student_equal_to_the_teacher_gets_zero_gradient(divergence):
    """Same tokenizer, same logits: every chunk likelihood and boundary mass agree, so the binary-KL
    forms are at their minimum (binary CE = binary KL + a teacher-only constant)."""
    surfaces = fake_surfaces(S_IDS, 1)
    context = MethodContext(student_surfaces=surfaces, teacher_surfaces=surfaces, student_vocab=S_ROWS,
                            teacher_vocab=S_ROWS, same_tokenizer=True)
    method = ApproximateLikelihoodMatching(AlmParams(divergence=divergence), None, context)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, S_IDS, (2, 10), generator=gen)
    labels = torch.full((2, 10), IGNORE)
    labels[0, 3:10], labels[1, 2:8] = ids[0, 3:10], ids[1, 2:8]
    side = ModelBatch(ids, torch.ones_like(ids), labels)
    # one pair per response token (the EOS-like last token is labelled but not paired)
    rows = [list(range(2, 8)), list(range(1, 6))]
    index = torch.tensor([r + [0] * (6 - len(r)) for r in rows])
    mask = torch.tensor([[True] * len(r) + [False] * (6 - len(r)) for r in rows])
    view = TeacherView(Pairing(index, index, mask), side, side, groups=((index + 1) * mask, (index + 1) * mask))
    logits = torch.randn(2, 10, S_ROWS, generator=gen, dtype=torch.float64) * 2
    reduced = method.teacher(LogitSource(logits=logits), view, gold=False).reduced
    assert 1 < method.counts(reduced, view)["chunks"] < 11
    student = logits.clone().requires_grad_(True)
    method.student(student, reduced, view)["alm"].backward()
    assert student.grad.abs().max().item() < 1e-12
    # ... and not zero once the student differs (the check can fail)
    moved = (logits + 0.3 * torch.randn(2, 10, S_ROWS, generator=gen, dtype=torch.float64)).requires_grad_(True)
    method.student(moved, reduced, view)["alm"].backward()
    assert moved.grad.abs().max().item() > 1e-5


# ------------------------------------------------------------------------------------- the cache


def test_the_offline_cache_gives_the_live_teacher(tmp_path):
    method = method_for()
    settings = method.cache_settings()
    assert settings["kind"] == "alm" and set(settings) == {"kind", "boundary_mask"}
    assert method_for(threshold=0.3, divergence="abs").cache_settings() == settings  # params do not change the cache
    binding = {"checkpoint": "c", "tokenizer": "t", "template": {}, "data": "d", "pairing": "offsets", "loss": settings}
    for chunk, rids in enumerate([[0, 3, 1], [2, -1]]):
        view, _, t_logits, record_ids, _ = micro_batch(rids)
        output = method.teacher(LogitSource(logits=t_logits), view, gold=True)
        cache.write_chunk(tmp_path, chunk, [cache.chunk_tensors(method, output, view, record_ids)])
    manifest = {"format": cache.FORMAT_VERSION, "binding": binding, "num_records": 4, "chunk_records": 3, "num_chunks": 2}
    (tmp_path / cache.MANIFEST).write_text(json.dumps(manifest))
    opened = cache.TeacherCache.open(tmp_path, binding, "teachers[0]", num_records=4)
    # another composition: records of both chunks, a filler row, another padding width
    view, s_logits, t_logits, record_ids, _ = micro_batch([2, -1, 0, 1])
    live = method.teacher(LogitSource(logits=t_logits), view, gold=True)
    cached = opened.read(record_ids, view, method, torch.device("cpu"))
    for name in AlmTeacher._fields:
        torch.testing.assert_close(getattr(cached.reduced, name), getattr(live.reduced, name).to(
            getattr(cached.reduced, name).dtype), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cached.gold["ce"], live.gold["ce"], rtol=1e-6, atol=1e-6)
    assert method.counts(cached.reduced, view) == method.counts(live.reduced, view)
    live_terms = method.student(s_logits, live.reduced, view, ce_labels=view.student.labels)
    cached_terms = method.student(s_logits, cached.reduced, view, ce_labels=view.student.labels)
    for name, value in live_terms.items():
        assert cached_terms[name].item() == pytest.approx(value.item(), rel=1e-5)


# --------------------------------------------------------------------------- a real chunk layout


def test_chunks_of_a_real_offsets_pairing_by_hand():
    """GPT-2 student, SentencePiece teacher (tiny fixture vocabulary), through the data pipeline."""
    from mlot_ds.data import DistillationData, ModelSide, Record, RecordSet, Template
    from mlot_ds.engine.trainer import teacher_view

    records = RecordSet([Record(0, "Q:", "the quick brown fox jumps", ("r",)), Record(1, "Q:", "Café naïve", ("r",))],
                        Counter())
    student_tok, teacher_tok = gpt2(), sp_bpe()
    expected = {
        (False, 0): [["the"], ["Ġquick"], ["Ġbrown"], ["Ġfox"], ["Ġjumps"]],
        (False, 1): [["C"], ["af"], ["Ã©"], ["ĠnaÃ¯ve"]],
    }
    expected_teacher = {
        0: [["t", "he"], ["▁qu", "i", "ck"], ["▁", "b", "r", "o", "w", "n"], ["▁", "f", "o", "x"], ["▁jumps"]],
        1: [["<0x43>"], ["a", "f"], ["<0xC3>", "<0xA9>"], ["▁", "n", "a", "<0xC3>", "<0xAF>", "v", "e"]],
    }
    for eos in (False, True):
        data = DistillationData(records, ModelSide("student", student_tok, Template(), distill_final_eos=eos),
                                [ModelSide("sp", teacher_tok, Template(), pairing="offsets", views=frozenset({"groups"}))],
                                max_length=64, micro_batch_size=2, grad_accum=1, world_size=1, rank=0, seed=0,
                                cache_dir=None, progress=False)
        view = teacher_view(data.collate(np.array([0, 1]), 0), "sp")
        s_chunk = token_chunks(view.pairing.student_index, view.groups[0], view.pairing.mask, view.student.input_ids.shape[1])
        t_chunk = token_chunks(view.pairing.teacher_index, view.groups[1], view.pairing.mask, view.teacher.input_ids.shape[1])
        for b in range(2):
            s_tokens = student_tok.convert_ids_to_tokens(view.student.input_ids[b].tolist())
            t_tokens = teacher_tok.convert_ids_to_tokens(view.teacher.input_ids[b].tolist())
            s_want = expected[(False, b)] + ([["<|endoftext|>"]] if eos else [])
            t_want = expected_teacher[b] + ([["</s>"]] if eos else [])
            assert [[s_tokens[q] for q in range(len(s_tokens)) if s_chunk[b, q] == c] for c in range(len(s_want))] == s_want
            assert [[t_tokens[q] for q in range(len(t_tokens)) if t_chunk[b, q] == c] for c in range(len(t_want))] == t_want
            assert int((s_chunk[b] >= 0).sum()) == sum(map(len, s_want))  # nothing else is in a chunk
            assert int((t_chunk[b] >= 0).sum()) == sum(map(len, t_want))
        # and the class runs on it: the chunks exist on both sides and every chunk token is labelled
        context = MethodContext(student_surfaces=tuple(token_surface_bytes(student_tok)),
                                teacher_surfaces=tuple(token_surface_bytes(teacher_tok)),
                                student_vocab=len(student_tok), teacher_vocab=len(teacher_tok))
        method = ApproximateLikelihoodMatching(None, None, context)
        gen = torch.Generator().manual_seed(0)
        t_logits = torch.randn(*view.teacher.input_ids.shape, len(teacher_tok), generator=gen)
        s_logits = torch.randn(*view.student.input_ids.shape, len(student_tok), generator=gen)
        reduced = method.teacher(LogitSource(logits=t_logits), view, gold=False).reduced
        assert 2 <= method.counts(reduced, view)["chunks"] <= 9 + 2 * eos
        assert torch.isfinite(method.student(s_logits, reduced, view)["alm"])


def test_a_micro_batch_of_filler_rows_counts_nothing_and_keeps_a_graph():
    method = method_for()
    view, s_logits, t_logits, _, _ = micro_batch([-1, -1])
    s_logits.requires_grad_(True)
    output, counts, terms = run(method, view, s_logits, t_logits)
    assert counts == {"chunks": 0.0} and output.reduced.chunk.shape == (2, 0)
    assert output.gold["tokens"].tolist() == [0.0, 0.0]
    (terms["alm"] + terms["ce"]).backward()  # every rank runs the same backward, with or without chunks
    assert terms["alm"].item() == 0.0 and s_logits.grad.abs().max().item() == 0.0


def test_token_chunks_and_labelled_positions_refuse_bad_layouts():
    labels = torch.tensor([[5, -100, 3, 4, -100], [-100, -100, -100, -100, -100]])
    index, mask = labelled_positions(labels)  # position 0 has no predicting row
    assert index.tolist() == [[2, 3], [0, 0]] and mask.tolist() == [[True, True], [False, False]]
    index, stop, mask = torch.tensor([[0, 2]]), torch.tensor([[2, 3]]), torch.tensor([[True, True]])
    assert token_chunks(index, stop, mask, 5).tolist() == [[-1, 0, 0, 1, -1]]
    with pytest.raises(ValueError, match="overlap"):
        token_chunks(index, torch.tensor([[3, 4]]), mask, 5)
    with pytest.raises(ValueError, match="no token"):
        token_chunks(index, torch.tensor([[0, 3]]), mask, 5)
    with pytest.raises(ValueError, match="out of range"):
        token_chunks(index, torch.tensor([[2, 5]]), mask, 5)


# ------------------------------------------------------------------------------ settings and errors


def test_class_attributes_and_defaults():
    cls = METHODS["alm"]
    assert cls is ApproximateLikelihoodMatching
    assert (cls.terms, cls.denominator, cls.pairings) == (("alm", "latents"), "chunks", ("offsets",))
    assert cls.fuses_ce and cls.cacheable
    assert cls.needs == {"groups", "surfaces"}
    assert cls.default_weights(AlmParams()) == {"alm": 1.0}
    assert AlmParams() == AlmParams("binary_ce", 100.0, 0.1, 1e-6, True, True)
    assert cls(None, {"alm": 0.5}, CONTEXT).term_weights == {"alm": 0.5}


@pytest.mark.parametrize("builder", [gpt2, sp_bpe, unigram])
def test_check_with_real_tokenizers(builder):
    surfaces = tuple(token_surface_bytes(builder()))
    good = MethodContext(student_surfaces=surfaces, teacher_surfaces=surfaces, student_vocab=len(surfaces) + 5,
                         teacher_vocab=len(surfaces))
    ApproximateLikelihoodMatching.check(AlmParams(), None)
    ApproximateLikelihoodMatching.check(AlmParams(), good)
    mask = ApproximateLikelihoodMatching(None, None, good)._masks["student"]
    assert mask.shape == (len(surfaces) + 5,) and 0 < int(mask.sum()) < len(surfaces) and not mask[len(surfaces):].any()
    with pytest.raises(ValueError, match=r"teacher: the tokenizer has \d+ ids but the output layer only"):
        ApproximateLikelihoodMatching.check(AlmParams(), MethodContext(
            student_surfaces=surfaces, teacher_surfaces=surfaces, student_vocab=len(surfaces), teacher_vocab=10))
    with pytest.raises(ValueError, match="student tokenizer's token surfaces"):
        ApproximateLikelihoodMatching.check(AlmParams(), MethodContext(teacher_surfaces=surfaces))
    with pytest.raises(ValueError, match="no boundary token"):
        ApproximateLikelihoodMatching.check(AlmParams(), MethodContext(
            student_surfaces=(b"a", b"b"), teacher_surfaces=surfaces))


def test_a_method_without_surfaces_or_groups_says_what_it_needs():
    view, s_logits, t_logits, _, _ = micro_batch([0])
    with pytest.raises(ValueError, match="token surfaces"):
        ApproximateLikelihoodMatching().teacher(LogitSource(logits=t_logits), view, gold=False)
    with pytest.raises(ValueError, match="offsets groups"):
        method_for().teacher(LogitSource(logits=t_logits), view._replace(groups=None), gold=False)
    with pytest.raises(ValueError, match="boundary mask has 40 ids but the student logits have 39"):
        reduced = method_for().teacher(LogitSource(logits=t_logits), view, gold=False).reduced
        method_for().student(s_logits[..., :-1], reduced, view)


@pytest.mark.parametrize("param,value,message", [
    ("threshold", "1.0", "expected a number > 0 and < 1"), ("threshold", "0", "expected a number > 0 and < 1"),
    ("binarization_temp", "-1", "expected a positive number"), ("epsilon", "0", "expected a positive number"),
    ("divergence", "kl", "expected one of binary_ce, reverse_binary_kl"),
    ("merge_by_boundary", "maybe", "expected true or false"), ("threshold", ".nan", "expected a finite number"),
])
def test_bad_hyper_parameters_are_one_line_through_the_cli(param, value, message, capsys):
    from mlot_ds.engine.cli import main

    code = main(["--config", str(REPO / "ds_configs" / "zero3.json"), "--dry-run",
                 f"teachers.qwen.loss={{kind: alm, {param}: {value}}}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("error:") == 1 and f"teachers[1].loss.{param}: {message}" in err, err


# ------------------------------------------------------------------------- one real 2-rank job


ZERO3 = str(REPO / "ds_configs" / "zero3.json")
ALM = {"teachers.qwen.loss": "{kind: alm}", "train.max_steps": 3, "data.eval": "null", "export.enabled": "false"}


@pytest.mark.slow
@pytest.mark.multirank
def test_two_ranks_equal_one_rank_and_the_cache_equals_live(tmp_path, tiny_zoo):
    """The tiny demo with ALM on qwen (llama, opt: MultiLevelOT): 2 ranks == 1 rank x 2 accumulation
    steps, and qwen served from an offline cache built by tools/cache_teachers.py == live."""
    # A hook counts the cached teacher's reads, so the cached run is known to use the cache.
    hook, reads = tmp_path / "hook", tmp_path / "cache_reads.txt"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') is not None and os.environ.get('ALM_CACHE_READS'):\n"
        "    import mlot_ds.teachers.cache as c\n"
        "    original = c.TeacherCache.read\n"
        "    def read(self, *args, **kwargs):\n"
        "        with open(os.environ['ALM_CACHE_READS'], 'a') as log:\n"
        "            log.write(self.where + '\\n')\n"
        "        return original(self, *args, **kwargs)\n"
        "    c.TeacherCache.read = read\n"
    )
    env = job_env(tiny_zoo)
    shared = {**ALM, "data.cache_dir": str(tmp_path / "cache")}

    def train(name, ranks, **extra):
        command = deepspeed_command(ranks, ["--config", ZERO3, *tiny_recipe_overrides(tmp_path / name, **shared, **extra)],
                                    free_port())
        run_env = job_env(tiny_zoo, PYTHONPATH=f"{hook}{os.pathsep}{REPO}", ALM_CACHE_READS=str(reads))
        result = run_job(command, run_env, tmp_path / f"{name}.log")
        assert result.returncode == 0, result.log_text[-4000:]
        return metrics(tmp_path / name)

    tool = [sys.executable, str(REPO / "tools" / "cache_teachers.py"), "--teachers", "qwen", "--chunk-records", "8",
            *tiny_recipe_overrides(tmp_path / "build", **shared)]
    built = run_job(tool, env, tmp_path / "build.log")
    assert built.returncode == 0, built.log_text[-4000:]
    manifest = json.loads((tmp_path / "cache" / "teachers" / "qwen" / "manifest.json").read_text())
    assert manifest["binding"]["loss"]["kind"] == "alm"
    two = train("two", 2)
    one = train("one", 1, **{"train.grad_accum": 2})
    assert not reads.exists()
    cached = train("cached", 1, **{"train.grad_accum": 2, "teachers.qwen.source": "cache"})
    assert reads.read_text().splitlines() == ["teachers[1]"] * 6  # 3 steps x 2 micro-batches, qwen only
    keys = ["train/loss", "train/ce", "teacher/qwen/alm", "teacher/qwen/kd", "teacher/llama/had", "teacher/opt/sd"]
    assert sorted(two) == [1, 2, 3]
    for step in (1, 2, 3):
        assert two[step]["teacher/qwen/alm"] > 0
        for key in keys:
            assert two[step][key] == pytest.approx(one[step][key], rel=1e-5, abs=1e-7), (step, key)
            assert cached[step][key] == pytest.approx(one[step][key], rel=1e-5, abs=1e-7), ("cache", step, key)

