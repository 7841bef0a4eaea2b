"""The three MultiLevelOT presets: hyper-parameters, term weights and normalisation basis in one place.

The loss functions read the hyper-parameters; the engine reads ``weights`` and ``normalize_by`` and
computes, for one teacher, ``KD = sum_term weights[term] * result[term] / global_count`` where
``global_count`` is the all-reduced ``result[normalize_by]`` (``"tokens"`` or ``"sequences"``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

TERMS = ("had", "sl", "sd")
NORMALIZATION_BASES = ("tokens", "sequences")
RANKINGS = ("sequence", "token")
OFFICIAL = "official"


@dataclass(frozen=True)
class MlotPreset:
    """One named set of MultiLevelOT choices.

    Attributes:
        name: ``"paper"``, ``"official"`` or ``"default"``.
        k: top-k truncation size (paper eq. 12, k = 50).
        ranking: ``"sequence"`` ranks each side by its sequence-summed probabilities, one order for
            every token of the sequence (eq. 10-11, the paper's SR); ``"token"`` sorts each token's
            own distribution, as ULD does (Table 3's TR row, kept for the ablation).
        tau_had: temperature of the probabilities compared by HAD (eq. 14; the paper uses 1).
        tau_sl: temperature of SL (eq. 16, tau_SL = 1).
        tau_sd: temperature of the vectors entering the Sinkhorn cost (eq. 17-20, tau_SD = 2).
        sinkhorn_lambda: entropy weight lambda of eq. 17-18 (0.1).
        sinkhorn_iters: number N of alternating normalisations of eq. 19 (paper 20, released code 10).
        differentiate_sinkhorn: backpropagate through the iterations instead of holding the plan fixed.
        weights: multiplier of each term's sum in the engine's per-teacher KD loss.
        normalize_by: result key whose global count divides the weighted sum.
        std_eps: official only: logits are divided by ``std_over_vocab + std_eps`` before the softmax.
        skip_student_eos: official only: drop the last distilled student token of each sequence.
        chunk_elements: rows are processed in blocks of about this many logits (speed only);
            ``None`` picks a size per device (see :func:`mlot_ds.losses.ranking.block_elements`).
        rationale: why the preset is what it is: its docstring, readable as ``PRESETS[name].rationale``.
    """

    name: str
    weights: Mapping[str, float]
    normalize_by: str
    k: int = 50
    ranking: str = "sequence"
    tau_had: float = 1.0
    tau_sl: float = 1.0
    tau_sd: float = 2.0
    sinkhorn_lambda: float = 0.1
    sinkhorn_iters: int = 20
    differentiate_sinkhorn: bool = False
    std_eps: float | None = None
    skip_student_eos: bool = False
    chunk_elements: int | None = None
    rationale: str = field(default="", repr=False, compare=False)

    def __post_init__(self) -> None:
        if set(self.weights) != set(TERMS):
            raise ValueError(f"preset {self.name!r}: weights must name exactly {TERMS}, got {sorted(self.weights)}")
        object.__setattr__(self, "weights", MappingProxyType(dict(self.weights)))
        if self.normalize_by not in NORMALIZATION_BASES:
            raise ValueError(f"preset {self.name!r}: normalize_by must be one of {NORMALIZATION_BASES}")
        for name in ("k", "sinkhorn_iters") + (("chunk_elements",) if self.chunk_elements is not None else ()):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"preset {self.name!r}: {name} must be a positive int, got {getattr(self, name)!r}")
        for name in ("tau_had", "tau_sl", "tau_sd", "sinkhorn_lambda"):
            if not getattr(self, name) > 0:
                raise ValueError(f"preset {self.name!r}: {name} must be > 0, got {getattr(self, name)!r}")
        if self.ranking not in RANKINGS:
            raise ValueError(f"preset {self.name!r}: ranking must be one of {RANKINGS}, got {self.ranking!r}")
        if self.name == OFFICIAL and self.ranking != "sequence":
            raise ValueError(f"preset {self.name!r}: the released code ranks over the whole batch; ranking "
                             f"{self.ranking!r} exists only in the 'paper' and 'default' presets")
        if self.name != OFFICIAL and (self.std_eps is not None or self.skip_student_eos):
            raise ValueError(f"preset {self.name!r}: std_eps and skip_student_eos exist only in the official preset")

    @property
    def is_official(self) -> bool:
        return self.name == OFFICIAL

    def temperatures(self) -> tuple[float, ...]:
        """Distinct temperatures the terms need, ascending (the ranking is done once per temperature)."""
        return tuple(sorted({self.tau_had, self.tau_sl, self.tau_sd}))


PAPER = MlotPreset(
    name="paper",
    weights={"had": 0.15, "sl": 0.15 * 0.1, "sd": 0.15 * 0.1},
    normalize_by="tokens",
    rationale="""The paper's equations (7)-(21) as written, made exact where the paper leaves room.

Per sequence, on the paired tokens only: each side ranked by its own sequence-summed probabilities
at each term's temperature (HAD at 1, SL at tau_SL = 1, SD at tau_SD = 2), top k = 50, no
renormalisation; SL = -t log s; SD on the n x n cost of the paired tokens with N = 20 row-then-column
normalisations of exp(-C / 0.1) (run in the log domain), plan held fixed in the backward pass.
The default preset computes exactly the same terms; only the weights differ.

Weights are eq. (21)'s alpha = 0.15, alpha*beta and alpha*gamma with beta = gamma = 0.1. Eq. (21)
sums CE and the three terms over the same tokens; dividing both by the token count (the engine's
``normalize_by="tokens"``) changes the effective learning rate only, not the balance of the terms.
""",
)

OFFICIAL_PRESET = MlotPreset(
    name=OFFICIAL,
    weights={"had": 1.5, "sl": 1.5 * 0.1, "sd": 1.5 * 0.1 * 1e-3},
    normalize_by="sequences",
    sinkhorn_iters=10,
    differentiate_sinkhorn=True,
    std_eps=1e-4,
    skip_student_eos=True,
    rationale="""The released code's numerics (2018cx/Multi-Level-OT, ``DistillationLoss``, HEAD).

Weights: ``distil_factor`` 1.5 times the inner 0.1 (SL, SD) and the Sinkhorn's own 1e-3, i.e. the
code's effective multipliers HAD x1.5, SL x0.15, SD x1.5e-4. The deviations it reproduces are
listed in :mod:`mlot_ds.losses.official`, together with the exact mapping of its reductions onto
"sum + global count of sequences".
""",
)

DEFAULT = MlotPreset(
    name="default",
    weights={"had": 1.5, "sl": 0.15, "sd": 7.5e-3},
    normalize_by="tokens",
    rationale="""The paper's semantics with per-token reductions and weights from the released code's scales.

Evidence for the weights (docs/results/dialogsum-default*.md, the zoo with DialogSum): the paper's
alpha = 0.15 per token leaves the student where SFT does (+0.0005 bits per byte, same outputs),
while these weights are the strongest pull towards the teacher of the three presets and measurably
move the student's greedy outputs towards the teacher's. With teachers as weak as the zoo's, that
pull costs gold likelihood (+0.05 bits per byte after one epoch); weights / 3 nearly remove the cost
(set them per teacher with the recipe's ``loss.weights``). SL carries part of the pull and stays. SD
at 7.5e-3 is about 0.1 % of the loss and changed nothing in any run (x100 did not help either); it
stays so the default keeps all three terms of the method. The ablation reproduced the paper's
sequence ranking (better than per-token on every seed) and k = 50 (no loss against no truncation).

Every term is a sum over paired tokens, divided by the global paired-token count, so the loss does
not depend on answer length, batch size, accumulation or world size. The weights translate the
released code's effective multipliers (HAD x1.5, SL x0.15, SD x1.5e-4 on the batch-summed
``sum P*C``) to that per-token basis:

- HAD: the code averages each sequence's per-token sum over its tokens, then over the batch; that is
  already a per-token mean, so the weight stays 1.5.
- SL: the code averages over every (sequence, position) row, a per-token mean: weight 0.15. (Its SL
  has a different form, see ``official``; only the scale is carried over.)
- SD: the code's plan has row sums 1, so ``sum P*C`` of one sequence is about ``Lmax * c`` with ``c``
  the mean transport cost per token, and the code sums it over a batch of 2 without dividing. Our
  plan also has unit row sums, so ``sd / tokens`` is about ``c``, and the matching weight is
  ``1.5e-4 * batch * Lmax``. With batch = 2 and Lmax = 25 tokens, the mean of the larger answer of
  two random answers measured with the GPT-2 tokenizer on QED (11.5) and DialogSum (41.4),
  ``1.5e-4 * 2 * 25 = 7.5e-3``. The code's cost is built from re-softmaxed vectors and is smaller
  than ours, so this weight likely over-weights SD relative to the code; even so it is inert (above).
""",
)

PRESETS: Mapping[str, MlotPreset] = MappingProxyType(
    {preset.name: preset for preset in (PAPER, OFFICIAL_PRESET, DEFAULT)}
)

_NOT_OVERRIDABLE = ("name", "weights", "normalize_by", "rationale")


def overridable_names() -> tuple[str, ...]:
    """Names accepted as ``**overrides`` by the loss functions."""
    return tuple(f.name for f in dataclasses.fields(MlotPreset) if f.name not in _NOT_OVERRIDABLE)


def resolve_preset(preset: str | MlotPreset, overrides: Mapping[str, object]) -> MlotPreset:
    """Return the named preset with ``overrides`` applied; raise ``ValueError`` on unknown names."""
    if isinstance(preset, MlotPreset):
        base = preset
    elif preset in PRESETS:
        base = PRESETS[preset]
    else:
        raise ValueError(f"unknown preset {preset!r}; valid presets: {sorted(PRESETS)}")
    valid = overridable_names()
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ValueError(f"unknown MultiLevelOT override(s) {unknown}; valid names: {list(valid)}")
    return dataclasses.replace(base, **overrides) if overrides else base


__all__ = ["MlotPreset", "PRESETS", "TERMS", "overridable_names", "resolve_preset"]
