"""Greedy generation and evaluate_records on tiny-zoo models, against loops written here."""

from __future__ import annotations

import pytest
import torch

from mlot_ds.data import Template, load_records, prompt_token_ids
from mlot_ds.eval import evaluate_records, greedy_generate, metric_names
from mlot_ds.zoo import corpus_path


def load(tiny_zoo, member, scramble=False):
    """A tiny-zoo model; ``scramble`` redraws its weights large, so that greedy tokens depend on
    every position of the context (the trained tiny models repeat one token, which hides padding bugs)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mlot_ds.zoo import ZooSettings, zoo_member_path

    folder = zoo_member_path(member, ZooSettings(profile="tiny"), cache_dir=tiny_zoo)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    if scramble:
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return model, AutoTokenizer.from_pretrained(folder)


def reference_greedy(model, tokenizer, ids, max_new_tokens):
    """One prompt, no padding, no cache: append the arg-max token until EOS or the limit."""
    tokens = list(ids)
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=torch.tensor([tokens])).logits[0, -1]
            token = int(logits.argmax())
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
            tokens.append(token)
    return tokenizer.decode(new, skip_special_tokens=True).strip()


@pytest.fixture(scope="module")
def records():
    return load_records("dialogsum", corpus_path("test"), limit=5).records


@pytest.mark.parametrize("member", ["student", "teacher-llama", "teacher-opt"])
def test_left_padded_batches_equal_unpadded_single_prompts(tiny_zoo, records, member):
    model, tokenizer = load(tiny_zoo, member, scramble=True)
    # Prompts of very different lengths, so that the batch really pads.
    ids = [prompt_token_ids(Template(), tokenizer, r.prompt)[-length:] for r, length in zip(records, (200, 37, 120, 9, 64))]
    batched = greedy_generate(model, tokenizer, ids, batch_size=5, max_new_tokens=6)
    again = greedy_generate(model, tokenizer, ids, batch_size=2, max_new_tokens=6)
    single = [reference_greedy(model, tokenizer, one, 6) for one in ids]
    assert batched == single
    assert again == single
    assert len(set(single)) >= 3 and all(single), single  # the check has teeth


def test_long_prompts_lose_tokens_from_the_left(tiny_zoo, records):
    model, tokenizer = load(tiny_zoo, "student", scramble=True)
    ids = prompt_token_ids(Template(), tokenizer, records[0].prompt)
    assert len(ids) > 60
    cut = greedy_generate(model, tokenizer, [ids], batch_size=1, max_new_tokens=5, max_length=60)
    assert cut == [reference_greedy(model, tokenizer, ids[-55:], 5)]
    assert cut != [reference_greedy(model, tokenizer, ids[-200:], 5)]  # the cut context matters


def test_bad_arguments_get_one_clear_error(tiny_zoo):
    model, tokenizer = load(tiny_zoo, "student")
    with pytest.raises(ValueError, match="prompt 1 has no tokens"):
        greedy_generate(model, tokenizer, [[5, 6], []], batch_size=2, max_new_tokens=2)
    with pytest.raises(ValueError, match="no room for a prompt"):
        greedy_generate(model, tokenizer, [[5]], batch_size=1, max_new_tokens=8, max_length=8)


def test_evaluate_records_names_and_means(tiny_zoo, records):
    from rouge_score import rouge_scorer

    model, tokenizer = load(tiny_zoo, "teacher-llama")
    result = evaluate_records(model, tokenizer, records, adapter="dialogsum", template=Template(), batch_size=3,
                              max_new_tokens=8, max_length=384)
    assert tuple(result.metrics) == metric_names("dialogsum") == ("eval/bits_per_byte", "eval/rouge_lsum")
    assert metric_names("qed") == ("eval/bits_per_byte", "eval/f1", "eval/exact_match")
    assert len(result.predictions) == len(records)
    scorer = rouge_scorer.RougeScorer(["rougeLsum"], use_stemmer=True)
    # ROUGE-LSum needs one sentence per line; the DialogSum references are short sentences.
    split = lambda text: "\n".join(
        s.strip() for s in text.replace("? ", "?\n").replace("! ", "!\n").replace(". ", ".\n").splitlines()
    )  # noqa: E731
    expected = sum(
        max(scorer.score(split(ref), split(pred))["rougeLsum"].fmeasure for ref in r.references)
        for pred, r in zip(result.predictions, records)
    ) / len(records)
    assert result.metrics["eval/rouge_lsum"] == pytest.approx(100 * expected)
    assert 0 < result.metrics["eval/bits_per_byte"] < 16
