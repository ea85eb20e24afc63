"""``rebuildd adopt``: register libvirt domains rebuildd did not create as rebuildd servers.

Owns reading a foreign domain (made by hand, by virt-install, by Nova) into a Server, its
BlockDevices and a flavor, so rebuildd can be installed on a host that already runs guests.
The reading is pure (:func:`inspect`, :func:`flavor_values`, :func:`choose_flavor`,
:func:`build`: XML and facts in, records out); :func:`adopt` does the I/O around it: the
persistent XML and power state from the hypervisor, virtual sizes from ``qemu-img info``, the
Store's flavors and servers. A disk file is inspected (``imagecheck``, as the format its
``<driver type>`` names) before qemu-img reads it, and so is the base an overlay backs onto:
a root, ephemeral or swap file that fails is not measured (a root that fails refuses the
domain).

Adopting never changes a disk or a device. The only change to the domain is rebuildd's own
``<metadata>`` element, written into the persistent definition (a running domain keeps
running); the first rebuild would write it anyway. Disks rebuildd did not recognise as the
root, Nova's ephemeral and swap disks or the config drive are recorded with ``owned=False``:
volumes, extra disks, network disks, which a rebuild must leave alone.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import math
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Final, Literal, Protocol

import anyio

from rebuildd import domxml, errors, imagecheck, novameta
from rebuildd.disks import ImageInfo
from rebuildd.lifecycle import hostname_for
from rebuildd.models import BlockDevice, Flavor, NewAction, Server, utcnow
from rebuildd.novameta import NovaInstance
from rebuildd.pipeline import domain_metadata
from rebuildd.states import PowerState, VmState
from rebuildd.storage import ServerFilters, Store

MiB: Final = 1024**2
GiB: Final = 1024**3
# Nova's default_ephemeral_format is unset by default; nova.privsep.fs then formats a Linux
# guest's ephemeral disk ext4. The XML does not say which, so ext4 is the best guess.
DEFAULT_EPHEMERAL_FORMAT: Final = "ext4"
# Nova's local disk files in an instance directory (nova/virt/libvirt/blockinfo.py).
_EPHEMERAL_FILE: Final = re.compile(r"disk\.(local|eph\d+)")
_SWAP_FILE: Final = "disk.swap"
_CONFIG_FILE: Final = "disk.config"
_UNITS: Final = {
    "b": 1, "bytes": 1, "kb": 1000, "k": 1024, "kib": 1024, "mb": 1000**2, "m": MiB,
    "mib": MiB, "gb": 1000**3, "g": GiB, "gib": GiB, "tb": 1000**4, "t": 1024**4, "tib": 1024**4,
}  # fmt: skip

Role = Literal["root", "ephemeral", "swap", "config_drive", "other"]


@dataclass(frozen=True, slots=True)
class FoundDisk:
    """One ``<disk>`` of a domain and what rebuildd takes it for."""

    role: Role
    target: str
    bus: str
    device: str  # disk | cdrom | floppy | lun
    source_type: str  # file | block | network | volume | dir
    path: str | None  # the file, the block device or the network name
    fmt: str | None  # <driver type>
    serial: str | None = None
    boot_order: int | None = None

    @property
    def owned(self) -> bool:
        return self.role != "other"


@dataclass(frozen=True, slots=True)
class Inspection:
    """What the persistent XML of a domain says."""

    uuid: str
    name: str
    vcpus: int
    memory_mib: int
    nova: NovaInstance | None
    disks: tuple[FoundDisk, ...]

    @property
    def root(self) -> FoundDisk:
        return next(d for d in self.disks if d.role == "root")

    def having(self, role: Role) -> list[FoundDisk]:
        return [d for d in self.disks if d.role == role]


@dataclass(frozen=True, slots=True)
class FlavorValues:
    vcpus: int
    ram: int  # MiB
    disk: int  # GiB
    ephemeral: int  # GiB
    swap: int  # MiB


@dataclass(frozen=True, slots=True)
class Defaults:
    """Where adopted servers live and whose they are when no Nova metadata says."""

    host: str
    project_id: str
    user_id: str


# -- pure: XML -> records ---------------------------------------------------------------------


def refuse(domain: str, reason: str) -> errors.AdoptionRefused:
    return errors.AdoptionRefused(domain=domain, reason=reason)


def inspect(root: domxml.Element) -> Inspection:
    """Read a domain's persistent XML; refuse what rebuildd could not rebuild."""
    name = (root.findtext("name") or "").strip()
    text = (root.findtext("uuid") or "").strip()
    try:
        server_id = str(uuid.UUID(text))
    except ValueError:
        raise refuse(name, f"its uuid {text!r} is not a valid UUID") from None
    nova = novameta.read(root)
    if nova is not None and nova.root_type == "volume":
        raise refuse(name, "Nova booted it from a volume; rebuildd rebuilds local root disks")
    disks = _classify(root, nova)
    if not any(d.role == "root" for d in disks):
        raise refuse(name, "it has no file-backed root disk")
    return Inspection(
        uuid=server_id,
        name=name,
        vcpus=int((root.findtext("vcpu") or "1").strip()),
        memory_mib=_memory_mib(root.find("memory")),
        nova=nova,
        disks=disks,
    )


def _memory_mib(memory: domxml.Element | None) -> int:
    text = (memory.text or "").strip() if memory is not None else ""
    if memory is None or not text.isdigit():
        return 0
    scale = _UNITS.get(memory.get("unit", "KiB").lower(), 1024)
    return math.ceil(int(text) * scale / MiB)


def _classify(root: domxml.Element, nova: NovaInstance | None) -> tuple[FoundDisk, ...]:
    disks = [_read_disk(el) for el in root.iterfind("devices/disk")]
    root_disk = _pick_root(disks)
    found: list[FoundDisk] = []
    for disk in disks:
        role: Role = "other"
        if disk.source_type == "file" and disk.path:
            role = "root" if disk is root_disk else _role_by_name(disk)
        found.append(dataclasses.replace(disk, role=role))
    if nova and nova.flavor and (nova.flavor.ephemeral or 0) > 0:
        found = _nova_ephemeral_fallback(found)
    return tuple(found)


def _read_disk(el: domxml.Element) -> FoundDisk:
    target = el.find("target")
    driver = el.find("driver")
    boot = el.find("boot")
    order = boot.get("order", "") if boot is not None else ""
    return FoundDisk(
        role="other",
        target=target.get("dev", "") if target is not None else "",
        bus=target.get("bus", "") if target is not None else "",
        device=el.get("device", "disk"),
        source_type=el.get("type", "file"),
        path=domxml.disk_source(el),
        fmt=driver.get("type") if driver is not None else None,
        serial=(el.findtext("serial") or "").strip() or None,
        boot_order=int(order) if order.isdigit() else None,
    )


def _pick_root(disks: list[FoundDisk]) -> FoundDisk | None:
    """The ``device='disk'`` with the lowest boot order, else the first one."""
    candidates = [d for d in disks if d.device == "disk"]
    booting = [d for d in candidates if d.boot_order is not None]
    if booting:
        return min(booting, key=lambda d: d.boot_order or 0)
    return candidates[0] if candidates else None


def _role_by_name(disk: FoundDisk) -> Role:
    name = PurePosixPath(disk.path or "").name
    if disk.device == "disk" and _EPHEMERAL_FILE.fullmatch(name):
        return "ephemeral"
    if disk.device == "disk" and name == _SWAP_FILE:
        return "swap"
    if disk.device in ("cdrom", "disk") and name == _CONFIG_FILE:
        return "config_drive"
    return "other"


def _nova_ephemeral_fallback(found: list[FoundDisk]) -> list[FoundDisk]:
    """Nova's flavor has an ephemeral disk but no file is named like one: take the first file
    disk after the root *in the root's own directory* (Nova's instance directory), never a
    disk from elsewhere, which would be someone's data."""
    if any(d.role == "ephemeral" for d in found):
        return found
    root = next((d for d in found if d.role == "root"), None)
    if root is None:
        return found
    home = PurePosixPath(root.path or "").parent
    candidates = [
        d
        for d in found
        if d.role == "other"
        and d.device == "disk"
        and d.source_type == "file"
        and d.path
        and PurePosixPath(d.path).parent == home
        and d.target > root.target
    ]
    if not candidates:
        return found
    chosen = min(candidates, key=lambda d: d.target)
    return [dataclasses.replace(d, role="ephemeral") if d is chosen else d for d in found]


def local_disk_sizes_mib(found: Inspection, sizes: Mapping[str, int]) -> dict[str, int]:
    """Sizes (MiB) of the ephemeral and swap disks: their virtual size when it could be read,
    else what Nova's flavor says (one ephemeral disk takes the flavor's whole ephemeral)."""
    result: dict[str, int] = {}
    flavor = found.nova.flavor if found.nova else None
    ephemerals = found.having("ephemeral")
    for disk in [*ephemerals, *found.having("swap")]:
        size = sizes.get(disk.path or "")
        if size is not None:
            result[disk.target] = math.ceil(size / MiB)
        elif flavor and disk.role == "swap" and flavor.swap:
            result[disk.target] = flavor.swap
        elif flavor and disk.role == "ephemeral" and flavor.ephemeral and len(ephemerals) == 1:
            result[disk.target] = flavor.ephemeral * 1024
    return result


def flavor_values(found: Inspection, sizes: Mapping[str, int]) -> FlavorValues:
    """vCPUs and memory from the XML, the root disk's virtual size rounded up to GiB (so a
    rebuilt root disk is never smaller), ephemeral and swap from Nova's flavor when it has
    one, else from the disks found."""
    root_size = sizes[found.root.path or ""]
    local = local_disk_sizes_mib(found, sizes)
    nova = found.nova.flavor if found.nova else None
    if nova is not None:
        ephemeral, swap = nova.ephemeral or 0, nova.swap or 0
    else:
        ephemeral = math.ceil(sum(local.get(d.target, 0) for d in found.having("ephemeral")) / 1024)
        swap = sum(local.get(d.target, 0) for d in found.having("swap"))
    return FlavorValues(
        vcpus=found.vcpus,
        ram=found.memory_mib,
        disk=math.ceil(root_size / GiB),
        ephemeral=ephemeral,
        swap=swap,
    )


def _values_of(flavor: Flavor) -> FlavorValues:
    return FlavorValues(flavor.vcpus, flavor.ram, flavor.disk, flavor.ephemeral, flavor.swap)


def choose_flavor(
    values: FlavorValues, existing: Sequence[Flavor], nova_name: str | None = None
) -> tuple[Flavor, bool]:
    """An enabled flavor with exactly these values (Nova's name preferred), or a new one:
    ``(flavor, is_new)``. A new flavor takes Nova's name when it is free, else
    ``adopted-<vcpus>c-<ram>m-<disk>g[-<ephemeral>e][-<swap>s]``; its id is its name."""
    matching = [f for f in existing if not f.disabled and _values_of(f) == values]
    if matching:
        named = [f for f in matching if nova_name is not None and f.name == nova_name]
        return (named or matching)[0], False
    taken = {f.name for f in existing} | {f.id for f in existing}
    name = f"adopted-{values.vcpus}c-{values.ram}m-{values.disk}g"
    name += f"-{values.ephemeral}e" if values.ephemeral else ""
    name += f"-{values.swap}s" if values.swap else ""
    if nova_name and nova_name not in taken:
        name = nova_name
    elif name in taken:
        name = f"{name}-{uuid.uuid4().hex[:8]}"
    flavor = Flavor(
        id=name,
        name=name,
        vcpus=values.vcpus,
        ram=values.ram,
        disk=values.disk,
        ephemeral=values.ephemeral,
        swap=values.swap,
        description="made by rebuildd adopt",
    )
    return flavor, True


def vm_state_for(domain: str, power_state: int) -> str:
    """active when running, stopped when shut off; rebuildd has no state for the others."""
    if power_state == PowerState.RUNNING:
        return VmState.ACTIVE
    if power_state == PowerState.SHUTDOWN:
        return VmState.STOPPED
    raise refuse(domain, "it is neither running nor shut off (paused, suspended or crashed)")


def build(
    found: Inspection,
    *,
    flavor: Flavor,
    sizes: Mapping[str, int],
    power_state: int,
    defaults: Defaults,
    now: dt.datetime | None = None,
) -> tuple[Server, tuple[BlockDevice, ...]]:
    """The Server and its BlockDevices for an inspected domain in ``power_state``."""
    vm_state = vm_state_for(found.name, power_state)
    when = now or utcnow()
    nova = found.nova or NovaInstance()
    image_id = nova.root_uuid if nova.root_type == "image" and nova.root_uuid else ""
    name = nova.name or found.name
    server = Server(
        id=found.uuid,
        name=name,
        project_id=nova.project_uuid or defaults.project_id,
        user_id=nova.user_uuid or defaults.user_id,
        image_ref=image_id,
        flavor=flavor,
        vm_state=vm_state,
        task_state=None,
        power_state=power_state,
        host=defaults.host,
        node=defaults.host,
        domain_name=found.name,
        hostname=hostname_for(name, found.uuid),
        metadata={},
        key_name=None,
        key_data=None,
        user_data=None,
        description=None,
        access_ip_v4="",
        access_ip_v6="",
        auto_disk_config=False,
        locked=False,
        locked_reason=None,
        config_drive=bool(found.having("config_drive")),
        progress=0,
        launched_at=when,
        terminated_at=None,
        created_at=nova.creation_time or when,
        updated_at=when,
    )
    local = local_disk_sizes_mib(found, sizes)
    devices = tuple(_block_device(server, d, image_id, local.get(d.target)) for d in found.disks)
    return server, devices


def _block_device(
    server: Server, disk: FoundDisk, image_id: str, size_mib: int | None
) -> BlockDevice:
    boot_index: int | None = None
    source_type, destination_type = "blank", "local"
    guest_format = volume_id = None
    if disk.role == "root":
        boot_index, source_type = 0, "image"
    elif disk.role == "ephemeral":
        guest_format = DEFAULT_EPHEMERAL_FORMAT
    elif disk.role == "swap":
        guest_format = "swap"
    elif disk.role == "config_drive":
        guest_format = "iso9660" if disk.device == "cdrom" else "vfat"
    elif disk.source_type in ("block", "network", "volume"):
        # Most likely an attached volume (Nova writes the Cinder volume id as <serial>).
        source_type = destination_type = "volume"
        volume_id = _uuid_or_none(disk.serial)
    owned = disk.owned
    if disk.role in ("ephemeral", "swap") and size_mib is None:
        owned = False  # of unknown size: a rebuild could not make it anew
    if disk.role == "config_drive" and disk.device != "cdrom":
        owned = False  # a vfat config drive: rebuildd makes iso9660 ones only
    return BlockDevice(
        id=str(uuid.uuid4()),
        server_id=server.id,
        boot_index=boot_index,
        source_type=source_type,
        destination_type=destination_type,
        device_name=disk.target,
        image_id=(image_id or None) if disk.role == "root" else None,
        volume_id=volume_id,
        path=disk.path,
        disk_bus=disk.bus or "virtio",
        device_type=disk.device,
        guest_format=guest_format,
        size_mib=size_mib,
        owned=owned,
    )


def _uuid_or_none(text: str | None) -> str | None:
    try:
        return str(uuid.UUID(text or ""))
    except ValueError:
        return None


# -- I/O: the command ---------------------------------------------------------------------------


class Domains(Protocol):
    """The hypervisor calls adopt needs (rebuildd.hypervisor.LibvirtHypervisor has them)."""

    async def list_domain_names(self) -> list[str]: ...
    async def exists(self, name: str) -> bool: ...
    async def domain_xml(self, name: str, *, inactive: bool = True) -> str: ...
    async def power_state(self, name: str) -> int: ...
    async def persistent(self, name: str) -> bool: ...
    async def attach_disks(
        self,
        name: str,
        disks: Sequence[domxml.DiskSpec | str],
        *,
        metadata: domxml.Metadata | None = None,
    ) -> None: ...


class DiskInfo(Protocol):
    async def info(self, path: Path, *, fmt: str, force_share: bool = False) -> ImageInfo: ...


@dataclass(frozen=True, slots=True)
class Adopted:
    domain: str
    server: Server
    block_devices: tuple[BlockDevice, ...]
    flavor_created: bool
    warning: str | None = None  # rebuildd's metadata could not be written into the domain


@dataclass(frozen=True, slots=True)
class Refused:
    domain: str
    reason: str
    missing: bool = False  # a named domain that does not exist


@dataclass(slots=True)
class Report:
    adopted: list[Adopted] = field(default_factory=list)
    refused: list[Refused] = field(default_factory=list)
    candidates: int = 0  # domains looked at (for --all: those not known yet)


async def adopt(
    store: Store,
    domains: Domains,
    disks: DiskInfo,
    defaults: Defaults,
    names: Sequence[str] | None,
) -> Report:
    """Adopt the domains ``names``, or with None every domain the Store does not know yet."""
    servers = await store.list_servers(ServerFilters(include_deleted=True))
    by_id = {s.id: s for s in servers}
    by_domain = {s.domain_name: s for s in servers}
    report = Report()
    if names is None:
        targets = [n for n in await domains.list_domain_names() if n not in by_domain]
    else:
        targets = list(dict.fromkeys(names))
    for name in targets:
        report.candidates += 1
        try:
            if not await domains.exists(name):
                raise errors.DomainNotFound(domain=name)
            adopted = await _adopt_one(store, domains, disks, defaults, name, by_id, by_domain)
        except errors.DomainNotFound:
            report.refused.append(Refused(name, "no such domain", missing=True))
        except errors.AdoptionRefused as exc:
            report.refused.append(Refused(name, str(exc.kwargs["reason"])))
        except errors.RebuilddError as exc:
            report.refused.append(Refused(name, exc.message))
        else:
            by_id[adopted.server.id] = by_domain[name] = adopted.server
            report.adopted.append(adopted)
    return report


async def _adopt_one(
    store: Store,
    domains: Domains,
    disks: DiskInfo,
    defaults: Defaults,
    name: str,
    by_id: Mapping[str, Server],
    by_domain: Mapping[str, Server],
) -> Adopted:
    if name in by_domain:
        raise refuse(name, f"it is already the domain of {_server_text(by_domain[name])}")
    if not await domains.persistent(name):
        # A rebuild re-defines the domain, which would make it persistent behind its owner.
        raise refuse(name, "it is transient (libvirt has no persistent definition of it)")
    found = inspect(domxml.parse(await domains.domain_xml(name, inactive=True)))
    if found.uuid in by_id:
        raise refuse(name, f"its uuid is already {_server_text(by_id[found.uuid])}")
    power_state = await domains.power_state(name)
    vm_state_for(name, power_state)  # refuse before anything is written
    sizes = await _virtual_sizes(disks, found)
    flavor, created = await _flavor(store, found, sizes)
    server, devices = build(
        found, flavor=flavor, sizes=sizes, power_state=power_state, defaults=defaults
    )
    action = NewAction(
        "adopt",
        request_id=f"req-{uuid.uuid4()}",
        user_id=server.user_id,
        project_id=server.project_id,
    )
    await store.create_server(server, devices, action, action_time=server.updated_at)
    warning = None
    try:
        # No disk, only the metadata: one define of the persistent XML, nothing else changed.
        await domains.attach_disks(name, [], metadata=domain_metadata(server, server.image_ref))
    except errors.RebuilddError as exc:
        warning = f"rebuildd's metadata was not written into the domain: {exc.message}"
    return Adopted(name, server, devices, created, warning)


def _server_text(server: Server) -> str:
    # A deleted server keeps its uuid and domain name in the Store, so neither can be reused.
    return f"deleted server {server.id}" if server.deleted else f"server {server.id}"


async def _virtual_sizes(disks: DiskInfo, found: Inspection) -> dict[str, int]:
    """Virtual sizes of the root, ephemeral and swap files; only the root's is required."""
    sizes: dict[str, int] = {}
    for disk in found.disks:
        if disk.role not in ("root", "ephemeral", "swap") or disk.path is None:
            continue
        try:
            sizes[disk.path] = await _checked_size(disks, Path(disk.path), disk.fmt or "raw")
        except (errors.DiskError, errors.ImageDataInvalid) as exc:
            if disk.role == "root":
                raise refuse(found.name, f"its root disk cannot be read: {exc.message}") from exc
    return sizes


async def _checked_size(disks: DiskInfo, path: Path, fmt: str) -> int:
    """The virtual size of a disk file that passed the inspection as ``fmt``; an overlay (the
    one failure allowed) passes only if its base passes the whole inspection."""
    inspect = functools.partial(imagecheck.inspect, allow=("backing_file",))
    await anyio.to_thread.run_sync(inspect, path, fmt)
    # -U: a running guest's QEMU holds a write lock on its disks.
    info = await disks.info(path, fmt=fmt, force_share=True)
    if info.backing_file:
        base = Path(info.backing_file)
        await anyio.to_thread.run_sync(imagecheck.inspect, base, info.backing_format or "raw")
    return info.virtual_size


async def _flavor(store: Store, found: Inspection, sizes: Mapping[str, int]) -> tuple[Flavor, bool]:
    values = flavor_values(found, sizes)
    nova_name = found.nova.flavor.name if found.nova and found.nova.flavor else None
    flavor, new = choose_flavor(values, await store.list_flavors(), nova_name)
    if not new:
        return flavor, False
    try:
        return await store.create_flavor(flavor), True
    except errors.Duplicate:  # made meanwhile by another adopt: take it if it matches
        flavor, new = choose_flavor(values, await store.list_flavors(), nova_name)
        if new:
            raise
        return flavor, False
