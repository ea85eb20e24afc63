"""Concurrency: the task_state compare-and-swap lets exactly one of many rebuilds win; many
servers rebuild in parallel up to the limit; a rebuild never interleaves with a stop, start
or delete of the same server; a graceful shutdown rolls interrupted jobs back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.live import Gate, LiveDaemon, start_live_daemon


def test_200_concurrent_rebuilds_of_one_server_give_one_202(daemon: LiveDaemon) -> None:
    """200 simultaneous rebuild POSTs: exactly one 202, the rest 409 conflictingRequest."""
    server_id = daemon.create_server()
    body = {"rebuild": {"imageRef": daemon.image_ids[1]}}

    async def storm() -> list[int]:
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(base_url=daemon.url, timeout=60, limits=limits) as client:
            responses = await asyncio.gather(
                *(client.post(f"/v2.1/servers/{server_id}/action", json=body) for _ in range(200))
            )
        for response in responses:
            if response.status_code == 409:
                assert "conflictingRequest" in response.json()
        return [r.status_code for r in responses]

    codes = asyncio.run(storm())
    assert codes.count(202) == 1
    assert codes.count(409) == 199
    daemon.wait_for(server_id, "ACTIVE")
    actions = daemon.client.get(f"/v2.1/servers/{server_id}/os-instance-actions").json()
    assert [a["action"] for a in actions["instanceActions"]] == ["rebuild", "create"]


@pytest.fixture
def wide(tmp_path: Path) -> Iterator[LiveDaemon]:
    live = start_live_daemon(tmp_path, max_concurrent_operations=8, shutdown_timeout=0)
    try:
        yield live
    finally:
        live.stop()


def test_500_servers_rebuild_at_once_within_the_limit(wide: LiveDaemon) -> None:
    """500 servers rebuilt at once on the test driver all end ACTIVE on the new image, while
    no more than the configured 8 jobs ever ran together (the rest queued)."""
    count = 500
    body = {"server": {"name": "many", "imageRef": wide.image_ids[0], "flavorRef": "1"}}

    async def run() -> list[str]:
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(base_url=wide.url, timeout=120, limits=limits) as client:
            created = await asyncio.gather(
                *(client.post("/v2.1/servers", json=body) for _ in range(count))
            )
            assert {r.status_code for r in created} == {202}
            ids = [r.json()["server"]["id"] for r in created]
            await _until_all(client, ids, "ACTIVE")
            rebuild = {"rebuild": {"imageRef": wide.image_ids[1]}}
            answers = await asyncio.gather(
                *(client.post(f"/v2.1/servers/{i}/action", json=rebuild) for i in ids)
            )
            assert {r.status_code for r in answers} == {202}
            assert {r.json()["server"]["status"] for r in answers} == {"REBUILD"}
            await _until_all(client, ids, "ACTIVE")
            return ids

    ids = asyncio.run(run())
    runner = wide.daemon.services.deps.runner
    assert runner.peak == 8
    servers = wide.client.get("/v2.1/servers/detail", params={"limit": 1000}).json()["servers"]
    mine = [s for s in servers if s["id"] in set(ids)]
    assert len(mine) == count
    assert {s["image"]["id"] for s in mine} == {wide.image_ids[1]}
    assert {s["status"] for s in mine} == {"ACTIVE"}


async def _until_all(client: httpx.AsyncClient, ids: list[str], status: str) -> None:
    """Poll the brief list for servers still busy (a bound for a hung pipeline, not a speed
    assertion), then check every server reached ``status``."""
    deadline = time.monotonic() + 600
    busy = {"BUILD", "REBUILD"}
    while time.monotonic() < deadline:
        pending = [
            s
            for state in busy
            for s in (await client.get("/v2.1/servers", params={"status": state})).json()["servers"]
        ]
        if not pending:
            break
        await asyncio.sleep(0.2)
    page = (await client.get("/v2.1/servers/detail", params={"limit": 1000})).json()["servers"]
    reached = {
        s["id"] for s in page if s["status"] == status and s["OS-EXT-STS:task_state"] is None
    }
    assert set(ids) <= reached, f"{len(set(ids) - reached)} servers did not reach {status}"


class TestNoInterleaving:
    @pytest.mark.parametrize(
        ("method", "path", "body"),
        [
            ("post", "/action", {"os-stop": None}),
            ("post", "/action", {"os-start": None}),
            ("delete", "", None),
        ],
    )
    def test_stop_start_delete_during_a_rebuild_are_409(
        self, tmp_path: Path, method: str, path: str, body: object
    ) -> None:
        """While a rebuild runs, stop, start and delete of the server are refused with 409."""
        gate = Gate("detach_local_disks")
        live = start_live_daemon(tmp_path, observer=gate)
        try:
            server_id = live.create_server()
            live.client.post(
                f"/v2.1/servers/{server_id}/action",
                json={"rebuild": {"imageRef": live.image_ids[1]}},
            )
            assert gate.reached.wait(30)
            response = live.client.request(method, f"/v2.1/servers/{server_id}{path}", json=body)
            assert response.status_code == 409, response.text
            gate.release.set()
            server = live.wait_for(server_id, "ACTIVE")
            assert server["image"]["id"] == live.image_ids[1]
        finally:
            gate.release.set()
            live.stop()

    def test_rebuild_during_a_stop_is_409(self, tmp_path: Path) -> None:
        """A rebuild of a server that is being stopped is refused with 409."""
        gate = Gate("power_off", job="stop")
        live = start_live_daemon(tmp_path, observer=gate)
        try:
            server_id = live.create_server()
            live.client.post(f"/v2.1/servers/{server_id}/action", json={"os-stop": None})
            assert gate.reached.wait(30)
            response = live.client.post(
                f"/v2.1/servers/{server_id}/action",
                json={"rebuild": {"imageRef": live.image_ids[1]}},
            )
            assert response.status_code == 409
            assert "task_state powering-off" in response.json()["conflictingRequest"]["message"]
        finally:
            gate.release.set()
            live.stop()


def test_graceful_shutdown_rolls_interrupted_rebuilds_back(tmp_path: Path) -> None:
    """Draining stops new actions (409) and, past its timeout, interrupts a running rebuild,
    which rolls back to the old disk and ends in ERROR with an 'Interrupted' fault — never
    left in REBUILD."""
    gate = Gate("create_local_disks")
    live = start_live_daemon(tmp_path, observer=gate)
    try:
        server_id = live.create_server()
        live.client.post(
            f"/v2.1/servers/{server_id}/action", json={"rebuild": {"imageRef": live.image_ids[1]}}
        )
        assert gate.reached.wait(30)
        live.run(live.daemon.services.deps.runner.drain(0.2))
        other = live.client.post(
            "/v2.1/servers",
            json={"server": {"name": "late", "imageRef": live.image_ids[0], "flavorRef": "1"}},
        )
        assert other.status_code == 409
        assert "shutting down" in other.json()["conflictingRequest"]["message"]
        server = live.server(server_id)
        assert (server["status"], server["OS-EXT-STS:task_state"]) == ("ERROR", None)
        assert server["image"]["id"] == live.image_ids[0]
        fault = live.run(live.daemon.store.latest_faults([server_id]))[server_id]
        assert fault.message.startswith("Interrupted: the compute service shut down")
        assert "rolled back" in fault.message
    finally:
        gate.release.set()
        live.stop()
