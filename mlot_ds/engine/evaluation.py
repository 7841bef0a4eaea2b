"""Evaluation of the live ZeRO-3 student, in lockstep on every rank.

Every rank evaluates the same records in the same batches: a ZeRO-3 forward gathers parameters
with collectives, so all ranks must run the same forwards (``generate(..., synced_gpus=True)`` keeps
them stepping together even when one rank's sequences finish first). With the small evaluation
limits of a training run the duplicated work is cheaper than gathering results across ranks.
"""

from __future__ import annotations

import torch

from mlot_ds import dist
from mlot_ds.data import Template, render_prompt
from mlot_ds.eval.bpb import bits_per_byte
from mlot_ds.eval.metrics import METRIC_FUNCTIONS, METRICS_BY_ADAPTER


def evaluate_student(trainer, inputs) -> dict[str, float]:
    recipe = trainer.recipe
    records = inputs.eval_records[: recipe.eval.limit]
    if not records:
        return {}
    tokenizer = inputs.student_tokenizer
    template_cfg = recipe.student.template
    template = Template(kind=template_cfg.kind, system=template_cfg.system, few_shot=0)
    prompts = [render_prompt(template, tokenizer, record.prompt, model="student") for record in records]
    model = trainer.student.module
    was_training = model.training
    model.eval()
    results = {}
    with torch.no_grad():
        results["eval/bits_per_byte"] = bits_per_byte(
            model, tokenizer, prompts, [record.response for record in records],
            batch_size=recipe.eval.batch_size, device=trainer.device, append_eos=recipe.student.append_eos,
            max_length=recipe.data.max_length,
        )
        if recipe.eval.generate:
            predictions = generate(model, tokenizer, prompts, batch_size=recipe.eval.batch_size,
                                   max_new_tokens=recipe.eval.max_new_tokens, device=trainer.device,
                                   max_length=recipe.data.max_length, synced=dist.world_size() > 1)
            adapter = recipe.data.eval.adapter if recipe.data.eval is not None else "jsonl"
            for metric in METRICS_BY_ADAPTER[adapter]:
                scores = [METRIC_FUNCTIONS[metric](prediction, record.references or (record.response,))
                          for prediction, record in zip(predictions, records)]
                results[f"eval/{metric}"] = sum(scores) / len(scores)
    if was_training:
        model.train()
    return results


def generate(model, tokenizer, prompts: list[str], *, batch_size: int, max_new_tokens: int, device,
             max_length: int, synced: bool) -> list[str]:
    """Greedy continuations of ``prompts`` (left-padded batches), decoded without special tokens."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    outputs = []
    for start in range(0, len(prompts), batch_size):
        encoded = [tokenizer(p, add_special_tokens=True)["input_ids"][-(max_length - max_new_tokens):]
                   for p in prompts[start:start + batch_size]]
        width = max(len(ids) for ids in encoded)
        input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, ids in enumerate(encoded):
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention[row, width - len(ids):] = 1
        generated = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                   max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id,
                                   eos_token_id=tokenizer.eos_token_id, synced_gpus=synced)
        for row in generated[:, width:]:
            outputs.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return outputs
