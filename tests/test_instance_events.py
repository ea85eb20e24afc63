"""External instance events: the in-process rendezvous (InstanceEvents) and Nova's
``POST /v2.1/os-server-external-events`` contract (schema per microversion, per-event codes)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import httpx
import pytest

from rebuildd import errors
from rebuildd.instance_events import Event, InstanceEvents
from tests.live import LiveDaemon, start_live_daemon

SERVER = "2b9c1c57-3a59-4d6f-9a57-6e0c8f3c2a11"
EVENTS = "/v2.1/os-server-external-events"


class TestInstanceEvents:
    async def test_an_event_that_comes_while_the_body_runs_is_not_missed(self) -> None:
        """Registered before the body, an event delivered during it satisfies the wait."""
        events = InstanceEvents()
        async with events.expecting(SERVER, [("volume-reimaged", "v1")], timeout=5) as expected:
            assert events.deliver(Event(SERVER, "volume-reimaged", "v1"))
        assert expected.received() == {
            ("volume-reimaged", "v1"): Event(SERVER, "volume-reimaged", "v1")
        }

    async def test_the_exit_waits_for_an_event_that_comes_later(self) -> None:
        """Leaving the block waits until the expected event arrives."""
        events = InstanceEvents()
        loop = asyncio.get_running_loop()
        async with events.expecting(SERVER, [("network-vif-plugged", "p1")], timeout=5) as expected:
            loop.call_later(0.05, events.deliver, Event(SERVER, "network-vif-plugged", "p1"))
        assert list(expected.received()) == [("network-vif-plugged", "p1")]

    async def test_a_missing_event_times_out(self) -> None:
        """An event that never comes raises ExternalEventTimeout naming it."""
        events = InstanceEvents()
        with pytest.raises(errors.ExternalEventTimeout, match="volume-reimaged-v1"):
            async with events.expecting(SERVER, [("volume-reimaged", "v1")], timeout=0.05):
                pass

    async def test_a_failed_event_raises(self) -> None:
        """An event with status failed raises ExternalEventFailed, as Nova's error callback."""
        events = InstanceEvents()
        with pytest.raises(errors.ExternalEventFailed):
            async with events.expecting(SERVER, [("volume-reimaged", "v1")], timeout=5):
                events.deliver(Event(SERVER, "volume-reimaged", "v1", "failed"))

    async def test_wait_inside_expecting_returns_an_event_that_came_earlier(self) -> None:
        """wait() for an event registered by expecting() returns it even if it already came."""
        events = InstanceEvents()
        async with events.expecting(SERVER, [("volume-reimaged", "v1")], timeout=5):
            events.deliver(Event(SERVER, "volume-reimaged", "v1", "in-progress"))
            got = await events.wait(SERVER, "volume-reimaged", "v1", timeout=1)
        assert got.status == "in-progress"

    async def test_wait_alone_times_out(self) -> None:
        """wait() on its own raises ExternalEventTimeout when nothing comes, and unregisters."""
        events = InstanceEvents()
        with pytest.raises(errors.ExternalEventTimeout):
            await events.wait(SERVER, "power-update", "POWER_ON", timeout=0.05)
        assert events.waiting(SERVER) == []

    async def test_an_event_nobody_waits_for_is_not_delivered(self) -> None:
        """deliver() says False when nobody waits, and an event of another tag wakes nobody."""
        events = InstanceEvents()
        assert not events.deliver(Event(SERVER, "volume-reimaged", "v1"))
        async with events.expecting(SERVER, [("volume-reimaged", "v1")], timeout=5):
            assert not events.deliver(Event(SERVER, "volume-reimaged", "v2"))
            assert events.deliver(Event(SERVER, "volume-reimaged", "v1"))

    async def test_registrations_end_with_the_block(self) -> None:
        """No waiter is left once the block has been left, normally or by an exception."""
        events = InstanceEvents()
        with pytest.raises(RuntimeError):
            async with events.expecting(SERVER, [("volume-reimaged", "v1")], timeout=5):
                assert events.waiting(SERVER) == [("volume-reimaged", "v1")]
                raise RuntimeError("the triggering call failed")
        assert events.waiting(SERVER) == []


TOKENS = """
[tokens.service-token]
user_id = "cinder"
project_id = "service"
roles = ["service"]

[tokens.member-token]
user_id = "bob"
project_id = "demo"
roles = ["member", "reader"]

[tokens.admin-token]
user_id = "alice"
project_id = "demo"
roles = ["admin", "member", "reader"]
"""


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveDaemon]:
    base = tmp_path_factory.mktemp("events")
    (base / "tokens.toml").write_text(TOKENS)
    live = start_live_daemon(base / "state", auth="token", tokens_file=base / "tokens.toml")
    live.client.headers["X-Auth-Token"] = "member-token"
    live.extra["server"] = live.create_server("evented")
    try:
        yield live
    finally:
        live.stop()


def _post(
    live: LiveDaemon, body: object, version: str = "2.93", token: str = "service-token"
) -> httpx.Response:
    headers = {"X-Auth-Token": token, "OpenStack-API-Version": f"compute {version}"}
    return live.client.post(EVENTS, json=body, headers=headers)


class TestExternalEventsAPI:
    @pytest.mark.parametrize(
        ("name", "first"),
        [
            ("volume-extended", "2.51"),
            ("power-update", "2.76"),
            ("accelerator-request-bound", "2.82"),
            ("volume-reimaged", "2.93"),
        ],
    )
    def test_an_event_name_is_admitted_from_its_microversion(
        self, secured: LiveDaemon, name: str, first: str
    ) -> None:
        """Each newer event name is a 400 one microversion before the one that added it."""
        major, minor = first.split(".")
        event = {"name": name, "server_uuid": secured.extra["server"], "tag": "t"}
        before = _post(secured, {"events": [event]}, version=f"{major}.{int(minor) - 1}")
        assert before.status_code == 400, before.text
        assert f"'{name}' is not one of" in before.json()["badRequest"]["message"]
        assert _post(secured, {"events": [event]}, version=first).status_code == 200

    @pytest.mark.parametrize(
        "body",
        [
            {},
            {"events": []},
            {"events": [{"name": "network-changed"}]},
            {"events": [{"name": "network-changed", "server_uuid": "not-a-uuid"}]},
            {"events": [{"name": "network-changed", "server_uuid": SERVER, "status": "done"}]},
            {"events": [{"name": "network-changed", "server_uuid": SERVER, "tag": "x" * 256}]},
            {"events": [{"name": "network-changed", "server_uuid": SERVER, "extra": 1}]},
            {"events": [{"name": "network-changed", "server_uuid": SERVER}], "more": 1},
        ],
    )
    def test_a_body_outside_novas_schema_is_400(self, secured: LiveDaemon, body: object) -> None:
        """Missing, unknown or out-of-range fields are a 400 badRequest."""
        response = _post(secured, body)
        assert response.status_code == 400, response.text
        assert "badRequest" in response.json()

    def test_volume_extended_without_a_tag_is_refused_alone(self, secured: LiveDaemon) -> None:
        """volume-extended without a tag fails with code 400 inside a 207; the other event of
        the request is still accepted."""
        server = secured.extra["server"]
        body = {
            "events": [
                {"name": "volume-extended", "server_uuid": server},
                {"name": "network-changed", "server_uuid": server, "status": "failed"},
            ]
        }
        response = _post(secured, body)
        assert response.status_code == 207, response.text
        assert response.json()["events"] == [
            {"name": "volume-extended", "server_uuid": server, "status": "failed", "code": 400},
            # Nova echoes "completed" for an accepted event whatever status it carried.
            {"name": "network-changed", "server_uuid": server, "status": "completed", "code": 200},
        ]

    def test_no_known_server_is_207_not_404(self, secured: LiveDaemon) -> None:
        """When no event names a known server the answer is 207 with code 404 per event, as
        Nova answers since bug 1855752 (it used to be a bare 404)."""
        body = {"events": [{"name": "network-changed", "server_uuid": str(uuid.uuid4())}]}
        response = _post(secured, body)
        assert response.status_code == 207, response.text
        assert response.json()["events"][0]["code"] == 404

    def test_an_admin_may_post_and_a_member_may_not(self, secured: LiveDaemon) -> None:
        """Nova's rule is service_or_admin: the admin token is accepted, the member's is 403."""
        body = {"events": [{"name": "network-changed", "server_uuid": secured.extra["server"]}]}
        assert _post(secured, body, token="admin-token").status_code == 200
        refused = _post(secured, body, token="member-token")
        assert refused.status_code == 403
        assert "os-server-external-events:create" in refused.json()["forbidden"]["message"]

    def test_events_for_two_servers_are_two_actions(self, secured: LiveDaemon) -> None:
        """Events for two servers in one request are recorded on each server, with the failed
        one's result Error."""
        first, second = secured.extra["server"], secured.create_server("second")
        body = {
            "events": [
                {"name": "network-vif-plugged", "server_uuid": first, "tag": "p1"},
                {
                    "name": "network-vif-plugged",
                    "server_uuid": second,
                    "tag": "p2",
                    "status": "failed",
                },
            ]
        }
        assert _post(secured, body).status_code == 200
        results = {}
        for server in (first, second):
            actions = secured.client.get(f"/v2.1/servers/{server}/os-instance-actions").json()
            newest = actions["instanceActions"][0]
            assert newest["action"] == "external_events"
            shown = secured.client.get(
                f"/v2.1/servers/{server}/os-instance-actions/{newest['request_id']}",
                headers={"X-Auth-Token": "admin-token", "OpenStack-API-Version": "compute 2.84"},
            ).json()["instanceAction"]
            results[server] = [(e["event"], e["result"], e["details"]) for e in shown["events"]]
        assert results == {
            first: [("network-vif-plugged", "Success", "tag: p1")],
            second: [("network-vif-plugged", "Error", "tag: p2")],
        }
