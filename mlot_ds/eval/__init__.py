"""Evaluation: bits per byte (comparable across tokenizers), greedy generation, task metrics."""

from mlot_ds.eval.bpb import bits_per_byte
from mlot_ds.eval.generate import greedy_generate
from mlot_ds.eval.report import (
    BITS_PER_BYTE,
    Evaluation,
    evaluate_records,
    metric_names,
)

__all__ = ["BITS_PER_BYTE", "Evaluation", "bits_per_byte", "evaluate_records", "greedy_generate", "metric_names"]
