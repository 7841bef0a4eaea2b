"""A teacher's output layer applied by the losses, in chunks, to the rows they need, instead of by the model.

A teacher forward normally ends with ``logits = output_layer(hidden)``: ``[B, T, V]`` values, most
of which no loss reads. :func:`reduce_with_output_layer` runs the model as usual, but for the
duration of that one forward the output layer's ``forward`` is replaced by the caller's reduction:
it receives the final hidden states ``[B, T, H]`` and the layer's weight and bias, and returns what
the loss keeps (:mod:`mlot_ds.losses.head` applies the layer to the needed rows, a chunk at a
time); the model then gets an empty ``[B, T, 0]`` tensor as its logits.

Running inside the layer's own forward keeps DeepSpeed's bookkeeping exactly as in a normal
forward: under ZeRO-3 the layer's pre-forward hook has gathered its weight on every rank (the same
collective, at the same point, as without chunking) and releases it afterwards. Gathering it again
with ``deepspeed.zero.GatheredParameters`` after the forward would cost a second all-gather and,
measured, twice the layer's size at the peak.

This is exact only for models whose logits are the output layer applied to the last hidden state,
with nothing after it (no logit soft-capping or scaling): the architectures in
:data:`VERIFIED_MODEL_TYPES`. Any other model keeps the full-logits path (with one warning).
"""

from __future__ import annotations

from typing import Callable, TypeVar

import torch

T = TypeVar("T")

# Checked in their transformers implementation: ``logits = lm_head(last_hidden_state)``, nothing after.
VERIFIED_MODEL_TYPES = ("gpt2", "llama", "mistral", "qwen2", "qwen3", "opt", "gpt_neox", "phi3")


def inner_model(module: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model inside a DeepSpeed engine (or the model itself)."""
    return getattr(module, "module", module)


def unsupported_reason(model: torch.nn.Module) -> str | None:
    """Why the hidden-state path would not be exact for ``model`` (``None``: it is exact)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in VERIFIED_MODEL_TYPES:
        return (f"model type {model_type!r} is not among the architectures whose logits are known to be exactly "
                f"the output layer applied to the last hidden state ({', '.join(VERIFIED_MODEL_TYPES)})")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear):
        return f"{type(model).__name__} has no linear output layer"
    return None


@torch.no_grad()
def reduce_with_output_layer(module: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                             reduce: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], T]) -> T:
    """Run the model and return ``reduce(hidden [B, T, H], weight [V, H], bias [V] or None)``, called
    in place of its output layer (see the module docstring).

    Args:
        module: a DeepSpeed engine or the model; :func:`unsupported_reason` must be ``None`` for its model.
    """
    head = inner_model(module).get_output_embeddings()
    results = []

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        results.append(reduce(hidden, head.weight, head.bias))
        return hidden.new_empty(*hidden.shape[:-1], 0)

    head.forward = forward  # an instance attribute shadows the class's forward; hooks still run
    try:
        module(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        del head.forward
    return results[0]


def final_hidden_states(module: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B, T, H]``: what the model's output layer would turn into logits."""
    return reduce_with_output_layer(module, input_ids, attention_mask, lambda hidden, weight, bias: hidden)
