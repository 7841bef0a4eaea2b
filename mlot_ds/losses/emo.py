"""EMO: intra-model relation and optimal-transport alignment (Truong et al., EMNLP 2025), spec section 4.

The reference (``ot_pro_rmse_cka``, haian1910/LLM2Vec_Distillation) distils embedding models; here it is
adapted to a causal student on response tokens. Per sequence, with the pairing's 1:1 token pairs (MinED's
``dtw`` pairing; a pair's tokens sit one position after its logit rows), ``A`` a model's attention at one
layer averaged over heads, and ``h`` its final hidden states:

1. **Importance** of each teacher response token ``j``: the attention it receives,
   ``r_j = sum_i A^T_ij`` over the real query positions ``i`` (``importance: mean`` divides by the number
   of positions that can attend to ``j``, undoing the causal mask's bias towards early tokens), and
   ``pi = softmax_j r`` over the sequence's response tokens (the reference's normalisation).
2. **IRA** (intra-model relation alignment): the ``m = min(n_pairs // top_divisor, max_important)``
   pairs whose teacher token is most important; ``X^T``, ``X^S`` the ``m`` attention rows of those tokens
   (each over all of its model's positions), columns centred over the ``m`` rows, and linear CKA

       ira = 1 - ||X^S^T X^T||_F / sqrt((||X^S^T X^S||_F + eps) (||X^T^T X^T||_F + eps)),   eps = 1e-8,

   computed from the Gram matrices ``G = X X^T`` (``||X^S^T X^T||_F^2 = <G^S, G^T>``), in float64.
   Teacher layer for the student's last: ``L_s * (L_t // L_s) - 1`` (the reference's block mapping, k = 1).
3. **OTIS** (OT with importance-scored mass): the teacher's hidden states projected to the student's width
   ``t_j = W_t2s h^T_j``; the cost ``C_ij = 1 - softmax_j(h^S_i . t_j / sqrt(d_s))``; masses ``pi`` on the
   teacher side, and on the student side each paired token's teacher importance, the minimum for
   unpaired tokens, softmax again (the reference's projection); Sinkhorn in the plain domain
   ``K = exp(-C / epsilon)``, ``epsilon = 0.1``, at most 100 iterations, stopping when the student dual moves
   by less than ``1e-9``, ``1e-9`` in the denominators; ``otis = sum_ij P_ij C_ij``, differentiated through
   the iterations (as the reference).

The reference's loss is ``(1 - kappa) task + kappa (0.1 ira_sum + otis_mean)``; here both are means over
sequences (``ira`` over the sequences with ``m >= 2``), with term weights ``kappa / (1 - kappa)`` times
(0.1, 1) next to the engine's CE weight 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch

from mlot_ds.fields import PositiveFloat, PositiveInt, UnitInterval
from mlot_ds.losses.alm import labelled_positions
from mlot_ds.losses.method import HIDDEN, LinearSpec, LogitSource, Method, TeacherOutput, TeacherView, attention, gold_if

CKA_EPSILON = 1e-8
SINKHORN_DENOMINATOR = 1e-9


def received_attention(weights: torch.Tensor, valid: torch.Tensor, mode: str = "sum") -> torch.Tensor:
    """``[B, T]``: how much attention each position receives from the real query positions of ``weights
    [B, T, T]`` (``mode="mean"``: per position that can attend to it)."""
    real = valid.to(weights.dtype)
    received = (weights * real.unsqueeze(2)).sum(dim=1)
    if mode == "mean":
        # position j is visible to the real positions i >= j (causal)
        visible = torch.flip(torch.cumsum(torch.flip(real, [1]), dim=1), [1])
        received = received / visible.clamp(min=1)
    return received


def masked_softmax(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the ``mask`` entries of each row (0 elsewhere; all-masked rows are 0)."""
    filled = values.masked_fill(~mask, float("-inf"))
    out = torch.softmax(filled, dim=-1)
    return torch.nan_to_num(out, nan=0.0) * mask


def column_of(positions: torch.Tensor, index: torch.Tensor, mask: torch.Tensor, length: int) -> torch.Tensor:
    """For token ``positions [B, P]``, their column in the left-aligned layout ``index [B, N]`` (-1: none)."""
    column = torch.full((index.shape[0], length), -1, dtype=torch.long, device=index.device)
    slots = torch.arange(index.shape[1], device=index.device).expand_as(index)
    column.scatter_(1, index, torch.where(mask, slots, torch.full_like(slots, -1)))
    return column.gather(1, positions.clamp(0, length - 1))


def select_important(pair_importance: torch.Tensor, pair_mask: torch.Tensor, divisor: int, cap: int) -> torch.Tensor:
    """The ``min(n_pairs // divisor, cap)`` pairs of largest importance per sequence, most important first
    (ties: earlier pair), as pair indices ``[B, cap]`` (-1 = none)."""
    batch, width = pair_mask.shape
    count = torch.clamp(pair_mask.sum(dim=1) // divisor, max=cap)
    score = pair_importance.masked_fill(~pair_mask, float("-inf"))
    order = torch.sort(-score, dim=1, stable=True).indices
    selected = torch.full((batch, cap), -1, dtype=torch.long, device=pair_mask.device)
    keep = min(cap, width)
    ranks = torch.arange(keep, device=pair_mask.device).unsqueeze(0)
    selected[:, :keep] = torch.where(ranks < count.unsqueeze(1), order[:, :keep], torch.full_like(order[:, :keep], -1))
    return selected


def centred_gram(rows: torch.Tensor, row_mask: torch.Tensor) -> torch.Tensor:
    """``G = Xc Xc^T`` ``[B, M, M]`` float64 of the rows ``rows [B, M, T]`` (``row_mask [B, M]``), each column
    centred over the real rows (padding rows are 0)."""
    x = rows.to(torch.float64) * row_mask.unsqueeze(2)
    count = row_mask.sum(dim=1).clamp(min=1).to(torch.float64).view(-1, 1, 1)
    centred = (x - x.sum(dim=1, keepdim=True) / count) * row_mask.unsqueeze(2)
    return centred @ centred.transpose(1, 2)


def cka_loss(student_gram: torch.Tensor, teacher_gram: torch.Tensor, epsilon: float = CKA_EPSILON) -> torch.Tensor:
    """``1 - sqrt(<G^S, G^T>) / sqrt((||G^S||_F + eps) (||G^T||_F + eps))`` per sequence ``[B]`` (float64)."""
    # The tiny floors keep the gradient finite (0, not NaN) for a sequence without important pairs.
    inner = (student_gram * teacher_gram).sum(dim=(1, 2)).clamp(min=1e-300)
    norm_s = (student_gram.square().sum(dim=(1, 2)) + 1e-300).sqrt() + epsilon
    norm_t = (teacher_gram.square().sum(dim=(1, 2)) + 1e-300).sqrt() + epsilon
    return 1.0 - inner.sqrt() / (norm_s * norm_t).sqrt()


def attention_cost(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``C_ij = 1 - softmax_j(s_i . t_j / sqrt(d))`` ``[n, m]`` (the reference's ``attention`` distance)."""
    return 1.0 - torch.softmax(student @ teacher.T / math.sqrt(student.shape[1]), dim=1)


def sinkhorn_cost(cost: torch.Tensor, student_mass: torch.Tensor, teacher_mass: torch.Tensor, *, epsilon: float = 0.1,
                  iterations: int = 100, tolerance: float = 1e-9, scale_kernel: bool = False) -> torch.Tensor:
    """``sum P C`` of the plain-domain Sinkhorn plan ``P = diag(u) K diag(v)`` between ``student_mass [n]``
    (rows) and ``teacher_mass [m]`` (columns), with ``K = exp(-C / epsilon)`` (``scale_kernel``: the
    circulating CoT2Align copy's ``exp(-epsilon C)``); stops once ``max |u - u_prev| < tolerance``."""
    n, m = cost.shape
    if n == 0 or m == 0:
        return cost.sum() * 0.0
    a = (student_mass / student_mass.sum()).view(-1, 1).to(cost.dtype)
    b = (teacher_mass / teacher_mass.sum()).view(-1, 1).to(cost.dtype)
    kernel = torch.exp(-cost * epsilon) if scale_kernel else torch.exp(-cost / epsilon)
    u = torch.ones(n, 1, dtype=cost.dtype, device=cost.device)
    for _ in range(iterations):
        previous = u
        v = b / (kernel.T @ u + SINKHORN_DENOMINATOR)
        u = a / (kernel @ v + SINKHORN_DENOMINATOR)
        if float((u - previous).detach().abs().max()) < tolerance:
            break
    plan = u * kernel * v.T
    return (plan * cost).sum()


class EmoTeacher(NamedTuple):
    """EMO's teacher side (the offline cache stores these).

    Attributes:
        hidden: final hidden states at the teacher's response tokens ``[B, Nt, d_t]`` (model dtype).
        importance: ``pi`` over those tokens ``[B, Nt]`` float32 (0 at padding).
        mask: ``[B, Nt]`` real tokens.
        selected: the important pairs, most important first ``[B, max_important]`` (-1 = none).
        gram: the centred Gram matrix of their teacher attention rows ``[B, max_important, max_important]`` float64.
    """

    hidden: torch.Tensor
    importance: torch.Tensor
    mask: torch.Tensor
    selected: torch.Tensor
    gram: torch.Tensor


@dataclass(frozen=True)
class EmoParams:
    """EMO's hyper-parameters (``loss: {kind: emo, ...}``), the reference code's values."""

    kd_ratio: UnitInterval = 0.5
    """``kappa`` (``--kd-rate`` 0.5): ``(1 - kappa) CE + kappa (0.1 IRA + OTIS)``."""
    sinkhorn_epsilon: PositiveFloat = 0.1
    """``epsilon`` of ``K = exp(-C / epsilon)`` (the reference's ``sinkhorn_alpha``)."""
    sinkhorn_iterations: PositiveInt = 100
    """At most this many Sinkhorn iterations (``OT_max_iter``)."""
    sinkhorn_tolerance: PositiveFloat = 1e-9
    """Stop when the student dual moves less than this (``stopThr``)."""
    top_divisor: PositiveInt = 3
    """IRA keeps ``n_pairs // top_divisor`` important pairs (the reference's ``n // 3``)."""
    max_important: PositiveInt = 64
    """At most this many (a fixed width for the cache; the reference has no cap)."""
    importance: Literal["sum", "mean"] = "sum"
    """Attention received: summed (the reference) or per position that can attend (no causal bias)."""
    importance_layer: int = -1
    """The teacher layer whose head-averaged attention ranks the tokens (the reference: the last)."""
    projector_lr: PositiveFloat = 1e-3
    """The ``t2s`` projector's learning rate (``--projector-lr`` 1e-3)."""


class IntraModelRelationOT(Method):
    """EMO (Truong et al. 2025) for causal students: CKA between the two models' attention rows of the
    important 1:1-paired response tokens (``ira``) and importance-weighted Sinkhorn OT between the
    student's and the projected teacher's final hidden states (``otis``), each a mean over sequences."""

    name = "emo"
    Params = EmoParams
    terms = ("ira", "otis")
    denominator = "sequences"
    pairings = ("dtw",)
    needs = frozenset({"dims"})
    description = "EMO: CKA of attention rows of important tokens + importance-weighted OT of hidden states (Truong 2025)"

    @classmethod
    def default_weights(cls, params) -> dict[str, float]:
        share = params.kd_ratio / (1.0 - params.kd_ratio)
        return {"ira": 0.1 * share, "otis": share}

    @classmethod
    def check(cls, params, context) -> None:
        if context is None:
            return
        if context.student_dims is None or context.teacher_dims is None:
            raise ValueError("loss 'emo' needs both models' sizes (MethodContext.student_dims / teacher_dims)")
        layers = context.teacher_dims.layers
        if not -layers <= params.importance_layer < layers:
            raise ValueError(f"importance_layer: the teacher has {layers} layers; {params.importance_layer} does not exist")

    def term_denominator(self, term: str) -> str:
        return "ira_sequences" if term == "ira" else self.denominator

    def _layers(self) -> tuple[int, int]:
        """(the teacher's importance layer, its IRA layer for the student's last layer)."""
        student, teacher = self.context.student_dims, self.context.teacher_dims
        if student is None or teacher is None:
            raise ValueError("loss 'emo' needs both models' sizes")
        block = teacher.layers // student.layers
        ira = student.layers * block - 1 if block >= 1 else teacher.layers - 1
        return self.params.importance_layer % teacher.layers, ira

    def teacher_features(self) -> frozenset[str]:
        return frozenset({HIDDEN, *(attention(layer) for layer in self._layers())})

    def student_features(self) -> frozenset[str]:
        return frozenset({HIDDEN, attention(-1)})

    def module_specs(self) -> dict[str, LinearSpec]:
        student, teacher = self.context.student_dims, self.context.teacher_dims
        if student is None or teacher is None:
            raise ValueError("loss 'emo' needs both models' sizes to build its projector")
        return {"t2s": LinearSpec(teacher.hidden, student.hidden, lr=self.params.projector_lr)}

    @staticmethod
    def _pair_positions(view: TeacherView, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pairing = view.pairing
        return (pairing.student_index.to(device) + 1, pairing.teacher_index.to(device) + 1, pairing.mask.to(device))

    def teacher(self, source: LogitSource, view: TeacherView, gold: bool) -> TeacherOutput:
        features = source.features or {}
        importance_layer, ira_layer = self._layers()
        wanted = (HIDDEN, attention(importance_layer), attention(ira_layer))
        if any(name not in features for name in wanted):
            raise ValueError(f"loss 'emo' needs the teacher's {', '.join(wanted)} (LogitSource.features)")
        device = source.device
        batch = view.teacher
        labels, valid = batch.labels.to(device), batch.attention_mask.to(device).bool()
        index, mask = labelled_positions(labels)
        hidden = features[HIDDEN]
        picked = hidden.gather(1, index.unsqueeze(2).expand(-1, -1, hidden.shape[2])) * mask.unsqueeze(2)
        work = torch.promote_types(hidden.dtype, torch.float32)
        received = received_attention(features[attention(importance_layer)].to(work), valid, self.params.importance)
        importance = masked_softmax(received.gather(1, index), mask)
        _, teacher_positions, pairs = self._pair_positions(view, device)
        columns = column_of(teacher_positions, index, mask, labels.shape[1])
        if bool((columns[pairs] < 0).any()):
            raise ValueError("loss 'emo': a paired teacher token is not a labelled response token")
        # a column of zeros stands in for "no token" (filler rows have no labelled position at all)
        padded = torch.cat([importance, importance.new_zeros(importance.shape[0], 1)], dim=1)
        pair_importance = padded.gather(1, torch.where(columns >= 0, columns, importance.shape[1]))
        selected = select_important(pair_importance, pairs, self.params.top_divisor, self.params.max_important)
        rows = self._attention_rows(features[attention(ira_layer)], teacher_positions, selected)
        gram = centred_gram(rows, selected >= 0)
        reduced = EmoTeacher(picked, importance, mask, selected, gram)
        return TeacherOutput(reduced, gold_if(source, labels, gold))

    @staticmethod
    def _attention_rows(weights: torch.Tensor, positions: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
        """The attention rows ``[B, M, T]`` of the selected pairs' tokens (``positions [B, P]``)."""
        token = positions.gather(1, selected.clamp(min=0))
        rows = weights.gather(1, token.unsqueeze(2).expand(-1, -1, weights.shape[2]))
        return rows * (selected >= 0).unsqueeze(2)

    def counts(self, reduced: EmoTeacher, view: TeacherView) -> dict[str, float]:
        _, student_mask = labelled_positions(view.student.labels)
        both = student_mask.any(dim=1) & reduced.mask.cpu().any(dim=1)
        important = ((reduced.selected >= 0).sum(dim=1) >= 2).cpu()
        return {"sequences": float(both.sum()), "ira_sequences": float(important.sum())}

    def student(self, logits, reduced: EmoTeacher, view: TeacherView, ce_labels=None) -> dict[str, torch.Tensor]:
        features = view.features or {}
        if HIDDEN not in features or attention(-1) not in features:
            raise ValueError("loss 'emo' needs the student's hidden states and last-layer attention (TeacherView.features)")
        if "t2s" not in self.trainable:
            raise ValueError("loss 'emo' needs its t2s projector (attach_modules)")
        device = logits.device
        labels = view.student.labels.to(device)
        index, mask = labelled_positions(labels)
        hidden = features[HIDDEN]
        student_rows = hidden.gather(1, index.unsqueeze(2).expand(-1, -1, hidden.shape[2]))
        projected = self.trainable["t2s"](reduced.hidden.to(device=device, dtype=hidden.dtype))  # every micro-batch
        student_positions, teacher_positions, pairs = self._pair_positions(view, device)
        # IRA: the same important pairs' attention rows on the student's side
        selected = reduced.selected.to(device)
        rows = self._attention_rows(features[attention(-1)], student_positions, selected)
        cka = cka_loss(centred_gram(rows, selected >= 0), reduced.gram.to(device))
        ira = (cka * ((selected >= 0).sum(dim=1) >= 2)).sum()
        # OTIS: student masses from the paired teacher tokens' importance
        teacher_mask, importance = reduced.mask.to(device), reduced.importance.to(device)
        teacher_columns = column_of(teacher_positions, *labelled_positions(view.teacher.labels.to(device)),
                                    view.teacher.labels.shape[1])
        student_columns = column_of(student_positions, index, mask, labels.shape[1])
        paired = torch.full(mask.shape, -1, dtype=torch.long, device=device)
        flat = pairs & (student_columns >= 0)
        paired[torch.nonzero(flat, as_tuple=True)[0], student_columns[flat]] = teacher_columns[flat]
        params = self.params
        work = torch.promote_types(hidden.dtype, torch.float32)
        otis = projected.to(work).sum() * 0.0 + student_rows.to(work).sum() * 0.0
        for b in range(labels.shape[0]):
            n, m = int(mask[b].sum()), int(teacher_mask[b].sum())
            if n == 0 or m == 0:
                continue
            pi = importance[b, :m]
            floor = pi.min()
            mapped = paired[b, :n]
            raw = torch.where(mapped >= 0, pi[mapped.clamp(min=0)], floor)
            student_mass = torch.softmax(raw, dim=0)
            cost = attention_cost(student_rows[b, :n].to(work), projected[b, :m].to(work))
            otis = otis + sinkhorn_cost(cost, student_mass, pi, epsilon=params.sinkhorn_epsilon,
                                        iterations=params.sinkhorn_iterations, tolerance=params.sinkhorn_tolerance)
        return {"ira": ira.to(work), "otis": otis}

    # The offline cache: per teacher response token its final hidden state (model dtype) and importance;
    # per record the important pairs and their attention rows' Gram matrix (float64).
    def cache_settings(self) -> dict:
        importance_layer, ira_layer = self._layers()
        return {"kind": self.name, "importance": self.params.importance, "top_divisor": self.params.top_divisor,
                "max_important": self.params.max_important, "layers": [importance_layer, ira_layer]}

    def cache_rows(self, view: TeacherView) -> tuple[torch.Tensor, torch.Tensor]:
        return labelled_positions(view.teacher.labels)

    def to_cache(self, reduced: EmoTeacher, view: TeacherView):
        # stored + 1: the cache's zero for a filler row then reads back as "no pair"
        return ({"selected": reduced.selected + 1, "gram": reduced.gram},
                {"hidden": reduced.hidden, "importance": reduced.importance.float()})

    def from_cache(self, records, rows, view: TeacherView) -> EmoTeacher:
        _, mask = labelled_positions(view.teacher.labels.to(rows["hidden"].device))
        return EmoTeacher(rows["hidden"] * mask.unsqueeze(2), rows["importance"].float() * mask, mask,
                          records["selected"].long() - 1, records["gram"].double())


__all__ = ["EmoParams", "EmoTeacher", "IntraModelRelationOT", "attention_cost", "centred_gram", "cka_loss",
           "column_of", "masked_softmax", "received_attention", "select_important", "sinkhorn_cost"]
