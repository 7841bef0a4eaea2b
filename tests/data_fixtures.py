"""Real tokenizers of several kinds, trained in seconds, for the data and pairing tests.

- ``gpt2``: the real GPT-2 byte-level BPE from ``../shared/tokenizers/gpt2`` (skipped when absent).
- ``sp_bpe``: a SentencePiece BPE with byte fallback and the ``▁`` dummy prefix, trained here with
  ``sentencepiece`` and loaded as a (fast, converted) ``LlamaTokenizer`` that adds a BOS.
- ``sp_slow``: the same SentencePiece model behind a slow tokenizer (``GPTSw3Tokenizer``, a
  ``SentencePieceBackend``) that has no offset mapping.
- ``unigram``: a Unigram model with Metaspace trained with ``tokenizers`` and wrapped by transformers.
- ``wordpiece``: an uncased WordPiece (lower-cases: its tokens do not spell the text back).

Each builder caches its result for the session (files in a temporary directory, the tokenizer
object in memory: tests must not modify it; ``with_chat_template`` returns a modified copy).
"""

from __future__ import annotations

import functools
import json
import random
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
GPT2_DIR = SHARED / "tokenizers" / "gpt2"

# Text the tests use; the fixture corpora contain all its characters so the Unigram and
# WordPiece models can spell it without <unk>.
UNICODE_SAMPLES = [
    "Café naïve résumé — déjà vu.",
    "東京は日本の首都です。",
    "Emoji: 😀👍🏽 and ✓ done!",
    "Mixed: Ünïcödé 中文 text 🙂 end",
    "Zürich, São Paulo, Kraków.",
    "#Person1# asks #Person2# about the 3:45 train.",
    "a  b   c\tnew\nline",
    "Mr. Smith's getting a check-up, and Doctor Hawkins advises him to have one every year.",
    "Wilhelm Conrad Röntgen , of Germany",
]
_WORDS = (
    "the quick brown fox jumps over lazy dog summary dialogue person answer question story once "
    "upon time train station ticket doctor check smoking year information help"
).split()


def corpus(lines: int = 400, seed: int = 0) -> list[str]:
    generator = random.Random(seed)
    texts = [" ".join(generator.choice(_WORDS) for _ in range(generator.randint(4, 12))) for _ in range(lines)]
    ascii_line = "".join(chr(c) for c in range(33, 127))  # every printable ASCII character
    return texts + UNICODE_SAMPLES * 3 + [ascii_line, "Question 0123456789: <|im_start|>user Be brief.<|im_end|>"]


@functools.lru_cache(maxsize=None)
def _workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="mlot-data-fixtures-"))


@functools.lru_cache(maxsize=None)
def gpt2():
    if not (GPT2_DIR / "tokenizer.json").exists():
        pytest.skip(f"needs the GPT-2 tokenizer at {GPT2_DIR} (present in CI, absent in a user's clone)")
    from mlot_ds.data import load_tokenizer

    return load_tokenizer(GPT2_DIR)


@functools.lru_cache(maxsize=None)
def sp_model_file() -> Path:
    import sentencepiece as spm

    prefix = _workdir() / "sp_bpe"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_prefix=str(prefix), model_type="bpe", vocab_size=320,
        byte_fallback=True, character_coverage=0.98, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2,
    )
    return prefix.with_suffix(".model")


@functools.lru_cache(maxsize=None)
def sp_bpe_dir() -> Path:
    folder = _workdir() / "sp_bpe_tokenizer"
    folder.mkdir(exist_ok=True)
    (folder / "tokenizer.model").write_bytes(sp_model_file().read_bytes())
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
              "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@functools.lru_cache(maxsize=None)
def sp_bpe():
    from mlot_ds.data import load_tokenizer

    return load_tokenizer(sp_bpe_dir())


@functools.lru_cache(maxsize=None)
def sp_slow():
    from transformers import GPTSw3Tokenizer

    return GPTSw3Tokenizer(vocab_file=str(sp_model_file()), name_or_path="sp-slow-fixture")


@functools.lru_cache(maxsize=None)
def unigram_dir() -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    model = Tokenizer(models.Unigram())
    model.pre_tokenizer = pre_tokenizers.Metaspace()
    model.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], unk_token="<unk>",
                                      show_progress=False)
    model.train_from_iterator(corpus(), trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=model, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    folder = _workdir() / "unigram_tokenizer"
    wrapped.save_pretrained(folder)
    return folder


@functools.lru_cache(maxsize=None)
def unigram():
    from mlot_ds.data import load_tokenizer

    return load_tokenizer(unigram_dir())


@functools.lru_cache(maxsize=None)
def wordpiece_dir() -> Path:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    model = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    model.normalizer = normalizers.BertNormalizer(lowercase=True)
    model.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    model.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[UNK]", "[PAD]", "[SEP]"], show_progress=False)
    model.train_from_iterator(corpus(), trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=model, unk_token="[UNK]", pad_token="[PAD]", eos_token="[SEP]")
    folder = _workdir() / "wordpiece_tokenizer"
    wrapped.save_pretrained(folder)
    return folder


@functools.lru_cache(maxsize=None)
def wordpiece():
    from mlot_ds.data import load_tokenizer

    return load_tokenizer(wordpiece_dir())


CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def with_chat_template(tokenizer):
    """A copy of ``tokenizer`` with a ChatML chat template (the markers are plain text here)."""
    import copy

    chat = copy.deepcopy(tokenizer)
    chat.chat_template = CHATML_TEMPLATE
    return chat


BUILDERS = {"gpt2": gpt2, "sp_bpe": sp_bpe, "sp_slow": sp_slow, "unigram": unigram, "wordpiece": wordpiece}
LOSSLESS = ("gpt2", "sp_bpe", "sp_slow", "unigram")  # tokenizers whose tokens spell the text exactly
