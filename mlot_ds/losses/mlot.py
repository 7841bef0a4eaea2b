"""MultiLevelOT for one teacher (Cui et al., AAAI 2025): HAD, SL and SD as batch sums.

For each sequence, on its paired tokens ``i`` (a :class:`~mlot_ds.pairing.Pairing`), at temperature
``tau`` (eq. 1) both sides are ranked by their own sequence-summed probabilities and truncated to
the top ``k`` ids (eq. 10-12, see :mod:`mlot_ds.losses.ranking`), giving ``t^k(i)`` and ``s^k(i)``
(``ranking="token"``, the ablation of Table 3: each token ranked by its own probabilities instead):

    HAD = sum_i sum_l |t^k_l(i) - s^k_l(i)|                          eq. (14), tau = tau_had
    SL  = -sum_i sum_l t^k_l(i) log s^k_l(i)                          eq. (16), tau = tau_sl
    C_ij = sum_l |t^k_l(i) - s^k_l(j)|,  SD = <P^lambda, C>           eq. (17)-(20), tau = tau_sd

``P^lambda`` is N rounds of the row/column normalisation of ``exp(-C / lambda)`` over the valid
pairs (:mod:`mlot_ds.losses.sinkhorn`). Each term is summed over the batch; the engine divides by
the global ``tokens`` (or ``sequences``, see the preset's ``normalize_by``) and applies eq. (21)'s
weights. The work is split so the engine can drop a teacher's logits right after its forward:
:func:`teacher_summary` keeps only the ranked ids and the top-k values, and
:func:`multilevel_ot_from_summary` does the student side.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

from mlot_ds.fields import PositiveFloat, PositiveInt
from mlot_ds.losses.ce import labelled_rows, masked_ce
from mlot_ds.losses.head import (
    ce_per_sequence_from_hidden,
    check_head,
    gold_ce_from_rows,
    head_chunk_rows,
    head_row_statistics,
)
from mlot_ds.losses.method import (
    LogitSource,
    Method,
    MethodContext,
    TeacherOutput,
    TeacherView,
    gold_if,
)
from mlot_ds.losses.presets import PRESETS, MlotPreset, resolve_preset
from mlot_ds.losses.ranking import (
    StudentTopK,
    block_elements,
    build_row_set,
    compute_dtype_for,
    gather_log_probs,
    row_statistics,
    token_ranked_log_probs,
)
from mlot_ds.losses.sinkhorn import sinkhorn_distance
from mlot_ds.pairing import Pairing, position_pairing


class TeacherSummary(NamedTuple):
    """What the student side needs from one teacher's logits.

    Attributes:
        temperatures: the ``G`` distinct temperatures, ascending (official preset: the span softmax only).
        indices: ``[G, B, k]`` long, teacher vocabulary ids ranked by the sequence-summed
            probabilities (official preset: by the batch-summed ones, the same row for every ``b``;
            ``ranking="token"``: ``[G, B, P, k]``, each pair's own ranking).
        values: ``[G, B, P, k]`` float32 (float64 for float64 logits), ``t^k`` of every pair (0 on
            padded pairs). Official preset: the teacher's whole answer span, ``P`` = longest span.

    A cache can store it as is; nothing in it refers back to the teacher's logits.
    """

    temperatures: tuple[float, ...]
    indices: torch.Tensor
    values: torch.Tensor


def _check_logits(name: str, logits: torch.Tensor, k: int) -> None:
    if logits.dim() != 3 or not logits.is_floating_point():
        raise ValueError(f"{name} must be a float [B, T, V] tensor, got {logits.dtype} {tuple(logits.shape)}")
    if k > logits.shape[2]:
        raise ValueError(f"k={k} exceeds the vocabulary size {logits.shape[2]} of {name}")


def _check_rows(side: str, pairing, length: int) -> None:
    if not isinstance(pairing, Pairing):
        raise ValueError(f"pairing must be a mlot_ds.pairing.Pairing for this preset, got {type(pairing).__name__}")
    index, mask = (pairing.student_index if side == "student" else pairing.teacher_index), pairing.mask
    if index.shape != mask.shape or mask.dtype != torch.bool:
        raise ValueError(f"pairing.{side}_index {tuple(index.shape)} and a bool mask of the same shape expected")
    real = index[mask]
    if real.numel() and (int(real.min()) < 0 or int(real.max()) >= length):
        raise ValueError(f"pairing.{side}_index out of range [0, {length}): {int(real.min())}..{int(real.max())}")


def _resolve(preset, overrides) -> MlotPreset:
    cfg = resolve_preset(preset, overrides)
    if cfg.is_official:
        raise ValueError("the official preset is its own method: use mlot_ds.losses.official (loss kind 'official')")
    return cfg


def teacher_summary(teacher_logits: torch.Tensor, pairing: Pairing, *, preset="default", **overrides) -> TeacherSummary:
    """Rank and truncate the teacher side (eq. 10-12) and keep the top-k values of every pair.

    Args:
        teacher_logits: ``[B, Tt, m]`` logits (any float dtype; float32 inside). Never modified.
        pairing: the pairing.
        preset, overrides: as :func:`multilevel_ot`.

    Returns:
        A :class:`TeacherSummary`; no autograd graph, no full-vocabulary tensor kept.
    """
    cfg = _resolve(preset, overrides)
    _check_logits("teacher_logits", teacher_logits, cfg.k)
    with torch.no_grad():
        batch, seq_len, vocab = teacher_logits.shape
        _check_rows("teacher", pairing, seq_len)
        temperatures = cfg.temperatures()
        inv = tuple(1.0 / t for t in temperatures)
        logits2d = teacher_logits.reshape(batch * seq_len, vocab)
        if cfg.ranking == "token":
            rows_per_block = max(1, block_elements(cfg.chunk_elements, teacher_logits.device) // vocab)
            return token_ranked_summary(lambda rows: logits2d.index_select(0, rows), pairing, seq_len, temperatures,
                                        cfg.k, rows_per_block, compute_dtype_for(teacher_logits.dtype))
        row_set = build_row_set(pairing.teacher_index, pairing.mask, seq_len)
        lse, sums = row_statistics(logits2d, row_set, batch, inv, cfg.chunk_elements)
        indices = sums.topk(cfg.k, dim=2).indices
        flat = gather_log_probs(logits2d, row_set, lse, indices, inv).exp_()
        values = flat.new_zeros(len(temperatures), *pairing.mask.shape, cfg.k)
        values[:, pairing.mask] = flat
    return TeacherSummary(temperatures, indices, values)


def multilevel_ot_from_summary(
    student_logits: torch.Tensor,
    summary: TeacherSummary,
    pairing: Pairing,
    *,
    preset="default",
    student_labels: torch.Tensor | None = None,
    **overrides,
) -> dict[str, torch.Tensor]:
    """Student side of MultiLevelOT: HAD, SL and SD sums against a :class:`TeacherSummary`.

    Args:
        student_logits: ``[B, Ts, n]`` logits (grad flows into them; never modified).
        summary: from :func:`teacher_summary` with the same preset and overrides.
        pairing: the pairing the summary was built with.
        student_labels: if given (``[B, Ts]``, HF unshifted, -100 ignored), the result also holds
            ``ce`` (summed cross-entropy) and ``ce_tokens``, computed from the same log-sum-exp and
            written into the same gradient tensor as the MultiLevelOT terms.

    Returns:
        ``{"had", "sl", "sd", "tokens", "sequences"}`` float32 tensors (plus ``ce``, ``ce_tokens``).
    """
    cfg = _resolve(preset, overrides)
    _check_logits("student_logits", student_logits, cfg.k)
    expected = cfg.temperatures()
    built_ranking = "token" if summary.indices.dim() == 4 else "sequence"
    if summary.temperatures != expected or summary.indices.shape[-1] != cfg.k or built_ranking != cfg.ranking:
        raise ValueError(
            f"summary was built for temperatures {summary.temperatures}, k={summary.indices.shape[-1]} and "
            f"ranking={built_ranking!r}, but preset {cfg.name!r} needs {expected}, k={cfg.k} and "
            f"ranking={cfg.ranking!r}: use the same preset and overrides"
        )
    batch, seq_len, vocab = student_logits.shape
    _check_rows("student", pairing, seq_len)
    if summary.values.shape[1:3] != pairing.mask.shape:
        raise ValueError(f"summary values {tuple(summary.values.shape)} do not match the pairing {tuple(pairing.mask.shape)}")

    if cfg.ranking == "token":
        return _token_ranked_student(student_logits, summary, pairing, cfg, student_labels)
    temperatures = summary.temperatures
    ce_slot = ce_target = torch.zeros(0, dtype=torch.long, device=student_logits.device)
    extra_rows = None
    if student_labels is not None:
        # CE needs the temperature-1 log-normaliser as group 0 (see StudentTopK).
        temperatures = (1.0,) + tuple(t for t in temperatures if t != 1.0)
        extra_rows, ce_target = _ce_rows(student_labels, student_logits.shape)
    inv = tuple(1.0 / t for t in temperatures)
    row_set = build_row_set(pairing.student_index, pairing.mask, seq_len, extra_rows)
    if extra_rows is not None:
        ce_slot = torch.searchsorted(row_set.rows, extra_rows)
    log_probs, ce_sum, _ = StudentTopK.apply(
        student_logits, row_set, inv, cfg.k, ce_slot, ce_target, cfg.chunk_elements
    )
    student_log_probs = {t: log_probs[temperatures.index(t)] for t in summary.temperatures}
    teacher_values = {t: summary.values[g] for g, t in enumerate(summary.temperatures)}
    result = _terms(teacher_values, student_log_probs, pairing.mask, cfg)
    if student_labels is not None:
        result["ce"] = ce_sum
        result["ce_tokens"] = torch.tensor(float(ce_slot.numel()), device=student_logits.device)
    return result


def multilevel_ot(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_labels: torch.Tensor,
    teacher_labels: torch.Tensor,
    *,
    pairing: Pairing | None = None,
    preset="default",
    with_ce: bool = False,
    **overrides,
) -> dict[str, torch.Tensor]:
    """MultiLevelOT terms of one teacher, each summed over the batch (eq. 14, 16, 20).

    Args:
        student_logits: ``[B, Ts, n]``; teacher_logits: ``[B, Tt, m]`` (any float dtypes).
        student_labels, teacher_labels: ``[B, Ts]``, ``[B, Tt]`` HF unshifted labels, -100 = not distilled.
        pairing: replaces the ``position`` rule built from the labels.
        preset: ``"paper"``, ``"default"`` or a :class:`MlotPreset` (the released code's numerics are
            :func:`mlot_ds.losses.official.official_multilevel_ot`).
        with_ce: also return the student's summed ``ce`` and ``ce_tokens`` (fused, see above).
        overrides: hyper-parameters of :class:`MlotPreset` (``k``, ``tau_sl``, ``tau_sd``,
            ``sinkhorn_lambda``, ``sinkhorn_iters``, ...); unknown names raise ``ValueError``.

    Returns:
        ``{"had", "sl", "sd", "tokens", "sequences"}``: float32 scalars; ``tokens`` = paired tokens,
        ``sequences`` = sequences with at least one pair. Example::

            out = multilevel_ot(s_logits, t_logits, s_labels, t_labels)
            kd = sum(PRESETS["default"].weights[t] * out[t] for t in TERMS) / out["tokens"]
    """
    cfg = _resolve(preset, overrides)
    for name, labels, logits in (("student", student_labels, student_logits), ("teacher", teacher_labels, teacher_logits)):
        if labels.shape != logits.shape[:2]:
            raise ValueError(f"{name}_labels {tuple(labels.shape)} must match {name}_logits[:2] {tuple(logits.shape[:2])}")
    if pairing is None:
        pairing = position_pairing(student_labels, teacher_labels)
    summary = teacher_summary(teacher_logits, pairing, preset=cfg)
    return multilevel_ot_from_summary(
        student_logits, summary, pairing, preset=cfg, student_labels=student_labels if with_ce else None
    )


def token_ranked_summary(read_rows, pairing: Pairing, seq_len: int, temperatures: tuple[float, ...], k: int,
                         rows_per_block: int, dtype: torch.dtype) -> TeacherSummary:
    """Teacher side with ``ranking="token"``: each pair's own top-k, ``rows_per_block`` rows at a time.

    ``read_rows(flat_rows)`` returns the ``[r, m]`` logits of flat rows ``b * Tt + t`` (from full
    logits, or from the hidden states and the output layer); nothing larger than one block is held.
    """
    batch = pairing.mask.shape[0]
    offsets = torch.arange(batch, device=pairing.mask.device).unsqueeze(1) * seq_len
    flat_rows = (pairing.teacher_index + offsets)[pairing.mask]
    inv = tuple(1.0 / t for t in temperatures)
    indices = torch.zeros(len(temperatures), *pairing.mask.shape, k, dtype=torch.long, device=pairing.mask.device)
    values = torch.zeros(len(temperatures), *pairing.mask.shape, k, dtype=dtype, device=pairing.mask.device)
    ids, log_probs = [], []
    for start in range(0, flat_rows.numel(), rows_per_block):
        block_ids, block_log_probs = token_ranked_log_probs(read_rows(flat_rows[start : start + rows_per_block]), inv, k)
        ids.append(block_ids)
        log_probs.append(block_log_probs.to(dtype))
    if ids:
        indices[:, pairing.mask] = torch.cat(ids).unsqueeze(0)
        values[:, pairing.mask] = torch.cat(log_probs, dim=1).exp_()
    return TeacherSummary(temperatures, indices, values)


def _token_ranked_student(student_logits, summary: TeacherSummary, pairing: Pairing, cfg: MlotPreset,
                          student_labels) -> dict[str, torch.Tensor]:
    """Student side with ``ranking="token"``: plain autograd on the ``[N, n]`` paired rows (an ablation
    path: it holds those rows' softmax for the backward, which the sequence ranking never does)."""
    batch, seq_len, vocab = student_logits.shape
    offsets = torch.arange(batch, device=student_logits.device).unsqueeze(1) * seq_len
    flat_rows = (pairing.student_index + offsets)[pairing.mask]
    inv = tuple(1.0 / t for t in summary.temperatures)
    _, log_probs = token_ranked_log_probs(student_logits.reshape(batch * seq_len, vocab)[flat_rows], inv, cfg.k)
    student_log_probs = {t: log_probs[g] for g, t in enumerate(summary.temperatures)}
    teacher_values = {t: summary.values[g] for g, t in enumerate(summary.temperatures)}
    result = _terms(teacher_values, student_log_probs, pairing.mask, cfg)
    if student_labels is not None:
        result.update(_plain_ce(student_logits, student_labels))
    return result


def _terms(teacher_values, student_log_probs, mask, cfg: MlotPreset) -> dict[str, torch.Tensor]:
    """HAD, SL, SD sums from ``t^k`` ([B, P, k] per temperature) and flat ``log s^k`` ([N, k])."""
    had = (teacher_values[cfg.tau_had][mask] - student_log_probs[cfg.tau_had].exp()).abs().sum()  # eq. 14
    sl = -(teacher_values[cfg.tau_sl][mask] * student_log_probs[cfg.tau_sl]).sum()  # eq. 16
    teacher_sd = teacher_values[cfg.tau_sd]
    student_sd = teacher_sd.new_zeros(teacher_sd.shape).masked_scatter(
        mask.unsqueeze(2).expand_as(teacher_sd), student_log_probs[cfg.tau_sd].exp()
    )
    cost = torch.cdist(teacher_sd, student_sd, p=1)  # C_ij of eq. 17, rows teacher, columns student
    sd = sinkhorn_distance(
        cost,
        mask,
        mask,
        sinkhorn_lambda=cfg.sinkhorn_lambda,
        sinkhorn_iters=cfg.sinkhorn_iters,
        differentiate=cfg.differentiate_sinkhorn,
    ).sum()
    return {
        "had": had,
        "sl": sl,
        "sd": sd,
        "tokens": mask.sum().to(torch.float32),
        "sequences": mask.any(dim=1).sum().to(torch.float32),
    }


def _ce_rows(labels: torch.Tensor, logits_shape) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat rows ``b * T + t`` whose next label is distilled, and those labels (HF shift)."""
    if labels.shape != logits_shape[:2]:
        raise ValueError(f"student_labels {tuple(labels.shape)} must match student_logits[:2] {tuple(logits_shape[:2])}")
    return labelled_rows(labels)


def _plain_ce(student_logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    out = masked_ce(student_logits, labels)
    return {"ce": out["ce"], "ce_tokens": out["tokens"]}


def teacher_summary_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    pairing,
    *,
    preset="default",
    ce_labels: torch.Tensor | None = None,
    head_chunk_elements: int | None = None,
    **overrides,
) -> tuple[TeacherSummary, dict[str, torch.Tensor] | None]:
    """:func:`~mlot_ds.losses.mlot.teacher_summary` of the logits ``h W^T + b``, never materialised.

    Args:
        hidden: ``[B, Tt, H]`` final hidden states; weight ``[m, H]``, bias ``[m]`` or ``None``.
        pairing: as ``teacher_summary``.
        ce_labels: ``[B, Tt]`` HF unshifted labels: also return the teacher's gold-response CE per
            sequence, ``{"ce": [B], "tokens": [B]}`` (from the same pass over the output layer).
        head_chunk_elements: logits per chunk (see :func:`head_chunk_rows`).

    Returns:
        ``(summary, gold)``; ``gold`` is ``None`` without ``ce_labels``.
    """
    cfg = _resolve(preset, overrides)
    check_head(hidden, weight, bias)
    batch, seq_len, _ = hidden.shape
    if cfg.k > weight.shape[0]:
        raise ValueError(f"k={cfg.k} exceeds the vocabulary size {weight.shape[0]} of the teacher's output layer")
    gold = None
    with torch.no_grad():
        if not isinstance(pairing, Pairing) or pairing.teacher_index.shape != pairing.mask.shape:
            raise ValueError("pairing must be a mlot_ds.pairing.Pairing with [B, P] teacher_index and mask")
        real = pairing.teacher_index[pairing.mask]
        if real.numel() and (int(real.min()) < 0 or int(real.max()) >= seq_len):
            raise ValueError(f"pairing.teacher_index out of range [0, {seq_len}): {int(real.min())}..{int(real.max())}")
        temperatures = cfg.temperatures()
        groups = temperatures if ce_labels is None or 1.0 in temperatures else temperatures + (1.0,)
        ce_rows = ce_targets = None
        if ce_labels is not None:
            if ce_labels.shape != (batch, seq_len):
                raise ValueError(f"ce_labels {tuple(ce_labels.shape)} must be [B, T] = {(batch, seq_len)}")
            ce_rows, ce_targets = labelled_rows(ce_labels)
        hidden2d = hidden.reshape(batch * seq_len, -1)
        if cfg.ranking == "token":
            rows_per_block = head_chunk_rows(weight.shape[0], head_chunk_elements, hidden.device)
            summary = token_ranked_summary(lambda rows: F.linear(hidden2d.index_select(0, rows), weight, bias), pairing,
                                           seq_len, temperatures, cfg.k, rows_per_block, compute_dtype_for(weight.dtype))
            if ce_labels is not None:
                gold = ce_per_sequence_from_hidden(hidden, weight, bias, ce_labels, head_chunk_elements=head_chunk_elements)
            return summary, gold
        row_set = build_row_set(pairing.teacher_index, pairing.mask, seq_len, ce_rows)
        inv = tuple(1.0 / t for t in groups)
        lse, sums = head_row_statistics(hidden2d, weight, bias, row_set, batch, inv,
                                        head_chunk_elements=head_chunk_elements, chunk_elements=cfg.chunk_elements)
        indices = sums[: len(temperatures)].topk(cfg.k, dim=2).indices  # [G, B, k]
        del sums
        # z at the ranked ids of each pair's own sequence: [G, B, P, H] x [G, B, H, k].
        pair_hidden = hidden.gather(1, pairing.teacher_index.unsqueeze(2).expand(-1, -1, hidden.shape[2]))
        ranked_weight = weight[indices]  # [G, B, k, H]
        z_at = torch.matmul(pair_hidden.unsqueeze(0), ranked_weight.transpose(2, 3))
        if bias is not None:
            z_at = z_at + bias[indices].unsqueeze(2)
        slot = torch.zeros(pairing.mask.shape, dtype=torch.long, device=hidden.device)
        slot[pairing.mask] = row_set.pair_slot
        inv_t = torch.tensor(inv[: len(temperatures)], dtype=lse.dtype, device=hidden.device).view(-1, 1, 1, 1)
        values = (z_at.to(lse.dtype) * inv_t - lse[: len(temperatures), slot].unsqueeze(3)).exp_()
        values = values * pairing.mask.unsqueeze(0).unsqueeze(3)
        if ce_labels is not None:
            ce_slot = torch.searchsorted(row_set.rows, ce_rows)
            gold = gold_ce_from_rows(hidden2d, weight, bias, lse[groups.index(1.0)], ce_slot, ce_rows, ce_targets, batch, seq_len)
    return TeacherSummary(temperatures, indices, values), gold


@dataclass(frozen=True)
class MlotParams:
    """MultiLevelOT's hyper-parameters in the recipe (``loss: {kind: mlot, k: 50, ...}``); see
    :class:`~mlot_ds.losses.presets.MlotPreset` for each one's meaning and equation."""

    preset: Literal["default", "paper"] = "default"
    """Which term weights are the defaults: ``default`` (per-token, from the released code's scales)
    or ``paper`` (eq. 21's alpha = 0.15, beta = gamma = 0.1)."""
    k: PositiveInt = 50
    ranking: Literal["sequence", "token"] = "sequence"
    tau_had: PositiveFloat = 1.0
    tau_sl: PositiveFloat = 1.0
    tau_sd: PositiveFloat = 2.0
    sinkhorn_lambda: PositiveFloat = 0.1
    sinkhorn_iters: PositiveInt = 20
    differentiate_sinkhorn: bool = False
    chunk_elements: PositiveInt | None = None

    def to_preset(self) -> MlotPreset:
        fields = {name: getattr(self, name) for name in self.__dataclass_fields__ if name != "preset"}
        base = PRESETS[self.preset]
        changed = {name: value for name, value in fields.items() if getattr(base, name) != value}
        return resolve_preset(base, changed)


class MultiLevelOT(Method):
    """MultiLevelOT (Cui et al., AAAI 2025) with the paper's semantics: HAD, SL, SD per paired token."""

    name = "mlot"
    Params = MlotParams
    terms = ("had", "sl", "sd")
    denominator = "pairs"
    fuses_ce = True
    description = "MultiLevelOT: sequence-ranked top-k HAD + SL + Sinkhorn SD (Cui et al. 2025)"

    def __init__(self, params=None, weights=None, context=None):

        super().__init__(params, weights, context or MethodContext())
        self.preset = self.params.to_preset()

    @classmethod
    def default_weights(cls, params) -> dict[str, float]:
        return dict(PRESETS[params.preset].weights)

    @classmethod
    def cache_problem(cls, params) -> str | None:
        if params.ranking != "sequence":
            return f"a cache stores one ranking per record; ranking {params.ranking!r} needs source 'live'"
        return None

    @classmethod
    def check(cls, params, context) -> None:
        params.to_preset()  # the preset's own checks (ranges, names)

    def teacher(self, source: LogitSource, view: TeacherView, gold: bool) -> TeacherOutput:
        if source.logits is not None:
            return TeacherOutput(teacher_summary(source.logits, view.pairing, preset=self.preset),
                                 gold_if(source, view.teacher.labels, gold))
        summary, gold_ce = teacher_summary_from_hidden(
            source.hidden, source.weight, source.bias, view.pairing, preset=self.preset,
            ce_labels=view.teacher.labels if gold else None, head_chunk_elements=source.head_chunk_elements)
        return TeacherOutput(summary, gold_ce)

    def student(self, logits, reduced: TeacherSummary, view: TeacherView, ce_labels=None) -> dict[str, torch.Tensor]:
        out = multilevel_ot_from_summary(logits, reduced, view.pairing, preset=self.preset, student_labels=ce_labels)
        return {name: out[name] for name in self.terms + (("ce",) if ce_labels is not None else ())}

    def cache_settings(self) -> dict:
        return {"kind": self.name, "k": self.preset.k, "temperatures": list(self.preset.temperatures())}

    def to_cache(self, reduced: TeacherSummary, view: TeacherView):
        # Per record: the ranked ids of each temperature [B, G, k]; per pair: t^k [B, P, G, k] in bf16.
        return ({"indices": reduced.indices.permute(1, 0, 2).to(torch.int32)},
                {"values": reduced.values.permute(1, 2, 0, 3).to(torch.bfloat16)})

    def from_cache(self, records, rows, view: TeacherView) -> TeacherSummary:
        return TeacherSummary(self.preset.temperatures(), records["indices"].long().permute(1, 0, 2),
                              rows["values"].float().permute(2, 0, 1, 3))
