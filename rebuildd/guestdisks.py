"""A server's local disks: which it has, on which targets, and how each is made.

Owns the layout Nova's libvirt driver gives a guest — root on ``vda``, the flavor's ephemeral
disk next (``vdb``), then swap, and the config drive as an IDE cdrom on ``hdd`` — and the rule
of what a rebuild replaces: every local disk rebuildd owns, except the ephemeral disk when
``preserve_ephemeral`` is asked for (Nova's libvirt driver refuses that; rebuildd keeps the
file as it is). Volumes and disks of an adopted domain that rebuildd does not own are never
touched. Imports only ports and pure modules; the files are made through the Disks port.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from rebuildd import configdrive, domxml, ports
from rebuildd.models import BlockDevice, Flavor, Image, Server

GiB: Final = 1024**3
Kind = Literal["root", "ephemeral0", "swap", "config", "other"]
SWAP: Final = "swap"
ISO: Final = "iso9660"
CONFIG_TARGET: Final = "hdd"  # Nova's config drive on an i440fx (pc) machine: an IDE cdrom
CONFIG_BUS: Final = "ide"


def kind(device: BlockDevice) -> Kind:
    if not device.owned or device.destination_type != "local":
        return "other"
    if device.boot_index == 0:
        return "root"
    if device.guest_format == SWAP:
        return "swap"
    if device.guest_format == ISO:
        return "config"
    return "ephemeral0"


def layout(
    server_id: str,
    flavor: Flavor,
    *,
    image_id: str | None,
    config_drive: bool,
    ephemeral_format: str,
    disks: ports.Disks,
) -> list[BlockDevice]:
    """The local disks of a new server, in Nova's order and with Nova's targets; without an
    ``image_id`` (a server booted from a volume) there is no local root disk."""
    devices = []
    if image_id is not None:
        devices.append(_device(server_id, "vda", "root", disks, boot_index=0, image_id=image_id))
    targets = iter("bcdefghijklmnopqrstuvwxyz")
    if flavor.ephemeral:
        devices.append(
            _device(server_id, f"vd{next(targets)}", "ephemeral0", disks,
                    guest_format=ephemeral_format, size_mib=flavor.ephemeral * 1024)
        )  # fmt: skip
    if flavor.swap:
        devices.append(
            _device(server_id, f"vd{next(targets)}", "swap", disks,
                    guest_format=SWAP, size_mib=flavor.swap)
        )  # fmt: skip
    if config_drive:
        devices.append(
            _device(server_id, CONFIG_TARGET, "config", disks,
                    guest_format=ISO, bus=CONFIG_BUS, device_type="cdrom")
        )  # fmt: skip
    return devices


def _device(
    server_id: str,
    target: str,
    what: Kind,
    disks: ports.Disks,
    *,
    boot_index: int | None = None,
    image_id: str | None = None,
    guest_format: str | None = None,
    size_mib: int | None = None,
    bus: str = "virtio",
    device_type: str = "disk",
) -> BlockDevice:
    return BlockDevice(
        id=str(uuid.uuid4()),
        server_id=server_id,
        boot_index=boot_index,
        source_type="image" if what == "root" else "blank",
        destination_type="local",
        device_name=target,
        image_id=image_id,
        volume_id=None,
        path=str(disks.new_disk_path(server_id, what)),
        disk_bus=bus,
        device_type=device_type,
        guest_format=guest_format,
        size_mib=size_mib,
    )


def replaced_by_rebuild(
    devices: Sequence[BlockDevice], *, preserve_ephemeral: bool
) -> list[BlockDevice]:
    """The disks a rebuild makes anew: root, swap, the config drive, and the ephemeral disk
    unless it is preserved."""
    replaced = []
    for device in devices:
        what = kind(device)
        if what == "other" or (what == "ephemeral0" and preserve_ephemeral):
            continue
        replaced.append(device)
    return sorted(replaced, key=lambda d: d.device_name)


def new_disk(device: BlockDevice, path: str, old_xml: str | None) -> domxml.DiskSpec | str:
    """The ``<disk>`` a rebuild puts on ``device``'s target: the old element on the new file
    when there was one (so its boot order, cache mode and address survive), else a new one."""
    spec = disk_spec(device, path)
    if old_xml is None:
        return spec
    return domxml.to_string(domxml.renewed(old_xml, spec))


def disk_spec(device: BlockDevice, path: str) -> domxml.DiskSpec:
    if kind(device) == "config":
        return domxml.DiskSpec(
            target=device.device_name,
            path=path,
            fmt="raw",
            bus=device.disk_bus,
            device="cdrom",
            readonly=True,
        )
    return domxml.DiskSpec(target=device.device_name, path=path, bus=device.disk_bus)


@dataclass(frozen=True, slots=True)
class Contents:
    """What the new disks are made from."""

    server: Server  # with the values the guest must now see (name, key, user data ...)
    image: Image | None  # None: a server booted from a volume that names no image
    base: Path  # the image's base file in the cache
    admin_pass: str | None
    personality: tuple[tuple[str, str], ...]
    nics: tuple[configdrive.Nic, ...]


async def create(disks: ports.Disks, device: BlockDevice, path: Path, contents: Contents) -> None:
    """Make one disk file at ``path`` (a new file)."""
    what = kind(device)
    if what == "root":
        assert contents.image is not None
        await disks.create_overlay(
            base=contents.base,
            base_format=contents.image.disk_format or "raw",
            path=path,
            size_bytes=contents.server.flavor.disk * GiB or None,
        )
    elif what == "config":
        await disks.create_config_drive(path, config_drive_data(contents))
    elif what in ("ephemeral0", "swap"):
        assert device.size_mib is not None and device.guest_format is not None
        await disks.create_blank(
            path=path, size_mib=device.size_mib, guest_format=device.guest_format
        )


def config_drive_data(contents: Contents) -> configdrive.ConfigDriveData:
    server = contents.server
    key = None
    if server.key_name and server.key_data:
        key = configdrive.Key(name=server.key_name, data=server.key_data)
    return configdrive.ConfigDriveData(
        server_id=server.id,
        name=server.name,
        hostname=server.hostname,
        project_id=server.project_id,
        image_id=contents.image.id if contents.image is not None else None,
        flavor_name=server.flavor.name,
        key=key,
        metadata=dict(server.metadata),
        admin_pass=contents.admin_pass,
        user_data=server.user_data,
        personality=contents.personality,
        nics=contents.nics,
        root_device_name="/dev/vda",
    )
