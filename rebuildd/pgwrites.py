"""PostgreSQL's one-statement forms of the Store's multi-statement hot writes.

Owns the data-modifying CTEs that let PostgreSQL do a job step's bookkeeping in one
statement, which it commits by itself: one round trip instead of BEGIN, one per statement and
COMMIT (about 0.1 ms each here, with the event loop waiting on every one; bench/, see the
README). Every part after the first is conditioned on the row the first part found, so a
write that finds nothing writes nothing, as the multi-statement form raises before writing.
The parts of one statement see the same snapshot and their order is unspecified, so no part
reads what another writes, and several notifications are one INSERT (their ids keep their
order). storage.py builds the parameters and owns the transactions; SQLite runs the
statements one by one instead (it has no data-modifying CTEs, and no round trips to save).
"""

from __future__ import annotations

import functools
from typing import Any

from sqlalchemy import (
    CTE,
    ColumnElement,
    Table,
    bindparam,
    exists,
    insert,
    select,
    union_all,
    update,
)
from sqlalchemy.sql.dml import Insert, Update

from rebuildd import dbapi
from rebuildd.tables import (
    BlockDeviceRow,
    InstanceActionEventRow,
    InstanceActionRow,
    InstanceFaultRow,
    NotificationRow,
)

ACTIONS: Table = InstanceActionRow.__table__  # type: ignore[attr-defined]
EVENTS: Table = InstanceActionEventRow.__table__  # type: ignore[attr-defined]
DEVICES: Table = BlockDeviceRow.__table__  # type: ignore[attr-defined]
FAULTS: Table = InstanceFaultRow.__table__  # type: ignore[attr-defined]
NOTIFICATIONS: Table = NotificationRow.__table__  # type: ignore[attr-defined]
NOTIFICATION_KEYS = ("event_type", "priority", "publisher_id", "server_id", "payload", "created_at")
FAULT_KEYS = ("server_id", "code", "message", "details", "created_at")


def _bind(table: Table, prefix: str, key: str) -> Any:
    return bindparam(f"{prefix}{key}", type_=table.c[key].type)


def _touch(finish: bool) -> CTE:
    """``a``: the action found by request id, its updated_at (and finish_time) moved."""
    values: dict[str, Any] = {"updated_at": bindparam("now")}
    if finish:
        values["finish_time"] = bindparam("now")
    return (
        update(ACTIONS)
        .where(ACTIONS.c.request_id == bindparam("rid"))
        .values(values)
        .returning(ACTIONS.c.id)
        .cte("a")
    )


def _finish(action: CTE, name: str) -> CTE:
    """The open event ``:ev`` of ``action`` finished (result, traceback, details bound)."""
    return (
        update(EVENTS)
        .where(
            EVENTS.c.action_id == select(action.c.id).scalar_subquery(),
            EVENTS.c.event == bindparam("ev"),
            EVENTS.c.finish_time.is_(None),
        )
        .values(
            finish_time=bindparam("now"),
            result=bindparam("res"),
            traceback=bindparam("tb"),
            details=bindparam("why"),
        )
        .cte(name)
    )


def _notify(count: int, guard: CTE) -> CTE:
    """``count`` notifications (bound as ``n<i>_<key>``) inserted in order, if ``guard`` found
    its row."""
    rows = [
        select(*[_bind(NOTIFICATIONS, f"n{i}_", k) for k in NOTIFICATION_KEYS]).where(
            exists(select(guard.c.id))
        )
        for i in range(count)
    ]
    source = rows[0] if count == 1 else union_all(*rows)
    return insert(NOTIFICATIONS).from_select(list(NOTIFICATION_KEYS), source).cte("n")


def notification_params(index: int, values: dict[str, Any]) -> dict[str, Any]:
    return {f"n{index}_{k}": v for k, v in values.items()}


@functools.lru_cache(maxsize=16)
def start_event(notifications: int, after: bool) -> dbapi.Statement:
    """Store.start_event as one statement: touch the action (``:rid``, ``:now``), finish the
    event before (``:ev`` with ``:res``, ``:tb``, ``:why``), insert ``notifications``, and
    start ``:event`` on ``:host`` unless it is already open. Returns the action's id."""
    action = _touch(finish=False)
    parts: list[CTE] = []
    if after:
        parts.append(_finish(action, "f"))
    if notifications:
        parts.append(_notify(notifications, action))
    started = start_unless_open(action.c.id).cte("e")
    return dbapi.Statement(select(action.c.id).add_cte(*parts, started))


def start_unless_open(action_id: ColumnElement[Any]) -> Insert:
    """The INSERT that starts ``:event`` on ``:host`` at ``:now`` for ``action_id`` unless
    that event is already open (a resumed job's). SQLite runs it as a statement of its own
    (with ``action_id`` bound); here it is a part of :func:`start_event`."""
    already = select(EVENTS.c.id).where(
        EVENTS.c.action_id == action_id,
        EVENTS.c.event == bindparam("event"),
        EVENTS.c.finish_time.is_(None),
    )
    return insert(EVENTS).from_select(
        ["action_id", "event", "start_time", "host"],
        select(
            action_id,
            bindparam("event", type_=EVENTS.c.event.type),
            bindparam("now", type_=EVENTS.c.start_time.type),
            bindparam("host", type_=EVENTS.c.host.type),
        ).where(~exists(already)),
    )


@functools.lru_cache(maxsize=8)
def finish_event(finish_action: bool, notification: bool) -> dbapi.Statement:
    """Store.finish_event as one statement: touch (or finish) the action, finish ``:ev``,
    insert the notification. Returns the action's id."""
    action = _touch(finish=finish_action)
    parts = [_finish(action, "f")]
    if notification:
        parts.append(_notify(1, action))
    return dbapi.Statement(select(action.c.id).add_cte(*parts))


@functools.lru_cache(maxsize=64)
def swap_with(
    swap: dbapi.Statement,
    *,
    new_action: tuple[str, ...] | None,
    devices: tuple[tuple[str, ...], ...],
    job: bool,
    end_event: bool,
    fault: bool,
) -> dbapi.Statement:
    """Store.transition as one statement: the compare-and-swap ``swap`` (an UPDATE ...
    RETURNING the server), and only if it matched: the new action (its columns bound as
    ``a_<key>``), each block device's changes (``b<i>_<key>``, ``:b<i>_id``), the job's
    state (``:rid``, ``:j_state``; with ``end_event`` also the action's finish and
    ``:ev``'s, as success), and the fault (``f_<key>``, the server's host). Returns the
    server's row, and with ``end_event`` the action's id as ``ended`` (None if no action)."""
    assert isinstance(swap.core, Update)
    server = swap.core.cte("s")
    found = exists(select(server.c.id))
    parts: list[CTE] = []
    if new_action is not None:
        values = select(*[_bind(ACTIONS, "a_", k) for k in new_action]).where(found)
        parts.append(insert(ACTIONS).from_select(list(new_action), values).cte("x"))
    for i, keys in enumerate(devices):
        parts.append(
            update(DEVICES)
            .where(
                DEVICES.c.id == bindparam(f"b{i}_id"),
                DEVICES.c.server_id == bindparam("server_id"),
                found,
            )
            .values({k: _bind(DEVICES, f"b{i}_", k) for k in keys})
            .cte(f"b{i}")
        )
    extra: list[ColumnElement[Any]] = []
    if job:
        state: dict[str, Any] = {"updated_at": bindparam("now"), "job_state": bindparam("j_state")}
        if end_event:
            state["finish_time"] = bindparam("now")
        ended = (
            update(ACTIONS)
            .where(ACTIONS.c.request_id == bindparam("rid"), found)
            .values(state)
            .returning(ACTIONS.c.id)
            .cte("j")
        )
        parts.append(ended)
        if end_event:
            parts.append(_finish(ended, "f"))
            extra.append(select(ended.c.id).scalar_subquery().label("ended"))
    if fault:
        values = select(*[_bind(FAULTS, "f_", k) for k in FAULT_KEYS], server.c.host)
        parts.append(insert(FAULTS).from_select([*FAULT_KEYS, "host"], values).cte("fault"))
    return dbapi.Statement(select(*server.c, *extra).add_cte(*parts))
