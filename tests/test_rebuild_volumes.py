"""Rebuilds of servers with volumes on real libvirtd + QEMU (started by ``make test``), with
rebuildd's local volumes: Nova's attachment order (a new attachment before the old one goes, so
a volume is never available mid-rebuild), data volumes kept byte for byte on their targets, a
volume-backed server kept (2.92) or re-imaged (2.93), and a failure after the detach undone."""

from __future__ import annotations

import collections
import hashlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from rebuildd.errors import HypervisorError
from rebuildd.models import RequestContext, Volume
from tests.conftest import require
from tests.live import LiveDaemon, start_live_daemon
from tests.xmlutil import disk_sources, inactive_xml

libvirt = pytest.importorskip("libvirt")
URI = "qemu:///system"
MiB = 1024**2
DEMO_PATTERNS = (0xAA, 0xBB)  # rebuildd.demo writes these into the first MiB of each image


@dataclass(frozen=True)
class Seen:
    step: str
    phase: str
    statuses: tuple[str, ...]
    attachments: tuple[int, ...]


class VolumeWatch:
    """At every step boundary of a rebuild, what the volume service says of the volumes."""

    def __init__(self) -> None:
        self.live: LiveDaemon | None = None
        self.volume_ids: list[str] = []
        self.seen: list[Seen] = []
        self._lock = threading.Lock()

    async def _look(self, job: str, step: str, phase: str) -> None:
        if job != "rebuild" or self.live is None or not self.volume_ids:
            return
        volumes = [await self.live.daemon.services.deps.volumes.get(v) for v in self.volume_ids]
        assert all(v is not None for v in volumes)
        with self._lock:
            self.seen.append(
                Seen(
                    step,
                    phase,
                    tuple(v.status for v in volumes if v),
                    tuple(len(v.attachments) for v in volumes if v),
                )
            )

    async def before_step(self, job: str, step: str, server_id: str) -> None:
        await self._look(job, step, "before")

    async def after_step(self, job: str, step: str, server_id: str) -> None:
        await self._look(job, step, "after")


class FailingStart:
    """libvirt in front of the real adapter: the Nth ``start`` raises libvirt's error."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.fail_at: int | None = None
        self.calls: collections.Counter[str] = collections.Counter()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    async def start(self, name: str) -> int:
        self.calls["start"] += 1
        if self.fail_at is not None and self.calls["start"] == self.fail_at:
            raise HypervisorError(call="create", reason="injected fault in start")
        power: int = await self.real.start(name)
        return power


@pytest.fixture
def qemu(tmp_path: Path) -> Iterator[tuple[LiveDaemon, VolumeWatch, FailingStart]]:
    try:
        libvirt.open(URI).close()
    except libvirt.libvirtError as exc:
        require("libvirtd with the QEMU driver", str(exc))
    watch = VolumeWatch()
    holder: dict[str, FailingStart] = {}

    def port(real: Any) -> FailingStart:
        holder["hv"] = FailingStart(real)
        return holder["hv"]

    live = start_live_daemon(
        tmp_path,
        observer=watch,
        hypervisor_port=port,
        libvirt_uri=URI,
        domain_type="qemu",
        domain_name_prefix="rebuildd-test-",
        shutdown_timeout=1.0,
    )
    watch.live = live
    flavor = {"flavor": {"name": "t1.vol", "id": "vol", "ram": 128, "vcpus": 1, "disk": 1}}
    assert live.client.post("/v2.1/flavors", json=flavor).status_code == 200
    try:
        yield live, watch, holder["hv"]
    finally:
        for server in live.client.get("/v2.1/servers").json()["servers"]:
            live.client.delete(f"/v2.1/servers/{server['id']}")
        live.stop()


def _volume(live: LiveDaemon, *, size: int = 1, image: str | None = None) -> Volume:
    deps = live.daemon.services.deps
    context = RequestContext("req-test", "demo", "demo")

    async def make() -> Volume:
        found = await deps.images.get(None, image) if image else None
        return await deps.volumes.create(context, size=size, image=found, name="v")

    volume: Volume = live.run(make())
    return volume


def _get(live: LiveDaemon, volume_id: str) -> Volume:
    volume = live.run(live.daemon.services.deps.volumes.get(volume_id))
    assert volume is not None
    return volume  # type: ignore[no-any-return]


def _file(live: LiveDaemon, volume_id: str) -> Path:
    return live.settings.state_dir / "volumes" / f"volume-{volume_id}"


def _create(live: LiveDaemon, mappings: list[dict[str, Any]], image: str | None = None) -> str:
    body: dict[str, Any] = {"name": "vm", "flavorRef": "vol", "block_device_mapping_v2": mappings}
    if image:
        body["imageRef"] = image
    response = live.client.post("/v2.1/servers", json={"server": body})
    assert response.status_code == 202, response.text
    server_id: str = response.json()["server"]["id"]
    live.wait_for(server_id, "ACTIVE")
    return server_id


def _xml(server_id: str) -> etree._Element:
    return inactive_xml(URI, f"rebuildd-test-{server_id}")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _data(volume_id: str) -> dict[str, Any]:
    return {"source_type": "volume", "destination_type": "volume", "uuid": volume_id,
            "boot_index": -1}  # fmt: skip


def _rebuild(live: LiveDaemon, server_id: str, image: str, version: str = "2.1") -> Any:
    return live.client.post(
        f"/v2.1/servers/{server_id}/action",
        json={"rebuild": {"imageRef": image}},
        headers={"OpenStack-API-Version": f"compute {version}"},
    )


def _assert_succeeded(live: LiveDaemon, server_id: str, request_id: str) -> None:
    """The rebuild's action ended well: every event a Success (a rolled-back rebuild also
    ends ACTIVE, so the status alone cannot tell)."""
    detail = live.client.get(f"/v2.1/servers/{server_id}/os-instance-actions/{request_id}")
    events = detail.json()["instanceAction"]["events"]
    assert events and all(e["result"] == "Success" for e in events), events


def _attached_once(live: LiveDaemon, volume_id: str, server_id: str) -> None:
    volume = _get(live, volume_id)
    assert volume.status == "in-use", volume
    assert [(a.server_id, a.status) for a in volume.attachments] == [(server_id, "attached")]


@pytest.mark.qemu
def test_data_volumes_keep_their_bytes_and_targets_and_are_never_available(
    qemu: tuple[LiveDaemon, VolumeWatch, FailingStart],
) -> None:
    """Two data volumes: written bytes are identical after the rebuild, each is on the same
    target, in-use with one attachment; at every step boundary neither was available and each
    had at least one attachment."""
    live, watch, _ = qemu
    first, second = _volume(live), _volume(live)
    for n, volume in enumerate((first, second)):
        with _file(live, volume.id).open("r+b") as f:
            f.seek(3 * MiB)
            f.write(bytes([0x40 + n]) * MiB)
    digests = {v.id: _sha(_file(live, v.id)) for v in (first, second)}
    server_id = _create(live, [_data(first.id), _data(second.id)], image=live.image_ids[0])
    before = disk_sources(_xml(server_id))
    assert {before["vdb"], before["vdc"]} == {_file(live, first.id), _file(live, second.id)}
    attachments_before = {v.id: _get(live, v.id).attachments[0].id for v in (first, second)}

    watch.volume_ids = [first.id, second.id]
    answer = _rebuild(live, server_id, live.image_ids[1])
    assert answer.status_code == 202
    live.wait_for(server_id, "ACTIVE")
    _assert_succeeded(live, server_id, answer.headers["x-compute-request-id"])

    after = disk_sources(_xml(server_id))
    assert (after["vdb"], after["vdc"]) == (before["vdb"], before["vdc"])
    assert after["vda"] != before["vda"]
    for volume in (first, second):
        assert _sha(_file(live, volume.id)) == digests[volume.id]
        _attached_once(live, volume.id, server_id)
        assert _get(live, volume.id).attachments[0].id != attachments_before[volume.id]
    steps = {s.step for s in watch.seen}
    assert {"reserve_volumes", "release_old_attachments", "start_domain"} <= steps
    for seen in watch.seen:
        assert "available" not in seen.statuses, seen
        assert min(seen.attachments) >= 1, seen
    # Both attachments existed at once only between the reserve and the release.
    assert max(max(s.attachments) for s in watch.seen) == 2


def _boot_from_volume(live: LiveDaemon) -> tuple[str, str]:
    root = {"source_type": "image", "destination_type": "volume", "uuid": live.image_ids[0],
            "boot_index": 0, "volume_size": 1, "delete_on_termination": True}  # fmt: skip
    server_id = _create(live, [root])
    server = live.server(server_id)
    assert server["image"] == ""
    devices = live.run(live.daemon.store.get_block_devices(server_id))
    (root_volume,) = [d for d in devices if d.volume_id]
    assert (root_volume.boot_index, root_volume.device_name) == (0, "vda")
    attached = server["os-extended-volumes:volumes_attached"]
    assert [v["id"] for v in attached] == [root_volume.volume_id]
    return server_id, str(root_volume.volume_id)


def _first_mib(path: Path) -> bytes:
    with path.open("rb") as f:
        return f.read(MiB)


@pytest.mark.qemu
def test_a_volume_backed_server_keeps_its_volume_at_2_92_and_is_reimaged_at_2_93(
    qemu: tuple[LiveDaemon, VolumeWatch, FailingStart],
) -> None:
    """Booted from a volume made from image A: at 2.92 another image is Nova's 400 and the
    same image keeps the volume's bytes; at 2.93 image B re-images it (its image metadata
    names B, its bytes are B's); it stays attached on vda throughout."""
    live, watch, _ = qemu
    image_a, image_b = live.image_ids
    server_id, volume_id = _boot_from_volume(live)
    path = _file(live, volume_id)
    assert _first_mib(path) == bytes([DEMO_PATTERNS[0]]) * MiB
    assert disk_sources(_xml(server_id))["vda"] == path

    refused = _rebuild(live, server_id, image_b, "2.92")
    assert refused.status_code == 400
    assert refused.json()["badRequest"]["message"] == (
        f"Image {image_b} is unacceptable: Unable to rebuild with a different image for a "
        "volume-backed server."
    )
    with path.open("r+b") as f:  # the guest's own data, which a rebuild at 2.92 keeps
        f.seek(5 * MiB)
        f.write(b"\x77" * MiB)
    digest = _sha(path)
    assert _rebuild(live, server_id, image_a, "2.92").status_code == 202
    live.wait_for(server_id, "ACTIVE")
    assert _sha(path) == digest
    _attached_once(live, volume_id, server_id)

    watch.volume_ids = [volume_id]
    answer = _rebuild(live, server_id, image_b, "2.93")
    assert answer.status_code == 202
    server = live.wait_for(server_id, "ACTIVE")
    _assert_succeeded(live, server_id, answer.headers["x-compute-request-id"])
    assert server["image"] == ""
    volume = _get(live, volume_id)
    assert volume.volume_image_metadata["image_id"] == image_b
    assert _first_mib(path) == bytes([DEMO_PATTERNS[1]]) * MiB
    assert disk_sources(_xml(server_id))["vda"] == path
    _attached_once(live, volume_id, server_id)
    reimaged = [s for s in watch.seen if s.step == "reimage_root_volume"]
    assert reimaged and all(s.statuses != ("available",) for s in reimaged)


@pytest.mark.qemu
def test_trusted_certificates_on_a_volume_backed_server_are_refused(
    qemu: tuple[LiveDaemon, VolumeWatch, FailingStart],
) -> None:
    """Nova's 400: image certificates cannot be validated for a volume-backed server."""
    live, _, _ = qemu
    server_id, _ = _boot_from_volume(live)
    response = live.client.post(
        f"/v2.1/servers/{server_id}/action",
        json={"rebuild": {"imageRef": live.image_ids[0], "trusted_image_certificates": ["cert-1"]}},
        headers={"OpenStack-API-Version": "compute 2.63"},
    )
    assert response.status_code == 400
    assert response.json()["badRequest"]["message"] == (
        "Image certificate validation is not supported for volume-backed servers."
    )


@pytest.mark.qemu
def test_a_failure_after_the_detach_leaves_the_volumes_attached_as_before(
    qemu: tuple[LiveDaemon, VolumeWatch, FailingStart],
) -> None:
    """The new domain fails to start: the server is back on its old disks (in ERROR, the
    failed rebuild's default), each volume on its target, in-use with exactly one attachment,
    and no stray attachment is left."""
    live, _, hv = qemu
    data = _volume(live)
    server_id = _create(live, [_data(data.id)], image=live.image_ids[0])
    before = disk_sources(_xml(server_id))
    hv.fail_at = hv.calls["start"] + 1
    assert _rebuild(live, server_id, live.image_ids[1]).status_code == 202
    server = live.poll(
        server_id, lambda s: s["OS-EXT-STS:task_state"] is None, "settled", allow_error=True
    )
    assert server["status"] == "ERROR" and server["image"]["id"] == live.image_ids[0]
    assert disk_sources(_xml(server_id)) == before
    _attached_once(live, data.id, server_id)
    bdm = next(d for d in live.run(live.daemon.store.get_block_devices(server_id)) if d.volume_id)
    assert bdm.attachment_id == _get(live, data.id).attachments[0].id


@pytest.mark.qemu
def test_deleting_a_server_releases_its_volumes(
    qemu: tuple[LiveDaemon, VolumeWatch, FailingStart],
) -> None:
    """A deleted server's data volume is available again with no attachment; its root volume,
    marked delete_on_termination, is deleted with it; the rebuild 202 at 2.75 lists both."""
    live, _, _ = qemu
    data = _volume(live)
    root = {"source_type": "image", "destination_type": "volume", "uuid": live.image_ids[0],
            "boot_index": 0, "volume_size": 1, "delete_on_termination": True}  # fmt: skip
    server_id = _create(live, [root, _data(data.id)])
    answer = _rebuild(live, server_id, live.image_ids[0], "2.75")
    assert answer.status_code == 202, answer.text
    listed = answer.json()["server"]["os-extended-volumes:volumes_attached"]
    assert data.id in {v["id"] for v in listed} and len(listed) == 2
    live.wait_for(server_id, "ACTIVE")
    root_volume = next(v["id"] for v in listed if v["id"] != data.id)

    assert live.client.delete(f"/v2.1/servers/{server_id}").status_code == 204
    deadline = time.monotonic() + 30
    while live.client.get(f"/v2.1/servers/{server_id}").status_code != 404:
        assert time.monotonic() < deadline, "never deleted"
        time.sleep(0.05)
    kept = _get(live, data.id)
    assert (kept.status, kept.attachments) == ("available", ())
    assert live.run(live.daemon.services.deps.volumes.get(root_volume)) is None
    assert not _file(live, root_volume).exists()


@pytest.mark.qemu
@pytest.mark.parametrize(
    ("mapping", "message"),
    [
        ({"source_type": "image", "destination_type": "volume", "boot_index": 0},
         "need to have a non-zero size"),
        ({"source_type": "blank", "destination_type": "local", "boot_index": -1,
          "volume_size": 1}, "rebuildd boots from volumes made from images"),
    ],
)  # fmt: skip
def test_unsupported_or_invalid_block_device_mappings_are_400(
    qemu: tuple[LiveDaemon, VolumeWatch, FailingStart], mapping: dict[str, Any], message: str
) -> None:
    """A block device mapping Nova would refuse, or rebuildd cannot make, is a 400 naming why."""
    live, _, _ = qemu
    if mapping["source_type"] == "image":
        mapping = {**mapping, "uuid": live.image_ids[0]}
    body = {"server": {"name": "x", "flavorRef": "vol", "block_device_mapping_v2": [mapping]}}
    if mapping["source_type"] != "image":
        body["server"]["imageRef"] = live.image_ids[0]
    response = live.client.post("/v2.1/servers", json=body)
    assert response.status_code == 400, response.text
    assert message in response.json()["badRequest"]["message"]


def test_the_reimage_timeout_scales_with_the_image_and_is_never_zero() -> None:
    """20 s per GiB, rounded up; an image of size 0 (a snapshot's) still gets one GiB's worth."""
    import dataclasses
    import datetime as dt

    from rebuildd.models import Image
    from rebuildd.rebuild_volumes import reimage_timeout

    now = dt.datetime.now(dt.UTC)
    image = Image("i", "i", "active", "raw", "bare", 0, 0, None, None, None, 0, 0, "public",
                  False, None, {}, now, now)  # fmt: skip
    assert reimage_timeout(image, 20.0) == 20.0
    bigger = dataclasses.replace(image, size=3 * 1024**3 // 2)
    assert reimage_timeout(bigger, 20.0) == 40.0
    virtual = dataclasses.replace(image, size=10, virtual_size=5 * 1024**3)
    assert reimage_timeout(virtual, 20.0) == 100.0


@pytest.mark.qemu
def test_an_existing_volume_boots_a_server_and_a_volume_not_in_use_blocks_a_rebuild(
    qemu: tuple[LiveDaemon, VolumeWatch, FailingStart],
) -> None:
    """A volume made from an image through the Cinder API boots a server as its root (vda);
    once that volume is not in-use (here: in error), a rebuild is Nova's 400 naming its status,
    and nothing changes."""
    live, _, _ = qemu
    made = live.client.post(
        "/volume/v3/volumes", json={"volume": {"size": 1, "imageRef": live.image_ids[0]}}
    )
    assert made.status_code == 202, made.text
    volume_id = made.json()["volume"]["id"]
    root = {"source_type": "volume", "destination_type": "volume", "uuid": volume_id,
            "boot_index": 0}  # fmt: skip
    server_id = _create(live, [root])
    assert disk_sources(_xml(server_id))["vda"] == _file(live, volume_id)
    _attached_once(live, volume_id, server_id)

    store = live.daemon.services.volume_store
    live.run(store.swap_status(volume_id, ("in-use",), "error", action="test"))
    response = _rebuild(live, server_id, live.image_ids[0], "2.93")
    assert response.status_code == 400, response.text
    assert response.json()["badRequest"]["message"] == (
        f"Invalid volume: volume '{volume_id}' status must be 'in-use'. Currently in 'error' status"
    )
    assert live.server(server_id)["status"] == "ACTIVE"
