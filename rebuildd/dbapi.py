"""The Store's hot statements on the raw DB-API connection: sqlite3 or asyncpg.

Owns :class:`Statement` — a SQLAlchemy Core statement compiled once per dialect into its SQL
text, its parameters in order with SQLAlchemy's own bind processors, and its result columns
with SQLAlchemy's result processors — and the two transaction types that run one
(:class:`SqliteTx`, :class:`PgTx`). So the SQL, the types and the values are exactly what
SQLAlchemy would send, without its per-execution layers (connection and pool proxies,
execution context, cache-key generation, result objects), which cost several times the
database's own work for these small statements (bench/, see the README). It knows no table:
storage.py builds the statements and owns every transaction. It must not be used for a
statement whose parameters expand at execution time (``IN`` over a bound list).

Also owns what a database error means (:func:`unavailable`, :func:`busy`): the one place the
drivers' exceptions are read, whether they come raw or wrapped by SQLAlchemy.
"""

from __future__ import annotations

import collections
import functools
import sqlite3
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from sqlalchemy.engine import Dialect
from sqlalchemy.sql.expression import ClauseElement
from sqlalchemy.types import TypeEngine

from rebuildd import errors

T = TypeVar("T")
_NO_DEFAULT = object()


class Row(Protocol):
    """A result row: its columns as attributes (records.py reads rows so)."""

    def __getattr__(self, name: str) -> Any: ...


@dataclass(slots=True)
class Compiled:
    sql: str
    params: tuple[tuple[str, Callable[[Any], Any] | None, Any], ...]  # name, processor, default
    row: Callable[..., Row] | None  # None: the statement returns no rows
    types: tuple[TypeEngine[Any], ...]  # of the result columns
    # The result columns' processors; None until known. SQLAlchemy gives them the type code
    # the driver reports for each column: none on SQLite, PostgreSQL's type OID on asyncpg.
    results: tuple[Callable[[Any], Any] | None, ...] | None = None

    def args(self, values: Mapping[str, Any]) -> list[Any]:
        out = []
        for name, process, default in self.params:
            value = values[name] if default is _NO_DEFAULT else values.get(name, default)
            out.append(value if process is None else process(value))
        return out

    def resolve(self, dialect: Dialect, type_codes: Sequence[Any]) -> None:
        self.results = tuple(
            t.dialect_impl(dialect).result_processor(dialect, code)
            for t, code in zip(self.types, type_codes, strict=True)
        )

    def make_row(self, raw: Sequence[Any]) -> Row:
        assert self.row is not None and self.results is not None
        return self.row(
            *[v if p is None or v is None else p(v) for v, p in zip(raw, self.results, strict=True)]
        )


class Statement:
    """A Core statement, compiled for each dialect it meets (once)."""

    __slots__ = ("_compiled", "core")

    def __init__(self, core: ClauseElement) -> None:
        self.core = core
        self._compiled: dict[str, Compiled] = {}

    def compiled(self, dialect: Dialect) -> Compiled:
        found = self._compiled.get(dialect.name)
        if found is None:
            found = self._compiled[dialect.name] = _compile(self.core, dialect)
        return found


def _compile(core: ClauseElement, dialect: Dialect) -> Compiled:
    compiled: Any = core.compile(dialect=dialect)
    if "POSTCOMPILE" in compiled.string:
        raise ValueError("a statement with expanding parameters cannot be precompiled")
    params = []
    for name in compiled.positiontup:
        bind = compiled.binds[name]
        process = bind.type.dialect_impl(dialect).bind_processor(dialect)
        default = _NO_DEFAULT if bind.required or bind.callable else bind.value
        params.append((name, process, default))
    columns = list(getattr(core, "exported_columns", ()))
    row = _row_type([c.key for c in columns]) if columns else None
    found = Compiled(compiled.string, tuple(params), row, tuple(c.type for c in columns))
    if dialect.name == "sqlite":
        found.resolve(dialect, [None] * len(columns))
    return found


def _row_type(keys: list[str]) -> Callable[..., Row]:
    return collections.namedtuple("Row", keys)  # type: ignore[return-value]


class Tx(Protocol):
    """One transaction's statements. Every method is a coroutine so that the Store's work
    reads the same on both databases; on SQLite none of them ever suspends."""

    async def all(self, statement: Statement, values: Mapping[str, Any] = ...) -> list[Row]: ...

    async def first(self, statement: Statement, values: Mapping[str, Any] = ...) -> Row | None: ...

    async def run(self, statement: Statement, values: Mapping[str, Any] = ...) -> int: ...


_EMPTY: Mapping[str, Any] = {}


class SqliteTx:
    __slots__ = ("conn", "dialect")

    def __init__(self, conn: sqlite3.Connection, dialect: Dialect) -> None:
        self.conn = conn
        self.dialect = dialect

    async def all(self, statement: Statement, values: Mapping[str, Any] = _EMPTY) -> list[Row]:
        c = statement.compiled(self.dialect)
        return [c.make_row(r) for r in self.conn.execute(c.sql, c.args(values)).fetchall()]

    async def first(self, statement: Statement, values: Mapping[str, Any] = _EMPTY) -> Row | None:
        c = statement.compiled(self.dialect)
        raw = self.conn.execute(c.sql, c.args(values)).fetchone()
        return None if raw is None else c.make_row(raw)

    async def run(self, statement: Statement, values: Mapping[str, Any] = _EMPTY) -> int:
        c = statement.compiled(self.dialect)
        return self.conn.execute(c.sql, c.args(values)).rowcount


class PgTx:
    """On an asyncpg connection (from SQLAlchemy's pool, so with its JSON codecs)."""

    __slots__ = ("conn", "dialect")

    def __init__(self, conn: Any, dialect: Dialect) -> None:
        self.conn = conn
        self.dialect = dialect

    async def all(self, statement: Statement, values: Mapping[str, Any] = _EMPTY) -> list[Row]:
        c = await self._compiled(statement)
        return [c.make_row(r) for r in await self.conn.fetch(c.sql, *c.args(values))]

    async def first(self, statement: Statement, values: Mapping[str, Any] = _EMPTY) -> Row | None:
        c = await self._compiled(statement)
        raw = await self.conn.fetchrow(c.sql, *c.args(values))
        return None if raw is None else c.make_row(raw)

    async def _compiled(self, statement: Statement) -> Compiled:
        """The statement compiled, its result processors found (once per process) from the
        column types PostgreSQL reports when it prepares the statement."""
        c = statement.compiled(self.dialect)
        if c.results is None:
            prepared = await self.conn.prepare(c.sql)
            c.resolve(self.dialect, [a.type.oid for a in prepared.get_attributes()])
        return c

    async def run(self, statement: Statement, values: Mapping[str, Any] = _EMPTY) -> int:
        c = statement.compiled(self.dialect)
        if c.row is not None:
            return len(await self.conn.fetch(c.sql, *c.args(values)))
        status: str = await self.conn.execute(c.sql, *c.args(values))
        return int(status.rsplit(" ", 1)[-1]) if status[-1:].isdigit() else 0


def run_now(coroutine: Coroutine[Any, Any, T]) -> T:
    """The result of a coroutine that must not suspend (a SQLite transaction's work): it runs
    to its end right here, so no other task can see the transaction half done."""
    try:
        coroutine.send(None)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    coroutine.close()
    raise RuntimeError("a SQLite transaction's work suspended")


def sqlite_connect(path: str, pragmas: Sequence[str], timeout: float) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit BEGIN/COMMIT), used only on
    the event loop's thread."""
    conn = sqlite3.connect(path, timeout=timeout, isolation_level=None, check_same_thread=False)
    for pragma in pragmas:
        conn.execute(f"PRAGMA {pragma}")
    return conn


# -- what a database error means ------------------------------------------------------------

# SQLite's primary result codes that say the database cannot be written now, not that the
# statement is wrong: another process holds the lock; the disk is full, failing or read-only.
_SQLITE_BUSY = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED})
_SQLITE_UNAVAILABLE = _SQLITE_BUSY | {
    sqlite3.SQLITE_IOERR,
    sqlite3.SQLITE_FULL,
    sqlite3.SQLITE_CANTOPEN,
    sqlite3.SQLITE_READONLY,
    sqlite3.SQLITE_PROTOCOL,
}


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, the driver's exception SQLAlchemy wrapped (``orig``), and their causes."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        each = todo.pop()
        if each is None or id(each) in seen or len(seen) > 8:
            continue
        seen.add(id(each))
        yield each
        todo += [getattr(each, "orig", None), each.__cause__, each.__context__]


@functools.cache
def _pg_unavailable() -> tuple[type[BaseException], ...]:
    """asyncpg's errors that say PostgreSQL is unreachable, went away or is out of room."""
    try:
        import asyncpg  # type: ignore[import-untyped]
    except ImportError:  # pragma: no cover - asyncpg is a dependency
        return ()
    found = asyncpg.exceptions
    return (
        found.PostgresConnectionError,  # class 08, ConnectionDoesNotExistError among them
        found.OperatorInterventionError,  # class 57: pg_terminate_backend, shutdown
        found.InsufficientResourcesError,  # class 53: disk full, too many connections
        found.InterfaceError,  # the connection closed or was released under us
        # The protocol confused by a backend's termination message ("cannot switch to state
        # 12; another operation is in progress").
        found.InternalClientError,
    )


def _sqlite_code(exc: BaseException) -> int | None:
    if isinstance(exc, sqlite3.OperationalError | sqlite3.DatabaseError):
        code = getattr(exc, "sqlite_errorcode", None)
        return None if code is None else int(code) & 0xFF
    return None


def busy(exc: BaseException) -> bool:
    """True when SQLite refused because another connection holds its lock (worth a retry
    in a moment; nothing of the transaction was written)."""
    return any(_sqlite_code(each) in _SQLITE_BUSY for each in _causes(exc))


def unavailable(exc: BaseException) -> errors.DatabaseUnavailable | None:
    """The DatabaseUnavailable a driver's (or SQLAlchemy's) exception means, or None when it
    means something else (a constraint, a bug). The reason names the kind of fault, never a
    statement or a value."""
    if isinstance(exc, errors.RebuilddError):
        return None
    kinds = _pg_unavailable()
    for each in _causes(exc):
        code = _sqlite_code(each)
        if code in _SQLITE_BUSY:
            return errors.DatabaseUnavailable(reason="the database is locked by another process")
        if code in _SQLITE_UNAVAILABLE:
            return errors.DatabaseUnavailable(reason=f"SQLite: {each}")
        if getattr(each, "connection_invalidated", False) or isinstance(
            each, (*kinds, OSError, TimeoutError)
        ):
            return errors.DatabaseUnavailable(reason="the database connection failed")
    return None
