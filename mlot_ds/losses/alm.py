"""ALM: Approximate Likelihood Matching (Minixhofer, Vulic, Ponti, arXiv 2503.20083), spec section 7.

Implemented mode: the reference code's (tokenkit ``compute_alm_loss``) recommended
``merge_by_space_prob + append_space`` with the binary cross-entropy ``binary_ce`` (the README's
default, which differs from the paper's precomputed bias tables).

Chunks are the ``offsets`` groups: each chunk ``c`` is a run of teacher tokens ``I_c`` and a run of
student tokens ``J_c`` that spell the same bytes. Per token the caller provides (see
:func:`mlot_ds.losses.rowstats.student_token_stats` / ``teacher_token_stats``):

- ``log_prob[j] = log p(x_j | x_<j)``, read at the row before token ``j``;
- ``boundary_log_mass[j] = log sum_{v in S} p(v | x_<=j)``, read at token ``j``'s own row: the
  probability that the token AFTER ``j`` starts at a boundary (space, tab, newline, special).

Equations (tokenkit; spec 7(c)), each side on its own tokens:

1. chunk log-prob, clipped:  l_c = min(0, sum_{j in chunk c} log_prob[j])
2. boundary at the chunk end: lam_c = min(0, boundary_log_mass[last token of c])
3. merging (``merge_by_boundary``): chunk ``c`` is a boundary iff ``exp(lam^T_c) > threshold`` (the
   TEACHER's); consecutive chunks form groups that end at a boundary, trailing chunks after the last
   boundary form a final group; ``group(c) = number of boundaries among the chunks before c``
   (flags ``[0, 1, 0, 0, 1]`` give groups ``[0, 0, 1, 1, 1]``).
4. group log-prob: ``L_g = sum_{c in g} l_c (+ lam_{last chunk of g}`` with ``append_boundary``), each
   side with its own ``lam``.
5. ``D(L^T_g, L^S_g)`` summed over groups; the engine divides by the global group count
   (:func:`alm_chunk_count`, from the teacher side only; tokenkit normalises by local counts).

Divergences ``D(lt, ls)`` (``divergence=``), with ``tau = binarization_temp`` (100), ``eps`` (1e-6),
``a = lt / tau - eps`` and ``b = ls / tau - eps`` (log-probabilities of Bernoulli events ``p^(1/tau)``):

- ``binary_ce`` (default): ``-(e^a b + (1 - e^a) log(1 - e^b))``, the cross-entropy of Bernoulli(e^a)
  against Bernoulli(e^b); it equals the binary KL plus a teacher-only constant, so its gradient is zero
  when ``ls = lt``.
- ``reverse_binary_kl``: ``e^b (b - a) + (1 - e^b) (log(1 - e^b) - log(1 - e^a))``.
- ``binary_kl_temp_limit``: ``tau * binary KL`` as ``tau -> inf``, on ``a = lt - eps, b = ls - eps``:
  ``(a - b) + a log(-b) - a log(-a)``.
- ``abs``: ``|lt - ls|``;  ``abs_exp``: ``|e^a - e^b|``;
- ``joschu_k2``: ``r^2 / 2`` and ``joschu_k3``: ``e^r - 1 - r`` with ``r = (lt - ls) / tau``.

``log(1 - e^x)`` is evaluated stably (``log(-expm1(x))`` near 0, ``log1p(-exp(x))`` below ``-log 2``).

The method (:class:`ApproximateLikelihoodMatching`, ``loss: {kind: alm}``, pairing ``offsets``):

- chunk ``p`` = pair ``p`` of the offsets pairing; on each side its tokens are the ones predicted by
  the rows ``index[b, p] .. stop[b, p] - 1`` (``TeacherView.groups``), at positions ``row + 1``
  (:func:`token_chunks`). The final EOS is a chunk only when the pairing pairs it
  (``student.distill_final_eos``).
- boundary sets ``S`` from each tokenizer's surface bytes (:func:`~mlot_ds.pairing.boundary.boundary_token_mask`),
  built once; rows beyond the tokenizer (padded output layers) are not in ``S``.
- teacher side: ``log_prob`` and ``boundary_log_mass`` at every labelled teacher position, a block of
  rows at a time through ``LogitSource.read`` (:class:`AlmTeacher`, ``[B, N]`` left-aligned; the
  teacher's gold CE comes from the same numbers). The offline cache stores exactly these two float32
  numbers per labelled position, independent of the loss parameters.
- student side: one streaming pass over the logits (:func:`~mlot_ds.losses.rowstats.student_token_stats`)
  gives the chunk tokens' log-probabilities, their boundary masses (only with ``append_boundary``) and,
  when asked, the student's CE on its labels (``fuses_ce``).
- ``counts``: ``{"chunks": merged group count}`` of the micro-batch, from the teacher side alone; the
  engine sums it over micro-batches and ranks, so the loss is ``sum D / global merged chunks``.

The hidden-state term (``latents: true``; tokenkit ``alm_latents``, off by default as there: its README
found it helps only in self-distillation), with the reference's defaults (``last_hidden_state``,
``naive`` chunks, ``l2_channelwise``): per (unmerged) chunk ``c`` the final hidden states at its last
token on each side, ``t_c`` (teacher, ``d_t``) and ``s_c`` (student, ``d_s``), the student's through a
trainable projector ``P`` (``d_s -> d_t``, Flax's default init, learning rate ``2 x train.lr`` as the
reference's ``lr_scale: 2`` projector group):

    latents = sum_c (1 / d_t) sum_k (P(s_c) - t_c)_k^2 / (mean_{c' in micro-batch} t_{c'k}^2 + 1e-8)

divided by the global number of chunks (``latent_chunks``: pairs, unmerged). The channel scale is the
teacher's mean square over the micro-batch's chunk ends (tokenkit: over its batch). The teacher side then
also keeps its final hidden state at every labelled position (the offline cache too, in the model's dtype).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Literal, NamedTuple, get_args

import torch

from mlot_ds.fields import PositiveFloat, UnitInterval
from mlot_ds.losses.method import HIDDEN, LinearSpec, LogitSource, Method, MethodContext, TeacherOutput, TeacherView
from mlot_ds.losses.rowstats import student_token_stats, teacher_token_stats
from mlot_ds.pairing import IGNORE_INDEX
from mlot_ds.pairing.boundary import boundary_token_mask

Divergence = Literal["binary_ce", "reverse_binary_kl", "binary_kl_temp_limit", "abs", "abs_exp", "joschu_k2", "joschu_k3"]
DIVERGENCES: tuple[str, ...] = get_args(Divergence)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, stable on both ends."""
    near_zero = x > -math.log(2.0)
    # Each branch sees only inputs it handles, so neither produces inf/NaN gradients for the other.
    safe_near = torch.where(near_zero, x, torch.full_like(x, -1.0))
    safe_far = torch.where(near_zero, torch.full_like(x, -1.0), x)
    return torch.where(near_zero, torch.log(-torch.expm1(safe_near)), torch.log1p(-torch.exp(safe_far)))


def alm_divergence(teacher: torch.Tensor, student: torch.Tensor, *, divergence: str = "binary_ce",
                   binarization_temp: float = 100.0, epsilon: float = 1e-6) -> torch.Tensor:
    """Elementwise ``D(teacher, student)`` on (chunk) log-probabilities ``<= 0``; see the module docstring."""
    if divergence == "abs":
        return (teacher - student).abs()
    if divergence in ("joschu_k2", "joschu_k3"):
        ratio = (teacher - student) / binarization_temp
        return ratio.square() / 2 if divergence == "joschu_k2" else torch.expm1(ratio) - ratio
    if divergence == "binary_kl_temp_limit":
        a, b = teacher - epsilon, student - epsilon
        return (a - b) + a * torch.log(-b) - a * torch.log(-a)
    a = teacher / binarization_temp - epsilon
    b = student / binarization_temp - epsilon
    if divergence == "binary_ce":
        return -(a.exp() * b + (-torch.expm1(a)) * log1mexp(b))
    if divergence == "reverse_binary_kl":
        return b.exp() * (b - a) + (-torch.expm1(b)) * (log1mexp(b) - log1mexp(a))
    if divergence == "abs_exp":
        return (a.exp() - b.exp()).abs()
    raise ValueError(f"unknown divergence {divergence!r}; choose one of {DIVERGENCES}")


def merge_groups(boundary: torch.Tensor) -> torch.Tensor:
    """Group index of every chunk ``[B, C]``: the number of boundary chunks strictly before it.

    ``boundary [B, C]`` bool marks the chunks that end a group (False for absent chunks, which then
    join the following group and contribute nothing).
    """
    flags = boundary.long()
    return torch.cumsum(flags, dim=1) - flags


def _check_side(log_prob, boundary_log_mass, chunk, side):
    if chunk.dim() != 2 or chunk.dtype != torch.long:
        raise ValueError(f"{side}_chunk must be a LongTensor [B, N], got {chunk.dtype} {tuple(chunk.shape)}")
    for name, tensor in (("log_prob", log_prob), ("boundary_log_mass", boundary_log_mass)):
        if tensor is not None and tensor.shape != chunk.shape:
            raise ValueError(f"{side}_{name} {tuple(tensor.shape)} must match {side}_chunk {tuple(chunk.shape)}")


def _chunk_table(log_prob, boundary_log_mass, chunk, chunks: int):
    """Per chunk ``[B * C]``: clipped log-prob sum, clipped boundary log-mass at its last token, presence."""
    batch, length = chunk.shape
    valid = chunk >= 0
    key = (torch.arange(batch, device=chunk.device).unsqueeze(1) * chunks + chunk)[valid]
    position = torch.arange(length, device=chunk.device).expand(batch, -1)[valid]
    last = torch.full((batch * chunks,), -1, dtype=torch.long, device=chunk.device)
    last.scatter_reduce_(0, key, position, reduce="amax", include_self=True)
    present = last >= 0
    total = None
    if log_prob is not None:
        dtype = torch.promote_types(log_prob.dtype, torch.float32)
        total = log_prob.new_zeros(batch * chunks, dtype=dtype).index_add(0, key, log_prob[valid].to(dtype))
        total = total.clamp(max=0.0)
    lam = None
    if boundary_log_mass is not None:
        dtype = torch.promote_types(boundary_log_mass.dtype, torch.float32)
        flat_last = torch.arange(batch, device=chunk.device).repeat_interleave(chunks) * length + last.clamp(min=0)
        lam = boundary_log_mass.reshape(-1).to(dtype)[flat_last].clamp(max=0.0)
        lam = torch.where(present, lam, torch.zeros_like(lam))
    return total, lam, present


def _groups(teacher_lam, present, batch: int, chunks: int, threshold: float, merge: bool):
    """Group key per chunk (``b * C + group``) and the last chunk of every group key."""
    if merge:
        boundary = present & (teacher_lam.exp() > threshold)
        group = merge_groups(boundary.view(batch, chunks)).reshape(-1)
    else:
        group = torch.arange(chunks, device=present.device).repeat(batch)
    key = torch.arange(batch, device=present.device).repeat_interleave(chunks) * chunks + group
    chunk_id = torch.arange(batch * chunks, device=present.device)
    last_chunk = torch.full((batch * chunks,), -1, dtype=torch.long, device=present.device)
    last_chunk.scatter_reduce_(0, key[present], chunk_id[present], reduce="amax", include_self=True)
    return key, last_chunk


def alm_chunk_count(
    teacher_boundary_log_mass: torch.Tensor,
    teacher_chunk: torch.Tensor,
    *,
    threshold: float = 0.1,
    merge_by_boundary: bool = True,
) -> torch.Tensor:
    """Number of (merged) chunks :func:`alm` sums over, from the teacher side alone, float32 scalar.

    The engine needs it before the student forward: the merge decision reads only the teacher.
    """
    _check_side(None, teacher_boundary_log_mass, teacher_chunk, "teacher")
    batch = teacher_chunk.shape[0]
    chunks = int(teacher_chunk.max()) + 1 if teacher_chunk.numel() else 0
    with torch.no_grad():
        _, lam, present = _chunk_table(None, teacher_boundary_log_mass.detach(), teacher_chunk, chunks)
        _, last_chunk = _groups(lam, present, batch, chunks, threshold, merge_by_boundary)
    return (last_chunk >= 0).sum().to(torch.float32)


def alm(
    teacher_log_prob: torch.Tensor,
    teacher_boundary_log_mass: torch.Tensor | None,
    teacher_chunk: torch.Tensor,
    student_log_prob: torch.Tensor,
    student_boundary_log_mass: torch.Tensor | None,
    student_chunk: torch.Tensor,
    *,
    divergence: str = "binary_ce",
    binarization_temp: float = 100.0,
    threshold: float = 0.1,
    epsilon: float = 1e-6,
    merge_by_boundary: bool = True,
    append_boundary: bool = True,
) -> dict[str, torch.Tensor]:
    """ALM summed over the merged chunks of the batch (module docstring, steps 1-5).

    Args:
        teacher_log_prob: ``[B, Nt]`` ``log p_T`` of each teacher token (from the row before it).
        teacher_boundary_log_mass: ``[B, Nt]`` teacher log boundary mass at each token's own row.
        teacher_chunk: ``[B, Nt]`` long chunk index of each teacher token (``-1``: not in any chunk).
            Chunk indices are per sequence and in text order; chunk ``c`` of sequence ``b`` must have
            tokens on both sides.
        student_log_prob, student_boundary_log_mass, student_chunk: the same for the student
            (``[B, Ns]``; the two float tensors carry the gradient).
        divergence: ``binary_ce`` (default) or another of :data:`DIVERGENCES`.
        binarization_temp: ``tau`` (100).
        threshold: the teacher boundary probability above which a chunk ends a group (0.1).
        epsilon: keeps the binarised log-probabilities below 0 (1e-6).
        merge_by_boundary: merge chunks into groups (tokenkit ``merge_by_space_prob``).
        append_boundary: add the group end's boundary log-mass (tokenkit ``append_space``).

    The boundary log-masses may be ``None`` where unused: the student's without ``append_boundary``,
    the teacher's without both ``merge_by_boundary`` and ``append_boundary``.

    Returns:
        ``{"alm": sum over groups, "chunks": group count (float32)}``.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; choose one of {DIVERGENCES}")
    _check_side(teacher_log_prob, teacher_boundary_log_mass, teacher_chunk, "teacher")
    _check_side(student_log_prob, student_boundary_log_mass, student_chunk, "student")
    if teacher_boundary_log_mass is None and (merge_by_boundary or append_boundary):
        raise ValueError("teacher_boundary_log_mass is needed to merge chunks or append the boundary term")
    if student_boundary_log_mass is None and append_boundary:
        raise ValueError("student_boundary_log_mass is needed to append the boundary term")
    batch = teacher_chunk.shape[0]
    if student_chunk.shape[0] != batch:
        raise ValueError(f"batch sizes differ: teacher {batch}, student {student_chunk.shape[0]}")
    top = max(int(teacher_chunk.max()) if teacher_chunk.numel() else -1,
              int(student_chunk.max()) if student_chunk.numel() else -1)
    chunks = top + 1
    with torch.no_grad():
        t_boundary = teacher_boundary_log_mass.detach() if teacher_boundary_log_mass is not None else None
        t_total, t_lam, present = _chunk_table(teacher_log_prob.detach(), t_boundary, teacher_chunk, chunks)
    s_total, s_lam, s_present = _chunk_table(student_log_prob, student_boundary_log_mass, student_chunk, chunks)
    if not torch.equal(present, s_present):
        missing = (present ^ s_present).nonzero().squeeze(1)[:5].tolist()
        raise ValueError(f"chunks present on one side only (flat b * C + c): {missing}")
    key, last_chunk = _groups(t_lam, present, batch, chunks, threshold, merge_by_boundary)
    dtype = torch.promote_types(s_total.dtype, t_total.dtype)
    keep = present.nonzero().squeeze(1)
    t_group = t_total.new_zeros(batch * chunks, dtype=dtype).index_add(0, key[keep], t_total[keep].to(dtype))
    s_group = s_total.new_zeros(batch * chunks, dtype=dtype).index_add(0, key[keep], s_total[keep].to(dtype))
    groups = (last_chunk >= 0).nonzero().squeeze(1)
    t_group, s_group = t_group[groups], s_group[groups]
    if append_boundary:
        ends = last_chunk[groups]
        t_group = t_group + t_lam[ends].to(dtype)
        s_group = s_group + s_lam[ends].to(dtype)
    loss = alm_divergence(t_group, s_group, divergence=divergence, binarization_temp=binarization_temp,
                          epsilon=epsilon)
    return {"alm": loss.sum(), "chunks": torch.tensor(float(groups.numel()), dtype=torch.float32,
                                                        device=student_log_prob.device)}


# ----------------------------------------------------------------------------------- the method


def token_chunks(index: torch.Tensor, stop: torch.Tensor, mask: torch.Tensor, length: int) -> torch.Tensor:
    """Chunk id of every token position ``[B, length]`` from one side of an offsets pairing.

    Pair ``p`` of sequence ``b`` is chunk ``p``: its tokens are the ones predicted by the logit rows
    ``index[b, p] .. stop[b, p] - 1``, i.e. the tokens at positions ``index[b, p] + 1 .. stop[b, p]``.
    Positions in no pair get ``-1``. Pairs are in text order, so chunk ids are too.

    Args:
        index: ``[B, P]`` long, the pairing's rows on this side; stop: ``[B, P]`` long, exclusive end
            rows (``TeacherView.groups``); mask: ``[B, P]`` bool, real pairs.
        length: ``T`` of this side.
    """
    if not (index.shape == stop.shape == mask.shape):
        raise ValueError(f"pair tensors disagree in shape: {tuple(index.shape)}, {tuple(stop.shape)}, {tuple(mask.shape)}")
    batch, width = mask.shape
    device = index.device
    if bool((mask & (stop <= index)).any()):
        raise ValueError("an offsets group has no token (stop <= index)")
    counts = torch.where(mask, stop - index, torch.zeros_like(index)).reshape(-1)
    total = int(counts.sum())
    chunk = torch.full((batch, length), -1, dtype=torch.long, device=device)
    if total == 0:
        return chunk
    sequence = torch.arange(batch, device=device).repeat_interleave(width).repeat_interleave(counts)
    pair = torch.arange(width, device=device).repeat(batch).repeat_interleave(counts)
    first = torch.cumsum(counts, 0) - counts
    offset = torch.arange(total, device=device) - first.repeat_interleave(counts)
    position = index.reshape(-1).repeat_interleave(counts) + 1 + offset
    if int(position.min()) < 1 or int(position.max()) >= length:
        raise ValueError(f"offsets group tokens out of range [1, {length}): {int(position.min())}..{int(position.max())}")
    chunk[sequence, position] = pair
    if int((chunk >= 0).sum()) != total:
        raise ValueError("offsets groups overlap: a token belongs to two pairs")
    return chunk


def labelled_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The scored token positions ``t >= 1`` with ``labels[b, t] != -100``, left-aligned: ``(index, mask) [B, N]``.

    Positions are ascending within a sequence; padding entries hold 0 and ``mask`` False.
    """
    valid = labels != IGNORE_INDEX
    valid[:, 0] = False
    counts = valid.sum(dim=1)
    width = int(counts.max()) if counts.numel() else 0
    order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices[:, :width]
    mask = torch.arange(width, device=labels.device).unsqueeze(0) < counts.unsqueeze(1)
    return torch.where(mask, order, torch.zeros_like(order)), mask


class AlmTeacher(NamedTuple):
    """ALM's teacher side of one micro-batch, at the teacher's labelled positions ``[B, N]`` in text
    order (:func:`labelled_positions`; the offline cache stores ``log_prob`` and ``boundary`` per row).

    Attributes:
        log_prob: ``log p_T(x_t | x_<t)`` of the token at each position (0 at padding).
        boundary: the teacher's boundary log-mass after that token, ``log sum_{v in S_T} p_T(v | x_<=t)``.
        chunk: the token's chunk (pair) id, ``-1`` when it is in no pair (e.g. an undistilled EOS).
    """

    log_prob: torch.Tensor
    boundary: torch.Tensor
    chunk: torch.Tensor


class AlmLatentsTeacher(NamedTuple):
    """:class:`AlmTeacher` plus the teacher's final hidden state ``hidden [B, N, d_t]`` at each labelled
    position (``latents: true``)."""

    log_prob: torch.Tensor
    boundary: torch.Tensor
    chunk: torch.Tensor
    hidden: torch.Tensor


LATENT_EPSILON = 1e-8
"""Added to the teacher's per-channel mean square (tokenkit ``compute_alm_latents_loss``)."""


def latent_term(projected: torch.Tensor, teacher: torch.Tensor, epsilon: float = LATENT_EPSILON) -> torch.Tensor:
    """``sum_c mean_k (projected - teacher)_ck^2 / (mean_c teacher_ck^2 + epsilon)`` over the rows ``c``
    (chunk ends) of ``projected, teacher [N, d]``; 0 (with a graph) when ``N = 0``."""
    if projected.shape != teacher.shape:
        raise ValueError(f"projected {tuple(projected.shape)} and teacher {tuple(teacher.shape)} hidden states differ")
    dtype = torch.promote_types(projected.dtype, torch.float32)
    if projected.shape[0] == 0:
        return projected.to(dtype).sum() * 0.0
    target = teacher.detach().to(dtype)
    scale = target.square().mean(dim=0) + epsilon
    return ((projected.to(dtype) - target).square() / scale).mean(dim=1).sum()


@dataclass(frozen=True)
class AlmParams:
    """ALM's hyper-parameters (``loss: {kind: alm, ...}``), defaulting to the reference code's
    recommended ``merge_by_space_prob+append_space`` mode (tokenkit README and example scripts)."""

    divergence: Divergence = "binary_ce"
    """``D`` between the binarised chunk likelihoods (tokenkit ``alm_diff_fn``; default binary_ce)."""
    binarization_temp: PositiveFloat = 100.0
    """``tau``: each chunk event has probability ``p^(1/tau)`` (tokenkit ``binarization_temp``: 100)."""
    threshold: UnitInterval = 0.1
    """A chunk ends a merged group when the teacher's boundary probability after it exceeds this
    (tokenkit ``tokenizer_pair_bias_threshold`` in the space-merge mode: 0.1)."""
    epsilon: PositiveFloat = 1e-6
    """Keeps the binarised log-probabilities below 0 (tokenkit's ``epsilon``: 1e-6)."""
    merge_by_boundary: bool = True
    """Merge consecutive chunks until a teacher boundary (tokenkit ``merge_by_space_prob``)."""
    append_boundary: bool = True
    """Add each group's boundary log-mass after its last token, on each side (tokenkit ``append_space``)."""
    latents: bool = False
    """Also match the chunk ends' final hidden states through a projector (tokenkit ``alm_latents``; off)."""
    latents_lr_scale: PositiveFloat = 2.0
    """The latent projector's learning rate relative to ``train.lr`` (tokenkit's projector ``lr_scale: 2``)."""


def _side_mask(surfaces, vocab, side: str) -> torch.Tensor:
    if surfaces is None:
        raise ValueError(f"loss 'alm' needs the {side} tokenizer's token surfaces (MethodContext.{side}_surfaces)")
    rows = vocab if vocab is not None else len(surfaces)
    try:
        mask = boundary_token_mask(surfaces, rows)
    except ValueError as exc:
        raise ValueError(f"{side}: {exc}") from None
    if not bool(mask.any()):
        raise ValueError(f"the {side} tokenizer has no boundary token (no id starts with a space, tab or newline, "
                         "and none is special): ALM's boundary mass would be log 0")
    return mask


class ApproximateLikelihoodMatching(Method):
    """ALM (Minixhofer et al. 2025), the reference code's space-merge + append-space mode.

    Chunks are the offsets groups (one per pair). The teacher side keeps two floats per labelled
    teacher position; the student side reads its per-token log-probabilities and boundary masses in
    one streaming pass over its logits, which also gives its CE. The sum over merged chunks is divided
    by the global merged-chunk count (``chunks``), computed from the teacher side before the student
    forward (the merge decision reads only the teacher).
    """

    name = "alm"
    Params = AlmParams
    terms = ("alm", "latents")
    denominator = "chunks"
    pairings = ("offsets",)
    needs = frozenset({"groups", "surfaces"})
    fuses_ce = True
    description = "ALM: binarised chunk-likelihood matching on offsets chunks, merged at teacher boundaries (Minixhofer 2025)"

    def __init__(self, params=None, weights=None, context=None):

        super().__init__(params, weights, context or MethodContext())
        self._masks: dict[str, torch.Tensor | None] = {"student": None, "teacher": None}
        self._on_device: dict[tuple[str, str], torch.Tensor] = {}
        if self.context.student_surfaces is not None and self.context.teacher_surfaces is not None:
            self._masks["student"] = _side_mask(self.context.student_surfaces, self.context.student_vocab, "student")
            self._masks["teacher"] = _side_mask(self.context.teacher_surfaces, self.context.teacher_vocab, "teacher")

    @classmethod
    def default_weights(cls, params) -> dict[str, float]:
        # tokenkit's hybrid objective [sft, alm_unconstrained] is mean(CE, ALM) = (CE + ALM) / 2 (each a
        # mean, per token and per chunk): ALM weighs as much as CE, i.e. 1 next to our ce_weight 1.
        # With alm_latents the mean runs over three losses: the latents weigh as much as CE too.
        return {"alm": 1.0, "latents": 1.0} if params.latents else {"alm": 1.0}

    @classmethod
    def needs_for(cls, params) -> frozenset[str]:
        return cls.needs | {"dims"} if params.latents else cls.needs

    @classmethod
    def check(cls, params, context) -> None:
        if context is not None:
            _side_mask(context.student_surfaces, context.student_vocab, "student")
            _side_mask(context.teacher_surfaces, context.teacher_vocab, "teacher")
            if params.latents and (context.student_dims is None or context.teacher_dims is None):
                raise ValueError("latents: the projector needs both models' sizes (MethodContext.student_dims / "
                                 "teacher_dims)")

    # The hidden-state term (latents: true) and its projector; nothing without it.
    def teacher_features(self) -> frozenset[str]:
        return frozenset({HIDDEN}) if self.params.latents else frozenset()

    def student_features(self) -> frozenset[str]:
        return frozenset({HIDDEN}) if self.params.latents else frozenset()

    def module_specs(self) -> dict[str, LinearSpec]:
        if not self.params.latents:
            return {}
        student, teacher = self.context.student_dims, self.context.teacher_dims
        if student is None or teacher is None:
            raise ValueError("loss 'alm' with latents needs both models' sizes to build its projector")
        return {"latents": LinearSpec(student.hidden, teacher.hidden, init="lecun_normal",
                                      lr_scale=self.params.latents_lr_scale)}

    def term_denominator(self, term: str) -> str:
        return "latent_chunks" if term == "latents" else self.denominator

    def _mask(self, side: str, width: int, device: torch.device) -> torch.Tensor:
        mask = self._masks[side]
        if mask is None:
            raise ValueError("loss 'alm' needs both tokenizers' token surfaces (MethodContext.student_surfaces and "
                             "teacher_surfaces) to build its boundary masks")
        if mask.numel() != width:
            raise ValueError(f"the {side} boundary mask has {mask.numel()} ids but the {side} logits have {width}")
        key = (side, str(device))
        if key not in self._on_device:
            self._on_device[key] = mask.to(device)
        return self._on_device[key]

    @staticmethod
    def _stops(view: TeacherView) -> tuple[torch.Tensor, torch.Tensor]:
        if view.groups is None:
            raise ValueError("loss 'alm' needs the offsets groups (TeacherView.groups; needs = {'groups'})")
        return view.groups

    def _teacher_chunks(self, view: TeacherView, index: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Chunk ids at the teacher's labelled positions ``index [B, N]`` (``-1`` outside pairs)."""
        device = index.device
        pairing = view.pairing
        _, teacher_stop = self._stops(view)
        full = token_chunks(pairing.teacher_index.to(device), teacher_stop.to(device), pairing.mask.to(device),
                            view.teacher.labels.shape[1])
        chunk = torch.where(mask, full.gather(1, index), torch.full_like(index, -1))
        if int((chunk >= 0).sum()) != int((full >= 0).sum()):
            raise ValueError("a paired teacher token is not labelled (labels == -100): the pairing and the labels disagree")
        return chunk

    def teacher(self, source: LogitSource, view: TeacherView, gold: bool) -> TeacherOutput:
        vocab = source.shape[2]
        labels = view.teacher.labels.to(source.device)
        stats = teacher_token_stats(source.read, labels, vocab=vocab, boundary_mask=self._mask("teacher", vocab, source.device),
                                    rows_per_block=source.rows_per_block())
        index, mask = labelled_positions(labels)
        reduced = AlmTeacher(stats.log_prob.gather(1, index) * mask, stats.boundary_log_mass.gather(1, index) * mask,
                             self._teacher_chunks(view, index, mask))
        if self.params.latents:
            if HIDDEN not in (source.features or {}):
                raise ValueError("loss 'alm' with latents needs the teacher's hidden states (LogitSource.features)")
            hidden = source.features[HIDDEN]
            picked = hidden.gather(1, index.unsqueeze(2).expand(-1, -1, hidden.shape[2])) * mask.unsqueeze(2)
            reduced = AlmLatentsTeacher(*reduced, picked)
        gold_ce = None
        if gold:
            # The teacher's gold CE from the same pass: -sum of log p over its labelled tokens.
            gold_ce = {"ce": -stats.log_prob.sum(dim=1).float(), "tokens": stats.valid.sum(dim=1).float()}
        return TeacherOutput(reduced, gold_ce)

    def counts(self, reduced: AlmTeacher, view: TeacherView) -> dict[str, float]:
        count = alm_chunk_count(reduced.boundary, reduced.chunk, threshold=self.params.threshold,
                                merge_by_boundary=self.params.merge_by_boundary)
        if self.params.latents:
            return {"chunks": float(count), "latent_chunks": float(view.pairing.mask.sum())}
        return {"chunks": float(count)}

    def student(self, logits, reduced: AlmTeacher, view: TeacherView, ce_labels=None) -> dict[str, torch.Tensor]:
        device = logits.device
        pairing = view.pairing
        student_stop, _ = self._stops(view)
        chunk = token_chunks(pairing.student_index.to(device), student_stop.to(device), pairing.mask.to(device),
                             logits.shape[1])
        labels = view.student.labels.to(device)
        in_chunk = chunk >= 0
        if bool((labels[in_chunk] == IGNORE_INDEX).any()):
            raise ValueError("a paired student token is not labelled (labels == -100): the pairing and the labels disagree")
        # One pass over the logits: the chunk tokens, plus the CE's labelled tokens when it is fused.
        read = torch.where(in_chunk, labels, torch.full_like(labels, IGNORE_INDEX))
        if ce_labels is not None:
            ce_labels = ce_labels.to(device)
            read = torch.where(ce_labels != IGNORE_INDEX, ce_labels, read)
        params = self.params
        mask = self._mask("student", logits.shape[-1], device) if params.append_boundary else None
        stats = student_token_stats(logits, read, boundary_mask=mask)
        out = alm(reduced.log_prob, reduced.boundary, reduced.chunk, stats.log_prob, stats.boundary_log_mass, chunk,
                  divergence=params.divergence, binarization_temp=params.binarization_temp, threshold=params.threshold,
                  epsilon=params.epsilon, merge_by_boundary=params.merge_by_boundary,
                  append_boundary=params.append_boundary)
        terms = {"alm": out["alm"]}
        if params.latents:
            terms["latents"] = self._latents(reduced, view, device)
        if ce_labels is not None:
            scored = ce_labels != IGNORE_INDEX
            scored[:, 0] = False
            terms["ce"] = -stats.log_prob[scored].sum()
        return terms

    def _latents(self, reduced: AlmLatentsTeacher, view: TeacherView, device) -> torch.Tensor:
        """The latents sum of one micro-batch: each pair's chunk end on both sides (student projected)."""
        features = view.features or {}
        if HIDDEN not in features or "latents" not in self.trainable:
            raise ValueError("loss 'alm' with latents needs the student's hidden states (TeacherView.features) and "
                             "its projector (attach_modules)")
        student_stop, teacher_stop = (stop.to(device) for stop in self._stops(view))
        pairs = view.pairing.mask.to(device)
        hidden = features[HIDDEN]
        # A chunk's last token sits at its exclusive end row (rows index .. stop - 1 predict it).
        ends = hidden.gather(1, student_stop.clamp(max=hidden.shape[1] - 1).unsqueeze(2).expand(-1, -1, hidden.shape[2]))
        projected = self.trainable["latents"](ends[pairs])  # every micro-batch, on every rank
        index, mask = labelled_positions(view.teacher.labels.to(device))
        column = torch.full(view.teacher.labels.shape, -1, dtype=torch.long, device=device)
        column.scatter_(1, index, torch.where(mask, torch.arange(index.shape[1], device=device).expand_as(index), -1))
        teacher_column = column.gather(1, teacher_stop.clamp(max=column.shape[1] - 1))
        if bool((teacher_column[pairs] < 0).any()):
            raise ValueError("a chunk's last teacher token is not labelled: the pairing and the labels disagree")
        teacher_hidden = reduced.hidden.to(device)
        picked = teacher_hidden.gather(1, teacher_column.clamp(min=0).unsqueeze(2).expand(-1, -1, teacher_hidden.shape[2]))
        return latent_term(projected, picked[pairs])

    # The offline cache: two float32 numbers per labelled teacher position (exactly what teacher()
    # keeps), so a cached teacher gives the live loss up to the teacher forward's own rounding; with
    # latents also the final hidden state there, in the model's dtype.
    def cache_settings(self) -> dict:
        # The stored numbers do not depend on the loss's parameters, only on the teacher's boundary set.
        mask = self._masks["teacher"]
        if mask is None:
            raise ValueError("loss 'alm' needs the teacher tokenizer's token surfaces to describe its cache")
        settings = {"kind": self.name, "boundary_mask": hashlib.sha256(mask.numpy().tobytes()).hexdigest()[:16]}
        return {**settings, "latents": True} if self.params.latents else settings

    def cache_rows(self, view: TeacherView) -> tuple[torch.Tensor, torch.Tensor]:
        return labelled_positions(view.teacher.labels)

    def to_cache(self, reduced: AlmTeacher, view: TeacherView):
        rows = {"log_prob": reduced.log_prob.float(), "boundary": reduced.boundary.float()}
        if self.params.latents:
            rows["hidden"] = reduced.hidden
        return {}, rows

    def from_cache(self, records, rows, view: TeacherView) -> AlmTeacher:
        index, mask = labelled_positions(view.teacher.labels.to(rows["log_prob"].device))
        reduced = AlmTeacher(rows["log_prob"].float() * mask, rows["boundary"].float() * mask,
                             self._teacher_chunks(view, index, mask))
        if self.params.latents:
            return AlmLatentsTeacher(*reduced, rows["hidden"] * mask.unsqueeze(2))
        return reduced
