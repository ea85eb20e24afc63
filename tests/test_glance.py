"""GlanceImageService against fake Glances behind ``httpx.MockTransport``: Glance's image JSON
becomes an Image record, a 404 is no image, every failure to talk to Glance is one error that
names it, and a download streams chunk by chunk. (The real Glance: tests/test_glance_guests.py.)
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import tracemalloc
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from rebuildd import errors, glance, migrations
from rebuildd.daemon import open_daemon
from rebuildd.glance import CHUNK, GlanceImageService
from rebuildd.models import RequestContext
from rebuildd.settings import Settings
from rebuildd.storage import ImageFilters, Store, create_engine
from tests.process import BIN, request_errors

URL = "http://glance.test:9292"
IMAGE_ID = "22772c05-18b1-4ef0-a602-f1202c5c5104"
CONTEXT = RequestContext(request_id="req-1", user_id="u", project_id="p")


def glance_image(**overrides: Any) -> dict[str, Any]:
    """An image as Glance 33 shows it (keys and value types as measured)."""
    image = {
        "architecture": "x86_64",
        "os_shutdown_timeout": "30",
        "name": "a",
        "disk_format": "qcow2",
        "container_format": "bare",
        "visibility": "shared",
        "size": 1376256,
        "virtual_size": 67108864,
        "status": "active",
        "checksum": "6ad4758d111576fd955bed5ab2f9fbd6",
        "protected": False,
        "min_ram": 64,
        "min_disk": 1,
        "owner": "p",
        "os_hidden": False,
        "os_hash_algo": "sha512",
        "os_hash_value": "42" * 64,
        "id": IMAGE_ID,
        "created_at": "2026-12-01T22:18:31Z",
        "updated_at": "2026-12-01T22:18:32Z",
        "tags": [],
        "self": f"/v2/images/{IMAGE_ID}",
        "file": f"/v2/images/{IMAGE_ID}/file",
        "schema": "/v2/schemas/image",
    }
    image.update(overrides)
    return image


def service(handler: Callable[[httpx.Request], Any]) -> GlanceImageService:
    client = glance.new_client(URL, timeout=5, transport=httpx.MockTransport(handler))
    return GlanceImageService(client)


class TestGet:
    async def test_glance_fields_and_properties_become_the_image_record(self) -> None:
        """Glance's fields fill the record; every other key but the schema's links is a property."""
        images = service(lambda request: httpx.Response(200, json=glance_image()))
        image = await images.get(CONTEXT, IMAGE_ID)
        assert image is not None
        assert (image.id, image.status, image.size, image.virtual_size) == (
            IMAGE_ID, "active", 1376256, 67108864
        )  # fmt: skip
        assert (image.min_disk, image.min_ram, image.disk_format, image.container_format) == (
            1, 64, "qcow2", "bare"
        )  # fmt: skip
        assert (image.os_hash_algo, image.os_hash_value) == ("sha512", "42" * 64)
        assert image.checksum == "6ad4758d111576fd955bed5ab2f9fbd6"
        assert (image.visibility, image.protected, image.owner) == ("shared", False, "p")
        assert image.properties == {"architecture": "x86_64", "os_shutdown_timeout": "30"}
        assert image.created_at.isoformat() == "2026-12-01T22:18:31+00:00"

    @pytest.mark.parametrize(
        ("visibility", "seen"),
        [("private", False), ("shared", False), ("community", True), ("public", True)],
    )
    async def test_another_projects_image_is_seen_as_glance_shows_it(
        self, visibility: str, seen: bool
    ) -> None:
        """Glance answers rebuildd's service user; a caller of another project sees only what
        Glance's visibility gives it, rebuildd's own look-ups (no context) everything."""
        body = glance_image(owner="q", visibility=visibility)
        images = service(lambda request: httpx.Response(200, json=body))
        assert (await images.get(CONTEXT, IMAGE_ID) is not None) is seen
        assert await images.get(None, IMAGE_ID) is not None

    async def test_an_image_without_an_owner_is_seen_by_every_project(self) -> None:
        """Glance's is_image_visible: an image with no owner (a Glance without Keystone made
        it) is visible to every caller, whatever its visibility."""
        body = glance_image(owner=None, visibility="shared")
        images = service(lambda request: httpx.Response(200, json=body))
        assert await images.get(CONTEXT, IMAGE_ID) is not None

    async def test_a_404_is_no_such_image(self) -> None:
        """Glance's 404 is None (the api stage turns it into Nova's 400 for a rebuild)."""
        images = service(lambda request: httpx.Response(404, text="Not Found"))
        assert await images.get(CONTEXT, IMAGE_ID) is None

    async def test_an_id_that_is_no_uuid_is_no_image_without_asking(self) -> None:
        """A non-UUID id never reaches a URL: it is no image."""
        asked: list[httpx.Request] = []

        def handler(request: httpx.Request) -> httpx.Response:
            asked.append(request)
            return httpx.Response(500)

        images = service(handler)
        assert await images.get(CONTEXT, "../../v2/schemas") is None
        assert asked == []

    async def test_the_request_goes_to_the_v2_image_path_below_the_endpoint(self) -> None:
        """An endpoint with a path and a /v2 suffix still reaches <root>/v2/images/<id>."""
        seen: list[str] = []

        def handler(request: httpx.Request) -> httpx.Response:
            seen.append(str(request.url))
            return httpx.Response(200, json=glance_image())

        client = glance.new_client(
            "http://cloud.test/image/v2/", timeout=5, transport=httpx.MockTransport(handler)
        )
        await GlanceImageService(client).get(None, IMAGE_ID)
        assert seen == [f"http://cloud.test/image/v2/images/{IMAGE_ID}"]


class TestErrors:
    @pytest.mark.parametrize("cls", request_errors(), ids=lambda c: c.__name__)
    async def test_every_request_error_becomes_image_service_unavailable(
        self, cls: type[httpx.RequestError]
    ) -> None:
        """No httpx request error escapes the boundary unmapped; each names this Glance."""

        def handler(request: httpx.Request) -> httpx.Response:
            raise cls("boom", request=request)

        with pytest.raises(errors.ImageServiceUnavailable) as caught:
            await service(handler).get(CONTEXT, IMAGE_ID)
        assert caught.value.message.startswith(f"The image service (Glance at {URL}) failed: ")
        assert errors.http_fault(caught.value) == (503, "serviceUnavailable")

    @pytest.mark.parametrize("status", [500, 502, 503, 401])
    async def test_an_answer_other_than_200_or_404_is_image_service_unavailable(
        self, status: int
    ) -> None:
        """A 5xx (or a 401 from a Glance that wants a token) is Glance failing, with its status."""
        images = service(lambda request: httpx.Response(status, text="down for maintenance"))
        with pytest.raises(errors.ImageServiceUnavailable, match=f"HTTP {status} from /v2"):
            await images.get(CONTEXT, IMAGE_ID)

    async def test_an_unreadable_image_body_is_image_service_unavailable(self) -> None:
        """A 200 whose JSON is not an image is Glance failing, not a crash."""
        images = service(lambda request: httpx.Response(200, json={"id": IMAGE_ID}))
        with pytest.raises(errors.ImageServiceUnavailable, match="cannot read"):
            await images.get(CONTEXT, IMAGE_ID)

    async def test_a_download_of_an_image_glance_lost_is_a_fetch_error(
        self, tmp_path: Path
    ) -> None:
        """The file's 404 fails the fetch (the rebuild rolls back), naming the image; no file."""
        images = service(lambda request: httpx.Response(404))
        with pytest.raises(errors.ImageFetchError, match=IMAGE_ID):
            await images.download(IMAGE_ID, tmp_path / "base")
        assert not (tmp_path / "base").exists()


class TestDownload:
    async def test_the_data_streams_to_the_file_one_chunk_at_a_time(self, tmp_path: Path) -> None:
        """While Glance sends 64 MiB, the file grows chunk by chunk and memory stays a few MiB."""
        dest = tmp_path / "base"
        chunks = 64
        sizes: list[int] = []

        async def body() -> AsyncIterator[bytes]:
            for n in range(chunks):
                sizes.append(dest.stat().st_size if dest.exists() else 0)
                yield bytes([n]) * CHUNK

        def handler(request: httpx.Request) -> httpx.Response:
            assert request.url.path == f"/v2/images/{IMAGE_ID}/file"
            return httpx.Response(200, content=body())

        tracemalloc.start()
        try:
            await service(handler).download(IMAGE_ID, dest)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert dest.stat().st_size == chunks * CHUNK
        # When chunk n is asked for, all but at most the one before it are on disk.
        assert all(size >= (n - 1) * CHUNK for n, size in enumerate(sizes))
        assert peak < 8 * CHUNK, f"peak {peak} bytes for a {chunks} MiB download"
        with dest.open("rb") as f:
            f.seek(37 * CHUNK)
            assert f.read(4) == bytes([37]) * 4


class TestList:
    async def test_without_a_limit_every_page_of_glance_is_listed(self) -> None:
        """Glance's next links are followed until the last page, filters passed on."""
        first, second = str(uuid.uuid4()), str(uuid.uuid4())
        seen: list[str] = []

        def handler(request: httpx.Request) -> httpx.Response:
            seen.append(str(request.url))
            if "marker" not in request.url.params:
                body = {"images": [glance_image(id=first)], "next": f"/v2/images?marker={first}"}
            else:
                body = {"images": [glance_image(id=second)]}
            return httpx.Response(200, content=json.dumps(body))

        found = await service(handler).list(ImageFilters(name="a", ids=[first, second]))
        assert [i.id for i in found] == [first, second]
        assert seen[0] == f"{URL}/v2/images?name=a&id=in%3A{first}%2C{second}"
        assert seen[1] == f"{URL}/v2/images?marker={first}"

    async def test_with_a_limit_one_page_is_listed(self) -> None:
        """limit and marker go to Glance, and only its first page comes back."""
        seen: list[httpx.Request] = []

        def handler(request: httpx.Request) -> httpx.Response:
            seen.append(request)
            body = {"images": [glance_image()], "next": "/v2/images?marker=x"}
            return httpx.Response(200, json=body)

        found = await service(handler).list(ImageFilters(limit=1, marker=IMAGE_ID))
        assert len(found) == 1 and len(seen) == 1
        assert dict(seen[0].url.params) == {"marker": IMAGE_ID, "limit": "1"}

    async def test_writes_are_refused_and_point_at_glance(self) -> None:
        """Creating, uploading or deleting through rebuildd is a 403 naming Glance."""
        images = service(lambda request: httpx.Response(500))
        with pytest.raises(errors.Forbidden, match=f"in Glance at {URL}"):
            await images.create(CONTEXT, {"name": "x"})
        with pytest.raises(errors.Forbidden):
            await images.delete(IMAGE_ID)


class TestDaemon:
    def test_a_trailing_version_is_dropped_from_the_endpoint(self) -> None:
        """http://glance:9292/v2/ and http://glance:9292 are the same Glance."""
        assert glance.endpoint("http://glance:9292/v2/") == "http://glance:9292"
        assert glance.endpoint("http://cloud/image/v2.1") == "http://cloud/image"
        assert glance.endpoint("http://glance:9292/") == "http://glance:9292"

    async def test_the_daemon_owns_one_glance_client_and_closes_it(self, tmp_path: Path) -> None:
        """image_backend=glance makes Glance the images and the cache's source; close closes it."""
        settings = Settings(state_dir=tmp_path, image_backend="glance", glance_url=URL)
        await asyncio.to_thread(migrations.upgrade, settings.effective_database_url)
        transport = httpx.MockTransport(lambda request: httpx.Response(200, json=glance_image()))
        daemon = await open_daemon(settings, glance_transport=transport)
        try:
            images = daemon.services.deps.images
            assert isinstance(images, GlanceImageService)
            assert daemon.services.images is images and daemon.cache.images is images
            assert daemon.http_clients == [images.client]
            assert (await images.get(None, IMAGE_ID)) is not None
        finally:
            await daemon.close(drain_timeout=5)
        assert images.client.is_closed

    async def test_glance_without_a_url_or_keystone_is_refused_at_start(
        self, tmp_path: Path
    ) -> None:
        """REBUILDD_IMAGE_BACKEND=glance with neither REBUILDD_GLANCE_URL nor Keystone
        credentials (for the catalog) fails loudly at start."""
        from rebuildd.daemon import open_daemon

        settings = Settings(
            state_dir=tmp_path, image_backend="glance", libvirt_uri="test:///default"
        )
        with pytest.raises(ValueError, match="REBUILDD_GLANCE_URL or the REBUILDD_KEYSTONE_"):
            await open_daemon(settings)


class TestSeedDemo:
    def test_seed_demo_on_glance_makes_the_flavors_and_no_local_image(self, tmp_path: Path) -> None:
        """``rebuildd seed-demo`` with the glance backend seeds flavors only (images are
        Glance's), so nothing lands in the unused local store."""
        env = {
            **os.environ,
            "REBUILDD_STATE_DIR": str(tmp_path),
            "REBUILDD_IMAGE_BACKEND": "glance",
            "REBUILDD_GLANCE_URL": URL,
        }
        for command in (["db", "upgrade"], ["seed-demo"]):
            done = subprocess.run(
                [str(BIN), *command], env=env, check=True, capture_output=True, timeout=120
            )
        assert done.stdout == b""
        assert not (tmp_path / "images").exists() or not any((tmp_path / "images").iterdir())

        async def flavors() -> list[str]:
            store = Store(create_engine(f"sqlite+aiosqlite:///{tmp_path / 'rebuildd.db'}"))
            try:
                return [f.name for f in await store.list_flavors()]
            finally:
                await store.close()

        assert asyncio.run(flavors()) == ["m1.tiny", "m1.small"]
