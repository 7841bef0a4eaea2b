"""Activation memory of a decoder: what autograd keeps for the backward, and a no-grad forward's working set.

Saved for the backward, per decoder layer, with ``n = B T`` tokens, ``b`` bytes per element of the
model's dtype, SDPA attention (transformers' default) and no dropout::

    llama-like  2 (4 + 2b) nH + 4b nI + {4b n(a d)         (a padded batch: K, V repeated to a heads)
                                         {2b n(a d) + 2b n(g d)   (no padding: grouped-query SDPA)
                + b B T^2 (padded: the float mask SDPA keeps per layer) + 4 n a (log-sum-exp) + 8 n
    qwen3       llama + (4 + b) n(a d + g d)     (the q and k norms)
    phi3        llama's, with K and V inside the fused projection (2b n(a d) + 3b n(g d) unpadded)
    gpt2        8b nH + 5b nI (GELU-tanh keeps four tensors) + b B T^2 (padded) + 4 n a + 4b n
    opt         8b nH +  b nI (ReLU)                         + b B T^2 (padded) + 4 n a + 4b n
    gpt_neox   10b nH + 2b nI                                + b B T^2 (padded) + 4 n a + 4b n

(``H`` hidden, ``I`` intermediate, ``a``/``g`` query/key-value heads, ``d`` head size.) The norms of
the Llama family compute in float32 whatever the model's dtype, hence the ``4`` beside ``2b``.
Outside the layers: the final norm and the output layer's input, ``(4 + 2b) nH`` (RMSNorm, plus
the rotary cosines and sines, ``2 T d b``) or ``2b nH`` (LayerNorm), and the token ids. These are the byte counts measured with
``torch.autograd.graph.saved_tensors_hooks`` on torch 2.13 / transformers 5.24 (every coefficient
fitted exactly on nine shapes per family); ``tests/test_plan.py`` measures them again.

Under gradient checkpointing (``student.gradient_checkpointing``) a layer keeps only its input,
``b nH``, and one layer's full set is rebuilt at a time during the backward.

A frozen teacher's forward under ``torch.no_grad`` keeps nothing; its working set inside a layer
(residual, normalised input, the MLP's intermediates) is about ``b n (c_H H + c_I I)`` with the
measured ``(c_H, c_I)`` of :data:`NO_GRAD_WORKING_SET`.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlot_ds.plan.model_shapes import ModelShape

NO_GRAD_WORKING_SET = {"llama": (5.0, 3.0), "phi3": (5.0, 3.0), "gpt2": (5.5, 4.0), "opt": (9.5, 2.0),
                       "gpt_neox": (5.5, 3.0)}
"""Peak bytes of a no-grad forward beyond its inputs, per ``b n H`` and ``b n I`` (measured with the
profiler's allocation events on two-layer models, torch 2.13 CPU; rounded up)."""


@dataclass(frozen=True)
class Tokens:
    """One micro-batch as a model sees it: ``batch`` sequences of ``seq_len`` tokens (padded to the
    longest), ``padded``: at least one sequence is shorter (the attention needs a mask)."""

    batch: int
    seq_len: int
    padded: bool = True

    @property
    def count(self) -> int:
        return self.batch * self.seq_len


def saved_per_layer(shape: ModelShape, tokens: Tokens, dtype_bytes: int) -> int:
    """Bytes one decoder layer keeps for the backward (see the module docstring)."""
    b, n = dtype_bytes, tokens.count
    h, i = shape.hidden, shape.intermediate
    q_width, kv_width = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    mask = b * tokens.batch * tokens.seq_len ** 2 if tokens.padded else 0
    small = 4 * n * shape.heads
    if shape.family in ("llama", "phi3"):
        norms = 2 * (4 + 2 * b) * n * h
        if shape.family == "phi3":
            attention = (4 * b * n * q_width + 2 * b * n * kv_width) if tokens.padded else (
                4 * b * n * q_width + 3 * b * n * kv_width)
        elif tokens.padded:
            attention = 4 * b * n * q_width
        else:
            attention = 2 * b * n * q_width + 2 * b * n * kv_width
        if shape.model_type == "qwen3":
            attention += (4 + b) * n * (q_width + kv_width)
        return norms + attention + 4 * b * n * i + mask + small + 8 * n
    per_hidden, per_inner = {"gpt2": (8, 5), "opt": (8, 1), "gpt_neox": (10, 2)}[shape.family]
    return b * n * (per_hidden * h + per_inner * i) + mask + small + 4 * b * n


def saved_outside_layers(shape: ModelShape, tokens: Tokens, dtype_bytes: int) -> int:
    """The final norm's and the output layer's saved inputs, the token ids, and (rotary models) the
    cosines and sines every layer shares."""
    n = tokens.count
    if shape.family in ("llama", "phi3"):
        rotary = 2 * tokens.seq_len * shape.head_dim * dtype_bytes
        return (4 + 2 * dtype_bytes) * n * shape.head_input_size + 4 * n + 8 * n + rotary
    return 2 * dtype_bytes * n * shape.head_input_size + 8 * n


def training_activations(shape: ModelShape, tokens: Tokens, dtype_bytes: int, checkpointing: bool) -> int:
    """Everything the student's forward keeps for its backward (the logits excepted), at the start of
    the backward; with checkpointing, plus the one layer rebuilt at a time."""
    layer = saved_per_layer(shape, tokens, dtype_bytes)
    outside = saved_outside_layers(shape, tokens, dtype_bytes)
    if checkpointing:
        return shape.layers * dtype_bytes * tokens.count * shape.hidden + layer + outside
    return shape.layers * layer + outside


def no_grad_working_set(shape: ModelShape, tokens: Tokens, dtype_bytes: int) -> int:
    """A frozen model's forward: the peak beyond its inputs, and its final hidden states ``[B, T, H]``."""
    per_hidden, per_inner = NO_GRAD_WORKING_SET[shape.family]
    n = tokens.count
    mask = dtype_bytes * tokens.batch * tokens.seq_len ** 2 if tokens.padded else 0
    return int(dtype_bytes * n * (per_hidden * shape.hidden + per_inner * shape.intermediate)) + mask


__all__ = ["NO_GRAD_WORKING_SET", "Tokens", "no_grad_working_set", "saved_outside_layers", "saved_per_layer",
           "training_activations"]
