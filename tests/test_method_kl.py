"""The ``kl`` method class (same-tokenizer KD): float64 references through the class API, fused CE,
hidden-state teacher path, gradients, the offline cache, recipe and dry-run errors, and one real
2-rank ZeRO-3 job against 1 rank x 2 accumulation steps (live and from a cache)."""

from __future__ import annotations

import io
import json
import math
import sys
from contextlib import redirect_stderr
from pathlib import Path

import pytest
import torch
import yaml

from mlot_ds.config import DEFAULT_RECIPE
from mlot_ds.engine.cli import main as cli_main
from mlot_ds.losses import METHODS, LogitSource, MethodContext, TeacherView
from mlot_ds.losses.ce import ce_per_sequence, masked_ce
from mlot_ds.losses.kl import DIVERGENCES, KLParams, SameTokenizerKL
from mlot_ds.pairing import ModelBatch, position_pairing
from mlot_ds.teachers import cache
from tests.helpers import REPO, deepspeed_command, free_port, job_env, metrics, run_job, tiny_recipe_overrides

ZERO3 = str(REPO / "ds_configs" / "zero3.json")
VOCAB = 13


# --------------------------------------------------------------------------------- references


def _softmax(row: list[float], temperature: float) -> list[float]:
    scaled = [v / temperature for v in row]
    top = max(scaled)
    weights = [math.exp(v - top) for v in scaled]
    return [w / sum(weights) for w in weights]


def _kl(a: list[float], b: list[float]) -> float:
    return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)


def _divergence(p: list[float], q: list[float], name: str, lam: float, beta: float) -> float:
    if name == "forward":
        return _kl(p, q)
    if name == "reverse":
        return _kl(q, p)
    if name == "skew_forward":
        return _kl(p, [lam * x + (1 - lam) * y for x, y in zip(p, q)])
    if name == "skew_reverse":
        return _kl(q, [lam * y + (1 - lam) * x for x, y in zip(p, q)])
    mixture = [beta * x + (1 - beta) * y for x, y in zip(p, q)]
    return beta * _kl(p, mixture) + (1 - beta) * _kl(q, mixture)


def reference_kl(student, teacher, student_labels, teacher_labels, params: KLParams) -> float:
    """Python float64: the i-th response token of each side paired, top-k ids of the teacher + one tail."""
    total = 0.0
    for b in range(student.shape[0]):
        s_rows = [q - 1 for q, y in enumerate(student_labels[b].tolist()) if y != -100 and q > 0]
        t_rows = [q - 1 for q, y in enumerate(teacher_labels[b].tolist()) if y != -100 and q > 0]
        for s_row, t_row in zip(s_rows, t_rows):
            p = _softmax(teacher[b, t_row].tolist(), params.temperature)
            q = _softmax(student[b, s_row].tolist(), params.temperature)
            if params.top_k < len(p):
                ids = sorted(range(len(p)), key=lambda v: -p[v])[: params.top_k]
                rest = [v for v in range(len(p)) if v not in ids]
                p = [p[i] for i in ids] + [sum(p[v] for v in rest)]
                q = [q[i] for i in ids] + [sum(q[v] for v in rest)]
            total += _divergence(p, q, params.divergence, params.skew_lambda, params.beta)
    return total * params.temperature**2


def case(seed: int, vocab: int = VOCAB, teacher_vocab: int | None = None, dtype=torch.float64):
    """Student and teacher logits and batches: the same response tokens after prompts of other lengths."""
    gen = torch.Generator().manual_seed(seed)
    teacher_vocab = teacher_vocab or vocab
    shapes = [(2, 6), (4, 3), (1, 7)]  # (student prompt, response) per row; the teacher's prompt is 1 longer
    s_len, t_len = 10, 11
    s_ids = torch.randint(0, vocab, (3, s_len), generator=gen)
    t_ids = torch.randint(0, vocab, (3, t_len), generator=gen)
    s_labels, t_labels = torch.full((3, s_len), -100), torch.full((3, t_len), -100)
    for b, (prompt, response) in enumerate(shapes):
        tokens = torch.randint(0, vocab, (response,), generator=gen)
        s_ids[b, prompt : prompt + response] = tokens
        t_ids[b, prompt + 1 : prompt + 1 + response] = tokens
        s_labels[b, prompt : prompt + response] = tokens
        t_labels[b, prompt + 1 : prompt + 1 + response] = tokens
    student = ModelBatch(s_ids, torch.ones_like(s_ids), s_labels)
    teacher = ModelBatch(t_ids, torch.ones_like(t_ids), t_labels)
    view = TeacherView(position_pairing(s_labels, t_labels), student, teacher)
    s_logits = (torch.randn(3, s_len, vocab, generator=gen, dtype=torch.float64) * 2).to(dtype)
    t_logits = (torch.randn(3, t_len, teacher_vocab, generator=gen, dtype=torch.float64) * 2).to(dtype)
    return s_logits, t_logits, view


def run(method, s_logits, t_logits, view, ce=False):
    out = method.teacher(LogitSource(logits=t_logits), view, gold=False)
    return method.student(s_logits, out.reduced, view, ce_labels=view.student.labels if ce else None)


# ---------------------------------------------------------------------------------- the class


def test_registered_with_its_declarations():
    assert METHODS["kl"] is SameTokenizerKL
    cls = SameTokenizerKL
    assert cls.terms == ("kl",) and cls.denominator == "pairs" and cls.pairings is None and cls.needs == frozenset()
    assert cls.cacheable and cls.fuses_ce and cls.default_weights(KLParams()) == {"kl": 1.0}
    assert KLParams() == KLParams(divergence="forward", temperature=1.0, skew_lambda=0.1, beta=0.5, top_k=128)
    assert SameTokenizerKL(KLParams(temperature=2.0)).fuses_ce is False  # the CE needs temperature 1


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("top_k,temperature", [(4, 1.0), (4, 2.0), (500, 1.0), (500, 0.5)])
def test_class_matches_the_float64_reference(divergence, top_k, temperature):
    s_logits, t_logits, view = case(0)
    params = KLParams(divergence=divergence, temperature=temperature, top_k=top_k, skew_lambda=0.2, beta=0.3)
    method = SameTokenizerKL(params)
    terms = run(method, s_logits, t_logits, view)
    expected = reference_kl(s_logits, t_logits, view.student.labels, view.teacher.labels, params)
    assert terms["kl"].item() == pytest.approx(expected, rel=1e-10, abs=1e-12)
    assert method.counts(None, view) == {"pairs": float(view.pairing.mask.sum())} == {"pairs": 16.0}


@pytest.mark.parametrize("divergence", ["forward", "jsd"])
@pytest.mark.parametrize("top_k", [3, VOCAB])
def test_fused_ce_equals_masked_ce_and_leaves_the_kl_unchanged(divergence, top_k):
    s_logits, t_logits, view = case(1)
    method = SameTokenizerKL(KLParams(divergence=divergence, top_k=top_k))
    alone, fused = run(method, s_logits, t_logits, view), run(method, s_logits, t_logits, view, ce=True)
    assert fused["kl"].item() == pytest.approx(alone["kl"].item(), rel=1e-12)
    assert fused["ce"].item() == pytest.approx(masked_ce(s_logits, view.student.labels)["ce"].item(), rel=1e-12)
    # Temperature 2: the CE is computed on its own (the engine asks another teacher to fuse it).
    hot = SameTokenizerKL(KLParams(divergence=divergence, top_k=top_k, temperature=2.0))
    assert run(hot, s_logits, t_logits, view, ce=True)["ce"].item() == pytest.approx(fused["ce"].item(), rel=1e-12)


@pytest.mark.parametrize("top_k", [3, VOCAB])
def test_gradcheck_of_kl_plus_fused_ce(top_k):
    s_logits, t_logits, view = case(2)
    for divergence in ("forward", "skew_reverse"):
        method = SameTokenizerKL(KLParams(divergence=divergence, top_k=top_k))
        reduced = method.teacher(LogitSource(logits=t_logits), view, gold=False).reduced

        def loss(x):
            terms = method.student(x, reduced, view, ce_labels=view.student.labels)
            return terms["kl"] + 0.7 * terms["ce"]

        assert torch.autograd.gradcheck(loss, (s_logits.clone().requires_grad_(True),))


def test_gradient_equals_autograd_on_the_full_softmax():
    """top_k >= V: the loss is the exact forward KL, and its gradient that of plain autograd."""
    s_logits, t_logits, view = case(3, dtype=torch.float32)
    method = SameTokenizerKL(KLParams(top_k=VOCAB))
    x = s_logits.clone().requires_grad_(True)
    run(method, x, t_logits, view, ce=True)["kl"].backward()
    y = s_logits.clone().requires_grad_(True)
    mask = view.pairing.mask
    b = torch.arange(3).unsqueeze(1).expand_as(mask)[mask]
    log_q = torch.log_softmax(y[b, view.pairing.student_index[mask]], -1)
    log_p = torch.log_softmax(t_logits[b, view.pairing.teacher_index[mask]], -1)
    (log_p.exp() * (log_p - log_q)).sum().backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-5, atol=1e-7)


def test_teacher_from_hidden_states_equals_full_logits():
    gen = torch.Generator().manual_seed(4)
    s_logits, _, view = case(4)
    hidden = torch.randn(3, 11, 8, generator=gen, dtype=torch.float64)
    weight = torch.randn(VOCAB, 8, generator=gen, dtype=torch.float64)
    bias = torch.randn(VOCAB, generator=gen, dtype=torch.float64)
    logits = hidden @ weight.T + bias
    method = SameTokenizerKL(KLParams(top_k=5, temperature=1.5))
    full = method.teacher(LogitSource(logits=logits), view, gold=True)
    chunked = method.teacher(LogitSource(hidden=hidden, weight=weight, bias=bias, head_chunk_elements=2 * VOCAB),
                             view, gold=True)
    assert torch.equal(full.reduced.ids, chunked.reduced.ids)
    torch.testing.assert_close(chunked.reduced.log_probs, full.reduced.log_probs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(chunked.reduced.tail_log_mass, full.reduced.tail_log_mass, rtol=1e-12, atol=1e-12)
    for key in ("ce", "tokens"):
        torch.testing.assert_close(chunked.gold[key], full.gold[key])
        torch.testing.assert_close(full.gold[key], ce_per_sequence(logits, view.teacher.labels)[key])
    a = method.student(s_logits, full.reduced, view)["kl"]
    assert method.student(s_logits, chunked.reduced, view)["kl"].item() == pytest.approx(a.item(), rel=1e-12)


def test_a_wider_teacher_output_layer_is_read_on_the_students_columns():
    """Same tokenizer, padded teacher vocabulary: the teacher's rows are cut to the student's width."""
    s_logits, t_logits, view = case(5, teacher_vocab=VOCAB + 4)
    context = MethodContext(student_vocab=VOCAB, teacher_vocab=VOCAB + 4, same_tokenizer=True)
    method = SameTokenizerKL(KLParams(top_k=500), None, context)
    expected = reference_kl(s_logits, t_logits[..., :VOCAB], view.student.labels, view.teacher.labels, method.params)
    assert run(method, s_logits, t_logits, view)["kl"].item() == pytest.approx(expected, rel=1e-10)
    assert method.cache_settings() == {"kind": "kl", "temperature": 1.0, "top_k": 500, "columns": VOCAB}


def test_check_refuses_another_tokenizer_naming_both():
    SameTokenizerKL.check(KLParams(), None)  # recipe time: nothing to compare yet
    SameTokenizerKL.check(KLParams(), MethodContext(student_vocab=50, teacher_vocab=50, same_tokenizer=True))
    with pytest.raises(ValueError) as error:
        SameTokenizerKL.check(KLParams(), MethodContext(student_vocab=50, teacher_vocab=70, same_tokenizer=False))
    message = str(error.value)
    assert "teacher's tokenizer" in message and "student's tokenizer" in message and "70" in message and "50" in message


# ---------------------------------------------------------------------------------- the cache


def _select(view: TeacherView, logits, rows: list[int], filler: bool):
    """A new micro-batch of some rows of ``view`` (other order, other padding), plus a filler row."""
    pick = lambda t: torch.stack([t[r] for r in rows + ([rows[0]] if filler else [])])
    student = ModelBatch(*(pick(t) for t in view.student))
    teacher = ModelBatch(*(pick(t) for t in view.teacher))
    if filler:
        student.labels[-1], teacher.labels[-1] = -100, -100
    return TeacherView(position_pairing(student.labels, teacher.labels), student, teacher), pick(logits)


@pytest.mark.parametrize("top_k", [4, VOCAB])
def test_cache_round_trip_equals_the_live_teacher(tmp_path, top_k):
    s_logits, t_logits, view = case(6, dtype=torch.float32)
    context = MethodContext(student_vocab=VOCAB, teacher_vocab=VOCAB, same_tokenizer=True)
    method = SameTokenizerKL(KLParams(divergence="jsd", top_k=top_k), None, context)
    chunks = [([0, 1], torch.tensor([10, 11])), ([2], torch.tensor([12]))]
    for chunk, (rows, record_ids) in enumerate(chunks):
        part_view, part_logits = _select(view, t_logits, rows, filler=False)
        output = method.teacher(LogitSource(logits=part_logits), part_view, gold=True)
        cache.write_chunk(tmp_path, chunk, [cache.chunk_tensors(method, output, part_view, record_ids)])
    binding = {"checkpoint": "c", "tokenizer": "t", "template": {}, "data": "d", "pairing": "position",
               "loss": method.cache_settings()}
    manifest = {"format": cache.FORMAT_VERSION, "binding": binding, "num_records": 3, "chunk_records": 2, "num_chunks": 2}
    (tmp_path / cache.MANIFEST).write_text(json.dumps(manifest))
    opened = cache.TeacherCache.open(tmp_path, binding, "teachers[0]", num_records=3)

    read_view, read_logits = _select(view, t_logits, [2, 0], filler=True)
    record_ids = torch.tensor([12, 10, -1])
    live = method.teacher(LogitSource(logits=read_logits), read_view, gold=True)
    cached = opened.read(record_ids, read_view, method, torch.device("cpu"))
    assert torch.equal(cached.reduced.ids, live.reduced.ids) and cached.reduced.vocab == live.reduced.vocab == VOCAB
    torch.testing.assert_close(cached.reduced.log_probs, live.reduced.log_probs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cached.reduced.tail_log_mass, live.reduced.tail_log_mass, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cached.gold["ce"], live.gold["ce"], rtol=1e-6, atol=1e-6)
    student = torch.stack([s_logits[2], s_logits[0], s_logits[2]])
    live_terms = method.student(student, live.reduced, read_view, ce_labels=read_view.student.labels)
    cached_terms = method.student(student, cached.reduced, read_view, ce_labels=read_view.student.labels)
    for name in ("kl", "ce"):
        assert cached_terms[name].item() == pytest.approx(live_terms[name].item(), rel=1e-5)


# --------------------------------------------------------------------- recipe and dry-run errors


def dry_run(*overrides: str) -> tuple[int, str]:
    err = io.StringIO()
    with redirect_stderr(err):
        code = cli_main(["--config", ZERO3, "--dry-run", *overrides])
    return code, err.getvalue()


@pytest.mark.parametrize("field,value,expected", [
    ("temperature", "0", "a positive number"),
    ("temperature", "nan", "finite"),
    ("skew_lambda", "1.0", "< 1"),
    ("beta", "0", "> 0"),
    ("top_k", "0", ">= 1"),
    ("divergence", "kl", "expected one of forward, reverse, skew_forward, skew_reverse, jsd"),
])
def test_bad_hyper_parameters_are_one_clear_error(field, value, expected):
    code, err = dry_run(f"teachers.opt.loss={{kind: kl, {field}: {value}}}")
    assert code == 2, err
    assert f"teachers[2].loss.{field}" in err and expected in err, err
    assert len(err.strip().splitlines()) == 1


@pytest.fixture
def tiny_zoo_env(tiny_zoo, monkeypatch):
    monkeypatch.setenv("MLOT_DS_CACHE", str(tiny_zoo))
    return tiny_zoo


def test_dry_run_refuses_kl_for_a_teacher_with_another_tokenizer(tiny_zoo_env):
    code, err = dry_run("zoo.profile=tiny", "teachers.llama.loss={kind: kl}")
    assert code == 2, err
    assert "teachers[0].loss: loss 'kl'" in err and "teacher's tokenizer" in err and "student's tokenizer" in err, err
    code, err = dry_run("zoo.profile=tiny", "teachers.opt.model=zoo:student", "teachers.opt.pairing=position",
                        "teachers.opt.loss={kind: kl}")
    assert code == 0, err


# ------------------------------------------------------------------------ 2 ranks == 1 rank x 2


KL_TEACHER = {"teachers.kl.loss.divergence": "skew_forward", "teachers.kl.loss.top_k": 16}


def recipe(tmp: Path) -> Path:
    """The demo with a fourth teacher first in line: the student's own initial weights (same tokenizer),
    distilled with ``kl``, so it is also the teacher whose method fuses the student's CE."""
    raw = yaml.safe_load(DEFAULT_RECIPE.read_text())
    first = {"name": "kl", "model": "zoo:student", "pairing": "position", "loss": {"kind": "kl"}, "weight": 1.0}
    raw["teachers"] = [first] + raw["teachers"]
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.slow
@pytest.mark.multirank
def test_two_ranks_equal_one_rank_and_a_cached_teacher_equals_the_live_one(tmp_path, tiny_zoo):
    env = job_env(tiny_zoo)
    base = ["--recipe", str(recipe(tmp_path))]

    def args(name, **extra):
        return ["--config", ZERO3, *base, *tiny_recipe_overrides(
            tmp_path / name, **{"train.max_steps": 3, "data.eval": "null", "export.enabled": "false",
                                "data.cache_dir": str(tmp_path / "cache"), **KL_TEACHER, **extra})]

    two = run_job(deepspeed_command(2, args("two"), free_port()), env, tmp_path / "two.log")
    assert two.returncode == 0, two.log_text[-4000:]
    one = run_job(deepspeed_command(1, args("one", **{"train.grad_accum": 2}), free_port()), env, tmp_path / "one.log")
    assert one.returncode == 0, one.log_text[-4000:]
    tool = [sys.executable, str(REPO / "tools" / "cache_teachers.py"), *args("build"), "--teachers", "kl",
            "--chunk-records", "8"]
    built = run_job(tool, env, tmp_path / "build.log")
    assert built.returncode == 0, built.log_text[-4000:]
    cached = run_job(deepspeed_command(1, args("cached", **{"train.grad_accum": 2, "teachers.kl.source": "cache"}),
                                       free_port()), env, tmp_path / "cached.log")
    assert cached.returncode == 0, cached.log_text[-4000:]

    rows = {name: metrics(tmp_path / name) for name in ("two", "one", "cached")}
    keys = ["train/loss", "train/ce", "teacher/kl/kl", "teacher/kl/kd"] + [f"teacher/{t}/sd" for t in ("llama", "qwen", "opt")]
    for step in (1, 2, 3):
        for key in keys:
            assert rows["two"][step][key] == pytest.approx(rows["one"][step][key], rel=1e-5, abs=1e-7), (step, key)
            assert rows["cached"][step][key] == pytest.approx(rows["one"][step][key], rel=1e-5, abs=1e-7), (step, key)
    assert rows["one"][3]["teacher/kl/kl"] > 1e-6  # the student has moved away from its initial weights
