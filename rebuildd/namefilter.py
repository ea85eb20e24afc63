"""The ``name`` filter of ``GET /servers``: a regular expression, as in Nova, made safe to run.

Nova hands the pattern to the database (``REGEXP``, ``~``). Here a pattern without regular
expression syntax becomes a SQL substring test, and any other is matched by the ``regex``
module. A pattern Python cannot compile is matched literally, as Nova matches an invalid one.

Nothing a caller sends may cost the daemon more than a bounded slice of one worker thread:

- the pattern is at most ``MAX_PATTERN_LENGTH`` characters, and its size once counted
  repetitions are unrolled (``regex`` unrolls ``(?:a{3000}){3000}`` into nine million nodes:
  seconds and gigabytes) is estimated before compiling and refused above ``MAX_EXPANSION``;
- compiling and matching run on one worker thread of their own, never on the event loop, and
  matching releases the GIL (``concurrent=True``) under a time budget for the whole listing, so a
  pattern that backtracks catastrophically (``(a+)+$``) costs a 400 instead of the daemon;
- compiled patterns are kept in a small LRU of our own (``regex``'s cache holds 500);
- at most ``MAX_PENDING`` listings wait for or run on that thread: one more is refused at
  once (503 with Retry-After, :class:`errors.NameFilterBusy`), so a flood of costly patterns
  delays another caller's listing by at most that many budgets.

A refused pattern is Nova's 400 with the reason. This module must not touch the database.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Final, TypeVar

import regex

from rebuildd import errors

T = TypeVar("T")

BUDGET_SECONDS: Final = 0.25
MAX_PATTERN_LENGTH: Final = 255  # Nova's longest server name
# Unrolled size at most (about 1 MiB compiled, a few ms to compile).
MAX_EXPANSION: Final = 10_000
CACHE_SIZE: Final = 16
MAX_PENDING: Final = 4  # listings queued or running on the worker: at most ~1 s of budgets
_SYNTAX: Final = frozenset(".^$*+?{}[]\\|()")
_QUANTIFIER: Final = regex.compile(r"\{(\d*)(?:,(\d*))?\}")
_VERBOSE: Final = regex.compile(r"\(\?[-\w]*x")


class NameFilter:
    """A validated name pattern; ``select`` compiles and matches it off the event loop."""

    def __init__(self, pattern: str) -> None:
        self.literal: str | None = None
        self.pattern = pattern
        if not _SYNTAX & set(pattern):
            self.literal = pattern
            return
        _check_cost(pattern)

    async def select(
        self, items: Sequence[T], name: Callable[[T], str], limit: int | None
    ) -> list[T]:
        """The items whose name matches, in order, at most ``limit`` of them."""
        worker = _worker()
        if not worker.slots.acquire(blocking=False):
            raise errors.NameFilterBusy()
        try:
            job = worker.executor.submit(self._select, items, name, limit)
        except BaseException:
            worker.slots.release()
            raise
        # The slot is the job's until it ends or is cancelled unstarted, even if the caller
        # goes away first: the count is what the thread really has before it.
        job.add_done_callback(lambda _: worker.slots.release())
        return await asyncio.wrap_future(job)

    def _select(self, items: Sequence[T], name: Callable[[T], str], limit: int | None) -> list[T]:
        compiled = None if self.literal is not None else _compile(self.pattern)
        deadline = time.monotonic() + BUDGET_SECONDS
        found: list[T] = []
        for item in items:
            if compiled is None:
                matched = self.pattern in name(item)
            else:
                matched = _search(compiled, name(item), deadline)
            if matched:
                found.append(item)
                if limit is not None and len(found) >= limit:
                    break
        return found


def _search(compiled: regex.Pattern[str], name: str, deadline: float) -> bool:
    remaining = deadline - time.monotonic()
    try:
        if remaining <= 0:
            raise TimeoutError
        return compiled.search(name, timeout=remaining, concurrent=True) is not None
    except TimeoutError:
        raise errors.Invalid(
            "The name filter's regular expression took too long to evaluate; use a simpler one."
        ) from None


@functools.lru_cache(maxsize=CACHE_SIZE)
def _compile(pattern: str) -> regex.Pattern[str] | None:
    """The compiled pattern; None when it does not compile (then it is matched literally)."""
    try:
        return regex.compile(pattern, flags=regex.VERSION0, cache_pattern=False)
    except (regex.error, OverflowError, RecursionError, ValueError):
        return None


@dataclass(frozen=True, slots=True)
class _Worker:
    executor: ThreadPoolExecutor
    slots: threading.BoundedSemaphore


@functools.cache
def _worker() -> _Worker:
    # One thread: name filters queue behind each other (at most MAX_PENDING), nothing else
    # waits for them.
    return _Worker(
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="namefilter"),
        threading.BoundedSemaphore(MAX_PENDING),
    )


def _invalid(pattern: str, reason: str) -> errors.Invalid:
    return errors.Invalid(f"Invalid input for query parameters name. Value: {pattern!r}. {reason}")


def _check_cost(pattern: str) -> None:
    """Refuse a pattern whose compilation could cost more than a small bound."""
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise _invalid(pattern[:32] + "...", f"It is longer than {MAX_PATTERN_LENGTH} characters.")
    if _VERBOSE.search(pattern):
        raise _invalid(pattern, "The verbose flag (x) is not supported.")
    if expansion(pattern) > MAX_EXPANSION:
        raise _invalid(
            pattern, f"Its repetitions unroll to more than {MAX_EXPANSION} elements; use fewer."
        )


def expansion(pattern: str) -> int:
    """An upper bound of the pattern's size once its repetitions are unrolled.

    Every character counts one (a group's ``(?:`` none), a character class one; a quantifier
    multiplies everything before it in its group (not only the atom it applies to), so
    whatever the quantifier really applies to is counted, whichever constructs the scan
    misreads: only the groups must be seen as ``regex`` sees them. Counts are the largest of
    ``{m,n}``; ``*+?`` are 1.
    """
    frames: list[int] = [0]
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            frames[-1] += 1
            i += 2
        elif char == "[":
            # To the first unescaped "]": never past where regex ends the class.
            i += 1
            while i < len(pattern) and pattern[i] != "]":
                i += 2 if pattern[i] == "\\" else 1
            frames[-1] += 1
            i += 1
        elif pattern.startswith("(?#", i):
            end = pattern.find(")", i)
            i = len(pattern) if end < 0 else end + 1
        elif char == "(":
            frames.append(0)
            i += 3 if pattern.startswith("(?:", i) else 1
        elif char == ")":
            if len(frames) > 1:
                inner = frames.pop()
                frames[-1] += inner
            i += 1
        elif char == "{" and (quantifier := _QUANTIFIER.match(pattern, i)):
            counts = [int(c) for c in quantifier.groups() if c]
            frames[-1] = max(frames[-1], 1) * max([*counts, 1])
            i = quantifier.end()
            if frames[-1] > MAX_EXPANSION:
                return frames[-1]
        else:
            frames[-1] += 1
            i += 1
    return sum(frames)
