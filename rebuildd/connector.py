"""This host's volume connector: what Nova's compute hands Cinder with each attachment
update (os-brick's ``get_connector_properties``), so the volume service knows where to
export the volume.
"""

from __future__ import annotations

import platform
import socket
from typing import Any


def host_connector(host: str) -> dict[str, Any]:
    """This host's connector, shaped like os-brick's ``get_connector_properties`` as Nova's
    libvirt driver sends it (no iSCSI initiator, no multipath on a local-file host)."""
    return {
        "host": host,
        "ip": _my_ip(),
        "initiator": None,
        "platform": platform.machine(),
        "os_type": "linux",
        "multipath": False,
        "do_local_attach": False,
    }


def _my_ip() -> str:
    """oslo's get_my_ipv4: the source address of a route out (a UDP connect sends nothing)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect(("192.0.2.1", 9))
            return str(sock.getsockname()[0])
    except OSError:
        return "127.0.0.1"
