"""The authorization matrix's core against a real Keystone (tests/keystone.py): tokens whose
roles Keystone grants (and implies: admin -> member -> reader) meet Glance's, Cinder's and
Nova's default policies as the tokens file's do (tests/test_authz_matrix.py has the full
matrix). One live daemon for the module."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from tests.keystone import PASSWORD, Keystone
from tests.live import LiveDaemon, start_live_daemon

PATCH = "application/openstack-images-v2.1-json-patch"


@dataclass
class World:
    live: LiveDaemon
    tokens: dict[str, str]
    server: str
    private_image: str
    volume: str
    project: str  # the demo project's id

    def client(self, user: str) -> httpx.Client:
        headers = {"X-Auth-Token": self.tokens[user]}
        return httpx.Client(base_url=self.live.url, headers=headers, timeout=30)


def _grant_extra_users(keystone: Keystone) -> None:
    """An admin and a user whose only role is none of Nova's, in the demo project."""
    with keystone._admin() as admin:
        roles = {r["name"]: r["id"] for r in admin.get("/roles").json()["roles"]}
        if "observer" not in roles:
            created = admin.post("/roles", json={"role": {"name": "observer"}})
            roles["observer"] = created.json()["role"]["id"]
        for user, role in (("authz-admin", "admin"), ("authz-norole", "observer")):
            if user in keystone.users:
                continue
            body = {"user": {"name": user, "password": PASSWORD, "domain_id": "default"}}
            user_id = keystone.users[user] = admin.post("/users", json=body).json()["user"]["id"]
            project = keystone.projects["demo"]
            granted = admin.put(f"/projects/{project}/users/{user_id}/roles/{roles[role]}")
            assert granted.status_code == 204, granted.text


@pytest.fixture(scope="module")
def world(keystone: Keystone, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    _grant_extra_users(keystone)
    tokens = {
        "admin": keystone.token("authz-admin", "demo"),
        "member": keystone.token("demo-member", "demo"),
        "reader": keystone.token("demo-reader", "demo"),
        "norole": keystone.token("authz-norole", "demo"),
        "other": keystone.token("other-member", "other"),
        "service": keystone.token("cinder", "service"),
    }
    live = start_live_daemon(
        tmp_path_factory.mktemp("authz-keystone"),
        auth="keystone",
        keystone_url=keystone.url,
        keystone_username="rebuildd",
        keystone_password=PASSWORD,
        keystone_project_name="service",
    )
    live.client.headers["X-Auth-Token"] = tokens["admin"]
    try:
        headers = {"X-Auth-Token": tokens["member"]}
        with httpx.Client(base_url=live.url, headers=headers, timeout=30) as member:
            body = {"server": {"name": "ks", "imageRef": live.image_ids[0], "flavorRef": "1"}}
            server = member.post("/v2.1/servers", json=body).json()["server"]["id"]
            live.wait_for(server, "ACTIVE")
            image = {"name": "p", "disk_format": "raw", "container_format": "bare"}
            image_id = member.post("/image/v2/images", json={**image, "visibility": "private"})
            project = keystone.projects["demo"]
            volume = member.post(f"/volume/v3/{project}/volumes", json={"volume": {"size": 1}})
            assert volume.status_code == 202, volume.text
        yield World(
            live=live,
            tokens=tokens,
            server=server,
            private_image=image_id.json()["id"],
            volume=volume.json()["volume"]["id"],
            project=project,
        )
    finally:
        live.stop()


READS = [
    ("/v2.1/servers/{server}", {"admin": 200, "member": 200, "reader": 200, "norole": 403}),
    ("/v2.1/servers/{server}", {"other": 404}),
    ("/v2.1/servers", {"reader": 200, "norole": 403}),
    ("/image/v2/images/{image}", {"member": 200, "reader": 200, "norole": 404, "other": 404}),
    ("/image/v2/images", {"reader": 200, "norole": 403}),
    ("/volume/v3/volumes/{volume}", {"admin": 200, "reader": 200, "norole": 403, "other": 404}),
]


@pytest.mark.parametrize(
    ("path", "user", "status"),
    [
        pytest.param(path, user, status, id=f"GET {path} as {user}")
        for path, expected in READS
        for user, status in expected.items()
    ],
)
def test_read(world: World, path: str, user: str, status: int) -> None:
    """Keystone's roles meet the read policies as the tokens file's do."""
    filled = path.format(server=world.server, image=world.private_image, volume=world.volume)
    with world.client(user) as client:
        assert client.get(filled).status_code == status


def _image(world: World) -> object:
    with world.client("admin") as admin:
        return admin.get(f"/image/v2/images/{world.private_image}").json()


@pytest.mark.parametrize(("user", "status"), [("reader", 403), ("norole", 404), ("other", 404)])
def test_an_image_only_its_projects_members_change(world: World, user: str, status: int) -> None:
    """A reader is refused (403), others do not see it (404); the image is unchanged."""
    before = _image(world)
    ops = json.dumps([{"op": "replace", "path": "/protected", "value": True}])
    with world.client(user) as client:
        path = f"/image/v2/images/{world.private_image}"
        patched = client.patch(path, content=ops, headers={"Content-Type": PATCH})
        assert (patched.status_code, client.delete(path).status_code) == (status, status)
    assert _image(world) == before


@pytest.mark.parametrize("user", ["reader", "norole"])
def test_only_members_create_volumes_or_rebuild(world: World, user: str) -> None:
    """Cinder's volume:create and Nova's rebuild refuse a reader and a no-role user (403)."""
    with world.client(user) as client:
        created = client.post(f"/volume/v3/{world.project}/volumes", json={"volume": {"size": 1}})
        assert created.status_code == 403
        rebuild = {"rebuild": {"imageRef": world.live.image_ids[0]}}
        assert client.post(f"/v2.1/servers/{world.server}/action", json=rebuild).status_code == 403


def test_another_project_cannot_boot_a_private_image(world: World) -> None:
    """An image the caller cannot see is Nova's 400, as if it did not exist."""
    body = {"server": {"name": "x", "imageRef": world.private_image, "flavorRef": "1"}}
    with world.client("other") as other:
        response = other.post("/v2.1/servers", json=body)
    assert response.status_code == 400
    assert response.json()["badRequest"]["message"] == "Can not find requested image"
