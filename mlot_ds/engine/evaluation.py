"""Evaluation of the live ZeRO-3 student, in lockstep on every rank.

Every rank evaluates the same records in the same batches: a ZeRO-3 forward gathers parameters
with collectives, so all ranks must run the same forwards (``synced=True`` keeps them stepping
together even when one rank's sequences finish first). With the small evaluation limits of a
training run the duplicated work is cheaper than gathering results across ranks.

Result names are stable (``eval/bits_per_byte``, and ``eval/rouge_lsum`` or ``eval/f1`` and
``eval/exact_match`` by adapter; see :func:`mlot_ds.eval.report.metric_names`), so that
``eval.best_metric`` can name one of them.

With generation on, rank 0 also writes every greedy prediction next to its references to
``<output_dir>/eval/step_<N>.jsonl`` and shows the first few in TensorBoard (``eval/samples``), so a
metric can be checked against the text that produced it.
"""

from __future__ import annotations

import json
from pathlib import Path

from mlot_ds import dist, outputs
from mlot_ds.data import Template
from mlot_ds.eval.report import evaluate_records

SAMPLES_SHOWN = 4


def evaluate_student(model, tokenizer, records, recipe, step: int, device, log) -> dict[str, float]:
    """Collective: the ``eval/*`` metrics of the live student ``model`` on the first ``eval.limit`` records.

    With generation on, rank 0 also writes the predictions to ``<output_dir>/eval/step_<N>.jsonl``
    and shows the first few in TensorBoard through ``log`` (a :class:`~mlot_ds.engine.metrics_log.MetricLog`).
    """
    records = records[: recipe.eval.limit]
    if not records:
        return {}
    template_cfg = recipe.student.template
    # Few-shot examples come from the training records inside the data pipeline; evaluation is zero-shot.
    template = Template(kind=template_cfg.kind, system=template_cfg.system, few_shot=0)
    adapter = recipe.data.eval.adapter if recipe.data.eval is not None else "jsonl"
    result = evaluate_records(
        model, tokenizer, records, adapter=adapter, template=template,
        batch_size=recipe.eval.batch_size, max_new_tokens=recipe.eval.max_new_tokens,
        max_length=recipe.data.max_length, device=device, append_eos=recipe.student.append_eos,
        generate=recipe.eval.generate, synced=dist.world_size() > 1, progress=dist.is_rank0(),
        model_name="student",
    )
    if result.predictions:
        path = recipe.paths().predictions / f"step_{step:08d}.jsonl"
        dist.rank0_then_barrier(lambda: write_predictions(path, records, result.predictions, result.metrics))
        log.text(step, "eval/samples", samples_markdown(records, result.predictions))
    return result.metrics


def write_predictions(path: Path, records, predictions: list[str], metrics: dict[str, float]) -> Path:
    """One JSON line per record (``id``, ``prompt``, ``prediction``, ``references``), then the metrics;
    written to a temporary name and renamed, so a reader never sees half a file."""
    lines = [json.dumps({"id": record.id, "prompt": record.prompt, "prediction": prediction,
                         "references": list(record.references or (record.response,))}, ensure_ascii=False) + "\n"
             for record, prediction in zip(records, predictions)]
    lines.append(json.dumps({"metrics": metrics}) + "\n")
    return outputs.write_text(path, "".join(lines))


def samples_markdown(records, predictions: list[str]) -> str:
    """The first :data:`SAMPLES_SHOWN` predictions with their first reference, as Markdown for TensorBoard."""
    parts = []
    for record, prediction in list(zip(records, predictions))[:SAMPLES_SHOWN]:
        reference = record.references[0] if record.references else record.response
        parts.append(f"**record {record.id}**\n\nprediction: {prediction!r}\n\nreference: {reference!r}")
    return "\n\n---\n\n".join(parts)
