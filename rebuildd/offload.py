"""Blocking calls off the event loop, on a pool of threads of their own.

Owns how a blocking call (libvirt, a file operation) runs in a worker thread and what a
cancelled caller sees. The hypervisor adapter has one pool for libvirt; the disk manager and
the image cache share one for files, so a libvirt call that hangs never holds up a disk copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")


@dataclass(slots=True)
class _Call(Generic[T]):
    fn: Callable[..., T]
    args: tuple[Any, ...]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[T]
    pool: _Pool


@dataclass(slots=True)
class _Pool:
    """One generation of threads: the queue they take calls from, how many run, how many
    calls are out (both counted on the event loop's thread only)."""

    calls: queue.SimpleQueue[_Call[Any] | None] = field(default_factory=queue.SimpleQueue)
    threads: int = 0
    busy: int = 0


class Offload:
    """At most ``threads`` calls at once, the rest queued in order; a thread starts when a
    call finds every running one busy.

    Each thread takes a call from a C-level queue and hands the outcome straight to the
    caller's loop (``call_soon_threadsafe``): no ``concurrent.futures`` machinery, whose
    Python-level locks and conditions cost more of the GIL a call than the call of a
    test-driver domain itself (bench/, see the README). A caller cancelled meanwhile (a
    drain's ``Task.cancel()``) still waits for the call to end before its CancelledError goes
    on, so an undo never races the call of the step it undoes (a copy still writing the file
    the undo removes). The threads are daemon threads: the daemon's drain waits for its jobs,
    and an interpreter exit does not hang on a call libvirt never answers."""

    def __init__(self, threads: int, name: str) -> None:
        if threads < 1:
            raise ValueError("an offload needs at least one thread")
        self._threads = threads
        self._name = name
        self._pool: _Pool | None = None
        self._started = 0  # threads ever started: their names stay unique

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        pool = self._pool
        if pool is None:
            pool = self._pool = _Pool()
        if pool.busy >= pool.threads and pool.threads < self._threads:
            self._start(pool)
        future: asyncio.Future[T] = loop.create_future()
        pool.busy += 1
        pool.calls.put(_Call(fn, args, loop, future, pool))
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            await asyncio.wait([future])
            if not future.cancelled():
                future.exception()  # retrieved: the caller is gone, the cancellation goes on
            raise

    def _start(self, pool: _Pool) -> None:
        thread = threading.Thread(
            target=_work, args=(pool.calls,), name=f"{self._name}_{self._started}", daemon=True
        )
        self._started += 1
        pool.threads += 1
        thread.start()

    def shutdown(self) -> None:
        """Let the threads go once the calls queued before this end (calls after this start
        new threads)."""
        if self._pool is not None:
            pool, self._pool = self._pool, None
            for _ in range(pool.threads):
                pool.calls.put(None)


def _work(calls: queue.SimpleQueue[_Call[Any] | None]) -> None:
    while (call := calls.get()) is not None:
        outcome: tuple[bool, Any]
        try:
            outcome = (True, call.fn(*call.args))
        except BaseException as exc:  # handed to the caller, as an executor does
            outcome = (False, exc)
        # A closed loop (RuntimeError) has nobody waiting for this call any more.
        with contextlib.suppress(RuntimeError):
            call.loop.call_soon_threadsafe(_settle, call, *outcome)
        del call, outcome


def _settle(call: _Call[Any], ok: bool, value: Any) -> None:
    call.pool.busy -= 1
    if call.future.cancelled():
        return
    if ok:
        call.future.set_result(value)
    else:
        call.future.set_exception(value)
