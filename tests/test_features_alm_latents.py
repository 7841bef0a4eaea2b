"""ALM's hidden-state term (``alm`` with ``latents: true``): float64 loops, nothing changes with it off,
hidden path == full logits, gradients (the projector against finite differences), the offline cache
round trip and bad hyper-parameters. Its real 2-rank jobs (== 1 rank x 2 accumulation steps, cached == live,
resume) are in ``test_projector_methods_multirank.py``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mlot_ds.engine import modules as trainable
from mlot_ds.losses import LogitSource, MethodContext, TeacherView
from mlot_ds.losses.alm import AlmLatentsTeacher, AlmParams, AlmTeacher, ApproximateLikelihoodMatching, latent_term
from mlot_ds.losses.method import HIDDEN, ModelDims
from mlot_ds.pairing import ModelBatch, Pairing
from mlot_ds.teachers import cache
from tests.helpers import ZERO3

IGNORE = -100
S_IDS, T_IDS, DS, DT = 31, 27, 5, 7
# Per record: (student prompt, teacher prompt, groups as (student tokens, teacher tokens)); None = filler.
RECORDS = [(2, 3, [(1, 2), (2, 1), (1, 1), (2, 3)]), None, (3, 1, [(2, 1), (1, 1), (1, 2)]), (1, 2, [(1, 4)])]


def surfaces(count: int, seed: int) -> tuple:
    gen = np.random.default_rng(seed)
    return tuple(None if i % 7 == 0 else (b" " if gen.random() < 0.3 else b"") + b"ab"[: 1 + i % 2] for i in range(count))


CONTEXT = MethodContext(student_surfaces=surfaces(S_IDS, 1), teacher_surfaces=surfaces(T_IDS, 2), student_vocab=S_IDS,
                        teacher_vocab=T_IDS, student_dims=ModelDims(DS, DS, S_IDS, 2),
                        teacher_dims=ModelDims(DT, DT, T_IDS, 2))


def micro_batch(records=RECORDS, seed=0, dtype=torch.float64):
    """Right-padded sides (response + EOS labelled), one offsets pair per group with its stops, random
    logits and final hidden states on both sides."""
    gen = torch.Generator().manual_seed(seed)
    s_len = max(r[0] + sum(g[0] for g in r[2]) + 1 for r in records if r) + 2
    t_len = max(r[1] + sum(g[1] for g in r[2]) + 1 for r in records if r) + 1
    batch = len(records)
    sides = {}
    for name, length, vocab, width in (("s", s_len, S_IDS, DS), ("t", t_len, T_IDS, DT)):
        sides[name] = {"ids": torch.randint(0, vocab, (batch, length), generator=gen),
                       "att": torch.zeros(batch, length, dtype=torch.long), "labels": torch.full((batch, length), IGNORE),
                       "logits": torch.randn(batch, length, vocab, generator=gen, dtype=dtype) * 2,
                       "hidden": torch.randn(batch, length, width, generator=gen, dtype=dtype) * 3 + 0.5}
    fields = [[[] for _ in range(batch)] for _ in range(4)]
    for b, record in enumerate(records):
        if record is None:
            continue
        s_prompt, t_prompt, groups = record
        for name, prompt, part in (("s", s_prompt, 0), ("t", t_prompt, 1)):
            end = prompt + sum(g[part] for g in groups) + 1
            sides[name]["att"][b, :end] = 1
            sides[name]["labels"][b, prompt:end] = sides[name]["ids"][b, prompt:end]
        s_pos, t_pos = s_prompt, t_prompt
        for s_n, t_n in groups:
            for k, value in enumerate((s_pos - 1, s_pos - 1 + s_n, t_pos - 1, t_pos - 1 + t_n)):
                fields[k][b].append(value)
            s_pos, t_pos = s_pos + s_n, t_pos + t_n
    width = max(len(row) for row in fields[0])
    packed = torch.zeros(4, batch, width, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.bool)
    for k in range(4):
        for b, row in enumerate(fields[k]):
            packed[k, b, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[b, : len(row)] = True
    view = TeacherView(Pairing(packed[0], packed[2], mask),
                       ModelBatch(sides["s"]["ids"], sides["s"]["att"], sides["s"]["labels"]),
                       ModelBatch(sides["t"]["ids"], sides["t"]["att"], sides["t"]["labels"]), groups=(packed[1], packed[3]))
    return view, sides, fields


def method_for(latents=True, dtype=torch.float64, **params) -> ApproximateLikelihoodMatching:
    method = ApproximateLikelihoodMatching(AlmParams(latents=latents, **params), None, CONTEXT)
    manifest = trainable.module_manifest({"t": method})
    if manifest:
        method.attach_modules(trainable.build_modules(manifest, seed=5, dtype=dtype)["t"])
    return method


def run(method, view, sides, *, student_hidden=None, logits=None):
    t = sides["t"]
    features = {HIDDEN: t["hidden"]}
    output = method.teacher(LogitSource(logits=t["logits"], features=features), view, gold=False)
    student_view = view._replace(features={HIDDEN: sides["s"]["hidden"] if student_hidden is None else student_hidden})
    terms = method.student(sides["s"]["logits"] if logits is None else logits, output.reduced, student_view)
    return output, method.counts(output.reduced, view), terms


def reference(method, sides, fields):
    projector = method.trainable["latents"]
    w, bias = projector.weight.detach(), projector.bias.detach()
    pairs = []
    for b in range(len(fields[0])):
        for s_stop, t_stop in zip(fields[1][b], fields[3][b]):
            pairs.append((w @ sides["s"]["hidden"][b, s_stop] + bias, sides["t"]["hidden"][b, t_stop]))
    scale = [sum(float(t[k]) ** 2 for _, t in pairs) / len(pairs) + 1e-8 for k in range(DT)]
    return sum(sum((float(p[k]) - float(t[k])) ** 2 / scale[k] for k in range(DT)) / DT for p, t in pairs), len(pairs)


def test_the_latent_term_matches_the_float64_loops_and_the_alm_term_is_unchanged():
    view, sides, fields = micro_batch()
    method = method_for()
    output, counts, terms = run(method, view, sides)
    want, chunks = reference(method, sides, fields)
    assert terms["latents"].item() == pytest.approx(want, rel=1e-10)
    assert counts["latent_chunks"] == chunks == 8 and isinstance(output.reduced, AlmLatentsTeacher)
    off = method_for(latents=False)
    plain_output, plain_counts, plain_terms = run(off, view, sides)
    assert plain_counts == {"chunks": counts["chunks"]} and set(plain_terms) == {"alm"}
    assert terms["alm"].item() == plain_terms["alm"].item()
    assert type(plain_output.reduced) is AlmTeacher
    assert method.term_denominator("latents") == "latent_chunks" and method.term_denominator("alm") == "chunks"
    assert method.term_weights == {"alm": 1.0, "latents": 1.0} and off.term_weights == {"alm": 1.0}


def test_latents_off_adds_nothing():
    off = method_for(latents=False)
    assert off.module_specs() == {} and off.teacher_features() == frozenset() and off.student_features() == frozenset()
    assert type(off).needs_for(off.params) == {"groups", "surfaces"}
    assert "latents" not in off.cache_settings()
    on = method_for()
    assert type(on).needs_for(on.params) == {"groups", "surfaces", "dims"}
    spec = on.module_specs()["latents"]
    assert (spec.in_features, spec.out_features, spec.init, spec.lr, spec.lr_scale) == (DS, DT, "lecun_normal", None, 2.0)
    assert on.cache_settings() == {**off.cache_settings(), "latents": True}


def test_latent_term_properties():
    gen = torch.Generator().manual_seed(4)
    teacher = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    assert latent_term(teacher.clone(), teacher).item() == 0.0
    # each channel is measured against the teacher's own scale: scaling a channel of both leaves the term
    student = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    scale = torch.tensor([1.0, 10.0, 0.1], dtype=torch.float64)
    assert latent_term(student * scale, teacher * scale).item() == pytest.approx(latent_term(student, teacher).item(),
                                                                                rel=1e-6)
    empty = torch.zeros(0, 3, dtype=torch.float64, requires_grad=True)
    value = latent_term(empty, torch.zeros(0, 3, dtype=torch.float64))
    value.backward()
    assert value.item() == 0.0 and empty.grad.shape == (0, 3)


def test_gradcheck_of_the_projector_and_the_student_hidden_states():
    view, sides, _ = micro_batch(RECORDS[:3])
    method = method_for()
    reduced = method.teacher(LogitSource(logits=sides["t"]["logits"], features={HIDDEN: sides["t"]["hidden"]}), view,
                             gold=False).reduced
    bias = method.trainable["latents"].bias.detach()

    class Affine(torch.nn.Module):
        def __init__(self, weight):
            super().__init__()
            self.weight = weight

        def forward(self, x):
            return x @ self.weight.T + bias

    def term(weight, hidden):
        method.attach_modules({"latents": Affine(weight)})
        return method.student(sides["s"]["logits"], reduced, view._replace(features={HIDDEN: hidden}))["latents"]

    weight = method.trainable["latents"].weight.detach().clone().requires_grad_(True)
    hidden = sides["s"]["hidden"].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(term, (weight, hidden), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_hidden_states_and_the_output_layer_equal_full_logits():
    view, sides, _ = micro_batch()
    method = method_for()
    gen = torch.Generator().manual_seed(9)
    head = torch.randn(T_IDS, DT, generator=gen, dtype=torch.float64)
    hidden = sides["t"]["hidden"]
    full = method.teacher(LogitSource(logits=hidden @ head.T, features={HIDDEN: hidden}), view, gold=True)
    chunked = method.teacher(LogitSource(hidden=hidden, weight=head, head_chunk_elements=2 * T_IDS,
                                         features={HIDDEN: hidden}), view, gold=True)
    for name in AlmLatentsTeacher._fields:
        torch.testing.assert_close(getattr(chunked.reduced, name), getattr(full.reduced, name), rtol=1e-10, atol=1e-12)


def test_the_offline_cache_gives_the_live_teacher(tmp_path):
    method = method_for(dtype=torch.float32)
    settings = method.cache_settings()
    binding = {"checkpoint": "c", "tokenizer": "t", "template": {}, "data": "d", "pairing": "offsets", "loss": settings}
    view, sides, _ = micro_batch(RECORDS, dtype=torch.float32)
    t = sides["t"]
    output = method.teacher(LogitSource(logits=t["logits"], features={HIDDEN: t["hidden"]}), view, gold=True)
    record_ids = torch.tensor([0, -1, 1, 2])
    cache.write_chunk(tmp_path, 0, [cache.chunk_tensors(method, output, view, record_ids)])
    manifest = {"format": cache.FORMAT_VERSION, "binding": binding, "num_records": 3, "chunk_records": 3, "num_chunks": 1}
    (tmp_path / cache.MANIFEST).write_text(json.dumps(manifest))
    opened = cache.TeacherCache.open(tmp_path, binding, "teachers[1]", num_records=3)
    cached = opened.read(record_ids, view, method, torch.device("cpu"))
    for name in AlmLatentsTeacher._fields:
        torch.testing.assert_close(getattr(cached.reduced, name), getattr(output.reduced, name).to(
            getattr(cached.reduced, name).dtype), rtol=0, atol=0)
    student_view = view._replace(features={HIDDEN: sides["s"]["hidden"]})
    live = method.student(sides["s"]["logits"], output.reduced, student_view)
    again = method.student(sides["s"]["logits"], cached.reduced, student_view)
    assert again["latents"].item() == live["latents"].item() and again["alm"].item() == live["alm"].item()


@pytest.mark.parametrize("param,value,message", [
    ("latents_lr_scale", "0", "expected a positive number"), ("latents", "maybe", "expected true or false"),
])
def test_bad_hyper_parameters_are_one_line_through_the_cli(param, value, message, capsys):
    from mlot_ds.engine.cli import main

    code = main(["--config", ZERO3, "--dry-run", f"teachers.qwen.loss={{kind: alm, {param}: {value}}}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("error:") == 1 and f"teachers[1].loss.{param}: {message}" in err, err
