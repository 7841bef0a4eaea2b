"""Bits per byte of reference responses: a likelihood that compares models with different tokenizers.

A model's mean loss per *token* depends on how long its tokens are, so it cannot compare a teacher
and a student whose vocabularies differ. Dividing the total code length of the responses (in bits)
by their length in UTF-8 *bytes* removes that dependence: every model pays for exactly the same
bytes, whatever pieces its tokenizer cuts them into. This is the usual bits-per-byte of language
modelling (e.g. nanochat's ``evaluate_bpb``), restricted to the response part of prompt/response
pairs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from mlot_ds.data.tokenize import encode_prompt_responses
from mlot_ds.pairing.surface import leading_special_ids


def bits_per_byte(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str],
    responses: Sequence[str],
    *,
    batch_size: int,
    device: torch.device | str | None = None,
    append_eos: bool = True,
    max_length: int | None = None,
    prompt_special_tokens: bool = True,
) -> float:
    """``sum_r -log2 p(response_r tokens | prompt_r) / sum_r utf8_bytes(response_r)``.

    Prompt and response are tokenized as the model reads them, in one text cut where the response
    starts (:func:`mlot_ds.data.tokenize.encode_prompt_responses`, the same tokens training
    uses), with the tokenizer's leading special tokens (a BOS where it adds one) before the prompt
    when ``prompt_special_tokens``; if ``append_eos``, the tokenizer's EOS is appended and scored
    as part of the response (its bytes count as zero). So pass the exact text a model conditions
    on, separator included, as the prompt, e.g. ``mlot_ds.data.dialogsum.render_context(dialogue)``.

    Args:
        model: a causal LM returning ``.logits`` of shape ``[B, T, V]`` (``V`` may exceed
            ``len(tokenizer)``: padded embedding rows keep their probability mass).
        tokenizer: the model's Hugging Face tokenizer.
        prompts, responses: equal-length sequences of strings; responses must hold at least one byte.
        batch_size: sequences per forward pass.
        device: where inputs go; defaults to the device of the model's first parameter.
        append_eos: score the end of each response too.
        max_length: longest sequence fed to the model; longer prompts lose tokens *from the left*
            (the response is always kept whole). Defaults to ``tokenizer.model_max_length`` when
            that is a real limit.
        prompt_special_tokens: put the leading special tokens before each prompt, as for a plain
            template; ``False`` for prompts rendered by a chat template, which writes its own.

    Returns:
        Bits per byte over all responses (a float; lower is better). Logits are upcast to float32.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"bits_per_byte: {len(prompts)} prompts but {len(responses)} responses")
    total_bytes = sum(len(response.encode("utf-8")) for response in responses)
    if total_bytes == 0:
        raise ValueError("bits_per_byte: the responses hold no bytes")
    if batch_size < 1:
        raise ValueError(f"bits_per_byte: batch_size must be >= 1, got {batch_size}")
    if append_eos and tokenizer.eos_token_id is None:
        raise ValueError("bits_per_byte: append_eos=True but the tokenizer has no eos_token_id")
    if device is None:
        device = next(model.parameters()).device
    if max_length is None and tokenizer.model_max_length < 1_000_000:
        max_length = tokenizer.model_max_length
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    lead = leading_special_ids(tokenizer) if prompt_special_tokens else []
    encoded = encode_prompt_responses(tokenizer, list(prompts), list(responses), leading_ids=lead, with_spans=False)
    sequences = []
    for index, record in enumerate(encoded):
        prompt_ids, response_ids = record.prompt_ids, record.response_ids
        if append_eos:
            response_ids = response_ids + [tokenizer.eos_token_id]
        if max_length is not None:
            room = max_length - len(response_ids)
            if room < 1:
                raise ValueError(
                    f"bits_per_byte: response {index} has {len(response_ids)} tokens, no room for a prompt "
                    f"within max_length={max_length}"
                )
            prompt_ids = prompt_ids[-room:]
        if not prompt_ids:
            raise ValueError(f"bits_per_byte: prompt {index} tokenizes to no tokens, so its first response token has no context")
        sequences.append((prompt_ids, response_ids))

    was_training = model.training
    model.eval()
    total_nats = 0.0
    try:
        with torch.no_grad():
            for start in range(0, len(sequences), batch_size):
                chunk = sequences[start : start + batch_size]
                width = max(len(p) + len(r) for p, r in chunk)
                input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
                attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
                scored = torch.zeros((len(chunk), width), dtype=torch.bool)
                for row, (prompt_ids, response_ids) in enumerate(chunk):
                    length = len(prompt_ids) + len(response_ids)
                    input_ids[row, :length] = torch.tensor(prompt_ids + response_ids)
                    attention_mask[row, :length] = 1
                    scored[row, len(prompt_ids) : length] = True
                input_ids, attention_mask, scored = input_ids.to(device), attention_mask.to(device), scored.to(device)
                logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
                # The logit row p predicts token p + 1: gather only the rows that predict response tokens.
                predicting_rows = scored[:, 1:]
                row_logits = logits[:, :-1][predicting_rows].float()
                targets = input_ids[:, 1:][predicting_rows]
                log_probs = torch.log_softmax(row_logits, dim=-1).gather(-1, targets.unsqueeze(-1))
                total_nats -= float(log_probs.sum())
    finally:
        model.train(was_training)
    return total_nats / math.log(2) / total_bytes
