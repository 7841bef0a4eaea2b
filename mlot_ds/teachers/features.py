"""What a method reads of a model beside its logits, captured by forward hooks during the model's own forward.

A method names its features (:data:`mlot_ds.losses.method.FEATURES`); :class:`FeatureCapture` registers
one hook per feature for the duration of one forward and removes them afterwards:

- ``embeddings``: a forward hook on the input embedding module keeps its output ``[B, T, E]``;
- ``hidden``: a forward pre-hook on the output layer keeps its input ``[B, T, H]`` (the final hidden
  state, after the last norm and any projection, exactly what becomes the logits);
- ``output_weight``: the same pre-hook keeps a detached copy of the output layer's weight ``[V, H]``.
  Under ZeRO-3 the layer's own pre-forward hook has gathered it by then (DeepSpeed registered its
  hooks first, so they run first): no extra collective;
- ``layer@L``: a forward hook on decoder layer ``L`` keeps its output hidden states;
- ``attention@L``: layer ``L``'s attention averaged over heads ``[B, T, T]``. Asking the model for
  ``output_attentions`` would force eager attention in every layer and return every layer's
  ``[B, heads, T, T]``. Instead, for the duration of the forward the model's attention function (the
  one its ``config._attn_implementation`` names: sdpa, eager, ...) is wrapped: every layer still calls
  the original, and for the one chosen layer the wrapper also computes
  ``mean_heads softmax(q k^T * scaling + mask)`` from the query and key the layer passes (after its
  rotary embedding), in float32.

Hooks add no collective, so the ZeRO-3 discipline (every rank gathers the same parameters in the same
order) is untouched. The explicit gathers are a frozen teacher's output layer: :class:`PartitionedWeight`
gathers it only inside a method's ``with weight.gathered()`` block (every rank calls every method, in
the recipe's order), and :func:`gathered_output_weight` copies it once for the offline cache.
"""

from __future__ import annotations

import sys
from typing import Callable

import deepspeed
import torch

from contextlib import contextmanager

from mlot_ds.losses.method import EMBEDDINGS, HIDDEN, OUTPUT_WEIGHT, FrozenWeight, ModelDims

_LAYER, _ATTENTION = "layer", "attention"


class FeatureError(ValueError):
    """A feature name is unknown, or the model has no module to read it from."""


def parse_feature(feature: str) -> tuple[str, int | None]:
    """``("embeddings", None)``, ``("layer", L)``, ``("attention", L)``... for a feature name."""
    if feature in (EMBEDDINGS, HIDDEN, OUTPUT_WEIGHT):
        return feature, None
    kind, _, layer = feature.partition("@")
    if kind in (_LAYER, _ATTENTION):
        try:
            return kind, int(layer)
        except ValueError:
            pass
    raise FeatureError(f"unknown feature {feature!r}; expected embeddings, hidden, output_weight, layer@<L> or "
                       f"attention@<L>")


def inner_model(module: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model inside a DeepSpeed engine (or the model itself)."""
    return getattr(module, "module", module)


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's list of decoder layers (the first ``ModuleList`` as long as its config's layer count)."""
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    count = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    for _, child in model.named_modules():
        if isinstance(child, torch.nn.ModuleList) and len(child) == count and count:
            return child
    raise FeatureError(f"{type(model).__name__}: no list of {count} decoder layers found")


def _layer(model: torch.nn.Module, index: int) -> torch.nn.Module:
    layers = decoder_layers(model)
    if not -len(layers) <= index < len(layers):
        raise FeatureError(f"{type(model).__name__} has {len(layers)} decoder layers; layer {index} does not exist")
    return layers[index]


def attention_module(layer: torch.nn.Module) -> torch.nn.Module:
    """The self-attention block of a decoder layer (``self_attn``, ``attn``, ...)."""
    for name, child in layer.named_children():
        if name in ("self_attn", "attn", "attention") or type(child).__name__.endswith("Attention"):
            return child
    raise FeatureError(f"{type(layer).__name__}: no attention module among {[n for n, _ in layer.named_children()]}")


def model_dims(model: torch.nn.Module) -> ModelDims:
    """The sizes a method's modules are built from, read from the model's modules (meta tensors work)."""
    model = inner_model(model)
    head = model.get_output_embeddings()
    embedding = model.get_input_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise FeatureError(f"{type(model).__name__} has no linear output layer")
    return ModelDims(hidden=int(head.in_features), embedding=int(embedding.embedding_dim),
                     vocab=int(head.out_features), layers=len(decoder_layers(model)))


@torch.no_grad()
def gathered_output_weight(module: torch.nn.Module) -> torch.Tensor:
    """A copy of the output layer's weight ``[V, H]``. Collective under ZeRO-3 (one all-gather: every
    rank must call it, for the same teachers in the same order); a plain copy otherwise."""
    head = inner_model(module).get_output_embeddings()
    with deepspeed.zero.GatheredParameters([head.weight], modifier_rank=None):
        return head.weight.detach().clone()


class PartitionedWeight(FrozenWeight):
    """A live teacher's output-layer weight: under ZeRO-3 gathered for the ``with`` block only (a
    collective: every rank enters the block the same number of times, in the same order), and
    released after it; a replicated teacher's weight as it is."""

    def __init__(self, module: torch.nn.Module):
        super().__init__(None)
        self.head = inner_model(module).get_output_embeddings()

    @contextmanager
    def gathered(self):
        # No torch.no_grad() here: the caller's computation inside the block keeps its own graph.
        with deepspeed.zero.GatheredParameters([self.head.weight], modifier_rank=None):
            yield self.head.weight.detach()


# ------------------------------------------------------------------------------------ attention


def head_mean_attention(query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
                        scaling: float | None) -> torch.Tensor:
    """``mean_h softmax(q_h k_h^T * scaling + mask)`` ``[B, T, S]`` in float32.

    Args:
        query: ``[B, H, T, d]``; key: ``[B, Hkv, S, d]`` (grouped-query heads are repeated).
        attention_mask: what the model passed to its attention function: ``None`` (causal, no
            padding), a boolean ``[B, 1, T, S]`` (True = attend) or an additive float mask.
        scaling: the layer's score scale (``None``: ``d ** -0.5``).
    """
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale
    length, keys = scores.shape[-2:]
    if attention_mask is None:
        causal = torch.ones(length, keys, dtype=torch.bool, device=scores.device).tril(keys - length)
        scores = scores.masked_fill(~causal, float("-inf"))
    else:
        mask = attention_mask[..., :keys]
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    weights = torch.softmax(scores, dim=-1)
    return torch.nan_to_num(weights, nan=0.0).mean(dim=1)


class _AttentionTap:
    """Wraps the model's attention function while active; collects the chosen layers' head means."""

    def __init__(self, config, targets: dict[int, str], values: dict):
        # transformers' attention registry is needed only when a method asks for an attention map.
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        self.registry = ALL_ATTENTION_FUNCTIONS
        self.config, self.targets, self.values = config, targets, values
        self.name = getattr(config, "_attn_implementation", None) or "eager"
        self.saved = None

    def _original(self, module) -> Callable:
        if self.saved is not None:
            return self.saved
        # "eager" is each architecture's own function, defined in its modeling file.
        return getattr(sys.modules[type(module).__module__], "eager_attention_forward")

    def __enter__(self):
        local = self.registry._local_mapping
        self.had_local = self.name in local
        self.previous_local = local.get(self.name)
        self.saved = self.registry[self.name] if self.name in self.registry else None
        tap = self

        def wrapper(module, query, key, value, attention_mask, *args, **kwargs):
            out = tap._original(module)(module, query, key, value, attention_mask, *args, **kwargs)
            feature = tap.targets.get(id(module))
            if feature is not None:
                tap.values[feature] = head_mean_attention(query, key, attention_mask, kwargs.get("scaling"))
            return out

        self.registry[self.name] = wrapper
        return self

    def __exit__(self, *exc):
        if self.had_local:
            self.registry._local_mapping[self.name] = self.previous_local
        else:
            self.registry._local_mapping.pop(self.name, None)
        return False


# ------------------------------------------------------------------------------------ capture


class FeatureCapture:
    """Context manager: hooks on ``model`` that fill :attr:`values` (feature name -> tensor) during
    the forwards run inside it. With no features it registers nothing."""

    def __init__(self, model: torch.nn.Module, features: frozenset[str] | set[str]):
        self.model = inner_model(model)
        self.features = frozenset(features)
        self.values: dict[str, torch.Tensor] = {}
        self._handles: list = []
        self._tap: _AttentionTap | None = None
        for feature in self.features:
            parse_feature(feature)

    def __enter__(self) -> "FeatureCapture":
        values, model = self.values, self.model
        kinds = {feature: parse_feature(feature) for feature in self.features}
        try:
            if EMBEDDINGS in kinds:
                def keep_embeddings(module, inputs, output):
                    values[EMBEDDINGS] = output

                self._handles.append(model.get_input_embeddings().register_forward_hook(keep_embeddings))
            if HIDDEN in kinds or OUTPUT_WEIGHT in kinds:
                want_hidden, want_weight = HIDDEN in kinds, OUTPUT_WEIGHT in kinds

                def keep_head_input(module, inputs):
                    if want_hidden:
                        values[HIDDEN] = inputs[0]
                    if want_weight:
                        values[OUTPUT_WEIGHT] = module.weight.detach().clone()

                self._handles.append(model.get_output_embeddings().register_forward_pre_hook(keep_head_input))
            targets = {}
            for feature, (kind, layer) in kinds.items():
                if kind == _LAYER:
                    def keep_layer(module, inputs, output, feature=feature):
                        values[feature] = output[0] if isinstance(output, (tuple, list)) else output

                    self._handles.append(_layer(model, layer).register_forward_hook(keep_layer))
                elif kind == _ATTENTION:
                    targets[id(attention_module(_layer(model, layer)))] = feature
            if targets:
                self._tap = _AttentionTap(model.config, targets, values).__enter__()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> bool:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._tap is not None:
            self._tap.__exit__(None, None, None)
            self._tap = None
        return False

    def missing(self) -> list[str]:
        """Features asked for that no forward produced (a model whose forward skips the hooked module)."""
        return sorted(self.features - set(self.values))


def check_captured(capture: FeatureCapture, where: str) -> dict[str, torch.Tensor]:
    """The captured values, or one clear error naming what the model's forward did not produce."""
    missing = capture.missing()
    if missing:
        raise FeatureError(f"{where}: the forward produced no {', '.join(missing)} (its module was not called)")
    return capture.values


__all__ = ["FeatureCapture", "FeatureError", "PartitionedWeight", "attention_module", "check_captured", "decoder_layers",
           "gathered_output_weight", "head_mean_attention", "inner_model", "model_dims",
           "parse_feature"]
