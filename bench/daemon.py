"""rebuildd as a separate process for the benchmark (pattern of tests/process.py, copied)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

BIN = Path(sys.executable).parent / "rebuildd"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _cpu(stat: Path) -> float:
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Daemon:
    def __init__(
        self, state_dir: Path, database_url: str | None = None, *, binary: Path = BIN
    ) -> None:
        self.binary = binary
        self.state_dir = state_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "REBUILDD_STATE_DIR": str(state_dir),
            "REBUILDD_LOG_LEVEL": os.environ.get("BENCH_LOG_LEVEL", "warning"),
            "REBUILDD_LOG_FORMAT": "json",
            "REBUILDD_SHUTDOWN_TIMEOUT": "0",
        }
        if database_url:
            self.env["REBUILDD_DATABASE_URL"] = database_url
        self.process: subprocess.Popen[bytes] | None = None
        self.log = state_dir / "daemon.log"

    def prepare(self) -> None:
        for command in (["db", "upgrade"], ["seed-demo"]):
            subprocess.run(
                [str(self.binary), *command],
                env=self.env,
                check=True,
                capture_output=True,
                timeout=300,
            )

    def start(self) -> None:
        out = self.log.open("ab")
        self.process = subprocess.Popen(
            [str(self.binary), "serve", "--port", str(self.port)],
            env=self.env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"rebuildd exited: {self.log.read_text()[-2000:]}")
            try:
                httpx.get(f"{self.url}/", timeout=1)
                return
            except httpx.TransportError:
                time.sleep(0.05)
        raise RuntimeError("rebuildd did not answer within 60 s")

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def cpu_seconds(self) -> float:
        """utime + stime of the daemon process, in seconds."""
        return _cpu(Path(f"/proc/{self.pid}/stat"))

    def loop_cpu_seconds(self) -> float:
        """utime + stime of the daemon's main thread alone, the one running its event loop:
        with one loop, the part that bounds throughput."""
        return _cpu(Path(f"/proc/{self.pid}/task/{self.pid}/stat"))

    def memory_kib(self) -> dict[str, int]:
        out = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(value.split()[0])
        return out

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
