"""The daemon on PostgreSQL: a job's bookkeeping, which there is written as one statement per
step (rebuildd/pgwrites.py), records what it records on SQLite."""

from __future__ import annotations

import time
from pathlib import Path

from rebuildd.models import InstanceAction
from tests.live import Gate, LiveDaemon, start_live_daemon


def _rebuild(live: LiveDaemon, server_id: str) -> str:
    response = live.client.post(
        f"/v2.1/servers/{server_id}/action", json={"rebuild": {"imageRef": live.image_ids[1]}}
    )
    assert response.status_code == 202, response.text
    return str(response.headers["x-compute-request-id"])


def _wait_finished(live: LiveDaemon, server_id: str, request_id: str) -> InstanceAction:
    deadline = time.monotonic() + 30
    while (
        action := live.run(live.daemon.store.get_action(server_id, request_id))
    ).finish_time is None:
        assert time.monotonic() < deadline, "the action did not finish within 30 s"
        time.sleep(0.02)
    assert isinstance(action, InstanceAction)
    return action


def _events(action: InstanceAction) -> list[tuple[str, str | None]]:
    return sorted((e.event, e.result) for e in action.events)


def test_a_rebuild_records_its_events_and_notifications(tmp_path: Path, postgres_url: str) -> None:
    """Both events end in Success, the action finishes, and the three rebuild notifications
    are in the outbox in order, with the end one showing the rebuilt server."""
    live = start_live_daemon(tmp_path, database_url=postgres_url)
    try:
        server_id = live.create_server()
        request_id = _rebuild(live, server_id)
        live.wait_for(server_id, "ACTIVE")
        action = _wait_finished(live, server_id, request_id)
        assert _events(action) == [
            ("compute_rebuild_instance", "Success"),
            ("rebuild_server", "Success"),
        ]
        outbox = live.run(live.daemon.store.list_notifications(server_id))
        rebuild = [n for n in outbox if n[0].startswith("instance.rebuild")]
        assert [n[0] for n in rebuild] == [
            "instance.rebuild_scheduled",
            "instance.rebuild.start",
            "instance.rebuild.end",
        ]
        end = rebuild[-1][2]["payload"]["nova_object.data"]
        assert (end["task_state"], end["image_uuid"]) == (None, live.image_ids[1])
    finally:
        live.stop()


def test_a_failed_rebuild_rolls_back_with_its_fault(tmp_path: Path, postgres_url: str) -> None:
    """A step that fails: the server is back on its old image, in ERROR, the compute event is
    an Error carrying the message, and the error notification is the last one."""
    gate = Gate("start_domain")
    gate.fail_with = RuntimeError("boom at start")
    live = start_live_daemon(tmp_path, observer=gate, database_url=postgres_url)
    try:
        server_id = live.create_server()
        request_id = _rebuild(live, server_id)
        server = live.wait_for(server_id, "ERROR")
        action = _wait_finished(live, server_id, request_id)
        assert ("compute_rebuild_instance", "Error") in _events(action)
        assert server["image"]["id"] == live.image_ids[0]
        deadline = time.monotonic() + 30
        while (outbox := live.run(live.daemon.store.list_notifications(server_id)))[-1][
            0
        ] != "instance.rebuild.error":
            assert time.monotonic() < deadline, "no instance.rebuild.error within 30 s"
            time.sleep(0.02)
        assert outbox[-1][1] == "ERROR"
    finally:
        live.stop()
