"""Each rebuild error case of NOVA-CONTRACT.md with Nova's status, fault name and message, and
the server untouched afterwards."""

from __future__ import annotations

import base64
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.live import Gate, LiveDaemon, start_live_daemon


def _image(live: LiveDaemon, upload: bool = True, **fields: Any) -> str:
    """A local image with the given Glance fields/properties (qcow2 bytes of a demo image)."""
    body = {"name": "special", "disk_format": "qcow2", "container_format": "bare", **fields}
    image_id: str = live.client.post("/image/v2/images", json=body).json()["id"]
    if upload:
        data = (live.settings.state_dir / "images" / live.image_ids[0]).read_bytes()
        response = live.client.put(
            f"/image/v2/images/{image_id}/file",
            content=data,
            headers={"Content-Type": "application/octet-stream"},
        )
        assert response.status_code == 204, response.text
    return image_id


def _rebuild(live: LiveDaemon, server_id: str, **fields: Any) -> Any:
    body = {"rebuild": {"imageRef": live.image_ids[1], **fields}}
    return live.client.post(f"/v2.1/servers/{server_id}/action", json=body)


def _untouched(live: LiveDaemon, server_id: str) -> None:
    server = live.server(server_id)
    assert (server["status"], server["image"]["id"]) == ("ACTIVE", live.image_ids[0])
    actions = live.client.get(f"/v2.1/servers/{server_id}/os-instance-actions").json()
    assert [a["action"] for a in actions["instanceActions"]] == ["create"]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


CASES = [
    # (id, rebuild fields, image fields or None, status, fault, message)
    ("image-not-active", {}, {"upload": False}, 400, "badRequest", "Image {image} is not active."),
    ("min-ram", {}, {"min_ram": 4096}, 400, "badRequest", "Flavor's memory is too small for requested image."),
    ("min-disk", {}, {"min_disk": 2}, 400, "badRequest",
     "Flavor's disk is smaller than the minimum size specified in image metadata. Flavor disk is "
     "1073741824 bytes, minimum size is 2147483648 bytes."),
    ("bad-architecture", {}, {"architecture": "z80"}, 400, "badRequest",
     "Architecture name 'z80' is not recognised"),
    ("disk-config-disabled", {"OS-DCF:diskConfig": "AUTO"}, {"auto_disk_config": "Disabled"}, 400,
     "badRequest", "Requested image {image} has automatic disk resize disabled."),
    ("metadata-over-quota", {"metadata": {f"k{i}": "v" for i in range(129)}}, None, 403,
     "forbidden", "Maximum number of metadata items exceeds 128"),
    ("too-many-files", {"personality": [{"path": f"/f{i}", "contents": _b64(b"x")} for i in range(6)]},
     None, 403, "forbidden", "Personality file limit exceeded"),
    ("file-too-big", {"personality": [{"path": "/f", "contents": _b64(b"x" * 10241)}]}, None, 403,
     "forbidden", "Personality file content exceeds maximum 10240"),
    ("file-undecodable", {"personality": [{"path": "/f", "contents": "!!not base64!!"}]}, None, 400,
     "badRequest", "Personality content for /f cannot be decoded"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("fields", "image", "status", "fault", "message"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_error_case(
    daemon: LiveDaemon,
    fields: dict[str, Any],
    image: dict[str, Any] | None,
    status: int,
    fault: str,
    message: str,
) -> None:
    """Nova's status, fault name and message; nothing about the server changes."""
    server_id = daemon.create_server()
    image_id = daemon.image_ids[1]
    if image is not None:
        upload = image.pop("upload", True)
        image_id = _image(daemon, upload=upload, **image)
    response = daemon.client.post(
        f"/v2.1/servers/{server_id}/action", json={"rebuild": {"imageRef": image_id, **fields}}
    )
    assert response.status_code == status, response.text
    assert response.json() == {fault: {"code": status, "message": message.format(image=image_id)}}
    _untouched(daemon, server_id)


def test_personality_is_refused_from_2_57(daemon: LiveDaemon) -> None:
    """personality exists only up to 2.56."""
    server_id = daemon.create_server()
    body = {"rebuild": {"imageRef": daemon.image_ids[1], "personality": []}}
    headers = {"OpenStack-API-Version": "compute 2.57"}
    response = daemon.client.post(f"/v2.1/servers/{server_id}/action", json=body, headers=headers)
    assert response.status_code == 400
    assert "personality" in response.json()["badRequest"]["message"]


def test_image_bigger_than_the_flavor_disk_is_400(daemon: LiveDaemon, tmp_path: Path) -> None:
    """An image whose virtual size exceeds the flavor's root disk is Nova's 400."""
    big = tmp_path / "big.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(big), "2G"], check=True)
    image_id = daemon.client.post(
        "/image/v2/images", json={"name": "big", "disk_format": "qcow2", "container_format": "bare"}
    ).json()["id"]
    upload = daemon.client.put(
        f"/image/v2/images/{image_id}/file",
        content=big.read_bytes(),
        headers={"Content-Type": "application/octet-stream"},
    )
    assert upload.status_code == 204, upload.text
    server_id = daemon.create_server()
    response = daemon.client.post(
        f"/v2.1/servers/{server_id}/action", json={"rebuild": {"imageRef": image_id}}
    )
    assert response.status_code == 400
    assert response.json()["badRequest"]["message"] == (
        "Flavor's disk is too small for requested image. Flavor disk is 1073741824 bytes, "
        "image is 2147483648 bytes."
    )
    _untouched(daemon, server_id)


@pytest.fixture
def failed_build(tmp_path: Path) -> Iterator[tuple[LiveDaemon, str]]:
    gate = Gate("start_domain", job="create")
    gate.fail_with = RuntimeError("no boot")
    live = start_live_daemon(tmp_path, observer=gate)
    try:
        body = {"server": {"name": "b", "imageRef": live.image_ids[0], "flavorRef": "1"}}
        server_id = live.client.post("/v2.1/servers", json=body).json()["server"]["id"]
        live.poll(server_id, lambda s: s["status"] == "ERROR", "ERROR", allow_error=True)
        yield live, server_id
    finally:
        live.stop()


def test_a_never_launched_server_is_409(failed_build: tuple[LiveDaemon, str]) -> None:
    """A server in ERROR that never launched cannot be rebuilt (Nova's must_have_launched)."""
    live, server_id = failed_build
    response = _rebuild(live, server_id)
    assert response.status_code == 409
    assert response.json()["conflictingRequest"]["message"] == (
        f"Cannot 'rebuild' instance {server_id} while it is in launched_at None"
    )
