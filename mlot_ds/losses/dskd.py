"""DSKD: Dual-Space Knowledge Distillation with cross-model attention (Zhang et al., EMNLP 2024), spec section 2.

The CMA variant (reference code ``dual_space_kd_with_cma``, songmzhang/DSKD), for tokenizers that
differ. Each model's hidden states are carried into the other's space and read through the OTHER
model's frozen output layer, so both distributions are compared in one space, twice. Per sequence,
over the response rows ``i`` of the student (rows whose next label is a response token, ``y_i``) and
``j`` of the teacher (``y_j``), with ``e(.)`` a model's input embeddings (the next-token embedding
``e(y_i)`` is the embedding at row ``i + 1``), ``h`` its final hidden states and ``W`` its output
layer's weight:

    u^S_i = [e^S(x_i); e^S(y_i)] (detached),    k_j = [e^T(x_j); e^T(y_j)] / sigma_u
    A_ij  = (W_q u^S_i) . k_j / sqrt(2 d_t),    a^t2s_ij = softmax_j A_ij,   a^s2t_ji = softmax_i A_ij
    v^T_j = W_t2s (h^T_j / sigma_h + e^T(y_j) / sigma_e),     v^S_i = W_s2t h^S_i
    g^t2s_i = (sum_j a^t2s_ij v^T_j) W^S^T      [V_s]  (student space; W^S detached)
    g^s2t_j = (sum_i a^s2t_ji v^S_i) W^T^T      [V_t]  (teacher space)

with ``sigma`` the standard deviations of the teacher's index embeddings, next-token embeddings and
hidden states (scalars over the sequence's response rows; the reference takes them over the whole
padded batch). Terms, summed over response rows (spec 2(c)):

    t2s_ce = sum_i CE(g^t2s_i, y_i)                                       (trains W_q, W_t2s)
    t2s_kd = sum_i c_i KL(softmax(g^t2s_i / (tau tau_T)) || softmax(z^S_i / tau)),
             c_i = [argmax g^t2s_i = y_i], the projected teacher detached  (trains the student)
    s2t_kd = sum_j KL(softmax(z^T_j / tau) || softmax(g^s2t_j / tau))     (trains W_q, W_s2t, the student)

and the reference's loss ``(1 - kappa) CE + kappa (t2s_ce + t2s_kd + s2t_kd)`` over the label-token
count, i.e. term weights ``kappa / (1 - kappa)`` next to the engine's CE weight 1 (``kappa = 0.5``).

Never ``[B, T, V]``: both projected distributions are computed a block of rows at a time, forward and
backward (:class:`_StudentSpace`, :class:`_TeacherSpace`). The teacher-space KL needs only ``d_t + 1``
numbers per teacher row besides the student's projection, because ``g^s2t = v W^T^T`` is linear:

    KL_j = sum_v p_v log p_v - (v_j . m_j) / tau + logsumexp_v(v_j . W_v / tau),   m_j = sum_v p_v W_v

with ``p = softmax(z^T_j / tau)``; the teacher side keeps ``m_j`` (the teacher's expected output
embedding) and its negative entropy; the student side needs ``W^T`` for the forward only (a ZeRO-3
teacher's is gathered for it and released after it: the gradient is computed in the same pass).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import NamedTuple

import torch

from mlot_ds.fields import PositiveFloat, UnitInterval
from mlot_ds.losses.head import head_chunk_rows
from mlot_ds.losses.method import (
    EMBEDDINGS,
    HIDDEN,
    OUTPUT_WEIGHT,
    LinearSpec,
    LogitSource,
    Method,
    TeacherOutput,
    TeacherView,
)
from mlot_ds.losses.ranking import block_elements, compute_dtype_for
from mlot_ds.pairing import IGNORE_INDEX

def response_rows(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows ``t`` whose next label is not -100, left-aligned per sequence: ``(index, mask) [B, R]``.

    ``index[b, r]`` is the ``r``-th such row of sequence ``b`` (ascending); padding holds 0.
    """
    valid = torch.zeros_like(labels, dtype=torch.bool)
    valid[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    counts = valid.sum(dim=1)
    width = int(counts.max()) if counts.numel() else 0
    order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices[:, :width]
    mask = torch.arange(width, device=labels.device).unsqueeze(0) < counts.unsqueeze(1)
    return torch.where(mask, order, torch.zeros_like(order)), mask


def take_rows(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``values [B, T, D]`` at ``index [B, R]`` -> ``[B, R, D]``."""
    return values.gather(1, index.unsqueeze(2).expand(-1, -1, values.shape[2]))


def masked_std(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per sequence, the (unbiased) standard deviation of every element of ``values [B, R, D]`` on the
    rows ``mask [B, R]`` (a scalar over rows and channels, as the reference's ``tensor.std()``), ``[B]``
    in float32 (float64 for float64 values); 1 where fewer than two elements exist."""
    x = values.to(compute_dtype_for(values.dtype)) * mask.unsqueeze(2)
    count = mask.sum(dim=1).float() * values.shape[2]
    mean = x.sum(dim=(1, 2)) / count.clamp(min=1)
    square = ((x - mean.view(-1, 1, 1)) * mask.unsqueeze(2)).square().sum(dim=(1, 2))
    std = (square / (count - 1).clamp(min=1)).sqrt()
    return torch.where(count > 1, std, torch.ones_like(std))


def cross_model_attention(query: torch.Tensor, keys: torch.Tensor, student_mask: torch.Tensor,
                          teacher_mask: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a^t2s [B, Rs, Rt], a^s2t [B, Rt, Rs])`` from ``A = query keys^T * scale`` (float32, float64 for
    float64 inputs), each row a softmax over the other side's real rows; padding rows (or rows without a
    real partner) are 0."""
    dtype = compute_dtype_for(query.dtype)
    scores = torch.matmul(query.to(dtype), keys.to(dtype).transpose(1, 2)) * scale
    pair = student_mask.unsqueeze(2) & teacher_mask.unsqueeze(1)
    scores = scores.masked_fill(~pair, torch.finfo(dtype).min)
    weight = pair.to(scores.dtype)
    return torch.softmax(scores, dim=2) * weight, torch.softmax(scores.transpose(1, 2), dim=2) * weight.transpose(1, 2)


# --------------------------------------------------------------------------------------- kernels


def _block_rows(vocab: int, chunk_elements: int | None, device: torch.device) -> int:
    return max(1, block_elements(chunk_elements, device) // max(vocab, 1))


class _StudentSpace(torch.autograd.Function):
    """forward(values [N, H], logits [B, T, V], rows [N], targets [N], weight [V, H], inv_tau, inv_tau_teacher,
    with_ce, chunk) -> (t2s_ce [N], kd [N], correct [N] bool, ce [N] or [0]).

    Per row ``g = values W^T`` (the projected teacher in the student's space) and the student's logit row
    ``z``: ``t2s_ce = lse(g) - g[y]``; ``kd = KL(softmax(g * inv_tau_teacher) || softmax(z * inv_tau))`` with
    ``g`` held fixed; ``correct = argmax g == y``; ``ce = lse(z) - z[y]`` (the student's own CE, when
    fused). The backward recomputes each block: ``d t2s_ce / d values = (softmax(g) - onehot(y)) W``,
    ``d kd / d z = inv_tau (softmax(z * inv_tau) - softmax(g * inv_tau_teacher))``,
    ``d ce / d z = softmax(z) - onehot(y)``.
    """

    @staticmethod
    def forward(ctx, values, logits, rows, targets, weight, inv_tau, inv_tau_teacher, with_ce, chunk):
        vocab = logits.shape[-1]
        logits2d = logits.reshape(-1, vocab)
        dtype = compute_dtype_for(torch.promote_types(values.dtype, logits.dtype))
        count = rows.numel()
        t2s_ce = torch.zeros(count, dtype=dtype, device=logits.device)
        kd = torch.zeros(count, dtype=dtype, device=logits.device)
        correct = torch.zeros(count, dtype=torch.bool, device=logits.device)
        ce = torch.zeros(count if with_ce else 0, dtype=dtype, device=logits.device)
        w = weight.to(dtype)
        step = _block_rows(vocab, chunk, logits.device)
        for start in range(0, count, step):
            stop = min(start + step, count)
            y = targets[start:stop].unsqueeze(1)
            g = values[start:stop].to(dtype) @ w.T
            t2s_ce[start:stop] = torch.logsumexp(g, dim=1) - g.gather(1, y).squeeze(1)
            correct[start:stop] = g.argmax(dim=1) == targets[start:stop]
            log_p = torch.log_softmax(g * inv_tau_teacher, dim=1)
            del g
            z = logits2d.index_select(0, rows[start:stop]).to(dtype)
            log_q = torch.log_softmax(z * inv_tau, dim=1)
            kd[start:stop] = (log_p.exp() * (log_p - log_q)).sum(dim=1)
            del log_p, log_q
            if with_ce:
                ce[start:stop] = torch.logsumexp(z, dim=1) - z.gather(1, y).squeeze(1)
        ctx.save_for_backward(values, logits, rows, targets, weight)
        ctx.settings = (inv_tau, inv_tau_teacher, chunk, dtype)
        ctx.mark_non_differentiable(correct)
        ctx.set_materialize_grads(False)
        return t2s_ce, kd, correct, ce

    @staticmethod
    def backward(ctx, grad_t2s_ce, grad_kd, _grad_correct, grad_ce):
        values, logits, rows, targets, weight = ctx.saved_tensors
        inv_tau, inv_tau_teacher, chunk, dtype = ctx.settings
        vocab = logits.shape[-1]
        logits2d = logits.reshape(-1, vocab)
        want_values = ctx.needs_input_grad[0] and grad_t2s_ce is not None
        want_logits = ctx.needs_input_grad[1] and (grad_kd is not None or (grad_ce is not None and grad_ce.numel()))
        grad_values = torch.zeros_like(values) if want_values else None
        grad_logits = torch.zeros_like(logits2d) if want_logits else None
        if not (want_values or want_logits):
            return None, None, None, None, None, None, None, None, None
        w = weight.to(dtype)
        step = _block_rows(vocab, chunk, logits.device)
        for start in range(0, rows.numel(), step):
            stop = min(start + step, rows.numel())
            y = targets[start:stop].unsqueeze(1)
            g = values[start:stop].to(dtype) @ w.T
            if want_values:
                dg = torch.softmax(g, dim=1)
                dg.scatter_add_(1, y, -torch.ones_like(y, dtype=dtype))
                grad_values[start:stop] = ((dg * grad_t2s_ce[start:stop].to(dtype).unsqueeze(1)) @ w).to(values.dtype)
                del dg
            if want_logits:
                z = logits2d.index_select(0, rows[start:stop]).to(dtype)
                out = torch.zeros_like(z)
                if grad_kd is not None:
                    diff = torch.softmax(z * inv_tau, dim=1) - torch.softmax(g * inv_tau_teacher, dim=1)
                    out += diff * (grad_kd[start:stop].to(dtype) * inv_tau).unsqueeze(1)
                    del diff
                if grad_ce is not None and grad_ce.numel():
                    dz = torch.softmax(z, dim=1)
                    dz.scatter_add_(1, y, -torch.ones_like(y, dtype=dtype))
                    out += dz * grad_ce[start:stop].to(dtype).unsqueeze(1)
                    del dz
                grad_logits.index_copy_(0, rows[start:stop], out.to(grad_logits.dtype))
            del g
        return (grad_values, grad_logits.view(logits.shape) if grad_logits is not None else None,
                None, None, None, None, None, None, None)


class _TeacherSpace(torch.autograd.Function):
    """forward(values [N, H], weight [V, H], mean_embedding [N, H], negentropy [N], inv_tau, chunk) -> kl [N]:
    ``kl = negentropy - inv_tau (values . mean_embedding) + lse(inv_tau values W^T)`` (module docstring).

    Its gradient ``d kl / d values = inv_tau (softmax(inv_tau values W^T) W - mean_embedding)`` is
    computed in the same pass over the blocks and kept (``[N, H]``), so the backward does not need the
    teacher's output layer: a ZeRO-3 teacher's gathered weight is released right after the forward.
    """

    @staticmethod
    def forward(ctx, values, weight, mean_embedding, negentropy, inv_tau, chunk):
        dtype = compute_dtype_for(values.dtype)
        w = weight.to(dtype)
        count, vocab = values.shape[0], weight.shape[0]
        kl = torch.zeros(count, dtype=dtype, device=values.device)
        grad = torch.zeros_like(values) if ctx.needs_input_grad[0] else None
        step = _block_rows(vocab, chunk, values.device)
        for start in range(0, count, step):
            stop = min(start + step, count)
            v, m = values[start:stop].to(dtype), mean_embedding[start:stop].to(dtype)
            scaled = (v @ w.T) * inv_tau
            lse = torch.logsumexp(scaled, dim=1)
            kl[start:stop] = negentropy[start:stop].to(dtype) - inv_tau * (v * m).sum(1) + lse
            if grad is not None:
                expected = torch.softmax(scaled, dim=1) @ w
                grad[start:stop] = (inv_tau * (expected - m)).to(values.dtype)
        ctx.save_for_backward(grad if grad is not None else torch.empty(0))
        ctx.set_materialize_grads(False)
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        (grad,) = ctx.saved_tensors
        if grad_kl is None or not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        return grad * grad_kl.to(grad.dtype).unsqueeze(1), None, None, None, None, None


def student_space(values, logits, rows, targets, weight, *, tau: float, tau_teacher: float = 1.0,
                  with_ce: bool = False, chunk_elements: int | None = None):
    """Per response row: ``(t2s_ce [N], kd [N], correct [N], ce [N] or [0])`` (see :class:`_StudentSpace`).

    Args:
        values: ``[N, H_s]`` the teacher's hidden states carried to the student rows (with gradient).
        logits: the student's ``[B, T, V_s]``; rows: ``[N]`` flat rows ``b * T + t``; targets: ``[N]`` ``y``.
        weight: the student's output layer ``[V_s, H_s]`` (a detached copy).
    """
    return _StudentSpace.apply(values, logits, rows, targets, weight, 1.0 / tau, 1.0 / (tau * tau_teacher),
                               bool(with_ce), chunk_elements)


def teacher_space(values, weight, mean_embedding, negentropy, *, tau: float, chunk_elements: int | None = None):
    """Per teacher response row ``KL(softmax(z^T / tau) || softmax(values W^T^T / tau))`` ``[N]`` (with gradient
    to ``values [N, H_t]``), from the teacher side's ``mean_embedding [N, H_t]`` and ``negentropy [N]``."""
    return _TeacherSpace.apply(values, weight, mean_embedding, negentropy, 1.0 / tau, chunk_elements)


@torch.no_grad()
def teacher_space_targets(read_rows, rows: torch.Tensor, weight: torch.Tensor, *, vocab: int, tau: float,
                          targets: torch.Tensor | None = None, rows_per_block: int | None = None):
    """The teacher side of :func:`teacher_space`, a block of rows at a time: per row ``m = p W``,
    ``sum p log p`` with ``p = softmax(z / tau)``, and (``targets`` given) its CE at temperature 1.

    Returns ``(mean_embedding [R, H] float32, negentropy [R] float32, ce [R] float32 or None)``.
    """
    count = rows.numel()
    dtype = compute_dtype_for(weight.dtype)
    w = weight.to(dtype)
    mean = torch.zeros(count, weight.shape[1], dtype=dtype, device=rows.device)
    negentropy = torch.zeros(count, dtype=dtype, device=rows.device)
    ce = torch.zeros(count, dtype=dtype, device=rows.device) if targets is not None else None
    step = rows_per_block or head_chunk_rows(vocab, None, rows.device)
    for start in range(0, count, step):
        stop = min(start + step, count)
        z = read_rows(rows[start:stop]).to(dtype)
        log_p = torch.log_softmax(z / tau, dim=1)
        p = log_p.exp()
        mean[start:stop] = p @ w
        negentropy[start:stop] = (p * log_p).sum(dim=1)
        if ce is not None:
            ce[start:stop] = torch.logsumexp(z, dim=1) - z.gather(1, targets[start:stop].unsqueeze(1)).squeeze(1)
    return mean, negentropy, ce


# ------------------------------------------------------------------------------------ the method


class DskdTeacher(NamedTuple):
    """DSKD's teacher side at the teacher's response rows ``[B, Rt]`` (the offline cache stores these).

    Attributes:
        keys: ``[e(x_j); e(y_j)] / sigma_u`` ``[B, Rt, 2 E_t]`` (the model's dtype).
        values: ``h_j / sigma_h + e(y_j) / sigma_e`` ``[B, Rt, H_t]``, the input of the t2s projector.
        mean_embedding: ``m_j = softmax(z_j / tau) W^T`` ``[B, Rt, H_t]``.
        negentropy: ``sum_v p log p`` ``[B, Rt]`` float32.
        mask: ``[B, Rt]`` real rows.
    """

    keys: torch.Tensor
    values: torch.Tensor
    mean_embedding: torch.Tensor
    negentropy: torch.Tensor
    mask: torch.Tensor


@dataclass(frozen=True)
class DskdParams:
    """DSKD-CMA's hyper-parameters (``loss: {kind: dskd, ...}``), the reference scripts' values."""

    kd_ratio: UnitInterval = 0.5
    """``kappa`` (``--kd-rate`` 0.5): the loss is ``(1 - kappa) CE + kappa KD``."""
    kd_temperature: PositiveFloat = 2.0
    """``tau`` (``--kd-temperature``: 2.0 in the reference's CMA scripts, 1.0 argparse default)."""
    teacher_temperature: PositiveFloat = 1.0
    """``tau_T`` (``--teacher-temperature`` 1.0), applied to the projected teacher in ``t2s_kd`` only."""
    projector_lr: PositiveFloat = 1e-3
    """The projectors' learning rate (``--projector-lr`` 1e-3), following the student's schedule."""


class DualSpaceKD(Method):
    """DSKD with cross-model attention (Zhang et al. 2024): three projectors per teacher (``query``
    ``2 E_s -> 2 E_t``, ``t2s`` ``H_t -> H_s``, ``s2t`` ``H_s -> H_t``, PyTorch's default init, their own
    learning rate), the student-space terms ``t2s_ce`` and ``t2s_kd`` (KD only where the projected
    teacher predicts the label) and the teacher-space ``s2t_kd``; every sum over the global number of
    student label tokens (the reference's ``loss_denom``)."""

    name = "dskd"
    Params = DskdParams
    terms = ("t2s_ce", "t2s_kd", "s2t_kd")
    denominator = "tokens"
    pairings = None
    needs = frozenset({"dims"})
    fuses_ce = True
    description = ("DSKD: dual-space KD with cross-model attention; projectors trained with the student "
                   "(Zhang 2024)")

    @classmethod
    def default_weights(cls, params) -> dict[str, float]:
        share = params.kd_ratio / (1.0 - params.kd_ratio)
        return {term: share for term in cls.terms}

    @classmethod
    def check(cls, params, context) -> None:
        if context is None:
            return
        if context.student_dims is None or context.teacher_dims is None:
            raise ValueError("loss 'dskd' needs both models' sizes (MethodContext.student_dims / teacher_dims)")
        teacher = context.teacher_dims
        if teacher.embedding != teacher.hidden:
            raise ValueError(f"loss 'dskd' adds the teacher's next-token embedding to its hidden state, but its "
                             f"embeddings have {teacher.embedding} channels and its final hidden state {teacher.hidden}")

    def teacher_features(self) -> frozenset[str]:
        return frozenset({EMBEDDINGS, HIDDEN, OUTPUT_WEIGHT})

    def student_features(self) -> frozenset[str]:
        return frozenset({EMBEDDINGS, HIDDEN, OUTPUT_WEIGHT})

    def module_specs(self) -> dict[str, LinearSpec]:
        student, teacher = self.context.student_dims, self.context.teacher_dims
        if student is None or teacher is None:
            raise ValueError("loss 'dskd' needs both models' sizes to build its projectors")
        lr = self.params.projector_lr
        return {"query": LinearSpec(2 * student.embedding, 2 * teacher.embedding, lr=lr),
                "t2s": LinearSpec(teacher.hidden, student.hidden, lr=lr),
                "s2t": LinearSpec(student.hidden, teacher.hidden, lr=lr)}

    def _teacher_weight(self):
        """The teacher's :class:`~mlot_ds.losses.method.FrozenWeight` (read inside ``.gathered()``)."""
        weight = self.teacher_constants.get(OUTPUT_WEIGHT)
        if weight is None:
            raise ValueError("loss 'dskd' needs the teacher's output-layer weight (bind_teacher_constants)")
        return weight

    def teacher(self, source: LogitSource, view: TeacherView, gold: bool) -> TeacherOutput:
        features = source.features or {}
        if EMBEDDINGS not in features or HIDDEN not in features:
            raise ValueError("loss 'dskd' needs the teacher's embeddings and hidden states (LogitSource.features)")
        labels = view.teacher.labels.to(source.device)
        index, mask = response_rows(labels)
        embeddings, hidden = features[EMBEDDINGS], features[HIDDEN]
        dtype = hidden.dtype
        e_x, e_y = take_rows(embeddings, index), take_rows(embeddings, index + 1)
        h = take_rows(hidden, index)
        index_embeddings = torch.cat([e_x, e_y], dim=2)
        sigma_u, sigma_e, sigma_h = (masked_std(x, mask).view(-1, 1, 1) for x in (index_embeddings, e_y, h))
        row_mask = mask.unsqueeze(2)
        work = compute_dtype_for(dtype)
        keys = (index_embeddings.to(work) / sigma_u * row_mask).to(dtype)
        values = ((h.to(work) / sigma_h + e_y.to(work) / sigma_e) * row_mask).to(dtype)
        seq_len = labels.shape[1]
        flat = (index + torch.arange(labels.shape[0], device=labels.device).unsqueeze(1) * seq_len)[mask]
        targets = labels.gather(1, (index + 1).clamp(max=seq_len - 1))[mask] if gold else None
        # on the hidden-state path the output layer's forward has gathered the weight already
        context = nullcontext(source.weight) if source.weight is not None else self._teacher_weight().gathered()
        with context as weight:
            mean, negentropy, ce = teacher_space_targets(source.read, flat, weight.to(source.device),
                                                         vocab=source.shape[2], tau=self.params.kd_temperature,
                                                         targets=targets, rows_per_block=source.rows_per_block())
        mean_embedding = hidden.new_zeros(*mask.shape, hidden.shape[2])
        mean_embedding[mask] = mean.to(dtype)
        negent = torch.zeros(mask.shape, dtype=negentropy.dtype, device=labels.device)
        negent[mask] = negentropy
        gold_ce = None
        if gold:
            sequence = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(mask)[mask]
            gold_ce = {"ce": torch.zeros(labels.shape[0], device=labels.device).index_add_(0, sequence, ce.float()),
                       "tokens": mask.sum(dim=1).float()}
        return TeacherOutput(DskdTeacher(keys, values, mean_embedding, negent, mask), gold_ce)

    def counts(self, reduced: DskdTeacher, view: TeacherView) -> dict[str, float]:
        _, mask = response_rows(view.student.labels)
        return {"tokens": float(mask.sum())}

    def student(self, logits, reduced: DskdTeacher, view: TeacherView, ce_labels=None) -> dict[str, torch.Tensor]:
        features = view.features or {}
        missing = [name for name in (EMBEDDINGS, HIDDEN, OUTPUT_WEIGHT) if name not in features]
        if missing:
            raise ValueError(f"loss 'dskd' needs the student's {', '.join(missing)} (TeacherView.features)")
        modules = self.trainable
        if not all(name in modules for name in ("query", "t2s", "s2t")):
            raise ValueError("loss 'dskd' needs its projectors query, t2s and s2t (attach_modules)")
        device = logits.device
        labels = view.student.labels.to(device)
        if ce_labels is not None and not torch.equal(ce_labels.to(device), labels):
            raise ValueError("loss 'dskd' fuses the CE of the student's own labels only")
        index, mask = response_rows(labels)
        embeddings, hidden = features[EMBEDDINGS], features[HIDDEN]
        index_embeddings = torch.cat([take_rows(embeddings, index), take_rows(embeddings, index + 1)], dim=2).detach()
        teacher_mask = reduced.mask.to(device)
        # Every projector runs once per micro-batch on every rank, in this order (ZeRO-3 gathers).
        query = modules["query"](index_embeddings)
        t2s_values = modules["t2s"](reduced.values.to(device=device, dtype=hidden.dtype))
        s2t_values = modules["s2t"](take_rows(hidden, index))
        scale = 1.0 / math.sqrt(2 * reduced.values.shape[2])
        a_t2s, a_s2t = cross_model_attention(query, reduced.keys.to(device), mask, teacher_mask, scale)
        # as the reference: the carried states in the student's dtype before the output layers
        t2s_hidden = torch.matmul(a_t2s, t2s_values.to(a_t2s.dtype)).to(hidden.dtype)[mask]
        s2t_hidden = torch.matmul(a_s2t, s2t_values.to(a_s2t.dtype)).to(hidden.dtype)[teacher_mask]
        seq_len = labels.shape[1]
        rows = (index + torch.arange(labels.shape[0], device=device).unsqueeze(1) * seq_len)[mask]
        targets = labels.gather(1, (index + 1).clamp(max=seq_len - 1))[mask]
        params = self.params
        t2s_ce, kd, correct, ce = student_space(t2s_hidden, logits, rows, targets, features[OUTPUT_WEIGHT].to(device),
                                                tau=params.kd_temperature, tau_teacher=params.teacher_temperature,
                                                with_ce=ce_labels is not None)
        with self._teacher_weight().gathered() as teacher_weight:  # every rank, every micro-batch (ZeRO-3)
            s2t_kd = teacher_space(s2t_hidden, teacher_weight.to(device), reduced.mean_embedding.to(device)[teacher_mask],
                                   reduced.negentropy.to(device)[teacher_mask], tau=params.kd_temperature)
        terms = {"t2s_ce": t2s_ce.sum(), "t2s_kd": (kd * correct.to(kd.dtype)).sum(), "s2t_kd": s2t_kd.sum()}
        if ce_labels is not None:
            terms["ce"] = ce.sum()
        return terms

    # The offline cache: per teacher response row the keys, the t2s input and the mean output
    # embedding in the model's dtype, the negative entropy in float32 (exactly what teacher() keeps),
    # plus the output layer's weight once per cache (a run constant).
    def cache_settings(self) -> dict:
        return {"kind": self.name, "kd_temperature": self.params.kd_temperature}

    def cache_rows(self, view: TeacherView) -> tuple[torch.Tensor, torch.Tensor]:
        return response_rows(view.teacher.labels)

    def to_cache(self, reduced: DskdTeacher, view: TeacherView):
        return {}, {"keys": reduced.keys, "values": reduced.values, "mean_embedding": reduced.mean_embedding,
                    "negentropy": reduced.negentropy.float()}

    def from_cache(self, records, rows, view: TeacherView) -> DskdTeacher:
        _, mask = response_rows(view.teacher.labels.to(rows["keys"].device))
        return DskdTeacher(rows["keys"], rows["values"], rows["mean_embedding"], rows["negentropy"].float(), mask)


__all__ = ["DskdParams", "DskdTeacher", "DualSpaceKD", "cross_model_attention", "masked_std", "response_rows",
           "student_space", "take_rows", "teacher_space", "teacher_space_targets"]
