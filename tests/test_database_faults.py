"""Database faults during jobs: SQLite locked by another process, PostgreSQL backends
terminated, a write failing at a job's end, the disk under the state dir full.

After each fault clears, within a bound and without a restart: no server has a task_state,
every action and every event is finished, every disk a live server records exists and no disk
file is left that no server records; meanwhile the API answered every request (409 or 503
where it had to, with Retry-After on a 503), never a 500 and never a dropped connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy
from sqlalchemy.ext.asyncio import create_async_engine

from rebuildd import errors
from rebuildd.storage import ServerFilters, Store
from tests.live import LiveDaemon, start_live_daemon
from tests.test_rollback import FaultyHypervisor

SETTLE_LIMIT = 60.0  # an upper bound for the jobs to end after a fault clears
_LOCKER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=60)
conn.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.readline()
conn.execute("ROLLBACK")
"""


class Hold:
    """A step observer that holds a job before one step until released, then lets it run or
    fails it there (a test hook: the fault is set up while the job waits)."""

    def __init__(self, step: str, job: str = "rebuild") -> None:
        self.step, self.job = step, job
        self.reached = threading.Event()
        self.release = threading.Event()
        self.fail = False

    async def before_step(self, job: str, step: str, server_id: str) -> None:
        if (job, step) != (self.job, self.step):
            return
        self.reached.set()
        while not self.release.is_set():
            await asyncio.sleep(0.01)
        if self.fail:
            raise errors.HypervisorError(call="start", reason="injected by the test")

    async def after_step(self, job: str, step: str, server_id: str) -> None:
        return None


@contextlib.contextmanager
def sqlite_locked(db: Path) -> Iterator[None]:
    """Another process holds ``BEGIN EXCLUSIVE`` on the database until the block ends."""
    locker = subprocess.Popen(
        [sys.executable, "-c", _LOCKER, str(db)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert locker.stdout is not None and locker.stdout.readline().strip() == "locked"
        yield
    finally:
        assert locker.stdin is not None
        locker.stdin.write("\n")
        locker.stdin.flush()
        locker.wait(timeout=30)


def _rebuild(live: LiveDaemon, server_id: str, client: httpx.Client | None = None) -> int:
    body = {"rebuild": {"imageRef": live.image_ids[1]}}
    response = (client or live.client).post(f"/v2.1/servers/{server_id}/action", json=body)
    _answered(response)
    return response.status_code


def _answered(response: httpx.Response) -> None:
    """A fault the API had to give is a 409 or a 503 with Retry-After, never a 500."""
    assert response.status_code < 500 or response.status_code == 503, response.text
    if response.status_code == 503:
        assert response.headers["retry-after"].isdigit()
        assert "serviceUnavailable" in response.json()


async def _records(store: Store) -> tuple[list[str], set[str], list[str]]:
    """What the database says is unfinished; the disk paths live servers record; every
    server's id."""
    found: list[str] = []
    servers = await store.list_servers(ServerFilters(include_deleted=True))
    for server in servers:
        if server.task_state is not None:
            found.append(f"server {server.id} in task_state {server.task_state}")
        for listed in await store.list_actions(server.id):
            action = await store.get_action(server.id, listed.request_id)
            if action.finish_time is None or action.job_state in ("running", "cleaning"):
                found.append(f"action {action.action} {action.request_id} {action.job_state}")
            found += [
                f"event {e.event} of {action.action} open"
                for e in action.events
                if not e.finish_time
            ]
    return found, await store.paths_in_use(), [s.id for s in servers]


def _problems(live: LiveDaemon) -> list[str]:
    try:
        records: tuple[list[str], set[str], list[str]] = live.run(_records(live.daemon.store))
    except errors.DatabaseUnavailable as exc:
        return [exc.message]
    found, in_use, server_ids = records
    found += [f"disk {p} of a live server is gone" for p in in_use if not Path(p).exists()]
    for server_id in server_ids:
        folder = live.settings.state_dir / "instances" / server_id
        if folder.is_dir():
            found += [
                f"orphaned {f}" for f in folder.iterdir() if f.is_file() and str(f) not in in_use
            ]
    return found


def settled(live: LiveDaemon) -> None:
    """Within the bound, the invariant holds (a database still refusing counts as not yet)."""
    deadline = time.monotonic() + SETTLE_LIMIT
    while problems := _problems(live):
        assert time.monotonic() < deadline, problems
        time.sleep(0.1)


class TestSqliteLocked:
    def test_a_lock_held_by_another_process_answers_503_and_rebuilds_end(
        self, tmp_path: Path
    ) -> None:
        """While another process holds BEGIN EXCLUSIVE, reads answer, a rebuild request gets
        503 with Retry-After (not a 500 after a frozen loop), a rebuild in flight waits; after
        the lock goes every rebuild ends and its action and events are finished."""
        hold = Hold("power_off")
        live = start_live_daemon(tmp_path, observer=hold)
        try:
            busy, other = live.create_server("busy"), live.create_server("other")
            assert _rebuild(live, busy) == 202
            assert hold.reached.wait(30)
            with sqlite_locked(tmp_path / "rebuildd.db"):
                hold.release.set()
                assert live.server(other)["status"] == "ACTIVE"
                response = live.client.post(
                    f"/v2.1/servers/{other}/action",
                    json={"rebuild": {"imageRef": live.image_ids[1]}},
                )
                assert response.status_code == 503, response.text
                _answered(response)
                assert live.server(busy)["OS-EXT-STS:task_state"] is not None
            settled(live)
            assert live.server(busy)["image"]["id"] == live.image_ids[1]
            assert _rebuild(live, other) == 202
            settled(live)
        finally:
            live.stop()

    @pytest.mark.parametrize("fail", [False, True], ids=["success", "failure"])
    def test_a_write_failing_at_a_jobs_end_is_retried(self, tmp_path: Path, fail: bool) -> None:
        """The database refuses the last writes of a rebuild (its success, or its failure and
        rollback): the job waits for it, and ends once it answers, without a restart."""
        hold = Hold("restore_power_state")
        hold.fail = fail
        live = start_live_daemon(tmp_path, observer=hold)
        try:
            server_id = live.create_server()
            assert _rebuild(live, server_id) == 202
            assert hold.reached.wait(30)
            with sqlite_locked(tmp_path / "rebuildd.db"):
                hold.release.set()
                # Longer than a request waits (busy_wait) before its 503.
                time.sleep(live.daemon.store.busy_wait + 1)
                assert live.server(server_id)["status"] == "REBUILD"
            settled(live)
            server = live.server(server_id)
            # A failed rebuild is back on its old image, ACTIVE (or ERROR, as Nova shows it).
            assert server["status"] in (("ACTIVE", "ERROR") if fail else ("ACTIVE",))
            expected = live.image_ids[0] if fail else live.image_ids[1]
            assert server["image"]["id"] == expected
        finally:
            live.stop()


@pytest.mark.parametrize(
    ("job", "step"),
    [
        ("create", "define_domain"),
        ("stop", "power_off"),
        ("start", "start_domain"),
        ("delete", "remove_disks"),
    ],
)
def test_a_lock_during_a_lifecycle_job_is_waited_out(tmp_path: Path, job: str, step: str) -> None:
    """Another process locks the database while a create, stop, start or delete runs: reads
    still answer, the job waits for the lock and succeeds once it goes, without a restart."""
    hold = Hold(step, job=job)
    live = start_live_daemon(tmp_path, observer=hold)
    try:
        server_id = ""
        if job != "create":
            server_id = live.create_server()
        if job == "start":
            live.client.post(f"/v2.1/servers/{server_id}/action", json={"os-stop": None})
            live.wait_for(server_id, "SHUTOFF")
        if job == "create":
            body = {"server": {"name": "new", "imageRef": live.image_ids[0], "flavorRef": "1"}}
            response = live.client.post("/v2.1/servers", json=body)
        elif job == "delete":
            response = live.client.delete(f"/v2.1/servers/{server_id}")
        else:
            request = {"os-stop": None} if job == "stop" else {"os-start": None}
            response = live.client.post(f"/v2.1/servers/{server_id}/action", json=request)
        assert response.status_code in (202, 204), response.text
        server_id = server_id or response.json()["server"]["id"]
        assert hold.reached.wait(30)
        with sqlite_locked(tmp_path / "rebuildd.db"):
            hold.release.set()
            time.sleep(live.daemon.store.busy_wait + 1)
            # Reads answer while the job waits (the lock holds until they have).
            assert live.client.get(f"/v2.1/servers/{server_id}").status_code == 200
        settled(live)
        # The lock delayed the job's bookkeeping; it did not fail the job.
        if job == "delete":
            assert live.client.get(f"/v2.1/servers/{server_id}").status_code == 404
        else:
            assert live.server(server_id)["status"] == ("SHUTOFF" if job == "stop" else "ACTIVE")
    finally:
        live.stop()


def test_delete_takes_a_server_no_job_holds(tmp_path: Path) -> None:
    """A server left in a task_state by a job that no longer runs is deleted, and the
    abandoned action ends as failed."""
    live = start_live_daemon(tmp_path)
    try:
        server_id = live.create_server()
        store = live.daemon.store

        async def wedge() -> None:
            from rebuildd.models import NewAction

            await store.transition(
                server_id,
                action="rebuild",
                expected_task_state=(None,),
                task_state="rebuilding",
                new_action=NewAction("rebuild", "req-wedged", "u", "p", params={}),
            )
            await store.start_event("req-wedged", "rebuild_server", "host")

        live.run(wedge())
        assert live.server(server_id)["status"] == "REBUILD"
        # 409 for a moment (an api stage may be about to submit its job), then taken.
        deadline = time.monotonic() + SETTLE_LIMIT
        while (response := live.client.delete(f"/v2.1/servers/{server_id}")).status_code == 409:
            assert time.monotonic() < deadline, response.text
            time.sleep(0.2)
        assert response.status_code == 204, response.text
        settled(live)
        assert live.client.get(f"/v2.1/servers/{server_id}").status_code == 404
        action = live.run(store.get_action(server_id, "req-wedged"))
        assert action.job_state == "failed"
    finally:
        live.stop()


@contextlib.contextmanager
def backends_terminated(postgres_url: str) -> Iterator[list[int]]:
    """Every backend of the database terminated every 0.3 s until the block ends; yields the
    list of how many each round terminated."""
    name = postgres_url.rsplit("/", 1)[1]
    stop = threading.Event()
    killed: list[int] = []

    async def terminate() -> None:
        admin = create_async_engine(
            postgres_url.rsplit("/", 1)[0] + "/postgres", isolation_level="AUTOCOMMIT"
        )
        kill = sqlalchemy.text(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = :name AND pid <> pg_backend_pid()"
        )
        try:
            async with admin.connect() as conn:
                while not stop.is_set():
                    killed.append(int((await conn.execute(kill, {"name": name})).scalar_one()))
                    await asyncio.sleep(0.3)
        finally:
            await admin.dispose()

    killer = threading.Thread(target=lambda: asyncio.run(terminate()))
    killer.start()
    try:
        yield killed
    finally:
        stop.set()
        killer.join(timeout=30)


class TestPostgresBackendsTerminated:
    def test_rebuilds_under_terminated_backends_all_end(
        self, tmp_path: Path, postgres_url: str
    ) -> None:
        """Every backend of the database is terminated again and again while servers
        rebuild: every request is answered (202, 409 or 503, never a 500 or a reset), and
        once it stops every job ends with its action and events finished."""
        live = start_live_daemon(tmp_path, database_url=postgres_url)
        try:
            servers = [live.create_server(f"vm{i}") for i in range(4)]
            with backends_terminated(postgres_url) as killed:
                codes = _storm(live, servers, seconds=8)
            assert sum(killed) > 0
            assert 202 in codes
            settled(live)
            for server_id in servers:
                assert live.server(server_id)["status"] == "ACTIVE"
        finally:
            live.stop()

    def test_create_stop_start_delete_under_terminated_backends_all_end(
        self, tmp_path: Path, postgres_url: str
    ) -> None:
        """Servers are created, stopped, started and deleted while every backend is
        terminated again and again: every request is answered (never a 500 or a reset), and
        once it stops no server is left in a task_state and every action has ended."""
        live = start_live_daemon(tmp_path, database_url=postgres_url)
        body = {"server": {"name": "x", "imageRef": live.image_ids[0], "flavorRef": "1"}}
        made: list[str] = []
        try:
            with (
                backends_terminated(postgres_url) as killed,
                httpx.Client(base_url=live.url, timeout=60) as client,
            ):
                deadline = time.monotonic() + 8
                while time.monotonic() < deadline:
                    response = client.post("/v2.1/servers", json=body)
                    _answered(response)
                    if response.status_code == 202:
                        made.append(response.json()["server"]["id"])
                    for server_id in made:
                        for request in ({"os-stop": None}, {"os-start": None}):
                            _answered(
                                client.post(f"/v2.1/servers/{server_id}/action", json=request)
                            )
                    if len(made) > 2:
                        _answered(client.delete(f"/v2.1/servers/{made.pop(0)}"))
                    time.sleep(0.05)
            assert sum(killed) > 0 and made
            settled(live)
        finally:
            live.stop()


def _storm(live: LiveDaemon, servers: list[str], *, seconds: float) -> set[int]:
    """Rebuild requests and reads of every server for ``seconds``; every one must be answered
    (a dropped connection raises here). Returns the status codes seen."""
    codes: set[int] = set()
    deadline = time.monotonic() + seconds
    with httpx.Client(base_url=live.url, timeout=60) as client:
        while time.monotonic() < deadline:
            for server_id in servers:
                codes.add(_rebuild(live, server_id, client))
                response = client.get(f"/v2.1/servers/{server_id}")
                _answered(response)
                codes.add(response.status_code)
            time.sleep(0.05)
    return codes


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str = "64m") -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``where`` (as root), unmounted after the block."""
    where.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        check=False,
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _fill(filler: Path) -> None:
    """Write zeros into ``filler`` until the file system is full."""
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 20, 4096, 1):
            with contextlib.suppress(OSError):
                while os.write(fd, b"\0" * size):
                    pass
    finally:
        os.close(fd)


def test_a_full_state_dir_fails_the_rebuild_and_it_ends(tmp_path: Path) -> None:
    """The state dir's file system fills up in the middle of a rebuild: the rebuild fails
    (its disk cannot be made) and rolls back, every request meanwhile is answered (no 500),
    and once space is freed the job has ended with its action and events finished."""
    hold = Hold("create_local_disks")
    with small_tmpfs(tmp_path / "state") as state:
        live = start_live_daemon(state, observer=hold)
        try:
            server_id, other = live.create_server("full"), live.create_server("other")
            assert _rebuild(live, server_id) == 202
            assert hold.reached.wait(30)
            filler = state / "filler"
            _fill(filler)
            hold.release.set()
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                _rebuild(live, other)
                for each in (server_id, other):
                    _answered(live.client.get(f"/v2.1/servers/{each}"))
                time.sleep(0.1)
            filler.unlink()
            settled(live)
            assert live.server(server_id)["image"]["id"] == live.image_ids[0]
            actions = live.client.get(f"/v2.1/servers/{server_id}/os-instance-actions").json()
            request_id = actions["instanceActions"][0]["request_id"]
            action = live.client.get(
                f"/v2.1/servers/{server_id}/os-instance-actions/{request_id}",
                headers={"OpenStack-API-Version": "compute 2.51"},
            ).json()["instanceAction"]
            assert "Error" in [e["result"] for e in action["events"]]
        finally:
            live.stop()


def test_a_failure_outcome_that_fails_still_ends_the_job(tmp_path: Path) -> None:
    """A stop fails, and so does reading the power state for its failed outcome: the job
    still ends, with its fault recorded and no task_state."""
    holder: dict[str, FaultyHypervisor] = {}

    def port(real: Any) -> FaultyHypervisor:
        holder["hv"] = FaultyHypervisor(real)
        return holder["hv"]

    live = start_live_daemon(tmp_path, hypervisor_port=port)
    try:
        server_id = live.create_server()
        holder["hv"].arm(power_off=1, power_state=1)
        response = live.client.post(f"/v2.1/servers/{server_id}/action", json={"os-stop": None})
        assert response.status_code == 202, response.text
        settled(live)
        actions = live.run(live.daemon.store.list_actions(server_id))
        stop = live.run(live.daemon.store.get_action(server_id, actions[0].request_id))
        assert (stop.action, stop.job_state) == ("stop", "rolled_back")
        assert [e.result for e in stop.events] == ["Error"]
    finally:
        live.stop()


def test_start_and_delete_of_a_server_whose_domain_vanished(tmp_path: Path) -> None:
    """A stopped server whose domain was undefined behind the daemon's back: its start
    fails and ends (never stuck powering-on), and its delete succeeds, disks and all, as
    Nova's delete of an instance whose domain is gone does."""
    libvirt = pytest.importorskip("libvirt")
    live = start_live_daemon(tmp_path)
    try:
        server_id = live.create_server()
        live.client.post(f"/v2.1/servers/{server_id}/action", json={"os-stop": None})
        live.wait_for(server_id, "SHUTOFF")
        conn = libvirt.open("test:///default")
        try:
            conn.lookupByUUIDString(server_id).undefine()
        finally:
            conn.close()
        response = live.client.post(f"/v2.1/servers/{server_id}/action", json={"os-start": None})
        assert response.status_code == 202, response.text
        settled(live)
        response = live.client.delete(f"/v2.1/servers/{server_id}")
        assert response.status_code == 204, response.text
        settled(live)
        assert live.client.get(f"/v2.1/servers/{server_id}").status_code == 404
        assert not (tmp_path / "instances" / server_id).exists()
    finally:
        live.stop()
