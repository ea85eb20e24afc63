"""Nova's ``os-resetState`` server action (admin only: the authz matrix checks who may): the
vm_state set to active or error, task_state cleared, a finished ``resetState`` action, 202 with
no body; Nova's 400 for a bad body, 404 for an unknown server; 409 for a server a job still
holds; a server stuck in a task_state no job holds is set free, its abandoned action ended."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rebuildd.lifecycle import STUCK_AFTER
from rebuildd.models import NewAction
from tests.live import Gate, LiveDaemon, start_live_daemon


@pytest.fixture
def live(tmp_path: Path) -> Iterator[LiveDaemon]:
    daemon = start_live_daemon(tmp_path)
    try:
        yield daemon
    finally:
        daemon.stop()


def _reset(live: LiveDaemon, server_id: str, body: Any) -> Any:
    return live.client.post(f"/v2.1/servers/{server_id}/action", json={"os-resetState": body})


def test_error_then_active_with_a_finished_action_each(live: LiveDaemon) -> None:
    """error then active set the status each time with 202 and no body, and each is recorded
    as a finished resetState action."""
    server_id = live.create_server()
    for state, status in (("error", "ERROR"), ("active", "ACTIVE")):
        response = _reset(live, server_id, {"state": state})
        assert (response.status_code, response.content) == (202, b"")
        shown = live.server(server_id)
        assert (shown["status"], shown["OS-EXT-STS:task_state"]) == (status, None)
        assert shown["OS-EXT-STS:power_state"] == 1  # the guest is left alone
    actions = live.run(live.daemon.store.list_actions(server_id))
    resets = [a for a in actions if a.action == "resetState"]
    assert len(resets) == 2 and all(a.finish_time is not None for a in resets)


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"state": "paused"}, "Value: 'paused'. Input should be 'active' or 'error'"),
        ({}, "'state' is a required property"),
        ({"state": "active", "force": True}, "Additional properties are not allowed"),
        ("active", "is not of type 'object'"),
        (None, "is not of type 'object'"),
    ],
)
def test_a_bad_body_is_400_and_changes_nothing(live: LiveDaemon, body: Any, words: str) -> None:
    """A state other than active/error, a missing or extra key, or no object is Nova's 400
    naming what is wrong, and the server keeps its state and actions."""
    server_id = live.create_server()
    before = len(live.run(live.daemon.store.list_actions(server_id)))
    response = _reset(live, server_id, body)
    assert response.status_code == 400, response.text
    assert words in response.json()["badRequest"]["message"]
    assert live.server(server_id)["status"] == "ACTIVE"
    assert len(live.run(live.daemon.store.list_actions(server_id))) == before


def test_an_unknown_server_is_404(live: LiveDaemon) -> None:
    """A server that does not exist is Nova's 404 itemNotFound."""
    response = _reset(live, "00000000-0000-4000-8000-000000000000", {"state": "active"})
    assert response.status_code == 404, response.text
    assert "itemNotFound" in response.json()


def test_a_server_a_job_holds_is_409(tmp_path: Path) -> None:
    """While a rebuild's job runs, os-resetState is 409 naming the task_state, and the rebuild
    then finishes as if it had not been asked."""
    gate = Gate("start_domain")
    live = start_live_daemon(tmp_path, observer=gate)
    try:
        server_id = live.create_server()
        rebuild = {"rebuild": {"imageRef": live.image_ids[1]}}
        response = live.client.post(f"/v2.1/servers/{server_id}/action", json=rebuild)
        assert response.status_code == 202, response.text
        assert gate.reached.wait(30)
        response = _reset(live, server_id, {"state": "active"})
        assert response.status_code == 409, response.text
        assert "task_state rebuild_spawning" in response.json()["conflictingRequest"]["message"]
        gate.release.set()
        server = live.wait_for(server_id, "ACTIVE")
        assert server["image"]["id"] == live.image_ids[1]
        actions = live.run(live.daemon.store.list_actions(server_id))
        assert "resetState" not in [a.action for a in actions]
    finally:
        gate.release.set()
        live.stop()


def test_a_stuck_task_state_no_job_holds_is_cleared(live: LiveDaemon) -> None:
    """A server left in a task_state no job holds (its api stage committed, its job never
    ran) is set free by os-resetState: ACTIVE, task_state None, the abandoned action ended."""
    server_id = live.create_server()
    stuck = NewAction("rebuild", "req-stuck", "demo", "demo", params={})
    live.run(
        live.daemon.store.transition(
            server_id,
            action="rebuild",
            expected_task_state=(None,),
            task_state="rebuilding",
            new_action=stuck,
        )
    )
    assert _reset(live, server_id, {"state": "active"}).status_code == 409  # just set
    time.sleep(STUCK_AFTER.total_seconds() + 0.5)
    response = _reset(live, server_id, {"state": "active"})
    assert response.status_code == 202, response.text
    shown = live.server(server_id)
    assert (shown["status"], shown["OS-EXT-STS:task_state"]) == ("ACTIVE", None)
    assert live.run(live.daemon.store.in_flight_actions()) == []
