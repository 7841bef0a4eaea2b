"""The ``vocagnolm`` method class: float64 references through the class API (counts before the student
forward, fused CE, teacher gold CE), hidden-state teacher path, gradients, the offline cache, recipe
errors, and one real 2-rank ZeRO-3 job against 1 rank x 2 accumulation steps (live and from a cache)."""

from __future__ import annotations

import io
import json
import math
import random
import sys
from contextlib import redirect_stderr
from pathlib import Path

import pytest
import torch
import yaml

from mlot_ds.config import DEFAULT_RECIPE, load_recipe
from mlot_ds.engine.cli import main as cli_main
from mlot_ds.losses import METHODS, LogitSource, TeacherView
from mlot_ds.losses.ce import ce_per_sequence, masked_ce
from mlot_ds.losses.vocagnolm import VocAgnoLM, VocAgnoLMParams, labelled_positions
from mlot_ds.pairing import ModelBatch, position_pairing
from mlot_ds.pairing.overlaps import token_overlaps
from mlot_ds.teachers import cache
from tests.helpers import REPO, deepspeed_command, free_port, job_env, metrics, run_job, tiny_recipe_overrides

ZERO3 = str(REPO / "ds_configs" / "zero3.json")
STUDENT_VOCAB, TEACHER_VOCAB = 11, 17


# --------------------------------------------------------------------------------- references


def _cuts(rng: random.Random, length: int, pieces: int) -> list[tuple[int, int]]:
    points = sorted(rng.sample(range(1, length), pieces - 1))
    bounds = [0, *points, length]
    return list(zip(bounds[:-1], bounds[1:]))


def case(seed: int, dtype=torch.float64):
    """Two tokenizations of the same response bytes per row (student + EOS, teacher with EOS in row 1),
    the pipeline's overlaps view, random logits; row 3 is a filler row (no labels)."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    s_len, t_len = 14, 16
    s_ids = torch.randint(0, STUDENT_VOCAB, (4, s_len), generator=gen)
    t_ids = torch.randint(0, TEACHER_VOCAB, (4, t_len), generator=gen)
    s_labels, t_labels = torch.full((4, s_len), -100), torch.full((4, t_len), -100)
    width = 9
    lo, hi = torch.zeros(4, width, dtype=torch.long), torch.zeros(4, width, dtype=torch.long)
    mask = torch.zeros(4, width, dtype=torch.bool)
    for b, (s_prompt, t_prompt, s_count, t_count) in enumerate([(2, 3, 6, 5), (4, 1, 8, 9), (1, 2, 3, 7)]):
        text = 3 * max(s_count, t_count)
        s_spans, t_spans = _cuts(rng, text, s_count), _cuts(rng, text, t_count)
        ranges = token_overlaps(s_spans, t_spans)
        lo[b, :s_count] = torch.tensor([r[0] for r in ranges])
        hi[b, :s_count] = torch.tensor([r[1] for r in ranges])
        mask[b, : s_count + 1] = True  # + the student's EOS: no bytes, unmapped
        s_labels[b, s_prompt : s_prompt + s_count + 1] = s_ids[b, s_prompt : s_prompt + s_count + 1]
        t_eos = int(b == 1)
        t_labels[b, t_prompt : t_prompt + t_count + t_eos] = t_ids[b, t_prompt : t_prompt + t_count + t_eos]
    student = ModelBatch(s_ids, torch.ones_like(s_ids), s_labels)
    teacher = ModelBatch(t_ids, torch.ones_like(t_ids), t_labels)
    view = TeacherView(position_pairing(s_labels, t_labels), student, teacher, overlaps=(lo, hi, mask))
    s_logits = (torch.randn(4, s_len, STUDENT_VOCAB, generator=gen, dtype=torch.float64) * 2).to(dtype)
    t_logits = (torch.randn(4, t_len, TEACHER_VOCAB, generator=gen, dtype=torch.float64) * 2).to(dtype)
    return s_logits, t_logits, view


def _token_ces(logits, labels) -> list[list[float]]:
    """Per row, the CE of each labelled token in order (Python float64 from log-softmax rows)."""
    out = []
    for b in range(labels.shape[0]):
        row = []
        for q, y in enumerate(labels[b].tolist()):
            if y != -100:
                scaled = logits[b, q - 1].double().tolist()
                top = max(scaled)
                lse = top + math.log(sum(math.exp(v - top) for v in scaled))
                row.append(lse - scaled[y])
        out.append(row)
    return out


def reference(s_logits, t_logits, view, params: VocAgnoLMParams) -> tuple[float, int, float]:
    """``(sum of student CE over the selected tokens, their count, the student's full CE)``."""
    student_ce, teacher_ce = _token_ces(s_logits, view.student.labels), _token_ces(t_logits, view.teacher.labels)
    lo, hi, mask = (t.tolist() for t in view.overlaps)
    scored, unmapped = [], []
    for b, row in enumerate(student_ce):
        for i, ce in enumerate(row):
            assert mask[b][i]
            if hi[b][i] <= lo[b][i]:
                unmapped.append(ce)
                continue
            values = teacher_ce[b][lo[b][i] : hi[b][i]]
            agg = {"max": max, "min": min, "mean": lambda v: sum(v) / len(v)}[params.aggregation](values)
            scored.append((-(ce - agg), b * 100 + i, ce))
    scored.sort()
    keep = math.ceil(round(params.top_fraction * len(scored), 9))
    chosen = [ce for _, _, ce in scored[:keep]] + unmapped
    return sum(chosen), len(chosen), sum(sum(row) for row in student_ce)


def run(method, s_logits, t_logits, view, ce=True):
    out = method.teacher(LogitSource(logits=t_logits), view, gold=True)
    counts = method.counts(out.reduced, view)  # before the student forward
    terms = method.student(s_logits, out.reduced, view, ce_labels=view.student.labels if ce else None)
    return out, counts, terms


# ---------------------------------------------------------------------------------- the class


def test_registered_with_its_declarations():
    cls = METHODS["vocagnolm"]
    assert cls is VocAgnoLM and cls.terms == ("vocagnolm",) and cls.denominator == "selected"
    assert cls.needs == frozenset({"overlaps"}) and cls.pairings is None and cls.cacheable and cls.fuses_ce
    assert VocAgnoLMParams() == VocAgnoLMParams(top_fraction=0.4, aggregation="max")
    assert cls.default_weights(VocAgnoLMParams()) == {"vocagnolm": 1.0}


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("aggregation", ["max", "mean", "min"])
@pytest.mark.parametrize("top_fraction", [0.4, 0.75, 1.0])
def test_class_matches_the_float64_reference(seed, aggregation, top_fraction):
    s_logits, t_logits, view = case(seed)
    params = VocAgnoLMParams(top_fraction=top_fraction, aggregation=aggregation)
    _, counts, terms = run(VocAgnoLM(params), s_logits, t_logits, view)
    total, selected, full_ce = reference(s_logits, t_logits, view, params)
    assert counts == {"selected": float(selected)}
    assert terms["vocagnolm"].item() == pytest.approx(total, rel=1e-10)
    assert terms["ce"].item() == pytest.approx(full_ce, rel=1e-10)
    assert terms["ce"].item() == pytest.approx(masked_ce(s_logits, view.student.labels)["ce"].item(), rel=1e-12)


def test_teacher_gold_is_the_teachers_ce_and_the_hidden_path_gives_the_same():
    gen = torch.Generator().manual_seed(7)
    _, _, view = case(7)
    hidden = torch.randn(4, 16, 6, generator=gen, dtype=torch.float64)
    weight = torch.randn(TEACHER_VOCAB, 6, generator=gen, dtype=torch.float64)
    bias = torch.randn(TEACHER_VOCAB, generator=gen, dtype=torch.float64)
    logits = hidden @ weight.T + bias
    method = VocAgnoLM()
    full = method.teacher(LogitSource(logits=logits), view, gold=True)
    chunked = method.teacher(LogitSource(hidden=hidden, weight=weight, bias=bias, head_chunk_elements=3 * TEACHER_VOCAB),
                             view, gold=True)
    torch.testing.assert_close(chunked.reduced, full.reduced, rtol=1e-12, atol=1e-12)
    expected = ce_per_sequence(logits, view.teacher.labels)
    for key in ("ce", "tokens"):
        torch.testing.assert_close(full.gold[key], expected[key])
        torch.testing.assert_close(chunked.gold[key], expected[key])
    assert method.teacher(LogitSource(logits=logits), view, gold=False).gold is None
    # Per row, the CE of each labelled teacher token in order (the EOS of row 1 included), 0 after.
    ces = _token_ces(logits, view.teacher.labels)
    for b, row in enumerate(ces):
        assert full.reduced[b, : len(row)].tolist() == pytest.approx(row, rel=1e-10)
        assert not full.reduced[b, len(row) :].any()


def test_gradcheck_of_the_term_plus_the_fused_ce():
    s_logits, t_logits, view = case(8)
    method = VocAgnoLM(VocAgnoLMParams(top_fraction=0.5, aggregation="mean"))
    reduced = method.teacher(LogitSource(logits=t_logits), view, gold=False).reduced

    def loss(x):
        terms = method.student(x, reduced, view, ce_labels=view.student.labels)
        return terms["vocagnolm"] + 0.3 * terms["ce"]

    assert torch.autograd.gradcheck(loss, (s_logits.clone().requires_grad_(True),))


def test_gradient_of_the_term_is_the_ce_gradient_of_the_selected_tokens_only():
    s_logits, t_logits, view = case(9, dtype=torch.float32)
    method = VocAgnoLM()
    reduced = method.teacher(LogitSource(logits=t_logits), view, gold=False).reduced
    x = s_logits.clone().requires_grad_(True)
    total = method.student(x, reduced, view)["vocagnolm"]
    total.backward()
    # Plain autograd: the selected tokens' labels kept, every other label ignored.
    _, counts, _ = run(method, s_logits, t_logits, view)
    selected_rows = (x.grad.abs().sum(-1) > 0)
    assert int(selected_rows.sum()) == counts["selected"]
    kept = torch.full_like(view.student.labels, -100)
    shifted = torch.zeros_like(selected_rows)
    shifted[:, 1:] = selected_rows[:, :-1]
    kept[shifted] = view.student.labels[shifted]
    y = s_logits.clone().requires_grad_(True)
    plain = masked_ce(y, kept)["ce"]
    plain.backward()
    assert plain.item() == pytest.approx(total.item(), rel=1e-6)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-5, atol=1e-7)


def test_overlaps_that_do_not_cover_the_labelled_tokens_are_refused():
    s_logits, t_logits, view = case(10)
    lo, hi, mask = view.overlaps
    wrong = mask.clone()
    wrong[0, 0] = False
    bad = view._replace(overlaps=(lo, hi, wrong))
    with pytest.raises(ValueError, match="the overlaps cover"):
        VocAgnoLM().counts(None, bad)
    with pytest.raises(ValueError, match="needs the data pipeline's token overlaps"):
        VocAgnoLM().counts(None, view._replace(overlaps=None))


def test_labelled_positions():
    labels = torch.tensor([[-100, 5, 6, -100, 7], [-100, -100, -100, -100, -100], [1, -100, 2, -100, -100]])
    positions, present = labelled_positions(labels)
    assert positions.tolist() == [[1, 2, 4], [0, 0, 0], [0, 2, 0]]
    assert present.tolist() == [[True, True, True], [False, False, False], [True, True, False]]
    assert labelled_positions(labels, 4)[0].shape == (3, 4)


# ---------------------------------------------------------------------------------- the cache


def _select(view: TeacherView, logits, rows: list[int]):
    """A new micro-batch of some rows of ``view`` (row 3 of a case is its filler row)."""
    pick = lambda t: torch.stack([t[r] for r in rows])
    student, teacher = ModelBatch(*(pick(t) for t in view.student)), ModelBatch(*(pick(t) for t in view.teacher))
    overlaps = tuple(pick(t) for t in view.overlaps)
    return TeacherView(position_pairing(student.labels, teacher.labels), student, teacher, overlaps=overlaps), pick(logits)


def test_cache_round_trip_equals_the_live_teacher(tmp_path):
    s_logits, t_logits, view = case(11, dtype=torch.float32)
    method = VocAgnoLM(VocAgnoLMParams(aggregation="mean"))
    for chunk, (rows, record_ids) in enumerate([([0, 1], [20, 21]), ([2], [22])]):
        part_view, part_logits = _select(view, t_logits, rows)
        output = method.teacher(LogitSource(logits=part_logits), part_view, gold=True)
        cache.write_chunk(tmp_path, chunk, [cache.chunk_tensors(method, output, part_view, torch.tensor(record_ids))])
    binding = {"checkpoint": "c", "tokenizer": "t", "template": {}, "data": "d", "pairing": "offsets",
               "loss": method.cache_settings()}
    manifest = {"format": cache.FORMAT_VERSION, "binding": binding, "num_records": 3, "chunk_records": 2, "num_chunks": 2}
    (tmp_path / cache.MANIFEST).write_text(json.dumps(manifest))
    opened = cache.TeacherCache.open(tmp_path, binding, "teachers[0]", num_records=3)

    read_view, read_logits = _select(view, t_logits, [2, 3, 0, 1])
    live = method.teacher(LogitSource(logits=read_logits), read_view, gold=True)
    cached = opened.read(torch.tensor([22, -1, 20, 21]), read_view, method, torch.device("cpu"))
    torch.testing.assert_close(cached.reduced, live.reduced, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cached.gold["ce"], live.gold["ce"], rtol=1e-6, atol=1e-6)
    student = torch.stack([s_logits[r] for r in (2, 3, 0, 1)])
    live_terms = method.student(student, live.reduced, read_view, ce_labels=read_view.student.labels)
    cached_terms = method.student(student, cached.reduced, read_view, ce_labels=read_view.student.labels)
    for name in ("vocagnolm", "ce"):
        assert cached_terms[name].item() == pytest.approx(live_terms[name].item(), rel=1e-5)


# ------------------------------------------------------------------------------- recipe errors


@pytest.mark.parametrize("field,value,expected", [
    ("top_fraction", "0", "> 0 and <= 1"),
    ("top_fraction", "1.5", "> 0 and <= 1"),
    ("top_fraction", "inf", "finite"),
    ("aggregation", "median", "expected one of max, mean, min"),
])
def test_bad_hyper_parameters_are_one_clear_error(field, value, expected):
    err = io.StringIO()
    with redirect_stderr(err):
        code = cli_main(["--config", ZERO3, "--dry-run", f"teachers.qwen.loss={{kind: vocagnolm, {field}: {value}}}"])
    assert code == 2, err.getvalue()
    assert f"teachers[1].loss.{field}" in err.getvalue() and expected in err.getvalue(), err.getvalue()
    assert len(err.getvalue().strip().splitlines()) == 1


def test_a_top_fraction_of_one_is_accepted():
    recipe = load_recipe(None, ["teachers.qwen.loss={kind: vocagnolm, top_fraction: 1.0, aggregation: min}"])
    assert recipe.teachers[1].loss.params == VocAgnoLMParams(top_fraction=1.0, aggregation="min")


# ------------------------------------------------------------------------ 2 ranks == 1 rank x 2


def recipe(tmp: Path) -> Path:
    """The demo with the qwen teacher first and distilled with ``vocagnolm`` (so its method is the one
    that fuses the student's CE); llama and opt keep MultiLevelOT."""
    raw = yaml.safe_load(DEFAULT_RECIPE.read_text())
    llama, qwen, opt = raw["teachers"]
    qwen["loss"] = {"kind": "vocagnolm", "top_fraction": 0.5}
    raw["teachers"] = [qwen, llama, opt]
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
                                "data.cache_dir": str(tmp_path / "cache"), **extra})]

    two = run_job(deepspeed_command(2, args("two"), free_port()), env, tmp_path / "two.log")
    assert two.returncode == 0, two.log_text[-4000:]
    one = run_job(deepspeed_command(1, args("one", **{"train.grad_accum": 2}), free_port()), env, tmp_path / "one.log")
    assert one.returncode == 0, one.log_text[-4000:]
    tool = [sys.executable, str(REPO / "tools" / "cache_teachers.py"), *args("build"), "--teachers", "qwen",
            "--chunk-records", "8"]
    built = run_job(tool, env, tmp_path / "build.log")
    assert built.returncode == 0, built.log_text[-4000:]
    cached = run_job(deepspeed_command(1, args("cached", **{"train.grad_accum": 2, "teachers.qwen.source": "cache"}),
                                       free_port()), env, tmp_path / "cached.log")
    assert cached.returncode == 0, cached.log_text[-4000:]

    rows = {name: metrics(tmp_path / name) for name in ("two", "one", "cached")}
    keys = ["train/loss", "train/ce", "teacher/qwen/vocagnolm", "teacher/qwen/kd", "teacher/llama/sd", "teacher/opt/sd"]
    for step in (1, 2, 3):
        for key in keys:
            assert rows["two"][step][key] == pytest.approx(rows["one"][step][key], rel=1e-5, abs=1e-7), (step, key)
            assert rows["cached"][step][key] == pytest.approx(rows["one"][step][key], rel=1e-5, abs=1e-7), (step, key)
        assert rows["one"][step]["teacher/qwen/vocagnolm"] > 0
