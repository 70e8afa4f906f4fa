"""The two types every question source shares: :class:`Example` (one question) and :class:`DataError`.

They live apart from :mod:`spine_ttrl.data` (the file loaders) so that the arithmetic generator,
:mod:`spine_ttrl.arith`, can build examples and raise data errors without importing the loaders,
while :mod:`spine_ttrl.data` imports the generator. Both names are re-exported by
:mod:`spine_ttrl.data` (``spine_ttrl.data.Example``, ``spine_ttrl.data.DataError``), which remains the
place to import them from.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Example", "DataError"]


@dataclass(frozen=True)
class Example:
    """One question. ``answer`` (when known) is for evaluation and diagnostics only, never the reward."""

    prompt: str
    answer: str | None = None
    choices: tuple[str, ...] | None = None
    id: str = ""
    labels: tuple[str, ...] | None = None  # task "label": the question's label set (None = yes / no / maybe)
    images: tuple = ()  # checked image sources (absolute path strings or PNG/JPEG bytes), see spine_ttrl.images
    source: str = ""  # the set the question comes from (a ``source`` column): evaluation is broken down by it


class DataError(ValueError):
    """Bad input data. ``str(err)`` is one line: ``file:line: field 'x': what is wrong``."""

    def __init__(self, message: str):
        # One line, always: the CLI prints it after "error: ".
        super().__init__(str(message).replace("\r", " ").replace("\n", " "))
