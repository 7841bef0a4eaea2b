"""Data pipeline: records from files, per-model tokenization, one sampler, paired micro-batches.

Typical use (the engine does this)::

    records = load_records("dialogsum", "dialogsum.train.jsonl.gz", bad_rows="skip")
    student = ModelSide("student", load_tokenizer(student_dir), Template())
    teacher = ModelSide("llama", load_tokenizer(teacher_dir), Template("chat", few_shot=3), pairing="offsets")
    data = DistillationData(records, student, [teacher], max_length=1024, micro_batch_size=4,
                            grad_accum=2, world_size=1, rank=0, seed=0, cache_dir=Path("cache"))
    for batch in data.micro_batches(epoch=0, step=0): ...
"""

import importlib

# Public name -> module. Imported on first use, so that reading records (tools/preview_data.py)
# does not pay for torch, transformers and datasets.
_EXPORTS = {
    "Batch": "batch",
    "ModelBatch": "batch",
    "DistillationData": "pipeline",
    "ModelSide": "pipeline",
    "Record": "records",
    "RecordSet": "records",
    "load_records": "records",
    "DataError": "sources",
    "Template": "templates",
    "prompt_token_ids": "templates",
    "render_prompt": "templates",
    "load_tokenizer": "tokenizer",
    "PromptResponse": "tokenize",
    "encode_prompt_response": "tokenize",
    "encode_prompt_responses": "tokenize",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mlot_ds.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"mlot_ds.data.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
