"""Connection-level limits under uvicorn: what a client can hold before any request is read.

uvicorn's httptools protocol buffers a request line and headers without bound, never times out
a connection that has not finished its headers (its keep-alive timer only runs between
requests), and accepts connections until the process runs out of file descriptors. This module
subclasses that protocol to bound all three, below the app and authentication:

- the request line and headers together are at most ``max_header_bytes``, at most
  ``max_header_count`` fields (431 and the connection closed, as Python's ``http.server``);
- a request's line and headers must arrive within ``header_timeout`` of its first byte (or of
  the connection), and its body may pause at most ``body_timeout``; otherwise the connection
  is closed;
- at most ``max_connections`` connections are open; one more closes the connection that has
  been idle longest among those not serving a request (as nginx reuses keep-alive connections
  when it runs out), else the one whose request body has waited longest for a byte, and the
  new one only if every other request has been read whole.

It owns no HTTP semantics beyond these limits and must not touch the app.
"""

from __future__ import annotations

import asyncio
import resource
from dataclasses import dataclass
from typing import Any, ClassVar, Final

import structlog
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = structlog.get_logger("rebuildd.httpguard")

# Descriptors kept for everything but client connections: the database, libvirt, image
# and disk files, qemu-img pipes, upstream clients.
RESERVED_FDS: Final = 256


@dataclass(frozen=True, slots=True)
class Limits:
    max_connections: int
    max_header_bytes: int
    max_header_count: int
    header_timeout: float
    body_timeout: float


class _TooManyHeaders(Exception):
    """Raised from a parser callback: httptools stops parsing and uvicorn answers."""


def protocol(limits: Limits) -> type[asyncio.Protocol]:
    """The protocol class for ``uvicorn.Config(http=...)`` that enforces ``limits``."""
    return type("LimitedHttpToolsProtocol", (LimitedProtocol,), {"limits": limits})


def connection_limit(requested: int) -> int:
    """``requested``, lowered to fit the open-file limit (raised to its hard limit first)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    room = soft - RESERVED_FDS if soft > 2 * RESERVED_FDS else soft // 2
    if requested > room:
        log.warning("connection limit lowered", requested=requested, limit=room, nofile=soft)
        return room
    return requested


class LimitedProtocol(HttpToolsProtocol):
    limits: ClassVar[Limits]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True
        self._head_bytes = 0
        self._header_count = 0
        self._too_large = False
        self._timer: asyncio.TimerHandle | None = None
        self._last_active = 0.0

    # -- connection --------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._last_active = self.loop.time()
        self._arm(self.limits.header_timeout)
        self._make_room()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._last_active = self.loop.time()
        if self._in_head:
            if self._timer is None:  # the first byte of a request after keep-alive
                self._arm(self.limits.header_timeout)
            self._head_bytes += len(data)
        else:
            self._arm(self.limits.body_timeout)
        super().data_received(data)
        if self._in_head and self._head_bytes > self.limits.max_header_bytes:
            self._too_large = True
            self.send_400_response("Request header fields too large")

    def send_400_response(self, msg: str) -> None:
        if not self._too_large:
            super().send_400_response(msg)
            return
        if self.transport.is_closing():
            return
        body = b"Request header fields too large"
        self.transport.write(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
            b"content-type: text/plain; charset=utf-8\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n"
            b"connection: close\r\n\r\n" + body
        )
        self.transport.close()

    # -- parser callbacks --------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._header_count = 0
        super().on_message_begin()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > self.limits.max_header_count:
            self._too_large = True
            raise _TooManyHeaders
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        self._arm(self.limits.body_timeout)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._in_head = True
        self._disarm()
        super().on_message_complete()

    # -- limits ------------------------------------------------------------------------------

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, self._timed_out)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        if self._in_head and self._serving():
            # A pipelined request waits for the one being served.
            self._arm(self.limits.header_timeout)
            return
        if not self._in_head and self.flow.read_paused:
            # We stopped reading (the app has not consumed the body yet): not the client's pause.
            self._arm(self.limits.body_timeout)
            return
        if not self.transport.is_closing():
            self.transport.close()

    def _serving(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _make_room(self) -> None:
        others = [
            c
            for c in self.connections
            if c is not self and isinstance(c, LimitedProtocol) and not c.transport.is_closing()
        ]
        if len(others) < self.limits.max_connections:
            return
        # Idle first; else one still waiting for its request body (a trickle of bytes
        # holds no fewer descriptors than silence), not one we stopped reading ourselves;
        # never one whose request is all read.
        idle = [c for c in others if not c._serving()] or [
            c for c in others if not c._in_head and not c.flow.read_paused
        ]
        victim = min(idle, key=lambda c: c._last_active) if idle else self
        victim.transport.close()
