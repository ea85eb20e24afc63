"""The Hypervisor adapter: libvirt, every call off the event loop.

Owns the libvirt connection and every libvirt call, each offloaded to one of the adapter's own
worker threads through one typed helper (:meth:`LibvirtHypervisor._call`) that also maps libvirt
errors to :class:`rebuildd.errors.HypervisorError`. Disks are detached and attached by editing
the persistent domain XML (domxml.py) and re-defining it, which works the same on the
``test:///`` driver and on QEMU (the test driver has no attachDeviceFlags). Volumes are attached
to and detached from a running guest too (:meth:`attach_device`, :meth:`detach_device`; on the
test driver, which cannot, a running domain gets the persistent-definition edit only). It
also chooses the ``<domain type>`` a host can run (:meth:`LibvirtHypervisor.choose_domain_type`)
and reports a domain the hypervisor paused by itself (an emulation failure). It must not touch
the Store.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

import libvirt
import structlog

from rebuildd import domxml
from rebuildd.errors import HypervisorError
from rebuildd.offload import Offload
from rebuildd.states import PowerState

T = TypeVar("T")

# libvirt's virDomainState -> Nova's power_state (nova.virt.libvirt.guest LIBVIRT_POWER_STATE).
_POWER_STATE: Final = {
    libvirt.VIR_DOMAIN_NOSTATE: PowerState.NOSTATE,
    libvirt.VIR_DOMAIN_RUNNING: PowerState.RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED: PowerState.RUNNING,
    libvirt.VIR_DOMAIN_PAUSED: PowerState.PAUSED,
    libvirt.VIR_DOMAIN_SHUTDOWN: PowerState.SHUTDOWN,
    libvirt.VIR_DOMAIN_SHUTOFF: PowerState.SHUTDOWN,
    libvirt.VIR_DOMAIN_CRASHED: PowerState.CRASHED,
    libvirt.VIR_DOMAIN_PMSUSPENDED: PowerState.SUSPENDED,
}
_POLL_INTERVAL: Final = 0.05
# KVM modules that run guest code on the CPU; another one behind /dev/kvm (PVM's kvm_pvm)
# emulates it and stops a real OS at its first unsupported instruction.
_HARDWARE_KVM: Final = ("kvm_intel", "kvm_amd")
# How long after a start a KVM domain is watched for a pause of its own (looked at after 1, 2,
# 4 ... s: an emulation failure comes seconds into the boot, later on a busy host).
PAUSE_WATCH: Final = 120.0

log = structlog.get_logger("rebuildd.hypervisor")


@dataclass(frozen=True, slots=True)
class DomainTypeChoice:
    """The ``<domain type>`` for new servers, and why."""

    domain_type: str
    reason: str


def _paused_by_hypervisor(code: int, reason: int) -> bool:
    return code == libvirt.VIR_DOMAIN_PAUSED and reason in (
        libvirt.VIR_DOMAIN_PAUSED_UNKNOWN,
        libvirt.VIR_DOMAIN_PAUSED_CRASHED,
    )


def _pause_message(name: str) -> str:
    return (
        f"domain {name} was paused by the hypervisor, not by a request: an emulation "
        "failure (this host's KVM cannot run this guest; set domain_type=qemu); the "
        f"register dump is in QEMU's log (/var/log/libvirt/qemu/{name}.log)"
    )


def _quiet_error_handler(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr by default; we raise them instead."""


class LibvirtHypervisor:
    """One libvirt connection shared by all threads (connections are thread-safe)."""

    def __init__(self, uri: str, *, threads: int, detach_timeout: float = 20.0) -> None:
        self.uri = uri
        self.detach_timeout = detach_timeout
        self.pause_watch: float | None = None  # set when new domains are KVM's
        self._offload = Offload(threads, "libvirt")
        self._conn: Any = None
        self._checks: set[asyncio.Task[None]] = set()

    async def open(self) -> None:
        libvirt.registerErrorHandler(_quiet_error_handler, None)
        self._conn = await self._call("open", libvirt.open, self.uri)

    async def close(self) -> None:
        for check in list(self._checks):
            check.cancel()
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await self._call("close", conn.close)
        self._offload.shutdown()

    async def _call(self, name: str, fn: Callable[..., T], *args: Any) -> T:
        """Run one blocking libvirt call in one of the adapter's worker threads (a cancelled
        caller waits for it to end: :class:`rebuildd.offload.Offload`); map libvirt
        errors."""
        try:
            return await self._offload.run(fn, *args)
        except libvirt.libvirtError as exc:
            raise HypervisorError(call=name, reason=exc.get_error_message() or str(exc)) from exc

    def _lookup(self, name: str) -> Any:
        return self._conn.lookupByName(name)

    async def choose_domain_type(
        self, setting: str, *, modules: Path = Path("/sys/module")
    ) -> DomainTypeChoice:
        """``setting`` unless it is ``auto``; then ``test`` on the test driver, ``kvm`` when
        libvirt offers it and the KVM module (under ``modules``) is hardware virtualisation,
        else ``qemu`` (TCG). New KVM domains are then looked at again after their start."""
        choice = await self._choose(setting, modules)
        if choice.domain_type == "kvm":
            self.pause_watch = PAUSE_WATCH
        log.info("domain_type_chosen", domain_type=choice.domain_type, reason=choice.reason)
        return choice

    async def _choose(self, setting: str, modules: Path) -> DomainTypeChoice:
        if setting != "auto":
            return DomainTypeChoice(setting, "set by domain_type")
        if self.uri.startswith("test:"):
            return DomainTypeChoice("test", "the test driver")

        def probe() -> tuple[bool, list[str]]:
            try:
                self._conn.getDomainCapabilities(None, "x86_64", None, "kvm", 0)
            except libvirt.libvirtError:
                return False, []
            return True, sorted(p.name for p in modules.glob("kvm*"))

        offered, loaded = await self._call("getDomainCapabilities", probe)
        if not offered:
            return DomainTypeChoice("qemu", "libvirt offers no kvm domain on this host")
        hardware = [m for m in _HARDWARE_KVM if m in loaded]
        if hardware:
            return DomainTypeChoice("kvm", f"hardware KVM ({hardware[0]})")
        return DomainTypeChoice(
            "qemu",
            f"/dev/kvm is not hardware virtualisation (KVM modules: {', '.join(loaded) or 'none'})"
            ": a real guest would pause at once with an emulation failure",
        )

    # -- queries ------------------------------------------------------------------------------

    async def exists(self, name: str) -> bool:
        return await self.find(name) is not None

    async def domain_xml(self, name: str, *, inactive: bool = True) -> str:
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0
        return await self._call("XMLDesc", lambda: str(self._lookup(name).XMLDesc(flags)))

    async def find(self, name: str) -> int | None:
        """The domain's power state, None when there is no such domain (one call for both)."""

        def state() -> int | None:
            try:
                code = self._lookup(name).state()[0]
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    return None
                raise
            return _POWER_STATE.get(code, PowerState.NOSTATE)

        return await self._call("state", state)

    async def power_state(self, name: str) -> int:
        def state() -> int:
            code = self._lookup(name).state()[0]
            return _POWER_STATE.get(code, PowerState.NOSTATE)

        return await self._call("state", state)

    async def persistent(self, name: str) -> bool:
        return await self._call("isPersistent", lambda: bool(self._lookup(name).isPersistent()))

    async def list_domain_names(self) -> list[str]:
        return await self._call(
            "listAllDomains", lambda: [d.name() for d in self._conn.listAllDomains(0)]
        )

    # -- lifecycle --------------------------------------------------------------------------------

    async def define(self, xml: str) -> None:
        await self._call("defineXML", self._conn.defineXML, xml)

    async def start(self, name: str) -> int:
        """Start the domain if it is off; returns its power state after (in the same call).
        A domain the hypervisor paused by itself is a HypervisorError; with ``pause_watch``
        (KVM hosts) it is watched that long, and a pause of its own then is logged
        (``domain_paused_by_hypervisor``)."""

        def create() -> int:
            dom = self._lookup(name)
            if not dom.isActive():
                dom.create()
            code, reason = dom.state()
            if _paused_by_hypervisor(code, reason):
                raise HypervisorError(call="create", reason=_pause_message(name))
            return _POWER_STATE.get(code, PowerState.NOSTATE)

        state = await self._call("create", create)
        if self.pause_watch is not None:
            check = asyncio.create_task(self._watch_pause(name, self.pause_watch))
            self._checks.add(check)
            check.add_done_callback(self._checks.discard)
        return state

    async def paused_by_hypervisor(self, name: str) -> bool:
        """True when the domain is paused and neither a user nor libvirt asked for it (QEMU
        stopped its vCPU: a KVM emulation failure, say)."""

        def read() -> bool:
            try:
                code, reason = self._lookup(name).state()
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    return False
                raise
            return _paused_by_hypervisor(code, reason)

        return await self._call("state", read)

    async def _watch_pause(self, name: str, watch: float) -> None:
        delay, waited = 1.0, 0.0
        while waited < watch:
            await asyncio.sleep(delay)
            waited, delay = waited + delay, delay * 2
            try:
                paused = await self.paused_by_hypervisor(name)
            except HypervisorError:
                return
            if paused:
                log.error("domain_paused_by_hypervisor", domain=name, reason=_pause_message(name))
                return

    async def destroy(self, name: str) -> None:
        def destroy() -> None:
            dom = self._lookup(name)
            if dom.isActive():
                dom.destroy()

        await self._call("destroy", destroy)

    async def power_off(self, name: str, *, timeout: float) -> bool:
        """Clean shutdown, wait up to ``timeout`` seconds, then destroy (Nova's _clean_shutdown).

        A guest without an OS ignores ACPI, so the destroy is never optional. Returns True when
        the guest shut down by itself (or was already off), False when it was destroyed. With
        no timeout the guest gets no request, and the look-up and the destroy are one call.
        """
        if timeout <= 0:
            return await self._call("destroy", functools.partial(self._destroy_now, name))

        def shutdown() -> bool:
            dom = self._lookup(name)
            if not dom.isActive():
                return False
            if timeout > 0:
                try:
                    dom.shutdown()
                except libvirt.libvirtError:
                    return True  # a guest that refuses the request is destroyed below
            return True

        if not await self._call("shutdown", shutdown):
            return True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not await self._call("isActive", lambda: bool(self._lookup(name).isActive())):
                return True
            await asyncio.sleep(_POLL_INTERVAL)
        await self.destroy(name)
        return False

    def _destroy_now(self, name: str) -> bool:
        """True when the domain was already off, False when it had to be destroyed."""
        dom = self._lookup(name)
        if not dom.isActive():
            return True
        dom.destroy()
        return False

    async def undefine(self, name: str) -> None:
        def undefine() -> None:
            try:
                dom = self._lookup(name)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    return
                raise
            if dom.isActive():
                dom.destroy()
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)

        await self._call("undefine", undefine)

    # -- disks (edit the persistent XML, then re-define) ---------------------------------------

    async def disks_xml(self, name: str, targets: Sequence[str]) -> dict[str, str]:
        """The persistent ``<disk>`` elements on ``targets``, as XML (targets with none are
        left out)."""

        def read() -> dict[str, str]:
            root = domxml.parse(self._lookup(name).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
            found = {}
            for target in targets:
                disk = domxml.find_disk(root, target)
                if disk is not None:
                    disk.tail = None
                    found[target] = domxml.to_string(disk)
            return found

        return await self._call("disks_xml", read)

    async def nics(self, name: str) -> list[tuple[str, str]]:
        """(MAC address, interface type) of the domain's network interfaces."""

        def read() -> list[tuple[str, str]]:
            root = domxml.parse(self._lookup(name).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
            return domxml.interfaces(root)

        return await self._call("nics", read)

    async def detach_disks(self, name: str, targets: Sequence[str]) -> None:
        """Remove the disks on ``targets`` from the persistent definition, in one define (a
        repeated detach is a no-op)."""

        def detach() -> None:
            root = domxml.parse(self._lookup(name).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
            removed = [domxml.remove_disk(root, target) for target in targets]
            if any(r is not None for r in removed):
                self._conn.defineXML(domxml.to_string(root))

        await self._call("detach_disks", detach)

    async def attach_disks(
        self,
        name: str,
        disks: Sequence[domxml.DiskSpec | str],
        *,
        metadata: domxml.Metadata | None = None,
    ) -> None:
        """Put disks on their targets in the persistent definition (replacing what is there)
        and, with ``metadata``, write the domain's metadata too — all in one define."""

        def attach() -> None:
            root = domxml.parse(self._lookup(name).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
            for disk in disks:
                domxml.add_disk(
                    root, disk if isinstance(disk, domxml.DiskSpec) else domxml.parse(disk)
                )
            if metadata is not None:
                domxml.write_metadata(root, metadata)
            self._conn.defineXML(domxml.to_string(root))

        await self._call("attach_disks", attach)

    # -- devices of a running guest (volumes) ------------------------------------------------

    async def attach_device(self, name: str, disk_xml: str) -> None:
        """Attach a ``<disk>``: live and persistent (``attachDeviceFlags`` LIVE|CONFIG) when
        the domain runs, to the persistent definition when it is off. Idempotent: a target
        already there is not attached twice. The test driver has no attachDeviceFlags: there
        a running domain gets the persistent edit only (it shows at the next start)."""
        element = domxml.parse(disk_xml)
        target = domxml.disk_target(element)

        def attach() -> None:
            dom = self._lookup(name)
            persistent = domxml.parse(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
            in_config = domxml.find_disk(persistent, target) is not None
            if dom.isActive() and domxml.find_disk(domxml.parse(dom.XMLDesc(0)), target) is None:
                flags = libvirt.VIR_DOMAIN_AFFECT_LIVE
                if not in_config:
                    flags |= libvirt.VIR_DOMAIN_AFFECT_CONFIG
                try:
                    dom.attachDeviceFlags(disk_xml, flags)
                    return
                except libvirt.libvirtError as exc:
                    if exc.get_error_code() != libvirt.VIR_ERR_NO_SUPPORT:
                        raise
            if not in_config:
                domxml.add_disk(persistent, element)
                self._conn.defineXML(domxml.to_string(persistent))

        await self._call("attachDeviceFlags", attach)

    async def detach_device(self, name: str, target: str) -> None:
        """Nova's detach-then-verify: from a running guest the disk is unplugged live first and
        the live XML polled until it is gone (a guest that does not cooperate — one with no OS
        — never lets go, though libvirt reports success); only then is it removed from the
        persistent definition. A disk still there after ``detach_timeout`` seconds is a
        HypervisorError with the definition untouched, so a failed detach leaves the disk
        attached, never half-detached. Idempotent; on the test driver (no detachDeviceFlags)
        the persistent definition alone is edited."""

        def request() -> bool:
            dom = self._lookup(name)
            if not dom.isActive():
                return False
            disk = domxml.find_disk(domxml.parse(dom.XMLDesc(0)), target)
            if disk is None:
                return False
            disk.tail = None
            try:
                dom.detachDeviceFlags(domxml.to_string(disk), libvirt.VIR_DOMAIN_AFFECT_LIVE)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_SUPPORT:
                    return False
                raise
            return True

        if await self._call("detachDeviceFlags", request):
            await self._wait_unplugged(name, target)

        def forget() -> None:
            root = domxml.parse(self._lookup(name).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
            if domxml.remove_disk(root, target) is not None:
                self._conn.defineXML(domxml.to_string(root))

        await self._call("detach_device", forget)

    async def _wait_unplugged(self, name: str, target: str) -> None:
        def present() -> bool:
            dom = self._lookup(name)
            if not dom.isActive():
                return False
            return domxml.find_disk(domxml.parse(dom.XMLDesc(0)), target) is not None

        deadline = time.monotonic() + self.detach_timeout
        while await self._call("XMLDesc", present):
            if time.monotonic() >= deadline:
                raise HypervisorError(
                    call="detachDeviceFlags",
                    reason=f"disk {target} of {name} is still attached to the running guest "
                    f"after {self.detach_timeout:g} s: the guest did not release it",
                )
            await asyncio.sleep(_POLL_INTERVAL * 4)
