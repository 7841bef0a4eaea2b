"""The one error type every entry point turns into a single line and exit status 2.

Anything a user can get wrong (a recipe field, a DeepSpeed JSON, a data file, a model folder, a
checkpoint, a cache, an output folder, a tool argument) is reported by raising a subclass of
:class:`BadInput` whose message names the field or ``file:line`` and what was expected. The entry
points (``launch/train.py`` and every script in ``tools/``) catch exactly this type, print
``error: <message>`` once (rank 0 only on a multi-rank job) and exit with status 2 on every rank.
Anything else is a bug and keeps its traceback.

This module sits at the bottom of the package: it imports nothing, so every layer can raise it.
"""

from __future__ import annotations

BAD_INPUT_EXIT_CODE = 2


class BadInput(Exception):
    """Input that is wrong, not a bug: the message is one line naming where and what was expected."""


__all__ = ["BAD_INPUT_EXIT_CODE", "BadInput"]
