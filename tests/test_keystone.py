"""``REBUILDD_AUTH=keystone`` against a real Keystone (tests/keystone.py): tokens, projects and
roles from Keystone drive rebuildd's policy; external events from a service user; the real
``openstack`` CLI with password auth finds rebuildd through Keystone's catalog."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from rebuildd.instance_events import Event
from tests.conftest import require
from tests.keystone import PASSWORD, Keystone
from tests.live import LiveDaemon, start_live_daemon
from tests.process import free_port

OPENSTACK = Path(sys.executable).parent / "openstack"
EVENTS = "/v2.1/os-server-external-events"
AT_2_93 = {"OpenStack-API-Version": "compute 2.93"}


def _start(tmp_path: Path, keystone: Keystone, **settings: Any) -> LiveDaemon:
    return start_live_daemon(
        tmp_path,
        auth="keystone",
        keystone_url=keystone.url,
        keystone_username="rebuildd",
        keystone_password=PASSWORD,
        keystone_project_name="service",
        **settings,
    )


@pytest.fixture(scope="module")
def tokens(keystone: Keystone) -> dict[str, str]:
    return {
        "demo": keystone.token("demo-member", "demo"),
        "reader": keystone.token("demo-reader", "demo"),
        "other": keystone.token("other-member", "other"),
        "cinder": keystone.token("cinder", "service"),
    }


@pytest.fixture(scope="module")
def live(
    keystone: Keystone, tokens: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveDaemon]:
    """A rebuildd with Keystone auth, in the catalog, with one server of the demo project."""
    daemon = _start(tmp_path_factory.mktemp("rebuildd"), keystone)
    keystone.point_catalog_at(daemon.url)
    daemon.client.headers["X-Auth-Token"] = tokens["demo"]
    daemon.extra["server"] = daemon.create_server("demo-vm")
    try:
        yield daemon
    finally:
        daemon.stop()


def _as(token: str) -> dict[str, str]:
    return {"X-Auth-Token": token}


class TestTokens:
    def test_a_demo_token_rebuilds_its_server(
        self, live: LiveDaemon, keystone: Keystone, tokens: dict[str, str]
    ) -> None:
        """A member token of the demo project rebuilds the project's server, which belongs to
        Keystone's project and user ids."""
        server_id = live.extra["server"]
        body = {"rebuild": {"imageRef": live.image_ids[1], "name": "rebuilt"}}
        response = live.client.post(f"/v2.1/servers/{server_id}/action", json=body)
        assert response.status_code == 202, response.text
        server = live.wait_for(server_id, "ACTIVE")
        assert server["name"] == "rebuilt"
        assert server["image"]["id"] == live.image_ids[1]
        assert server["tenant_id"] == keystone.projects["demo"]
        assert server["user_id"] == keystone.users["demo-member"]

    def test_a_bad_token_is_401_with_www_authenticate(
        self, live: LiveDaemon, keystone: Keystone
    ) -> None:
        """A token Keystone does not know is 401 with Nova's fault body and keystonemiddleware's
        WWW-Authenticate header naming Keystone."""
        response = live.client.get("/v2.1/servers", headers=_as("not-a-token"))
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"] == f'Keystone uri="{keystone.url}"'
        assert response.json() == {
            "unauthorized": {
                "code": 401,
                "message": "The request you have made requires authentication.",
            }
        }

    def test_no_token_is_401(self, live: LiveDaemon) -> None:
        """A request without X-Auth-Token is 401, never served."""
        response = httpx.get(f"{live.url}/v2.1/servers", timeout=30)
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"].startswith("Keystone uri=")

    def test_version_documents_stay_open(self, live: LiveDaemon) -> None:
        """The version documents answer without a token, as clients discover with them."""
        for path in ("/", "/v2.1", "/v2.1/", "/image"):
            assert httpx.get(f"{live.url}{path}", timeout=30).status_code in (200, 300), path

    def test_another_projects_token_sees_404(
        self, live: LiveDaemon, tokens: dict[str, str]
    ) -> None:
        """Another project's member neither sees nor rebuilds the demo server (404)."""
        server_id = live.extra["server"]
        other = _as(tokens["other"])
        assert live.client.get(f"/v2.1/servers/{server_id}", headers=other).status_code == 404
        body = {"rebuild": {"imageRef": live.image_ids[0]}}
        action = live.client.post(f"/v2.1/servers/{server_id}/action", json=body, headers=other)
        assert action.status_code == 404
        listed = live.client.get("/v2.1/servers", headers=other).json()["servers"]
        assert listed == []

    def test_a_reader_may_not_rebuild(self, live: LiveDaemon, tokens: dict[str, str]) -> None:
        """Keystone's reader role reads the server but the rebuild policy refuses it (403)."""
        server_id = live.extra["server"]
        reader = _as(tokens["reader"])
        assert live.client.get(f"/v2.1/servers/{server_id}", headers=reader).status_code == 200
        body = {"rebuild": {"imageRef": live.image_ids[0]}}
        action = live.client.post(f"/v2.1/servers/{server_id}/action", json=body, headers=reader)
        assert action.status_code == 403

    def test_a_revoked_token_is_401_when_not_cached(
        self, tmp_path: Path, keystone: Keystone
    ) -> None:
        """With the cache off, a token revoked in Keystone is refused on the next request."""
        daemon = _start(tmp_path, keystone, keystone_cache_seconds=0)
        try:
            token = keystone.token("demo-member", "demo")
            assert daemon.client.get("/v2.1/servers", headers=_as(token)).status_code == 200
            keystone.revoke(token)
            assert daemon.client.get("/v2.1/servers", headers=_as(token)).status_code == 401
        finally:
            daemon.stop()


class TestExternalEvents:
    def test_a_service_token_posts_an_event_a_waiter_receives(
        self, live: LiveDaemon, tokens: dict[str, str]
    ) -> None:
        """Cinder's service token posts volume-reimaged at 2.93: 200, each event echoed with code
        200, and the step waiting for it (registered before) receives it."""
        server_id, volume_id = live.extra["server"], str(uuid.uuid4())
        events = live.daemon.services.deps.instance_events
        registered = threading.Event()

        async def wait() -> dict[Any, Event]:
            async with events.expecting(
                server_id, [("volume-reimaged", volume_id)], timeout=30
            ) as expected:
                registered.set()
            return expected.received()

        waiting = live.submit(wait())
        assert registered.wait(10)
        body = {"events": [{"name": "volume-reimaged", "server_uuid": server_id, "tag": volume_id}]}
        response = live.client.post(EVENTS, json=body, headers={**_as(tokens["cinder"]), **AT_2_93})
        assert response.status_code == 200, response.text
        assert response.json() == {
            "events": [{**body["events"][0], "status": "completed", "code": 200}]
        }
        received = waiting.result(timeout=30)
        assert received == {
            ("volume-reimaged", volume_id): Event(server_id, "volume-reimaged", volume_id)
        }

    def test_a_mix_with_an_unknown_server_is_207(
        self, live: LiveDaemon, tokens: dict[str, str]
    ) -> None:
        """Events for a known and an unknown server: 207, the unknown one failed with 404."""
        server_id, unknown = live.extra["server"], str(uuid.uuid4())
        body = {
            "events": [
                {"name": "network-vif-plugged", "server_uuid": server_id, "tag": "port-1"},
                {"name": "network-vif-plugged", "server_uuid": unknown, "tag": "port-2"},
            ]
        }
        response = live.client.post(EVENTS, json=body, headers=_as(tokens["cinder"]))
        assert response.status_code == 207, response.text
        assert [(e["code"], e["status"]) for e in response.json()["events"]] == [
            (200, "completed"),
            (404, "failed"),
        ]

    def test_events_are_visible_as_instance_actions(
        self, live: LiveDaemon, tokens: dict[str, str]
    ) -> None:
        """An accepted event is recorded on the server: an external_events action, keyed by the
        POST's request id, with one event named after the external event."""
        server_id = live.extra["server"]
        body = {"events": [{"name": "network-changed", "server_uuid": server_id}]}
        response = live.client.post(EVENTS, json=body, headers=_as(tokens["cinder"]))
        assert response.status_code == 200, response.text
        request_id = response.headers["x-compute-request-id"]
        action = live.client.get(
            f"/v2.1/servers/{server_id}/os-instance-actions/{request_id}",
            headers={"OpenStack-API-Version": "compute 2.84"},
        ).json()["instanceAction"]
        assert action["action"] == "external_events"
        assert [(e["event"], e["result"]) for e in action["events"]] == [
            ("network-changed", "Success")
        ]

    def test_a_member_token_gets_403(self, live: LiveDaemon, tokens: dict[str, str]) -> None:
        """A project member may not post external events (Nova's service_or_admin rule)."""
        body = {"events": [{"name": "network-changed", "server_uuid": live.extra["server"]}]}
        response = live.client.post(EVENTS, json=body, headers=_as(tokens["demo"]))
        assert response.status_code == 403, response.text


def test_openstack_cli_with_password_auth_lists_rebuildds_servers(
    live: LiveDaemon, keystone: Keystone, tmp_path: Path
) -> None:
    """``openstack server list`` with auth_type password against Keystone finds rebuildd through
    the catalog's compute endpoint and lists the demo project's server."""
    if not OPENSTACK.exists():
        require("python-openstackclient", f"no {OPENSTACK} (the dev extra)")
    clouds = tmp_path / "clouds.yaml"
    clouds.write_text(
        "clouds:\n"
        "  cloud:\n"
        "    auth_type: password\n"
        "    auth:\n"
        f"      auth_url: {keystone.url}\n"
        "      username: demo-member\n"
        f"      password: {PASSWORD}\n"
        "      project_name: demo\n"
        "      user_domain_name: Default\n"
        "      project_domain_name: Default\n"
        "    region_name: RegionOne\n"
        "    identity_api_version: '3'\n"
    )
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "NO_PROXY": "*",
        "no_proxy": "*",
        "OS_CLIENT_CONFIG_FILE": str(clouds),
        "OS_CLOUD": "cloud",
    }
    result = subprocess.run(
        [str(OPENSTACK), "server", "list", "-f", "json"],
        env={**env, **{k: v for k, v in os.environ.items() if k.startswith("LC_")}},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert [s["ID"] for s in json.loads(result.stdout)] == [live.extra["server"]]


def test_keystone_unreachable_is_503(tmp_path: Path) -> None:
    """With Keystone down (nothing listens at its URL) a request is a 503 serviceUnavailable
    fault, as keystonemiddleware answers, not a 500."""
    daemon = start_live_daemon(
        tmp_path,
        auth="keystone",
        keystone_url=f"http://127.0.0.1:{free_port()}/v3",
        keystone_username="rebuildd",
        keystone_password="x",
        keystone_project_name="service",
    )
    try:
        response = daemon.client.get("/v2.1/servers", headers=_as("some-token"))
        assert response.status_code == 503
        assert response.json() == {
            "serviceUnavailable": {
                "code": 503,
                "message": "The Keystone service is temporarily unavailable.",
            }
        }
    finally:
        daemon.stop()
