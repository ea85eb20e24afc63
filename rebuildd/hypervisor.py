"""The Hypervisor adapter: libvirt, every call off the event loop.

Owns the libvirt connection and every libvirt call, each offloaded to a worker thread through
one typed helper (:meth:`LibvirtHypervisor._call`) that also maps libvirt errors to
:class:`rebuildd.errors.HypervisorError`. Disks are detached and attached by editing the
persistent domain XML (domxml.py) and re-defining it, which works the same on the ``test:///``
driver and on QEMU (the test driver has no attachDeviceFlags). It must not touch the Store.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from typing import Any, Final, TypeVar

import anyio
import libvirt

from rebuildd import domxml
from rebuildd.errors import HypervisorError
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


def _quiet_error_handler(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr by default; we raise them instead."""


class LibvirtHypervisor:
    """One libvirt connection shared by all threads (connections are thread-safe)."""

    def __init__(self, uri: str, *, threads: int) -> None:
        self.uri = uri
        self._limiter = anyio.CapacityLimiter(threads)
        self._conn: Any = None

    async def open(self) -> None:
        libvirt.registerErrorHandler(_quiet_error_handler, None)
        self._conn = await self._call("open", libvirt.open, self.uri)

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await self._call("close", conn.close)

    async def _call(self, name: str, fn: Callable[..., T], *args: Any) -> T:
        """Run one blocking libvirt call in a worker thread; map libvirt errors."""
        try:
            return await anyio.to_thread.run_sync(
                functools.partial(fn, *args), limiter=self._limiter, abandon_on_cancel=False
            )
        except libvirt.libvirtError as exc:
            raise HypervisorError(call=name, reason=exc.get_error_message() or str(exc)) from exc

    def _lookup(self, name: str) -> Any:
        return self._conn.lookupByName(name)

    # -- queries ------------------------------------------------------------------------------

    async def exists(self, name: str) -> bool:
        def lookup() -> bool:
            try:
                self._lookup(name)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    return False
                raise
            return True

        return await self._call("lookupByName", lookup)

    async def domain_xml(self, name: str, *, inactive: bool = True) -> str:
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0
        return await self._call("XMLDesc", lambda: str(self._lookup(name).XMLDesc(flags)))

    async def power_state(self, name: str) -> int:
        def state() -> int:
            code = self._lookup(name).state()[0]
            return _POWER_STATE.get(code, PowerState.NOSTATE)

        return await self._call("state", state)

    async def list_domain_names(self) -> list[str]:
        return await self._call(
            "listAllDomains", lambda: [d.name() for d in self._conn.listAllDomains(0)]
        )

    # -- lifecycle --------------------------------------------------------------------------------

    async def define(self, xml: str) -> None:
        await self._call("defineXML", self._conn.defineXML, xml)

    async def start(self, name: str) -> None:
        def create() -> None:
            dom = self._lookup(name)
            if not dom.isActive():
                dom.create()

        await self._call("create", create)

    async def destroy(self, name: str) -> None:
        def destroy() -> None:
            dom = self._lookup(name)
            if dom.isActive():
                dom.destroy()

        await self._call("destroy", destroy)

    async def power_off(self, name: str, *, timeout: float) -> None:
        """Clean shutdown, wait up to ``timeout`` seconds, then destroy (Nova's _clean_shutdown).

        A guest without an OS ignores ACPI, so the destroy is never optional.
        """

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
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if await self.power_state(name) != PowerState.RUNNING:
                break
            await asyncio.sleep(_POLL_INTERVAL)
        await self.destroy(name)

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

    async def disk_xml(self, name: str, target: str) -> str | None:
        """The persistent ``<disk>`` element on ``target``, as XML, or None."""

        def read() -> str | None:
            root = domxml.parse(self._lookup(name).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
            disk = domxml.find_disk(root, target)
            if disk is None:
                return None
            disk.tail = None
            return domxml.to_string(disk)

        return await self._call("disk_xml", read)

    async def detach_disk(self, name: str, target: str) -> str | None:
        """Remove the disk on ``target`` from the persistent definition.

        Returns the removed ``<disk>`` element as XML (to put back on undo), or None when no
        disk was on that target (so a repeated detach is a no-op).
        """

        def detach() -> str | None:
            root = domxml.parse(self._lookup(name).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
            removed = domxml.remove_disk(root, target)
            if removed is None:
                return None
            self._conn.defineXML(domxml.to_string(root))
            return domxml.to_string(removed)

        return await self._call("detach_disk", detach)

    async def attach_disk(self, name: str, disk: domxml.DiskSpec | str) -> None:
        """Put a disk on its target in the persistent definition (replacing what is there)."""

        def attach() -> None:
            root = domxml.parse(self._lookup(name).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
            element = disk if isinstance(disk, domxml.DiskSpec) else domxml.parse(disk)
            domxml.add_disk(root, element)
            self._conn.defineXML(domxml.to_string(root))

        await self._call("attach_disk", attach)

    async def set_metadata(self, name: str, items: tuple[tuple[str, str], ...]) -> None:
        def write() -> None:
            root = domxml.parse(self._lookup(name).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
            domxml.set_metadata(root, items)
            self._conn.defineXML(domxml.to_string(root))

        await self._call("set_metadata", write)
