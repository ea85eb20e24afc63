"""systemd's notify protocol (``sd_notify(3)``), as gunicorn's ``systemd.py`` speaks it.

Owns the datagrams to ``NOTIFY_SOCKET`` and the reading of ``WATCHDOG_USEC``: a no-op without
the socket, and it never raises (a start-up must not fail because systemd is not listening).
The daemon decides what to say and when.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

import structlog

log = structlog.get_logger("rebuildd.sdnotify")


def notify(*states: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``states`` (``READY=1``, ``STATUS=...``) in one datagram; False when not sent."""
    env = os.environ if environ is None else environ
    address = env.get("NOTIFY_SOCKET")
    if not address or not states:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall("\n".join(states).encode())
    except OSError:
        log.warning("sd_notify failed", states=states)
        return False
    return True


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between two ``WATCHDOG=1`` (half of the unit's ``WatchdogSec``), or None when
    the watchdog is off or meant for another process (``WATCHDOG_PID``)."""
    env = os.environ if environ is None else environ
    try:
        usec = int(env.get("WATCHDOG_USEC", "0"))
        pid = int(env.get("WATCHDOG_PID", str(os.getpid())))
    except ValueError:
        return None
    if usec <= 0 or pid != os.getpid():
        return None
    return usec / 2e6
