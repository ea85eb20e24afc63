"""The real Cinder of tests/cinder.py (the ``cinder`` fixture), and the behaviour of Cinder 29
that rebuildd's Cinder client relies on, recorded against the service itself: volumes from
Glance images on the NFS driver, the 3.44+ attachment flow and its NFS connection_info, what an
attachment DELETE does with and without a service token, and ``os-reimage`` at 3.68 posting
``volume-reimaged`` to the catalog's compute endpoint (here a small real HTTP server that
answers as Nova does, :class:`FakeNova`).

Where Cinder 29 differs from what one might expect (and from ../shared/OPENSTACK-SERVICES.md):
the connector of ``PUT /attachments/<id>`` goes inside ``{"attachment": {...}}``; the
attachments API returns connection_info FLAT (the NFS data keys beside ``driver_volume_type``
and ``attachment_id``, no ``data``); and a re-image whose post to Nova fails leaves the volume
``reserved`` with the new image (saved before the post) plus an ERROR user message, not
``error``."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.cinder import Cinder
from tests.glance import Glance
from tests.keystone import Keystone
from tests.process import free_port

MIB = 1024 * 1024
EVENTS = "/v2.1/os-server-external-events"
CONNECTOR = {
    "host": "rebuildd-test",
    "ip": "127.0.0.1",
    "initiator": "iqn.1993-08.org.debian:01:rebuildd-test",
    "platform": "x86_64",
    "os_type": "linux",
    "multipath": False,
    "mountpoint": "/dev/vdb",
}


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


Answer = Callable[[Request], tuple[int, Any]]


def nova_answer(request: Request) -> tuple[int, Any]:
    """As Nova 2.93 answers: every event completed with code 200; anything else 404."""
    if request.method == "POST" and request.path == EVENTS:
        events = [{**e, "status": "completed", "code": 200} for e in request.body["events"]]
        return 200, {"events": events}
    return 404, {"itemNotFound": {"code": 404, "message": "not found"}}


@dataclass
class FakeNova:
    """Nova's compute API as a real HTTP server in a thread; records every request."""

    answer: Answer = nova_answer
    requests: list[Request] = field(default_factory=list)
    received: threading.Condition = field(default_factory=threading.Condition)

    def __post_init__(self) -> None:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                request = Request(
                    self.command, self.path, dict(self.headers), json.loads(raw) if raw else None
                )
                status, body = fake.answer(request)
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                with fake.received:
                    fake.requests.append(request)
                    fake.received.notify_all()

            do_GET = do_POST = do_PUT = do_DELETE = _serve

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def wait_for(self, method: str, path: str, timeout: float = 60) -> Request:
        """The first recorded request to ``method path``, waiting for it if need be."""

        def find() -> Request | None:
            return next((r for r in self.requests if (r.method, r.path) == (method, path)), None)

        with self.received:
            self.received.wait_for(lambda: find() is not None, timeout=timeout)
            found = find()
        assert found is not None, f"no {method} {path} within {timeout} s: {self.requests}"
        return found

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def nova(keystone: Keystone) -> Iterator[FakeNova]:
    """A FakeNova that the catalog's compute endpoint points at."""
    fake = FakeNova()
    keystone.point_catalog_at(fake.url)
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture(scope="module")
def images(cinder_glance: Glance) -> list[dict[str, Any]]:
    """Images A and B in Glance (64 MiB qcow2, first MiB 0xAA and 0xBB)."""
    return [
        cinder_glance.upload("cinder-image-a", pattern=0xAA),
        cinder_glance.upload("cinder-image-b", pattern=0xBB),
    ]


@dataclass
class Caller:
    """The demo project's member (the user) and rebuildd's service token."""

    cinder: Cinder
    token: str
    project: str
    service_token: str
    cinder_user: str

    def client(self) -> httpx.Client:
        return self.cinder.client(self.token, self.project)

    def show(self, volume_id: str) -> dict[str, Any]:
        return self.cinder.show(self.token, self.project, volume_id)

    def wait_for(self, volume_id: str, status: str) -> dict[str, Any]:
        return self.cinder.wait_for(self.token, self.project, volume_id, status)

    def volume(self, image_id: str | None = None) -> dict[str, Any]:
        return self.cinder.create_volume(self.token, self.project, 1, image_id=image_id)

    def reserve(self, volume_id: str, instance: str) -> str:
        """A new attachment of the volume to ``instance``, without a connector: its id."""
        body = {"attachment": {"volume_uuid": volume_id, "instance_uuid": instance, "mode": "rw"}}
        with self.client() as client:
            response = client.post("/attachments", json=body)
        assert response.status_code == 200, response.text
        attachment: dict[str, Any] = response.json()["attachment"]
        assert attachment["status"] == "reserved"
        return str(attachment["id"])

    def connect(self, attachment_id: str) -> dict[str, Any]:
        """PUT the connector, then os-complete: the attachment's connection_info."""
        with self.client() as client:
            # The connector goes inside "attachment": a bare {"connector": ...} is a 400.
            body = {"attachment": {"connector": CONNECTOR}}
            updated = client.put(f"/attachments/{attachment_id}", json=body)
            assert updated.status_code == 200, updated.text
            completed = client.post(
                f"/attachments/{attachment_id}/action", json={"os-complete": None}
            )
            assert completed.status_code == 204, completed.text
        info: dict[str, Any] = updated.json()["attachment"]["connection_info"]
        return info

    def attach(self, volume_id: str, instance: str) -> str:
        attachment = self.reserve(volume_id, instance)
        self.connect(attachment)
        self.wait_for(volume_id, "in-use")
        return attachment

    def detach(self, attachment_id: str, *, service: bool = True) -> httpx.Response:
        headers = {"X-Service-Token": self.service_token} if service else {}
        with self.client() as client:
            return client.delete(f"/attachments/{attachment_id}", headers=headers)


@pytest.fixture(scope="module")
def caller(cinder: Cinder, keystone: Keystone) -> Caller:
    return Caller(
        cinder=cinder,
        token=keystone.token("demo-member", "demo"),
        project=keystone.projects["demo"],
        service_token=keystone.token("rebuildd", "service"),
        cinder_user=keystone.users["cinder"],
    )


def _token_user(keystone: Keystone, token: str) -> str:
    response = httpx.get(
        f"{keystone.url}/auth/tokens",
        headers={"X-Auth-Token": keystone.admin_token, "X-Subject-Token": token},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    user: str = response.json()["token"]["user"]["id"]
    return user


def _first_mib(path: Path) -> bytes:
    with path.open("rb") as f:
        return f.read(MIB)


class TestFixture:
    def test_the_share_is_bind_mounted_where_os_brick_looks(self, cinder: Cinder) -> None:
        """The export directory is mounted at mount_base/md5(share), as /proc/mounts shows."""
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
        assert str(cinder.mount_point) in mounts
        assert cinder.share == f"127.0.0.1:{cinder.export_dir}"

    def test_the_catalog_names_cinder_for_block_storage(
        self, cinder: Cinder, keystone: Keystone
    ) -> None:
        """A user's token lists block-storage and volumev3 at Cinder's /v3/<project id>."""
        token = keystone.token("demo-member", "demo")
        response = httpx.get(
            f"{keystone.url}/auth/tokens",
            headers={"X-Auth-Token": token, "X-Subject-Token": token},
            timeout=30,
        )
        catalog = {s["type"]: s["endpoints"] for s in response.json()["token"]["catalog"]}
        project = keystone.projects["demo"]
        for service_type in ("block-storage", "volumev3"):
            assert [e["url"] for e in catalog[service_type]] == [f"{cinder.url}/{project}"]

    def test_a_request_without_a_valid_token_is_401(self, cinder: Cinder, caller: Caller) -> None:
        """keystonemiddleware is really in the pipeline: a bogus token is refused."""
        with cinder.client("not-a-token", caller.project) as client:
            assert client.get("/volumes").status_code == 401


class TestVolumeFromImage:
    def test_a_volume_from_an_image_is_bootable_and_a_sparse_raw_file(
        self, caller: Caller, images: list[dict[str, Any]]
    ) -> None:
        """A volume from a Glance image: available, bootable, image_id in its image metadata,
        and its file in the export directory is sparse raw holding the image's bytes."""
        image = images[0]
        volume = caller.volume(image["id"])
        assert volume["status"] == "available"
        assert volume["bootable"] == "true"
        assert volume["volume_image_metadata"]["image_id"] == image["id"]
        path = caller.cinder.volume_path(volume["id"])
        assert path.stat().st_size == 1024 * MIB
        assert path.stat().st_blocks * 512 < 128 * MIB  # sparse
        assert _first_mib(path) == b"\xaa" * MIB  # raw: the qcow2 was converted


class TestAttachments:
    def test_the_attachment_flow_and_the_nfs_connection_info(self, caller: Caller) -> None:
        """create -> reserved; PUT connector -> NFS connection_info; os-complete -> in-use;
        DELETE with a service token -> available."""
        volume = caller.volume()
        instance = str(uuid.uuid4())
        attachment = caller.reserve(volume["id"], instance)
        assert caller.show(volume["id"])["status"] == "reserved"
        info = caller.connect(attachment)
        # Flat: the attachments API does not nest the driver's data under "data" (Nova's
        # _translate_attachment_ref re-nests it, popping driver_volume_type and attachment_id).
        assert info == {
            "driver_volume_type": "nfs",
            "export": caller.cinder.share,
            "name": f"volume-{volume['id']}",
            "options": None,
            "format": "raw",
            "qos_specs": None,
            "access_mode": "rw",
            "encrypted": False,
            "cacheable": False,
            "mount_point_base": str(caller.cinder.mount_base),
            "attachment_id": attachment,
            "enforce_multipath": False,
        }
        with caller.client() as client:
            shown_attachment = client.get(f"/attachments/{attachment}").json()["attachment"]
        assert shown_attachment["connection_info"] == info
        assert shown_attachment["status"] == "attached"
        shown = caller.wait_for(volume["id"], "in-use")
        assert [a["attachment_id"] for a in shown["attachments"]] == [attachment]
        assert shown["attachments"][0]["server_id"] == instance
        assert caller.detach(attachment).status_code == 200
        assert caller.wait_for(volume["id"], "available")["attachments"] == []

    def test_delete_without_a_service_token_and_no_nova_is_500(
        self, caller: Caller, keystone: Keystone
    ) -> None:
        """Without X-Service-Token, deleting a connected attachment makes Cinder ask Nova; with
        nothing listening at the catalog's compute endpoint that is a 500 (computeFault), and
        the attachment and the in-use volume stay."""
        keystone.point_catalog_at(f"http://127.0.0.1:{free_port()}")
        volume = caller.volume()
        attachment = caller.attach(volume["id"], str(uuid.uuid4()))
        response = caller.detach(attachment, service=False)
        assert response.status_code == 500, response.text
        assert response.json()["computeFault"]["code"] == 500
        assert caller.show(volume["id"])["status"] == "in-use"
        assert caller.detach(attachment).status_code == 200

    def test_delete_without_a_service_token_asks_nova_with_the_users_token(
        self, caller: Caller, nova: FakeNova
    ) -> None:
        """Without X-Service-Token Cinder GETs /v2.1/servers/<instance>/os-volume_attachments/
        <volume> at compute 2.89 with the user's own token; Nova's 404 lets the delete go on:
        200, the volume available."""
        volume = caller.volume()
        instance = str(uuid.uuid4())
        attachment = caller.attach(volume["id"], instance)
        response = caller.detach(attachment, service=False)
        assert response.status_code == 200, response.text
        assert response.json() == {"attachments": []}
        asked = nova.wait_for(
            "GET", f"/v2.1/servers/{instance}/os-volume_attachments/{volume['id']}"
        )
        assert asked.headers["OpenStack-API-Version"] == "compute 2.89"
        assert asked.headers["X-Auth-Token"] != caller.token  # a new token, of the same user
        assert caller.wait_for(volume["id"], "available")["attachments"] == []

    def test_delete_without_a_service_token_of_what_nova_holds_is_409(
        self, caller: Caller, nova: FakeNova
    ) -> None:
        """When Nova answers that the server holds this very attachment, the user's DELETE is a
        409 (ConflictNovaUsingAttachment) and the volume stays in-use."""
        volume = caller.volume()
        instance = str(uuid.uuid4())
        held: list[str] = []

        def answer(request: Request) -> tuple[int, Any]:
            if request.path == f"/v2.1/servers/{instance}/os-volume_attachments/{volume['id']}":
                attached = {
                    "id": volume["id"],
                    "volumeId": volume["id"],
                    "serverId": instance,
                    "device": "/dev/vdb",
                    "attachment_id": held[0],
                }
                return 200, {"volumeAttachment": attached}
            return nova_answer(request)

        nova.answer = answer
        held.append(caller.attach(volume["id"], instance))
        response = caller.detach(held[0], service=False)
        assert response.status_code == 409, response.text
        assert response.json()["conflictingRequest"]["message"] == (
            f"ConflictNovaUsingAttachment: Detach volume from instance {instance} using the "
            "Compute API"
        )
        assert caller.show(volume["id"])["status"] == "in-use"
        assert caller.detach(held[0]).status_code == 200


def _reserved_for_reimage(caller: Caller, volume_id: str, instance: str) -> str:
    """Nova's order: attached via A; new empty attachment B; delete A: the volume reserved."""
    old = caller.attach(volume_id, instance)
    new = caller.reserve(volume_id, instance)
    assert caller.detach(old).status_code == 200
    assert caller.show(volume_id)["status"] == "reserved"
    return new


def _reimage(caller: Caller, volume_id: str, image_id: str) -> httpx.Response:
    body = {"os-reimage": {"image_id": image_id, "reimage_reserved": True}}
    with caller.client() as client:
        return client.post(f"/volumes/{volume_id}/action", json=body)


class TestReimage:
    def test_reimage_posts_volume_reimaged_to_the_catalogs_compute_endpoint(
        self, caller: Caller, nova: FakeNova, images: list[dict[str, Any]], keystone: Keystone
    ) -> None:
        """os-reimage of a reserved volume at 3.68: 202; Cinder writes the new image, then
        POSTs volume-reimaged at compute 2.93 as the cinder user, and the volume is reserved
        again with the new image's metadata."""
        volume = caller.volume(images[0]["id"])
        instance = str(uuid.uuid4())
        _reserved_for_reimage(caller, volume["id"], instance)
        response = _reimage(caller, volume["id"], images[1]["id"])
        assert response.status_code == 202, response.text
        event = nova.wait_for("POST", EVENTS)
        assert event.body == {
            "events": [{"name": "volume-reimaged", "server_uuid": instance, "tag": volume["id"]}]
        }
        assert event.headers["OpenStack-API-Version"] == "compute 2.93"
        assert event.headers["X-OpenStack-Nova-API-Version"] == "2.93"
        assert event.headers["Content-Type"] == "application/json"
        assert event.headers["X-OpenStack-Request-ID"] == response.headers["X-OpenStack-Request-ID"]
        assert _token_user(keystone, event.headers["X-Auth-Token"]) == caller.cinder_user
        reimaged = caller.wait_for(volume["id"], "reserved")
        assert reimaged["volume_image_metadata"]["image_id"] == images[1]["id"]
        path = caller.cinder.volume_path(volume["id"])
        assert _first_mib(path) == b"\xbb" * MIB
        assert path.stat().st_size == 1024 * MIB
        # Re-image copies with disable_sparse: the image's whole 64 MiB extent is allocated.
        assert path.stat().st_blocks * 512 >= 64 * MIB

    def test_the_compute_endpoint_is_looked_up_anew_for_every_post(
        self, caller: Caller, nova: FakeNova, images: list[dict[str, Any]], keystone: Keystone
    ) -> None:
        """After Cinder has posted once, re-pointing the catalog's compute endpoint is seen by
        its next post: the [nova] auth plugin, token and catalog are new for each."""
        volume = caller.volume(images[0]["id"])
        instance = str(uuid.uuid4())
        _reserved_for_reimage(caller, volume["id"], instance)
        assert _reimage(caller, volume["id"], images[1]["id"]).status_code == 202
        nova.wait_for("POST", EVENTS)
        caller.wait_for(volume["id"], "reserved")
        second = FakeNova()
        try:
            keystone.point_catalog_at(second.url)
            assert _reimage(caller, volume["id"], images[0]["id"]).status_code == 202
            event = second.wait_for("POST", EVENTS)
            assert event.body["events"][0]["tag"] == volume["id"]
        finally:
            second.stop()
        assert len([r for r in nova.requests if r.path == EVENTS]) == 1
        reimaged = caller.wait_for(volume["id"], "reserved")
        assert reimaged["volume_image_metadata"]["image_id"] == images[0]["id"]

    def test_with_no_nova_the_volume_stays_reserved_and_a_message_says_why(
        self, caller: Caller, keystone: Keystone, images: list[dict[str, Any]]
    ) -> None:
        """When nothing answers at the compute endpoint, Cinder has already re-imaged and saved
        the volume reserved; it logs the failed post and leaves a user message."""
        volume = caller.volume(images[0]["id"])
        _reserved_for_reimage(caller, volume["id"], str(uuid.uuid4()))
        keystone.point_catalog_at(f"http://127.0.0.1:{free_port()}")
        assert _reimage(caller, volume["id"], images[1]["id"]).status_code == 202
        with caller.client() as client:
            messages = _wait_for_messages(client, volume["id"])
        assert [(m["event_id"], m["user_message"], m["message_level"]) for m in messages] == [
            (
                "VOLUME_VOLUME_016_028",
                "reimage volume:Compute service failed to reimage volume.",
                "ERROR",
            )
        ]
        shown = caller.show(volume["id"])
        assert shown["status"] == "reserved"  # not error: saved before the post
        assert shown["volume_image_metadata"]["image_id"] == images[1]["id"]


def _wait_for_messages(client: httpx.Client, volume_id: str) -> list[dict[str, Any]]:
    """The user messages about a volume, once there is one (GET /messages, 3.3+)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        found = [
            m for m in client.get("/messages").json()["messages"] if m["resource_uuid"] == volume_id
        ]
        if found:
            return found
        time.sleep(0.3)
    raise AssertionError(f"no message about volume {volume_id} within 60 s")


class TestData:
    def test_bytes_written_into_the_volume_file_survive_attach_and_detach(
        self, caller: Caller
    ) -> None:
        """A pattern written through the export directory reads back the same after the volume
        was attached (connector, os-complete) and detached again."""
        volume = caller.volume()
        path = caller.cinder.volume_path(volume["id"])
        pattern = bytes(range(256)) * 4096  # 1 MiB
        with path.open("r+b") as f:
            f.seek(512 * MIB)
            f.write(pattern)
        attachment = caller.attach(volume["id"], str(uuid.uuid4()))
        with path.open("rb") as f:
            f.seek(512 * MIB)
            assert f.read(MIB) == pattern  # visible while attached
        assert caller.detach(attachment).status_code == 200
        caller.wait_for(volume["id"], "available")
        with path.open("rb") as f:
            f.seek(512 * MIB)
            assert f.read(MIB) == pattern
        assert path.stat().st_size == 1024 * MIB
