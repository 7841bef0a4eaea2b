"""bits_per_byte against hand-computed values and a float64 loop, with a model whose logits we control."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, models, processors
from transformers import PreTrainedTokenizerFast

from mlot_ds.eval import bits_per_byte

ALPHABET = list("abcdefghijklmnopqrstuvwxyz .:\né")
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
EXTRA_MODEL_ROWS = 3  # model vocabulary larger than the tokenizer, as in Qwen checkpoints


def char_tokenizer(padding_side: str = "right") -> PreTrainedTokenizerFast:
    """One token per character (no merges), BOS added: token counts are known by hand."""
    vocab = {token: index for index, token in enumerate(SPECIALS + ALPHABET)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side=padding_side,
    )


class BigramLM(torch.nn.Module):
    """``logits[b, t] = table[input_ids[b, t]] + anchor[input_ids[b, 0]]``.

    The next-token distribution depends on the last token and on the sequence's first token, so
    cutting a prompt from the left changes the result.
    """

    def __init__(self, table: torch.Tensor, anchor: torch.Tensor | None = None):
        super().__init__()
        self.table = torch.nn.Parameter(table)
        self.anchor = torch.nn.Parameter(torch.zeros_like(table) if anchor is None else anchor)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.table[input_ids] + self.anchor[input_ids[:, :1]])


def reference_bpb(table, tokenizer, prompts, responses, append_eos=True, max_length=None, anchor=None) -> float:
    """Plain float64 loop over every scored token."""
    anchor = torch.zeros_like(table) if anchor is None else anchor
    bits, total_bytes = 0.0, 0
    for prompt, response in zip(prompts, responses):
        prompt_ids = [tokenizer.bos_token_id] + [tokenizer.convert_tokens_to_ids(c) for c in prompt]
        response_ids = [tokenizer.convert_tokens_to_ids(c) for c in response]
        if append_eos:
            response_ids.append(tokenizer.eos_token_id)
        if max_length is not None:
            overflow = len(prompt_ids) + len(response_ids) - max_length
            prompt_ids = prompt_ids[max(overflow, 0) :]
        previous = prompt_ids[-1]
        for token in response_ids:
            log_probs = torch.log_softmax(table[previous].double() + anchor[prompt_ids[0]].double(), dim=-1)
            bits -= float(log_probs[token]) / math.log(2)
            previous = token
        total_bytes += len(response.encode("utf-8"))
    return bits / total_bytes


PROMPTS = ["summarize: ab\n", "x", "a longer prompt here.\n"]
RESPONSES = ["ab", "xyz", "café done."]


def test_uniform_model_costs_log2_vocab_per_token():
    tokenizer = char_tokenizer()
    vocab = len(tokenizer) + EXTRA_MODEL_ROWS
    model = BigramLM(torch.zeros(vocab, vocab))
    prompts, responses = ["q:", "hello"], ["ab", "xyz"]
    # 2 + 3 characters, one EOS each: 7 scored tokens over 5 bytes.
    expected = 7 * math.log2(vocab) / 5
    assert bits_per_byte(model, tokenizer, prompts, responses, batch_size=2) == pytest.approx(expected, rel=1e-6)
    without_eos = bits_per_byte(model, tokenizer, prompts, responses, batch_size=1, append_eos=False)
    assert without_eos == pytest.approx(math.log2(vocab), rel=1e-6)


def test_multibyte_characters_count_their_utf8_bytes():
    tokenizer = char_tokenizer()
    vocab = len(tokenizer)
    model = BigramLM(torch.zeros(vocab, vocab))
    # "é" is one token but two bytes: 1 token over 2 bytes, no EOS.
    value = bits_per_byte(model, tokenizer, ["a"], ["é"], batch_size=1, append_eos=False)
    assert value == pytest.approx(math.log2(vocab) / 2, rel=1e-6)


@pytest.mark.parametrize("batch_size", [1, 2, 3])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_matches_float64_loop_for_any_batching(batch_size, padding_side):
    tokenizer = char_tokenizer(padding_side)
    vocab = len(tokenizer) + EXTRA_MODEL_ROWS
    generator = torch.Generator().manual_seed(0)
    table, anchor = torch.randn(vocab, vocab, generator=generator) * 3, torch.randn(vocab, vocab, generator=generator)
    model = BigramLM(table, anchor)
    expected = reference_bpb(table, tokenizer, PROMPTS, RESPONSES, anchor=anchor)
    value = bits_per_byte(model, tokenizer, PROMPTS, RESPONSES, batch_size=batch_size)
    assert value == pytest.approx(expected, rel=1e-5)


def test_long_prompts_are_cut_from_the_left():
    tokenizer = char_tokenizer()
    vocab = len(tokenizer)
    generator = torch.Generator().manual_seed(1)
    table, anchor = torch.randn(vocab, vocab, generator=generator), torch.randn(vocab, vocab, generator=generator)
    model = BigramLM(table, anchor)
    expected = reference_bpb(table, tokenizer, PROMPTS, RESPONSES, max_length=14, anchor=anchor)
    uncut = reference_bpb(table, tokenizer, PROMPTS, RESPONSES, anchor=anchor)
    assert expected != pytest.approx(uncut, rel=1e-3)
    value = bits_per_byte(model, tokenizer, PROMPTS, RESPONSES, batch_size=2, max_length=14)
    assert value == pytest.approx(expected, rel=1e-5)


def test_restores_training_mode_and_leaves_inputs_alone():
    tokenizer = char_tokenizer()
    vocab = len(tokenizer)
    table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(2))
    model = BigramLM(table.clone())
    model.train()
    prompts, responses = list(PROMPTS), list(RESPONSES)
    bits_per_byte(model, tokenizer, prompts, responses, batch_size=2)
    assert model.training
    assert torch.equal(model.table.detach(), table)
    assert (prompts, responses) == (PROMPTS, RESPONSES)


def test_bad_input_is_named():
    tokenizer = char_tokenizer()
    model = BigramLM(torch.zeros(len(tokenizer), len(tokenizer)))
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        bits_per_byte(model, tokenizer, ["a", "b"], ["c"], batch_size=1)
    with pytest.raises(ValueError, match="no bytes"):
        bits_per_byte(model, tokenizer, ["a"], [""], batch_size=1)
    with pytest.raises(ValueError, match="response 0 has 6 tokens"):
        bits_per_byte(model, tokenizer, ["a"], ["abcde"], batch_size=1, max_length=6)
    with pytest.raises(ValueError, match="batch_size"):
        bits_per_byte(model, tokenizer, ["a"], ["b"], batch_size=0)
