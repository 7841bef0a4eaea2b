"""What the planner knows of a model: its parameters, module by module, read from ``config.json`` only.

No weights are read. ``transformers.AutoConfig`` turns the folder's ``config.json`` into the
architecture's config (so a key the file leaves out takes the architecture's default, as it does
when the model is loaded), and :func:`model_shape` lists the modules that own parameters, in the
order a forward pass runs them, each with its own parameters (``recurse=False``, as ZeRO-3 fetches
them). A tied output layer reuses the embedding's parameter (the same key), so it is counted once
in :attr:`ModelShape.params` but fetched twice in a trace, as DeepSpeed does.

Counted exactly for the families below (``tests/test_plan.py`` builds each on the meta device and
compares the totals and every module's own parameters):

========================================  ==================================================
``model_type``                            layout
========================================  ==================================================
``llama``, ``mistral``, ``qwen2``,         RMSNorm, q/k/v/o projections (grouped-query attention,
``qwen3``                                  Qwen2: q/k/v biases; Qwen3: q/k norms), SwiGLU MLP
``phi3``                                   as Llama with fused ``qkv_proj`` and ``gate_up_proj``
``gpt2``                                   learned positions, fused ``c_attn``, GELU MLP, tied head
``opt``                                    learned positions (+2 rows), LayerNorm, ReLU MLP, tied head
``gpt_neox``                               fused ``query_key_value``, parallel residual, untied head
========================================  ==================================================
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from mlot_ds.errors import BadInput

LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")
FAMILIES = {**{name: "llama" for name in LLAMA_LIKE}, "phi3": "phi3", "gpt2": "gpt2", "opt": "opt",
            "gpt_neox": "gpt_neox"}
"""``model_type`` -> the family whose layout (and activation table) it uses."""


class PlanError(BadInput, ValueError):
    """The planner cannot plan: the message names the model folder, field or file and why."""


@dataclass(frozen=True)
class Param:
    """One parameter: ``key`` is unique in the model (a tied head reuses the embedding's key)."""

    key: str
    numel: int


@dataclass(frozen=True)
class Module:
    """A module that owns parameters, with only its own (``recurse=False``); ``layer``: its decoder
    layer's index, ``None`` outside the layers."""

    name: str
    params: tuple[Param, ...]
    layer: int | None = None

    @property
    def numel(self) -> int:
        return sum(p.numel for p in self.params)


@dataclass(frozen=True)
class ModelShape:
    """A causal LM as the planner sees it.

    Attributes:
        source: the folder (or a label) it was read from, for messages.
        model_type, family: the config's ``model_type`` and its family in :data:`FAMILIES`.
        hidden, layers, heads, kv_heads, head_dim, intermediate: the decoder's sizes.
        vocab: embedding rows (the output layer's rows), which may exceed the tokenizer's length.
        tied: the output layer shares the input embedding's weight.
        checkpoint_dtype: the dtype the checkpoint says it was saved in (information only: a run
            loads in the recipe's ``dtype``).
        modules: every parameter-owning module in forward order.
    """

    source: str
    model_type: str
    family: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    checkpoint_dtype: str | None
    modules: tuple[Module, ...]

    @cached_property
    def params(self) -> int:
        """Distinct parameters (a tied head counted once), as ``model_to_params`` in DeepSpeed."""
        return sum({p.key: p.numel for m in self.modules for p in m.params}.values())

    @cached_property
    def largest_module(self) -> int:
        """The most parameters any one module owns (DeepSpeed's "largest layer")."""
        return max(m.numel for m in self.modules)

    @cached_property
    def input_embedding_params(self) -> int:
        """Token (and learned position) embedding rows: looked up, not multiplied, in a forward."""
        names = ("embed_tokens", "wte", "wpe", "embed_positions", "embed_in")
        return sum(m.numel for m in self.modules if m.name.rsplit(".", 1)[-1] in names)

    @cached_property
    def matmul_params(self) -> int:
        """Parameters that cost ``2`` FLOPs per token in a forward: everything but the looked-up
        embeddings, plus the output layer again when it is tied (it is multiplied, once)."""
        head = self.vocab * self.head_input_size if self.tied else 0
        return self.params - self.input_embedding_params + head

    @property
    def head_input_size(self) -> int:
        """Columns of the output layer (OPT may project the hidden state down first)."""
        return self.modules[-1].numel // self.vocab

    def persistent_params(self, threshold: int) -> int:
        """Parameters below ZeRO-3's ``stage3_param_persistence_threshold``: kept whole on every rank."""
        return sum({p.key: p.numel for m in self.modules for p in m.params if p.numel < threshold}.values())


# ---------------------------------------------------------------------------------------------
# Reading


def read_config(folder: str | Path, where: str):
    """The architecture config of a local model folder (``config.json`` only, nothing downloaded)."""
    path = Path(folder).expanduser()
    if not (path / "config.json").is_file():
        raise PlanError(f"{where}: {path} has no config.json (the planner reads only a model's config.json)")
    # transformers is imported here: the planner's own modules stay importable without it.
    from transformers import AutoConfig

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PlanError(f"{where}: {path / 'config.json'} is not a config transformers can read "
                        f"({str(exc).splitlines()[0]})") from None
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def model_shape(folder: str | Path, where: str) -> ModelShape:
    """:class:`ModelShape` of the model in ``folder`` (its ``config.json``)."""
    return shape_from_config(read_config(folder, where), str(folder), where)


def shape_from_config(config, source: str, where: str = "model") -> ModelShape:
    model_type = getattr(config, "model_type", None)
    family = FAMILIES.get(model_type)
    if family is None:
        raise PlanError(f"{where}: model type {model_type!r} ({source}) is not one the planner knows; "
                        f"it plans {', '.join(sorted(FAMILIES))}")
    builders = {"llama": _llama_like, "phi3": _phi3, "gpt2": _gpt2, "opt": _opt, "gpt_neox": _gpt_neox}
    sizes, modules = builders[family](config)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return ModelShape(source=source, model_type=model_type, family=family, vocab=int(config.vocab_size),
                      checkpoint_dtype=str(dtype).replace("torch.", "") if dtype is not None else None,
                      modules=tuple(modules), **sizes)


# ---------------------------------------------------------------------------------------------
# Layouts: each returns (sizes, modules in forward order)


def _linear(name: str, rows: int, cols: int, bias: bool, layer: int | None = None) -> Module:
    params = (Param(f"{name}.weight", rows * cols),) + ((Param(f"{name}.bias", rows),) if bias else ())
    return Module(name, params, layer)


def _norm(name: str, size: int, bias: bool, layer: int | None = None) -> Module:
    return Module(name, (Param(f"{name}.weight", size),) + ((Param(f"{name}.bias", size),) if bias else ()), layer)


def _embedding(name: str, rows: int, cols: int) -> Module:
    return Module(name, (Param(f"{name}.weight", rows * cols),))


def _head(config, embedding: Module, cols: int) -> Module:
    if getattr(config, "tie_word_embeddings", False):
        return Module("lm_head", embedding.params)
    return _linear("lm_head", int(config.vocab_size), cols, False)


def _sizes(config, hidden, layers, heads, kv_heads, head_dim, intermediate, tied) -> dict:
    return {"hidden": int(hidden), "layers": int(layers), "heads": int(heads), "kv_heads": int(kv_heads),
            "head_dim": int(head_dim), "intermediate": int(intermediate), "tied": bool(tied)}


def _llama_like(config):
    hidden, heads = config.hidden_size, config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    model_type = config.model_type
    qkv_bias = True if model_type == "qwen2" else bool(getattr(config, "attention_bias", False))
    o_bias = False if model_type == "qwen2" else bool(getattr(config, "attention_bias", False))
    mlp_bias = bool(getattr(config, "mlp_bias", False))
    inter = config.intermediate_size
    embed = _embedding("model.embed_tokens", config.vocab_size, hidden)
    modules = [embed]
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}"
        modules += [_norm(f"{p}.input_layernorm", hidden, False, i),
                    _linear(f"{p}.self_attn.q_proj", heads * head_dim, hidden, qkv_bias, i),
                    _linear(f"{p}.self_attn.k_proj", kv_heads * head_dim, hidden, qkv_bias, i),
                    _linear(f"{p}.self_attn.v_proj", kv_heads * head_dim, hidden, qkv_bias, i)]
        if model_type == "qwen3":
            modules += [_norm(f"{p}.self_attn.q_norm", head_dim, False, i), _norm(f"{p}.self_attn.k_norm", head_dim, False, i)]
        modules += [_linear(f"{p}.self_attn.o_proj", hidden, heads * head_dim, o_bias, i),
                    _norm(f"{p}.post_attention_layernorm", hidden, False, i),
                    _linear(f"{p}.mlp.gate_proj", inter, hidden, mlp_bias, i),
                    _linear(f"{p}.mlp.up_proj", inter, hidden, mlp_bias, i),
                    _linear(f"{p}.mlp.down_proj", hidden, inter, mlp_bias, i)]
    modules += [_norm("model.norm", hidden, False), _head(config, embed, hidden)]
    tied = bool(getattr(config, "tie_word_embeddings", False))
    return _sizes(config, hidden, config.num_hidden_layers, heads, kv_heads, head_dim, inter, tied), modules


def _phi3(config):
    hidden, heads = config.hidden_size, config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    inter = config.intermediate_size
    embed = _embedding("model.embed_tokens", config.vocab_size, hidden)
    modules = [embed]
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}"
        modules += [_norm(f"{p}.input_layernorm", hidden, False, i),
                    _linear(f"{p}.self_attn.qkv_proj", (heads + 2 * kv_heads) * head_dim, hidden, False, i),
                    _linear(f"{p}.self_attn.o_proj", hidden, heads * head_dim, False, i),
                    _norm(f"{p}.post_attention_layernorm", hidden, False, i),
                    _linear(f"{p}.mlp.gate_up_proj", 2 * inter, hidden, False, i),
                    _linear(f"{p}.mlp.down_proj", hidden, inter, False, i)]
    modules += [_norm("model.norm", hidden, False), _head(config, embed, hidden)]
    tied = bool(getattr(config, "tie_word_embeddings", False))
    return _sizes(config, hidden, config.num_hidden_layers, heads, kv_heads, head_dim, inter, tied), modules


def _gpt2(config):
    hidden, heads = config.n_embd, config.n_head
    inter = config.n_inner or 4 * hidden
    wte = _embedding("transformer.wte", config.vocab_size, hidden)
    modules = [wte, _embedding("transformer.wpe", config.n_positions, hidden)]
    for i in range(config.n_layer):
        p = f"transformer.h.{i}"
        modules += [_norm(f"{p}.ln_1", hidden, True, i), _linear(f"{p}.attn.c_attn", 3 * hidden, hidden, True, i),
                    _linear(f"{p}.attn.c_proj", hidden, hidden, True, i), _norm(f"{p}.ln_2", hidden, True, i),
                    _linear(f"{p}.mlp.c_fc", inter, hidden, True, i), _linear(f"{p}.mlp.c_proj", hidden, inter, True, i)]
    modules += [_norm("transformer.ln_f", hidden, True), _head(config, wte, hidden)]
    tied = bool(getattr(config, "tie_word_embeddings", True))
    return _sizes(config, hidden, config.n_layer, heads, heads, hidden // heads, inter, tied), modules


def _opt(config):
    hidden, heads, inter = config.hidden_size, config.num_attention_heads, config.ffn_dim
    project = config.word_embed_proj_dim
    bias = bool(getattr(config, "enable_bias", True))
    affine = bool(getattr(config, "layer_norm_elementwise_affine", True))
    embed = _embedding("model.decoder.embed_tokens", config.vocab_size, project)
    # OPT's learned positions carry an offset of 2 rows.
    modules = [embed, _embedding("model.decoder.embed_positions", config.max_position_embeddings + 2, hidden)]
    if project != hidden:
        modules.append(_linear("model.decoder.project_in", hidden, project, False))
    for i in range(config.num_hidden_layers):
        p = f"model.decoder.layers.{i}"
        norm = (lambda name: [_norm(name, hidden, True, i)]) if affine else (lambda name: [])
        modules += norm(f"{p}.self_attn_layer_norm")
        modules += [_linear(f"{p}.self_attn.{n}", hidden, hidden, bias, i) for n in ("q_proj", "k_proj", "v_proj", "out_proj")]
        modules += norm(f"{p}.final_layer_norm")
        modules += [_linear(f"{p}.fc1", inter, hidden, bias, i), _linear(f"{p}.fc2", hidden, inter, bias, i)]
    if config.do_layer_norm_before and not getattr(config, "_remove_final_layer_norm", False) and affine:
        modules.append(_norm("model.decoder.final_layer_norm", hidden, True))
    if project != hidden:
        modules.append(_linear("model.decoder.project_out", project, hidden, False))
    modules.append(_head(config, embed, project))
    tied = bool(getattr(config, "tie_word_embeddings", True))
    return _sizes(config, hidden, config.num_hidden_layers, heads, heads, hidden // heads, inter, tied), modules


def _gpt_neox(config):
    hidden, heads, inter = config.hidden_size, config.num_attention_heads, config.intermediate_size
    bias = bool(getattr(config, "attention_bias", True))
    embed = _embedding("gpt_neox.embed_in", config.vocab_size, hidden)
    modules = [embed]
    for i in range(config.num_hidden_layers):
        p = f"gpt_neox.layers.{i}"
        modules += [_norm(f"{p}.input_layernorm", hidden, True, i),
                    _linear(f"{p}.attention.query_key_value", 3 * hidden, hidden, bias, i),
                    _linear(f"{p}.attention.dense", hidden, hidden, bias, i),
                    _norm(f"{p}.post_attention_layernorm", hidden, True, i),
                    _linear(f"{p}.mlp.dense_h_to_4h", inter, hidden, True, i),
                    _linear(f"{p}.mlp.dense_4h_to_h", hidden, inter, True, i)]
    modules.append(_norm("gpt_neox.final_layer_norm", hidden, True))
    modules.append(_head(config, embed, hidden))  # transformers 5 names GPT-NeoX's output layer lm_head
    tied = bool(getattr(config, "tie_word_embeddings", False))
    return _sizes(config, hidden, config.num_hidden_layers, heads, heads, hidden // heads, inter, tied), modules


__all__ = ["FAMILIES", "Module", "ModelShape", "Param", "PlanError", "model_shape", "read_config", "shape_from_config"]
