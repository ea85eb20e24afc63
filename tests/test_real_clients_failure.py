"""A rebuild that fails is a failure to the real clients' waits: ``openstack server rebuild
--wait``, ``nova rebuild --poll`` and openstacksdk's ``wait_for_server`` each report it (the
server ends in ERROR, REBUILDD_FAILED_REBUILD_STATE's default), though the rollback put the
server back on its old image with its guest running.

The failure is real: the stored bytes of the image rebuilt onto no longer match its sha512,
so the image cache refuses them and the rebuild rolls back.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from tests.live import LiveDaemon, start_live_daemon
from tests.test_real_clients import IMAGE_B, NOVA, OPENSTACK, Clients

pytestmark = pytest.mark.skipif(
    not (OPENSTACK.exists() and NOVA.exists()),
    reason="python-openstackclient and python-novaclient are not installed (the dev extra)",
)


@pytest.fixture(scope="module")
def clients(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Clients]:
    """One daemon whose image B's stored bytes are corrupted (a flipped last byte)."""
    home = tmp_path_factory.mktemp("home")
    live = start_live_daemon(tmp_path_factory.mktemp("state"))
    try:
        stored = live.settings.state_dir / "images" / live.image_ids[1]
        data = bytearray(stored.read_bytes())
        data[-1] ^= 0xFF
        stored.write_bytes(bytes(data))
        yield Clients(live, home, None)
    finally:
        live.stop()


def _run(
    clients: Clients, argv: list[str], env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, check=False, env=env, capture_output=True, text=True, timeout=180, cwd=clients.home
    )


def _assert_failed_back(live: LiveDaemon, server_id: str) -> dict[str, Any]:
    """The server the clients saw fail: ERROR, on its old image, its guest running, with a
    fault naming the cause and saying it was rolled back."""
    server = live.server(server_id)
    assert (server["status"], server["OS-EXT-STS:task_state"]) == ("ERROR", None)
    assert server["OS-EXT-STS:power_state"] == 1
    assert server["image"]["id"] == live.image_ids[0]
    assert "sha512" in server["fault"]["message"]
    assert "rolled back" in server["fault"]["message"]
    return server


def test_openstack_rebuild_wait_reports_the_failure(clients: Clients) -> None:
    """``openstack server rebuild --wait`` exits non-zero with "Error rebuilding server"."""
    server_id = clients.live.create_server("osc-fails")
    argv = [str(OPENSTACK), "server", "rebuild", "--image", IMAGE_B, "--wait", server_id]
    result = _run(clients, argv, clients.openstack_env)
    assert result.returncode != 0, result.stdout
    assert "Error rebuilding server" in result.stderr, result.stderr
    _assert_failed_back(clients.live, server_id)


def test_nova_rebuild_poll_reports_the_failure(clients: Clients) -> None:
    """``nova rebuild --poll`` exits non-zero with ResourceInErrorState."""
    server_id = clients.live.create_server("nova-fails")
    argv = [str(NOVA), "rebuild", "--poll", server_id, IMAGE_B]
    result = _run(clients, argv, clients.nova_env)
    assert result.returncode != 0, result.stdout
    assert "ResourceInErrorState" in result.stderr, result.stderr
    _assert_failed_back(clients.live, server_id)


def test_sdk_wait_for_server_reports_the_failure(clients: Clients) -> None:
    """openstacksdk's ``wait_for_server(status="ACTIVE")`` raises ResourceFailure."""
    from openstack import exceptions

    server_id = clients.live.create_server("sdk-fails")
    conn = clients.sdk_connect()
    try:
        server = conn.compute.get_server(server_id)
        rebuilt = conn.compute.rebuild_server(server, image=clients.live.image_ids[1])
        with pytest.raises(exceptions.ResourceFailure):
            conn.compute.wait_for_server(rebuilt, status="ACTIVE", interval=0.2, wait=60)
    finally:
        conn.close()
    _assert_failed_back(clients.live, server_id)
