"""The ``name`` filter of ``GET /servers``: a regular expression, as in Nova, made safe to run.

Nova hands the pattern to the database (``REGEXP``, ``~``). Here a pattern without regular
expression syntax becomes a SQL substring test, and any other is matched by the ``regex``
module with a time budget shared by the whole listing, so a pattern that backtracks
catastrophically (``(a+)+$``) costs a 400 instead of the event loop. A pattern Python cannot
compile is matched literally, as Nova matches an invalid one.
"""

from __future__ import annotations

import time
from typing import Final

import regex

from rebuildd import errors

BUDGET_SECONDS: Final = 0.25
_SYNTAX: Final = frozenset(".^$*+?{}[]\\|()")


class NameFilter:
    def __init__(self, pattern: str) -> None:
        self.literal: str | None = None
        self._pattern: regex.Pattern[str] | None = None
        if not _SYNTAX & set(pattern):
            self.literal = pattern
            return
        try:
            self._pattern = regex.compile(pattern, flags=regex.VERSION0)
        except (regex.error, OverflowError, RecursionError, ValueError):
            self.literal = pattern
        self._deadline = 0.0

    def start(self) -> None:
        """Start the time budget (once per listing)."""
        self._deadline = time.monotonic() + BUDGET_SECONDS

    def matches(self, name: str) -> bool:
        if self._pattern is None:
            assert self.literal is not None
            return self.literal in name
        remaining = self._deadline - time.monotonic()
        try:
            if remaining <= 0:
                raise TimeoutError
            return self._pattern.search(name, timeout=remaining) is not None
        except TimeoutError:
            raise errors.Invalid(
                "The name filter's regular expression took too long to evaluate; use a simpler one."
            ) from None
