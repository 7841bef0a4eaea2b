"""Data pipeline: records from files, per-model tokenization, one sampler, paired micro-batches.

Typical use (the engine does this)::

    records = load_records("dialogsum", "dialogsum.train.jsonl.gz", bad_rows="skip")
    student = ModelSide("student", load_tokenizer(student_dir), Template())
    teacher = ModelSide("llama", load_tokenizer(teacher_dir), Template("chat", few_shot=3), pairing="offsets")
    data = DistillationData(records, student, [teacher], max_length=1024, micro_batch_size=4,
                            grad_accum=2, world_size=1, rank=0, seed=0, cache_dir=Path("cache"))
    for batch in data.micro_batches(epoch=0, step=0): ...
"""

from mlot_ds.data.batch import Batch
from mlot_ds.data.pipeline import DistillationData, ModelSide
from mlot_ds.data.records import Record, RecordSet, load_records
from mlot_ds.data.sources import DataError, resolve_data_path
from mlot_ds.data.templates import Template, prompt_token_ids, render_prompt
from mlot_ds.data.tokenize import (
    PromptResponse,
    encode_prompt_response,
    encode_prompt_responses,
)
from mlot_ds.data.tokenizer import load_tokenizer
from mlot_ds.pairing.types import ModelBatch

__all__ = [
    "Batch",
    "DataError",
    "DistillationData",
    "ModelBatch",
    "ModelSide",
    "PromptResponse",
    "Record",
    "RecordSet",
    "Template",
    "encode_prompt_response",
    "encode_prompt_responses",
    "load_records",
    "load_tokenizer",
    "prompt_token_ids",
    "render_prompt",
    "resolve_data_path",
]
