"""Secrets at rest and the tokens file of a running ``rebuildd serve`` (issue 17, section 2):
the database holding adminPass and user_data is its owner's alone, the state directory is not
listable by other local users, and SIGHUP reads the tokens file again."""

from __future__ import annotations

import os
import signal
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.process import DaemonProcess

TOKENS = '[tokens.{token}]\nuser_id = "ann"\nproject_id = "pa"\nroles = ["admin"]\n'


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DaemonProcess, Path]]:
    base = tmp_path_factory.mktemp("served")
    tokens = base / "tokens.toml"
    tokens.write_text(TOKENS.format(token="first-token"))
    tokens.chmod(0o600)
    daemon = DaemonProcess(base / "state", auth="token", tokens_file=str(tokens))
    daemon.prepare()
    daemon.start()
    try:
        yield daemon, tokens
    finally:
        daemon.stop()


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_database_is_its_owners_alone(served: tuple[DaemonProcess, Path]) -> None:
    """rebuildd.db and its WAL files (adminPass, user_data) are 0600 once the daemon serves."""
    daemon, _ = served
    response = httpx.get(
        f"{daemon.url}/v2.1/servers", headers={"X-Auth-Token": "first-token"}, timeout=30
    )
    assert response.status_code == 200
    files = [p for p in daemon.state_dir.iterdir() if p.name.startswith("rebuildd.db")]
    assert files
    assert {p.name: _mode(p) & 0o077 for p in files} == dict.fromkeys((p.name for p in files), 0)


def test_the_state_directory_is_not_listable(served: tuple[DaemonProcess, Path]) -> None:
    """Others may traverse the state directory (QEMU to its disks) but not list it, and the
    image store is rebuildd's alone."""
    daemon, _ = served
    assert _mode(daemon.state_dir) & 0o077 == 0o011
    assert _mode(daemon.state_dir / "images") & 0o077 == 0


def test_sighup_reads_the_tokens_file_again(served: tuple[DaemonProcess, Path]) -> None:
    """A tokens file changed in place with its size and mtime kept (which the per-request
    check cannot see) takes effect on SIGHUP: the revoked token is 401, the new one 200."""
    daemon, tokens = served
    assert daemon.process is not None
    before = tokens.stat()
    with tokens.open("r+") as out:  # same inode, same size
        out.write(TOKENS.format(token="other-token"))
    os.utime(tokens, ns=(before.st_atime_ns, before.st_mtime_ns))

    def status(token: str) -> int:
        headers = {"X-Auth-Token": token}
        return httpx.get(f"{daemon.url}/v2.1/servers", headers=headers, timeout=30).status_code

    assert status("first-token") == 200
    daemon.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while status("first-token") != 401:
        assert time.monotonic() < deadline, "SIGHUP did not reload the tokens file"
        time.sleep(0.05)
    assert status("other-token") == 200
