"""Model configurations of the zoo members: standard ``transformers`` architectures, randomly initialised.

| member | architecture | embedding rows |
|---|---|---|
| teacher-llama | ``LlamaForCausalLM`` (RoPE, RMSNorm, SwiGLU, grouped-query attention, untied head) | ``len(tokenizer)`` |
| teacher-qwen | ``Qwen2ForCausalLM`` (tied head) | ``len(tokenizer)`` rounded *up* past the next multiple of 128 |
| teacher-opt | ``OPTForCausalLM`` (learned positions, pre-LayerNorm) | ``len(tokenizer)`` |
| student | ``GPT2LMHeadModel`` | ``len(tokenizer)`` |
| student-wide | ``GPT2LMHeadModel`` | ``len(tokenizer)`` |
| student-smol | ``LlamaForCausalLM`` (as SmolLM2: tied head, grouped-query attention) | ``len(tokenizer)`` (49,152) |

teacher-qwen's extra rows copy released Qwen checkpoints, whose embedding is larger than the
tokenizer: code that reads logits must never assume ``logits.shape[-1] == len(tokenizer)``.
Dropout is off everywhere: the models are trained for a few hundred steps only.
"""

from __future__ import annotations

from transformers import (
    GenerationConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from mlot_ds.zoo.settings import MemberSpec

QWEN_EMBEDDING_MULTIPLE = 128
GENERATION_MAX_NEW_TOKENS = 96
ARCHITECTURES = {
    "teacher-llama": "LlamaForCausalLM",
    "teacher-qwen": "Qwen2ForCausalLM",
    "teacher-opt": "OPTForCausalLM",
    "student": "GPT2LMHeadModel",
    "student-wide": "GPT2LMHeadModel",
    "student-smol": "LlamaForCausalLM",
}


def padded_vocab_size(tokenizer_length: int, multiple: int = QWEN_EMBEDDING_MULTIPLE) -> int:
    """The smallest multiple of ``multiple`` strictly greater than ``tokenizer_length``."""
    return (tokenizer_length // multiple + 1) * multiple


def build_model(member: str, spec: MemberSpec, tokenizer: PreTrainedTokenizerBase, context_length: int) -> PreTrainedModel:
    """A freshly initialised model for ``member`` whose special-token ids match ``tokenizer``.

    Initialisation draws from the global torch RNG: seed it first for a reproducible model.
    """
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    # Llama and Qwen2 share one decoder layout; they differ in vocabulary rows and head tying.
    decoder = dict(
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=max(1, spec.num_heads // 2),
        max_position_embeddings=context_length,
        **ids,
    )
    if member == "teacher-llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=False, **decoder))
    elif member == "student-smol":
        # SmolLM2 ties its head to the embedding; with 49k rows the head would otherwise dominate.
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=True, **decoder))
    elif member == "teacher-qwen":
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=padded_vocab_size(len(tokenizer)), tie_word_embeddings=True,
                                             **decoder))
    elif member == "teacher-opt":
        config = OPTConfig(
            vocab_size=len(tokenizer),
            hidden_size=spec.hidden_size,
            ffn_dim=spec.intermediate_size,
            num_hidden_layers=spec.num_layers,
            num_attention_heads=spec.num_heads,
            word_embed_proj_dim=spec.hidden_size,
            max_position_embeddings=context_length,
            do_layer_norm_before=True,
            dropout=0.0,
            attention_dropout=0.0,
            **ids,
        )
        model = OPTForCausalLM(config)
    elif member in ("student", "student-wide"):
        config = GPT2Config(
            vocab_size=len(tokenizer),
            n_embd=spec.hidden_size,
            n_inner=spec.intermediate_size,
            n_layer=spec.num_layers,
            n_head=spec.num_heads,
            n_positions=context_length,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **ids,
        )
        model = GPT2LMHeadModel(config)
    else:
        raise ValueError(f"unknown zoo member {member!r}; expected one of {sorted(ARCHITECTURES)}")
    model.generation_config = GenerationConfig(
        max_new_tokens=GENERATION_MAX_NEW_TOKENS, do_sample=False, **ids
    )
    return model
