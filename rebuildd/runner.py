"""The job runner every pipeline (build, rebuild, stop, start, delete) runs on.

Owns the bookkeeping that happens once per job and never in a step: instance-action events,
notifications, task_state transitions between steps, the journal saved at every step boundary,
undo on failure (newest first, shielded from cancellation), the final state with its fault,
resuming jobs a killed daemon left behind, and bounded concurrency.

Every job ends: its bookkeeping (journal, task_state, events, the final state) waits for a
database that does not answer (DatabaseUnavailable), retrying with backoff, instead of
dropping the write; a failure of the failure path is logged once and retried too.

The journal is a saga log: which steps started, which finished, and the *facts* their undos
need. A step's undo may rely only on facts saved before the step began — so a step that must
remember something before a side effect (a path it is about to create, the disk it is about to
detach) is preceded by a step that only records it. Every ``run`` and ``undo`` is idempotent:
after a crash, a started step is either re-run (rolling forward) or undone (rolling back).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import time
import traceback
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Generic, Protocol, TypeVar

import structlog

from rebuildd import errors, notifications, ports
from rebuildd.metrics import Metrics
from rebuildd.models import Fault, NewAction, Notification, RequestContext, Server, utcnow

# Backoff of an undo waiting for an upstream service: first wait, longest wait (seconds).
UNDO_RETRY_FIRST: Final = 0.5
UNDO_RETRY_MAX: Final = 10.0
# Backoff of bookkeeping waiting for the database to answer again: first wait, longest wait.
DB_RETRY_FIRST: Final = 0.05
DB_RETRY_MAX: Final = 2.0
# A fault's message is cut there when stored (Nova's instance_faults.message).
FAULT_MESSAGE_MAX: Final = 255

log = structlog.get_logger("rebuildd.runner")
C = TypeVar("C")
T = TypeVar("T")
StepFn = Callable[[C], Awaitable[None]]

RUNNING, CLEANING, DONE, ROLLED_BACK, FAILED = (
    "running",
    "cleaning",
    "done",
    "rolled_back",
    "failed",
)


class Interrupted(errors.OperationFailed):
    template = "Interrupted: the compute service {when} during the operation."


class JobStore(ports.Store, Protocol):
    """The Store as the runner uses it: a job's last compare-and-swap also ends the job's
    action, its last event and that event's notification, in one transaction."""

    async def transition(
        self,
        server_id: str,
        *,
        action: str,
        expected_task_state: Collection[str | None],
        task_state: str | None,
        expected_vm_state: Collection[str] | None = None,
        changes: Mapping[str, Any] | None = None,
        new_action: NewAction | None = None,
        fault: Fault | None = None,
        block_device_changes: Mapping[str, Mapping[str, Any]] | None = None,
        job: tuple[str, str] | None = None,
        end_event: str | None = None,
        notification: Callable[[Server], Notification] | None = None,
    ) -> Server: ...


class Facts(Protocol):
    """A job's facts: what its undos need, saved in the journal."""

    def to_dict(self) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True)
class Step(Generic[C]):
    """One unit of work. ``undo`` must be idempotent: it also runs after a partial ``run``."""

    name: str
    run: StepFn[C] | None = None  # None: only the task_state transition
    undo: StepFn[C] | None = None
    task_state: str | None = None  # moved to (compare-and-swap) before ``run``
    # False: the facts this step records are for the record only (no undo or recovery reads
    # them), so they ride along with the next journal write instead of causing one.
    writes_facts: bool = True


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
    # Said after the cause in a failure's fault (what the rollback put back).
    fault_note: str | None = None


@dataclass(frozen=True, slots=True)
class Job(Generic[C]):
    action: str
    request: RequestContext
    server_id: str
    task_state: str  # what the api stage set
    stages: tuple[Stage[C], ...]
    context: C
    facts: Facts
    succeed: Callable[[C], Awaitable[Outcome]]
    fail: Callable[[C, bool], Awaitable[Outcome]]  # (context, rolled_back) -> outcome
    cleanup: tuple[Step[C], ...] = ()  # after success; failures are logged, not fatal
    # After a crash: given the steps that finished, roll forward (True) or back (False)?
    resume_forward: Callable[[frozenset[str]], bool] = lambda _done: False


@dataclass(slots=True)
class Journal:
    started: list[str] = field(default_factory=list)
    done: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, data: Mapping[str, Any] | None) -> Journal:
        data = data or {}
        return cls(started=list(data.get("started", [])), done=list(data.get("done", [])))

    def dump(self, facts: Mapping[str, Any]) -> dict[str, Any]:
        """The journal as saved, with ``facts`` (the job's Facts.to_dict())."""
        return {"started": list(self.started), "done": list(self.done), "facts": dict(facts)}


class _NullObserver:
    async def before_step(self, job: str, step: str, server_id: str) -> None:
        return None

    async def after_step(self, job: str, step: str, server_id: str) -> None:
        return None


class Runner:
    """Runs jobs as asyncio tasks, at most ``limit`` at once; the rest wait in FIFO order."""

    def __init__(
        self,
        store: JobStore,
        notifier: ports.Notifier,
        *,
        host: str,
        limit: int,
        observer: ports.StepObserver | None = None,
        metrics: Metrics | None = None,
        undo_retry_timeout: float = 300.0,
    ) -> None:
        self.store = store
        # How long an undo that needs an upstream service (Cinder, Glance, Keystone) that is
        # down is retried before the job gives up as not rolled back.
        self.undo_retry_timeout = undo_retry_timeout
        self.metrics = metrics or Metrics()
        self.notifier = notifier
        self.host = host
        self.limit = limit
        self.observer: ports.StepObserver = observer or _NullObserver()
        self._slots = asyncio.Semaphore(limit)
        self._tasks: set[asyncio.Task[None]] = set()
        self.accepting = True
        # Raises while something every job needs is down (libvirt): the api stages' 503.
        self.gate: Callable[[], None] | None = None
        self.active = 0  # jobs holding a slot now
        self.peak = 0  # most jobs that ever held a slot at once
        self._owned: collections.Counter[str] = collections.Counter()  # server id -> jobs

    def owns(self, server_id: str) -> bool:
        """Whether a job of this process (queued, running or resumed) holds the server: a
        server in a task_state no job holds is stuck, and may be deleted by force."""
        return self._owned[server_id] > 0

    def _hold(self, server_id: str) -> Callable[..., None]:
        self._owned[server_id] += 1

        def release(*_: object) -> None:
            self._owned[server_id] -= 1
            if self._owned[server_id] <= 0:
                del self._owned[server_id]

        return release

    def check_accepting(self) -> None:
        """The api stage calls this before committing anything."""
        if not self.accepting:
            raise errors.Conflict("The compute service is shutting down; try again shortly.")
        if self.gate is not None:
            self.gate()

    def submit(self, job: Job[Any]) -> None:
        task = asyncio.create_task(self._guarded(job), name=f"{job.action}:{job.server_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(self._hold(job.server_id))

    @property
    def running(self) -> int:
        return len(self._tasks)

    async def drain(self, timeout: float) -> None:
        """Stop accepting jobs; wait up to ``timeout`` for running ones, then interrupt them
        (each interrupted job rolls back before this returns)."""
        self.accepting = False
        if not self._tasks:
            return
        _, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)

    async def _guarded(self, job: Job[Any], journal: Journal | None = None) -> None:
        async with self._slots:
            self.active += 1
            self.peak = max(self.peak, self.active)
            self.metrics.jobs_running.inc()
            try:
                await self._execute(job, journal or Journal())
            except asyncio.CancelledError:
                raise
            except Exception:
                # _execute records failures itself; this is a bug in the bookkeeping.
                log.exception("job bookkeeping failed", action=job.action, server_id=job.server_id)
            finally:
                self.active -= 1
                self.metrics.jobs_running.dec()

    async def _save(self, job: Job[C], journal: Journal, facts: Mapping[str, Any]) -> None:
        saved = journal.dump(facts)
        await self._persist(
            job, "save_journal", lambda: self.store.save_journal(job.request.request_id, saved)
        )

    async def _persist(self, job: Job[C], what: str, call: Callable[[], Awaitable[T]]) -> T:
        """``call`` (one bookkeeping transaction) until the database answers: while it raises
        DatabaseUnavailable the job waits, retrying with backoff; logged once when it starts
        waiting and once when the database answers again."""
        delay, waiting = DB_RETRY_FIRST, False
        while True:
            try:
                result = await call()
            except errors.DatabaseUnavailable as exc:
                if not waiting:
                    waiting = True
                    _bound(job).warning("job_waits_for_database", write=what, reason=exc.message)
                await asyncio.sleep(delay)
                delay = min(delay * 2, DB_RETRY_MAX)
                continue
            if waiting:
                _bound(job).info("job_database_answers", write=what)
            return result

    async def _execute(self, job: Job[C], journal: Journal, task_state: str | None = None) -> None:
        bound = log.bind(
            action=job.action, server_id=job.server_id, request_id=job.request.request_id
        )
        task_state = task_state or job.task_state
        stage = job.stages[0]
        # A stage that ended, to be recorded with the next stage's start (one transaction).
        ended: tuple[str, Notification | None] | None = None
        # The server as read for that stage's end notification: the next stage's start
        # notification is built from it too, as nothing is written between the two.
        read: Server | None = None
        try:
            for index, stage in enumerate(job.stages):
                last = index == len(job.stages) - 1
                pending = [s for s in stage.steps if s.name not in journal.done]
                if not pending and not last and stage.steps:
                    await self._persist(
                        job,
                        "finish_event",
                        functools.partial(
                            self.store.finish_event,
                            job.request.request_id,
                            stage.event,
                            result="Success",
                        ),
                    )
                    continue
                fresh = not any(s.name in journal.started for s in stage.steps)
                starting = None
                if stage.notify_start and fresh:
                    starting = await self._notification(job, stage.notify_start, read)
                sent = [n for n in (ended[1] if ended else None, starting) if n is not None]
                await self._persist(
                    job,
                    "start_event",
                    functools.partial(
                        self.store.start_event,
                        job.request.request_id,
                        stage.event,
                        self.host,
                        notifications=sent,
                        after=ended[0] if ended else None,
                    ),
                )
                ended, read = None, None
                for notification in sent:
                    notifications.sent(notification)
                facts = job.facts.to_dict()
                for step, after in zip(pending, [*pending[1:], None], strict=True):
                    # Moved to before the step runs, so a failure of the step is recorded from
                    # the state it was in.
                    task_state = await self._enter(job, step, task_state)
                    facts = await self._step(job, step, after, journal, facts)
                if not last:
                    ending = None
                    if stage.notify_end:
                        read = await self._read_server(job)
                        ending = self._build(job, stage.notify_end, read)
                    ended = (stage.event, ending)
                    continue
                await self._succeed(job, stage, task_state)
                task_state = None
        except BaseException as exc:
            if task_state is None:  # the final state is written; only bookkeeping failed
                bound.exception("job bookkeeping after success failed")
                raise
            if ended is not None:  # a stage that succeeded stays a success
                await asyncio.shield(self._finish_ended(job, ended))
            await asyncio.shield(self._fail(job, stage, journal, task_state, exc, bound))
            if not isinstance(exc, Exception):
                raise
            return
        bound.info("job finished", result="Success")
        self.metrics.jobs.labels(action=job.action, result="success").inc()
        await self._cleanup(job, bound)

    async def _succeed(self, job: Job[C], stage: Stage[C], task_state: str | None) -> None:
        """The final state (task_state None), the job's end, the last event's end and its
        notification: one transaction."""
        outcome = await job.succeed(job.context)
        built: list[Notification] = []

        def ending(server: Server) -> Notification:
            assert stage.notify_end is not None
            built[:] = [self._build(job, stage.notify_end, server)]  # once, if PG retries
            return built[0]

        await self._swap(
            job,
            expected_task_state=(task_state,),
            task_state=None,
            changes=outcome.changes,
            block_device_changes=outcome.block_device_changes,
            job=(job.request.request_id, CLEANING if job.cleanup else DONE),
            end_event=stage.event,
            notification=ending if stage.notify_end else None,
        )
        for notification in built:
            notifications.sent(notification)

    async def _finish_ended(self, job: Job[C], ended: tuple[str, Notification | None]) -> None:
        try:
            await self._persist(
                job,
                "finish_event",
                lambda: self.store.finish_event(
                    job.request.request_id, ended[0], result="Success", notification=ended[1]
                ),
            )
        except Exception:
            # ``event`` is structlog's own key (the message): the stage goes as ``stage``.
            _bound(job).exception("recording_finished_stage_failed", stage=ended[0])
            return
        notifications.sent(ended[1])

    async def _enter(self, job: Job[C], step: Step[C], task_state: str | None) -> str | None:
        """The observer's look before a step, then the step's task_state transition; returns
        the task_state the step runs in."""
        await self.observer.before_step(job.action, step.name, job.server_id)
        if step.task_state is not None and step.task_state != task_state:
            await self._transition(job, task_state, step.task_state)
            return step.task_state
        return task_state

    async def _step(
        self,
        job: Job[C],
        step: Step[C],
        after: Step[C] | None,
        journal: Journal,
        facts: dict[str, Any],
    ) -> dict[str, Any]:
        """One step (entered: :meth:`_enter`) with its journal entries; returns the facts
        (``Facts.to_dict()``, as ``facts`` is before it) after it.

        The journal is written only where recovery would otherwise act differently: before a
        step with an undo starts (folded into the write after the step before it, as nothing
        happens in between and an undo copes with a step that never ran), when a step
        recorded facts, and when finishing it changes whether recovery rolls forward. A step
        whose end is not written is simply re-run or undone after a crash, as each must allow.
        """
        if step.name not in journal.started:
            journal.started.append(step.name)
            if step.undo is not None:
                await self._save(job, journal, facts)
        if step.run is not None:
            log.debug("step", step=step.name, request_id=job.request.request_id)
            with self.metrics.step_seconds.labels(action=job.action, step=step.name).time():
                await step.run(job.context)
        before = frozenset(journal.done)
        journal.done.append(step.name)
        announce = False
        if after is not None and after.undo is not None and after.name not in journal.started:
            journal.started.append(after.name)
            announce = True
        now = job.facts.to_dict()
        if (
            announce
            or (step.writes_facts and now != facts)
            or job.resume_forward(before) != job.resume_forward(frozenset(journal.done))
        ):
            await self._save(job, journal, now)
        await self.observer.after_step(job.action, step.name, job.server_id)
        return now

    async def _cleanup(self, job: Job[C], bound: Any) -> None:
        for step in job.cleanup:
            await self.observer.before_step(job.action, step.name, job.server_id)
            try:
                if step.run is not None:
                    await step.run(job.context)
            except Exception:
                bound.exception("cleanup step failed", step=step.name)
            await self.observer.after_step(job.action, step.name, job.server_id)
        if job.cleanup:
            await self._persist(
                job, "set_job_state", lambda: self.store.set_job_state(job.request.request_id, DONE)
            )

    async def _fail(
        self,
        job: Job[C],
        stage: Stage[C],
        journal: Journal,
        task_state: str,
        exc: BaseException,
        bound: Any,
    ) -> None:
        message = _fault_message(exc)
        bound.error("job failed", stage=stage.event, reason=message)
        rolled_back = await self._undo(job, journal, bound)
        self.metrics.jobs.labels(
            action=job.action, result=ROLLED_BACK if rolled_back else FAILED
        ).inc()
        # The failure's own bookkeeping must end too: what fails in it (a bug; the database's
        # failures are waited out inside) is logged once and the whole record tried again.
        delay, logged = DB_RETRY_FIRST, False
        while True:
            try:
                await self._record_failure(job, stage, task_state, exc, rolled_back, bound)
                return
            except Exception:
                if not logged:
                    logged = True
                    bound.exception("recording_job_failure_failed")
            await asyncio.sleep(delay)
            delay = min(delay * 2, UNDO_RETRY_MAX)

    async def _record_failure(
        self,
        job: Job[C],
        stage: Stage[C],
        task_state: str,
        exc: BaseException,
        rolled_back: bool,
        bound: Any,
    ) -> None:
        """The failed job's final state with its fault, and every open event and the action
        finished as errors. A task_state some other request changed meanwhile (a delete of a
        stuck server) is left alone, the events and action still end."""
        message = _fault_message(exc)
        details = "".join(traceback.format_exception(exc))
        try:
            outcome = await job.fail(job.context, rolled_back)
        except Exception:
            # The outcome reads the hypervisor (which may be what failed): record the
            # failure with no state changes rather than not at all.
            bound.exception("job_failure_outcome_failed")
            outcome = Outcome({})
        # The fault and the events say what the rollback put back; the notification's
        # exception payload stays the exception's own message, as Nova's.
        told = _with_note(message, outcome.fault_note) if outcome.fault_note else message
        fault = Fault(code=500, message=told, details=details, created_at=utcnow())
        job_state = ROLLED_BACK if rolled_back else FAILED
        server: Server | None = None
        try:
            server = await self._swap(
                job,
                expected_task_state=(task_state,),
                task_state=None,
                changes=outcome.changes,
                block_device_changes=outcome.block_device_changes,
                fault=fault,
                job=(job.request.request_id, job_state),
            )
        except (errors.Conflict, errors.NotFound) as lost:
            bound.warning("job_final_state_superseded", reason=lost.message)
            await self._persist(
                job,
                "set_job_state",
                lambda: self.store.set_job_state(job.request.request_id, job_state),
            )
        error = None
        if stage.notify_error:
            error = await self._notification(
                job,
                stage.notify_error,
                server,
                priority="ERROR",
                # For the operator, as Nova's ExceptionPayload: the exception's own words.
                extra={"fault": _exception_payload(exc, _operator_message(exc), details)},
            )
        # Every event still open fails with it (after a crash that may be a later stage's).
        for each in job.stages:
            final = each is job.stages[-1]
            await self._persist(
                job,
                "finish_event",
                functools.partial(
                    self.store.finish_event,
                    job.request.request_id,
                    each.event,
                    result="Error",
                    traceback=details,
                    details=told,
                    finish_action=final,
                    notification=error if final else None,
                ),
            )
        notifications.sent(error)

    async def _undo(self, job: Job[C], journal: Journal, bound: Any) -> bool:
        """Undo every started step, newest first; True when every undo succeeded. An undo that
        fails because an upstream service is down (ServiceUnavailable) is tried again, with
        backoff, until the service is back or ``undo_retry_timeout`` has passed: a volume
        must get its attachment back even if Cinder was what failed the job."""
        steps = {s.name: s for stage in job.stages for s in stage.steps}
        rolled_back = True
        deadline = time.monotonic() + self.undo_retry_timeout
        for name in reversed(journal.started):
            step = steps.get(name)
            if step is None or step.undo is None:
                continue
            delay = UNDO_RETRY_FIRST
            while True:
                try:
                    await step.undo(job.context)
                except errors.ServiceUnavailable as exc:
                    if time.monotonic() + delay > deadline:
                        rolled_back = False
                        bound.error("undo failed", step=name, reason=exc.message)
                        break
                    bound.warning(
                        "undo waits for a service", step=name, reason=exc.message, retry_in=delay
                    )
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, UNDO_RETRY_MAX)
                    continue
                except Exception:
                    rolled_back = False
                    bound.exception("undo failed", step=name)
                break
        return rolled_back

    # -- resuming after a crash ---------------------------------------------------------------

    async def resume(
        self, job: Job[C], journal: Journal, job_state: str, task_state: str | None
    ) -> None:
        """Finish or roll back a job a previous process left in flight (at start-up)."""
        bound = log.bind(
            action=job.action, server_id=job.server_id, request_id=job.request.request_id
        )
        if job_state == CLEANING:
            bound.info("resuming cleanup")
            await self._cleanup(job, bound)
            return
        if task_state is None:
            # The final state was written but the job state was not: nothing left to do.
            await self._persist(
                job, "set_job_state", lambda: self.store.set_job_state(job.request.request_id, DONE)
            )
            return
        release = self._hold(job.server_id)
        try:
            if job.resume_forward(frozenset(journal.done)):
                bound.info("rolling forward", done=journal.done)
                async with self._slots:
                    await self._execute(job, journal, task_state)
                return
            bound.info("rolling back", started=journal.started)
            stage = _stage_of(job, journal)
            await self._fail(job, stage, journal, task_state, Interrupted(when="stopped"), bound)
        finally:
            release()

    # -- helpers ------------------------------------------------------------------------------

    async def _transition(
        self, job: Job[C], expected: str | None, task_state: str | None
    ) -> Server:
        return await self._swap(job, expected_task_state=(expected,), task_state=task_state)

    async def _swap(
        self,
        owner: Job[C],
        /,
        *,
        expected_task_state: Collection[str | None],
        task_state: str | None,
        **kwargs: Any,
    ) -> Server:
        """The job's compare-and-swap, waiting for the database (:meth:`_persist`). When an
        attempt the database failed to answer had in fact taken (a PostgreSQL statement
        commits by itself), the next one finds the server already in ``task_state``: that is
        the swap done, not a conflict."""
        attempts = 0

        async def swap() -> Server:
            nonlocal attempts
            attempts += 1
            try:
                return await self.store.transition(
                    owner.server_id,
                    action=owner.action,
                    expected_task_state=expected_task_state,
                    task_state=task_state,
                    **kwargs,
                )
            except (errors.InstanceInvalidState, errors.ServerNotFound):
                if attempts == 1:
                    raise
                server = await self.store.get_server(owner.server_id, include_deleted=True)
                if server.task_state != task_state:
                    raise
                return server

        return await self._persist(owner, "transition", swap)

    async def _read_server(self, job: Job[C]) -> Server:
        return await self._persist(
            job,
            "get_server",
            lambda: self.store.get_server(job.server_id, include_deleted=True),
        )

    async def _notification(
        self,
        job: Job[C],
        event_type: str,
        server: Server | None = None,
        *,
        priority: str = "INFO",
        extra: Mapping[str, Any] | None = None,
    ) -> Notification:
        if server is None:
            server = await self._read_server(job)
        return self._build(job, event_type, server, priority=priority, extra=extra)

    def _build(
        self,
        job: Job[C],
        event_type: str,
        server: Server,
        *,
        priority: str = "INFO",
        extra: Mapping[str, Any] | None = None,
    ) -> Notification:
        return self.notifier.build(
            event_type, server, context=job.request, priority=priority, extra=extra
        )


def _bound(job: Job[Any]) -> Any:
    return log.bind(action=job.action, server_id=job.server_id, request_id=job.request.request_id)


def _stage_of(job: Job[C], journal: Journal) -> Stage[C]:
    """The stage of the newest started step (the first stage if none started)."""
    for stage in reversed(job.stages):
        if any(s.name in journal.started for s in stage.steps):
            return stage
    return job.stages[0]


def _exception_payload(exc: BaseException, message: str, details: str) -> dict[str, str]:
    """The fields of Nova's ExceptionPayload, from where the exception was raised."""
    frames = traceback.extract_tb(exc.__traceback__)
    last = frames[-1] if frames else None
    module = type(exc).__module__
    if last is not None:
        module = last.filename.rsplit("/", 1)[-1].removesuffix(".py")
    return {
        "exception": type(exc).__name__,
        "exception_message": message,
        "function_name": last.name if last is not None else "",
        "module_name": module,
        "traceback": details,
    }


def _operator_message(exc: BaseException) -> str:
    return exc.message if isinstance(exc, errors.RebuilddError) else str(exc) or _fault_message(exc)


def _with_note(message: str, note: str) -> str:
    """``message`` then ``note``, the message shortened so that both fit in a fault's
    message (255 characters, as Nova's instance_faults.message; the details keep it all)."""
    room = FAULT_MESSAGE_MAX - len(note) - 1
    if len(message) > room:
        message = message[: max(0, room - 3)] + "..."
    return f"{message} {note}"


def _fault_message(exc: BaseException) -> str:
    """What the server's owner reads: no host path (a tool's or libvirt's words may name
    one), and of an error that is not ours only its class, as Nova answers OSSA-2019-003."""
    if isinstance(exc, errors.RebuilddError):
        return errors.user_message(exc)
    if isinstance(exc, asyncio.CancelledError):
        return Interrupted(when="shut down").message
    return type(exc).__name__
