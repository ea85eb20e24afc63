"""A real Cinder for tests, started as ../shared/OPENSTACK-SERVICES.md measured it: cinder 29.0.0
from the venv ``scripts/openstack-venvs.sh`` installs (``make test`` runs it), SQLite after
``cinder-manage db sync``, and scheduler, volume and ``osapi_volume`` services in ONE process (an
``oslo_service`` ``ServiceLauncher`` run by a launcher module written into ``base``, as
tests/keystone.py writes its WSGI module) so that ``transport_url = fake://`` carries their RPC.

- Auth: ``auth_strategy = keystone``, keystonemiddleware's authtoken validating against the
  Keystone of tests/keystone.py as its ``cinder`` service user; oslo.policy's scope and new
  defaults off. :func:`start_cinder` points the catalog's ``block-storage``/``volumev3``
  endpoints at it (``http://127.0.0.1:PORT/v3/%(project_id)s``).
- Nova: ``[nova]`` password auth as the ``cinder`` user (project service), so Cinder posts
  ``os-server-external-events`` (``volume-reimaged``, compute 2.93) to the catalog's ``compute``
  endpoint (public, RegionOne). Nothing is cached: ``cinder.compute.nova.novaclient`` loads a new
  auth plugin, hence a new token and a new catalog, for every post, so re-pointing the compute
  endpoint after Cinder's first post is seen by its next one (tests/test_cinder_fixture.py
  proves it). An attachment DELETE without a service token asks Nova too, with the user's token.
- Images: ``glance_api_servers`` = the Glance of tests/glance.py (a ``[DEFAULT]`` option in
  Cinder 29, not ``[glance]``).
- Storage: Cinder's real NFS driver on a local directory. The share ``127.0.0.1:BASE/export`` is
  "mounted" by ``mount --bind BASE/export BASE/mnt/<md5 of the share>`` before Cinder starts
  (os-brick only looks for that path in /proc/mounts; ``mount.nfs`` is never run), unmounted by
  :meth:`Cinder.stop`. Volumes are sparse raw files ``volume-<id>`` in the export directory.
- Root: Cinder runs ``sudo cinder-rootwrap CONF CMD...``; Debian has no sudo, and the tests run
  as root, so a ``sudo`` shim first on Cinder's PATH drops ``cinder-rootwrap CONF`` and execs
  the rest.

Start to ready (db sync, bind mount, launcher, until an authenticated ``GET /volumes`` answers
and the scheduler lists the NFS pool): 3.2-3.6 s measured on these machines; stop ~2 s. The
session's first Cinder test also waits for Keystone (~11 s) and Glance (~4 s): ~19 s in all.
Needs root (the bind mount). Logs: ``BASE/cinder.log`` (Cinder's) and ``BASE/launcher.log``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import httpx

from tests.keystone import PASSWORD, Keystone
from tests.process import free_port, stop_process

CACHE: Final = Path(os.environ.get("TEST_REBUILDD_CACHE", "/var/cache/rebuildd-test"))
VENV: Final = CACHE / "cinder-29.0.0"  # the pins live in scripts/openstack-venvs.sh
MICROVERSION: Final = "3.68"  # os-reimage; attachments need 3.27+, os-complete 3.44+
BACKEND: Final = "nfs"

_CONF: Final = """\
[DEFAULT]
log_file = {base}/cinder.log
debug = true
state_path = {base}/state
host = rebuildd-cinder
my_ip = 127.0.0.1
transport_url = fake://
auth_strategy = keystone
api_paste_config = {base}/api-paste.ini
rootwrap_config = {base}/rootwrap.conf
resource_query_filters_file = {base}/resource_filters.json
osapi_volume_listen = 127.0.0.1
osapi_volume_listen_port = {port}
osapi_volume_workers = 1
enabled_backends = {backend}
glance_api_servers = {glance_url}
# One Cinder serves the whole session: no per-project limits (the default is 10 volumes).
quota_volumes = -1
quota_gigabytes = -1
quota_snapshots = -1
[database]
connection = sqlite:///{base}/cinder.db
[oslo_concurrency]
lock_path = {base}/locks
[coordination]
backend_url = file://{base}/coordination
[oslo_policy]
enforce_scope = false
enforce_new_defaults = false
[keystone_authtoken]
www_authenticate_uri = {keystone_url}
auth_url = {keystone_url}
auth_type = password
username = cinder
password = {password}
project_name = service
user_domain_id = default
project_domain_id = default
[nova]
auth_type = password
auth_url = {keystone_url}
username = cinder
password = {password}
project_name = service
user_domain_id = default
project_domain_id = default
region_name = RegionOne
interface = public
[{backend}]
volume_backend_name = {backend}
volume_driver = cinder.volume.drivers.nfs.NfsDriver
nfs_shares_config = {base}/nfs_shares
nfs_mount_point_base = {base}/mnt
nfs_sparsed_volumes = true
# Root owns everything here: no chown/chmod dance, no "secure" mode checks.
nas_secure_file_operations = false
nas_secure_file_permissions = false
"""
# cinder.cmd.{scheduler,volume,api}'s mains, run by one ServiceLauncher in one process.
_LAUNCHER: Final = """\
from cinder import monkey_patch; monkey_patch.patch()  # noqa
import shlex
import sys

import os_brick
from oslo_config import cfg
from oslo_log import log as logging
from oslo_privsep import priv_context
from oslo_service import service as oslo_service

from cinder import coordination, objects, rpc, service, utils, version
from cinder.common import config, constants

CONF = cfg.CONF
objects.register_all()
CONF(sys.argv[1:], project="cinder", version=version.version_string())
config.set_middleware_defaults()
logging.setup(CONF, "cinder")
priv_context.init(root_helper=shlex.split(utils.get_root_helper()))
os_brick.setup(CONF)
coordination.COORDINATOR.start()
rpc.init(CONF)
launcher = oslo_service.ServiceLauncher(CONF, restart_method="mutate")
launcher.launch_service(service.Service.create(binary="cinder-scheduler"))
launcher.launch_service(
    service.Service.create(
        host=f"{CONF.host}@{BACKEND}", service_name="{BACKEND}",
        binary=constants.VOLUME_BINARY, coordination=True,
    )
)
launcher.launch_service(service.WSGIService("osapi_volume"))
launcher.wait()
"""
# `sudo cinder-rootwrap CONF CMD...` -> CMD... (we are root; Debian has no sudo).
_SUDO: Final = """\
#!/bin/sh
[ "$(basename "$1")" = cinder-rootwrap ] && shift 2
exec "$@"
"""


@dataclass
class Cinder:
    """A running Cinder (see module doc) and where its NFS share lives."""

    url: str  # the v3 root, http://127.0.0.1:PORT/v3
    base: Path
    share: str  # as in nfs_shares_config, 127.0.0.1:BASE/export
    process: subprocess.Popen[bytes] | None
    keystone: Keystone | None = None

    @property
    def export_dir(self) -> Path:
        return self.base / "export"

    @property
    def mount_base(self) -> Path:
        return self.base / "mnt"

    @property
    def mount_point(self) -> Path:
        """Where os-brick expects the share mounted: ``mount_base``/md5(share)."""
        return self.mount_base / hashlib.md5(self.share.encode()).hexdigest()

    def volume_path(self, volume_id: str) -> Path:
        """A volume's file (sparse raw), in the export directory."""
        return self.export_dir / f"volume-{volume_id}"

    def client(self, token: str, project_id: str, microversion: str = MICROVERSION) -> httpx.Client:
        return httpx.Client(
            base_url=f"{self.url}/{project_id}",
            headers={"X-Auth-Token": token, "OpenStack-API-Version": f"volume {microversion}"},
            timeout=60,
        )

    def show(self, token: str, project_id: str, volume_id: str) -> dict[str, Any]:
        with self.client(token, project_id) as client:
            response = client.get(f"/volumes/{volume_id}")
        assert response.status_code == 200, response.text
        shown: dict[str, Any] = response.json()["volume"]
        return shown

    def wait_for(
        self, token: str, project_id: str, volume_id: str, status: str, timeout: float = 60
    ) -> dict[str, Any]:
        """The volume once its status is ``status``; raises if it settles elsewhere or times out."""
        transient = {"creating", "downloading", "attaching", "detaching", "deleting"}
        deadline = time.monotonic() + timeout
        while True:
            volume = self.show(token, project_id, volume_id)
            if volume["status"] == status:
                return volume
            if volume["status"] not in transient | {"reserved", "available", "in-use"}:
                raise RuntimeError(f"volume {volume_id} is {volume['status']}, not {status}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"volume {volume_id} still {volume['status']} after {timeout} s")
            time.sleep(0.2)

    def create_volume(
        self, token: str, project_id: str, size_gb: int, image_id: str | None = None
    ) -> dict[str, Any]:
        """A new volume (from a Glance image if given), once it is ``available``."""
        body: dict[str, Any] = {"size": size_gb}
        if image_id is not None:
            body["imageRef"] = image_id
        with self.client(token, project_id) as client:
            response = client.post("/volumes", json={"volume": body})
        assert response.status_code == 202, response.text
        return self.wait_for(token, project_id, response.json()["volume"]["id"], "available")

    def start(self) -> None:
        """(Again) bind-mount the share if it is not, run the launcher, wait until it serves."""
        if not _mounted(self.mount_point):
            subprocess.run(
                ["mount", "--bind", str(self.export_dir), str(self.mount_point)],
                check=True, capture_output=True, timeout=60,
            )  # fmt: skip
        log = (self.base / "launcher.log").open("ab")
        self.process = subprocess.Popen(
            [str(VENV / "bin" / "python"), str(self.base / "cinder_all.py"), *self._conf],
            env=self._env,
            cwd=self.base,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        assert self.keystone is not None
        _wait_until_up(self, self.keystone)

    @property
    def _conf(self) -> tuple[str, str]:
        return ("--config-file", str(self.base / "cinder.conf"))

    @property
    def _env(self) -> dict[str, str]:
        return {**os.environ, "PATH": f"{self.base / 'bin'}:{VENV / 'bin'}:{os.environ['PATH']}"}

    def stop(self, *, unmount: bool = True) -> None:
        """Stop the launcher (SIGTERM, then SIGKILL) and, unless told not to (a Cinder outage
        leaves a compute host's mounts alone), unmount the share."""
        if self.process is not None:
            stop_process(self.process)
            self.process = None
        if unmount and _mounted(self.mount_point):
            subprocess.run(["umount", str(self.mount_point)], check=True, timeout=60)


def _mounted(path: Path) -> bool:
    return any(
        line.split()[1] == str(path) for line in Path("/proc/mounts").read_text().splitlines()
    )


def _configure(base: Path, cinder: Cinder, port: int, keystone: Keystone, glance_url: str) -> None:
    for sub in ("state", "locks", "coordination", "bin", "export"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    cinder.mount_point.mkdir(parents=True, exist_ok=True)
    (base / "cinder.conf").write_text(
        _CONF.format(
            base=base,
            port=port,
            backend=BACKEND,
            glance_url=glance_url,
            keystone_url=keystone.url,
            password=PASSWORD,
        )
    )
    (base / "nfs_shares").write_text(f"{cinder.share}\n")
    (base / "cinder_all.py").write_text(_LAUNCHER.replace("{BACKEND}", BACKEND))
    sudo = base / "bin" / "sudo"
    sudo.write_text(_SUDO)
    sudo.chmod(0o755)
    etc = VENV / "etc" / "cinder"
    shutil.copy(etc / "api-paste.ini", base)
    shutil.copy(etc / "resource_filters.json", base)
    shutil.copy(etc / "rootwrap.conf", base)  # never read: the sudo shim skips rootwrap


def start_cinder(base: Path, keystone: Keystone, glance_url: str) -> Cinder:
    """Configure Cinder in ``base``, migrate, bind-mount the share, serve; then catalog it."""
    base.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cinder = Cinder(
        url=f"http://127.0.0.1:{port}/v3",
        base=base,
        share=f"127.0.0.1:{base / 'export'}",
        process=None,
        keystone=keystone,
    )
    _configure(base, cinder, port, keystone, glance_url)
    subprocess.run(
        [str(VENV / "bin" / "cinder-manage"), *cinder._conf, "db", "sync"],
        check=True, capture_output=True, env=cinder._env, timeout=300,
    )  # fmt: skip
    try:
        cinder.start()
        keystone.point_volume_at(cinder.url)
    except BaseException:
        cinder.stop()
        raise
    return cinder


def _tail(base: Path) -> str:
    logs = [base / name for name in ("launcher.log", "cinder.log")]
    return "\n".join(f"{p.name}: {p.read_text()[-3000:]}" for p in logs if p.exists())


def _admin_project(keystone: Keystone) -> str:
    """The bootstrap's admin project (the admin token's): get-pools is admin-only."""
    response = httpx.get(
        f"{keystone.url}/auth/tokens",
        headers={"X-Auth-Token": keystone.admin_token, "X-Subject-Token": keystone.admin_token},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    project: str = response.json()["token"]["project"]["id"]
    return project


def _wait_until_up(cinder: Cinder, keystone: Keystone) -> None:
    """Until the API answers an authenticated request and the NFS backend reports a pool."""
    assert cinder.process is not None
    token = keystone.token("demo-member", "demo")
    project = keystone.projects["demo"]
    admin_project = _admin_project(keystone)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if cinder.process.poll() is not None:
            raise RuntimeError(f"cinder exited: {_tail(cinder.base)}")
        try:
            with cinder.client(keystone.admin_token, admin_project) as admin:
                pools = admin.get("/scheduler-stats/get_pools")
            with cinder.client(token, project) as client:
                if client.get("/volumes").status_code == 200 and pools.json().get("pools"):
                    return
        except (httpx.TransportError, ValueError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"cinder did not get ready within 60 s: {_tail(cinder.base)}")
