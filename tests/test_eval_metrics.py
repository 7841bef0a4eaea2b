"""Text metrics checked against hand-computed values."""

import pytest

from mlot_ds.eval.metrics import exact_match, normalize_answer, rouge_lsum, split_sentences, squad_f1


def test_sentence_split_for_lsum():
    assert split_sentences("A b. C d? E!\nF") == "A b.\nC d?\nE!\nF"


def test_squad_normalisation_and_f1_by_hand():
    assert normalize_answer("The  Quick, brown fox!") == "quick brown fox"
    # prediction tokens: wilhelm conrad rontgen; gold: wilhelm conrad röntgen of germany -> common 2
    f1 = squad_f1("Wilhelm Conrad Rontgen", ["Wilhelm Conrad Röntgen , of Germany"])
    precision, recall = 2 / 3, 2 / 5
    assert f1 == pytest.approx(100 * 2 * precision * recall / (precision + recall))
    assert squad_f1("x", ["y", "x"]) == 100.0  # best reference wins
    assert exact_match("the Answer.", ["answer"]) == 100.0
    assert exact_match("answers", ["answer"]) == 0.0


def test_rouge_lsum_identity_disjoint_and_best_reference():
    assert rouge_lsum("the cat sat. it was happy.", ["the cat sat. it was happy."]) == pytest.approx(100.0)
    assert rouge_lsum("zebra quantum", ["the cat sat"]) == 0.0
    low = rouge_lsum("the cat sat", ["a dog ran far away today"])
    best = rouge_lsum("the cat sat", ["a dog ran far away today", "the cat sat"])
    assert best == pytest.approx(100.0) and best > low


def test_rouge_lsum_by_hand():
    # single sentence: LCS("a b c d", "a c d e") = 3 -> P = R = 3/4 -> F = 0.75
    assert rouge_lsum("a b c d", ["a c d e"]) == pytest.approx(75.0)
