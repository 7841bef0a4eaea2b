"""The tiny teacher zoo: small, real, trained models with genuinely different tokenizers.

Three teachers (Llama + SentencePiece BPE, Qwen2 + byte-level BPE, OPT + Unigram) and a GPT-2
student, trained on a bundled DialogSum sample in a few minutes on a CPU, cached per settings
fingerprint. Importing this package is cheap: ``transformers`` loads only when something is built.

    from mlot_ds.zoo import ZooSettings, build_zoo
    paths = build_zoo(ZooSettings())          # {"teacher-llama": Path, ..., "student": Path}
"""

from mlot_ds.zoo.build import build_zoo, zoo_member_path, zoo_report_path, zoo_root
from mlot_ds.zoo.corpus import (
    RESPONSE_SEPARATOR,
    SUMMARY_INSTRUCTION,
    SUMMARY_PROMPT_SUFFIX,
    corpus_dir,
    corpus_path,
    render_context,
    render_prompt,
    render_response,
)
from mlot_ds.zoo.settings import MEMBERS, PROFILES, STUDENT, TEACHERS, MemberSpec, ZooSettings

__all__ = [
    "MEMBERS",
    "PROFILES",
    "RESPONSE_SEPARATOR",
    "STUDENT",
    "SUMMARY_INSTRUCTION",
    "SUMMARY_PROMPT_SUFFIX",
    "TEACHERS",
    "MemberSpec",
    "ZooSettings",
    "build_zoo",
    "corpus_dir",
    "corpus_path",
    "render_context",
    "render_prompt",
    "render_response",
    "zoo_member_path",
    "zoo_report_path",
    "zoo_root",
]
