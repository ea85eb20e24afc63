"""Restart recovery: finish or roll back every job a previous process left in flight.

Owns the start-up pass over the action journal. For each action still ``running`` or
``cleaning`` it rebuilds the job from the action's saved parameters and journal, and hands it
to :meth:`~rebuildd.runner.Runner.resume`, which rolls it forward or back from what the journal
says and what libvirt shows (every step and undo is idempotent). Runs before the API serves,
so no server is left in a task state — REBUILD included — after a restart.
"""

from __future__ import annotations

import structlog

from rebuildd import lifecycle, volume_jobs
from rebuildd.models import InstanceAction, Server
from rebuildd.pipeline import Deps, rebuild_job_from_action, upgrade_journal
from rebuildd.runner import Job, Journal
from rebuildd.volumestore import VolumeStore

log = structlog.get_logger("rebuildd.recovery")


async def recover(
    deps: Deps, domain: lifecycle.DomainSettings, *, volumes: VolumeStore | None = None
) -> int:
    """Resume every in-flight job, oldest first; return how many were found. ``volumes``: the
    volume store attach and detach jobs need (without it they are left to a later start)."""
    actions = await deps.store.in_flight_actions()
    for action in actions:
        try:
            server = await deps.store.get_server(action.server_id, include_deleted=True)
            job = await _job(deps, domain, action, server, volumes)
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
    if actions:
        log.info("recovery finished", actions=len(actions))
    return len(actions)


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
