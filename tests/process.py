"""rebuildd as a real process (``rebuildd serve``), for tests that kill and restart it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

BIN = Path(sys.executable).parent / "rebuildd"
KILL_LAUNCHER = Path(__file__).parent / "kill_launcher.py"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class DaemonProcess:
    """Starts ``rebuildd serve`` with the given settings; waits until it answers HTTP."""

    def __init__(self, state_dir: Path, **settings: str) -> None:
        self.state_dir = state_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "REBUILDD_STATE_DIR": str(state_dir),
            "REBUILDD_LOG_FORMAT": "json",
            **{f"REBUILDD_{k.upper()}": v for k, v in settings.items()},
        }
        self.process: subprocess.Popen[str] | None = None
        self.log = state_dir / "daemon.log"

    def prepare(self) -> None:
        for command in (["db", "upgrade"], ["seed-demo"]):
            subprocess.run(
                [str(BIN), *command], env=self.env, check=True, capture_output=True, timeout=120
            )

    def start(
        self,
        *,
        ready: bool = True,
        kill_at: str | None = None,
        nofile: int | None = None,
        **extra: str,
    ) -> None:
        """Start ``rebuildd serve`` and wait until the API answers; with ``ready``, until /readyz
        says ready (restart recovery done). ``kill_at`` (``JOB:STEP:before|after``): start
        through tests/kill_launcher.py, which SIGKILLs the daemon at that step boundary;
        ``nofile``: its open-file limit (soft and hard)."""
        env = {**self.env, **{f"REBUILDD_{k.upper()}": v for k, v in extra.items()}}
        out = self.log.open("a")
        command = [str(BIN)]
        if kill_at is not None:
            command = [sys.executable, str(KILL_LAUNCHER), kill_at]
        # prlimit execs the daemon: the pid stays the daemon's.
        limit = ["prlimit", f"--nofile={nofile}", "--"] if nofile is not None else []
        self.process = subprocess.Popen(
            [*limit, *command, "serve", "--port", str(self.port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"rebuildd exited with {self.process.returncode}: {self.log.read_text()[-2000:]}"
                )
            try:
                response = httpx.get(f"{self.url}/readyz", timeout=1)
                if not ready or response.status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise RuntimeError("rebuildd was not ready within 60 s")

    def wait_exit(self, timeout: float = 60) -> int:
        assert self.process is not None
        return self.process.wait(timeout=timeout)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30)

    def get(self, path: str) -> Any:
        response = httpx.get(f"{self.url}{path}", timeout=30)
        response.raise_for_status()
        return response.json()


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 30 s; returns once the process is gone (a service's port
    then refuses connections)."""
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def request_errors() -> list[type[httpx.RequestError]]:
    """Every class of httpx's request errors (for tests that no one escapes a boundary)."""
    found: list[type[httpx.RequestError]] = []
    stack: list[type[httpx.RequestError]] = [httpx.RequestError]
    while stack:
        cls = stack.pop()
        found.append(cls)
        stack.extend(cls.__subclasses__())
    return found
