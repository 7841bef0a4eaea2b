"""Loading a tokenizer from a local path, with a pad token fixed up."""

from __future__ import annotations

import warnings
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

ADDED_PAD_TOKEN = "<pad>"


def load_tokenizer(path: str | Path, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load the tokenizer stored at ``path`` (never downloads) and make sure it has a pad token.

    A missing pad token becomes the EOS token, else the UNK token. Only a tokenizer with neither
    gets a new ``<pad>`` token, with a warning: that grows ``len(tokenizer)`` by one, beyond the
    model's embedding rows. (The data pipeline never lets the pad id reach a model: padded
    positions are masked and filled with an id the model has.)

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` exists but holds no loadable tokenizer.
    """
    location = Path(path).expanduser()
    if not location.exists():
        raise FileNotFoundError(
            f"tokenizer path {location} does not exist; expected a local directory with tokenizer files "
            "(tokenizer.json, tokenizer.model or vocab files). Nothing is downloaded."
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(location), local_files_only=True, trust_remote_code=trust_remote_code
        )
    except Exception as error:  # transformers raises OSError, ValueError, KeyError... for bad dirs
        raise ValueError(f"cannot load a tokenizer from {location}: {type(error).__name__}: {error}") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        elif tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            tokenizer.add_special_tokens({"pad_token": ADDED_PAD_TOKEN})
            warnings.warn(
                f"tokenizer at {location} has no pad, EOS or UNK token; added {ADDED_PAD_TOKEN!r} "
                f"(id {tokenizer.pad_token_id}), which the model has no embedding for",
                stacklevel=2,
            )
    return tokenizer
