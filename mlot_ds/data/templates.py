"""Prompt templates, set per model: how a record's prompt becomes the token ids before the response.

``plain`` (the default) renders ``prompt + "\\n"``; the response follows directly, with no
leading space. With ``few_shot = k``, the first ``k`` examples of the example pool come first, each
as ``example.prompt + "\\n" + example.response + "\\n\\n"``.

``chat`` calls the tokenizer's own ``apply_chat_template`` with an optional system turn, the
examples as earlier user/assistant turns, and the record's prompt as the last user turn (the
prompt string itself: the chat template's assistant header plays the role of the plain
template's ``"\\n"`` separator), with ``add_generation_prompt=True``.

The rendered text is tokenized without adding special tokens; for ``plain`` the tokenizer's
leading special ids (its BOS, when it adds one) are put in front. Chat templates write their own
BOS as text, so nothing is added and no BOS is doubled. For training and scoring, the rendered
prompt and the response are tokenized together, as one text (:mod:`mlot_ds.data.tokenize`).

The example pool is chosen by the caller. :class:`mlot_ds.data.pipeline.DistillationData` takes
it from the head of the training records and removes those records from training, so that no
model is trained on an example it also sees in its prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from transformers import PreTrainedTokenizerBase

from mlot_ds.data.records import Record
from mlot_ds.pairing.surface import leading_special_ids

TEMPLATE_KINDS = ("plain", "chat")


@dataclass(frozen=True)
class Template:
    """How one model's prompt is written (from the recipe)."""

    kind: str = "plain"
    system: str | None = None
    few_shot: int = 0

    def __post_init__(self):
        if self.kind not in TEMPLATE_KINDS:
            raise ValueError(f"template kind must be one of {TEMPLATE_KINDS}, got {self.kind!r}")
        if self.system is not None and self.kind != "chat":
            raise ValueError("template.system is only used by kind='chat'")
        if not isinstance(self.few_shot, int) or self.few_shot < 0:
            raise ValueError(f"template.few_shot must be a non-negative integer, got {self.few_shot!r}")


def render_plain(prompt: str, examples: Sequence[Record] = ()) -> str:
    """The plain template's text: examples as ``prompt\\nresponse\\n\\n`` blocks, then ``prompt\\n``."""
    return "".join(f"{e.prompt}\n{e.response}\n\n" for e in examples) + prompt + "\n"


def chat_messages(template: Template, prompt: str, examples: Sequence[Record] = ()) -> list[dict]:
    """The conversation handed to ``apply_chat_template`` for one record."""
    messages = [{"role": "system", "content": template.system}] if template.system is not None else []
    for example in examples:
        messages.append({"role": "user", "content": example.prompt})
        messages.append({"role": "assistant", "content": example.response})
    messages.append({"role": "user", "content": prompt})
    return messages


def render_prompt(
    template: Template, tokenizer: PreTrainedTokenizerBase, prompt: str, examples: Sequence[Record] = (), *, model: str = "model"
) -> str:
    """The prompt text for one record, before tokenization (``examples`` = the first few-shot ones)."""
    examples = list(examples)[: template.few_shot]
    if len(examples) < template.few_shot:
        raise ValueError(f"{model}: template asks for {template.few_shot} few-shot examples, only {len(examples)} given")
    if template.kind == "plain":
        return render_plain(prompt, examples)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"{model}: template kind 'chat' but the tokenizer ({tokenizer.name_or_path or type(tokenizer).__name__}) "
            "has no chat template; use kind 'plain' or a tokenizer with a chat_template"
        )
    return tokenizer.apply_chat_template(
        chat_messages(template, prompt, examples), tokenize=False, add_generation_prompt=True
    )


def prompt_token_ids(
    template: Template, tokenizer: PreTrainedTokenizerBase, prompt: str, examples: Sequence[Record] = (), *, model: str = "model"
) -> list[int]:
    """Token ids of the rendered prompt, with the tokenizer's BOS for ``plain`` when it adds one."""
    text = render_prompt(template, tokenizer, prompt, examples, model=model)
    ids = tokenizer.encode(text, add_special_tokens=False, verbose=False)  # the caller cuts long prompts
    if template.kind == "plain":
        ids = leading_special_ids(tokenizer) + ids
    return ids
