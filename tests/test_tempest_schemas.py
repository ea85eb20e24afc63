"""Server views checked against Tempest 47.0.0's own response schemas, the oracle for Nova's
shapes, at every microversion where one of those schemas changes; and Nova's published rebuild
request samples (tests/data/nova_api_samples, from Nova's doc/api_samples/servers) accepted at
their microversion.
"""

from __future__ import annotations

import base64
import importlib
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
from tempest.lib.common.rest_client import RestClient

from rebuildd import microversion, views
from tests.live import LiveDaemon, start_live_daemon

SCHEMAS = "tempest.lib.api_schema.response.compute"
SAMPLES = Path(__file__).parent / "data" / "nova_api_samples"

# Every microversion at which Tempest's servers.py changes rebuild_server(_with_admin_pass),
# get_server, list_servers_detail or list_servers (found by comparing consecutive modules).
CHANGES = [
    "2.1", "2.3", "2.9", "2.16", "2.19", "2.26", "2.47", "2.54", "2.57", "2.63", "2.71",
    "2.73", "2.75", "2.96", "2.98", "2.100",
]  # fmt: skip
# Microversions where no Tempest schema changes but Nova's view or request schema does.
ALSO = ["2.90", "2.94", "2.104"]
# What Tempest ships: a module per version where any compute schema changed.
TEMPEST_MODULES = [
    "2.1", "2.3", "2.6", "2.8", "2.9", "2.16", "2.19", "2.26", "2.45", "2.47", "2.48", "2.51",
    "2.54", "2.57", "2.58", "2.59", "2.62", "2.63", "2.70", "2.71", "2.73", "2.75", "2.79",
    "2.80", "2.84", "2.89", "2.96", "2.97", "2.98", "2.99", "2.100",
]  # fmt: skip


def _minor(version: str) -> int:
    return int(version.split(".")[1])


def tempest_servers(version: str) -> ModuleType:
    """The newest Tempest servers schema module whose version is <= ``version``."""
    newest = max((v for v in TEMPEST_MODULES if _minor(v) <= _minor(version)), key=_minor)
    return importlib.import_module(f"{SCHEMAS}.v2_{_minor(newest)}.servers")


class _Response(dict[str, str]):
    """What RestClient.validate_response reads: ``.status`` and the headers as a dict."""

    def __init__(self, response: httpx.Response) -> None:
        super().__init__({k.lower(): v for k, v in response.headers.items()})
        self.status = response.status_code


def validate(schema: dict[str, Any], response: httpx.Response) -> None:
    RestClient.validate_response(schema, _Response(response), response.json())


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveDaemon]:
    """One daemon for the module: each test makes its own servers."""
    daemon = start_live_daemon(tmp_path_factory.mktemp("tempest"))
    try:
        yield daemon
    finally:
        daemon.stop()


def _headers(version: str) -> dict[str, str]:
    return {"OpenStack-API-Version": f"compute {version}"}


def _create(live: LiveDaemon, version: str) -> str:
    body = {"server": {"name": f"v{version}", "imageRef": live.image_ids[0], "flavorRef": "1"}}
    response = live.client.post("/v2.1/servers", json=body, headers=_headers(version))
    assert response.status_code == 202, response.text
    server_id: str = response.json()["server"]["id"]
    live.wait_for(server_id, "ACTIVE")
    return server_id


@pytest.mark.parametrize("version", CHANGES + ALSO)
class TestTempestSchemas:
    def test_show_matches_tempest(self, live: LiveDaemon, version: str) -> None:
        """GET /servers/{id} validates against Tempest's get_server at this microversion."""
        server_id = _create(live, version)
        response = live.client.get(f"/v2.1/servers/{server_id}", headers=_headers(version))
        validate(tempest_servers(version).get_server, response)

    def test_list_detail_matches_tempest(self, live: LiveDaemon, version: str) -> None:
        """GET /servers/detail validates against Tempest's list_servers_detail."""
        _create(live, version)
        response = live.client.get("/v2.1/servers/detail", headers=_headers(version))
        assert response.json()["servers"]
        validate(tempest_servers(version).list_servers_detail, response)

    def test_list_matches_tempest(self, live: LiveDaemon, version: str) -> None:
        """GET /servers validates against Tempest's list_servers."""
        _create(live, version)
        response = live.client.get("/v2.1/servers", headers=_headers(version))
        assert response.json()["servers"]
        validate(tempest_servers(version).list_servers, response)

    def test_rebuild_matches_tempest(self, live: LiveDaemon, version: str) -> None:
        """The rebuild 202 validates against Tempest's rebuild_server_with_admin_pass (we always
        return adminPass) and, adminPass removed, rebuild_server; GET after it still matches."""
        server_id = _create(live, version)
        body = {"rebuild": {"imageRef": live.image_ids[1]}}
        response = live.client.post(
            f"/v2.1/servers/{server_id}/action", json=body, headers=_headers(version)
        )
        schemas = tempest_servers(version)
        validate(schemas.rebuild_server_with_admin_pass, response)
        without_pass = response.json()
        del without_pass["server"]["adminPass"]
        stripped = httpx.Response(202, json=without_pass, headers=response.headers)
        validate(schemas.rebuild_server, stripped)
        live.wait_for(server_id, "ACTIVE")
        shown = live.client.get(f"/v2.1/servers/{server_id}", headers=_headers(version))
        validate(schemas.get_server, shown)


@pytest.mark.parametrize("version", CHANGES + ALSO)
def test_non_admin_views_match_tempest(live: LiveDaemon, version: str) -> None:
    """Without admin-only fields (and with the 2.90 hostname shown to everyone) the show,
    detail and rebuild views still validate against Tempest's schemas."""
    server_id = _create(live, version)
    server = live.run(live.daemon.store.get_server(server_id, project_id=None))
    parsed = microversion.parse(version)
    shown = views.server_show(server, live.url, parsed, None, is_admin=False)
    assert not any(
        key.startswith("OS-EXT-SRV-ATTR:") and key != "OS-EXT-SRV-ATTR:hostname" for key in shown
    )
    assert ("OS-EXT-SRV-ATTR:hostname" in shown) == parsed.at_least("2.90")
    detail = views.server_detail(server, live.url, parsed, None, is_admin=False)
    rebuilt = views.server_rebuilt(server, live.url, parsed, is_admin=False)
    schemas = tempest_servers(version)
    for schema, body, status in (
        (schemas.get_server, {"server": shown}, 200),
        (schemas.list_servers_detail, {"servers": [detail]}, 200),
        (schemas.rebuild_server, {"server": rebuilt}, 202),
    ):
        response = httpx.Response(status, json=body)
        validate(schema, response)


def _sample_versions() -> list[str]:
    names = sorted(p.name.split("-")[0].removeprefix("v") for p in SAMPLES.glob("*.json"))
    return sorted(names, key=_minor)


def _public_key(tmp_path: Path) -> str:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "key")], check=True
    )
    return (tmp_path / "key.pub").read_text().strip()


class TestNovaRequestSamples:
    @pytest.mark.parametrize("version", _sample_versions())
    def test_sample_is_accepted(self, live: LiveDaemon, version: str, tmp_path: Path) -> None:
        """Nova's server-action-rebuild.json for this microversion is a 202, its fields kept."""
        sample = json.loads((SAMPLES / f"v{version}-server-action-rebuild.json").read_text())
        request = sample["rebuild"]
        request["imageRef"] = live.image_ids[1]
        if "key_name" in request:
            key = {"keypair": {"name": f"key-{version}", "public_key": _public_key(tmp_path)}}
            created = live.client.post("/v2.1/os-keypairs", json=key, headers=_headers(version))
            assert created.status_code in (200, 201), created.text
            request["key_name"] = f"key-{version}"
        server_id = _create(live, version)
        response = live.client.post(
            f"/v2.1/servers/{server_id}/action", json=sample, headers=_headers(version)
        )
        assert response.status_code == 202, response.text
        view = response.json()["server"]
        assert view["name"] == request["name"]
        assert view["metadata"] == request["metadata"]
        if "user_data" in request:
            assert view["user_data"] == request["user_data"]
        live.wait_for(server_id, "ACTIVE")
        shown = live.server(server_id, **_headers(version))
        if "hostname" in request:
            assert shown["OS-EXT-SRV-ATTR:hostname"] == request["hostname"]

    def test_personality_is_refused_from_2_57(self, live: LiveDaemon) -> None:
        """personality is a 2.1-2.56 field: at 2.57 it is an unknown field (400)."""
        server_id = _create(live, "2.57")
        body = {
            "rebuild": {
                "imageRef": live.image_ids[1],
                "personality": [{"path": "/a", "contents": base64.b64encode(b"x").decode()}],
            }
        }
        response = live.client.post(
            f"/v2.1/servers/{server_id}/action", json=body, headers=_headers("2.57")
        )
        assert response.status_code == 400, response.text
        assert "'personality' was unexpected" in response.text
