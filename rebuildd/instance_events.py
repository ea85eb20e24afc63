"""External instance events in process: Nova's ``InstanceEvents`` and
``virtapi.wait_for_instance_event`` for asyncio.

Owns who waits for which ``(server, name, tag)`` and hands each delivered event to its waiters.
A step registers *before* it starts what triggers the event (otherwise the event may come
before anyone listens), then awaits it::

    async with events.expecting(server_id, [("volume-reimaged", volume_id)], timeout=t):
        await volumes.reimage(...)          # Cinder POSTs the event when it is done
    # here the event has arrived, or ExternalEventTimeout / ExternalEventFailed was raised

An event that nobody waits for is only recorded (by the API, see api_events.py). It must not
touch the Store, HTTP or the pipeline: it is a rendezvous, nothing more.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Final, Literal

import structlog

from rebuildd import errors

log = structlog.get_logger("rebuildd.instance_events")

Status = Literal["completed", "failed", "in-progress"]
# Nova's objects/external_event.py EVENT_NAMES, with the microversion that admits each.
EVENT_NAMES: Final[dict[str, str]] = {
    "network-changed": "2.1",
    "network-vif-plugged": "2.1",
    "network-vif-unplugged": "2.1",
    "network-vif-deleted": "2.1",
    "volume-extended": "2.51",
    "power-update": "2.76",
    "accelerator-request-bound": "2.82",
    "volume-reimaged": "2.93",
}

Key = tuple[str, str, str | None]  # server id, event name, tag


@dataclass(frozen=True, slots=True)
class Event:
    """One external event as Nova's ``InstanceExternalEvent``: ``tag`` is e.g. the volume or
    port id, ``status`` Nova's ``completed`` (the default), ``failed`` or ``in-progress``."""

    server_id: str
    name: str
    tag: str | None = None
    status: Status = "completed"

    @property
    def key(self) -> str:
        """Nova's ``make_key``: ``name-tag``, or just the name."""
        return self.name if self.tag is None else f"{self.name}-{self.tag}"


@dataclass(slots=True)
class Expected:
    """What :meth:`InstanceEvents.expecting` yields: the futures of the awaited events."""

    server_id: str
    futures: dict[tuple[str, str | None], asyncio.Future[Event]] = field(default_factory=dict)

    def received(self) -> dict[tuple[str, str | None], Event]:
        """The events that have arrived so far, by (name, tag)."""
        return {k: f.result() for k, f in self.futures.items() if f.done() and not f.cancelled()}


class InstanceEvents:
    """Waiters by (server, name, tag); :meth:`deliver` wakes every waiter of an event."""

    def __init__(self) -> None:
        self._waiting: dict[Key, list[asyncio.Future[Event]]] = {}

    def _register(self, key: Key) -> asyncio.Future[Event]:
        future: asyncio.Future[Event] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(key, []).append(future)
        log.debug("waiting for external event", server_id=key[0], name=key[1], tag=key[2])
        return future

    def _forget(self, key: Key, future: asyncio.Future[Event]) -> None:
        futures = self._waiting.get(key, [])
        if future in futures:
            futures.remove(future)
        if not futures:
            self._waiting.pop(key, None)

    def waiting(self, server_id: str) -> list[tuple[str, str | None]]:
        """The (name, tag) pairs someone waits for on this server."""
        return [(name, tag) for sid, name, tag in self._waiting if sid == server_id]

    def deliver(self, event: Event) -> bool:
        """Hand ``event`` to its waiters; False when nobody waited for it."""
        # Registrations stay until their owner leaves, so a wait() inside expecting() finds
        # an event that came before it was called.
        futures = self._waiting.get((event.server_id, event.name, event.tag), [])
        woken = [f for f in futures if not f.done()]
        for future in woken:
            future.set_result(event)
        log.info(
            "external event received",
            server_id=event.server_id,
            key=event.key,
            status=event.status,
            waiters=len(woken),
        )
        return bool(woken)

    @contextlib.asynccontextmanager
    async def expecting(
        self, server_id: str, events: Iterable[tuple[str, str | None]], *, timeout: float
    ) -> AsyncIterator[Expected]:
        """Register for ``events`` now; when the body has finished, wait for all of them for at
        most ``timeout`` seconds (ExternalEventTimeout), and raise ExternalEventFailed if one
        came with status ``failed``, as Nova's default error callback does. If the body raises,
        nothing is awaited. Waiters are unregistered on every way out."""
        expected = Expected(server_id)
        for name, tag in events:
            expected.futures[(name, tag)] = self._register((server_id, name, tag))
        try:
            yield expected
            pending = [f for f in expected.futures.values() if not f.done()]
            if pending:
                _done, late = await asyncio.wait(pending, timeout=timeout)
                if late:
                    missing = [
                        f"{n}-{t}" if t else n
                        for (n, t), f in expected.futures.items()
                        if f in late
                    ]
                    raise errors.ExternalEventTimeout(
                        timeout=timeout, events=", ".join(missing), server_id=server_id
                    )
            for event in expected.received().values():
                if event.status == "failed":
                    raise errors.ExternalEventFailed(event=event.key, server_id=server_id)
        finally:
            for (name, tag), future in expected.futures.items():
                self._forget((server_id, name, tag), future)
                future.cancel()

    async def wait(self, server_id: str, name: str, tag: str | None, *, timeout: float) -> Event:
        """Wait for one event (whatever its status). Inside :meth:`expecting` for the same
        event it awaits that registration (so an event that came early is not missed); on its
        own it registers now, for events that cannot come before the call."""
        key: Key = (server_id, name, tag)
        registered = self._waiting.get(key, [])[:1]
        future = registered[0] if registered else self._register(key)
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            raise errors.ExternalEventTimeout(
                timeout=timeout, events=Event(server_id, name, tag).key, server_id=server_id
            ) from None
        finally:
            if not registered:
                self._forget(key, future)
