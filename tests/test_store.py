"""The Store on SQLite and on PostgreSQL, after real migrations: the task_state compare-and-swap."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from rebuildd import errors, migrations
from rebuildd.models import BlockDevice, Fault, Flavor, NewAction, Notification, Server, utcnow
from rebuildd.states import PowerState, TaskState, VmState
from rebuildd.storage import ServerFilters, Store, create_engine
from tests.conftest import POSTGRES_ADMIN_URL

FLAVOR = Flavor(id="1", name="m1.tiny", vcpus=1, ram=512, disk=1)


def _server(**overrides: object) -> Server:
    server_id = str(uuid.uuid4())
    now = utcnow()
    values: dict[str, object] = dict(
        id=server_id,
        name="vm",
        project_id="p",
        user_id="u",
        image_ref=str(uuid.uuid4()),
        flavor=FLAVOR,
        vm_state=VmState.ACTIVE,
        task_state=None,
        power_state=PowerState.RUNNING,
        host="h",
        node="h",
        domain_name=f"rebuildd-{server_id}",
        hostname="vm",
        metadata={},
        key_name=None,
        key_data=None,
        user_data=None,
        description=None,
        access_ip_v4="",
        access_ip_v6="",
        auto_disk_config=False,
        locked=False,
        locked_reason=None,
        config_drive=False,
        progress=0,
        launched_at=now,
        terminated_at=None,
        created_at=now,
        updated_at=now,
    )
    values.update(overrides)
    return Server(**values)  # type: ignore[arg-type]


def _action(name: str = "create") -> NewAction:
    return NewAction(name, f"req-{uuid.uuid4()}", "u", "p")


async def _add(store: Store, **overrides: object) -> Server:
    server = _server(**overrides)
    root = BlockDevice(
        id=str(uuid.uuid4()),
        server_id=server.id,
        boot_index=0,
        source_type="image",
        destination_type="local",
        device_name="vda",
        image_id=server.image_ref,
        volume_id=None,
        path=f"/tmp/{server.id}/root.qcow2",
        disk_bus="virtio",
        device_type="disk",
    )
    await store.create_server(server, [root], _action())
    return server


async def _rebuilding(store: Store, task_state: str) -> tuple[Server, NewAction]:
    """A new server whose rebuild job has begun: in ``task_state``, with its action."""
    server = await _add(store)
    action = NewAction("rebuild", f"req-{uuid.uuid4()}", "u", "p", params={})
    await store.transition(
        server.id,
        action="rebuild",
        expected_task_state=(None,),
        task_state=task_state,
        new_action=action,
    )
    return server, action


class TestTransition:
    async def test_moves_task_state_and_records_the_action(self, store: Store) -> None:
        """A matching compare-and-swap changes task_state and fields, and records the action."""
        server = await _add(store)
        action = _action("rebuild")
        updated = await store.transition(
            server.id,
            action="rebuild",
            expected_task_state=(None,),
            expected_vm_state=(VmState.ACTIVE,),
            task_state=TaskState.REBUILDING,
            changes={"name": "new"},
            new_action=action,
        )
        assert (updated.task_state, updated.name) == (TaskState.REBUILDING, "new")
        assert (await store.get_server(server.id)).task_state == TaskState.REBUILDING
        recorded = await store.get_action(server.id, action.request_id)
        assert recorded.action == "rebuild"

    async def test_a_stale_expectation_is_a_conflict_and_changes_nothing(
        self, store: Store
    ) -> None:
        """When task_state differs, nothing is written and InstanceInvalidState names it."""
        server = await _add(store, task_state=TaskState.REBUILDING)
        action = _action("rebuild")
        with pytest.raises(errors.InstanceInvalidState) as caught:
            await store.transition(
                server.id,
                action="rebuild",
                expected_task_state=(None,),
                task_state=TaskState.REBUILDING,
                changes={"name": "other"},
                new_action=action,
            )
        assert caught.value.message == (
            f"Cannot 'rebuild' instance {server.id} while it is in task_state rebuilding"
        )
        assert (await store.get_server(server.id)).name == "vm"
        with pytest.raises(errors.ActionNotFound):
            await store.get_action(server.id, action.request_id)

    async def test_a_vm_state_mismatch_names_the_vm_state(self, store: Store) -> None:
        """An unexpected vm_state is reported as such (Nova's message)."""
        server = await _add(store, vm_state=VmState.BUILDING, task_state=TaskState.SPAWNING)
        with pytest.raises(errors.InstanceInvalidState, match="vm_state building"):
            await store.transition(
                server.id,
                action="rebuild",
                expected_task_state=(None, TaskState.SPAWNING),
                expected_vm_state=(VmState.ACTIVE,),
                task_state=TaskState.REBUILDING,
            )

    async def test_unknown_server_is_not_found(self, store: Store) -> None:
        """A compare-and-swap on a missing server is ServerNotFound, not a conflict."""
        with pytest.raises(errors.ServerNotFound):
            await store.transition(
                str(uuid.uuid4()), action="rebuild", expected_task_state=(None,), task_state=None
            )

    async def test_exactly_one_of_many_concurrent_swaps_wins(self, store: Store) -> None:
        """Thirty simultaneous None -> rebuilding swaps: one wins, the rest conflict."""
        server = await _add(store)

        async def attempt() -> bool:
            try:
                await store.transition(
                    server.id,
                    action="rebuild",
                    expected_task_state=(None,),
                    task_state=TaskState.REBUILDING,
                    new_action=_action("rebuild"),
                )
            except errors.InstanceInvalidState:
                return False
            return True

        results = await asyncio.gather(*(attempt() for _ in range(30)))
        assert results.count(True) == 1
        assert len(await store.list_actions(server.id)) == 2  # create + the one rebuild

    async def test_fault_and_block_devices_change_with_the_state(self, store: Store) -> None:
        """A final swap writes its fault and block-device changes in the same transaction."""
        server = await _add(store, task_state=TaskState.REBUILD_SPAWNING)
        root = (await store.get_block_devices(server.id))[0]
        fault = Fault(500, "boom", "trace", utcnow())
        await store.transition(
            server.id,
            action="rebuild",
            expected_task_state=(TaskState.REBUILD_SPAWNING,),
            task_state=None,
            changes={"vm_state": VmState.ERROR},
            fault=fault,
            block_device_changes={root.id: {"path": "/new/root.qcow2"}},
        )
        assert (await store.latest_faults([server.id]))[server.id].message == "boom"
        assert (await store.get_block_devices(server.id))[0].path == "/new/root.qcow2"

    async def test_starting_an_open_event_again_is_a_no_op(self, store: Store) -> None:
        """A resumed job starts its stage's event again: while that event is open nothing is
        added; once it finished, a new one starts."""
        server, action = await _rebuilding(store, TaskState.REBUILDING)
        await store.start_event(action.request_id, "rebuild_server", "h")
        await store.start_event(action.request_id, "rebuild_server", "h")
        events = (await store.get_action(server.id, action.request_id)).events
        assert [(e.event, e.finish_time) for e in events] == [("rebuild_server", None)]
        await store.start_event(
            action.request_id, "compute_rebuild_instance", "h", after="rebuild_server"
        )
        await store.start_event(action.request_id, "compute_rebuild_instance", "h")
        events = (await store.get_action(server.id, action.request_id)).events
        assert sorted((e.event, e.finish_time is None, e.result) for e in events) == [
            ("compute_rebuild_instance", True, None),
            ("rebuild_server", False, "Success"),
        ]
        await store.finish_event(action.request_id, "compute_rebuild_instance", result="Error")
        await store.start_event(action.request_id, "compute_rebuild_instance", "h")
        events = (await store.get_action(server.id, action.request_id)).events
        assert sorted((e.event, e.finish_time is None) for e in events) == [
            ("compute_rebuild_instance", False),
            ("compute_rebuild_instance", True),
            ("rebuild_server", False),
        ]

    async def test_a_jobs_last_swap_ends_its_action_event_and_notification_with_it(
        self, store: Store
    ) -> None:
        """With ``end_event``, the final swap also finishes the job's action and that event
        and writes the notification built from the swapped server, in one transaction; a swap
        that does not match writes none of them."""
        server, action = await _rebuilding(store, TaskState.REBUILD_SPAWNING)
        await store.start_event(action.request_id, "compute_rebuild_instance", "h")

        def note(swapped: Server) -> Notification:
            return Notification(
                "instance.rebuild.end",
                "INFO",
                "compute.h",
                swapped.id,
                {"task": swapped.task_state},
            )

        for expected in (TaskState.REBUILDING, TaskState.REBUILD_SPAWNING):
            with contextlib.suppress(errors.InstanceInvalidState):
                await store.transition(
                    server.id,
                    action="rebuild",
                    expected_task_state=(expected,),
                    task_state=None,
                    job=(action.request_id, "done"),
                    end_event="compute_rebuild_instance",
                    notification=note,
                )
            recorded = await store.get_action(server.id, action.request_id)
            ended = expected == TaskState.REBUILD_SPAWNING
            assert (recorded.finish_time is not None, recorded.job_state) == (
                (True, "done") if ended else (False, "running")
            )
            assert recorded.events[0].result == ("Success" if ended else None)
            outbox = await store.list_notifications(server.id)
            assert outbox == ([("instance.rebuild.end", "INFO", {"task": None})] if ended else [])

    async def test_a_cancelled_caller_sees_the_swap_it_started_finish(self, store: Store) -> None:
        """Cancelling a caller mid-swap never cuts the transaction short: the caller gets its
        result or CancelledError, and either way the swap it started is whole."""
        server = await _add(store)
        task = asyncio.create_task(
            store.transition(
                server.id,
                action="rebuild",
                expected_task_state=(None,),
                task_state=TaskState.REBUILDING,
                new_action=_action("rebuild"),
            )
        )
        await asyncio.sleep(0)  # the swap has been handed to the database
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task  # SQLite runs the swap inline, so it may have finished already
        assert (await store.get_server(server.id)).task_state == TaskState.REBUILDING
        assert len(await store.list_actions(server.id)) == 2

    async def test_task_state_cannot_be_smuggled_in_changes(self, store: Store) -> None:
        """task_state is written only as the swap's target, never through ``changes``."""
        server = await _add(store)
        with pytest.raises(ValueError, match="bad server changes"):
            await store.transition(
                server.id,
                action="x",
                expected_task_state=(None,),
                task_state=None,
                changes={"task_state": "rebuilding"},
            )


class TestQueries:
    async def test_list_filters_by_status_and_pages_by_marker(self, store: Store) -> None:
        """?status=REBUILD finds servers in any rebuild task state; markers page newest first."""
        a = await _add(store)
        b = await _add(store, task_state=TaskState.REBUILD_SPAWNING)
        c = await _add(store, vm_state=VmState.STOPPED, task_state=TaskState.REBUILDING)
        from rebuildd.states import states_for_status

        rebuilding = await store.list_servers(ServerFilters(states=states_for_status("REBUILD")))
        assert {s.id for s in rebuilding} == {b.id, c.id}
        active = await store.list_servers(ServerFilters(states=states_for_status("ACTIVE")))
        assert [s.id for s in active] == [a.id]
        first = await store.list_servers(ServerFilters(limit=2))
        rest = await store.list_servers(ServerFilters(limit=2, marker=first[-1].id))
        assert [s.id for s in first + rest] == [c.id, b.id, a.id]

    async def test_every_status_filter_lists_the_servers_showing_it(self, store: Store) -> None:
        """Each status Nova filters by finds exactly the servers that show it, BUILD (whose
        vm_state shows it whatever the task_state) included, with and without other filters."""
        from rebuildd.states import states_for_status, status_from_state

        servers = [
            await _add(store, vm_state=VmState.BUILDING, task_state=TaskState.SPAWNING),
            await _add(store),
            await _add(store, task_state=TaskState.REBUILDING),
            await _add(store, vm_state=VmState.STOPPED, power_state=PowerState.SHUTDOWN),
            await _add(store, vm_state=VmState.ERROR),
        ]
        for status in ("BUILD", "ACTIVE", "REBUILD", "SHUTOFF", "ERROR"):
            expected = {
                s.id for s in servers if status_from_state(s.vm_state, s.task_state) == status
            }
            assert expected, status
            for filters in (
                ServerFilters(states=states_for_status(status)),
                ServerFilters(states=states_for_status(status), project_id="p", limit=10),
            ):
                assert {s.id for s in await store.list_servers(filters)} == expected, status

    async def test_name_filter_is_a_case_sensitive_regex_with_literal_fallback(
        self, store: Store
    ) -> None:
        """``name`` is a regular expression (case-sensitive, as on Nova's PostgreSQL), plain
        text is a substring, an invalid pattern is matched literally, and ``limit`` counts
        matches only (newest first)."""
        names = ["Web-1", "web-2", "web-3", "db[1]", "100% web_"]
        for name in names:
            await _add(store, name=name)

        async def listed(pattern: str, limit: int | None = None) -> list[str]:
            found = await store.list_servers(ServerFilters(name=pattern, limit=limit))
            return [s.name for s in found]

        assert await listed("web") == ["100% web_", "web-3", "web-2"]
        assert await listed("^web-[0-9]$") == ["web-3", "web-2"]
        assert await listed("^web-[0-9]$", limit=1) == ["web-3"]
        assert await listed("db[1") == ["db[1]"]  # invalid: taken literally, as text
        assert await listed("db[1]") == []  # valid: a class, "db1" matches, "db[1]" does not
        assert await listed("% web_") == ["100% web_"]  # LIKE's wildcards stay literal
        assert await listed("(?i)^WEB-1$") == ["Web-1"]

    async def test_a_catastrophic_name_regex_is_refused_not_run_forever(self, store: Store) -> None:
        """A pattern that backtracks exponentially over a long name exhausts the filter's
        time budget and is refused with Invalid (400) rather than blocking the daemon."""
        await _add(store, name="a" * 40 + "!")
        with pytest.raises(errors.Invalid, match="took too long"):
            await store.list_servers(ServerFilters(name="(a|aa)+$"))

    async def test_round_trips_a_server_record(self, store: Store) -> None:
        """What goes in comes out: every field of the record, the flavor snapshot included."""
        server = await _add(store, metadata={"k": "v"}, description="d")
        loaded = await store.get_server(server.id)
        assert dataclasses.replace(loaded, updated_at=server.updated_at) == server


class TestPostgresConnections:
    async def test_a_connection_the_server_dropped_is_replaced(self, postgres_url: str) -> None:
        """After PostgreSQL drops every connection (as a restart does), the next read and
        write succeed on fresh connections: a transaction that failed on first use of a dead
        connection runs again."""
        await asyncio.to_thread(migrations.upgrade, postgres_url)
        store = Store(create_engine(postgres_url))
        admin = create_async_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
        try:
            server = await _add(store)
            async with admin.connect() as conn:
                killed = await conn.execute(
                    text(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE datname = :name AND pid <> pg_backend_pid()"
                    ),
                    {"name": postgres_url.rsplit("/", 1)[1]},
                )
                assert killed.scalar_one() >= 1
            assert (await store.get_server(server.id)).id == server.id
            await store.transition(
                server.id,
                action="rebuild",
                expected_task_state=(None,),
                task_state=TaskState.REBUILDING,
                new_action=_action("rebuild"),
            )
            assert (await store.get_server(server.id)).task_state == TaskState.REBUILDING
        finally:
            await admin.dispose()
            await store.close()
