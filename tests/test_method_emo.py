"""The ``emo`` method class (IRA + OTIS, adapted to causal students): CKA and Sinkhorn against independent
float64 references, the class against float64 loops, gradients (the projector against finite differences),
the offline cache round trip and bad hyper-parameters. Its real 2-rank jobs (== 1 rank x 2 accumulation
steps, cached == live, resume) are in ``test_projector_methods_multirank.py``."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mlot_ds.engine import modules as trainable
from mlot_ds.losses import METHODS, LogitSource, MethodContext, TeacherView
from mlot_ds.losses.emo import (
    EmoParams,
    EmoTeacher,
    IntraModelRelationOT,
    centred_gram,
    cka_loss,
    select_important,
    sinkhorn_cost,
)
from mlot_ds.losses.method import HIDDEN, ModelDims, attention
from mlot_ds.pairing import ModelBatch, Pairing
from mlot_ds.teachers import cache
from tests.helpers import ZERO3

IGNORE = -100
DS, DT, TS, TT = 6, 9, 13, 14
CONTEXT = MethodContext(student_dims=ModelDims(DS, DS, 40, 2), teacher_dims=ModelDims(DT, DT, 50, 4))
# Per record: (student prompt, student answer, teacher prompt, teacher answer, 1:1 pairs as answer offsets)
LAYOUT = [(2, 9, 3, 10, [(0, 0), (1, 2), (2, 3), (3, 4), (4, 5), (5, 6), (6, 7), (7, 8), (8, 9)]), None,
          (3, 8, 1, 9, [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 6), (6, 8)]), (1, 4, 2, 3, [(0, 0), (2, 1)])]


def causal_attention(gen, batch, length, valid):
    scores = torch.randn(batch, length, length, generator=gen, dtype=torch.float64) * 2
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    mask = causal & valid.unsqueeze(1)
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)


def micro_batch(layout=LAYOUT, seed=0):
    gen = torch.Generator().manual_seed(seed)
    batch = len(layout)
    out = {}
    for side, length, width, offset in (("s", TS, DS, 0), ("t", TT, DT, 2)):
        ids = torch.randint(0, 30, (batch, length), generator=gen)
        att = torch.zeros(batch, length, dtype=torch.long)
        labels = torch.full((batch, length), IGNORE)
        for b, record in enumerate(layout):
            if record is None:
                att[b, :2] = 1
                continue
            prompt, answer = record[offset], record[offset + 1]
            att[b, : prompt + answer] = 1
            labels[b, prompt : prompt + answer] = ids[b, prompt : prompt + answer]
        out[side] = {"batch": ModelBatch(ids, att, labels), "hidden": torch.randn(batch, length, width, generator=gen,
                                                                                    dtype=torch.float64)}
        out[side]["attention"] = causal_attention(gen, batch, length, att.bool())
        out[side]["attention2"] = causal_attention(gen, batch, length, att.bool())
    width = max([1] + [len(r[4]) for r in layout if r])
    s_index = torch.zeros(batch, width, dtype=torch.long)
    t_index = torch.zeros(batch, width, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.bool)
    for b, record in enumerate(layout):
        if record is None:
            continue
        for p, (i, j) in enumerate(record[4]):
            # rows predicting the answer's i-th / j-th token
            s_index[b, p], t_index[b, p], mask[b, p] = record[0] + i - 1, record[2] + j - 1, True
    out["view"] = TeacherView(Pairing(s_index, t_index, mask), out["s"]["batch"], out["t"]["batch"])
    return out


def method_for(dtype=torch.float64, **params) -> IntraModelRelationOT:
    method = IntraModelRelationOT(EmoParams(**params), None, CONTEXT)
    method.attach_modules(trainable.build_modules(trainable.module_manifest({"t": method}), seed=2, dtype=dtype)["t"])
    return method


def ira_attention(method, mb):
    """The teacher's IRA layer is its importance layer unless ``importance_layer`` says otherwise."""
    importance, ira = method._layers()
    return mb["t"]["attention"] if ira == importance else mb["t"]["attention2"]


def teacher_features(method, mb):
    layers = method._layers()
    features = {HIDDEN: mb["t"]["hidden"], attention(layers[1]): ira_attention(method, mb),
                attention(layers[0]): mb["t"]["attention"]}
    logits = torch.randn(*mb["t"]["hidden"].shape[:2], 50, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    return LogitSource(logits=logits, features=features)


def student_terms(method, mb, reduced, hidden=None, weights=None):
    hidden = mb["s"]["hidden"] if hidden is None else hidden
    weights = mb["s"]["attention"] if weights is None else weights
    view = mb["view"]._replace(features={HIDDEN: hidden, attention(-1): weights})
    logits = torch.zeros(*hidden.shape[:2], 40, dtype=hidden.dtype)
    return method.student(logits, reduced, view)


# ------------------------------------------------------------------------------ float64 references


def cka_direct(xs, xt, eps=1e-8):
    """The reference's CKALoss on feature rows, written out: centre columns, Frobenius norms."""
    xs = xs - xs.mean(0, keepdim=True)
    xt = xt - xt.mean(0, keepdim=True)
    num = torch.linalg.matrix_norm(xs.T @ xt)
    return 1 - num / torch.sqrt((torch.linalg.matrix_norm(xs.T @ xs) + eps) * (torch.linalg.matrix_norm(xt.T @ xt) + eps))


def sinkhorn_loop(cost, a, b, eps, iters, tol):
    """The reference's plain-domain iteration, one scalar at a time."""
    n, m = len(cost), len(cost[0])
    a = [x / sum(a) for x in a]
    b = [x / sum(b) for x in b]
    kernel = [[math.exp(-cost[i][j] / eps) for j in range(m)] for i in range(n)]
    u, v = [1.0] * n, [1.0] * m
    for _ in range(iters):
        previous = u
        v = [b[j] / (sum(kernel[i][j] * u[i] for i in range(n)) + 1e-9) for j in range(m)]
        u = [a[i] / (sum(kernel[i][j] * v[j] for j in range(m)) + 1e-9) for i in range(n)]
        if max(abs(x - y) for x, y in zip(u, previous)) < tol:
            break
    return sum(u[i] * kernel[i][j] * v[j] * cost[i][j] for i in range(n) for j in range(m))


def log_domain_plan(cost, a, b, eps, iters=10000):
    """Entropic OT in the log domain, float64, run to convergence (an independent solver)."""
    log_k = -cost / eps
    f = torch.zeros(len(a), dtype=torch.float64)
    g = torch.zeros(len(b), dtype=torch.float64)
    for _ in range(iters):
        f = torch.log(a) - torch.logsumexp(log_k + g.unsqueeze(0), dim=1)
        g = torch.log(b) - torch.logsumexp(log_k + f.unsqueeze(1), dim=0)
    return torch.exp(log_k + f.unsqueeze(1) + g.unsqueeze(0))


def reference(method, mb):
    params, projector = method.params, method.trainable["t2s"]
    w, bias = projector.weight.detach(), projector.bias.detach()
    ira = otis = 0.0
    s_labels, t_labels = mb["view"].student.labels, mb["view"].teacher.labels
    for b, record in enumerate(LAYOUT):
        if record is None:
            continue
        rs = [q for q in range(1, TS) if int(s_labels[b, q]) != IGNORE]
        rt = [q for q in range(1, TT) if int(t_labels[b, q]) != IGNORE]
        valid = mb["view"].teacher.attention_mask[b].bool()
        received = [float(mb["t"]["attention"][b, valid, q].sum()) for q in rt]
        top = max(received)
        weights = [math.exp(r - top) for r in received]
        pi = {q: w_ / sum(weights) for q, w_ in zip(rt, weights)}
        pairs = [(record[0] + i, record[2] + j) for i, j in record[4]]  # token positions
        m = min(len(pairs) // params.top_divisor, params.max_important)
        ranked = sorted(range(len(pairs)), key=lambda p: (-pi[pairs[p][1]], p))[:m]
        if m >= 2:
            xt = torch.stack([ira_attention(method, mb)[b, pairs[p][1]] for p in ranked])
            xs = torch.stack([mb["s"]["attention"][b, pairs[p][0]] for p in ranked])
            ira += float(cka_direct(xs, xt))
        floor = min(pi.values())
        paired = {s: t for s, t in pairs}
        raw = [pi[paired[q]] if q in paired else floor for q in rs]
        top = max(raw)
        student_mass = [math.exp(r - top) for r in raw]
        teacher_rows = [w @ mb["t"]["hidden"][b, q] + bias for q in rt]
        cost = []
        for q in rs:
            logits = [float(mb["s"]["hidden"][b, q] @ t) / math.sqrt(DS) for t in teacher_rows]
            peak = max(logits)
            e = [math.exp(x - peak) for x in logits]
            cost.append([1 - x / sum(e) for x in e])
        otis += sinkhorn_loop(cost, student_mass, [pi[q] for q in rt], params.sinkhorn_epsilon,
                              params.sinkhorn_iterations, params.sinkhorn_tolerance)
    return ira, otis


def test_cka_of_grams_equals_the_reference_formula_and_its_invariances():
    gen = torch.Generator().manual_seed(1)
    xs, xt = torch.randn(5, 11, generator=gen, dtype=torch.float64), torch.randn(5, 8, generator=gen, dtype=torch.float64)
    mask = torch.ones(1, 5, dtype=torch.bool)

    def cka(a, b):
        return float(cka_loss(centred_gram(a.unsqueeze(0), mask), centred_gram(b.unsqueeze(0), mask))[0])

    assert cka(xs, xt) == pytest.approx(float(cka_direct(xs, xt)), rel=1e-12)
    q, _ = torch.linalg.qr(torch.randn(11, 11, generator=gen, dtype=torch.float64))
    assert cka(xs @ q, xs) == pytest.approx(0.0, abs=1e-7)  # orthogonal transforms
    assert cka(3.7 * xs, xs) == pytest.approx(0.0, abs=1e-7)  # isotropic scaling
    assert 0.05 < cka(xs, xt) < 1.0
    # padded rows change nothing
    padded = torch.cat([xs, torch.randn(2, 11, generator=gen, dtype=torch.float64)]).unsqueeze(0)
    real = torch.tensor([[True] * 5 + [False] * 2])
    gram = centred_gram(padded, real)
    assert float(cka_loss(gram, gram)[0]) == pytest.approx(0.0, abs=1e-7)
    torch.testing.assert_close(gram[0, :5, :5], centred_gram(xs.unsqueeze(0), mask)[0])


def test_sinkhorn_matches_the_loop_and_a_converged_log_domain_solver():
    gen = torch.Generator().manual_seed(2)
    cost = torch.rand(5, 7, generator=gen, dtype=torch.float64)
    a = torch.rand(5, generator=gen, dtype=torch.float64) + 0.1
    b = torch.rand(7, generator=gen, dtype=torch.float64) + 0.1
    got = float(sinkhorn_cost(cost, a, b, epsilon=0.1))
    assert got == pytest.approx(sinkhorn_loop(cost.tolist(), a.tolist(), b.tolist(), 0.1, 100, 1e-9), rel=1e-10)
    converged = float(sinkhorn_cost(cost, a, b, epsilon=0.1, iterations=20000, tolerance=1e-15))
    plan = log_domain_plan(cost, a / a.sum(), b / b.sum(), 0.1)
    torch.testing.assert_close(plan.sum(1), a / a.sum(), rtol=0, atol=1e-12)
    assert converged == pytest.approx(float((plan * cost).sum()), rel=1e-7)
    # the plan is not uniform: it moves mass to cheap cells (what the loss is for)
    independent = float(((a / a.sum()).unsqueeze(1) * (b / b.sum()).unsqueeze(0) * cost).sum())
    assert converged < independent - 0.05


def test_select_important_takes_the_top_third_most_important_first():
    importance = torch.tensor([[0.1, 0.5, 0.2, 0.9, 0.3, 0.4, 0.0], [0.3, 0.3, 0.1, 0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[True] * 7, [True, True, True, False, False, False, False]])
    assert select_important(importance, mask, 3, 4).tolist() == [[3, 1, -1, -1], [0, -1, -1, -1]]
    assert select_important(importance, mask, 1, 2).tolist() == [[3, 1], [0, 1]]


# ------------------------------------------------------------------------------------- the class


@pytest.mark.parametrize("params", [{}, {"top_divisor": 2, "sinkhorn_epsilon": 0.3}, {"max_important": 2},
                                    {"importance_layer": 1, "top_divisor": 1}])
def test_the_class_matches_the_float64_loops(params):
    method = method_for(**params)
    mb = micro_batch()
    output = method.teacher(teacher_features(method, mb), mb["view"], gold=True)
    terms = student_terms(method, mb, output.reduced)
    ira, otis = reference(method, mb)
    assert terms["ira"].item() == pytest.approx(ira, rel=1e-9, abs=1e-15)
    assert ira > 1e-3 or method.params.max_important == 2  # two rows centred are one direction: CKA 0
    assert terms["otis"].item() == pytest.approx(otis, rel=1e-9) and otis > 0
    important = sum(min(len(r[4]) // method.params.top_divisor, method.params.max_important) >= 2 for r in LAYOUT if r)
    assert method.counts(output.reduced, mb["view"]) == {"sequences": 3.0, "ira_sequences": float(important)}
    assert method.term_denominator("ira") == "ira_sequences" and method.term_denominator("otis") == "sequences"
    assert output.gold["tokens"].tolist() == [10.0, 0.0, 9.0, 3.0]


def test_importance_mean_removes_the_causal_bias():
    method = method_for(importance="mean")
    mb = micro_batch()
    uniform = torch.ones(len(LAYOUT), TT, TT, dtype=torch.float64).tril()
    uniform = uniform / uniform.sum(-1, keepdim=True)
    mb["t"]["attention"] = uniform  # every earlier position attended equally
    reduced = method.teacher(teacher_features(method, mb), mb["view"], gold=False).reduced
    summed = method_for().teacher(teacher_features(method, mb), mb["view"], gold=False).reduced
    real = reduced.importance[0][reduced.mask[0]]
    assert (summed.importance[0][summed.mask[0]].diff() < 0).all()  # sums favour early tokens
    assert real.max() / real.min() < (summed.importance[0][summed.mask[0]].max() / summed.importance[0][summed.mask[0]].min())


def test_gradcheck_of_the_projector_the_student_hidden_states_and_attention():
    method = method_for(sinkhorn_iterations=30)
    mb = micro_batch(LAYOUT[:3])
    reduced = method.teacher(teacher_features(method, mb), mb["view"], gold=False).reduced
    bias = method.trainable["t2s"].bias.detach()

    class Affine(torch.nn.Module):
        def __init__(self, weight):
            super().__init__()
            self.weight = weight

        def forward(self, x):
            return x @ self.weight.T + bias

    def total(weight, hidden, weights):
        method.attach_modules({"t2s": Affine(weight)})
        terms = student_terms(method, mb, reduced, hidden=hidden, weights=weights)
        return terms["ira"] + 3 * terms["otis"]

    weight = method.trainable["t2s"].weight.detach().clone().requires_grad_(True)
    hidden = mb["s"]["hidden"].clone().requires_grad_(True)
    weights = mb["s"]["attention"].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(total, (weight, hidden, weights), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_a_micro_batch_of_filler_rows_counts_nothing_and_reaches_the_projector():
    method = method_for()
    mb = micro_batch([None, None])
    reduced = method.teacher(teacher_features(method, mb), mb["view"], gold=False).reduced
    assert method.counts(reduced, mb["view"]) == {"sequences": 0.0, "ira_sequences": 0.0}
    terms = student_terms(method, mb, reduced)
    (terms["ira"] + terms["otis"]).backward()
    assert terms["otis"].item() == 0.0 and terms["ira"].item() == 0.0
    grad = method.trainable["t2s"].weight.grad
    assert grad is not None and grad.abs().max().item() == 0.0


def test_the_offline_cache_gives_the_live_teacher(tmp_path):
    method = method_for(dtype=torch.float32)
    mb = micro_batch()
    mb = {k: ({n: (t.float() if torch.is_tensor(t) and t.is_floating_point() else t) for n, t in v.items()}
              if isinstance(v, dict) else v) for k, v in mb.items()}
    output = method.teacher(teacher_features(method, mb), mb["view"], gold=True)
    settings = method.cache_settings()
    assert settings == {"kind": "emo", "importance": "sum", "top_divisor": 3, "max_important": 64, "layers": [3, 3]}
    binding = {"checkpoint": "c", "tokenizer": "t", "template": {}, "data": "d", "pairing": "dtw", "loss": settings}
    record_ids = torch.tensor([0, -1, 1, 2])
    cache.write_chunk(tmp_path, 0, [cache.chunk_tensors(method, output, mb["view"], record_ids)])
    manifest = {"format": cache.FORMAT_VERSION, "binding": binding, "num_records": 3, "chunk_records": 3, "num_chunks": 1}
    (tmp_path / cache.MANIFEST).write_text(json.dumps(manifest))
    cached = cache.TeacherCache.open(tmp_path, binding, "teachers[0]", num_records=3).read(
        record_ids, mb["view"], method, torch.device("cpu"))
    for name in EmoTeacher._fields:
        torch.testing.assert_close(getattr(cached.reduced, name), getattr(output.reduced, name), rtol=0, atol=0)
    live, again = (student_terms(method, mb, r) for r in (output.reduced, cached.reduced))
    assert all(again[k].item() == live[k].item() for k in live)


def test_class_attributes_and_defaults():
    cls = METHODS["emo"]
    assert cls is IntraModelRelationOT
    assert (cls.terms, cls.denominator, cls.pairings, cls.cacheable) == (("ira", "otis"), "sequences", ("dtw",), True)
    assert cls.default_weights(EmoParams()) == {"ira": pytest.approx(0.1), "otis": 1.0}
    method = cls(None, None, CONTEXT)
    assert method._layers() == (3, 3)  # teacher 4 layers, student 2: block 2, layer 2 * 2 - 1
    assert method.teacher_features() == {HIDDEN, attention(3)} and method.student_features() == {HIDDEN, attention(-1)}
    spec = method.module_specs()["t2s"]
    assert (spec.in_features, spec.out_features, spec.lr) == (DT, DS, 1e-3)
    with pytest.raises(ValueError, match="importance_layer: the teacher has 4 layers; 7 does not exist"):
        cls.check(EmoParams(importance_layer=7), CONTEXT)


@pytest.mark.parametrize("param,value,message", [
    ("top_divisor", "0", "expected an integer >= 1"), ("sinkhorn_epsilon", "-1", "expected a positive number"),
    ("importance", "max", "expected one of sum, mean"), ("kd_ratio", "1", "expected a number > 0 and < 1"),
])
def test_bad_hyper_parameters_are_one_line_through_the_cli(param, value, message, capsys):
    from mlot_ds.engine.cli import main

    code = main(["--config", ZERO3, "--dry-run", "teachers.llama.pairing=dtw",
                 f"teachers.llama.loss={{kind: emo, {param}: {value}}}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("error:") == 1 and f"teachers[0].loss.{param}: {message}" in err, err
