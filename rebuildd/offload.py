"""Blocking calls off the event loop, on a pool of threads of their own.

Owns how a blocking call (libvirt, a file operation) runs in a worker thread and what a
cancelled caller sees. The hypervisor adapter has one pool for libvirt; the disk manager and
the image cache share one for files, so a libvirt call that hangs never holds up a disk copy.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class Offload:
    """At most ``threads`` calls at once, the rest queued in order; the threads start on
    first use.

    A loop executor costs a third less CPU a call than anyio.to_thread (which also yields to
    the loop twice before handing the call over). A caller cancelled meanwhile (a drain's
    ``Task.cancel()``, which anyio's ``abandon_on_cancel`` never held back) still waits for
    the call to end before its CancelledError goes on, so an undo never races the call of
    the step it undoes (a copy still writing the file the undo removes)."""

    def __init__(self, threads: int, name: str) -> None:
        self._threads = threads
        self._name = name
        self._pool: ThreadPoolExecutor | None = None

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix=self._name)
        call = asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args))
        try:
            return await asyncio.shield(call)
        except asyncio.CancelledError:
            await asyncio.wait([call])
            if not call.cancelled():
                call.exception()  # retrieved: the caller is gone, the cancellation goes on
            raise

    def shutdown(self) -> None:
        """Let the threads go once their calls end (calls after this start a new pool)."""
        if self._pool is not None:
            pool, self._pool = self._pool, None
            pool.shutdown(wait=False)
