"""The real clients with a static token (``REBUILDD_AUTH=token``): ``openstack`` with
``auth_type: admin_token`` and novaclient with ``--os-auth-type admin_token``."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.live import LiveDaemon, start_live_daemon
from tests.test_real_clients import NOVA, OPENSTACK

TOKEN = "static-token-for-clients"

pytestmark = pytest.mark.skipif(
    not (OPENSTACK.exists() and NOVA.exists()),
    reason="python-openstackclient and python-novaclient are not installed (the dev extra)",
)


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveDaemon, Path]]:
    home = tmp_path_factory.mktemp("home")
    tokens = home / "tokens.toml"
    tokens.write_text(
        f'[tokens.{TOKEN}]\nuser_id = "alice"\nproject_id = "demo"\nroles = ["member", "reader"]\n'
    )
    live = start_live_daemon(tmp_path_factory.mktemp("state"), auth="token", tokens_file=tokens)
    live.client.headers["X-Auth-Token"] = TOKEN
    try:
        yield live, home
    finally:
        live.stop()


def _env(home: Path) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("OS_", "NOVA_", "HTTP"))}
    return dict(base, HOME=str(home), NO_PROXY="*", no_proxy="*")


def _clouds(live: LiveDaemon, home: Path, token: str) -> Path:
    compute = f"{live.url}/v2.1"
    clouds = home / f"clouds-{token}.yaml"
    clouds.write_text(
        "clouds:\n"
        "  rebuildd:\n"
        "    auth_type: admin_token\n"
        f"    auth: {{token: {token}, endpoint: {compute}}}\n"
        f"    compute_endpoint_override: {compute}\n"
        f"    image_endpoint_override: {live.url}/image\n"
        f"    identity_endpoint_override: {compute}\n"
        "    identity_api_version: '3'\n"
    )
    return clouds


def _openstack(
    live: LiveDaemon, home: Path, token: str, *args: str
) -> subprocess.CompletedProcess[str]:
    env = dict(
        _env(home), OS_CLIENT_CONFIG_FILE=str(_clouds(live, home, token)), OS_CLOUD="rebuildd"
    )
    return subprocess.run(
        [str(OPENSTACK), *args], env=env, capture_output=True, text=True, timeout=180, check=False
    )


def test_openstack_rebuilds_with_a_token(secured: tuple[LiveDaemon, Path]) -> None:
    """server list and server rebuild --wait work with a valid token; a bad token is 401."""
    live, home = secured
    server_id = live.create_server("token-vm")
    listed = _openstack(live, home, TOKEN, "server", "list", "-f", "value", "-c", "ID")
    assert listed.returncode == 0, listed.stderr
    assert server_id in listed.stdout
    rebuilt = _openstack(
        live, home, TOKEN, "server", "rebuild", "--image", "demo-image-b", "--wait", server_id
    )
    assert rebuilt.returncode == 0, rebuilt.stderr
    server = live.server(server_id)
    assert (server["status"], server["image"]["id"]) == ("ACTIVE", live.image_ids[1])
    refused = _openstack(live, home, "wrong-token", "server", "list")
    assert refused.returncode != 0
    assert "401" in refused.stderr


def test_nova_rebuilds_with_a_token(secured: tuple[LiveDaemon, Path]) -> None:
    """nova --os-auth-type admin_token --os-token T rebuild --poll reaches ACTIVE."""
    live, home = secured
    server_id = live.create_server("nova-token-vm")
    env = dict(
        _env(home),
        OS_ENDPOINT=f"{live.url}/v2.1",
        OS_USERNAME="unused",
        OS_PROJECT_ID="unused",
        OS_AUTH_URL="http://127.0.0.1:9/never-contacted",
    )
    result = subprocess.run(
        [str(NOVA), "--os-auth-type", "admin_token", "--os-token", TOKEN,
         "rebuild", "--poll", server_id, "demo-image-b"],
        env=env, capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert live.server(server_id)["image"]["id"] == live.image_ids[1]
