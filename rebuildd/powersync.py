"""The power-state sync: the database kept true to what libvirt shows (Nova's
``ComputeManager._sync_power_states`` and ``_sync_instance_power_state``).

Owns the comparison of each server's vm_state/power_state with its domain's, and the one
compare-and-swap (``expected_task_state`` None) that corrects it. It runs on libvirt's
lifecycle events (a guest stopped, crashed, was undefined), after libvirt reconnects, and
every ``interval`` seconds. Nova's rules, for servers with no task_state only (a job in flight
owns its server; the swap loses to it):

- the database's power_state becomes the domain's;
- an ACTIVE server whose guest stopped or crashed by itself becomes STOPPED (SHUTOFF);
- a server whose domain is gone gets power_state NOSTATE and a fault that says so; an ACTIVE
  one becomes STOPPED, so it can be started (the domain is defined anew), rebuilt or deleted.

It must not call libvirt but through the adapter, nor write task_state.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Protocol

import structlog

from rebuildd import errors
from rebuildd.models import Fault, Server, utcnow
from rebuildd.states import PowerState, VmState
from rebuildd.storage import ServerFilters, Store

log = structlog.get_logger("rebuildd.powersync")

ACTION = "power_sync"


class DomainStates(Protocol):
    async def domain_states(self) -> dict[str, int]: ...


@dataclass(frozen=True, slots=True)
class Correction:
    server_id: str
    changes: dict[str, object]
    fault: str | None = None


def correction(server: Server, state: int | None) -> Correction | None:
    """What Nova's _sync_instance_power_state changes for ``server`` when its domain shows
    ``state`` (None: no such domain); None when nothing is to change."""
    if server.task_state is not None or server.vm_state in (VmState.BUILDING, VmState.DELETED):
        return None
    power = PowerState.NOSTATE if state is None else state
    changes: dict[str, object] = {}
    if server.power_state != power:
        changes["power_state"] = power
    gone_now = state is None and server.power_state != PowerState.NOSTATE
    if server.vm_state == VmState.ACTIVE and (
        state is None or power in (PowerState.SHUTDOWN, PowerState.CRASHED)
    ):
        changes["vm_state"] = VmState.STOPPED
    if not changes:
        return None
    fault = None
    if gone_now or (state is None and "vm_state" in changes):
        fault = (
            f"Domain {server.domain_name} is gone from the hypervisor (undefined outside "
            "rebuildd); start or rebuild the server to define it anew, or delete it."
        )
    return Correction(server.id, changes, fault)


class PowerSync:
    """Runs the sync: :meth:`sync` once, :meth:`poke` from an event (coalesced), :meth:`run`
    periodically."""

    def __init__(self, store: Store, hypervisor: DomainStates, *, interval: float) -> None:
        self.store = store
        self.hypervisor = hypervisor
        self.interval = interval
        self.passes = 0  # finished passes (readable by tests and metrics)
        self._wanted = asyncio.Event()

    def poke(self, _name: str | None = None) -> None:
        """A lifecycle event or a reconnect: sync soon (events close together make one pass)."""
        self._wanted.set()

    async def run(self) -> None:
        """Sync now (a restart may find domains gone), then on every poke and every
        ``interval`` seconds (0: on pokes only)."""
        self._wanted.set()
        while True:
            timeout = self.interval if self.interval > 0 else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wanted.wait(), timeout)
            self._wanted.clear()
            try:
                await self.sync()
            except errors.ServiceUnavailable as exc:
                log.info("power sync skipped", reason=exc.message)
            except Exception:
                log.exception("power sync failed")

    async def sync(self) -> int:
        """One pass over every server; returns how many were corrected."""
        servers = await self.store.list_servers(ServerFilters())
        states = await self.hypervisor.domain_states()
        corrected = 0
        for server in servers:
            fix = correction(server, states.get(server.domain_name))
            if fix is not None and await self._apply(server, fix):
                corrected += 1
        self.passes += 1
        return corrected

    async def _apply(self, seen: Server, fix: Correction) -> bool:
        # A job that began and ended between the list and the domain look-up changed the
        # server (updated_at): what was seen of the domain may be from the middle of it.
        try:
            now = await self.store.get_server(seen.id)
        except errors.ServerNotFound:
            return False
        if now.updated_at != seen.updated_at or now.task_state is not None:
            return False
        fault = None
        if fix.fault is not None:
            fault = Fault(code=500, message=fix.fault, details="", created_at=utcnow())
        try:
            await self.store.transition(
                seen.id,
                action=ACTION,
                expected_task_state=(None,),
                expected_vm_state=(seen.vm_state,),
                task_state=None,
                changes=fix.changes,
                fault=fault,
            )
        except (errors.Conflict, errors.ServerNotFound):
            return False
        log.warning(
            "power state synced",
            server_id=seen.id,
            domain=seen.domain_name,
            vm_state=fix.changes.get("vm_state", seen.vm_state),
            power_state=fix.changes.get("power_state", seen.power_state),
            gone=fix.fault is not None,
        )
        return True
