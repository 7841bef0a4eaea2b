"""Evaluate one model on records: bits per byte of the reference responses and generation metrics.

One function serves the live ZeRO-3 student (``mlot_ds.engine.evaluation``), ``tools/evaluate.py``
and ``tools/reproduce.py``, so the three report the same numbers under the same names:

- ``eval/bits_per_byte``: code length of each record's ``response`` (plus EOS) given its prompt, in
  bits per UTF-8 byte; comparable across tokenizers, so teachers and students share one scale.
- ``eval/<metric>`` for each metric of the adapter (``METRICS_BY_ADAPTER``): ``rouge_lsum`` for
  DialogSum, FairytaleQA and generic jsonl, ``f1`` and ``exact_match`` for QED; each the mean over
  records of the best score against the record's references.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from mlot_ds.data import prompt_token_ids, render_prompt
from mlot_ds.eval.bpb import bits_per_byte
from mlot_ds.eval.generate import greedy_generate
from mlot_ds.eval.metrics import METRIC_FUNCTIONS, METRICS_BY_ADAPTER

BITS_PER_BYTE = "eval/bits_per_byte"
# Positions a model folder is evaluated with when nothing else says (prompt + continuation).
DEFAULT_MAX_LENGTH = 1024


def metric_names(adapter: str, generate: bool = True) -> tuple[str, ...]:
    """The stable result keys for an adapter, e.g. ``("eval/bits_per_byte", "eval/rouge_lsum")``."""
    if adapter not in METRICS_BY_ADAPTER:
        raise ValueError(f"unknown adapter {adapter!r}; expected one of {', '.join(METRICS_BY_ADAPTER)}")
    return (BITS_PER_BYTE,) + (tuple(f"eval/{m}" for m in METRICS_BY_ADAPTER[adapter]) if generate else ())


@dataclass
class Evaluation:
    """What :func:`evaluate_records` measured."""

    metrics: dict[str, float]
    predictions: list[str] = field(default_factory=list)
    """One greedy continuation per record (empty when generation is off)."""
    seconds: dict[str, float] = field(default_factory=dict)
    """Wall time of ``bits_per_byte`` and ``generate``."""


def evaluate_records(
    model: torch.nn.Module,
    tokenizer,
    records: Sequence,
    *,
    adapter: str,
    template,
    batch_size: int,
    max_new_tokens: int,
    max_length: int | None,
    device: torch.device | str | None = None,
    append_eos: bool = True,
    generate: bool = True,
    synced: bool = False,
    progress: bool = False,
    model_name: str = "model",
) -> Evaluation:
    """Bits per byte of ``record.response`` and, if ``generate``, the adapter's metrics.

    Args:
        records: :class:`mlot_ds.data.Record` s (``prompt``, ``response``, ``references``).
        adapter: the data adapter that read them; picks the metrics.
        template: a :class:`mlot_ds.data.Template` rendering each prompt for this model.
        append_eos: score the model's EOS after each response (as training does).
        synced: all ranks of a ZeRO-3 job call this together with the same records.
        progress: show a generation progress bar.
        model_name: used in error messages.
        The rest as :func:`mlot_ds.eval.generate.greedy_generate`.
    """

    names = metric_names(adapter, generate)
    if not records:
        raise ValueError(f"evaluate_records: no records to evaluate {model_name} on")
    prompts = [render_prompt(template, tokenizer, record.prompt, model=model_name) for record in records]
    seconds = {}
    started = time.perf_counter()
    metrics = {BITS_PER_BYTE: bits_per_byte(model, tokenizer, prompts, [r.response for r in records],
                                            batch_size=batch_size, device=device, append_eos=append_eos,
                                            max_length=max_length, prompt_special_tokens=template.kind == "plain")}
    seconds["bits_per_byte"] = time.perf_counter() - started
    predictions: list[str] = []
    if generate:
        started = time.perf_counter()
        prompt_ids = [prompt_token_ids(template, tokenizer, record.prompt, model=model_name) for record in records]
        predictions = greedy_generate(model, tokenizer, prompt_ids, batch_size=batch_size,
                                      max_new_tokens=max_new_tokens, device=device, max_length=max_length,
                                      synced=synced, progress=progress, description=f"generate ({model_name})")
        seconds["generate"] = time.perf_counter() - started
        for name in names[1:]:
            score = METRIC_FUNCTIONS[name.removeprefix("eval/")]
            values = [score(prediction, record.references or (record.response,))
                      for prediction, record in zip(predictions, records)]
            metrics[name] = sum(values) / len(values)
    return Evaluation(metrics, predictions, seconds)
