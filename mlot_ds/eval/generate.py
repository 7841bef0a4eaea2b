"""Greedy batched generation, for an exported Hugging Face model or the live ZeRO-3 student.

Prompts arrive as token ids (the caller renders them with its template, e.g.
:func:`mlot_ds.data.prompt_token_ids`). They are sorted by length so that each batch holds prompts
of similar length, padded on the *left* (a decoder-only model continues from the last column), and
generated greedily. The results come back in the caller's order, each cut at the first EOS.

Inside a ZeRO-3 engine every forward gathers parameters with collectives, so every rank must run
the same number of forwards: every rank passes the same prompts, and ``synced=True`` (HF's
``synced_gpus``) keeps a rank whose sequences all ended stepping until every rank is done.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig


def greedy_generate(
    model: torch.nn.Module,
    tokenizer,
    prompt_ids: Sequence[Sequence[int]],
    *,
    batch_size: int,
    max_new_tokens: int,
    device: torch.device | str | None = None,
    max_length: int | None = None,
    synced: bool = False,
    progress: bool = False,
    description: str = "generate",
) -> list[str]:
    """Greedy continuations of ``prompt_ids``, decoded without special tokens and stripped.

    Args:
        model: a causal LM with ``generate`` (a plain HF model, or the module inside a DeepSpeed engine).
        tokenizer: the model's tokenizer (EOS ends a continuation; PAD, or EOS if it has none, pads).
        prompt_ids: one list of token ids per prompt, special tokens included.
        batch_size: prompts per ``generate`` call.
        max_new_tokens: longest continuation.
        device: where inputs go; defaults to the device of the model's first parameter.
        max_length: longest prompt plus continuation the model may see; longer prompts lose tokens
            from the left. ``None``: no limit.
        synced: every rank of a ZeRO-3 job calls this in lockstep (``synced_gpus``).
        progress: show a progress bar (pass ``True`` on one rank only).

    Returns:
        One string per prompt, in the order of ``prompt_ids``.
    """

    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"greedy_generate: batch_size and max_new_tokens must be >= 1, got {batch_size}, {max_new_tokens}")
    if max_length is not None and max_length <= max_new_tokens:
        raise ValueError(f"greedy_generate: max_length={max_length} leaves no room for a prompt "
                         f"before max_new_tokens={max_new_tokens}")
    for index, ids in enumerate(prompt_ids):
        if not ids:
            raise ValueError(f"greedy_generate: prompt {index} has no tokens")
    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    if pad_id is None:
        raise ValueError("greedy_generate: the tokenizer has neither a pad nor an eos token to pad with")
    if device is None:
        device = next(model.parameters()).device
    room = None if max_length is None else max_length - max_new_tokens
    prompts = [list(ids)[-room:] if room is not None else list(ids) for ids in prompt_ids]
    # A fresh config, so that sampling or penalties in the model's own generation_config cannot leak in.
    config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                              eos_token_id=eos_id, use_cache=True)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: list[str] = [""] * len(prompts)
    bar = _progress_bar(len(prompts), description) if progress else None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                batch = order[start:start + batch_size]
                width = max(len(prompts[i]) for i in batch)
                input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, index in enumerate(batch):
                    ids = prompts[index]
                    input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
                    attention_mask[row, width - len(ids):] = 1
                generated = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                           generation_config=config, synced_gpus=synced)
                for row, index in enumerate(batch):
                    outputs[index] = _decode(tokenizer, generated[row, width:].tolist(), eos_id)
                if bar is not None:
                    bar.update(len(batch))
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    return outputs


def _decode(tokenizer, continuation: list[int], eos_id: int | None) -> str:
    # Cut at the first EOS ourselves: when PAD is an ordinary token, skip_special_tokens keeps it.
    if eos_id is not None and eos_id in continuation:
        continuation = continuation[:continuation.index(eos_id)]
    return tokenizer.decode(continuation, skip_special_tokens=True).strip()


def _progress_bar(total: int, description: str):

    return tqdm(total=total, desc=description, unit="prompt", dynamic_ncols=True)
