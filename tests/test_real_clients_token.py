"""A token rebuildd does not know, sent by the real ``openstack`` CLI: refused with 401.

The rest of the real-client suite runs with a valid static token too (tests/test_real_clients.py,
its ``auth-token`` mode)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.live import start_live_daemon
from tests.test_real_clients import NOVA, OPENSTACK, TOKENS_FILE, _clouds

pytestmark = pytest.mark.skipif(
    not (OPENSTACK.exists() and NOVA.exists()),
    reason="python-openstackclient and python-novaclient are not installed (the dev extra)",
)


def test_an_unknown_token_is_refused_with_401(tmp_path: Path) -> None:
    """``openstack server list`` with a token missing from the tokens file exits non-zero and
    reports the 401; the daemon serves nothing to it."""
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(TOKENS_FILE)
    live = start_live_daemon(tmp_path / "state", auth="token", tokens_file=tokens)
    try:
        clouds = _clouds(tmp_path / "clouds.yaml", live, "wrong-token")
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": str(tmp_path),
            "NO_PROXY": "*",
            "no_proxy": "*",
            "OS_CLIENT_CONFIG_FILE": str(clouds),
            "OS_CLOUD": "rebuildd",
        }
        refused = subprocess.run(
            [str(OPENSTACK), "server", "list"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert refused.returncode != 0
        assert "401" in refused.stderr, refused.stderr
    finally:
        live.stop()
