"""The Store: rebuildd's state in SQLite (default) or PostgreSQL, through SQLModel tables.

Owns every query and every transaction, and the one compare-and-swap on ``task_state``
(:meth:`Store.transition`) that all state changes use. It returns frozen records from
models.py, never live ORM rows. It must not call libvirt, touch disks or know HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import re
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, delete, event, or_, select, update
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.pool import ConnectionPoolEntry
from sqlmodel import col

from rebuildd import errors, records
from rebuildd.models import (
    BlockDevice,
    Fault,
    Flavor,
    Image,
    InstanceAction,
    KeyPair,
    NewAction,
    Server,
    utcnow,
)
from rebuildd.states import explicit_task_states
from rebuildd.tables import (
    BlockDeviceRow,
    FlavorRow,
    ImageRow,
    InstanceActionEventRow,
    InstanceActionRow,
    InstanceFaultRow,
    KeyPairRow,
    NotificationRow,
    ServerRow,
)


def create_engine(url: str) -> AsyncEngine:
    """An async engine; SQLite gets WAL, NORMAL sync, a busy timeout and foreign keys."""
    if url.startswith("sqlite"):
        # hide_parameters: statement values (user data, ...) never reach a log or an error.
        engine = create_async_engine(url, connect_args={"timeout": 30}, hide_parameters=True)

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(conn: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
            cursor = conn.cursor()
            for pragma in (
                "journal_mode=WAL",
                "synchronous=NORMAL",
                "foreign_keys=ON",
                "busy_timeout=30000",
            ):
                cursor.execute(f"PRAGMA {pragma}")
            cursor.close()

        return engine
    return create_async_engine(
        url, pool_size=10, max_overflow=20, pool_pre_ping=True, hide_parameters=True
    )


@dataclass(frozen=True, slots=True)
class ServerFilters:
    project_id: str | None = None  # None: every project (admin all_tenants)
    name: str | None = None  # a regular expression, as in Nova
    image: str | None = None
    flavor: str | None = None
    states: Sequence[tuple[str, str | None]] | None = None  # from states.states_for_status
    changes_since: dt.datetime | None = None
    include_deleted: bool = False
    limit: int | None = None
    marker: str | None = None


@dataclass(frozen=True, slots=True)
class ImageFilters:
    name: str | None = None
    ids: Sequence[str] | None = None
    status: str | None = None
    visibility: str | None = None
    limit: int | None = None
    marker: str | None = None


_SERVER_COLUMNS = frozenset(ServerRow.model_fields)
_IMAGE_COLUMNS = frozenset(ImageRow.model_fields)


class Store:
    """All persistence. One instance per process, shared by the API and the pipeline."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._sessions = async_sessionmaker(engine, expire_on_commit=False)
        # SQLite allows one writer; serialising writers here avoids SQLITE_BUSY retries.
        self._write_lock: asyncio.Lock | None = (
            asyncio.Lock() if engine.dialect.name == "sqlite" else None
        )

    async def close(self) -> None:
        await self.engine.dispose()

    @contextlib.asynccontextmanager
    async def _read(self) -> AsyncIterator[AsyncSession]:
        async with self._sessions() as session:
            yield session

    @contextlib.asynccontextmanager
    async def _write(self) -> AsyncIterator[AsyncSession]:
        lock = self._write_lock or contextlib.nullcontext()
        async with lock, self._sessions() as session, session.begin():
            yield session

    # -- flavors ---------------------------------------------------------------------------

    async def create_flavor(self, flavor: Flavor) -> Flavor:
        row = FlavorRow(**dataclasses.asdict(flavor), created_at=utcnow())
        try:
            async with self._write() as session:
                session.add(row)
        except IntegrityError as exc:
            raise errors.Duplicate(kind="Flavor", name=flavor.name) from exc
        return flavor

    async def get_flavor(self, flavor_id: str) -> Flavor:
        async with self._read() as session:
            row = await session.get(FlavorRow, flavor_id)
        if row is None:
            raise errors.FlavorNotFound(flavor_id=flavor_id)
        return records.flavor_record(row)

    async def list_flavors(self) -> list[Flavor]:
        async with self._read() as session:
            rows = (await session.scalars(select(FlavorRow).order_by(col(FlavorRow.id)))).all()
        return [records.flavor_record(row) for row in rows]

    # -- images (the local image store's records) ------------------------------------------

    async def create_image(self, image: Image) -> Image:
        async with self._write() as session:
            session.add(ImageRow(**dataclasses.asdict(image)))
        return image

    async def get_image(self, image_id: str) -> Image | None:
        async with self._read() as session:
            row = await session.get(ImageRow, image_id)
        return None if row is None else records.image_record(row)

    async def list_images(self, filters: ImageFilters) -> list[Image]:
        query = select(ImageRow)
        if filters.name is not None:
            query = query.where(col(ImageRow.name) == filters.name)
        if filters.ids is not None:
            query = query.where(col(ImageRow.id).in_(list(filters.ids)))
        if filters.status is not None:
            query = query.where(col(ImageRow.status) == filters.status)
        if filters.visibility is not None:
            query = query.where(col(ImageRow.visibility) == filters.visibility)
        async with self._read() as session:
            if filters.marker is not None:
                marker = await session.get(ImageRow, filters.marker)
                if marker is None:
                    raise errors.Invalid(f"marker [{filters.marker}] not found")
                query = query.where(_before(ImageRow, marker.created_at, marker.id))
            query = query.order_by(col(ImageRow.created_at).desc(), col(ImageRow.id).desc())
            if filters.limit is not None:
                query = query.limit(filters.limit)
            rows = (await session.scalars(query)).all()
        return [records.image_record(row) for row in rows]

    async def update_image(self, image_id: str, **changes: Any) -> Image:
        unknown = set(changes) - _IMAGE_COLUMNS
        if unknown:
            raise ValueError(f"not image columns: {sorted(unknown)}")
        async with self._write() as session:
            row = await session.get(ImageRow, image_id)
            if row is None:
                raise errors.ImageNotFound(image_id=image_id)
            for key, value in {**changes, "updated_at": utcnow()}.items():
                setattr(row, key, value)
            return records.image_record(row)

    async def delete_image(self, image_id: str) -> None:
        async with self._write() as session:
            statement = delete(ImageRow).where(col(ImageRow.id) == image_id)
            deleted = (await session.execute(statement.returning(col(ImageRow.id)))).first()
        if deleted is None:
            raise errors.ImageNotFound(image_id=image_id)

    # -- key pairs --------------------------------------------------------------------------

    async def create_keypair(self, keypair: KeyPair) -> KeyPair:
        try:
            async with self._write() as session:
                session.add(KeyPairRow(**dataclasses.asdict(keypair)))
        except IntegrityError as exc:
            raise errors.Duplicate(
                f"Key pair '{keypair.name}' already exists.", kind="Key pair", name=keypair.name
            ) from exc
        return keypair

    async def get_keypair(self, user_id: str, name: str) -> KeyPair | None:
        query = select(KeyPairRow).where(
            col(KeyPairRow.user_id) == user_id, col(KeyPairRow.name) == name
        )
        async with self._read() as session:
            row = (await session.scalars(query)).first()
        return None if row is None else records.keypair_record(row)

    async def list_keypairs(self, user_id: str) -> list[KeyPair]:
        query = (
            select(KeyPairRow)
            .where(col(KeyPairRow.user_id) == user_id)
            .order_by(col(KeyPairRow.name))
        )
        async with self._read() as session:
            rows = (await session.scalars(query)).all()
        return [records.keypair_record(row) for row in rows]

    async def delete_keypair(self, user_id: str, name: str) -> None:
        query = delete(KeyPairRow).where(
            col(KeyPairRow.user_id) == user_id, col(KeyPairRow.name) == name
        )
        async with self._write() as session:
            deleted = (await session.execute(query.returning(col(KeyPairRow.id)))).first()
        if deleted is None:
            raise errors.KeypairNotFound(name=name, user_id=user_id)

    # -- servers ----------------------------------------------------------------------------

    async def create_server(
        self, server: Server, block_devices: Sequence[BlockDevice], action: NewAction
    ) -> Server:
        """Insert a new server, its block devices and its ``create`` action atomically."""
        values = records.server_values(server)
        async with self._write() as session:
            session.add(ServerRow(**values))
            await session.flush()
            for bdm in block_devices:
                session.add(
                    BlockDeviceRow(
                        **dataclasses.asdict(bdm),
                        created_at=server.created_at,
                        updated_at=server.created_at,
                    )
                )
            session.add(records.action_row(server.id, action, server.created_at))
        return server

    async def get_server(
        self, server_id: str, *, project_id: str | None = None, include_deleted: bool = False
    ) -> Server:
        """The server, or ServerNotFound (also for another project's server, as Nova does)."""
        query = select(ServerRow).where(col(ServerRow.id) == server_id)
        if project_id is not None:
            query = query.where(col(ServerRow.project_id) == project_id)
        if not include_deleted:
            query = query.where(col(ServerRow.deleted) == False)  # noqa: E712
        async with self._read() as session:
            row = (await session.scalars(query)).first()
        if row is None:
            raise errors.ServerNotFound(server_id=server_id)
        return records.server_record(row)

    async def list_servers(self, filters: ServerFilters) -> list[Server]:
        query = select(ServerRow)
        if filters.project_id is not None:
            query = query.where(col(ServerRow.project_id) == filters.project_id)
        if not filters.include_deleted:
            query = query.where(col(ServerRow.deleted) == False)  # noqa: E712
        if filters.image is not None:
            query = query.where(col(ServerRow.image_ref) == filters.image)
        if filters.flavor is not None:
            query = query.where(col(ServerRow.flavor_id) == filters.flavor)
        if filters.changes_since is not None:
            query = query.where(col(ServerRow.updated_at) >= filters.changes_since)
        if filters.states is not None:
            query = query.where(_states_clause(filters.states))
        async with self._read() as session:
            if filters.marker is not None:
                marker = await session.get(ServerRow, filters.marker)
                if marker is None:
                    raise errors.Invalid(f"marker [{filters.marker}] not found")
                query = query.where(_before(ServerRow, marker.created_at, marker.id))
            query = query.order_by(col(ServerRow.created_at).desc(), col(ServerRow.id).desc())
            if filters.name is None and filters.limit is not None:
                query = query.limit(filters.limit)
            rows = (await session.scalars(query)).all()
        servers = [records.server_record(row) for row in rows]
        if filters.name is not None:
            pattern = _name_pattern(filters.name)
            servers = [s for s in servers if pattern.search(s.name)]
            if filters.limit is not None:
                servers = servers[: filters.limit]
        return servers

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
    ) -> Server:
        """The compare-and-swap every task_state change goes through.

        Sets ``task_state`` (and ``changes``) only if the server's current task_state is one of
        ``expected_task_state`` (and its vm_state one of ``expected_vm_state``), in one UPDATE;
        with it, in the same transaction, records ``new_action``, ``fault`` and the changes to
        block devices (by id) in ``block_device_changes``, and the new state of a job's action
        (``job``: request id, job state). When the row did
        not match, raises InstanceInvalidState naming what differed (409), or ServerNotFound.
        """
        values = dict(changes or {})
        if "task_state" in values or not set(values) <= _SERVER_COLUMNS:
            raise ValueError(f"bad server changes: {sorted(values)}")
        now = utcnow()
        values.update(task_state=task_state, updated_at=now)
        conditions = [
            col(ServerRow.id) == server_id,
            col(ServerRow.deleted) == False,  # noqa: E712
            _task_state_clause(expected_task_state),
        ]
        if expected_vm_state is not None:
            conditions.append(col(ServerRow.vm_state).in_(list(expected_vm_state)))
        statement = update(ServerRow).where(*conditions).values(**values).returning(ServerRow)
        async with self._write() as session:
            row = (await session.scalars(statement)).first()
            if row is None:
                current = await session.get(ServerRow, server_id)
                raise _mismatch(server_id, action, current, expected_vm_state)
            if new_action is not None:
                session.add(records.action_row(server_id, new_action, now))
            for bdm_id, bdm_values in (block_device_changes or {}).items():
                await session.execute(
                    update(BlockDeviceRow)
                    .where(
                        col(BlockDeviceRow.id) == bdm_id, col(BlockDeviceRow.server_id) == server_id
                    )
                    .values(**bdm_values, updated_at=now)
                )
            if job is not None:
                await session.execute(
                    update(InstanceActionRow)
                    .where(col(InstanceActionRow.request_id) == job[0])
                    .values(job_state=job[1], updated_at=now)
                )
            if fault is not None:
                session.add(
                    InstanceFaultRow(
                        server_id=server_id,
                        code=fault.code,
                        message=fault.message[:255],
                        details=fault.details,
                        host=row.host,
                        created_at=fault.created_at,
                    )
                )
            return records.server_record(row)

    async def set_lock(
        self,
        server_id: str,
        *,
        locked: bool,
        reason: str | None,
        by: str | None,
        action: NewAction,
    ) -> None:
        """Lock or unlock (not a task_state change), recording the action with it."""
        now = utcnow()
        statement = (
            update(ServerRow)
            .where(col(ServerRow.id) == server_id, col(ServerRow.deleted) == False)  # noqa: E712
            .values(locked=locked, locked_reason=reason, locked_by=by, updated_at=now)
            .returning(col(ServerRow.id))
        )
        async with self._write() as session:
            if (await session.execute(statement)).first() is None:
                raise errors.ServerNotFound(server_id=server_id)
            session.add(records.action_row(server_id, action, now))

    # -- block devices ---------------------------------------------------------------------

    async def get_block_devices(self, server_id: str) -> list[BlockDevice]:
        query = select(BlockDeviceRow).where(col(BlockDeviceRow.server_id) == server_id)
        async with self._read() as session:
            rows = (await session.scalars(query.order_by(col(BlockDeviceRow.device_name)))).all()
        return [records.block_device_record(row) for row in rows]

    async def paths_in_use(self) -> set[str]:
        """Every disk path a block device of a live server points to."""
        query = (
            select(col(BlockDeviceRow.path))
            .join(ServerRow, col(ServerRow.id) == col(BlockDeviceRow.server_id))
            .where(col(ServerRow.deleted) == False, col(BlockDeviceRow.path).is_not(None))  # noqa: E712
        )
        async with self._read() as session:
            return {p for p in (await session.scalars(query)).all() if p is not None}

    # -- faults -----------------------------------------------------------------------------

    async def latest_faults(self, server_ids: Collection[str]) -> dict[str, Fault]:
        if not server_ids:
            return {}
        query = (
            select(InstanceFaultRow)
            .where(col(InstanceFaultRow.server_id).in_(list(server_ids)))
            .order_by(col(InstanceFaultRow.id).asc())
        )
        async with self._read() as session:
            rows = (await session.scalars(query)).all()
        return {
            row.server_id: Fault(row.code, row.message, row.details, row.created_at) for row in rows
        }

    # -- instance actions and events --------------------------------------------------------

    async def list_actions(self, server_id: str) -> list[InstanceAction]:
        query = (
            select(InstanceActionRow)
            .where(col(InstanceActionRow.server_id) == server_id)
            .order_by(col(InstanceActionRow.start_time).desc(), col(InstanceActionRow.id).desc())
        )
        async with self._read() as session:
            rows = (await session.scalars(query)).all()
        return [records.action_record(row, ()) for row in rows]

    async def get_action(self, server_id: str, request_id: str) -> InstanceAction:
        query = select(InstanceActionRow).where(
            col(InstanceActionRow.server_id) == server_id,
            col(InstanceActionRow.request_id) == request_id,
        )
        async with self._read() as session:
            row = (await session.scalars(query)).first()
            if row is None:
                raise errors.ActionNotFound(request_id=request_id, server_id=server_id)
            events = (
                await session.scalars(
                    select(InstanceActionEventRow)
                    .where(col(InstanceActionEventRow.action_id) == row.id)
                    .order_by(col(InstanceActionEventRow.id))
                )
            ).all()
        return records.action_record(row, tuple(records.event_record(e) for e in events))

    async def start_event(self, request_id: str, event_name: str, host: str) -> None:
        """Start an event; a no-op if that event is already started and unfinished (resume)."""
        now = utcnow()
        async with self._write() as session:
            action = await self._find_action(session, request_id)
            action.updated_at = now
            assert action.id is not None
            open_event = await session.scalars(
                select(col(InstanceActionEventRow.id)).where(
                    col(InstanceActionEventRow.action_id) == action.id,
                    col(InstanceActionEventRow.event) == event_name,
                    col(InstanceActionEventRow.finish_time).is_(None),
                )
            )
            if open_event.first() is not None:
                return
            session.add(
                InstanceActionEventRow(
                    action_id=action.id,
                    event=event_name,
                    start_time=now,
                    host=host,
                )
            )

    async def finish_event(
        self,
        request_id: str,
        event_name: str,
        *,
        result: str,
        traceback: str | None = None,
        details: str | None = None,
        finish_action: bool = False,
    ) -> None:
        now = utcnow()
        async with self._write() as session:
            action = await self._find_action(session, request_id)
            action.updated_at = now
            if finish_action:
                action.finish_time = now
            await session.execute(
                update(InstanceActionEventRow)
                .where(
                    col(InstanceActionEventRow.action_id) == action.id,
                    col(InstanceActionEventRow.event) == event_name,
                    col(InstanceActionEventRow.finish_time).is_(None),
                )
                .values(finish_time=now, result=result, traceback=traceback, details=details)
            )

    # -- jobs: journal, recovery, idempotency ---------------------------------------------------

    async def save_journal(self, request_id: str, journal: dict[str, Any]) -> None:
        await self._update_action(request_id, journal=journal, updated_at=utcnow())

    async def set_job_state(self, request_id: str, job_state: str) -> None:
        await self._update_action(request_id, job_state=job_state, updated_at=utcnow())

    async def _update_action(self, request_id: str, **values: Any) -> None:
        statement = (
            update(InstanceActionRow)
            .where(col(InstanceActionRow.request_id) == request_id)
            .values(**values)
        )
        async with self._write() as session:
            await session.execute(statement)

    async def in_flight_actions(self) -> list[InstanceAction]:
        """Actions whose job had not ended (running) or not cleaned up (cleaning)."""
        query = (
            select(InstanceActionRow)
            .where(col(InstanceActionRow.job_state).in_(["running", "cleaning"]))
            .order_by(col(InstanceActionRow.id))
        )
        async with self._read() as session:
            rows = (await session.scalars(query)).all()
        return [records.action_record(row, ()) for row in rows]

    async def find_action_by_key(self, server_id: str, key: str) -> InstanceAction | None:
        query = select(InstanceActionRow).where(
            col(InstanceActionRow.server_id) == server_id,
            col(InstanceActionRow.idempotency_key) == key,
        )
        async with self._read() as session:
            row = (await session.scalars(query)).first()
        return None if row is None else records.action_record(row, ())

    async def save_response(self, request_id: str, response: dict[str, Any]) -> None:
        await self._update_action(request_id, response=response)

    @staticmethod
    async def _find_action(session: AsyncSession, request_id: str) -> InstanceActionRow:
        query = select(InstanceActionRow).where(col(InstanceActionRow.request_id) == request_id)
        row = (await session.scalars(query)).first()
        if row is None:
            raise LookupError(f"no instance action {request_id}")
        return row

    # -- notifications outbox ----------------------------------------------------------------

    async def add_notification(
        self,
        *,
        event_type: str,
        priority: str,
        publisher_id: str,
        server_id: str | None,
        payload: dict[str, Any],
    ) -> None:
        async with self._write() as session:
            session.add(
                NotificationRow(
                    event_type=event_type,
                    priority=priority,
                    publisher_id=publisher_id,
                    server_id=server_id,
                    payload=payload,
                    created_at=utcnow(),
                )
            )

    async def list_notifications(self, server_id: str) -> list[tuple[str, str, dict[str, Any]]]:
        query = (
            select(NotificationRow)
            .where(col(NotificationRow.server_id) == server_id)
            .order_by(col(NotificationRow.id))
        )
        async with self._read() as session:
            rows = (await session.scalars(query)).all()
        return [(r.event_type, r.priority, r.payload) for r in rows]


# -- helpers: clauses ---------------------------------------------------------------------------


def _task_state_clause(expected: Collection[str | None]) -> Any:
    named = [s for s in expected if s is not None]
    clauses = []
    if named:
        clauses.append(col(ServerRow.task_state).in_(named))
    if None in expected:
        clauses.append(col(ServerRow.task_state).is_(None))
    if not clauses:
        raise ValueError("expected_task_state must name at least one state")
    return or_(*clauses)


def _states_clause(pairs: Sequence[tuple[str, str | None]]) -> Any:
    """(vm_state, task_state) pairs; a None task_state is any state not listed for that vm."""
    explicit: dict[str, list[str]] = {}
    for vm_state, task_state in pairs:
        if task_state is not None:
            explicit.setdefault(vm_state, []).append(task_state)
    clauses = []
    for vm_state, task_state in pairs:
        if task_state is not None:
            clauses.append(
                and_(col(ServerRow.vm_state) == vm_state, col(ServerRow.task_state) == task_state)
            )
        else:
            listed = explicit_task_states(vm_state)
            clauses.append(
                and_(
                    col(ServerRow.vm_state) == vm_state,
                    or_(
                        col(ServerRow.task_state).is_(None),
                        col(ServerRow.task_state).not_in(listed),
                    ),
                )
            )
    return or_(*clauses) if clauses else col(ServerRow.id).is_(None)


def _before(table: Any, created_at: dt.datetime, row_id: str) -> Any:
    """Rows after a marker in (created_at desc, id desc) order."""
    return or_(
        col(table.created_at) < created_at,
        and_(col(table.created_at) == created_at, col(table.id) < row_id),
    )


def _name_pattern(name: str) -> re.Pattern[str]:
    try:
        return re.compile(name)
    except re.error:
        return re.compile(re.escape(name))


def _mismatch(
    server_id: str,
    action: str,
    current: ServerRow | None,
    expected_vm_state: Collection[str] | None,
) -> errors.RebuilddError:
    if current is None or current.deleted:
        return errors.ServerNotFound(server_id=server_id)
    if expected_vm_state is not None and current.vm_state not in expected_vm_state:
        attr, state = "vm_state", current.vm_state
    else:
        attr, state = "task_state", str(current.task_state)
    return errors.InstanceInvalidState(action=action, server_id=server_id, attr=attr, state=state)
