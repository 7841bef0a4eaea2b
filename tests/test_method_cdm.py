"""CDM as a method class (``loss.kind: cdm``): the class against a float64 loop reference, the hidden-state
teacher path, gradients (the student does get a KD gradient), the offline cache round trip, the recipe's
errors, and one real 2-rank ZeRO-3 job (== 1 rank x 2 accumulation steps == the same run from a cache)."""

from __future__ import annotations

import json
import math
import random
import re
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mlot_ds.losses import METHODS, LogitSource, MethodContext, TeacherView
from mlot_ds.losses.cdm import CdmParams, CdmTeacher, ContextualDynamicMapping
from mlot_ds.losses.ce import ce_per_sequence
from mlot_ds.pairing import ModelBatch, pack_pairs
from mlot_ds.teachers import cache
from tests.helpers import REPO, ZERO3, deepspeed_command, free_port, job_env, metrics, run_job, tiny_recipe_overrides

STUDENT_VOCAB, TEACHER_VOCAB, TEACHER_TOKENIZER = 40, 50, 46  # teacher output rows 46..49: padding without text
S_EOS, T_UNK, T_EOS = 0, 0, 1


def toy_surfaces(seed: int = 0):
    """Two vocabularies over "abc " sharing some strings; the student's id 0 and the teacher's ids 0, 1 are specials."""
    generator = random.Random(seed)
    pool: set[bytes] = set()
    while len(pool) < 70:
        pool.add(bytes(generator.choice(b"abc ") for _ in range(generator.randint(1, 4))))
    strings = sorted(pool)
    generator.shuffle(strings)
    return tuple([None] + strings[:39]), tuple([None, None] + strings[26:70])


def context(seed: int = 0) -> MethodContext:
    s_surf, t_surf = toy_surfaces(seed)
    return MethodContext(student_surfaces=s_surf, teacher_surfaces=t_surf, student_vocab=STUDENT_VOCAB,
                         teacher_vocab=TEACHER_VOCAB)


# ------------------------------------------------------------------------------ batches


# Per sequence: (student prompt, student text tokens, student EOS?), (teacher prompt, text tokens, EOS?).
LAYOUT = [((2, 6, True), (3, 7, True)),  # both end with EOS: aligned, and paired in the map
          ((1, 5, True), (2, 8, False)),  # the student's EOS has no partner: left out
          ((3, 4, False), (1, 5, True)),  # the teacher's EOS has no partner: left out
          None]  # a filler row: no labels
TS, TT = 14, 16


def side_batch(generator, layout, seq_len, vocab_text, eos_id, first_text):
    ids = torch.randint(first_text, vocab_text, (len(layout), seq_len), generator=generator)
    labels = torch.full((len(layout), seq_len), -100)
    attention = torch.ones(len(layout), seq_len, dtype=torch.long)
    for b, spec in enumerate(layout):
        if spec is None:
            continue
        prompt, text, eos = spec
        stop = prompt + text
        if eos:
            ids[b, stop] = eos_id
            stop += 1
        labels[b, prompt:stop] = ids[b, prompt:stop]
        attention[b, stop:] = 0
    return ModelBatch(ids, attention, labels)


def toy_batch(seed: int, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    student = side_batch(generator, [None if x is None else x[0] for x in LAYOUT], TS, STUDENT_VOCAB, S_EOS, 1)
    teacher = side_batch(generator, [None if x is None else x[1] for x in LAYOUT], TT, TEACHER_TOKENIZER, T_EOS, 2)
    s_logits = torch.randn(len(LAYOUT), TS, STUDENT_VOCAB, generator=generator, dtype=dtype) * 2
    t_logits = torch.randn(len(LAYOUT), TT, TEACHER_VOCAB, generator=generator, dtype=dtype) * 2
    view = TeacherView(pack_pairs([[]] * len(LAYOUT)), student, teacher)  # CDM reads no pairs
    return view, s_logits, t_logits


# ---------------------------------------------------------------------------- references


def levenshtein(a: bytes, b: bytes) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        previous, row[0] = row[:], i
        for j, y in enumerate(b, 1):
            row[j] = min(previous[j] + 1, row[j - 1] + 1, previous[j - 1] + (x != y))
    return row[-1]


def entropy64(row: torch.Tensor) -> float:
    p = torch.softmax(row.detach().double(), 0)
    return float(-(p * p.log()).sum())


def dtw_weights(h: list[float]) -> list[int]:
    lo, hi = min(h), max(h)
    return [math.floor(3 / (1 + math.exp(-(4 * ((x - lo) / (hi - lo) if hi > lo else 0.0) - 2))) + 3) for x in h]


def copy_dtw(cost_st: np.ndarray) -> list[tuple[int, int]]:
    """The copies' double loop on the [teacher, student] table, argmin over (diagonal, up, left)."""
    cost = cost_st.T
    n, m = cost.shape
    table = np.full((n + 1, m + 1), np.inf)
    table[0, 0] = 0.0
    for i in range(n):
        for j in range(m):
            table[i + 1, j + 1] = cost[i, j] + min(table[i, j + 1], table[i + 1, j], table[i, j])
    table = table[1:, 1:]
    i, j = n - 1, m - 1
    path = [(j, i)]
    while i > 0 or j > 0:
        options = [table[i - 1, j - 1] if i and j else np.inf, table[i - 1, j] if i else np.inf,
                   table[i, j - 1] if j else np.inf]
        move = int(np.argmin(options))
        i, j = (i - 1, j - 1) if move == 0 else (i - 1, j) if move == 1 else (i, j - 1)
        path.append((j, i))
    return path[::-1]


def merged_lists(path, rs, rt, merge):
    if merge == "teacher_lists":
        lists = []
        for t in range(rt):
            members = [s for s, u in path if u == t]
            if members not in lists:
                lists.append(members)
        return lists
    lists, previous = [], None
    for s, t in path:
        if previous is None or (s != previous[0] and t != previous[1]):
            lists.append([])
        if s not in lists[-1]:
            lists[-1].append(s)
        previous = (s, t)
    return lists


def reconstructed(row: torch.Tensor, kept: int) -> torch.Tensor:
    """A teacher row as CDM's top-``kept`` teacher side stands for it: kept log-probs, the tail's uniform share elsewhere."""
    log_probs = torch.log_softmax(row.double(), 0)
    ids = sorted(range(len(log_probs)), key=lambda v: -float(log_probs[v]))[:kept]
    tail = 1.0 - float(log_probs[ids].exp().sum())
    out = torch.full_like(log_probs, min(math.log(tail / (len(log_probs) - kept)), float(log_probs[ids].min())))
    out[ids] = log_probs[ids]
    return out


def reference_cdm(s_logits, t_logits, view, ctx, *, top_k, threshold=0.3, temperature=0.8, merge="teacher_lists"):
    """Float64 loops over the whole micro-batch: the EOS rule, strings, weights, DTW, groups, dict maps,
    -1e4 fills on both sides. Returns (the KD sum, differentiable; student tokens; map outcome counts)."""
    s_surf = list(ctx.student_surfaces) + [None] * (STUDENT_VOCAB - len(ctx.student_surfaces))
    t_surf = list(ctx.teacher_surfaces) + [None] * (TEACHER_VOCAB - len(ctx.teacher_surfaces))

    def tokens(labels):
        return [[(q - 1, y) for q, y in enumerate(row) if y != -100] for row in labels.tolist()]

    sequences, eos_pairs = [], set()
    for s, t in zip(tokens(view.student.labels), tokens(view.teacher.labels)):
        s_end, t_end = bool(s) and s_surf[s[-1][1]] is None, bool(t) and t_surf[t[-1][1]] is None
        if s_end and t_end:
            eos_pairs.add((s[-1][1], t[-1][1]))
        sequences.append((s[:-1] if s_end and not t_end else s, t[:-1] if t_end and not s_end else t))
    exact_t2s = {i: next(j for j, o in enumerate(s_surf) if o == x) for i, x in enumerate(t_surf)
                 if x is not None and x in s_surf}
    exact_s2t = {i: next(j for j, o in enumerate(t_surf) if o == x) for i, x in enumerate(s_surf)
                 if x is not None and x in t_surf}
    for s_id, t_id in sorted(eos_pairs):
        exact_t2s.setdefault(t_id, s_id)
        exact_s2t.setdefault(s_id, t_id)

    def near(src, candidates, scores, src_surf, dst_surf, exact):
        if src in exact:
            return exact[src], "exact"
        best = None
        for c in candidates:
            if src_surf[src] is None or dst_surf[c] is None:
                continue
            a, b = src_surf[src].replace(b" ", b""), dst_surf[c].replace(b" ", b"")
            d = levenshtein(a, b) / (len(a) + len(b)) if a or b else 0.0
            if d < threshold and (best is None or (d, -scores[c], c) < best):
                best = (d, -scores[c], c)
        return (best[2], "near") if best else (-1, "none")

    def kl(t_vec, s_vec):
        log_p, log_q = torch.log_softmax(t_vec, 0), torch.log_softmax(s_vec, 0)
        return (log_p.exp() * (log_p - log_q)).sum()

    fill = torch.tensor(-1e4, dtype=torch.float64)
    total, count, outcomes = torch.zeros((), dtype=torch.float64), 0, {"exact": 0, "near": 0, "none": 0}
    for b, (s, t) in enumerate(sequences):
        count += len(s)
        if not s or not t:
            continue
        s_str = [s_surf[y] or b"" for _, y in s]
        t_str = [t_surf[y] or b"" for _, y in t]
        ws = dtw_weights([entropy64(s_logits[b, r]) for r, _ in s])
        wt = dtw_weights([entropy64(t_logits[b, r]) for r, _ in t])
        cost = np.array([[levenshtein(x.replace(b" ", b""), y.replace(b" ", b"")) * ws[i] * wt[j] for j, y in enumerate(t_str)]
                         for i, x in enumerate(s_str)], dtype=np.float64)
        path = copy_dtw(cost)
        teacher_rows = [reconstructed(t_logits[b, r], top_k) for r, _ in t]
        per_student = [torch.stack([teacher_rows[u] for v, u in path if v == i]).mean(0) for i in range(len(s))]
        for members in merged_lists(path, len(s), len(t), merge):
            T = torch.stack([per_student[i] for i in members]).mean(0)
            S = torch.stack([s_logits[b, s[i][0]] for i in members]).mean(0)
            tv, sv = T.tolist(), S.detach().tolist()
            tau = sorted(range(len(tv)), key=lambda v: (-tv[v], v))[:top_k]
            sigma = sorted(range(len(sv)), key=lambda v: (-sv[v], v))[:top_k]
            t_slots, s_slots = [], []
            for v in tau:
                mapped, how = near(v, sigma, sv, t_surf, s_surf, exact_t2s)
                outcomes[how] += 1
                t_slots.append(T[v] if mapped >= 0 else fill)
                s_slots.append(S[mapped] / temperature if mapped >= 0 else fill)
            total = total + kl(torch.stack(t_slots), torch.stack(s_slots))
            t_slots, s_slots = [], []
            for v in sigma:
                mapped, how = near(v, tau, tv, s_surf, t_surf, exact_s2t)
                outcomes[how] += 1
                t_slots.append(T[mapped] if mapped >= 0 else fill)
                s_slots.append(S[v] / temperature if mapped >= 0 else fill)
            total = total + kl(torch.stack(t_slots), torch.stack(s_slots))
    return total, count, outcomes


# ------------------------------------------------------------------------------------ tests


def test_the_class_is_registered_with_the_papers_defaults():
    assert METHODS["cdm"] is ContextualDynamicMapping
    params = CdmParams()
    assert (params.top_k, params.simi_threshold, params.kd_temperature, params.merge) == (100, 0.3, 0.8, "teacher_lists")
    method = ContextualDynamicMapping(None, None, context())
    assert method.term_weights == pytest.approx({"cdm": 1 / 9})  # 0.9 CE + 0.1 KD with the engine's CE weight 1
    assert ContextualDynamicMapping(None, {"cdm": 0.5}, context()).term_weights == {"cdm": 0.5}
    assert method.denominator == "tokens" and method.needs == frozenset({"surfaces"}) and method.pairings is None
    assert method.cacheable and not method.fuses_ce


@pytest.mark.parametrize("merge", ["teacher_lists", "components"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_class_equals_the_float64_reference_and_the_student_gets_a_kd_gradient(seed, merge):
    ctx = context(seed)
    view, s_logits, t_logits = toy_batch(seed)
    s_logits.requires_grad_()
    method = ContextualDynamicMapping(CdmParams(top_k=8, merge=merge), None, ctx)
    out = method.teacher(LogitSource(logits=t_logits), view, gold=True)
    terms = method.student(s_logits, out.reduced, view)
    expected, tokens, outcomes = reference_cdm(s_logits, t_logits, view, ctx, top_k=8, merge=merge)
    assert set(terms) == {"cdm"} and terms["cdm"].dtype == torch.float64
    assert all(outcomes[k] > 0 for k in outcomes), outcomes  # exact, near and unmapped slots all occur
    assert float(terms["cdm"].detach()) == pytest.approx(float(expected.detach()), rel=1e-10)
    # 7 (both EOS) + 5 (the EOS without partner left out) + 4; the filler row has none
    assert method.counts(out.reduced, view) == {"tokens": 16.0} and tokens == 16
    ours = torch.autograd.grad(terms["cdm"], s_logits)[0]
    reference = torch.autograd.grad(expected, s_logits)[0]
    # The regression test for the copies' bug (their KD has no student gradient): non-zero, and the right one.
    assert ours.abs().sum() > 0 and ours[3].abs().sum() == 0
    np.testing.assert_allclose(ours.numpy(), reference.numpy(), rtol=1e-9, atol=1e-12)
    # the teacher's gold CE comes from the same pass
    gold = ce_per_sequence(t_logits, view.teacher.labels)
    torch.testing.assert_close(out.gold["ce"], gold["ce"])
    torch.testing.assert_close(out.gold["tokens"], gold["tokens"])


def test_the_eos_pair_joins_the_exact_map_and_the_rule_is_per_side():
    ctx = context(0)
    view, s_logits, t_logits = toy_batch(0)
    method = ContextualDynamicMapping(CdmParams(top_k=8), None, ctx)
    student, teacher, keep_s, keep_t, pairs = method._aligned(view)
    assert keep_s == [7, 5, 4, 0] and keep_t == [8, 8, 5, 0] and pairs == {(S_EOS, T_EOS)}
    vocab = method._vocab_for(pairs)
    assert int(vocab.teacher_to_student[T_EOS]) == S_EOS and int(vocab.student_to_teacher[S_EOS]) == T_EOS
    assert int(vocab.teacher_to_student[T_UNK]) == -1  # other specials never match
    assert int(method._vocab_for(frozenset()).teacher_to_student[T_EOS]) == -1  # the static map is untouched


def test_the_teacher_side_from_hidden_states_equals_full_logits_and_reads_blocks():
    ctx = context(3)
    view, s_logits, _ = toy_batch(3, dtype=torch.float32)
    generator = torch.Generator().manual_seed(4)
    hidden = torch.randn(len(LAYOUT), TT, 12, generator=generator)
    weight = torch.randn(TEACHER_VOCAB, 12, generator=generator)
    bias = torch.randn(TEACHER_VOCAB, generator=generator)
    method = ContextualDynamicMapping(CdmParams(top_k=8), None, ctx)

    class Spy(LogitSource):
        def read(self, flat_rows):
            self.widest = max(getattr(self, "widest", 0), int(flat_rows.numel()))
            return super().read(flat_rows)

    chunked = Spy(hidden=hidden, weight=weight, bias=bias, head_chunk_elements=3 * TEACHER_VOCAB)
    full = method.teacher(LogitSource(logits=F.linear(hidden, weight, bias)), view, gold=True)
    part = method.teacher(chunked, view, gold=True)
    assert chunked.widest == chunked.rows_per_block() == 3  # never more than one block of rows at a time
    assert torch.equal(part.reduced.ids, full.reduced.ids) and torch.equal(part.reduced.mask, full.reduced.mask)
    torch.testing.assert_close(part.reduced.log_probs, full.reduced.log_probs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(part.reduced.entropy, full.reduced.entropy, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(part.gold["ce"], full.gold["ce"], rtol=1e-5, atol=1e-5)
    a = method.student(s_logits, part.reduced, view)["cdm"]
    b = method.student(s_logits, full.reduced, view)["cdm"]
    assert float(a) == pytest.approx(float(b), rel=1e-5)


def test_gradcheck():
    ctx = context(5)
    view, s_logits, t_logits = toy_batch(5)
    method = ContextualDynamicMapping(CdmParams(top_k=6, kd_temperature=0.7), None, ctx)
    reduced = method.teacher(LogitSource(logits=t_logits), view, gold=False).reduced
    s_logits.requires_grad_()
    assert torch.autograd.gradcheck(lambda z: method.student(z, reduced, view)["cdm"], (s_logits,), eps=1e-6, atol=1e-6,
                                    fast_mode=True)


def test_check_needs_surfaces_and_a_large_enough_vocabulary():
    ContextualDynamicMapping.check(CdmParams(top_k=10**6), None)  # recipe time: nothing tokenizer-dependent
    with pytest.raises(ValueError, match="surfaces"):
        ContextualDynamicMapping.check(CdmParams(), MethodContext(student_vocab=50, teacher_vocab=50))
    with pytest.raises(ValueError, match=r"top_k=45 exceeds the student's vocabulary \(40 ids\)"):
        ContextualDynamicMapping.check(CdmParams(top_k=45), context())
    ContextualDynamicMapping.check(CdmParams(top_k=40), context())


# ------------------------------------------------------------------------------- cache


def record(seed: int):
    """One record on both sides, as a [1, T] batch, with its teacher logits (float32, as a real teacher)."""
    generator = torch.Generator().manual_seed(100 + seed)
    layout = LAYOUT[seed % 3]
    student = side_batch(generator, [layout[0]], TS, STUDENT_VOCAB, S_EOS, 1)
    teacher = side_batch(generator, [layout[1]], TT, TEACHER_TOKENIZER, T_EOS, 2)
    return student, teacher, torch.randn(1, TT, TEACHER_VOCAB, generator=generator) * 2


def micro_batch(records: list[int]):
    parts = [record(max(r, 0)) for r in records]
    stack = [ModelBatch(*(torch.cat([getattr(p[side], f) for p in parts]) for f in ("input_ids", "attention_mask", "labels")))
             for side in (0, 1)]
    for b, r in enumerate(records):
        if r < 0:  # filler: a copy of a real record without labels
            stack[0].labels[b] = -100
            stack[1].labels[b] = -100
    view = TeacherView(pack_pairs([[]] * len(records)), stack[0], stack[1])
    return view, torch.cat([p[2] for p in parts]), torch.tensor(records)


def test_the_cache_round_trip_equals_the_live_teacher(tmp_path):
    method = ContextualDynamicMapping(CdmParams(top_k=8), None, context(6))
    for chunk, records in enumerate([[4, 0, 3], [2, 1]]):
        view, logits, record_ids = micro_batch(records)
        output = method.teacher(LogitSource(logits=logits), view, gold=True)
        cache.write_chunk(tmp_path, chunk, [cache.chunk_tensors(method, output, view, record_ids)])
    binding = {"checkpoint": "c", "tokenizer": "t", "template": {"kind": "plain"}, "data": "d", "pairing": "offsets",
               "loss": method.cache_settings()}
    assert binding["loss"] == {"kind": "cdm", "top_k": 8}  # the other parameters act on the student side only
    manifest = {"format": cache.FORMAT_VERSION, "binding": binding, "num_records": 5, "chunk_records": 3, "num_chunks": 2}
    (tmp_path / cache.MANIFEST).write_text(json.dumps(manifest))
    opened = cache.TeacherCache.open(tmp_path, binding, "teachers[0]", num_records=5)
    view, logits, record_ids = micro_batch([1, 4, -1, 3])  # records of both chunks, and a filler row
    live = method.teacher(LogitSource(logits=logits), view, gold=True)
    cached, gold = opened.read(record_ids, view, method, torch.device("cpu"))
    assert isinstance(cached, CdmTeacher) and cached.vocab_size == live.reduced.vocab_size == TEACHER_VOCAB
    assert torch.equal(cached.mask, live.reduced.mask) and torch.equal(cached.ids[cached.mask], live.reduced.ids[cached.mask])
    assert torch.equal(cached.log_probs[cached.mask], live.reduced.log_probs[cached.mask])  # float32 as computed
    assert torch.equal(cached.entropy[cached.mask], live.reduced.entropy[cached.mask])
    torch.testing.assert_close(gold["ce"], live.gold["ce"])
    student = torch.randn(4, TS, STUDENT_VOCAB, generator=torch.Generator().manual_seed(7))
    a, b = method.student(student, cached, view)["cdm"], method.student(student, live.reduced, view)["cdm"]
    assert float(a) == pytest.approx(float(b), rel=1e-5) and float(a) > 0
    # a rank's micro-batch of filler rows only (the last step of an odd record count)
    view, _, record_ids = micro_batch([-1, -1])
    empty, _ = opened.read(record_ids, view, method, torch.device("cpu"))
    student = torch.randn(2, TS, STUDENT_VOCAB, requires_grad=True)
    term = method.student(student, empty, view)["cdm"]
    term.backward()
    assert float(term.detach()) == 0 and method.counts(empty, view) == {"tokens": 0.0} and float(student.grad.abs().sum()) == 0


# ------------------------------------------------------------------------------- recipe


@pytest.mark.parametrize("param, value, message", [
    ("simi_threshold", 1.5, "expected a number > 0 and < 1; got 1.5"),
    ("simi_threshold", 0, "expected a number > 0 and < 1"),
    ("top_k", 0, "expected an integer >= 1; got 0"),
    ("top_k", 2.5, "expected an integer"),
    ("kd_temperature", 0, "expected a positive number"),
    ("merge", "union", "expected one of teacher_lists, components; got 'union'"),
])
def test_bad_hyper_parameters_are_one_clear_error_in_the_dry_run(capsys, param, value, message):
    from mlot_ds.engine.cli import main as cli_main

    code = cli_main(["--config", ZERO3, "--dry-run", f"teachers.llama.loss={{kind: cdm, {param}: {value}}}"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"teachers[0].loss.{param}: {message}" in err
    assert len(err.strip().splitlines()) == 1, err


def test_a_good_cdm_recipe_passes_the_dry_run():
    from mlot_ds.engine.cli import main as cli_main

    assert cli_main(["--config", ZERO3, "--dry-run", "teachers.llama.loss={kind: cdm, top_k: 50, weights: {cdm: 0.2}}"]) == 0


# ------------------------------------------------------------------------------- the job

KEYS = ("train/loss", "train/ce", "teacher/llama/cdm", "teacher/llama/kd")


@pytest.mark.slow
@pytest.mark.multirank
def test_two_ranks_equal_one_rank_and_a_cached_teacher_equals_the_live_one(tmp_path, tiny_zoo):
    """CDM on llama (qwen and opt keep the demo's MultiLevelOT): a real 2-rank ZeRO-3 job, the same global
    batch on 1 rank x 2 accumulation steps, and that run again with llama served from an offline cache."""
    env = job_env(tiny_zoo)

    def settings(out: str, **extra) -> list[str]:
        return tiny_recipe_overrides(tmp_path / out, **{
            "teachers.llama.loss": "{kind: cdm}", "train.max_steps": 3, "data.eval": "null", "export.enabled": "false",
            "data.cache_dir": str(tmp_path / "cache"), **extra})

    two = run_job(deepspeed_command(2, ["--config", ZERO3, *settings("two")], free_port()), env, tmp_path / "two.log")
    assert two.returncode == 0, two.log_text[-4000:]
    one = run_job(deepspeed_command(1, ["--config", ZERO3, *settings("one", **{"train.grad_accum": 2})], free_port()),
                  env, tmp_path / "one.log")
    assert one.returncode == 0, one.log_text[-4000:]
    tool = [sys.executable, str(REPO / "tools" / "cache_teachers.py"), "--teachers", "llama", "--chunk-records", "8",
            *settings("build")]
    built = run_job(tool, env, tmp_path / "build.log")
    assert built.returncode == 0, built.log_text[-4000:]
    assert re.search(r"llama: built \d+ chunk\(s\), 0 left", built.log_text), built.log_text[-2000:]
    cached = run_job(deepspeed_command(1, ["--config", ZERO3, *settings("cached", **{
        "train.grad_accum": 2, "teachers.llama.source": "cache"})], free_port()), env, tmp_path / "cached.log")
    assert cached.returncode == 0, cached.log_text[-4000:]

    rows_two, rows_one, rows_cached = metrics(tmp_path / "two"), metrics(tmp_path / "one"), metrics(tmp_path / "cached")
    for step in (1, 2, 3):
        assert rows_two[step]["teacher/llama/cdm"] > 0
        assert rows_two[step]["teacher/llama/kd"] == pytest.approx(rows_two[step]["teacher/llama/cdm"] / 9, rel=1e-6)
        for key in KEYS:
            assert rows_one[step][key] == pytest.approx(rows_two[step][key], rel=1e-5, abs=1e-7), (step, key)
            assert rows_cached[step][key] == pytest.approx(rows_one[step][key], rel=1e-5, abs=1e-7), (step, key)
