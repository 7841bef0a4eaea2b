"""The zoo's batch streams and training loop, on a character tokenizer whose ids are known by hand."""

from __future__ import annotations

import itertools

import pytest
import torch
from tokenizers import Tokenizer, models, processors
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from mlot_ds.zoo.training import IGNORE_INDEX, pretraining_batches, train_causal_lm, tuning_batches

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
ALPHABET = list("abcdefghijklmnopqrstuvwxyz .:\n")
PAD, BOS, EOS = 0, 1, 2


@pytest.fixture(scope="module")
def tokenizer():
    vocab = {token: index for index, token in enumerate(SPECIALS + ALPHABET)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_pretraining_packs_documents_with_bos_and_eos(tokenizer):
    documents = ["abc", "de", "fghij", "k"]
    stream = [
        BOS,
        *ids(tokenizer, "abc"),
        EOS,
        BOS,
        *ids(tokenizer, "de"),
        EOS,
        BOS,
        *ids(tokenizer, "fghij"),
        EOS,
        BOS,
        *ids(tokenizer, "k"),
        EOS,
    ]
    assert len(stream) // 4 == 4  # four full blocks, the last three tokens dropped
    batches = pretraining_batches(tokenizer, documents, block_length=4, batch_size=2, seed=0)
    one_epoch = [tuple(row.tolist()) for batch in itertools.islice(batches, 2) for row in batch["input_ids"]]
    assert sorted(one_epoch) == sorted(tuple(stream[i : i + 4]) for i in range(0, 16, 4))
    batch = next(pretraining_batches(tokenizer, documents, block_length=4, batch_size=2, seed=0))
    assert torch.equal(batch["labels"], batch["input_ids"]) and batch["attention_mask"].all()
    again = next(pretraining_batches(tokenizer, documents, block_length=4, batch_size=2, seed=0))
    assert torch.equal(batch["input_ids"], again["input_ids"])
    with pytest.raises(ValueError, match="pretraining corpus too small"):
        next(pretraining_batches(tokenizer, ["ab"], block_length=4, batch_size=2, seed=0))


def test_tuning_labels_only_the_response_and_eos(tokenizer):
    examples = [("ctx one:\n", "ab"), ("c:\n", "xyz"), ("longer context here:\n", "q")]
    batch = next(tuning_batches(tokenizer, examples, context_length=64, batch_size=3, seed=0))
    rows = {}
    for row in range(3):
        length = int(batch["attention_mask"][row].sum())
        tokens = batch["input_ids"][row, :length].tolist()
        labelled = [t for t in batch["labels"][row].tolist() if t != IGNORE_INDEX]
        assert batch["input_ids"][row, length:].eq(PAD).all() and batch["labels"][row, length:].eq(IGNORE_INDEX).all()
        rows[tuple(tokens)] = labelled
    for context, response in examples:
        tokens = (BOS, *ids(tokenizer, context), *ids(tokenizer, response), EOS)
        assert rows[tokens] == [*ids(tokenizer, response), EOS]


def test_tuning_cuts_long_contexts_from_the_left(tokenizer):
    examples = [("abcdefghij:\n", "xy"), ("a:\n", "xy")]
    batch = next(tuning_batches(tokenizer, examples, context_length=6, batch_size=2, seed=0))
    long_row = int(batch["attention_mask"].sum(dim=1).argmax())
    assert batch["input_ids"][long_row].tolist() == [*ids(tokenizer, "j:\n"), *ids(tokenizer, "xy"), EOS]


def test_training_lowers_the_loss_and_is_reproducible(tokenizer):
    documents = ["the cat sat on the mat. " * 4, "a dog ran in the park. " * 4] * 4

    def run():
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=1, n_head=2, n_positions=32))
        batches = pretraining_batches(tokenizer, documents, block_length=16, batch_size=4, seed=0)
        return train_causal_lm(model, batches, steps=25, learning_rate=1e-2, warmup_fraction=0.1, progress=False), model

    losses, model = run()
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    assert not model.training
    assert run()[0] == losses
