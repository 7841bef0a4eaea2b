"""Evaluation of the live ZeRO-3 student, in lockstep on every rank.

Every rank evaluates the same records in the same batches: a ZeRO-3 forward gathers parameters
with collectives, so all ranks must run the same forwards (``synced=True`` keeps them stepping
together even when one rank's sequences finish first). With the small evaluation limits of a
training run the duplicated work is cheaper than gathering results across ranks.

Result names are stable (``eval/bits_per_byte``, and ``eval/rouge_lsum`` or ``eval/f1`` and
``eval/exact_match`` by adapter; see :func:`mlot_ds.eval.report.metric_names`), so that
``eval.best_metric`` can name one of them.
"""

from __future__ import annotations

from mlot_ds import dist
from mlot_ds.data import Template
from mlot_ds.eval.report import evaluate_records


def evaluate_student(trainer, inputs) -> dict[str, float]:
    recipe = trainer.recipe
    records = inputs.eval_records[: recipe.eval.limit]
    if not records:
        return {}
    template_cfg = recipe.student.template
    # Few-shot examples come from the training records inside the data pipeline; evaluation is zero-shot.
    template = Template(kind=template_cfg.kind, system=template_cfg.system, few_shot=0)
    adapter = recipe.data.eval.adapter if recipe.data.eval is not None else "jsonl"
    result = evaluate_records(
        trainer.student.module, inputs.student_tokenizer, records, adapter=adapter, template=template,
        batch_size=recipe.eval.batch_size, max_new_tokens=recipe.eval.max_new_tokens,
        max_length=recipe.data.max_length, device=trainer.device, append_eos=recipe.student.append_eos,
        generate=recipe.eval.generate, synced=dist.world_size() > 1, progress=dist.is_rank0(),
        model_name="student",
    )
    return result.metrics
