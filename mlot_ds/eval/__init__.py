"""Evaluation metrics that compare models across tokenizers."""

from mlot_ds.eval.bpb import bits_per_byte

__all__ = ["bits_per_byte"]
