"""A real Glance for tests, started as ../shared/OPENSTACK-SERVICES.md measured it: glance
33.0.0 from the venv ``scripts/openstack-venvs.sh`` installs (``make test`` runs it), SQLite, the
filesystem store, ``glance-manage db_sync``, and gunicorn serving
``glance.wsgi.api:application`` with ``OS_GLANCE_CONFIG_DIR``, unauthenticated (paste flavor
empty; oslo.policy's scope and new defaults off, else every create is 403), on a free loopback
port.

:meth:`Glance.upload` makes a real qcow2 (``qemu-img create`` + a ``qemu-io`` pattern, as
rebuildd's demo images are made: Glance 33 checks the bytes against ``disk_format``) and
uploads it; :meth:`Glance.stop` and :meth:`Glance.start` take the service away and back.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import httpx

from tests.process import free_port, stop_process

CACHE: Final = Path(os.environ.get("TEST_REBUILDD_CACHE", "/var/cache/rebuildd-test"))
VENV: Final = CACHE / "glance-33.0.0"  # the pins live in scripts/openstack-venvs.sh

_CONF: Final = """\
[DEFAULT]
log_file = {base}/glance-api.log
node_staging_uri = file://{base}/staging
enabled_import_methods = []
[database]
connection = sqlite:///{base}/glance.db
[glance_store]
stores = file
default_store = file
filesystem_store_datadir = {base}/images/
[oslo_concurrency]
lock_path = {base}/locks
[paste_deploy]
flavor =
[oslo_policy]
enforce_scope = false
enforce_new_defaults = false
"""


@dataclass
class Glance:
    """A Glance served by gunicorn from ``base`` (config, database, image files, logs)."""

    url: str  # http://127.0.0.1:PORT, Glance's root (the client adds /v2)
    base: Path
    port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def store_dir(self) -> Path:
        """The filesystem store: one file per image, named by the image's id."""
        return self.base / "images"

    def start(self) -> None:
        """Serve (again) on the same port; return once Glance answers."""
        env = {**os.environ, "OS_GLANCE_CONFIG_DIR": str(self.base / "etc")}
        log = (self.base / "gunicorn.log").open("ab")
        self.process = subprocess.Popen(
            [
                str(VENV / "bin" / "gunicorn"),
                "--bind",
                f"127.0.0.1:{self.port}",
                "--workers",
                "1",
                "--timeout",
                "120",
                "glance.wsgi.api:application",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = (self.base / "gunicorn.log").read_text()[-2000:]
                raise RuntimeError(f"glance exited: {tail}")
            try:
                if httpx.get(f"{self.url}/v2/images", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError("glance did not answer within 60 s")

    def stop(self) -> None:
        """Stop gunicorn and wait until it is gone (its port then refuses connections)."""
        if self.process is None:
            return
        stop_process(self.process)
        self.process = None

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60)

    def create(self, **fields: Any) -> dict[str, Any]:
        with self.client() as client:
            response = client.post("/v2/images", json=fields)
        assert response.status_code == 201, response.text
        created: dict[str, Any] = response.json()
        return created

    def upload(self, name: str, *, pattern: int, **fields: Any) -> dict[str, Any]:
        """A new active qcow2 image (64 MiB virtual, its first MiB ``pattern``)."""
        image = self.create(name=name, disk_format="qcow2", container_format="bare", **fields)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "image.qcow2"
            make_qcow2(path, pattern)
            with self.client() as client, path.open("rb") as data:
                response = client.put(
                    f"/v2/images/{image['id']}/file",
                    content=data.read(),
                    headers={"Content-Type": "application/octet-stream"},
                )
            assert response.status_code == 204, response.text
        return self.show(image["id"])

    def show(self, image_id: str) -> dict[str, Any]:
        with self.client() as client:
            response = client.get(f"/v2/images/{image_id}")
        assert response.status_code == 200, response.text
        shown: dict[str, Any] = response.json()
        return shown


def make_qcow2(path: Path, pattern: int) -> None:
    """As rebuildd.demo makes its images: ``qemu-img create`` and a ``qemu-io`` pattern."""
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(path), "64M"], check=True, timeout=60
    )
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", f"write -P {pattern} 0 1M", str(path)],
        check=True,
        capture_output=True,
        timeout=60,
    )


def start_glance(base: Path) -> Glance:
    """Configure Glance in ``base``, migrate its database and serve it."""
    etc = base / "etc"
    for sub in ("images", "staging", "locks", "etc"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    (etc / "glance-api.conf").write_text(_CONF.format(base=base))
    shutil.copy(VENV / "etc" / "glance" / "glance-api-paste.ini", etc)
    subprocess.run(
        [str(VENV / "bin" / "glance-manage"), "--config-file", str(etc / "glance-api.conf"),
         "db_sync"],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    port = free_port()
    glance = Glance(url=f"http://127.0.0.1:{port}", base=base, port=port)
    glance.start()
    return glance
