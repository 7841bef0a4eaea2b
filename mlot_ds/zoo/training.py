"""A plain PyTorch training loop and the two batch streams of the zoo: pretraining and task tuning.

Both streams are infinite, deterministic given their seed, and yield Hugging Face batches
(``input_ids``, ``attention_mask``, ``labels`` with ``-100`` = no loss) that any causal LM accepts.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence

import torch
from tqdm.auto import tqdm

from mlot_ds.data.tokenize import encode_prompt_responses
from mlot_ds.pairing.surface import leading_special_ids

IGNORE_INDEX = -100
ADAM_BETAS = (0.9, 0.95)
WEIGHT_DECAY = 0.01
GRAD_CLIP_NORM = 1.0
FINAL_LR_FRACTION = 0.1
"""The cosine schedule decays to this fraction of the peak learning rate."""
LENGTH_GROUP_BATCHES = 8
"""Tuning examples are sorted by length within groups of this many batches, to waste little padding."""


def pretraining_batches(
    tokenizer, documents: Sequence[str], *, block_length: int, batch_size: int, seed: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Documents (with the tokenizer's BOS, if any, and an EOS each) packed into full blocks, reshuffled every epoch."""
    stream: list[int] = []
    for ids in tokenizer(list(documents), add_special_tokens=True)["input_ids"]:
        stream.extend(ids)
        stream.append(tokenizer.eos_token_id)
    block_count = len(stream) // block_length
    if block_count < batch_size:
        raise ValueError(
            f"pretraining corpus too small: {len(stream)} tokens make {block_count} blocks of {block_length}, "
            f"fewer than one batch of {batch_size}"
        )
    blocks = torch.tensor(stream[: block_count * block_length]).view(block_count, block_length)
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(block_count, generator=generator)
        for start in range(0, block_count - batch_size + 1, batch_size):
            input_ids = blocks[order[start : start + batch_size]]
            yield {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}


def tuning_batches(
    tokenizer, examples: Sequence[tuple[str, str]], *, context_length: int, batch_size: int, seed: int
) -> Iterator[dict[str, torch.Tensor]]:
    """``(context, response)`` pairs as ``context + response + EOS``, loss on the response and EOS only.

    Context and response are tokenized as the model reads them, in one text cut where the response
    starts, after the tokenizer's leading special tokens (its BOS, if any): the tokens
    :func:`mlot_ds.eval.bits_per_byte` and the training data use
    (:func:`mlot_ds.data.tokenize.encode_prompt_responses`). Contexts that do not fit lose tokens
    from the left.
    """
    if len(examples) < batch_size:
        raise ValueError(f"tuning needs at least one batch: {len(examples)} examples < batch_size {batch_size}")
    pairs = encode_prompt_responses(tokenizer, [context for context, _ in examples], [response for _, response in examples],
                                    leading_ids=leading_special_ids(tokenizer), with_spans=False)
    encoded = []
    for pair in pairs:
        context_ids = pair.prompt_ids
        response_ids = (pair.response_ids + [tokenizer.eos_token_id])[: context_length - 1]
        context_ids = context_ids[-(context_length - len(response_ids)) :]
        encoded.append((context_ids, response_ids))

    rng = random.Random(seed)
    group = batch_size * LENGTH_GROUP_BATCHES
    while True:
        order = list(range(len(encoded)))
        rng.shuffle(order)
        batches = []
        for start in range(0, len(order), group):
            ranked = sorted(order[start : start + group], key=lambda i: len(encoded[i][0]) + len(encoded[i][1]))
            batches.extend(ranked[i : i + batch_size] for i in range(0, len(ranked) - batch_size + 1, batch_size))
        rng.shuffle(batches)
        for batch in batches:
            pairs = [encoded[i] for i in batch]
            width = max(len(c) + len(r) for c, r in pairs)
            input_ids = torch.full((len(pairs), width), tokenizer.pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros((len(pairs), width), dtype=torch.long)
            labels = torch.full((len(pairs), width), IGNORE_INDEX, dtype=torch.long)
            for row, (context_ids, response_ids) in enumerate(pairs):
                length = len(context_ids) + len(response_ids)
                input_ids[row, :length] = torch.tensor(context_ids + response_ids)
                attention_mask[row, :length] = 1
                labels[row, len(context_ids) : length] = torch.tensor(response_ids)
            yield {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def train_causal_lm(
    model: torch.nn.Module,
    batches: Iterator[dict[str, torch.Tensor]],
    *,
    steps: int,
    learning_rate: float,
    warmup_fraction: float,
    progress: bool = True,
    position: int = 0,
    description: str = "train",
) -> list[float]:
    """AdamW with linear warm-up and cosine decay for ``steps`` batches; returns the loss of every step."""
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
        lr=learning_rate,
        betas=ADAM_BETAS,
    )
    warmup_steps = max(1, round(steps * warmup_fraction))

    def lr_factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress_ratio = (step - warmup_steps) / max(1, steps - warmup_steps)
        return FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress_ratio))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    losses = []
    bar = tqdm(range(steps), desc=description, disable=not progress, leave=False, dynamic_ncols=True, position=position)
    for _ in bar:
        batch = next(batches)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP_NORM)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses
