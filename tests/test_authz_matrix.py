"""Authorization on every resource (issue 17, section 2): two projects, and admin, member,
reader and no-role users over every route under ``REBUILDD_AUTH=token``; what Nova's,
Glance's and Cinder's default policies allow and refuse, and that a refused call changed
nothing. One live daemon per database (SQLite, PostgreSQL) for the module; its resources are
made once by project A's member."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import _drop_postgres_database, _postgres_database, require
from tests.live import LiveDaemon, start_live_daemon

TOKENS = """
[tokens.admin]
user_id = "root"
project_id = "pa"
roles = ["admin"]

[tokens.member_a]
user_id = "ann"
project_id = "pa"
roles = ["member"]

[tokens.member_a2]
user_id = "amy"
project_id = "pa"
roles = ["member"]

[tokens.reader_a]
user_id = "rae"
project_id = "pa"
roles = ["reader"]

[tokens.norole_a]
user_id = "nob"
project_id = "pa"
roles = ["observer"]

[tokens.member_b]
user_id = "ben"
project_id = "pb"
roles = ["member"]

[tokens.reader_b]
user_id = "rob"
project_id = "pb"
roles = ["reader"]

[tokens.service]
user_id = "cinder"
project_id = "service"
roles = ["service"]
"""
USERS = ("admin", "member_a", "reader_a", "norole_a", "member_b", "reader_b")
PATCH = "application/openstack-images-v2.1-json-patch"


@dataclass
class World:
    live: LiveDaemon
    tokens_file: Path
    clients: dict[str, httpx.Client]
    server: str  # project A's, ACTIVE
    private_image: str  # project A's, private, active
    queued_image: str  # project A's, private, no data yet
    public_image: str  # the "admin" project's (demo seed), public
    volume: str  # project A's, available
    keypair: str  # member_a's

    def __call__(self, user: str) -> httpx.Client:
        return self.clients[user]


def _client(live: LiveDaemon, token: str) -> httpx.Client:
    return httpx.Client(
        base_url=live.url,
        headers={"X-Auth-Token": token, "OpenStack-API-Version": "compute 2.1"},
        timeout=30,
    )


def _image(client: httpx.Client, data: bytes | None, **fields: Any) -> str:
    body = {"name": "img", "disk_format": "raw", "container_format": "bare", **fields}
    response = client.post("/image/v2/images", json=body)
    assert response.status_code == 201, response.text
    image_id: str = response.json()["id"]
    if data is not None:
        upload = client.put(
            f"/image/v2/images/{image_id}/file",
            content=data,
            headers={"Content-Type": "application/octet-stream"},
        )
        assert upload.status_code == 204, upload.text
    return image_id


def _volume(client: httpx.Client, project: str) -> str:
    response = client.post(f"/volume/v3/{project}/volumes", json={"volume": {"size": 1}})
    assert response.status_code == 202, response.text
    volume_id: str = response.json()["volume"]["id"]
    for _ in range(3000):
        shown = client.get(f"/volume/v3/{project}/volumes/{volume_id}").json()["volume"]
        if shown["status"] == "available":
            return volume_id
        assert shown["status"] == "creating", shown
        time.sleep(0.02)
    raise AssertionError("volume never became available")


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """The daemon's database settings: SQLite in its state directory, or a fresh PostgreSQL
    database."""
    if request.param == "sqlite":
        yield {}
        return
    try:
        url = asyncio.run(_postgres_database())
    except Exception as exc:  # asyncpg raises several unrelated types when it is down
        require("PostgreSQL", str(exc))
        raise
    try:
        yield {"database_url": url}
    finally:
        asyncio.run(_drop_postgres_database(url))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, database: dict[str, Any]) -> Iterator[World]:
    base = tmp_path_factory.mktemp("authz")
    tokens = base / "tokens.toml"
    tokens.write_text(TOKENS)
    tokens.chmod(0o600)
    live = start_live_daemon(base / "state", auth="token", tokens_file=tokens, **database)
    live.client.headers["X-Auth-Token"] = "admin"
    names = (*USERS, "member_a2", "service")
    clients = {name: _client(live, name) for name in names}
    try:
        member = clients["member_a"]
        body = {"server": {"name": "a", "imageRef": live.image_ids[0], "flavorRef": "1"}}
        created = member.post("/v2.1/servers", json=body)
        assert created.status_code == 202, created.text
        server = created.json()["server"]["id"]
        live.wait_for(server, "ACTIVE")
        key = member.post(
            "/v2.1/os-keypairs",
            json={"keypair": {"name": "ka", "public_key": _PUBLIC_KEY}},
        )
        assert key.status_code == 200, key.text
        yield World(
            live=live,
            tokens_file=tokens,
            clients=clients,
            server=server,
            private_image=_image(member, b"\0" * 65536, visibility="private"),
            queued_image=_image(member, None, visibility="private"),
            public_image=live.image_ids[0],
            volume=_volume(member, "pa"),
            keypair="ka",
        )
    finally:
        for client in clients.values():
            client.close()
        live.stop()


_PUBLIC_KEY = (
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGp1Yx2s5wO5Uf0Zq0H5xk0w1aWlYb6m3j0s0y0t0u0v test"
)


def _fill(template: str, world: World) -> str:
    return template.format(
        server=world.server,
        private=world.private_image,
        queued=world.queued_image,
        public=world.public_image,
        volume=world.volume,
        keypair=world.keypair,
    )


# -- reads: (route, {user: status}) ----------------------------------------------------------

READS: list[tuple[str, dict[str, int]]] = [
    # Nova: PROJECT_READER_OR_ADMIN; another project's server does not exist for the caller.
    ("/v2.1/servers", dict.fromkeys(USERS, 200) | {"norole_a": 403}),
    ("/v2.1/servers/detail", dict.fromkeys(USERS, 200) | {"norole_a": 403}),
    (
        "/v2.1/servers/{server}",
        {"admin": 200, "member_a": 200, "reader_a": 200, "norole_a": 403}
        | {"member_b": 404, "reader_b": 404},
    ),
    (
        "/v2.1/servers/{server}/os-instance-actions",
        {"admin": 200, "member_a": 200, "reader_a": 200, "norole_a": 403}
        | {"member_b": 404, "reader_b": 404},
    ),
    (
        "/v2.1/servers/{server}/os-volume_attachments",
        {"admin": 200, "member_a": 200, "reader_a": 200, "norole_a": 403}
        | {"member_b": 404, "reader_b": 404},
    ),
    # Nova: key pairs are their user's (admin or user_id).
    (
        "/v2.1/os-keypairs/{keypair}",
        {"member_a": 200, "reader_a": 404, "norole_a": 404, "member_b": 404, "reader_b": 404},
    ),
    # Glance: get_images (a reader), get_image (a reader who sees it), download (a member).
    ("/image/v2/images", dict.fromkeys(USERS, 200) | {"norole_a": 403}),
    (
        "/image/v2/images/{private}",
        {"admin": 200, "member_a": 200, "reader_a": 200, "norole_a": 404}
        | {"member_b": 404, "reader_b": 404},
    ),
    (
        "/image/v2/images/{private}/file",
        {"admin": 200, "member_a": 200, "reader_a": 403, "norole_a": 404}
        | {"member_b": 404, "reader_b": 404},
    ),
    ("/image/v2/images/{public}", dict.fromkeys(USERS, 200) | {"norole_a": 404}),
    (
        "/image/v2/images/{public}/file",
        {"admin": 200, "member_a": 200, "reader_a": 403, "norole_a": 404}
        | {"member_b": 200, "reader_b": 403},
    ),
    ("/v2.1/v2/images/{private}", {"member_a": 200, "member_b": 404, "norole_a": 404}),
    # Cinder: PROJECT_READER_OR_ADMIN, in the caller's project.
    (
        "/volume/v3/pa/volumes",
        {"admin": 200, "member_a": 200, "reader_a": 200, "norole_a": 403},
    ),
    ("/volume/v3/pb/volumes/detail", {"member_b": 200, "reader_b": 200}),
    (
        "/volume/v3/pa/volumes/{volume}",
        {"admin": 200, "member_a": 200, "reader_a": 200, "norole_a": 403},
    ),
    ("/volume/v3/pb/volumes/{volume}", {"member_b": 404, "reader_b": 404}),
]
READ_CASES = [
    pytest.param(path, user, status, id=f"GET {path} as {user}")
    for path, expected in READS
    for user, status in expected.items()
]


@pytest.mark.parametrize(("path", "user", "status"), READ_CASES)
def test_read(world: World, path: str, user: str, status: int) -> None:
    """Each reader sees what its project's policies let it see, and nothing else."""
    response = world(user).get(_fill(path, world))
    assert response.status_code == status, response.text


@pytest.mark.parametrize(
    ("path", "key"),
    [
        ("/v2.1/servers", "servers"),
        ("/image/v2/images", "images"),
        ("/volume/v3/pb/volumes", "volumes"),
    ],
)
def test_another_project_lists_none_of_project_as(world: World, path: str, key: str) -> None:
    """Project B's lists hold none of project A's server, private images or volumes."""
    listed = {item["id"] for item in world("member_b").get(path).json()[key]}
    assert not listed & {world.server, world.private_image, world.queued_image, world.volume}
    if key == "images":
        assert world.public_image in listed


# -- writes refused: (method, route, body, probe, {user: status}) ------------------------------

SERVER_PROBE = "/v2.1/servers/{server}"
IMAGE_PROBE = "/image/v2/images/{private}"
NO_MEMBER = {"reader_a": 403, "norole_a": 403, "member_b": 404, "reader_b": 404}
WRITES: list[tuple[str, str, Any, str, dict[str, int]]] = [
    ("POST", "/v2.1/servers/{server}/action", {"os-stop": None}, SERVER_PROBE, NO_MEMBER),
    ("POST", "/v2.1/servers/{server}/action", {"lock": None}, SERVER_PROBE, NO_MEMBER),
    # Nova's os_compute_api:os-admin-actions:reset_state: admin only.
    (
        "POST",
        "/v2.1/servers/{server}/action",
        {"os-resetState": {"state": "error"}},
        SERVER_PROBE,
        NO_MEMBER | {"member_a": 403, "member_a2": 403},
    ),
    (
        "POST",
        "/v2.1/servers/{server}/action",
        {"rebuild": {"imageRef": "{public}"}},
        SERVER_PROBE,
        NO_MEMBER,
    ),
    ("DELETE", "/v2.1/servers/{server}", None, SERVER_PROBE, NO_MEMBER),
    (
        "POST",
        "/v2.1/servers/{server}/os-volume_attachments",
        {"volumeAttachment": {"volumeId": "{volume}"}},
        "/v2.1/servers/{server}/os-volume_attachments",
        NO_MEMBER,
    ),
    (
        "POST",
        "/v2.1/servers",
        {"server": {"name": "x", "imageRef": "{public}", "flavorRef": "1"}},
        "/v2.1/servers?all_tenants=1",
        {"reader_a": 403, "norole_a": 403, "reader_b": 403},
    ),
    (
        "POST",
        "/v2.1/os-server-external-events",
        {"events": [{"name": "network-vif-plugged", "server_uuid": "{server}"}]},
        SERVER_PROBE,
        {"member_a": 403, "reader_a": 403, "norole_a": 403, "member_b": 403},
    ),
    (
        "DELETE",
        "/v2.1/os-keypairs/{keypair}",
        None,
        "/v2.1/os-keypairs",
        {"reader_a": 404, "norole_a": 404, "member_b": 404, "admin": 404},
    ),
    # Glance: a member of the owner's project, or an admin, changes an image.
    ("DELETE", "/image/v2/images/{private}", None, IMAGE_PROBE, NO_MEMBER | {"norole_a": 404}),
    (
        "PATCH",
        "/image/v2/images/{private}",
        [{"op": "replace", "path": "/name", "value": "mine"}],
        IMAGE_PROBE,
        NO_MEMBER | {"norole_a": 404},
    ),
    (
        "PUT",
        "/image/v2/images/{queued}/file",
        b"\0" * 4096,
        "/image/v2/images/{queued}",
        NO_MEMBER | {"norole_a": 404},
    ),
    (
        "DELETE",
        "/image/v2/images/{public}",
        None,
        "/image/v2/images/{public}",
        {"member_a": 403, "reader_a": 403, "norole_a": 404, "member_b": 403},
    ),
    (
        "PATCH",
        "/image/v2/images/{public}",
        [{"op": "replace", "path": "/protected", "value": True}],
        "/image/v2/images/{public}",
        {"member_a": 403, "member_b": 403, "reader_b": 403},
    ),
    (
        "PATCH",
        "/image/v2/images/{private}",
        [{"op": "replace", "path": "/visibility", "value": "public"}],
        IMAGE_PROBE,
        {"member_a": 403},
    ),
    (
        "POST",
        "/image/v2/images",
        {"name": "impostor", "visibility": "public", "protected": True},
        "/image/v2/images?name=impostor",
        {"member_a": 403, "reader_a": 403, "norole_a": 403, "member_b": 403},
    ),
    (
        "POST",
        "/image/v2/images",
        {"name": "by-reader"},
        "/image/v2/images?name=by-reader",
        {"reader_a": 403, "norole_a": 403, "reader_b": 403},
    ),
    # Cinder: PROJECT_MEMBER_OR_ADMIN to change, in the caller's project.
    (
        "DELETE",
        "/volume/v3/pa/volumes/{volume}",
        None,
        "/volume/v3/pa/volumes/{volume}",
        {"reader_a": 403, "norole_a": 403},
    ),
    (
        "DELETE",
        "/volume/v3/pb/volumes/{volume}",
        None,
        "/volume/v3/pa/volumes/{volume}",
        {"member_b": 404, "reader_b": 404},
    ),
    (
        "POST",
        "/volume/v3/pa/volumes",
        {"volume": {"size": 1, "name": "by-reader"}},
        "/volume/v3/volumes?all_tenants=1",
        {"reader_a": 403, "norole_a": 403},
    ),
    (
        "POST",
        "/volume/v3/pb/volumes",
        {"volume": {"size": 1, "imageRef": "{private}"}},
        "/volume/v3/volumes?all_tenants=1",
        {"member_b": 400, "reader_b": 403},
    ),
]
WRITE_CASES = [
    pytest.param(method, path, body, probe, user, status, id=f"{method} {path} as {user}")
    for method, path, body, probe, expected in WRITES
    for user, status in expected.items()
]


def _filled_body(body: Any, world: World) -> Any:
    """The body with each string's placeholders filled in."""
    if isinstance(body, str):
        return _fill(body, world)
    if isinstance(body, dict):
        return {key: _filled_body(value, world) for key, value in body.items()}
    if isinstance(body, list):
        return [_filled_body(value, world) for value in body]
    return body


def _send(client: httpx.Client, method: str, path: str, body: Any) -> httpx.Response:
    if isinstance(body, bytes):
        headers = {"Content-Type": "application/octet-stream"}
        return client.request(method, path, content=body, headers=headers)
    if method == "PATCH":
        content = json.dumps(body).encode()
        return client.request(method, path, content=content, headers={"Content-Type": PATCH})
    return client.request(method, path, json=body)


def _probe(world: World, user: str, path: str) -> Any:
    """What the probe route shows (as the acting user for key pairs, else as an admin)."""
    client = world("member_a") if "os-keypairs" in path else world("admin")
    response = client.get(_fill(path, world))
    return response.status_code, response.json()


@pytest.mark.parametrize(("method", "path", "body", "probe", "user", "status"), WRITE_CASES)
def test_refused_write_changes_nothing(
    world: World, method: str, path: str, body: Any, probe: str, user: str, status: int
) -> None:
    """A write the policies refuse gets Nova's, Glance's or Cinder's status and leaves the
    resource exactly as it was."""
    before = _probe(world, user, probe)
    response = _send(world(user), method, _fill(path, world), _filled_body(body, world))
    assert response.status_code == status, response.text
    assert _probe(world, user, probe) == before


# -- what the owners and admins may do --------------------------------------------------------


def _patch(client: httpx.Client, image_id: str, *ops: dict[str, Any]) -> httpx.Response:
    content = json.dumps(list(ops)).encode()
    return client.patch(
        f"/image/v2/images/{image_id}", content=content, headers={"Content-Type": PATCH}
    )


class TestImageOwnership:
    def test_the_owner_unprotects_then_deletes(self, world: World) -> None:
        """A protected image is changed back with Glance's PATCH by its owner, then deleted."""
        member = world("member_a")
        image_id = _image(member, None, name="guarded", protected=True)
        assert member.delete(f"/image/v2/images/{image_id}").status_code == 403
        response = _patch(member, image_id, {"op": "replace", "path": "/protected", "value": False})
        assert response.status_code == 200, response.text
        assert response.json()["protected"] is False
        assert member.delete(f"/image/v2/images/{image_id}").status_code == 204

    def test_only_an_admin_makes_an_image_public(self, world: World) -> None:
        """publicize_image is role:admin; communitize_image is the owner's member's."""
        member, admin = world("member_a"), world("admin")
        image_id = _image(member, None, name="pub")
        public = {"op": "replace", "path": "/visibility", "value": "public"}
        assert _patch(member, image_id, public).status_code == 403
        community = {"op": "replace", "path": "/visibility", "value": "community"}
        assert _patch(member, image_id, community).json()["visibility"] == "community"
        assert _patch(admin, image_id, public).json()["visibility"] == "public"
        assert world("member_b").get(f"/image/v2/images/{image_id}").status_code == 200

    def test_a_community_image_is_listed_when_asked_for(self, world: World) -> None:
        """Another project sees a community image, and lists it with visibility=community."""
        image_id = _image(world("member_a"), None, name="comm", visibility="community")
        other = world("member_b")
        assert other.get(f"/image/v2/images/{image_id}").status_code == 200
        listed = other.get("/image/v2/images").json()["images"]
        assert image_id not in {i["id"] for i in listed}
        asked = other.get("/image/v2/images?visibility=community").json()["images"]
        assert image_id in {i["id"] for i in asked}

    def test_an_admin_deletes_anyones_image(self, world: World) -> None:
        """An admin sees and deletes another project's private image."""
        image_id = _image(world("member_b"), None, name="b-private", visibility="private")
        assert world("admin").delete(f"/image/v2/images/{image_id}").status_code == 204

    def test_patch_adds_replaces_and_removes_properties(self, world: World) -> None:
        """add, replace and remove on custom properties and core fields, as Glance's."""
        member = world("member_a")
        image_id = _image(member, None, name="props")
        response = _patch(
            member,
            image_id,
            {"op": "add", "path": "/hw_disk_bus", "value": "virtio"},
            {"op": "replace", "path": "/min_ram", "value": 64},
            {"op": "replace", "path": "/name", "value": "renamed"},
        )
        assert response.status_code == 200, response.text
        image = response.json()
        assert (image["hw_disk_bus"], image["min_ram"], image["name"]) == ("virtio", 64, "renamed")
        removed = _patch(member, image_id, {"op": "remove", "path": "/hw_disk_bus"}).json()
        assert "hw_disk_bus" not in removed

    @pytest.mark.parametrize(
        ("op", "status"),
        [
            ({"op": "replace", "path": "/status", "value": "active"}, 403),
            ({"op": "replace", "path": "/owner", "value": "pb"}, 403),
            ({"op": "remove", "path": "/name"}, 403),
            ({"op": "replace", "path": "/min_disk", "value": -1}, 400),
            ({"op": "add", "path": "/note", "value": "x" * 65536}, 400),
            ({"op": "replace", "path": "/visibility", "value": "everyone"}, 400),
            ({"op": "move", "path": "/name", "from": "/x"}, 400),
            ({"op": "replace", "path": "/a/b", "value": "x"}, 400),
            ({"op": "remove", "path": "/nothing"}, 409),
        ],
    )
    def test_a_bad_patch_changes_nothing(
        self, world: World, op: dict[str, Any], status: int
    ) -> None:
        """A patch Glance would refuse is refused whole: the image is as it was."""
        member = world("member_a")
        before = member.get(f"/image/v2/images/{world.private_image}").json()
        response = _patch(member, world.private_image, op)
        assert response.status_code == status, response.text
        assert member.get(f"/image/v2/images/{world.private_image}").json() == before

    def test_patch_wants_glances_media_type(self, world: World) -> None:
        """A PATCH with a JSON media type is 415, as Glance answers."""
        response = world("member_a").patch(
            f"/image/v2/images/{world.private_image}",
            json=[{"op": "replace", "path": "/name", "value": "x"}],
        )
        assert response.status_code == 415


class TestInvisibleImages:
    def test_another_project_cannot_boot_it(self, world: World) -> None:
        """A create from an image the caller cannot see is Nova's 400, and makes no server."""
        body = {"server": {"name": "b", "imageRef": world.private_image, "flavorRef": "1"}}
        response = world("member_b").post("/v2.1/servers", json=body)
        assert response.status_code == 400
        assert response.json()["badRequest"]["message"] == "Can not find requested image"
        assert world("member_b").get("/v2.1/servers").json()["servers"] == []

    def test_another_project_cannot_rebuild_onto_it(self, world: World) -> None:
        """A rebuild onto an image the caller cannot see is Nova's 400, the server untouched."""
        other = world("member_b")
        body = {"server": {"name": "b", "imageRef": world.public_image, "flavorRef": "1"}}
        server_id = other.post("/v2.1/servers", json=body).json()["server"]["id"]
        world.live.wait_for(server_id, "ACTIVE")
        before = world("admin").get(f"/v2.1/servers/{server_id}").json()
        response = other.post(
            f"/v2.1/servers/{server_id}/action", json={"rebuild": {"imageRef": world.private_image}}
        )
        assert response.status_code == 400
        assert response.json()["badRequest"]["message"] == "Cannot find image for rebuild"
        assert world("admin").get(f"/v2.1/servers/{server_id}").json() == before
        assert other.delete(f"/v2.1/servers/{server_id}").status_code == 204


class TestIdempotentReplay:
    def test_only_the_same_user_gets_the_first_answer(self, world: World) -> None:
        """A replay of an idempotency key hands the first rebuild's adminPass to its user alone:
        a reader is refused by the rebuild's policy, another member gets no replay."""
        member = world("member_a")
        body = {"server": {"name": "idem", "imageRef": world.public_image, "flavorRef": "1"}}
        server_id = member.post("/v2.1/servers", json=body).json()["server"]["id"]
        world.live.wait_for(server_id, "ACTIVE")
        path = f"/v2.1/servers/{server_id}/action"
        rebuild = {"rebuild": {"imageRef": world.public_image}}
        key = {"X-Idempotency-Key": "same-key"}
        first = member.post(path, json=rebuild, headers=key)
        assert first.status_code == 202, first.text
        secret = first.json()["server"]["adminPass"]
        again = member.post(path, json=rebuild, headers=key)
        assert (again.status_code, again.json()["server"]["adminPass"]) == (202, secret)
        assert world("reader_a").post(path, json=rebuild, headers=key).status_code == 403
        other = world("member_a2").post(path, json=rebuild, headers=key)
        assert secret not in other.text
        world.live.wait_for(server_id, "ACTIVE")
        assert member.delete(f"/v2.1/servers/{server_id}").status_code == 204


class TestResetState:
    def test_an_admin_resets_another_projects_server(self, world: World) -> None:
        """An admin's os-resetState sets project A's server to ERROR then back to ACTIVE
        (202 each), and each is a finished resetState action its owner sees."""
        path = f"/v2.1/servers/{world.server}/action"
        admin, member = world("admin"), world("member_a")
        try:
            for state, status in (("error", "ERROR"), ("active", "ACTIVE")):
                response = admin.post(path, json={"os-resetState": {"state": state}})
                assert response.status_code == 202, response.text
                assert response.content == b""
                shown = member.get(f"/v2.1/servers/{world.server}").json()["server"]
                assert (shown["status"], shown["OS-EXT-STS:task_state"]) == (status, None)
        finally:
            admin.post(path, json={"os-resetState": {"state": "active"}})
        listed = member.get(f"/v2.1/servers/{world.server}/os-instance-actions").json()
        resets = [a for a in listed["instanceActions"] if a["action"] == "resetState"]
        assert len(resets) >= 2 and all(a["user_id"] == "root" for a in resets)


class TestVolumes:
    def test_a_member_creates_and_deletes_its_projects_volume(self, world: World) -> None:
        """Cinder's PROJECT_MEMBER_OR_ADMIN: a member of the project creates and deletes."""
        volume_id = _volume(world("member_a2"), "pa")
        response = world("member_a").delete(f"/volume/v3/pa/volumes/{volume_id}")
        assert response.status_code == 202


class TestTokensFile:
    def test_a_revoked_token_stops_working_without_a_restart(self, world: World) -> None:
        """The tokens file is read again when it changes: a new token works, a removed one is
        401 at once."""
        late = '\n[tokens.late]\nuser_id = "lou"\nproject_id = "pa"\nroles = ["reader"]\n'
        client = _client(world.live, "late")
        try:
            assert client.get("/v2.1/servers").status_code == 401
            world.tokens_file.write_text(TOKENS + late)
            assert client.get("/v2.1/servers").status_code == 200
            world.tokens_file.write_text(TOKENS)
            assert client.get("/v2.1/servers").status_code == 401
            world.tokens_file.write_text(TOKENS + "[broken")
            assert world("member_a").get("/v2.1/servers").status_code == 401
        finally:
            world.tokens_file.write_text(TOKENS)
            client.close()
        assert world("member_a").get("/v2.1/servers").status_code == 200


class TestAttachments:
    def test_another_projects_volume_cannot_be_attached(self, world: World) -> None:
        """Project B's member attaching project A's volume to its own server is 404, and the
        volume stays available."""
        other = world("member_b")
        body = {"server": {"name": "att", "imageRef": world.public_image, "flavorRef": "1"}}
        server_id = other.post("/v2.1/servers", json=body).json()["server"]["id"]
        world.live.wait_for(server_id, "ACTIVE")
        attach = {"volumeAttachment": {"volumeId": world.volume}}
        response = other.post(f"/v2.1/servers/{server_id}/os-volume_attachments", json=attach)
        assert response.status_code == 404, response.text
        shown = world("member_a").get(f"/volume/v3/pa/volumes/{world.volume}").json()["volume"]
        assert (shown["status"], shown["attachments"]) == ("available", [])
        assert other.delete(f"/v2.1/servers/{server_id}").status_code == 204
