"""The job runner every pipeline (build, rebuild, stop, start, delete) runs on.

Owns the bookkeeping that happens once per job and never in a step: instance-action events,
notifications, task_state transitions between steps, undo on failure (newest first, shielded
from cancellation), the final state with its fault, and bounded concurrency. Steps are small
async functions over one context; they must not write task_state or record events themselves.
"""

from __future__ import annotations

import asyncio
import traceback
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import structlog

from rebuildd import errors, ports
from rebuildd.models import Fault, RequestContext, Server, utcnow

log = structlog.get_logger("rebuildd.runner")
C = TypeVar("C")
StepFn = Callable[[C], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Step(Generic[C]):
    """One unit of work. ``undo`` must be idempotent: it also runs after a partial ``run``."""

    name: str
    run: StepFn[C] | None = None  # None: only the task_state transition
    undo: StepFn[C] | None = None
    task_state: str | None = None  # moved to (compare-and-swap) before ``run``


@dataclass(frozen=True, slots=True)
class Stage(Generic[C]):
    """A group of steps recorded as one instance-action event (Nova's conductor, compute)."""

    event: str
    steps: tuple[Step[C], ...]
    notify_start: str | None = None
    notify_end: str | None = None
    notify_error: str | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    """The final state a job writes with its last compare-and-swap."""

    changes: Mapping[str, Any]
    block_device_changes: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Job(Generic[C]):
    action: str
    request: RequestContext
    server_id: str
    task_state: str  # what the api stage set
    stages: tuple[Stage[C], ...]
    context: C
    succeed: Callable[[C], Awaitable[Outcome]]
    fail: Callable[[C, bool], Awaitable[Outcome]]  # (context, rolled_back) -> outcome
    cleanup: tuple[Step[C], ...] = ()  # after success; failures are logged, not fatal


class _NullObserver:
    async def before_step(self, job: str, step: str, server_id: str) -> None:
        return None

    async def after_step(self, job: str, step: str, server_id: str) -> None:
        return None


class Runner:
    """Runs jobs as asyncio tasks, at most ``limit`` at once; the rest wait in FIFO order."""

    def __init__(
        self,
        store: ports.Store,
        notifier: ports.Notifier,
        *,
        host: str,
        limit: int,
        observer: ports.StepObserver | None = None,
    ) -> None:
        self.store = store
        self.notifier = notifier
        self.host = host
        self.observer: ports.StepObserver = observer or _NullObserver()
        self._slots = asyncio.Semaphore(limit)
        self._tasks: set[asyncio.Task[None]] = set()
        self.accepting = True

    def submit(self, job: Job[Any]) -> None:
        if not self.accepting:
            raise errors.Conflict("The compute service is shutting down; try again shortly.")
        task = asyncio.create_task(self._guarded(job), name=f"{job.action}:{job.server_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def running(self) -> int:
        return len(self._tasks)

    async def drain(self, timeout: float) -> None:
        """Stop accepting jobs; wait up to ``timeout`` for running ones, then cancel them."""
        self.accepting = False
        if not self._tasks:
            return
        _, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)

    async def _guarded(self, job: Job[Any]) -> None:
        async with self._slots:
            try:
                await self._execute(job)
            except asyncio.CancelledError:
                raise
            except Exception:
                # _execute records failures itself; this is a bug in the bookkeeping.
                log.exception("job bookkeeping failed", action=job.action, server_id=job.server_id)

    async def _execute(self, job: Job[C]) -> None:
        bound = log.bind(
            action=job.action, server_id=job.server_id, request_id=job.request.request_id
        )
        task_state = job.task_state
        done: list[Step[C]] = []
        stage = job.stages[0]
        try:
            for index, stage in enumerate(job.stages):
                last = index == len(job.stages) - 1
                await self.store.start_event(job.request.request_id, stage.event, self.host)
                if stage.notify_start:
                    await self._notify(job, stage.notify_start)
                for step in stage.steps:
                    await self.observer.before_step(job.action, step.name, job.server_id)
                    if step.task_state is not None and step.task_state != task_state:
                        await self._transition(job, task_state, step.task_state)
                        task_state = step.task_state
                    done.append(step)
                    if step.run is not None:
                        bound.debug("step", step=step.name)
                        await step.run(job.context)
                    await self.observer.after_step(job.action, step.name, job.server_id)
                if last:
                    outcome = await job.succeed(job.context)
                    server = await self._transition(job, task_state, None, outcome)
                    task_state = None  # type: ignore[assignment]
                await self.store.finish_event(
                    job.request.request_id, stage.event, result="Success", finish_action=last
                )
                if stage.notify_end:
                    await self._notify(job, stage.notify_end, server if last else None)
        except BaseException as exc:
            await asyncio.shield(self._fail(job, stage, done, task_state, exc, bound))
            if not isinstance(exc, Exception):
                raise
            return
        bound.info("job finished", result="Success")
        for step in job.cleanup:
            try:
                if step.run is not None:
                    await step.run(job.context)
                await self.observer.after_step(job.action, step.name, job.server_id)
            except Exception:
                bound.exception("cleanup step failed", step=step.name)

    async def _fail(
        self,
        job: Job[C],
        stage: Stage[C],
        done: list[Step[C]],
        task_state: str | None,
        exc: BaseException,
        bound: Any,
    ) -> None:
        message = _fault_message(exc)
        details = "".join(traceback.format_exception(exc))
        bound.error("job failed", stage=stage.event, reason=message)
        rolled_back = True
        for step in reversed(done):
            if step.undo is None:
                continue
            try:
                await step.undo(job.context)
            except Exception:
                rolled_back = False
                bound.exception("undo failed", step=step.name)
        outcome = await job.fail(job.context, rolled_back)
        fault = Fault(code=500, message=message, details=details, created_at=utcnow())
        server = None
        if task_state is not None:
            server = await self._transition(job, task_state, None, outcome, fault=fault)
        await self.store.finish_event(
            job.request.request_id,
            stage.event,
            result="Error",
            traceback=details,
            details=message,
            finish_action=True,
        )
        if stage.notify_error:
            await self._notify(
                job,
                stage.notify_error,
                server,
                priority="ERROR",
                extra={"fault": {"message": message, "exception": type(exc).__name__}},
            )

    async def _transition(
        self,
        job: Job[C],
        expected: str | None,
        task_state: str | None,
        outcome: Outcome | None = None,
        *,
        fault: Fault | None = None,
    ) -> Server:
        return await self.store.transition(
            job.server_id,
            action=job.action,
            expected_task_state=(expected,),
            task_state=task_state,
            changes=outcome.changes if outcome else None,
            block_device_changes=outcome.block_device_changes if outcome else None,
            fault=fault,
        )

    async def _notify(
        self,
        job: Job[C],
        event_type: str,
        server: Server | None = None,
        *,
        priority: str = "INFO",
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        if server is None:
            server = await self.store.get_server(job.server_id, include_deleted=True)
        await self.notifier.notify(
            event_type, server, context=job.request, priority=priority, extra=extra
        )


def _fault_message(exc: BaseException) -> str:
    if isinstance(exc, errors.RebuilddError):
        return exc.message
    if isinstance(exc, asyncio.CancelledError):
        return "Interrupted: the compute service stopped during the operation."
    return f"{type(exc).__name__}: {exc}"
