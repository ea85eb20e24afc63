"""The Store's hot statements on the raw DB-API connection (rebuildd/dbapi.py)."""

from __future__ import annotations

import sqlite3
import uuid
from typing import Any

import pytest
from sqlalchemy import bindparam, select
from sqlalchemy.dialects import sqlite

from rebuildd import dbapi, records
from rebuildd.models import Flavor, Image, NewAction, utcnow
from rebuildd.states import TaskState
from rebuildd.storage import SERVERS, Store
from rebuildd.tables import InstanceActionRow
from tests.test_store import _action, _add


class TestStatement:
    def test_an_expanding_in_list_is_refused(self) -> None:
        """A statement whose IN list would expand at execution cannot be precompiled."""
        statement = dbapi.Statement(select(SERVERS.c.id).where(SERVERS.c.id.in_(["a", "b"])))
        with pytest.raises(ValueError, match="expanding"):
            statement.compiled(sqlite.dialect())

    def test_values_go_through_sqlalchemys_bind_and_result_processors(self) -> None:
        """A JSON column is sent as SQLAlchemy serialises it and read back as it parses it."""
        statement = dbapi.Statement(
            select(SERVERS.c.flavor.label("flavor")).where(SERVERS.c.id == bindparam("id"))
        )
        compiled = statement.compiled(sqlite.dialect())
        conn = sqlite3.connect(":memory:")
        conn.execute("CREATE TABLE servers (id TEXT, flavor TEXT)")
        conn.execute("""INSERT INTO servers VALUES ('s', '{"ram": 512}')""")
        tx = dbapi.SqliteTx(conn, sqlite.dialect())
        row = dbapi.run_now(tx.first(statement, {"id": "s"}))
        assert row is not None and row.flavor == {"ram": 512}
        assert compiled.args({"id": "s"}) == ["s"]


class TestRunNow:
    def test_work_that_suspends_is_refused(self) -> None:
        """A SQLite transaction's work must finish without yielding to the event loop."""

        async def suspends() -> None:
            import asyncio

            await asyncio.sleep(0)

        with pytest.raises(RuntimeError, match="suspended"):
            dbapi.run_now(suspends())


class TestTransactions:
    async def test_a_failed_statement_rolls_back_the_swap_before_it(self, store: Store) -> None:
        """When the action insert fails (a duplicate request id), the compare-and-swap that
        ran before it in the same transaction is not committed."""
        server = await _add(store)
        other = await _add(store)
        action = _action("rebuild")
        changes: dict[str, Any] = {"name": "renamed"}
        await store.transition(
            other.id,
            action="rebuild",
            expected_task_state=(None,),
            task_state=TaskState.REBUILDING,
            new_action=action,
        )
        with pytest.raises(Exception, match=r"(?i)unique|duplicate"):
            await store.transition(
                server.id,
                action="rebuild",
                expected_task_state=(None,),
                task_state=TaskState.REBUILDING,
                changes=changes,
                new_action=action,
            )
        after = await store.get_server(server.id)
        assert (after.task_state, after.name) == (None, "vm")


class TestHotReads:
    async def test_flavors_images_and_devices_read_back_as_written(self, store: Store) -> None:
        """Every column type the hot reads return (floats, JSON, booleans, times) comes back
        as it went in, on both databases."""
        flavor = Flavor(id="f1", name="m1.x", vcpus=2, ram=1024, disk=5, rxtx_factor=1.5)
        await store.create_flavor(flavor)
        now = utcnow()
        image = Image(
            id=str(uuid.uuid4()),
            name="img",
            status="active",
            disk_format="qcow2",
            container_format="bare",
            size=1,
            virtual_size=None,
            checksum=None,
            os_hash_algo=None,
            os_hash_value=None,
            min_disk=0,
            min_ram=0,
            visibility="public",
            protected=True,
            owner=None,
            properties={"os_distro": "x"},
            created_at=now,
            updated_at=now,
        )
        await store.create_image(image)
        server = await _add(store)
        assert await store.get_flavor("f1") == flavor
        assert await store.get_image(image.id) == image
        assert [d.device_name for d in await store.get_block_devices(server.id)] == ["vda"]


class TestRecords:
    def test_action_values_are_the_rows_with_its_defaults(self) -> None:
        """The plain values an action is inserted with are those of its SQLModel row."""
        now = utcnow()
        for action in (
            NewAction("rebuild", "req-1", "u", "p", params={"image_id": "i"}, idempotency_key="k"),
            NewAction("lock", "req-2", "u", "p", message="why"),
        ):
            row = InstanceActionRow(
                server_id="s",
                action=action.action,
                request_id=action.request_id,
                user_id=action.user_id,
                project_id=action.project_id,
                message=action.message,
                start_time=now,
                updated_at=now,
                job_state="running" if action.params is not None else None,
                job_params=action.params,
                journal={} if action.params is not None else None,
                idempotency_key=action.idempotency_key,
            )
            expected = {name: getattr(row, name) for name in InstanceActionRow.model_fields}
            assert records.action_values("s", action, now) == expected
