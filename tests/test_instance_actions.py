"""os-instance-actions with Nova's microversion behaviour: events and tracebacks by role and
version (2.51, 2.62, 2.84), deleted servers (2.21), paging and time filters (2.58)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.live import LiveDaemon
from tests.test_auth_policy import _as, _create, _rebuild, _start


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[LiveDaemon]:
    live = _start(tmp_path)
    try:
        yield live
    finally:
        live.stop()


def _rebuilt(live: LiveDaemon) -> tuple[str, str]:
    with _as(live, "member-token") as member:
        server_id = _create(member, live)
        request_id = _rebuild(member, live, server_id).headers["x-compute-request-id"]
    live.wait_for(server_id, "ACTIVE")
    return server_id, request_id


@pytest.mark.parametrize(
    ("token", "version", "keys"),
    [
        ("member-token", "2.1", None),
        ("member-token", "2.51", {"event", "start_time", "finish_time", "result"}),
        ("member-token", "2.62", {"event", "start_time", "finish_time", "result", "hostId"}),
        ("member-token", "2.84", {"event", "start_time", "finish_time", "result", "hostId"}),
        ("admin-token", "2.1", {"event", "start_time", "finish_time", "result", "traceback"}),
        (
            "admin-token",
            "2.62",
            {"event", "start_time", "finish_time", "result", "traceback", "host", "hostId"},
        ),
        (
            "admin-token",
            "2.84",
            {
                "event",
                "start_time",
                "finish_time",
                "result",
                "traceback",
                "host",
                "hostId",
                "details",
            },
        ),
    ],
)
def test_event_fields_by_role_and_version(
    secured: LiveDaemon, token: str, version: str, keys: set[str] | None
) -> None:
    """Non-admins see no events before 2.51 and never tracebacks or hosts; admins see all."""
    server_id, request_id = _rebuilt(secured)
    with _as(secured, token, version) as client:
        action = client.get(f"/v2.1/servers/{server_id}/os-instance-actions/{request_id}").json()
    action = action["instanceAction"]
    if keys is None:
        assert "events" not in action
    else:
        assert [set(e) for e in action["events"]] == [keys, keys]


def test_paging_and_changes_since_from_2_58(secured: LiveDaemon) -> None:
    """limit/marker page newest first with a next link; updated_at appears; bad markers 400."""
    server_id, _ = _rebuilt(secured)
    with _as(secured, "member-token", "2.58") as member:
        base = f"/v2.1/servers/{server_id}/os-instance-actions"
        first = member.get(base, params={"limit": 1}).json()
        assert [a["action"] for a in first["instanceActions"]] == ["rebuild"]
        assert "updated_at" in first["instanceActions"][0]
        rest = member.get(first["links"][0]["href"]).json()
        assert [a["action"] for a in rest["instanceActions"]] == ["create"]
        assert member.get(base, params={"marker": "req-nope"}).status_code == 400
        future = member.get(base, params={"changes-since": "2999-01-01T00:00:00Z"}).json()
        assert future["instanceActions"] == []
    with _as(secured, "member-token", "2.57") as old:
        everything = old.get(base, params={"limit": 1}).json()
        assert len(everything["instanceActions"]) == 2  # no paging before 2.58
        assert "updated_at" not in everything["instanceActions"][0]


def test_deleted_servers_actions_from_2_21(secured: LiveDaemon) -> None:
    """After delete, the actions are readable from 2.21 and 404 before."""
    server_id, _ = _rebuilt(secured)
    with _as(secured, "member-token") as member:
        assert member.delete(f"/v2.1/servers/{server_id}").status_code == 204
    deadline = time.monotonic() + 30
    with _as(secured, "member-token", "2.21") as new, _as(secured, "member-token", "2.20") as old:
        while new.get(f"/v2.1/servers/{server_id}").status_code != 404:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        actions = new.get(f"/v2.1/servers/{server_id}/os-instance-actions").json()[
            "instanceActions"
        ]
        assert [a["action"] for a in actions] == ["delete", "rebuild", "create"]
        assert old.get(f"/v2.1/servers/{server_id}/os-instance-actions").status_code == 404
