"""DistillationData: one record set, tokenized once per model, served as paired micro-batches.

Every model (the student and each teacher) tokenizes the same records with its own tokenizer and
template; one sampler decides which records form each step, so all models see the same records in
the same order, row for row.

Few-shot examples: the example pool is the first ``max(template.few_shot)`` records (over all
models); they are removed from training, and each model's prompt uses the first
``template.few_shot`` of them.

Dropped records (counted in ``dropped``, on top of the loader's counts): a record whose response
plus EOS plus one prompt token does not fit ``max_length`` for some model
(``response_too_long:<model>``, counted once, under the first such model, student first), or whose
response gives no tokens (``empty_response_tokens:<model>``). Overlong prompts are cut from the
left, keeping leading special tokens (BOS).

EOS policy: every model's labels end with its EOS when ``append_eos`` (the CE term uses it). The
final EOS enters the *pairing* only if the student's ``distill_final_eos`` is set, and then on
both sides (a student EOS pairs with a teacher EOS, never with a text token); for ``offsets``
and ``dtw`` it is one extra pair, added when both sides append an EOS.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from mlot_ds.data.batch import Batch, ModelBatch
from mlot_ds.data.encode import encode_model, pair_responses, records_fingerprint
from mlot_ds.data.records import RecordSet
from mlot_ds.data.sampler import FILLER, LengthGroupedSteps
from mlot_ds.data.templates import Template
from mlot_ds.pairing.overlaps import token_overlaps
from mlot_ds.pairing.position import IGNORE_INDEX, position_pairing
from mlot_ds.pairing.types import Pairing, pack_pairs
from mlot_ds.pairing.vocab_map import mined_vocab_map

PAIRING_RULES = ("position", "offsets", "dtw")


@dataclass
class ModelSide:
    """One model's tokenizer and prompt settings (from the recipe).

    Attributes:
        name: ``"student"`` or the teacher's name.
        tokenizer: the model's tokenizer (see :func:`mlot_ds.data.load_tokenizer`).
        template: how its prompt is written.
        pairing: teachers: ``"position"``, ``"offsets"`` or ``"dtw"``; the student: ``None``.
        append_eos: end every sequence with the tokenizer's EOS (labelled for CE).
        distill_final_eos: student only: also pair the final EOS for distillation (a teacher's
            own value is ignored: its EOS is paired exactly when the student's is).
        model_vocab_size: embedding rows of the model, when they exceed ``len(tokenizer)``.
    """

    name: str
    tokenizer: PreTrainedTokenizerBase
    template: Template
    pairing: str | None = None
    views: frozenset = frozenset()
    """Teachers: the extra alignment views its method reads, among ``"groups"`` (each pair's offsets
    group) and ``"overlaps"`` (per student token, the teacher tokens overlapping its bytes)."""
    append_eos: bool = True
    distill_final_eos: bool = False
    model_vocab_size: int | None = None


def _check_sides(student: ModelSide, teachers: list[ModelSide]) -> None:
    if student.pairing is not None:
        raise ValueError(f"student {student.name!r}: pairing must be None (it is set per teacher)")
    names = [student.name] + [t.name for t in teachers]
    if len(set(names)) != len(names):
        raise ValueError(f"model names must be unique, got {names}")
    for side in [student] + teachers:
        if side is not student:
            if side.pairing not in PAIRING_RULES:
                raise ValueError(f"teacher {side.name!r}: pairing must be one of {PAIRING_RULES}, got {side.pairing!r}")
        size = len(side.tokenizer)
        if side.model_vocab_size is not None and side.model_vocab_size < size:
            raise ValueError(
                f"{side.name}: model_vocab_size {side.model_vocab_size} < len(tokenizer) {size}: "
                "the tokenizer can produce ids the model has no embedding for"
            )


def _filler_teacher_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """Teacher id for student embedding rows that have no token: a token a model rarely predicts."""
    for candidate in (tokenizer.unk_token_id, tokenizer.pad_token_id):
        if candidate is not None and candidate != tokenizer.eos_token_id:
            return int(candidate)
    return 0


class DistillationData:
    """Tokenized, paired and sampled records for one run (see the module docstring).

    Attributes:
        num_records: training records kept.
        dropped: reason -> count, loader drops included.
        steps_per_epoch: global steps per epoch, ``ceil(num_records / G)``.
        vocab_maps: ``dtw`` teacher name -> ``[n]`` long MinED map, ``n`` = the student's embedding
            rows. Rows beyond ``len(student tokenizer)`` (never a target) map to the teacher's UNK,
            else its PAD, else id 0: every value is a valid teacher id, as the MinED loss requires.
        truncated_prompts: model name -> number of kept records whose prompt was cut.
        separate_responses: model name -> number of kept records whose response could not be
            cut from the prompt + response encoding (a token straddles the boundary) and was
            tokenized alone, its dummy prefix removed (see :mod:`mlot_ds.data.tokenize`).
    """

    def __init__(
        self,
        records: RecordSet,
        student: ModelSide,
        teachers: list[ModelSide],
        *,
        max_length: int,
        micro_batch_size: int,
        grad_accum: int,
        world_size: int,
        rank: int,
        seed: int,
        cache_dir: Path | None,
        progress: bool = True,
        megabatch_steps: int = 50,
    ):
        _check_sides(student, teachers)
        for label, value in (("max_length", max_length), ("micro_batch_size", micro_batch_size),
                             ("grad_accum", grad_accum), ("world_size", world_size)):
            if value < 1:
                raise ValueError(f"{label} must be >= 1, got {value}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.student, self.teachers = student, list(teachers)
        self.sides = [student] + self.teachers
        self.micro_batch_size, self.grad_accum = micro_batch_size, grad_accum
        self.world_size, self.rank = world_size, rank
        cache_dir = Path(cache_dir) if cache_dir is not None else None

        pool = max(side.template.few_shot for side in self.sides)
        examples, train = records.records[:pool], records.records[pool:]
        if len(examples) < pool:
            raise ValueError(f"few_shot asks for {pool} examples but there are only {len(records.records)} records")
        if not train:
            raise ValueError(f"no training records: {len(records.records)} records, {pool} used as few-shot examples")
        self.dropped = Counter(records.dropped)
        base = datasets.Dataset.from_dict(
            {"id": [r.id for r in train], "prompt": [r.prompt for r in train], "response": [r.response for r in train]}
        )
        base_fingerprint = records_fingerprint(train)

        self._encoded: dict[str, datasets.Dataset] = {}
        fingerprints: dict[str, str] = {}
        shared: dict[str, datasets.Dataset] = {}
        for side in self.sides:
            self._encoded[side.name], fingerprints[side.name] = encode_model(
                base, base_fingerprint, name=side.name, tokenizer=side.tokenizer, template=side.template,
                examples=examples, append_eos=side.append_eos, max_length=max_length,
                cache_dir=cache_dir / "tokenized" if cache_dir else None, progress=progress, memo=shared,
            )

        keep = np.ones(len(train), dtype=bool)
        for side in self.sides:
            encoded = self._encoded[side.name]
            empty = np.asarray(encoded["response_length"]) == 0
            too_long = ~np.asarray(encoded["fits"], dtype=bool) & ~empty
            self.dropped[f"empty_response_tokens:{side.name}"] += int((keep & empty).sum())
            self.dropped[f"response_too_long:{side.name}"] += int((keep & too_long).sum())
            keep &= ~(empty | too_long)
            self._warn_round_trip(side, encoded)
        self.dropped = Counter({k: v for k, v in self.dropped.items() if v})
        self._kept = np.nonzero(keep)[0]
        self.num_records = len(self._kept)
        if self.num_records == 0:
            raise ValueError(f"no training records left after filtering (dropped: {dict(self.dropped)})")
        self._record_ids = np.asarray([r.id for r in train], dtype=np.int64)
        self.truncated_prompts = {
            side.name: int(np.asarray(self._encoded[side.name]["prompt_truncated"], dtype=bool)[self._kept].sum())
            for side in self.sides
        }
        self.separate_responses = {
            side.name: int((np.asarray(self._encoded[side.name]["tokenization"]) == "alone")[self._kept].sum())
            for side in self.sides
        }
        for side in self.sides:
            if self.separate_responses[side.name]:
                warnings.warn(
                    f"{side.name}: for {self.separate_responses[side.name]} of {self.num_records} records a token "
                    "straddles the end of the prompt, so the response was tokenized on its own (dummy prefix removed)",
                    stacklevel=2,
                )

        self._pairs: dict[str, datasets.Dataset] = {}
        for teacher in self.teachers:
            if teacher.pairing in ("offsets", "dtw"):
                self._pairs[teacher.name] = pair_responses(
                    self._encoded[student.name], fingerprints[student.name],
                    self._encoded[teacher.name], fingerprints[teacher.name],
                    rule=teacher.pairing, student_tokenizer=student.tokenizer, teacher_tokenizer=teacher.tokenizer,
                    teacher_name=teacher.name, cache_dir=cache_dir / "pairs" if cache_dir else None, progress=progress,
                )
        self.vocab_maps: dict[str, torch.Tensor] = {}
        student_rows = max(len(student.tokenizer), student.model_vocab_size or 0)
        for teacher in self.teachers:
            if teacher.pairing == "dtw":
                mapping = mined_vocab_map(
                    student.tokenizer, teacher.tokenizer, cache_dir / "vocab_maps" if cache_dir else None, progress=progress
                )
                padding = torch.full((student_rows - len(mapping),), _filler_teacher_id(teacher.tokenizer), dtype=torch.long)
                self.vocab_maps[teacher.name] = torch.cat([mapping, padding])

        self._label_counts = self.column(student.name, "response_length") + int(student.append_eos)
        self._pair_counts = {t.name: self._count_pairs(t) for t in self.teachers}
        lengths = self.column(student.name, "prompt_length") + self._label_counts
        self._sampler = LengthGroupedSteps(
            lengths, micro_batch_size * grad_accum * world_size, seed, megabatch_steps
        )
        self.steps_per_epoch = self._sampler.steps_per_epoch

    # ----------------------------------------------------------------------------------------
    def column(self, name: str, column: str) -> np.ndarray:
        """A per-record integer column of model ``name``, over the kept records."""
        return np.asarray(self._encoded[name][column], dtype=np.int64)[self._kept]

    def record_tokens(self, name: str, position: int) -> dict:
        """Model ``name``'s tokenization of kept record ``position``: ``prompt_ids`` (as fed, after
        truncation), ``response_ids``, ``spans`` (byte spans of the response tokens),
        ``offsets_method`` and ``tokenization``."""
        row = self._encoded[name][int(self._kept[position])]
        return {
            "prompt_ids": list(row["prompt_ids"]), "response_ids": list(row["response_ids"]),
            "spans": list(zip(row["span_starts"], row["span_ends"])), "offsets_method": row["offsets_method"],
            "tokenization": row["tokenization"],
        }

    def _eos_paired(self, side: ModelSide) -> bool:
        return self.student.distill_final_eos and side.append_eos

    def _count_pairs(self, teacher: ModelSide) -> np.ndarray:
        if teacher.pairing == "position":
            student_n = self.column(self.student.name, "response_length") + int(self._eos_paired(self.student))
            teacher_n = self.column(teacher.name, "response_length") + int(self._eos_paired(teacher))
            return np.minimum(student_n, teacher_n)
        eos_pair = int(self._eos_paired(self.student) and self._eos_paired(teacher))
        pairs = self._pairs[teacher.name]["pair_student"]
        return np.asarray([len(p) for p in pairs], dtype=np.int64)[self._kept] + eos_pair

    @staticmethod
    def _warn_round_trip(side: ModelSide, encoded: datasets.Dataset) -> None:
        mismatched = int((~np.asarray(encoded["decodes_back"], dtype=bool)).sum())
        if mismatched:
            warnings.warn(
                f"{side.name}: for {mismatched} of {len(encoded)} records the response token ids do not decode back "
                "to the response text exactly (a normalising tokenizer?); offsets pairing stays exact, other "
                "rules compare what the tokenizer produced",
                stacklevel=3,
            )

    # ----------------------------------------------------------------------------------------
    def _step_positions(self, epoch: int, step: int) -> np.ndarray:
        return self._sampler.step(epoch, step)

    def micro_batches(self, epoch: int, step: int) -> list[Batch]:
        """This rank's ``grad_accum`` micro-batches of global step ``step`` (0-based) of ``epoch``.

        Micro-batch ``a`` of rank ``r`` holds the records ``k * B .. (k + 1) * B - 1`` of the
        step's length-sorted list, with ``k = a * world_size + r`` (so ranks get records of
        similar length at each accumulation step).
        """
        positions = self._step_positions(epoch, step)
        size = self.micro_batch_size
        chunks = [(a * self.world_size + self.rank) * size for a in range(self.grad_accum)]
        return [self.collate(positions[k : k + size], positions[0]) for k in chunks]

    def global_counts(self, epoch: int, step: int) -> dict[str, int]:
        """Loss denominators over all ranks and micro-batches of a step (no communication)."""
        positions = self._step_positions(epoch, step)
        real = positions[positions != FILLER]
        counts = {"student_tokens": int(self._label_counts[real].sum()), "sequences": int(real.size)}
        for teacher in self.teachers:
            pairs = self._pair_counts[teacher.name][real]
            counts[f"{teacher.name}/pairs"] = int(pairs.sum())
            counts[f"{teacher.name}/sequences"] = int((pairs > 0).sum())
        return counts

    # ----------------------------------------------------------------------------------------
    def collate(self, positions: np.ndarray, filler_source: int) -> Batch:
        """One micro-batch of kept-record ``positions``; ``FILLER`` entries repeat record ``filler_source``
        with every label ignored (so a rank with nothing left still runs every forward)."""
        is_real = positions != FILLER
        rows = [int(self._kept[p if p != FILLER else filler_source]) for p in positions]
        fetched = {side.name: self._encoded[side.name][rows] for side in self.sides}
        tensors = {side.name: self._model_batch(side, fetched[side.name], is_real) for side in self.sides}
        student_batch = tensors[self.student.name]
        pairings: dict[str, Pairing] = {}
        for teacher in self.teachers:
            if teacher.pairing == "position":
                pairings[teacher.name] = position_pairing(
                    self._pairing_labels(self.student, student_batch.labels),
                    self._pairing_labels(teacher, tensors[teacher.name].labels),
                )
            else:
                pairings[teacher.name] = self._pack_response_pairs(teacher, rows, is_real, fetched)
        record_ids = torch.tensor(
            [int(self._record_ids[r]) if real else -1 for r, real in zip(rows, is_real)], dtype=torch.long
        )
        groups = {t.name: self._group_stops(t, pairings[t.name], rows, fetched) for t in self.teachers
                  if "groups" in t.views}
        overlaps = {t.name: self._token_overlaps(t, is_real, fetched) for t in self.teachers if "overlaps" in t.views}
        return Batch(student_batch, {t.name: tensors[t.name] for t in self.teachers}, pairings, record_ids,
                     groups, overlaps)

    def _group_stops(self, teacher: ModelSide, pairing: Pairing, rows: list[int], fetched: dict):
        """``(student_stop, teacher_stop) [B, P]``: each pair's group ends before these logit rows
        (its tokens are predicted by rows ``index .. stop - 1``); 1:1 pairs end one row later."""
        student_stop, teacher_stop = pairing.student_index + 1, pairing.teacher_index + 1
        if teacher.pairing != "offsets":
            return student_stop * pairing.mask, teacher_stop * pairing.mask
        pairs = self._pairs[teacher.name][rows]
        for b in range(len(rows)):
            count = len(pairs["stop_student"][b])
            if not count or not bool(pairing.mask[b].any()):
                continue
            s_prompt = len(fetched[self.student.name]["prompt_ids"][b])
            t_prompt = len(fetched[teacher.name]["prompt_ids"][b])
            # Response token q sits at position prompt + q; its group of tokens [start, stop) is
            # predicted by the rows prompt + start - 1 .. prompt + stop - 2.
            student_stop[b, :count] = torch.tensor(pairs["stop_student"][b]) + s_prompt - 1
            teacher_stop[b, :count] = torch.tensor(pairs["stop_teacher"][b]) + t_prompt - 1
        return student_stop * pairing.mask, teacher_stop * pairing.mask

    def _token_overlaps(self, teacher: ModelSide, is_real: np.ndarray, fetched: dict):
        """``(lo, hi, mask) [B, Ns]`` over the student's labelled tokens (response, then EOS): the
        teacher response tokens ``lo .. hi - 1`` overlap the token's bytes (EOS: none)."""
        student, other = fetched[self.student.name], fetched[teacher.name]
        eos = int(self.student.append_eos)
        width = max(len(ids) + eos for ids in student["response_ids"])
        lo = torch.zeros(len(is_real), width, dtype=torch.long)
        hi = torch.zeros_like(lo)
        mask = torch.zeros(len(is_real), width, dtype=torch.bool)
        for b, real in enumerate(is_real):
            if not real:
                continue
            ranges = token_overlaps(list(zip(student["span_starts"][b], student["span_ends"][b])),
                                    list(zip(other["span_starts"][b], other["span_ends"][b])))
            count = len(ranges) + eos
            lo[b, : len(ranges)] = torch.tensor([r[0] for r in ranges], dtype=torch.long)
            hi[b, : len(ranges)] = torch.tensor([r[1] for r in ranges], dtype=torch.long)
            mask[b, :count] = True
        return lo, hi, mask

    def _model_batch(self, side: ModelSide, fetched: dict, is_real: np.ndarray) -> ModelBatch:
        eos = [side.tokenizer.eos_token_id] if side.append_eos else []
        sequences, label_rows = [], []
        for prompt, response, real in zip(fetched["prompt_ids"], fetched["response_ids"], is_real):
            sequences.append(list(prompt) + list(response) + eos)
            targets = list(response) + eos if real else [IGNORE_INDEX] * (len(response) + len(eos))
            label_rows.append([IGNORE_INDEX] * len(prompt) + targets)
        width = max(len(s) for s in sequences)
        pad_id = side.tokenizer.pad_token_id
        limit = side.model_vocab_size or len(side.tokenizer)
        if pad_id is None or pad_id >= limit:
            pad_id = side.tokenizer.eos_token_id if side.tokenizer.eos_token_id is not None else 0
        input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(sequences), width), dtype=torch.long)
        labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
        for row, (sequence, label_row) in enumerate(zip(sequences, label_rows)):
            input_ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
            attention[row, : len(sequence)] = 1
            labels[row, : len(label_row)] = torch.tensor(label_row, dtype=torch.long)
        return ModelBatch(input_ids, attention, labels)

    def _pairing_labels(self, side: ModelSide, labels: torch.Tensor) -> torch.Tensor:
        """Labels as seen by the pairing: the final EOS hidden unless it is distilled."""
        if not side.append_eos or self._eos_paired(side):
            return labels
        hidden = labels.clone()
        last = (labels != IGNORE_INDEX).long().cumsum(dim=1).argmax(dim=1)  # last labelled position
        has_labels = (labels != IGNORE_INDEX).any(dim=1)
        hidden[has_labels, last[has_labels]] = IGNORE_INDEX
        return hidden

    def _pack_response_pairs(self, teacher: ModelSide, rows: list[int], is_real: np.ndarray, fetched: dict) -> Pairing:
        pairs = self._pairs[teacher.name][rows]
        student_fetched, teacher_fetched = fetched[self.student.name], fetched[teacher.name]
        eos_pair = self._eos_paired(self.student) and self._eos_paired(teacher)
        per_row = []
        for b, real in enumerate(is_real):
            if not real:
                per_row.append([])
                continue
            s_prompt = len(student_fetched["prompt_ids"][b])
            t_prompt = len(teacher_fetched["prompt_ids"][b])
            # A response token at index q of the response sits at position prompt + q and is
            # predicted by the logit row one before it.
            row_pairs = [(s_prompt + s - 1, t_prompt + t - 1) for s, t in zip(pairs["pair_student"][b], pairs["pair_teacher"][b])]
            if eos_pair:
                row_pairs.append((s_prompt + len(student_fetched["response_ids"][b]) - 1,
                                  t_prompt + len(teacher_fetched["response_ids"][b]) - 1))
            per_row.append(row_pairs)
        return pack_pairs(per_row)
