"""Text metrics of the paper's tasks: ROUGE-LSum (DialogSum, FairytaleQA) and SQuAD F1 / EM (QED).

Every metric takes one prediction and several references and keeps the best reference, as the
benchmarks do (DialogSum test has three references, FairytaleQA two, QED several gold answers).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from functools import lru_cache

from rouge_score import rouge_scorer

# ROUGE-LSum scores the union LCS over sentences, which rouge-score reads from newlines. nltk's
# punkt splitter needs a data download, so split after sentence-final punctuation instead.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text: str) -> str:
    """One sentence per line, as ROUGE-LSum expects."""
    lines = []
    for line in text.strip().splitlines():
        lines.extend(part.strip() for part in _SENTENCE_END.split(line) if part.strip())
    return "\n".join(lines)


@lru_cache(maxsize=1)
def _rouge_scorer():

    return rouge_scorer.RougeScorer(["rougeLsum"], use_stemmer=True)


def rouge_lsum(prediction: str, references: list[str] | tuple[str, ...]) -> float:
    """Best ROUGE-LSum F-measure over the references, in [0, 100]."""
    if not references:
        raise ValueError("rouge_lsum needs at least one reference")
    scorer = _rouge_scorer()
    candidate = split_sentences(prediction)
    return 100.0 * max(scorer.score(split_sentences(ref), candidate)["rougeLsum"].fmeasure for ref in references)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def squad_f1(prediction: str, references: list[str] | tuple[str, ...]) -> float:
    """Best token-overlap F1 over the references, in [0, 100]."""
    best = 0.0
    predicted = normalize_answer(prediction).split()
    for reference in references:
        gold = normalize_answer(reference).split()
        if not predicted or not gold:
            best = max(best, 100.0 * float(predicted == gold))
            continue
        common = sum((Counter(predicted) & Counter(gold)).values())
        if common == 0:
            continue
        precision, recall = common / len(predicted), common / len(gold)
        best = max(best, 100.0 * 2 * precision * recall / (precision + recall))
    return best


def exact_match(prediction: str, references: list[str] | tuple[str, ...]) -> float:
    """100 if the normalised prediction equals a normalised reference, else 0."""
    predicted = normalize_answer(prediction)
    return 100.0 * float(any(predicted == normalize_answer(ref) for ref in references))


METRICS_BY_ADAPTER = {
    "dialogsum": ("rouge_lsum",),
    "fairytaleqa": ("rouge_lsum",),
    "qed": ("f1", "exact_match"),
    "jsonl": ("rouge_lsum",),
}

METRIC_FUNCTIONS = {"rouge_lsum": rouge_lsum, "f1": squad_f1, "exact_match": exact_match}
