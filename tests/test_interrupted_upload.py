"""A daemon killed in the middle of an image upload: after a restart the image is ``queued``
again, no ``.part`` file is left on the host, and a new upload makes it ``active``."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

from rebuildd.disks import DiskManager
from rebuildd.images import ImageCache, LocalImageService, recover_interrupted
from rebuildd.models import RequestContext
from rebuildd.storage import Store
from tests.process import DaemonProcess

POLL_LIMIT = 60.0  # an upper bound for the upload to reach the daemon


def _until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + POLL_LIMIT
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_an_upload_cut_by_a_kill_is_queued_again_after_restart(tmp_path: Path) -> None:
    """An upload in flight when the daemon is SIGKILLed leaves the image ``saving`` and a
    ``.part`` file; the restarted daemon puts it back to ``queued``, removes the partial
    files (the store's, the cache's, the templates'), and a new upload of it succeeds."""
    daemon = DaemonProcess(tmp_path)
    daemon.prepare()
    daemon.start()
    release = threading.Event()

    def body() -> Iterator[bytes]:
        yield b"\0" * 65536
        release.wait(POLL_LIMIT)
        yield b"\0" * 65536

    try:
        with daemon.client() as client:
            created = client.post(
                "/image/v2/images",
                json={"name": "cut", "disk_format": "raw", "container_format": "bare"},
            )
            assert created.status_code == 201, created.text
            image_id = created.json()["id"]

            def upload() -> None:
                with contextlib.suppress(httpx.HTTPError):  # the daemon dies under it
                    httpx.put(
                        f"{daemon.url}/image/v2/images/{image_id}/file",
                        content=body(),
                        headers={"Content-Type": "application/octet-stream"},
                        timeout=POLL_LIMIT,
                    )

            uploader = threading.Thread(target=upload)
            uploader.start()
            images = tmp_path / "images"
            _until(lambda: any(images.glob(".*.part")), "the upload's .part file")
            assert client.get(f"/image/v2/images/{image_id}").json()["status"] == "saving"
        assert daemon.process is not None
        daemon.process.kill()
        daemon.wait_exit()
        release.set()
        uploader.join(POLL_LIMIT)
        # What a fetch into the cache cut by the kill leaves there.
        stale_base = tmp_path / "_base" / f"{image_id}.0123abcd.part"
        stale_base.parent.mkdir(exist_ok=True)
        stale_base.write_bytes(b"half")
        stale_template = tmp_path / "instances" / "_templates" / ".0123abcd.partial"
        stale_template.parent.mkdir(parents=True, exist_ok=True)
        stale_template.write_bytes(b"half")

        daemon.start()
        with daemon.client() as client:
            assert client.get(f"/image/v2/images/{image_id}").json()["status"] == "queued"
            assert not list(images.glob(".*.part"))
            assert not stale_base.exists() and not stale_template.exists()
            response = client.put(
                f"/image/v2/images/{image_id}/file",
                content=b"\0" * 131072,
                headers={"Content-Type": "application/octet-stream"},
            )
            assert response.status_code == 204, response.text
            assert client.get(f"/image/v2/images/{image_id}").json()["status"] == "active"
    finally:
        release.set()
        daemon.stop()


async def test_only_this_hosts_interrupted_uploads_are_reset_on_a_shared_database(
    store: Store, tmp_path: Path
) -> None:
    """At start an image in ``saving`` whose ``.part`` is on this host goes back to ``queued``;
    one with no ``.part`` here (another host's upload on a shared PostgreSQL) is left
    alone, unless the database is this host's own SQLite."""
    disks = DiskManager(tmp_path / "instances")
    images = LocalImageService(store, tmp_path / "images", disks)
    cache = ImageCache(tmp_path / "_base", images, disks)
    context = RequestContext(request_id="req-1", user_id="u", project_id="p")
    ids = []
    for name in ("here", "elsewhere"):
        image = await images.create(context, {"name": name, "disk_format": "raw"})
        await store.swap_image_status(image.id, "queued", "saving")
        ids.append(image.id)
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / f".{ids[0]}.0123456789abcdef.part").write_bytes(b"half")
    try:
        await recover_interrupted(images, cache, store)
    finally:
        disks.close()
    statuses = [(await store.get_image(i)).status for i in ids]  # type: ignore[union-attr]
    local = store.engine.dialect.name == "sqlite"
    assert statuses == ["queued", "queued" if local else "saving"]
    assert not list((tmp_path / "images").iterdir())
