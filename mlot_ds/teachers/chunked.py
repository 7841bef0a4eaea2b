"""A teacher's final hidden states and its output layer, so the losses can apply the layer in chunks.

A teacher forward normally ends with ``logits = output_layer(hidden)``: ``[B, T, V]`` values, most
of which no loss reads. Here the model runs without its output layer (it is swapped for an
identity for the duration of one forward, so the root module's forward, and with it DeepSpeed's
per-forward bookkeeping, runs as usual) and returns the hidden states ``[B, T, H]``; the layer's
weight is then gathered (:func:`gathered_output_layer`) and applied by
:mod:`mlot_ds.losses.head` to the needed rows only, a chunk at a time.

This is exact only for models whose logits are the output layer applied to the last hidden state,
with nothing after it (no logit soft-capping or scaling): the architectures in
:data:`VERIFIED_MODEL_TYPES`. Any other model keeps the full-logits path (with one warning).

Collective discipline: under ZeRO-3 the gather is a collective. Every rank calls
:func:`gathered_output_layer` once per teacher per micro-batch, exactly where it would have run
the full forward, so the calls line up across ranks.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

# Checked in their transformers implementation: ``logits = lm_head(last_hidden_state)``, nothing after.
VERIFIED_MODEL_TYPES = ("gpt2", "llama", "mistral", "qwen2", "qwen3", "opt", "gpt_neox", "phi3")


def inner_model(module: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model inside a DeepSpeed engine (or the model itself)."""
    return getattr(module, "module", module)


def _output_layer_name(model: torch.nn.Module) -> str | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, child in model.named_children():
        if child is head:
            return name
    return None


def unsupported_reason(model: torch.nn.Module) -> str | None:
    """Why the hidden-state path would not be exact for ``model`` (``None``: it is exact)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in VERIFIED_MODEL_TYPES:
        return (f"model type {model_type!r} is not among the architectures whose logits are known to be exactly "
                f"the output layer applied to the last hidden state ({', '.join(VERIFIED_MODEL_TYPES)})")
    name = _output_layer_name(model)
    if name is None or not isinstance(getattr(model, name), torch.nn.Linear):
        return f"{type(model).__name__} has no top-level linear output layer"
    return None


@contextmanager
def _without_output_layer(model: torch.nn.Module):
    name = _output_layer_name(model)
    head = getattr(model, name)
    setattr(model, name, torch.nn.Identity())
    try:
        yield
    finally:
        setattr(model, name, head)


@torch.no_grad()
def final_hidden_states(module: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B, T, H]`` hidden states that the model's output layer would turn into logits.

    Args:
        module: a DeepSpeed engine or the model; :func:`unsupported_reason` must be ``None`` for its model.
    """
    with _without_output_layer(inner_model(module)):
        output = module(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return output.logits


@contextmanager
def gathered_output_layer(model: torch.nn.Module):
    """Yield the output layer's ``(weight [V, H], bias [V] or None)``, whole on every rank.

    Under ZeRO-3 the partitioned weight is all-gathered for the duration of the block (a collective:
    every rank must enter it) and partitioned again after; for a plain model this does nothing.
    """
    import deepspeed

    head = model.get_output_embeddings()
    params = [head.weight] + ([head.bias] if head.bias is not None else [])
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield head.weight, head.bias
