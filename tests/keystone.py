"""A real Keystone for tests, started as ../shared/OPENSTACK-SERVICES.md measured it: keystone
30.0.0 from the venv ``scripts/openstack-venvs.sh`` installs (``make test`` runs it), SQLite,
fernet tokens, ``keystone-manage`` db_sync/fernet_setup/credential_setup/bootstrap, and gunicorn
serving ``keystone.wsgi.api:application`` through a module that resets ``sys.argv`` first
(Keystone parses it, and gunicorn's flags would kill its workers), on a free loopback port.

:func:`start_keystone` also creates, with the admin token, the projects, users and roles the
tests use (see :class:`Keystone`) and a catalog whose ``compute`` and ``image`` endpoints can be
pointed at the rebuildd under test (:meth:`Keystone.point_catalog_at`), and ``block-storage``
and ``volumev3`` endpoints (both named cinder, as devstack registers them) that tests/cinder.py
points at a real Cinder (:meth:`Keystone.point_volume_at`).
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import httpx

from tests.process import free_port, stop_process

CACHE: Final = Path(os.environ.get("TEST_REBUILDD_CACHE", "/var/cache/rebuildd-test"))
VENV: Final = CACHE / "keystone-30.0.0"  # the pins live in scripts/openstack-venvs.sh
ADMIN_PASSWORD: Final = "admin-secret"
PASSWORD: Final = "user-secret"  # every test user's

_CONF: Final = """\
[DEFAULT]
log_file = {base}/keystone.log
[database]
connection = sqlite:///{base}/keystone.db
[token]
provider = fernet
[fernet_tokens]
key_repository = {base}/fernet-keys
[credential]
key_repository = {base}/credential-keys
[identity]
# bcrypt's fewest rounds: a password token then costs ~50 ms instead of ~0.45 s.
password_hash_rounds = 4
"""
_WSGI: Final = (
    "import sys\nsys.argv = sys.argv[:1]\nfrom keystone.wsgi.api import application  # noqa\n"
)


@dataclass
class Keystone:
    """A running Keystone and what the fixture made in it (ids by name)."""

    url: str  # the identity endpoint, http://127.0.0.1:PORT/v3
    admin_token: str
    process: subprocess.Popen[bytes]
    base: Path
    projects: dict[str, str] = field(default_factory=dict)
    users: dict[str, str] = field(default_factory=dict)
    roles: dict[str, str] = field(default_factory=dict)
    _endpoints: dict[str, str] = field(default_factory=dict)

    def _admin(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"X-Auth-Token": self.admin_token}, timeout=30
        )

    def token(self, user: str, project: str) -> str:
        """A project-scoped password token of a test user."""
        return _password_token(self.url, user, PASSWORD, project)

    def revoke(self, token: str) -> None:
        with self._admin() as admin:
            response = admin.delete("/auth/tokens", headers={"X-Subject-Token": token})
            assert response.status_code == 204, response.text

    def point_catalog_at(self, rebuildd_url: str, *, image_url: str | None = None) -> None:
        """The catalog's compute (``/v2.1``) endpoint: this rebuildd; its image endpoint:
        ``image_url`` (a real Glance) or else this rebuildd's ``/image``."""
        urls = {"compute": f"{rebuildd_url}/v2.1", "image": image_url or f"{rebuildd_url}/image"}
        with self._admin() as admin:
            for service_type, url in urls.items():
                endpoint = self._endpoints[service_type]
                body = {"endpoint": {"url": url}}
                response = admin.patch(f"/endpoints/{endpoint}", json=body)
                assert response.status_code == 200, response.text

    def point_volume_at(self, cinder_url: str) -> None:
        """The catalog's block-storage and volumev3 endpoints: this Cinder's ``/v3`` root."""
        url = f"{cinder_url}/%(project_id)s"
        with self._admin() as admin:
            for service_type in VOLUME_SERVICE_TYPES:
                endpoint = self._endpoints[service_type]
                response = admin.patch(f"/endpoints/{endpoint}", json={"endpoint": {"url": url}})
                assert response.status_code == 200, response.text

    def stop(self) -> None:
        stop_process(self.process)


def _password_token(url: str, user: str, password: str, project: str) -> str:
    body = {
        "auth": {
            "identity": {
                "methods": ["password"],
                "password": {
                    "user": {"name": user, "domain": {"id": "default"}, "password": password}
                },
            },
            "scope": {"project": {"name": project, "domain": {"id": "default"}}},
        }
    }
    response = httpx.post(f"{url}/auth/tokens", json=body, timeout=30)
    assert response.status_code == 201, response.text
    return response.headers["X-Subject-Token"]


def _manage(base: Path, *args: str) -> None:
    subprocess.run(
        [
            str(VENV / "bin" / "keystone-manage"),
            "--config-file",
            str(base / "keystone.conf"),
            *args,
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )


def start_keystone(base: Path) -> Keystone:
    """Configure, bootstrap and serve a Keystone in ``base``; then fill it (see module doc)."""
    base.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}/v3"
    (base / "keystone.conf").write_text(_CONF.format(base=base))
    (base / "keystone_wsgi.py").write_text(_WSGI)
    owner = ("--keystone-user", "root", "--keystone-group", "root")
    _manage(base, "db_sync")
    _manage(base, "fernet_setup", *owner)
    _manage(base, "credential_setup", *owner)
    _manage(
        base,
        "bootstrap",
        "--bootstrap-password",
        ADMIN_PASSWORD,
        "--bootstrap-region-id",
        "RegionOne",
        *(f"--bootstrap-{kind}-url={url}" for kind in ("admin", "public", "internal")),
    )
    env = {**os.environ, "OS_KEYSTONE_CONFIG_FILES": str(base / "keystone.conf")}
    log = (base / "gunicorn.log").open("ab")
    process = subprocess.Popen(
        [
            str(VENV / "bin" / "gunicorn"),
            "--bind",
            f"127.0.0.1:{port}",
            "--workers",
            "2",
            "--chdir",
            str(base),
            "keystone_wsgi:application",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        _wait_until_up(url, process, base)
        keystone = Keystone(
            url=url,
            admin_token=_password_token(url, "admin", ADMIN_PASSWORD, "admin"),
            process=process,
            base=base,
        )
        _populate(keystone)
    except BaseException:
        process.terminate()
        process.wait(timeout=30)
        raise
    return keystone


def _wait_until_up(url: str, process: subprocess.Popen[bytes], base: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"keystone exited: {(base / 'gunicorn.log').read_text()[-2000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError("keystone did not answer within 60 s")


# Projects, and users with their role in a project: user -> (project, role).
PROJECTS: Final = ("demo", "other", "service")
USERS: Final = {
    "demo-member": ("demo", "member"),
    "demo-reader": ("demo", "reader"),
    "other-member": ("other", "member"),
    "cinder": ("service", "service"),  # another service, as Cinder posts external events
    "rebuildd": ("service", "service"),  # rebuildd's own service user
}
# Roles beyond the one above: rebuildd acts on other projects' Cinder volumes, as Nova's
# service user does, so it is an admin too (README: Volumes from Cinder).
EXTRA_ROLES: Final = {"rebuildd": ("admin",)}

# The catalog's services: type -> name. The volume ones stay unset until a Cinder starts.
VOLUME_SERVICE_TYPES: Final = ("block-storage", "volumev3")
SERVICES: Final = {
    "compute": "nova",
    "image": "glance",
    **{service_type: "cinder" for service_type in VOLUME_SERVICE_TYPES},
}


def _populate(keystone: Keystone) -> None:
    with keystone._admin() as admin:

        def create(path: str, kind: str, body: dict[str, Any]) -> str:
            response = admin.post(path, json={kind: body})
            assert response.status_code == 201, response.text
            created: str = response.json()[kind]["id"]
            return created

        roles = {r["name"]: r["id"] for r in admin.get("/roles").json()["roles"]}
        for name in ("member", "reader", "service"):
            if name not in roles:
                roles[name] = create("/roles", "role", {"name": name})
        keystone.roles = roles
        for name in PROJECTS:
            keystone.projects[name] = create(
                "/projects", "project", {"name": name, "domain_id": "default"}
            )
        for user, (project, role) in USERS.items():
            body = {"name": user, "password": PASSWORD, "domain_id": "default"}
            user_id = keystone.users[user] = create("/users", "user", body)
            project_id = keystone.projects[project]
            for name in (role, *EXTRA_ROLES.get(user, ())):
                granted = admin.put(f"/projects/{project_id}/users/{user_id}/roles/{roles[name]}")
                assert granted.status_code == 204, granted.text
        for service_type, name in SERVICES.items():
            service = create("/services", "service", {"type": service_type, "name": name})
            body = {
                "service_id": service,
                "interface": "public",
                "region_id": "RegionOne",
                "url": "http://127.0.0.1:9/unset",
            }
            keystone._endpoints[service_type] = create("/endpoints", "endpoint", body)
