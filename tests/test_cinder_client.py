"""CinderVolumeService's boundary against fake Cinders behind ``httpx.MockTransport``: every
failure to talk to Cinder is one error that names it, Cinder's refusals keep Cinder's message,
the requests carry the microversion and rebuildd's service token, and an NFS connection is
connected on this host (a real bind mount). Cinder's real behaviour: tests/test_cinder_live.py.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from rebuildd import cinder, connector, domxml, errors
from rebuildd.cinder import CinderVolumeService
from rebuildd.keystone import KeystoneConfig, ServiceSession, ServiceTokenAuth
from rebuildd.models import RequestContext
from tests.process import request_errors
from tests.test_volumes import _image

URL = "http://cinder.test:8776/v3/0123456789abcdef0123456789abcdef"
ROOT = "http://cinder.test:8776"
VOLUME_ID = "8e5c6f9a-4c35-4f36-9a37-4f0c3e3f1f11"
SERVER_ID = "5d8c7a7e-7c0e-4b8e-9a55-3e2d8d0b8f0a"
ATTACHMENT_ID = "0f6d1e4c-2b7e-4a43-8d7f-9c1e2b3a4d5e"


def cinder_volume(**overrides: Any) -> dict[str, Any]:
    volume: dict[str, Any] = {
        "id": VOLUME_ID,
        "name": "root",
        "description": None,
        "size": 1,
        "status": "in-use",
        "user_id": "u",
        "os-vol-tenant-attr:tenant_id": "p",
        "bootable": "true",
        "multiattach": False,
        "volume_type": "__DEFAULT__",
        "volume_image_metadata": {"image_id": "img-1", "size": "1376256"},
        "availability_zone": "nova",
        "created_at": "2026-12-02T01:00:00.000000",
        "updated_at": None,
        "attachments": [],
    }
    volume.update(overrides)
    return volume


def service(handler: Callable[[httpx.Request], httpx.Response], **kw: Any) -> CinderVolumeService:
    client = cinder.new_client(URL, timeout=5, transport=httpx.MockTransport(handler))
    return CinderVolumeService(client, nfs_mount_point_base=Path("/nonexistent"), **kw)


class TestEndpoint:
    @pytest.mark.parametrize(
        "url",
        [URL, f"{ROOT}/v3", f"{ROOT}/v3/", ROOT, f"{ROOT}/"],
    )
    def test_the_root_is_what_precedes_the_version(self, url: str) -> None:
        """A catalog's /v3/<project> endpoint and an operator's root both give Cinder's root."""
        assert cinder.endpoint(url) == ROOT


class TestRequests:
    async def test_show_reads_the_volume_and_all_its_attachments(self) -> None:
        """get() is the volume plus its attachments of every status (reserved ones too, which
        Cinder's volume view leaves out), at 3.68, without a project in the path."""
        seen: list[httpx.Request] = []

        def handler(request: httpx.Request) -> httpx.Response:
            seen.append(request)
            if request.url.path == f"/v3/volumes/{VOLUME_ID}":
                return httpx.Response(200, json={"volume": cinder_volume()})
            attachments = [
                {
                    "id": ATTACHMENT_ID,
                    "status": "reserved",
                    "instance": SERVER_ID,
                    "volume_id": VOLUME_ID,
                    "attach_mode": "rw",
                    "attached_at": "",
                    "detached_at": "",
                    "connection_info": {},
                },
            ]
            return httpx.Response(200, json={"attachments": attachments})

        volume = await service(handler).get(VOLUME_ID)
        assert volume is not None
        assert (volume.status, volume.bootable, volume.project_id) == ("in-use", True, "p")
        assert volume.created_at.tzinfo is not None
        assert [(a.id, a.status, a.server_id) for a in volume.attachments] == [
            (ATTACHMENT_ID, "reserved", SERVER_ID)
        ]
        assert seen[1].url.path == "/v3/attachments/detail"
        assert dict(seen[1].url.params) == {"volume_id": VOLUME_ID, "all_tenants": "1"}
        assert {r.headers["OpenStack-API-Version"] for r in seen} == {"volume 3.68"}

    async def test_a_404_is_no_such_volume(self) -> None:
        """A volume Cinder does not know is None (the caller says which 404)."""
        volumes = service(lambda r: httpx.Response(404, json={"itemNotFound": {"code": 404}}))
        assert await volumes.get(VOLUME_ID) is None

    async def test_an_attachment_already_gone_deletes_fine(self) -> None:
        """attachment_delete is idempotent, as Nova's is: Cinder's 404 is no error."""
        volumes = service(lambda r: httpx.Response(404, json={"itemNotFound": {"code": 404}}))
        await volumes.attachment_delete(ATTACHMENT_ID)

    async def test_reimage_sends_reimage_reserved_and_returns_when_accepted(self) -> None:
        """os-reimage is asked with reimage_reserved; its end is Cinder's event, not the 202."""
        bodies: list[Any] = []

        def handler(request: httpx.Request) -> httpx.Response:
            bodies.append((request.url.path, json.loads(request.content)))
            return httpx.Response(202)

        image = _image(1 << 20, image_id="img-2")
        await service(handler).reimage(VOLUME_ID, image, reimage_reserved=True)
        assert bodies == [
            (
                f"/v3/volumes/{VOLUME_ID}/action",
                {"os-reimage": {"image_id": "img-2", "reimage_reserved": True}},
            )
        ]

    async def test_create_carries_the_callers_token_and_waits_for_available(self) -> None:
        """A volume made for a request is created with the caller's token (so it is the
        caller's), then polled until available."""
        statuses = iter(["creating", "downloading", "available"])
        tokens: list[str | None] = []

        def handler(request: httpx.Request) -> httpx.Response:
            if request.method == "POST":
                tokens.append(request.headers.get("X-Auth-Token"))
                return httpx.Response(202, json={"volume": cinder_volume(status="creating")})
            if request.url.path.startswith("/v3/attachments"):
                return httpx.Response(200, json={"attachments": []})
            return httpx.Response(200, json={"volume": cinder_volume(status=next(statuses))})

        context = RequestContext("req-1", "u", "p", auth_token="user-token")
        volume = await service(handler, poll_interval=0).create(context, size=1)
        assert volume.status == "available"
        assert tokens == ["user-token"]

    async def test_a_volume_that_ends_in_error_is_not_created(self) -> None:
        """Cinder's error status ends the wait with Nova's VolumeNotCreated."""

        def handler(request: httpx.Request) -> httpx.Response:
            if request.method == "POST":
                return httpx.Response(202, json={"volume": cinder_volume(status="creating")})
            if request.url.path.startswith("/v3/attachments"):
                return httpx.Response(200, json={"attachments": []})
            return httpx.Response(200, json={"volume": cinder_volume(status="error")})

        context = RequestContext("req-1", "u", "p")
        with pytest.raises(errors.VolumeNotCreated, match="its status is error"):
            await service(handler, poll_interval=0).create(context, size=1)


class TestErrors:
    @pytest.mark.parametrize("cls", request_errors(), ids=lambda c: c.__name__)
    async def test_every_request_error_becomes_volume_service_unavailable(
        self, cls: type[httpx.RequestError]
    ) -> None:
        """No httpx request error escapes the boundary unmapped; each names this Cinder."""

        def handler(request: httpx.Request) -> httpx.Response:
            raise cls("boom", request=request)

        with pytest.raises(errors.VolumeServiceUnavailable) as caught:
            await service(handler).get(VOLUME_ID)
        assert caught.value.message.startswith(f"The volume service (Cinder at {ROOT}) failed: ")
        assert errors.http_fault(caught.value) == (503, "serviceUnavailable")

    @pytest.mark.parametrize("status", [400, 409, 413])
    async def test_cinders_refusal_is_invalid_volume_with_cinders_message(
        self, status: int
    ) -> None:
        """Cinder's 400/409/413 is a 400 InvalidVolume carrying Cinder's own words."""
        body = {"badRequest": {"code": status, "message": "Volume status must be available."}}
        volumes = service(lambda r: httpx.Response(status, json=body))
        with pytest.raises(
            errors.InvalidVolume, match=re.escape("Volume status must be available.")
        ):
            await volumes.attachment_create(VOLUME_ID, SERVER_ID)

    @pytest.mark.parametrize("status", [500, 503, 401, 403])
    async def test_a_failing_or_refusing_cinder_is_volume_service_unavailable(
        self, status: int
    ) -> None:
        """A 5xx, or Cinder refusing rebuildd's credentials, is Cinder failing (503)."""
        volumes = service(lambda r: httpx.Response(status, text="nope"))
        with pytest.raises(errors.VolumeServiceUnavailable, match=f"HTTP {status}"):
            await volumes.attachment_complete(ATTACHMENT_ID)

    async def test_an_unreadable_answer_is_volume_service_unavailable(self) -> None:
        """A 200 whose JSON is not a volume is Cinder failing, not a crash."""
        volumes = service(lambda r: httpx.Response(200, json={"volume": {"id": VOLUME_ID}}))
        with pytest.raises(errors.VolumeServiceUnavailable, match="unreadable"):
            await volumes.get(VOLUME_ID)


class TestServiceToken:
    async def test_every_call_carries_the_service_token_and_a_401_renews_it(self) -> None:
        """X-Service-Token (and X-Auth-Token, unless a user's is set) on each request; a
        401 gets a new service token and one retry."""
        issued: list[str] = []

        def keystone(request: httpx.Request) -> httpx.Response:
            token = f"svc-{len(issued)}"
            issued.append(token)
            expires = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)).isoformat()
            body = {
                "token": {
                    "expires_at": expires,
                    "user": {"id": "rebuildd"},
                    "project": {"id": "service"},
                    "roles": [{"id": "r1", "name": "admin"}],
                    "catalog": [],
                }
            }
            return httpx.Response(201, json=body, headers={"X-Subject-Token": token})

        seen: list[tuple[str | None, str | None]] = []

        def handler(request: httpx.Request) -> httpx.Response:
            seen.append(
                (request.headers.get("X-Auth-Token"), request.headers.get("X-Service-Token"))
            )
            if len(seen) == 1:
                return httpx.Response(401)
            return httpx.Response(204)

        config = KeystoneConfig(
            url="http://keystone.test/v3", username="rebuildd", password="x", project_name="service"
        )
        keystone_client = httpx.AsyncClient(
            base_url=config.api_url, transport=httpx.MockTransport(keystone)
        )
        auth = ServiceTokenAuth(ServiceSession(config, keystone_client))
        client = cinder.new_client(
            URL, timeout=5, transport=httpx.MockTransport(handler), auth=auth
        )
        volumes = CinderVolumeService(client, nfs_mount_point_base=Path("/nonexistent"))
        await volumes.attachment_complete(ATTACHMENT_ID)
        assert seen == [("svc-0", "svc-0"), ("svc-1", "svc-1")]


@pytest.fixture
def bind_mounted(tmp_path: Path) -> Iterator[tuple[Path, str, Path]]:
    """An "NFS share": a directory bind-mounted where os-brick would mount the share."""
    export_dir = tmp_path / "export"
    export_dir.mkdir()
    share = f"127.0.0.1:{export_dir}"
    base = tmp_path / "mnt"
    mount_point = base / hashlib.md5(share.encode()).hexdigest()
    mount_point.mkdir(parents=True)
    subprocess.run(["mount", "--bind", str(export_dir), str(mount_point)], check=True)
    try:
        yield export_dir, share, base
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


class TestConnectVolume:
    async def test_an_nfs_volume_on_a_mounted_share_is_its_file(
        self, bind_mounted: tuple[Path, str, Path]
    ) -> None:
        """Cinder's NFS connection_info becomes the file on the share mounted at
        <base>/md5(share), and that is the domain's <disk>."""
        export_dir, share, base = bind_mounted
        (export_dir / f"volume-{VOLUME_ID}").write_bytes(b"\0" * 512)
        info = {
            "driver_volume_type": "nfs",
            "data": {
                "export": share,
                "name": f"volume-{VOLUME_ID}",
                "options": None,
                "format": "raw",
                "access_mode": "rw",
            },
        }
        connected = await connector.connect_volume(info, nfs_mount_point_base=base)
        path = Path(connected["data"]["device_path"])
        assert path.stat().st_size == 512  # noqa: ASYNC240 - a local stat
        assert path.parent == connector.nfs_mount_point(base, share)
        disk = domxml.to_string(domxml.volume_disk("vdb", connected, volume_id=VOLUME_ID))
        assert f'file="{path}"' in disk and 'type="raw"' in disk

    async def test_a_share_that_cannot_be_mounted_fails_the_connection(
        self, tmp_path: Path
    ) -> None:
        """No mount for the share and none possible (this kernel has no NFS client): a clean
        OperationFailed naming the share, not a crash."""
        info = {
            "driver_volume_type": "nfs",
            "data": {"export": "192.0.2.1:/nowhere", "name": "volume-x"},
        }
        with pytest.raises(errors.OperationFailed, match=re.escape("192.0.2.1:/nowhere")):
            await connector.connect_volume(info, nfs_mount_point_base=tmp_path / "mnt")

    async def test_an_unknown_driver_type_is_refused(self) -> None:
        """A driver this host cannot connect (iSCSI, RBD here) is refused with its name."""
        with pytest.raises(errors.OperationFailed, match="'iscsi' is not supported"):
            await connector.connect_volume(
                {"driver_volume_type": "iscsi", "data": {}}, nfs_mount_point_base=Path("/x")
            )
