"""The real entry point: ``rebuildd db upgrade``, ``seed-demo`` and ``serve`` as processes,
systemd readiness, and a clean close on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

import httpx

from tests.process import BIN, free_port


def test_serve_notifies_systemd_and_closes_on_sigterm(tmp_path: Path) -> None:
    """serve sends READY=1 once it listens (and recovery is done), answers HTTP, and on SIGTERM
    sends STOPPING=1 and closes libvirt and the database before exiting."""
    env = {**os.environ, "REBUILDD_STATE_DIR": str(tmp_path), "REBUILDD_LOG_FORMAT": "json"}
    for command in (["db", "upgrade"], ["seed-demo"]):
        subprocess.run([str(BIN), *command], env=env, check=True, capture_output=True, timeout=120)
    notify_path = tmp_path / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(60)
    port = free_port()
    process = subprocess.Popen(
        [str(BIN), "serve", "--port", str(port)],
        env={**env, "NOTIFY_SOCKET": str(notify_path)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        while (message := notify.recv(256)) != b"READY=1":
            assert b"READY=1" not in message
        response = httpx.get(f"http://127.0.0.1:{port}/v2.1/flavors", timeout=10)
        assert [f["name"] for f in response.json()["flavors"]] == ["m1.tiny", "m1.small"]
        process.send_signal(signal.SIGTERM)
        assert notify.recv(64) == b"STOPPING=1"
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
        notify.close()
    assert '"event": "daemon closed"' in output
    assert "Traceback" not in output


def test_cli_help_lists_the_commands() -> None:
    """The CLI offers serve, db upgrade and seed-demo."""
    out = subprocess.run([str(BIN), "--help"], check=True, capture_output=True, text=True).stdout
    for command in ("serve", "db", "seed-demo"):
        assert command in out


def test_settings_that_cannot_work_stop_the_start_with_one_clear_line(tmp_path: Path) -> None:
    """REBUILDD_VOLUME_BACKEND=cinder without Keystone credentials: ``rebuildd serve`` exits
    at once, naming what is missing, without a traceback and before it opens anything."""
    env = {
        **os.environ,
        "REBUILDD_STATE_DIR": str(tmp_path / "state"),
        "REBUILDD_VOLUME_BACKEND": "cinder",
        "REBUILDD_LIBVIRT_URI": "test:///default",
    }
    result = _serve_fails(env)
    assert result.stderr.strip().splitlines()[-1] == (
        "Error: cannot start: REBUILDD_VOLUME_BACKEND=cinder needs REBUILDD_KEYSTONE_URL, "
        "REBUILDD_KEYSTONE_USERNAME, REBUILDD_KEYSTONE_PASSWORD, REBUILDD_KEYSTONE_PROJECT_NAME"
    )
    assert not (tmp_path / "state" / "rebuildd.db").exists()


def test_serve_on_an_unmigrated_database_says_to_run_db_upgrade(tmp_path: Path) -> None:
    """``rebuildd serve`` on a database ``db upgrade`` never ran on exits at once with one line
    saying what to run, and no traceback."""
    env = {
        **os.environ,
        "REBUILDD_STATE_DIR": str(tmp_path / "state"),
        "REBUILDD_LIBVIRT_URI": "test:///default",
    }
    result = _serve_fails(env)
    assert result.stderr.strip().splitlines() == [
        "Error: cannot start: the database has no schema yet: run `rebuildd db upgrade` first"
    ]


def _serve_fails(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``rebuildd serve`` under ``env``, which must exit 1 at once without a traceback."""
    result = subprocess.run(
        [str(BIN), "serve", "--port", str(free_port())],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    return result
