"""This host's volume connector: what Nova's compute hands Cinder with each attachment
update (os-brick's ``get_connector_properties``), so the volume service knows where to
export the volume; and what this host does with the connection_info Cinder answers
(:func:`connect_volume`: mount an NFS share, name the volume's file).
"""

from __future__ import annotations

import hashlib
import platform
import shlex
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anyio
import structlog

from rebuildd import errors

log = structlog.get_logger("rebuildd.connector")


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


async def connect_volume(
    connection_info: Mapping[str, Any], *, nfs_mount_point_base: Path
) -> dict[str, Any]:
    """Make a volume's connection usable on this host, as os-brick's connectors do for Nova:
    ``file`` needs nothing; ``nfs`` needs its share mounted at ``nfs_mount_point_base`` /
    md5(share) (os-brick's RemoteFsClient path) — mounted now if /proc/mounts does not show it
    — and then names the volume's file as ``data.device_path``. Shares stay mounted (other
    volumes use them). Raises OperationFailed for a type it cannot connect or a failed mount."""
    kind = connection_info.get("driver_volume_type")
    data = dict(connection_info.get("data") or {})
    if kind == "file":
        return {**connection_info, "data": data}
    if kind != "nfs":
        raise errors.OperationFailed(
            step="connect_volume", reason=f"driver_volume_type {kind!r} is not supported here"
        )
    export, name = data.get("export"), data.get("name")
    if not isinstance(export, str) or not isinstance(name, str) or "/" in name:
        raise errors.OperationFailed(
            step="connect_volume", reason="nfs connection_info without a valid export and name"
        )
    mount_point = nfs_mount_point(nfs_mount_point_base, export)
    if not _mounted(mount_point):
        await _mount_nfs(export, mount_point, data.get("options"))
    data["device_path"] = str(mount_point / name)
    return {**connection_info, "data": data}


def nfs_mount_point(base: Path, export: str) -> Path:
    """Where a share is mounted: os-brick hashes the share string (md5, hex) under the base."""
    return base / hashlib.md5(export.encode(), usedforsecurity=False).hexdigest()


def _mounted(path: Path) -> bool:
    """Whether /proc/mounts lists ``path`` (a bind mount on the same file system is invisible
    to os.path.ismount; os-brick reads the mount table too)."""
    try:
        table = Path("/proc/mounts").read_text()
    except OSError:
        return False
    wanted = str(path)
    return any(
        len(fields) > 1 and fields[1].replace("\\040", " ") == wanted
        for fields in (line.split() for line in table.splitlines())
    )


async def _mount_nfs(export: str, mount_point: Path, options: object) -> None:
    await anyio.Path(mount_point).mkdir(parents=True, exist_ok=True)
    command = ["mount", "-t", "nfs"]
    if isinstance(options, str) and options.strip():
        command += shlex.split(options)
    command += [export, str(mount_point)]
    log.info("mounting nfs share", export=export, mount_point=str(mount_point))
    try:
        result = await anyio.run_process(command, check=False)
    except OSError as exc:
        raise errors.OperationFailed(
            step="connect_volume", reason=f"cannot run mount for {export}: {exc.strerror}"
        ) from None
    if result.returncode != 0 and not _mounted(mount_point):
        # A fault a user reads: the mount point (a host path) is not named.
        detail = result.stderr.decode(errors="replace").replace(str(mount_point), "<mount>")
        raise errors.OperationFailed(
            step="connect_volume",
            reason=f"mounting {export} failed: {detail.strip()[-300:] or result.returncode}",
        )
