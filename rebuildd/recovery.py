"""Restart recovery: finish or roll back every job a previous process left in flight.

Owns the start-up pass over the action journal. For each action still ``running`` or
``cleaning`` it rebuilds the job from the action's saved parameters and journal, and hands it
to :meth:`~rebuildd.runner.Runner.resume`, which rolls it forward or back from what the journal
says and what libvirt shows (every step and undo is idempotent). It runs while the API already
serves: servers of different actions are recovered concurrently (at most ``limit`` at once),
the actions of one server in order. A server under recovery keeps its task_state until its
job ends, so every action on it answers 409 meanwhile (the api stages' compare-and-swap);
:class:`Progress` tells readiness and systemd how far it is.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final, TypeVar

import structlog

from rebuildd import errors, lifecycle, volume_jobs
from rebuildd.models import InstanceAction, Server
from rebuildd.pipeline import Deps, rebuild_job_from_action, upgrade_journal
from rebuildd.runner import Job, Journal
from rebuildd.volumestore import VolumeStore

log = structlog.get_logger("rebuildd.recovery")
T = TypeVar("T")
# Backoff of recovery waiting for the database: first wait, longest wait (seconds).
RETRY_FIRST: Final = 0.1
RETRY_MAX: Final = 5.0


@dataclass(slots=True)
class Progress:
    """How far recovery is: readiness waits for ``done`` (set once every action is
    resumed; a recovery that fails before, the database not answering, leaves it unset)."""

    total: int = 0
    finished: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)


async def recover(
    deps: Deps,
    domain: lifecycle.DomainSettings,
    *,
    volumes: VolumeStore | None = None,
    limit: int = 8,
    progress: Progress | None = None,
) -> int:
    """Resume every in-flight job, oldest first for each server, ``limit`` servers at once;
    return how many were found. ``volumes``: the volume store attach and detach jobs need
    (without it they are left to a later start)."""
    progress = progress if progress is not None else Progress()
    actions = await _waiting(deps.store.in_flight_actions)
    progress.total, progress.finished = len(actions), 0
    by_server: dict[str, list[InstanceAction]] = {}
    for action in actions:
        by_server.setdefault(action.server_id, []).append(action)
    slots = asyncio.Semaphore(max(1, limit))

    async def one_server(queued: list[InstanceAction]) -> None:
        async with slots:
            for action in queued:
                await _resume(deps, domain, action, volumes)
                progress.finished += 1

    async with asyncio.TaskGroup() as group:
        for queued in by_server.values():
            group.create_task(one_server(queued))
    progress.done.set()
    if actions:
        log.info("recovery finished", actions=len(actions))
    return len(actions)


async def _waiting(read: Callable[[], Awaitable[T]]) -> T:
    """``read`` once the database answers: a database that is down at start-up (PostgreSQL
    not yet up, SQLite locked) delays recovery instead of leaving a job for the next one."""
    delay, waiting = RETRY_FIRST, False
    while True:
        try:
            return await read()
        except errors.DatabaseUnavailable as exc:
            if not waiting:
                waiting = True
                log.warning("recovery_waits_for_database", reason=exc.message)
        await asyncio.sleep(delay)
        delay = min(delay * 2, RETRY_MAX)


async def _resume(
    deps: Deps,
    domain: lifecycle.DomainSettings,
    action: InstanceAction,
    volumes: VolumeStore | None,
) -> None:
    try:
        server = await _waiting(
            functools.partial(deps.store.get_server, action.server_id, include_deleted=True)
        )
        job = await _waiting(functools.partial(_job, deps, domain, action, server, volumes))
        journal = action.journal
        if action.action == "rebuild":
            journal = upgrade_journal(journal)
        await deps.runner.resume(
            job, Journal.load(journal), action.job_state or "", server.task_state
        )
    except Exception:
        log.exception(
            "recovery of an action failed",
            action=action.action,
            request_id=action.request_id,
            server_id=action.server_id,
        )


async def _job(
    deps: Deps,
    domain: lifecycle.DomainSettings,
    action: InstanceAction,
    server: Server,
    volumes: VolumeStore | None,
) -> Job[object]:
    if action.action in volume_jobs.ACTIONS and volumes is not None:
        return volume_jobs.job_from_action(deps, volumes, action, server)  # type: ignore[return-value]
    if action.action == "rebuild":
        return await rebuild_job_from_action(deps, action, server)  # type: ignore[return-value]
    return await lifecycle.job_from_action(deps, domain, action, server)  # type: ignore[return-value]
