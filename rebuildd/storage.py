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
import functools
import sqlite3
import types
from collections.abc import Callable, Collection, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import structlog
from sqlalchemy import (
    URL,
    Connection,
    Engine,
    Integer,
    Row,
    Select,
    Table,
    and_,
    bindparam,
    delete,
    event,
    insert,
    literal,
    or_,
    select,
    true,
    update,
)
from sqlalchemy import create_engine as create_sync_engine
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry
from sqlmodel import SQLModel, col

from rebuildd import dbapi, errors, pgwrites, records
from rebuildd.metrics import Metrics
from rebuildd.models import (
    ActionEvent,
    BlockDevice,
    Fault,
    Flavor,
    Image,
    InstanceAction,
    KeyPair,
    NewAction,
    Notification,
    Server,
    utcnow,
)
from rebuildd.namefilter import NameFilter
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

log = structlog.get_logger("rebuildd.storage")
_SQLITE_PRAGMAS = (
    "journal_mode=WAL",
    "synchronous=NORMAL",
    "foreign_keys=ON",
    "busy_timeout=30000",  # aiosqlite's connections wait in their own thread
)
# The connections used on the event loop wait at most this long in SQLite's busy handler
# (which sleeps in the calling thread); a locked database is retried by sleeping on the loop.
_LOOP_BUSY_SECONDS = 0.02
_LOOP_PRAGMAS = (*_SQLITE_PRAGMAS[:-1], f"busy_timeout={int(_LOOP_BUSY_SECONDS * 1000)}")
# Backoff of a transaction SQLite refused as locked: first wait, longest wait (seconds).
_BUSY_RETRY_FIRST = 0.01
_BUSY_RETRY_MAX = 0.25
T = TypeVar("T")
_Work = Callable[[dbapi.Tx], Coroutine[Any, Any, T]]
_READ, _WRITE, _SINGLE = "read", "write", "single"


def create_engine(url: str) -> AsyncEngine:
    """An async engine; SQLite gets WAL, NORMAL sync, a busy timeout and foreign keys."""
    if url.startswith("sqlite"):
        # hide_parameters: statement values (user data, ...) never reach a log or an error.
        engine = create_async_engine(url, connect_args={"timeout": 30}, hide_parameters=True)

        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    return create_async_engine(url, pool_size=10, max_overflow=20, hide_parameters=True)


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
    # The caller's project when it is not an admin: Glance's visibility (its own images,
    # public ones, and community ones when asked for with visibility=community).
    seen_by: str | None = None


_SERVER_COLUMNS = frozenset(ServerRow.model_fields)
_IMAGE_COLUMNS = frozenset(ImageRow.model_fields)


@dataclass(frozen=True, slots=True)
class _Columns:
    """A table seen through its SQLModel row class: columns selected under the row's attribute
    names (so records.py reads a Core row like an ORM one), and attribute -> column keys."""

    table: Table
    selected: tuple[Any, ...]
    keys: Mapping[str, str]

    @classmethod
    def of(cls, row_class: type[SQLModel]) -> _Columns:
        attrs = sa_inspect(row_class).column_attrs
        return cls(
            table=row_class.__table__,  # type: ignore[attr-defined]
            selected=tuple(a.columns[0].label(a.key) for a in attrs),
            keys={a.key: a.columns[0].key for a in attrs},
        )

    @property
    def c(self) -> Any:
        return self.table.c

    def select(self) -> Select[Any]:
        return select(*self.selected)

    def values(self, attrs: Mapping[str, Any]) -> dict[str, Any]:
        """Attribute names -> column keys, for INSERT and UPDATE values."""
        return {self.keys[name]: value for name, value in attrs.items()}

    def row(self, obj: SQLModel) -> dict[str, Any]:
        """Every column of a row object (its defaults applied), for an INSERT."""
        return {key: getattr(obj, name) for name, key in self.keys.items()}


FLAVORS = _Columns.of(FlavorRow)
IMAGES = _Columns.of(ImageRow)
KEYPAIRS = _Columns.of(KeyPairRow)
SERVERS = _Columns.of(ServerRow)
DEVICES = _Columns.of(BlockDeviceRow)
ACTIONS = _Columns.of(InstanceActionRow)
EVENTS = _Columns.of(InstanceActionEventRow)
FAULTS = _Columns.of(InstanceFaultRow)
NOTIFICATIONS = _Columns.of(NotificationRow)


# The statements every job step (and every GET of a server) runs: built once, compiled once
# per dialect, run on the raw DB-API connection (dbapi.py).
def _update_action(*keys: str) -> dbapi.Statement:
    """An action's updated_at and ``keys`` (bound as ``v_<key>``), found by request id."""
    return dbapi.Statement(
        update(ACTIONS.table)
        .where(ACTIONS.c.request_id == bindparam("rid"))
        .values(updated_at=bindparam("now"), **{k: bindparam(f"v_{k}") for k in keys})
    )


def _insert(columns: _Columns, keys: Collection[str]) -> dbapi.Statement:
    """An INSERT of ``keys`` (column keys), bound as ``p_<key>``."""
    return dbapi.Statement(insert(columns.table).values({k: bindparam(f"p_{k}") for k in keys}))


def _bound(values: Mapping[str, Any]) -> dict[str, Any]:
    return {f"p_{k}": v for k, v in values.items()}


_SERVER = {
    (by_project, with_deleted): dbapi.Statement(
        SERVERS.select().where(
            SERVERS.c.id == bindparam("id"),
            SERVERS.c.project_id == bindparam("project") if by_project else true(),
            true() if with_deleted else SERVERS.c.deleted == False,  # noqa: E712
        )
    )
    for by_project in (False, True)
    for with_deleted in (False, True)
}
_IMAGE = dbapi.Statement(IMAGES.select().where(IMAGES.c.id == bindparam("id")))
_FLAVOR = dbapi.Statement(FLAVORS.select().where(FLAVORS.c.id == bindparam("id")))
_DEVICES = dbapi.Statement(
    DEVICES.select().where(DEVICES.c.server_id == bindparam("id")).order_by(DEVICES.c.device_name)
)
_CURRENT_STATE = dbapi.Statement(
    select(SERVERS.c.deleted, SERVERS.c.vm_state, SERVERS.c.task_state).where(
        SERVERS.c.id == bindparam("id")
    )
)
_FINISH_EVENT = dbapi.Statement(
    update(EVENTS.table)
    .where(
        EVENTS.c.action_id == bindparam("aid"),
        EVENTS.c.event == bindparam("ev"),
        EVENTS.c.finish_time.is_(None),
    )
    .values(
        finish_time=bindparam("at"),
        result=bindparam("res"),
        traceback=bindparam("tb"),
        details=bindparam("why"),
    )
)
# An action's updated_at (and finish_time) moved, and its id returned, in one statement.
_TOUCH_ACTION = dbapi.Statement(
    update(ACTIONS.table)
    .where(ACTIONS.c.request_id == bindparam("rid"))
    .values(updated_at=bindparam("now"))
    .returning(ACTIONS.c.id)
)
_FINISH_ACTION = dbapi.Statement(
    update(ACTIONS.table)
    .where(ACTIONS.c.request_id == bindparam("rid"))
    .values(updated_at=bindparam("now"), finish_time=bindparam("now"))
    .returning(ACTIONS.c.id)
)
_SET_JOB_STATE = _update_action("job_state")
# A job's end: its state, and the action's updated_at and finish_time, returning the action's id.
_END_JOB = dbapi.Statement(
    update(ACTIONS.table)
    .where(ACTIONS.c.request_id == bindparam("rid"))
    .values(
        updated_at=bindparam("now"),
        finish_time=bindparam("now"),
        job_state=bindparam("v_job_state"),
    )
    .returning(ACTIONS.c.id)
)
_SAVE_JOURNAL = _update_action("journal")
_START_EVENT = dbapi.Statement(
    pgwrites.start_unless_open(bindparam("aid", type_=EVENTS.c.action_id.type))
)
_ACTION_KEYS = tuple(k for k in ACTIONS.keys.values() if k != "id")
_INSERT_ACTION = _insert(ACTIONS, _ACTION_KEYS)
_INSERT_FAULT = _insert(FAULTS, ("server_id", "code", "message", "details", "host", "created_at"))
_INSERT_NOTIFICATION = _insert(
    NOTIFICATIONS,
    ("event_type", "priority", "publisher_id", "server_id", "payload", "created_at"),
)


class Store:
    """All persistence. One instance per process, shared by the API and the pipeline.

    Every method is one transaction, written as a plain function over a SQLAlchemy Core
    :class:`Connection`, or — for the statements every job step and every GET of a server
    runs — as a coroutine over a :class:`dbapi.Tx`, which runs the same statements, compiled
    once, on the raw sqlite3 or asyncpg connection (a third of the CPU per transaction). On
    SQLite it runs right on the event loop: a WAL commit with ``synchronous=NORMAL`` does not
    wait for the disk, a reader never waits for a lock, and the only writer is this process,
    so a transaction takes tens of microseconds — less than handing it to a thread cost
    (bench/, see the README). Another process holding the file's lock never freezes the
    loop: SQLite's busy handler waits a few milliseconds, then the transaction is retried
    by sleeping on the loop (:meth:`_on_sqlite`), and fails as DatabaseUnavailable (503
    with Retry-After) after ``busy_wait``; WAL readers are not held by the lock at all. On
    PostgreSQL it goes through asyncpg, with :meth:`AsyncConnection.run_sync` or directly; a
    single-statement write there commits by itself, without BEGIN and COMMIT round trips. A
    started transaction always runs to its end: a caller cancelled meanwhile sees the
    cancellation only after the commit or rollback.
    """

    def __init__(
        self, engine: AsyncEngine, *, metrics: Metrics | None = None, busy_wait: float = 3.0
    ) -> None:
        self.engine = engine
        # How long a transaction SQLite refuses as locked is retried before it fails as
        # DatabaseUnavailable (a 503 to a request; a job's bookkeeping retries it again).
        self.busy_wait = busy_wait
        self._sqlite: Engine | None = None
        self._raw: sqlite3.Connection | None = None
        self._dialect = engine.dialect
        if engine.dialect.name == "sqlite":
            self._sqlite = _sqlite_sync_engine(engine.url)
            self._dialect = self._sqlite.dialect
            self._raw = dbapi.sqlite_connect(
                str(engine.url.database), _LOOP_PRAGMAS, _LOOP_BUSY_SECONDS
            )
        self._pool: Any = None  # PostgreSQL: the hot path's asyncpg pool, opened on first use
        self._pool_opening = asyncio.Lock()
        self._seconds = (metrics or Metrics()).db_seconds
        self._reads = self._seconds.labels(kind="read")
        self._writes = self._seconds.labels(kind="write")

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()
        if self._raw is not None:
            self._raw.close()
        if self._sqlite is not None:
            self._sqlite.dispose()
        await self.engine.dispose()

    async def _read(self, work: Callable[[Connection], T]) -> T:
        with self._reads.time():
            if self._sqlite is not None:
                engine = self._sqlite

                def read() -> T:
                    with engine.connect() as conn:
                        return work(conn)

                return await self._on_sqlite(read)
            return await _translated(self._async_transaction(work, False))

    async def _write(self, work: Callable[[Connection], T]) -> T:
        with self._writes.time():
            if self._sqlite is not None:
                engine = self._sqlite

                def write() -> T:
                    with engine.begin() as conn:
                        conn.exec_driver_sql("BEGIN IMMEDIATE")
                        return work(conn)

                return await self._on_sqlite(write)
            return await _translated(self._async_transaction(work, True))

    async def _on_sqlite(self, transaction: Callable[[], T]) -> T:
        """One SQLite transaction, right on the event loop. One that SQLite refuses as locked
        (another process holds the write lock: nothing was written) is tried again after a
        sleep on the loop, with backoff, for up to ``busy_wait``; so the loop itself never waits
        longer than the busy handler's few milliseconds. What it cannot do raises
        DatabaseUnavailable."""
        try:
            return transaction()
        except Exception as exc:
            return await self._sqlite_retry(exc, transaction)

    async def _sqlite_retry(self, first: Exception, transaction: Callable[[], T]) -> T:
        """:meth:`_on_sqlite` after its first attempt failed with ``first`` (apart, so that
        the hot statements' first attempt costs no coroutine of its own)."""
        delay, waited, exc = _BUSY_RETRY_FIRST, 0.0, first
        while True:
            unavailable = dbapi.unavailable(exc)
            if unavailable is None:
                raise exc
            if not dbapi.busy(exc) or waited >= self.busy_wait:
                raise unavailable from exc
            await asyncio.sleep(delay)
            waited += delay + _LOOP_BUSY_SECONDS
            delay = min(delay * 2, _BUSY_RETRY_MAX)
            try:
                return transaction()
            except Exception as again:
                exc = again

    async def _async_transaction(self, work: Callable[[Connection], T], write: bool) -> T:
        """One transaction through asyncpg. A pooled connection the server dropped (after a
        PostgreSQL restart, say) fails its first use; as nothing of the transaction can have
        been committed then, it runs once more on a fresh connection. This replaces the pool's
        pre-ping, which cost a round trip per transaction (bench/, see the README). A failure
        of the COMMIT itself is not retried: whether it took is unknown."""
        for attempt in (1, 2):
            async with self.engine.connect() as conn:
                try:
                    await conn.begin()
                    result = await conn.run_sync(work)
                except DBAPIError as exc:
                    if not exc.connection_invalidated and dbapi.unavailable(exc) is not None:
                        # A connection left in a state SQLAlchemy does not see as a
                        # disconnect (asyncpg's protocol after a terminated backend): never
                        # back into the pool.
                        await conn.invalidate()
                    elif attempt == 1 and exc.connection_invalidated:
                        log.warning("database connection lost; retrying the transaction")
                        continue
                    raise
                if write:
                    await conn.commit()
                return result
        raise AssertionError("unreachable")

    async def _fast_read(self, work: _Work[T]) -> T:
        """A read of the hot statements on the raw connection (dbapi.py); on SQLite inline."""
        with self._reads.time():
            if self._raw is not None:
                tx = dbapi.SqliteTx(self._raw, self._dialect)
                try:
                    return dbapi.run_now(work(tx))
                except Exception as exc:
                    return await self._sqlite_retry(exc, lambda: dbapi.run_now(work(tx)))
            return await _translated(self._pg(work, _READ))

    async def _fast_write(self, work: _Work[T], *, single: bool = False) -> T:
        """A write transaction of the hot statements on the raw connection. ``single``: the
        work runs one statement, which the database commits by itself (no BEGIN and COMMIT:
        on PostgreSQL two round trips)."""
        with self._writes.time():
            conn = self._raw
            if conn is None:
                mode = _SINGLE if single else _WRITE
                return await _translated(self._pg(work, mode))
            tx = dbapi.SqliteTx(conn, self._dialect)
            if single:
                try:
                    return dbapi.run_now(work(tx))
                except Exception as exc:
                    return await self._sqlite_retry(exc, lambda: dbapi.run_now(work(tx)))

            def transaction() -> T:
                # IMMEDIATE: a lock held elsewhere refuses the BEGIN, before anything is done.
                conn.execute("BEGIN IMMEDIATE")
                try:
                    result = dbapi.run_now(work(tx))
                    conn.execute("COMMIT")
                except BaseException:
                    _rollback(conn)
                    raise
                return result

            try:
                return transaction()
            except Exception as exc:
                return await self._sqlite_retry(exc, transaction)

    async def _pg(self, work: _Work[T], mode: str) -> T:
        """``work`` on a connection of the hot path's own asyncpg pool (checking a connection
        out of SQLAlchemy's async pool cost twice as much CPU as the statement). A connection
        the server dropped is replaced by the pool before anything is sent on it; a read or a
        transaction whose first use finds it dropped runs once more, as
        :meth:`_async_transaction` does. A single statement that fails so is not retried:
        like a COMMIT, it may have taken."""
        pool = self._pool or await self._open_pool()
        retried = False
        while True:
            async with pool.acquire() as raw:
                transaction = raw.transaction() if mode == _WRITE else None
                try:
                    if transaction is not None:
                        await transaction.start()
                    result = await work(dbapi.PgTx(raw, self._dialect))
                except BaseException as exc:
                    if _lost(raw) or dbapi.unavailable(exc) is not None:
                        # Never back into the pool in whatever state it is in: the pool
                        # opens a fresh connection for the next use.
                        with contextlib.suppress(Exception):
                            raw.terminate()
                        if not retried and mode != _SINGLE:
                            retried = True
                            log.warning("database connection lost; retrying the transaction")
                            continue
                    elif transaction is not None:
                        with contextlib.suppress(Exception):  # the work's error is the one
                            await transaction.rollback()
                    raise
                if transaction is not None:
                    await transaction.commit()
                return result

    async def _open_pool(self) -> Any:
        """The asyncpg pool, with the connect arguments and JSON codecs SQLAlchemy's dialect
        gives its own connections, so values go and come back exactly as through it. Its
        connections reset nothing on release: the hot statements leave no session state. Up
        to 30 connections, as many as SQLAlchemy's pool allows (10 + 20 overflow): with 64
        clients and 8 jobs, 10 made requests queue for a connection."""
        import asyncpg  # type: ignore[import-untyped]

        async with self._pool_opening:
            if self._pool is None:
                dialect: Any = self.engine.dialect
                args, kwargs = dialect.create_connect_args(self.engine.url)
                kwargs.pop("prepared_statement_cache_size", None)

                async def codecs(conn: Any) -> None:
                    adapted = types.SimpleNamespace(_connection=conn)
                    await dialect.setup_asyncpg_json_codec(adapted)
                    await dialect.setup_asyncpg_jsonb_codec(adapted)

                async def keep(_conn: Any) -> None:
                    return None

                self._pool = await asyncpg.create_pool(
                    *args, **kwargs, min_size=1, max_size=30, init=codecs, reset=keep
                )
        return self._pool

    # -- flavors ---------------------------------------------------------------------------

    async def create_flavor(self, flavor: Flavor) -> Flavor:
        values = FLAVORS.row(FlavorRow(**dataclasses.asdict(flavor), created_at=utcnow()))
        try:
            await self._write(lambda conn: conn.execute(insert(FLAVORS.table).values(values)))
        except IntegrityError as exc:
            raise errors.Duplicate(kind="Flavor", name=flavor.name) from exc
        return flavor

    async def get_flavor(self, flavor_id: str) -> Flavor:
        row = await self._fast_read(lambda tx: tx.first(_FLAVOR, {"id": flavor_id}))
        if row is None:
            raise errors.FlavorNotFound(flavor_id=flavor_id)
        return records.flavor_record(row)

    async def list_flavors(self) -> list[Flavor]:
        query = FLAVORS.select().order_by(FLAVORS.c.id)
        rows = await self._read(lambda conn: conn.execute(query).all())
        return [records.flavor_record(row) for row in rows]

    # -- images (the local image store's records) ------------------------------------------

    async def create_image(self, image: Image) -> Image:
        values = IMAGES.row(ImageRow(**dataclasses.asdict(image)))
        await self._write(lambda conn: conn.execute(insert(IMAGES.table).values(values)))
        return image

    async def get_image(self, image_id: str) -> Image | None:
        row = await self._fast_read(lambda tx: tx.first(_IMAGE, {"id": image_id}))
        return None if row is None else records.image_record(row)

    async def list_images(self, filters: ImageFilters) -> list[Image]:
        query = IMAGES.select()
        if filters.name is not None:
            query = query.where(IMAGES.c.name == filters.name)
        if filters.ids is not None:
            query = query.where(IMAGES.c.id.in_(list(filters.ids)))
        if filters.status is not None:
            query = query.where(IMAGES.c.status == filters.status)
        if filters.visibility is not None:
            query = query.where(IMAGES.c.visibility == filters.visibility)
        if filters.seen_by is not None:
            seen = ["public", "community"] if filters.visibility == "community" else ["public"]
            query = query.where(
                or_(IMAGES.c.owner == filters.seen_by, IMAGES.c.visibility.in_(seen))
            )

        def work(conn: Connection) -> Sequence[Row[Any]]:
            paged = query
            if filters.marker is not None:
                marker = conn.execute(
                    select(IMAGES.c.created_at, IMAGES.c.id).where(IMAGES.c.id == filters.marker)
                ).first()
                if marker is None:
                    raise errors.Invalid(f"marker [{filters.marker}] not found")
                paged = paged.where(_before(IMAGES.c, marker.created_at, marker.id))
            paged = paged.order_by(IMAGES.c.created_at.desc(), IMAGES.c.id.desc())
            if filters.limit is not None:
                paged = paged.limit(filters.limit)
            return conn.execute(paged).all()

        return [records.image_record(row) for row in await self._read(work)]

    async def update_image(self, image_id: str, **changes: Any) -> Image:
        unknown = set(changes) - _IMAGE_COLUMNS
        if unknown:
            raise ValueError(f"not image columns: {sorted(unknown)}")
        statement = (
            update(IMAGES.table)
            .where(IMAGES.c.id == image_id)
            .values(IMAGES.values({**changes, "updated_at": utcnow()}))
            .returning(*IMAGES.selected)
        )
        row = await self._write(lambda conn: conn.execute(statement).first())
        if row is None:
            raise errors.ImageNotFound(image_id=image_id)
        return records.image_record(row)

    async def swap_image_status(
        self, image_id: str, expected: str, status: str, **changes: Any
    ) -> Image:
        """Glance's status compare-and-swap: ``expected -> status`` (with ``changes``) in one
        conditional UPDATE, so of two racing uploads into one queued image one wins and the
        other is a 409."""
        unknown = set(changes) - _IMAGE_COLUMNS
        if unknown:
            raise ValueError(f"not image columns: {sorted(unknown)}")
        statement = (
            update(IMAGES.table)
            .where(IMAGES.c.id == image_id, IMAGES.c.status == expected)
            .values(IMAGES.values({**changes, "status": status, "updated_at": utcnow()}))
            .returning(*IMAGES.selected)
        )
        row = await self._write(lambda conn: conn.execute(statement).first())
        if row is not None:
            return records.image_record(row)
        current = await self.get_image(image_id)
        if current is None:
            raise errors.ImageNotFound(image_id=image_id)
        raise errors.Conflict(
            f"Image status transition from {current.status} to {status} is not allowed"
        )

    async def delete_image(self, image_id: str) -> None:
        statement = delete(IMAGES.table).where(IMAGES.c.id == image_id).returning(IMAGES.c.id)
        deleted = await self._write(lambda conn: conn.execute(statement).first())
        if deleted is None:
            raise errors.ImageNotFound(image_id=image_id)

    # -- key pairs --------------------------------------------------------------------------

    async def create_keypair(self, keypair: KeyPair) -> KeyPair:
        values = KEYPAIRS.row(KeyPairRow(**dataclasses.asdict(keypair)))
        del values["id"]
        try:
            await self._write(lambda conn: conn.execute(insert(KEYPAIRS.table).values(values)))
        except IntegrityError as exc:
            raise errors.Duplicate(
                f"Key pair '{keypair.name}' already exists.", kind="Key pair", name=keypair.name
            ) from exc
        return keypair

    async def get_keypair(self, user_id: str, name: str) -> KeyPair | None:
        query = KEYPAIRS.select().where(KEYPAIRS.c.user_id == user_id, KEYPAIRS.c.name == name)
        row = await self._read(lambda conn: conn.execute(query).first())
        return None if row is None else records.keypair_record(row)

    async def list_keypairs(self, user_id: str) -> list[KeyPair]:
        query = KEYPAIRS.select().where(KEYPAIRS.c.user_id == user_id).order_by(KEYPAIRS.c.name)
        rows = await self._read(lambda conn: conn.execute(query).all())
        return [records.keypair_record(row) for row in rows]

    async def delete_keypair(self, user_id: str, name: str) -> None:
        query = (
            delete(KEYPAIRS.table)
            .where(KEYPAIRS.c.user_id == user_id, KEYPAIRS.c.name == name)
            .returning(KEYPAIRS.c.id)
        )
        deleted = await self._write(lambda conn: conn.execute(query).first())
        if deleted is None:
            raise errors.KeypairNotFound(name=name, user_id=user_id)

    # -- servers ----------------------------------------------------------------------------

    async def create_server(
        self,
        server: Server,
        block_devices: Sequence[BlockDevice],
        action: NewAction,
        *,
        action_time: dt.datetime | None = None,
    ) -> Server:
        """Insert a new server, its block devices and its ``create`` action atomically.

        The action starts at ``action_time``, by default the server's ``created_at`` (an
        adopted server was created long before rebuildd recorded it)."""
        server_row = SERVERS.row(ServerRow(**records.server_values(server)))
        devices = [
            DEVICES.row(
                BlockDeviceRow(
                    **dataclasses.asdict(bdm),
                    created_at=server.created_at,
                    updated_at=server.created_at,
                )
            )
            for bdm in block_devices
        ]
        action_row = _action_values(server.id, action, action_time or server.created_at)

        def work(conn: Connection) -> None:
            conn.execute(insert(SERVERS.table).values(server_row))
            if devices:
                conn.execute(insert(DEVICES.table), devices)
            conn.execute(insert(ACTIONS.table).values(action_row))

        await self._write(work)
        return server

    async def get_server(
        self, server_id: str, *, project_id: str | None = None, include_deleted: bool = False
    ) -> Server:
        """The server, or ServerNotFound (also for another project's server, as Nova does)."""
        query = _SERVER[project_id is not None, include_deleted]
        params = {"id": server_id, "project": project_id}
        row = await self._fast_read(lambda tx: tx.first(query, params))
        if row is None:
            raise errors.ServerNotFound(server_id=server_id)
        return records.server_record(row)

    async def list_servers(self, filters: ServerFilters) -> list[Server]:
        if filters.name is None:
            return await self._list_servers(filters)
        query = SERVERS.select()
        if filters.project_id is not None:
            query = query.where(SERVERS.c.project_id == filters.project_id)
        if not filters.include_deleted:
            query = query.where(SERVERS.c.deleted == False)  # noqa: E712
        if filters.image is not None:
            query = query.where(SERVERS.c.image_ref == filters.image)
        if filters.flavor is not None:
            query = query.where(SERVERS.c.flavor_id == filters.flavor)
        if filters.changes_since is not None:
            query = query.where(SERVERS.c.updated_at >= filters.changes_since)
        if filters.states is not None:
            query = query.where(_states_clause(filters.states))

        names = NameFilter(filters.name)
        if names.literal is not None:
            # A superset (LIKE ignores ASCII case on SQLite); select() below is exact.
            query = query.where(SERVERS.c.name.contains(names.literal, autoescape=True))

        def work(conn: Connection) -> list[Row[Any]]:
            paged = query
            if filters.marker is not None:
                marker = conn.execute(
                    select(SERVERS.c.created_at, SERVERS.c.id).where(SERVERS.c.id == filters.marker)
                ).first()
                if marker is None:
                    raise errors.Invalid(f"marker [{filters.marker}] not found")
                paged = paged.where(_before(SERVERS.c, marker.created_at, marker.id))
            paged = paged.order_by(SERVERS.c.created_at.desc(), SERVERS.c.id.desc())
            return list(conn.execute(paged))

        # Matched off the event loop (namefilter.py), so the limit applies after the read.
        rows = await names.select(await self._read(work), lambda row: str(row.name), filters.limit)
        return [records.server_record(row) for row in rows]

    async def _list_servers(self, filters: ServerFilters) -> list[Server]:
        """:meth:`list_servers` without a name filter: one statement per shape of filters,
        compiled once, on the raw connection (a status poll over 1,000 servers took 1.2 ms of
        CPU through Core, 0.4 ms of it SQLite's; bench/, see the README)."""
        statement = _list_statement(
            by_project=filters.project_id is not None,
            with_deleted=filters.include_deleted,
            image=filters.image is not None,
            flavor=filters.flavor is not None,
            since=filters.changes_since is not None,
            states=None if filters.states is None else tuple(filters.states),
            marker=filters.marker is not None,
            limit=filters.limit is not None,
        )
        values = {
            "project": filters.project_id,
            "image": filters.image,
            "flavor": filters.flavor,
            "since": filters.changes_since,
            "limit": filters.limit,
        }

        async def work(tx: dbapi.Tx) -> list[dbapi.Row]:
            if filters.marker is not None:
                marker = await tx.first(_MARKER, {"id": filters.marker})
                if marker is None:
                    raise errors.Invalid(f"marker [{filters.marker}] not found")
                values.update(m_created=marker.created_at, m_id=marker.id)
            return await tx.all(statement, values)

        return [records.server_record(row) for row in await self._fast_read(work)]

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
    ) -> Server:
        """The compare-and-swap every task_state change goes through.

        Sets ``task_state`` (and ``changes``) only if the server's current task_state is one of
        ``expected_task_state`` (and its vm_state one of ``expected_vm_state``), in one UPDATE;
        with it, in the same transaction, records ``new_action``, ``fault`` and the changes to
        block devices (by id) in ``block_device_changes``, and the new state of a job's action
        (``job``: request id, job state). A job's last swap may also end it: ``end_event``
        finishes that open event as a success and the action with it, and ``notification``,
        built from the server as the swap left it, goes to the outbox. When the row did
        not match, raises InstanceInvalidState naming what differed (409), or ServerNotFound.
        """
        values = dict(changes or {})
        if "task_state" in values or not set(values) <= _SERVER_COLUMNS:
            raise ValueError(f"bad server changes: {sorted(values)}")
        if end_event is not None and job is None:
            raise ValueError("end_event needs the job whose action it ends")
        now = utcnow()
        values.update(task_state=task_state, updated_at=now)
        statement = _swap_statement(
            tuple(sorted(values)),
            tuple(sorted(expected_task_state, key=str)),
            None if expected_vm_state is None else tuple(sorted(expected_vm_state)),
        )
        params = {f"v_{key}": value for key, value in SERVERS.values(values).items()}
        params["server_id"] = server_id

        async def work(tx: dbapi.Tx) -> Server:
            row = await tx.first(statement, params)
            if row is None:
                current = await tx.first(_CURRENT_STATE, {"id": server_id})
                raise _mismatch(server_id, action, current, expected_vm_state)
            if new_action is not None:
                await tx.run(_INSERT_ACTION, _bound(_action_values(server_id, new_action, now)))
            for bdm_id, bdm_values in (block_device_changes or {}).items():
                bdm = {**DEVICES.values(bdm_values), "updated_at": now}
                await tx.run(
                    _device_update(tuple(sorted(bdm))),
                    {"bdm_id": bdm_id, "server_id": server_id, **_bound(bdm)},
                )
            if job is not None and end_event is None:
                await tx.run(_SET_JOB_STATE, {"rid": job[0], "now": now, "v_job_state": job[1]})
            if fault is not None:
                await tx.run(_INSERT_FAULT, _bound(_fault_values(server_id, fault, row.host)))
            server = records.server_record(row)
            if job is not None and end_event is not None:
                ended = {"rid": job[0], "now": now, "v_job_state": job[1]}
                action_id = int((await _first(tx, _END_JOB, ended, job[0])).id)
                await tx.run(_FINISH_EVENT, _finished(action_id, end_event, now, "Success"))
                if notification is not None:
                    await _add_notification(tx, notification(server), now)
            return server

        alone = not (new_action or block_device_changes or job or fault)
        if self._raw is None and not alone:
            return await self._pg_transition(
                server_id,
                action,
                statement,
                params,
                now,
                expected_vm_state=expected_vm_state,
                new_action=new_action,
                fault=fault,
                block_device_changes=block_device_changes or {},
                job=job,
                end_event=end_event,
                notification=notification,
            )
        return await self._fast_write(work, single=alone)

    async def _pg_transition(
        self,
        server_id: str,
        action: str,
        swap: dbapi.Statement,
        params: dict[str, Any],
        now: dt.datetime,
        *,
        expected_vm_state: Collection[str] | None,
        new_action: NewAction | None,
        fault: Fault | None,
        block_device_changes: Mapping[str, Mapping[str, Any]],
        job: tuple[str, str] | None,
        end_event: str | None,
        notification: Callable[[Server], Notification] | None,
    ) -> Server:
        """:meth:`transition` on PostgreSQL: the swap and what goes with it in one statement
        (pgwrites.py); a transaction only when the job's end must be found, or its
        notification (built from the swapped server) written after it."""
        values = dict(params)
        if new_action is not None:
            action_row = _action_values(server_id, new_action, now)
            values.update({f"a_{k}": v for k, v in action_row.items()})
        devices = []
        for i, (bdm_id, changes) in enumerate(block_device_changes.items()):
            bdm = {**DEVICES.values(changes), "updated_at": now}
            devices.append(tuple(sorted(bdm)))
            values[f"b{i}_id"] = bdm_id
            values.update({f"b{i}_{k}": v for k, v in bdm.items()})
        if job is not None:
            values.update(rid=job[0], now=now, j_state=job[1])
        if end_event is not None:
            values.update(ev=end_event, res="Success", tb=None, why=None)
        if fault is not None:
            faulted = _fault_values(server_id, fault, "")
            values.update({f"f_{k}": v for k, v in faulted.items() if k != "host"})
        statement = pgwrites.swap_with(
            swap,
            new_action=_ACTION_KEYS if new_action is not None else None,
            devices=tuple(devices),
            job=job is not None,
            end_event=end_event is not None,
            fault=fault is not None,
        )

        async def work(tx: dbapi.Tx) -> Server:
            row = await tx.first(statement, values)
            if row is None:
                current = await tx.first(_CURRENT_STATE, {"id": server_id})
                raise _mismatch(server_id, action, current, expected_vm_state)
            if end_event is not None and row.ended is None:
                raise LookupError(f"no instance action {values['rid']}")
            server = records.server_record(row)
            if notification is not None:
                await _add_notification(tx, notification(server), now)
            return server

        return await self._fast_write(work, single=end_event is None)

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
            update(SERVERS.table)
            .where(SERVERS.c.id == server_id, SERVERS.c.deleted == False)  # noqa: E712
            .values(locked=locked, locked_reason=reason, locked_by=by, updated_at=now)
            .returning(SERVERS.c.id)
        )

        def work(conn: Connection) -> None:
            if conn.execute(statement).first() is None:
                raise errors.ServerNotFound(server_id=server_id)
            conn.execute(insert(ACTIONS.table).values(_action_values(server_id, action, now)))

        await self._write(work)

    # -- block devices ---------------------------------------------------------------------

    async def get_block_devices(self, server_id: str) -> list[BlockDevice]:
        rows = await self._fast_read(lambda tx: tx.all(_DEVICES, {"id": server_id}))
        return [records.block_device_record(row) for row in rows]

    async def paths_in_use(self) -> set[str]:
        """Every disk path a block device of a live server points to."""
        query = (
            select(DEVICES.c.path)
            .join(SERVERS.table, SERVERS.c.id == DEVICES.c.server_id)
            .where(SERVERS.c.deleted == False, DEVICES.c.path.is_not(None))  # noqa: E712
        )
        paths = await self._read(lambda conn: conn.execute(query).scalars().all())
        return {str(p) for p in paths if p is not None}

    async def cache_users(self) -> tuple[set[str], set[tuple[int, str]]]:
        """What the image cache must keep: the images live servers' disks come from, with
        those of jobs in flight (a rebuild's new image), and the (size in MiB, format) of
        live servers' blank disks (ephemeral, swap)."""
        live = SERVERS.c.deleted == False  # noqa: E712
        devices = select(DEVICES.c.image_id, DEVICES.c.size_mib, DEVICES.c.guest_format).join(
            SERVERS.table, SERVERS.c.id == DEVICES.c.server_id
        )
        running = select(ACTIONS.c.job_params).where(
            ACTIONS.c.job_state.in_(["running", "cleaning"])
        )

        def work(conn: Connection) -> tuple[set[str], set[tuple[int, str]]]:
            images, blanks = set(), set()
            for image_id, size_mib, guest_format in conn.execute(devices.where(live)):
                if image_id:
                    images.add(str(image_id))
                if size_mib and guest_format:
                    blanks.add((int(size_mib), str(guest_format)))
            for (params,) in conn.execute(running):
                if params and params.get("image_id"):
                    images.add(str(params["image_id"]))
            return images, blanks

        return await self._read(work)

    # -- faults -----------------------------------------------------------------------------

    async def latest_faults(self, server_ids: Collection[str]) -> dict[str, Fault]:
        if not server_ids:
            return {}
        query = (
            FAULTS.select()
            .where(FAULTS.c.server_id.in_(list(server_ids)))
            .order_by(FAULTS.c.id.asc())
        )
        rows = await self._read(lambda conn: conn.execute(query).all())
        return {
            row.server_id: Fault(row.code, row.message, row.details, row.created_at) for row in rows
        }

    # -- instance actions and events --------------------------------------------------------

    async def list_actions(self, server_id: str) -> list[InstanceAction]:
        query = (
            ACTIONS.select()
            .where(ACTIONS.c.server_id == server_id)
            .order_by(ACTIONS.c.start_time.desc(), ACTIONS.c.id.desc())
        )
        rows = await self._read(lambda conn: conn.execute(query).all())
        return [records.action_record(row, ()) for row in rows]

    async def get_action(self, server_id: str, request_id: str) -> InstanceAction:
        query = ACTIONS.select().where(
            ACTIONS.c.server_id == server_id, ACTIONS.c.request_id == request_id
        )

        def work(conn: Connection) -> InstanceAction:
            row = conn.execute(query).first()
            if row is None:
                raise errors.ActionNotFound(request_id=request_id, server_id=server_id)
            events = conn.execute(
                EVENTS.select().where(EVENTS.c.action_id == row.id).order_by(EVENTS.c.id)
            ).all()
            return records.action_record(row, tuple(records.event_record(e) for e in events))

        return await self._read(work)

    async def start_event(
        self,
        request_id: str,
        event_name: str,
        host: str,
        *,
        notifications: Sequence[Notification] = (),
        after: str | None = None,
    ) -> None:
        """Start an event; a no-op if that event is already started and unfinished (resume).
        In the same transaction: ``after``, the event of the stage before, is finished as a
        success, and ``notifications`` go to the outbox in order."""
        now = utcnow()
        if self._raw is None:
            values: dict[str, Any] = {"rid": request_id, "now": now, "event": event_name}
            values["host"] = host
            if after is not None:
                values.update(ev=after, res="Success", tb=None, why=None)
            for i, each in enumerate(notifications):
                values.update(pgwrites.notification_params(i, _notification_values(each, now)))
            statement = pgwrites.start_event(len(notifications), after is not None)
            await self._fast_write(
                lambda tx: _first(tx, statement, values, request_id), single=True
            )
            return

        async def work(tx: dbapi.Tx) -> None:
            action_id = await _touch_action(tx, _TOUCH_ACTION, request_id, now)
            if after is not None:
                await tx.run(_FINISH_EVENT, _finished(action_id, after, now, "Success"))
            for notification in notifications:
                await _add_notification(tx, notification, now)
            values = {"aid": action_id, "event": event_name, "now": now, "host": host}
            await tx.run(_START_EVENT, values)

        await self._fast_write(work)

    async def finish_event(
        self,
        request_id: str,
        event_name: str,
        *,
        result: str,
        traceback: str | None = None,
        details: str | None = None,
        finish_action: bool = False,
        notification: Notification | None = None,
    ) -> None:
        """Finish an open event (and the action with ``finish_action``); ``notification`` goes
        to the outbox in the same transaction."""
        now = utcnow()
        finish = _FINISH_ACTION if finish_action else _TOUCH_ACTION
        if self._raw is None:
            values = {"rid": request_id, "now": now, "ev": event_name, "res": result}
            values.update(tb=traceback, why=details)
            if notification is not None:
                values.update(
                    pgwrites.notification_params(0, _notification_values(notification, now))
                )
            statement = pgwrites.finish_event(finish_action, notification is not None)
            await self._fast_write(
                lambda tx: _first(tx, statement, values, request_id), single=True
            )
            return

        async def work(tx: dbapi.Tx) -> None:
            action_id = await _touch_action(tx, finish, request_id, now)
            await tx.run(
                _FINISH_EVENT, _finished(action_id, event_name, now, result, traceback, details)
            )
            await _add_notification(tx, notification, now)

        await self._fast_write(work)

    async def add_finished_action(
        self, server_id: str, action: NewAction, events: Sequence[ActionEvent]
    ) -> None:
        """Record an action that is over as it starts (no job), with its events, at once."""
        now = utcnow()

        def work(conn: Connection) -> None:
            values = {**_action_values(server_id, action, now), "finish_time": now}
            inserted = conn.execute(insert(ACTIONS.table).values(values).returning(ACTIONS.c.id))
            action_id = inserted.scalar_one()
            for action_event in events:
                row = {**dataclasses.asdict(action_event), "action_id": action_id}
                conn.execute(insert(EVENTS.table).values(row))

        await self._write(work)

    # -- jobs: journal, recovery, idempotency ---------------------------------------------------

    async def save_journal(self, request_id: str, journal: dict[str, Any]) -> None:
        params = {"rid": request_id, "now": utcnow(), "v_journal": journal}
        await self._fast_write(lambda tx: tx.run(_SAVE_JOURNAL, params), single=True)

    async def set_job_state(self, request_id: str, job_state: str) -> None:
        params = {"rid": request_id, "now": utcnow(), "v_job_state": job_state}
        await self._fast_write(lambda tx: tx.run(_SET_JOB_STATE, params), single=True)

    async def in_flight_actions(self) -> list[InstanceAction]:
        """Actions whose job had not ended (running) or not cleaned up (cleaning)."""
        query = (
            ACTIONS.select()
            .where(ACTIONS.c.job_state.in_(["running", "cleaning"]))
            .order_by(ACTIONS.c.id)
        )
        rows = await self._read(lambda conn: conn.execute(query).all())
        return [records.action_record(row, ()) for row in rows]

    async def abandon_actions(self, server_id: str, *, keep: str, reason: str) -> int:
        """End every in-flight action of a server but ``keep`` (a request id) as failed, its
        open events as errors with ``reason``: the jobs of a server deleted by force, which
        no process runs any more. Returns how many actions it ended."""
        now = utcnow()
        open_jobs = and_(
            ACTIONS.c.server_id == server_id,
            ACTIONS.c.request_id != keep,
            ACTIONS.c.job_state.in_(["running", "cleaning"]),
        )
        ids = select(ACTIONS.c.id).where(open_jobs).scalar_subquery()

        def work(conn: Connection) -> int:
            conn.execute(
                update(EVENTS.table)
                .where(EVENTS.c.action_id.in_(ids), EVENTS.c.finish_time.is_(None))
                .values(finish_time=now, result="Error", details=reason)
            )
            ended = conn.execute(
                update(ACTIONS.table)
                .where(open_jobs)
                .values(job_state="failed", updated_at=now, finish_time=now)
            )
            return int(ended.rowcount)

        return await self._write(work)

    async def find_action_by_key(self, server_id: str, key: str) -> InstanceAction | None:
        query = ACTIONS.select().where(
            ACTIONS.c.server_id == server_id, ACTIONS.c.idempotency_key == key
        )
        row = await self._read(lambda conn: conn.execute(query).first())
        return None if row is None else records.action_record(row, ())

    async def save_response(self, request_id: str, response: dict[str, Any]) -> None:
        statement = (
            update(ACTIONS.table)
            .where(ACTIONS.c.request_id == request_id)
            .values(response=response)
        )
        await self._write(lambda conn: conn.execute(statement))

    # -- notifications outbox ----------------------------------------------------------------

    async def list_notifications(self, server_id: str) -> list[tuple[str, str, dict[str, Any]]]:
        query = (
            select(NOTIFICATIONS.c.event_type, NOTIFICATIONS.c.priority, NOTIFICATIONS.c.payload)
            .where(NOTIFICATIONS.c.server_id == server_id)
            .order_by(NOTIFICATIONS.c.id)
        )
        rows = await self._read(lambda conn: conn.execute(query).all())
        return [(r.event_type, r.priority, r.payload) for r in rows]


# -- helpers: running transactions ----------------------------------------------------------


def _sqlite_sync_engine(url: URL) -> Engine:
    """The synchronous pysqlite twin of an aiosqlite URL, with the same pragmas but the short
    busy timeout (it runs on the event loop). Transactions are explicit (BEGIN IMMEDIATE), as
    on the raw connection."""
    engine = create_sync_engine(
        url.set(drivername="sqlite"),
        connect_args={
            "timeout": _LOOP_BUSY_SECONDS,
            "check_same_thread": False,
            "isolation_level": None,
        },
        hide_parameters=True,
    )
    event.listen(engine, "connect", _loop_pragmas)
    return engine


def _sqlite_pragmas(conn: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
    _pragmas(conn, _SQLITE_PRAGMAS)


def _loop_pragmas(conn: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
    _pragmas(conn, _LOOP_PRAGMAS)


def _pragmas(conn: DBAPIConnection, pragmas: Sequence[str]) -> None:
    cursor = conn.cursor()
    for pragma in pragmas:
        cursor.execute(f"PRAGMA {pragma}")
    cursor.execute("PRAGMA database_list")
    files = [row[2] for row in cursor.fetchall() if row[1] == "main" and row[2]]
    cursor.close()
    for name in files:
        _owner_only(name)


def _owner_only(database: str) -> None:
    """The database holds adminPass and user_data (in jobs' params and servers): 0600, with
    its WAL and shared-memory files (SQLite gives those the database's mode when it makes
    them; these may predate this)."""
    for name in (database, f"{database}-wal", f"{database}-shm"):
        path = Path(name)
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_mode & 0o077:
                path.chmod(0o600)


def _rollback(conn: sqlite3.Connection) -> None:
    """End a failed transaction; a ROLLBACK that fails too (the disk went away) leaves the
    connection to SQLite, which rolls back what it cannot commit."""
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


def _lost(raw: Any) -> bool:
    """Whether a pooled asyncpg connection is gone. The pool releases (detaches) the proxy of
    a connection that closed under it, and a released proxy raises on every call."""
    try:
        return bool(raw.is_closed())
    except Exception:
        return True


async def _translated(transaction: Coroutine[Any, Any, T]) -> T:
    """A PostgreSQL transaction run to its end (:func:`_uncancelled`); a failure that says the
    database is unreachable or went away raises DatabaseUnavailable."""
    try:
        return await _uncancelled(asyncio.ensure_future(transaction))
    except Exception as exc:
        unavailable = dbapi.unavailable(exc)
        if unavailable is None:
            raise
        raise unavailable from exc


async def _uncancelled(future: asyncio.Future[T]) -> T:
    """Wait for ``future`` even if the caller is cancelled meanwhile, so a transaction is never
    left half-observed; the cancellation is raised once the transaction has ended (its own
    error, if it failed, wins)."""
    cancelled = False
    while not future.done():
        try:
            await asyncio.wait((future,))
        except asyncio.CancelledError:
            cancelled = True
    result = future.result()
    if cancelled:
        raise asyncio.CancelledError
    return result


async def _add_notification(
    tx: dbapi.Tx, notification: Notification | None, now: dt.datetime
) -> None:
    if notification is not None:
        await tx.run(_INSERT_NOTIFICATION, _bound(_notification_values(notification, now)))


def _notification_values(notification: Notification, now: dt.datetime) -> dict[str, Any]:
    return {
        "event_type": notification.event_type,
        "priority": notification.priority,
        "publisher_id": notification.publisher_id,
        "server_id": notification.server_id,
        "payload": notification.payload,
        "created_at": now,
    }


def _fault_values(server_id: str, fault: Fault, host: str) -> dict[str, Any]:
    return {
        "server_id": server_id,
        "code": fault.code,
        "message": fault.message[:255],
        "details": fault.details,
        "host": host,
        "created_at": fault.created_at,
    }


def _finished(
    action_id: int,
    event: str,
    now: dt.datetime,
    result: str,
    traceback: str | None = None,
    details: str | None = None,
) -> dict[str, Any]:
    """The parameters of _FINISH_EVENT."""
    return {
        "aid": action_id,
        "ev": event,
        "at": now,
        "res": result,
        "tb": traceback,
        "why": details,
    }


async def _touch_action(
    tx: dbapi.Tx, statement: dbapi.Statement, request_id: str, now: dt.datetime
) -> int:
    return int((await _first(tx, statement, {"rid": request_id, "now": now}, request_id)).id)


async def _first(
    tx: dbapi.Tx, statement: dbapi.Statement, values: Mapping[str, Any], request_id: str
) -> dbapi.Row:
    """The row an UPDATE ... RETURNING of one action found, or LookupError."""
    row = await tx.first(statement, values)
    if row is None:
        raise LookupError(f"no instance action {request_id}")
    return row


def _action_values(server_id: str, action: NewAction, now: dt.datetime) -> dict[str, Any]:
    values = ACTIONS.values(records.action_values(server_id, action, now))
    del values["id"]
    return values


# -- helpers: clauses ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _swap_statement(
    columns: tuple[str, ...],
    expected_task_state: tuple[str | None, ...],
    expected_vm_state: tuple[str, ...] | None,
) -> dbapi.Statement:
    """The compare-and-swap UPDATE for one shape of transition, built once: the shapes come
    from the code's fixed vocabulary of states and columns, never from a request (so the
    expected states are bound as constants)."""
    conditions = [
        SERVERS.c.id == bindparam("server_id"),
        SERVERS.c.deleted == False,  # noqa: E712
        _task_state_clause(expected_task_state),
    ]
    if expected_vm_state is not None:
        conditions.append(SERVERS.c.vm_state.in_([literal(s) for s in expected_vm_state]))
    return dbapi.Statement(
        update(SERVERS.table)
        .where(*conditions)
        .values({SERVERS.keys[name]: bindparam(f"v_{SERVERS.keys[name]}") for name in columns})
        .returning(*SERVERS.selected)
    )


@functools.lru_cache(maxsize=64)
def _device_update(keys: tuple[str, ...]) -> dbapi.Statement:
    """An UPDATE of one block device's ``keys`` (column keys, bound as ``p_<key>``)."""
    return dbapi.Statement(
        update(DEVICES.table)
        .where(DEVICES.c.id == bindparam("bdm_id"), DEVICES.c.server_id == bindparam("server_id"))
        .values({k: bindparam(f"p_{k}") for k in keys})
    )


@functools.lru_cache(maxsize=128)
def _list_statement(
    *,
    by_project: bool,
    with_deleted: bool,
    image: bool,
    flavor: bool,
    since: bool,
    states: tuple[tuple[str, str | None], ...] | None,
    marker: bool,
    limit: bool,
) -> dbapi.Statement:
    """The servers list for one shape of filters (Store._list_servers binds the values)."""
    query = SERVERS.select()
    if by_project:
        query = query.where(SERVERS.c.project_id == bindparam("project"))
    if not with_deleted:
        query = query.where(SERVERS.c.deleted == False)  # noqa: E712
    if image:
        query = query.where(SERVERS.c.image_ref == bindparam("image"))
    if flavor:
        query = query.where(SERVERS.c.flavor_id == bindparam("flavor"))
    if since:
        query = query.where(SERVERS.c.updated_at >= bindparam("since"))
    if states is not None:
        query = query.where(_states_clause(states, constants=True))
    if marker:
        created = bindparam("m_created", type_=SERVERS.c.created_at.type)
        query = query.where(_before(SERVERS.c, created, bindparam("m_id")))
    query = query.order_by(SERVERS.c.created_at.desc(), SERVERS.c.id.desc())
    if limit:
        query = query.limit(bindparam("limit", type_=Integer))
    return dbapi.Statement(query)


_MARKER = dbapi.Statement(
    select(SERVERS.c.created_at, SERVERS.c.id).where(SERVERS.c.id == bindparam("id"))
)


def _task_state_clause(expected: Collection[str | None]) -> Any:
    # One bound constant each, not an IN list expanded at execution (dbapi.py).
    named = [literal(s) for s in expected if s is not None]
    clauses = []
    if named:
        clauses.append(col(ServerRow.task_state).in_(named))
    if None in expected:
        clauses.append(col(ServerRow.task_state).is_(None))
    if not clauses:
        raise ValueError("expected_task_state must name at least one state")
    return or_(*clauses)


def _states_clause(pairs: Sequence[tuple[str, str | None]], *, constants: bool = False) -> Any:
    """(vm_state, task_state) pairs; a None task_state is any state not listed for that vm.
    ``constants``: the states as bound constants, with no IN list expanded at execution."""
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
            listed: list[Any] = list(explicit_task_states(vm_state))
            if not listed:  # every task_state shows the default status
                clauses.append(col(ServerRow.vm_state) == vm_state)
                continue
            if constants:
                listed = [literal(s) for s in listed]
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


def _before(columns: Any, created_at: Any, row_id: Any) -> Any:
    """Rows after a marker (values, or bound parameters) in (created_at desc, id desc) order."""
    return or_(
        columns.created_at < created_at,
        and_(columns.created_at == created_at, columns.id < row_id),
    )


def _mismatch(
    server_id: str,
    action: str,
    current: Any,  # (deleted, vm_state, task_state) of the server, or None
    expected_vm_state: Collection[str] | None,
) -> errors.RebuilddError:
    if current is None or current.deleted:
        return errors.ServerNotFound(server_id=server_id)
    if expected_vm_state is not None and current.vm_state not in expected_vm_state:
        attr, state = "vm_state", current.vm_state
    else:
        attr, state = "task_state", str(current.task_state)
    return errors.InstanceInvalidState(action=action, server_id=server_id, attr=attr, state=state)
