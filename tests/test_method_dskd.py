"""The ``dskd`` method class (DSKD with cross-model attention): float64 loops, hidden path == full logits,
gradients (projectors against finite differences), the kernels' invariances, the offline cache round trip
and bad hyper-parameters. Its real 2-rank jobs (== 1 rank x 2 accumulation steps, cached == live, exact
resume with projectors on 2 ranks and re-sharded on 1, the export without projectors) run together with
EMO's and ALM-latents' in ``test_projector_methods_multirank.py``."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mlot_ds.engine import modules as trainable
from mlot_ds.losses import METHODS, LogitSource, MethodContext, TeacherView
from mlot_ds.losses.ce import ce_per_sequence, masked_ce
from mlot_ds.losses.dskd import (
    DskdParams,
    DskdTeacher,
    DualSpaceKD,
    masked_std,
    response_rows,
    student_space,
    teacher_space,
)
from mlot_ds.losses.method import EMBEDDINGS, HIDDEN, OUTPUT_WEIGHT, FrozenWeight, ModelDims
from mlot_ds.pairing import ModelBatch, Pairing
from mlot_ds.teachers import cache
from tests.helpers import ZERO3

IGNORE = -100
VS, VT, ES, ET, TS, TT = 37, 41, 6, 10, 9, 11  # vocabularies, widths (embedding = hidden), lengths
CONTEXT = MethodContext(student_dims=ModelDims(ES, ES, VS, 2), teacher_dims=ModelDims(ET, ET, VT, 2),
                        student_vocab=VS, teacher_vocab=VT)
# Per record: (student prompt, student answer, teacher prompt, teacher answer); None = a filler row.
LAYOUT = [(2, 5, 3, 6), None, (3, 4, 1, 8), (1, 7, 4, 5)]


def side(gen, length, vocab, width, spans, dtype):
    ids = torch.randint(0, vocab, (len(spans), length), generator=gen)
    attention = torch.zeros(len(spans), length, dtype=torch.long)
    labels = torch.full((len(spans), length), IGNORE)
    for b, span in enumerate(spans):
        if span is None:
            attention[b, :3] = 1
            continue
        prompt, answer = span
        attention[b, : prompt + answer] = 1
        labels[b, prompt : prompt + answer] = ids[b, prompt : prompt + answer]
    embeddings = torch.randn(len(spans), length, width, generator=gen, dtype=dtype)
    hidden = torch.randn(len(spans), length, width, generator=gen, dtype=dtype)
    weight = torch.randn(vocab, width, generator=gen, dtype=dtype) * 1.5
    return ModelBatch(ids, attention, labels), embeddings, hidden, weight


def micro_batch(layout=LAYOUT, seed=0, dtype=torch.float64):
    """Both sides of a micro-batch: batches, features and output layers (logits = hidden W^T)."""
    gen = torch.Generator().manual_seed(seed)
    s_spans = [None if r is None else r[:2] for r in layout]
    t_spans = [None if r is None else r[2:] for r in layout]
    student, s_emb, s_hid, s_w = side(gen, TS, VS, ES, s_spans, dtype)
    teacher, t_emb, t_hid, t_w = side(gen, TT, VT, ET, t_spans, dtype)
    width = 1
    pairing = Pairing(torch.zeros(len(layout), width, dtype=torch.long), torch.zeros(len(layout), width, dtype=torch.long),
                      torch.zeros(len(layout), width, dtype=torch.bool))
    view = TeacherView(pairing, student, teacher)
    return {"view": view, "s_emb": s_emb, "s_hid": s_hid, "s_w": s_w, "t_emb": t_emb, "t_hid": t_hid, "t_w": t_w}


def method_for(dtype=torch.float64, seed=3, **params) -> DualSpaceKD:
    method = DualSpaceKD(DskdParams(**params), None, CONTEXT)
    manifest = trainable.module_manifest({"t": method})
    tree = trainable.build_modules(manifest, seed=seed, dtype=dtype)
    method.attach_modules(tree["t"])
    return method


def teacher_side(method, mb, *, hidden_path=False, gold=True, chunk=None):
    method.bind_teacher_constants({OUTPUT_WEIGHT: FrozenWeight(mb["t_w"])})
    features = {EMBEDDINGS: mb["t_emb"], HIDDEN: mb["t_hid"]}
    if hidden_path:
        source = LogitSource(hidden=mb["t_hid"], weight=mb["t_w"], features=features, head_chunk_elements=chunk)
    else:
        source = LogitSource(logits=mb["t_hid"] @ mb["t_w"].T, features=features)
    return method.teacher(source, mb["view"], gold=gold)


def student_terms(method, mb, reduced, *, logits=None, hidden=None, ce=True):
    hidden = mb["s_hid"] if hidden is None else hidden
    logits = hidden @ mb["s_w"].T if logits is None else logits
    view = mb["view"]._replace(features={EMBEDDINGS: mb["s_emb"], HIDDEN: hidden, OUTPUT_WEIGHT: mb["s_w"]})
    return method.student(logits, reduced, view, ce_labels=view.student.labels if ce else None)


# ---------------------------------------------------------------------------------- float64 loops


def _std(rows):
    flat = torch.cat([r.reshape(-1) for r in rows])
    mean = sum(flat.tolist()) / flat.numel()
    return math.sqrt(sum((x - mean) ** 2 for x in flat.tolist()) / (flat.numel() - 1))


def _log_softmax(row):
    top = max(row.tolist())
    lse = top + math.log(sum(math.exp(x - top) for x in row.tolist()))
    return [x - lse for x in row.tolist()]


def _kl(logits_p, logits_q, scale_p, scale_q):
    lp, lq = _log_softmax(logits_p * scale_p), _log_softmax(logits_q * scale_q)
    return sum(math.exp(a) * (a - b) for a, b in zip(lp, lq))


def reference(method, mb, labels=None):
    """The reference code's equations, one sequence, one row, one entry at a time (float64)."""
    params, mods = method.params, method.trainable
    tau, tau_t = params.kd_temperature, params.teacher_temperature
    s_labels = mb["view"].student.labels if labels is None else labels
    t_labels = mb["view"].teacher.labels
    s_logits, t_logits = mb["s_hid"] @ mb["s_w"].T, mb["t_hid"] @ mb["t_w"].T
    out = {"t2s_ce": 0.0, "t2s_kd": 0.0, "s2t_kd": 0.0, "ce": 0.0}
    argmax = {}

    def linear(module, x):
        return module.weight.detach() @ x + module.bias.detach()

    for b in range(s_labels.shape[0]):
        rs = [i for i in range(TS - 1) if int(s_labels[b, i + 1]) != IGNORE]
        rt = [j for j in range(TT - 1) if int(t_labels[b, j + 1]) != IGNORE]
        if not rs:
            continue
        e_t, h_t, e_s = mb["t_emb"][b], mb["t_hid"][b], mb["s_emb"][b]
        u_t = [torch.cat([e_t[j], e_t[j + 1]]) for j in rt]
        sigma_u, sigma_e, sigma_h = _std(u_t), _std([e_t[j + 1] for j in rt]), _std([h_t[j] for j in rt])
        keys = [u / sigma_u for u in u_t]
        queries = [linear(mods["query"], torch.cat([e_s[i], e_s[i + 1]])) for i in rs]
        scores = [[float(q @ k) / math.sqrt(2 * ET) for k in keys] for q in queries]
        v_t = [linear(mods["t2s"], h_t[j] / sigma_h + e_t[j + 1] / sigma_e) for j in rt]
        v_s = [linear(mods["s2t"], mb["s_hid"][b, i]) for i in rs]
        for a, i in enumerate(rs):
            weights = [math.exp(x) for x in _log_softmax(torch.tensor(scores[a], dtype=torch.float64))]
            carried = sum(w * v for w, v in zip(weights, v_t))
            g = mb["s_w"] @ carried
            y = int(s_labels[b, i + 1])
            out["t2s_ce"] -= _log_softmax(g)[y]
            argmax[(b, i)] = int(torch.tensor(g.tolist()).argmax())
            if argmax[(b, i)] == y:
                out["t2s_kd"] += _kl(g, s_logits[b, i], 1 / (tau * tau_t), 1 / tau)
            out["ce"] -= _log_softmax(s_logits[b, i])[y]
        for c, j in enumerate(rt):
            column = torch.tensor([scores[a][c] for a in range(len(rs))], dtype=torch.float64)
            weights = [math.exp(x) for x in _log_softmax(column)]
            carried = sum(w * v for w, v in zip(weights, v_s))
            out["s2t_kd"] += _kl(t_logits[b, j], mb["t_w"] @ carried, 1 / tau, 1 / tau)
    return out, argmax


def with_some_correct(mb, argmax):
    """The student labels with every other response row's label set to the projected teacher's argmax
    (the projection does not depend on the label values), so the accuracy mask is neither all nor none."""
    labels = mb["view"].student.labels.clone()
    for n, ((b, i), top) in enumerate(sorted(argmax.items())):
        if n % 2 == 0:
            labels[b, i + 1] = top
    view = mb["view"]
    mb = dict(mb)
    mb["view"] = view._replace(student=view.student._replace(labels=labels))
    return mb


@pytest.mark.parametrize("params", [{}, {"kd_temperature": 1.0, "teacher_temperature": 0.5}, {"kd_ratio": 0.3}])
def test_the_class_matches_the_float64_loops(params):
    method = method_for(**params)
    mb = micro_batch()
    _, argmax = reference(method, mb)
    mb = with_some_correct(mb, argmax)
    want, argmax = reference(method, mb)
    correct = sum(int(mb["view"].student.labels[b, i + 1]) == top for (b, i), top in argmax.items())
    assert 0 < correct < len(argmax)  # the accuracy mask selects some rows, not all
    output = teacher_side(method, mb)
    terms = student_terms(method, mb, output.reduced)
    for name, value in want.items():
        assert terms[name].item() == pytest.approx(value, rel=1e-9, abs=1e-12), name
    assert terms["t2s_kd"].item() > 0 and terms["s2t_kd"].item() > 0
    assert method.counts(output.reduced, mb["view"]) == {"tokens": float(sum(r[1] for r in LAYOUT if r))}
    logits = mb["s_hid"] @ mb["s_w"].T
    assert terms["ce"].item() == pytest.approx(masked_ce(logits, mb["view"].student.labels)["ce"].item(), rel=1e-12)
    gold = ce_per_sequence(mb["t_hid"] @ mb["t_w"].T, mb["view"].teacher.labels)
    torch.testing.assert_close(output.gold["ce"], gold["ce"])
    torch.testing.assert_close(output.gold["tokens"], gold["tokens"])
    weights = method.term_weights
    share = method.params.kd_ratio / (1 - method.params.kd_ratio)
    assert weights == {"t2s_ce": pytest.approx(share), "t2s_kd": pytest.approx(share), "s2t_kd": pytest.approx(share)}


def test_float32_and_bfloat16_features_stay_close_to_the_float64_loops():
    mb64 = micro_batch()
    want, _ = reference(method_for(), mb64)
    for dtype, rel in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        method = method_for(dtype=dtype)
        mb = {k: (v.to(dtype) if torch.is_tensor(v) else v) for k, v in mb64.items()}
        terms = student_terms(method, mb, teacher_side(method, mb).reduced)
        for name, value in want.items():
            assert terms[name].dtype == torch.float32
            assert terms[name].item() == pytest.approx(value, rel=rel), (dtype, name)


def test_hidden_states_and_the_output_layer_equal_full_logits():
    method = method_for()
    mb = micro_batch()
    full = teacher_side(method, mb)
    chunked = teacher_side(method, mb, hidden_path=True, chunk=2 * VT)  # two rows per block
    for name in DskdTeacher._fields:
        torch.testing.assert_close(getattr(chunked.reduced, name), getattr(full.reduced, name), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(chunked.gold["ce"], full.gold["ce"])


def test_block_sizes_and_extra_padding_do_not_change_the_terms():
    method = method_for()
    mb = micro_batch()
    reduced = teacher_side(method, mb).reduced
    base = student_terms(method, mb, reduced)
    # the kernels at one row per block
    index, mask = response_rows(mb["view"].student.labels)
    rows = (index + torch.arange(len(LAYOUT)).unsqueeze(1) * TS)[mask]
    targets = mb["view"].student.labels.gather(1, index + 1)[mask]
    values = torch.randn(rows.numel(), ES, dtype=torch.float64)
    logits = mb["s_hid"] @ mb["s_w"].T
    for chunk in (VS, 3 * VS, None):
        small = student_space(values, logits, rows, targets, mb["s_w"], tau=2.0, with_ce=True, chunk_elements=chunk)
        whole = student_space(values, logits, rows, targets, mb["s_w"], tau=2.0, with_ce=True)
        for a, b in zip(small, whole):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    v_t = torch.randn(5, ET, dtype=torch.float64)
    m = torch.randn(5, ET, dtype=torch.float64)
    n = torch.randn(5, dtype=torch.float64)
    torch.testing.assert_close(teacher_space(v_t, mb["t_w"], m, n, tau=2.0, chunk_elements=VT),
                               teacher_space(v_t, mb["t_w"], m, n, tau=2.0), rtol=0, atol=1e-12)
    # three more padding positions on both sides, and one more filler row
    padded = micro_batch(LAYOUT, seed=0)
    grow = {}
    for key, tensor in padded.items():
        if key == "view":
            continue
        if tensor.dim() == 3:
            grow[key] = torch.cat([torch.cat([tensor, torch.randn(tensor.shape[0], 3, tensor.shape[2], dtype=tensor.dtype)], 1),
                                   torch.randn(1, tensor.shape[1] + 3, tensor.shape[2], dtype=tensor.dtype)])
        else:
            grow[key] = tensor

    def pad(batch: ModelBatch) -> ModelBatch:
        out = []
        for tensor, fill in zip(batch, (0, 0, IGNORE)):
            wide = torch.cat([tensor, torch.full((tensor.shape[0], 3), fill)], 1)
            out.append(torch.cat([wide, torch.full((1, wide.shape[1]), fill)]))
        return ModelBatch(*out)

    view = padded["view"]
    grow["view"] = TeacherView(Pairing(*(torch.cat([t, t[:1]]) for t in view.pairing)), pad(view.student), pad(view.teacher))
    terms = student_terms(method, grow, teacher_side(method, grow).reduced)
    for name, value in base.items():
        assert terms[name].item() == pytest.approx(value.item(), rel=1e-12), name


def test_masked_std_is_the_std_of_the_real_rows():
    values = torch.randn(2, 4, 3, dtype=torch.float64)
    mask = torch.tensor([[True, True, False, False], [True, False, False, False]])
    got = masked_std(values, mask)
    assert got[0].item() == pytest.approx(values[0, :2].std().item(), rel=1e-6)
    assert got[1].item() == pytest.approx(values[1, :1].std().item(), rel=1e-6)
    assert masked_std(values[:, :0], mask[:, :0]).tolist() == [1.0, 1.0]


# ------------------------------------------------------------------------------------- gradients


class Affine(torch.nn.Module):
    """A linear map whose weight is a given tensor (a gradcheck input)."""

    def __init__(self, weight, bias):
        super().__init__()
        self.weight, self.bias = weight, bias

    def forward(self, x):
        return x @ self.weight.T + self.bias


def test_gradcheck_of_the_student_logits_hidden_states_and_every_projector():
    """Finite differences (float64) of the student side w.r.t. the student's logits and hidden states and
    each projector's weight. ``t2s_kd`` holds the projected teacher fixed (a stop-gradient, as the
    reference), so its value moves with the projectors while its gradient does not: it is checked
    against the student's logits alone, with a mask that keeps some rows."""
    method = method_for()
    mb = micro_batch(LAYOUT[:3])
    _, argmax = reference(method, mb)
    mb = with_some_correct(mb, argmax)
    reduced = teacher_side(method, mb, gold=False).reduced
    built = dict(method.trainable)
    biases = {name: module.bias.detach() for name, module in built.items()}
    logits = (mb["s_hid"] @ mb["s_w"].T).detach().requires_grad_(True)
    hidden = mb["s_hid"].detach().clone().requires_grad_(True)
    weights = [built[name].weight.detach().clone().requires_grad_(True) for name in ("query", "t2s", "s2t")]

    def terms(logits, hidden, wq, wt, ws):
        method.attach_modules({"query": Affine(wq, biases["query"]), "t2s": Affine(wt, biases["t2s"]),
                               "s2t": Affine(ws, biases["s2t"])})
        return student_terms(method, mb, reduced, logits=logits, hidden=hidden)

    def total(logits, hidden, wq, wt, ws):
        out = terms(logits, hidden, wq, wt, ws)
        return out["t2s_ce"] + 2 * out["s2t_kd"] + 0.5 * out["ce"]

    assert torch.autograd.gradcheck(total, (logits, hidden, *weights), eps=1e-6, atol=1e-6, rtol=1e-5)
    fixed = [w.detach() for w in weights]
    assert terms(logits, hidden, *fixed)["t2s_kd"].item() > 0
    assert torch.autograd.gradcheck(lambda x: terms(x, hidden.detach(), *fixed)["t2s_kd"], (logits,), eps=1e-6,
                                    atol=1e-6, rtol=1e-5)
    # and each projector really gets a gradient from its terms
    total(logits, hidden, *weights).backward()
    assert all(w.grad.abs().max() > 1e-6 for w in weights)


def test_which_term_trains_what():
    """t2s_kd trains only the student (the projected teacher is held fixed); t2s_ce trains only the query
    and t2s projectors (the student's head is detached); s2t_kd trains the query and s2t projectors and
    the student's hidden states, never its logits."""
    method = method_for()
    mb = micro_batch()
    _, argmax = reference(method, mb)
    mb = with_some_correct(mb, argmax)
    reduced = teacher_side(method, mb, gold=False).reduced
    for term, zero, nonzero in (("t2s_kd", {"query", "t2s", "s2t", "hidden"}, {"logits"}),
                                ("t2s_ce", {"s2t", "hidden", "logits"}, {"query", "t2s"}),
                                ("s2t_kd", {"t2s", "logits"}, {"query", "s2t", "hidden"})):
        for module in method.trainable.values():
            module.zero_grad()
        logits = (mb["s_hid"] @ mb["s_w"].T).detach().requires_grad_(True)
        hidden = mb["s_hid"].detach().clone().requires_grad_(True)
        student_terms(method, mb, reduced, logits=logits, hidden=hidden, ce=False)[term].backward()
        grads = {name: method.trainable[name].weight.grad for name in ("query", "t2s", "s2t")}
        grads.update(hidden=hidden.grad, logits=logits.grad)
        for name in zero:
            assert grads[name] is None or grads[name].abs().max().item() == 0.0, (term, name)
        for name in nonzero:
            assert grads[name].abs().max().item() > 1e-8, (term, name)


class Poisoned(FrozenWeight):
    """A weight that is whole only inside ``gathered()``, like a ZeRO-3 partition, and NaN after it."""

    def __init__(self, tensor):
        super().__init__(tensor)
        self.entries = 0

    def gathered(self):
        from contextlib import contextmanager

        @contextmanager
        def block():
            self.entries += 1
            whole = self.tensor.clone()
            yield whole
            whole.fill_(float("nan"))

        return block()


def test_the_teacher_weight_is_needed_only_inside_its_gathered_block():
    """Under ZeRO-3 the teacher's output layer is released after the student-side forward: the
    backward must not read it (its gradient is computed in the forward pass)."""
    method = method_for()
    mb = micro_batch()
    reduced = teacher_side(method, mb, hidden_path=True).reduced  # the hidden path uses the forward's weight
    poisoned = Poisoned(mb["t_w"])
    method.bind_teacher_constants({OUTPUT_WEIGHT: poisoned})
    hidden = mb["s_hid"].detach().clone().requires_grad_(True)
    terms = student_terms(method, mb, reduced, hidden=hidden)
    terms["s2t_kd"].backward()
    assert poisoned.entries == 1 and torch.isfinite(hidden.grad).all() and hidden.grad.abs().max() > 0
    clean = method_for()
    clean.bind_teacher_constants({OUTPUT_WEIGHT: FrozenWeight(mb["t_w"])})
    again = mb["s_hid"].detach().clone().requires_grad_(True)
    student_terms(clean, mb, reduced, hidden=again)["s2t_kd"].backward()
    torch.testing.assert_close(hidden.grad, again.grad, rtol=0, atol=0)


def test_a_micro_batch_of_filler_rows_counts_nothing_and_reaches_every_projector():
    """Every rank backpropagates into every projector every step (ZeRO-3 reduce-scatters their
    gradients), also when its micro-batch holds filler rows only."""
    method = method_for()
    mb = micro_batch([None, None])
    reduced = teacher_side(method, mb).reduced
    assert method.counts(reduced, mb["view"]) == {"tokens": 0.0} and reduced.mask.shape == (2, 0)
    logits = (mb["s_hid"] @ mb["s_w"].T).detach().requires_grad_(True)
    terms = student_terms(method, mb, reduced, logits=logits)
    sum(terms.values()).backward()
    assert all(value.item() == 0.0 for value in terms.values())
    for name, module in method.trainable.items():
        assert module.weight.grad is not None and module.weight.grad.abs().max().item() == 0.0, name


# ------------------------------------------------------------------------------------- the cache


def test_the_offline_cache_gives_the_live_teacher(tmp_path):
    method = method_for(dtype=torch.float32)
    settings = method.cache_settings()
    assert settings == {"kind": "dskd", "kd_temperature": 2.0}
    binding = {"checkpoint": "c", "tokenizer": "t", "template": {}, "data": "d", "pairing": "offsets", "loss": settings}
    layouts = {0: LAYOUT[0], 1: LAYOUT[2], 2: LAYOUT[3], 3: (2, 2, 2, 3)}
    record_batches = [[0, 3], [2, 1, -1]]

    def batch_of(records, seed):
        mb = micro_batch([layouts[r] if r >= 0 else None for r in records], seed=seed, dtype=torch.float32)
        return mb, torch.tensor(records)

    # The teacher tensors of a record are the same whatever batch it sits in: give each record its own.
    heads = micro_batch(seed=99, dtype=torch.float32)

    def consistent(records):
        parts = [batch_of([r], seed=10 + max(r, 0))[0] for r in records]
        merged = {}
        for key in ("s_emb", "s_hid", "t_emb", "t_hid"):
            merged[key] = torch.cat([p[key] for p in parts])
        merged["s_w"], merged["t_w"] = heads["s_w"], heads["t_w"]  # one model: the same output layers
        views = [p["view"] for p in parts]
        merged["view"] = TeacherView(
            Pairing(*(torch.cat([getattr(v.pairing, f) for v in views]) for f in Pairing._fields)),
            ModelBatch(*(torch.cat([getattr(v.student, f) for v in views]) for f in ModelBatch._fields)),
            ModelBatch(*(torch.cat([getattr(v.teacher, f) for v in views]) for f in ModelBatch._fields)))
        return merged, torch.tensor(records)

    for chunk, records in enumerate(record_batches):
        mb, ids = consistent(records)
        output = teacher_side(method, mb)
        cache.write_chunk(tmp_path, chunk, [cache.chunk_tensors(method, output, mb["view"], ids)])
    cache.write_constants(tmp_path, {OUTPUT_WEIGHT: heads["t_w"]})
    manifest = {"format": cache.FORMAT_VERSION, "binding": binding, "num_records": 4, "chunk_records": 2, "num_chunks": 2}
    (tmp_path / cache.MANIFEST).write_text(json.dumps(manifest))
    opened = cache.TeacherCache.open(tmp_path, binding, "teachers[0]", num_records=4)
    fresh = method_for(dtype=torch.float32)
    cache.bind_cached_constants(tmp_path, fresh, "teachers[0]")
    with fresh.teacher_constants[OUTPUT_WEIGHT].gathered() as weight:
        assert torch.equal(weight, heads["t_w"])
    mb, ids = consistent([2, -1, 0, 3, 1])
    live = teacher_side(method, mb)
    cached = opened.read(ids, mb["view"], fresh, torch.device("cpu"))
    for name in DskdTeacher._fields:
        torch.testing.assert_close(getattr(cached.reduced, name), getattr(live.reduced, name), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cached.gold["ce"], live.gold["ce"], rtol=1e-6, atol=1e-6)
    live_terms = student_terms(method, mb, live.reduced)
    cached_terms = student_terms(fresh, mb, cached.reduced)
    for name, value in live_terms.items():
        assert cached_terms[name].item() == pytest.approx(value.item(), rel=1e-6), name
    assert method_for(kd_temperature=1.0).cache_settings() != settings  # m and the entropy depend on tau


# ------------------------------------------------------------------------------ settings and errors


def test_class_attributes_defaults_and_projectors():
    cls = METHODS["dskd"]
    assert cls is DualSpaceKD
    assert (cls.terms, cls.denominator, cls.pairings, cls.fuses_ce, cls.cacheable) == (
        ("t2s_ce", "t2s_kd", "s2t_kd"), "tokens", None, True, True)
    assert DskdParams() == DskdParams(0.5, 2.0, 1.0, 1e-3)
    assert cls.default_weights(DskdParams()) == {"t2s_ce": 1.0, "t2s_kd": 1.0, "s2t_kd": 1.0}
    specs = cls(None, None, CONTEXT).module_specs()
    assert {n: (s.in_features, s.out_features, s.bias, s.init, s.lr) for n, s in specs.items()} == {
        "query": (2 * ES, 2 * ET, True, "uniform", 1e-3), "t2s": (ET, ES, True, "uniform", 1e-3),
        "s2t": (ES, ET, True, "uniform", 1e-3)}
    with pytest.raises(ValueError, match="embeddings have 8 channels and its final hidden state 10"):
        cls.check(DskdParams(), MethodContext(student_dims=ModelDims(6, 6, 9, 1), teacher_dims=ModelDims(10, 8, 9, 1)))
    with pytest.raises(ValueError, match="attach_modules"):
        mb = micro_batch()
        bare = cls(None, None, CONTEXT)
        student_terms(bare, mb, teacher_side(bare, mb).reduced)


@pytest.mark.parametrize("param,value,message", [
    ("kd_ratio", "1.0", "expected a number > 0 and < 1"), ("kd_ratio", "0", "expected a number > 0 and < 1"),
    ("kd_temperature", "-2", "expected a positive number"), ("teacher_temperature", "0", "expected a positive number"),
    ("projector_lr", "0", "expected a positive number"), ("projector_lr", ".inf", "expected a finite number"),
])
def test_bad_hyper_parameters_are_one_line_through_the_cli(param, value, message, capsys):
    from mlot_ds.engine.cli import main

    code = main(["--config", ZERO3, "--dry-run", f"teachers.qwen.loss={{kind: dskd, {param}: {value}}}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("error:") == 1 and f"teachers[1].loss.{param}: {message}" in err, err
