"""Demo data for ``make run``: two small generated images and two flavors (idempotent).

The images are real qcow2 files (64 MiB virtual, a few hundred KiB on disk) with different
contents, made with qemu-img and qemu-io, and stored through the local image store exactly as
an upload through the API would be.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import structlog

from rebuildd import errors
from rebuildd.disks import DiskManager
from rebuildd.images import CHUNK, LocalImageService
from rebuildd.models import Flavor, RequestContext
from rebuildd.storage import ImageFilters, Store

log = structlog.get_logger("rebuildd.demo")

DEMO_FLAVORS = (
    Flavor(id="1", name="m1.tiny", vcpus=1, ram=512, disk=1),
    Flavor(id="2", name="m1.small", vcpus=1, ram=2048, disk=20),
)
DEMO_IMAGES = (("demo-image-a", 0xAA), ("demo-image-b", 0xBB))


async def seed(store: Store, images: LocalImageService, disks: DiskManager) -> list[str]:
    """Create what is missing; return the ids of the demo images."""
    await seed_flavors(store)
    context = RequestContext(request_id="req-seed-demo", user_id="admin", project_id="admin")
    ids = []
    for name, pattern in DEMO_IMAGES:
        found = [
            i for i in await store.list_images(ImageFilters(name=name)) if i.status == "active"
        ]
        if found:
            ids.append(found[0].id)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{name}.qcow2"
            await make_image(disks.qemu_img, path, pattern)
            image = await images.create(
                context,
                {
                    "name": name,
                    "disk_format": "qcow2",
                    "container_format": "bare",
                    "visibility": "public",
                },
            )
            await images.upload(image.id, _chunks(path))
        ids.append(image.id)
        log.info("demo image created", name=name, image_id=image.id)
    return ids


async def seed_flavors(store: Store) -> None:
    """Create the demo flavors that are missing (images may live elsewhere, e.g. in Glance)."""
    existing = {f.id for f in await store.list_flavors()}
    for flavor in DEMO_FLAVORS:
        if flavor.id not in existing:
            try:
                await store.create_flavor(flavor)
            except errors.Duplicate:
                log.warning("flavor name taken; skipped", name=flavor.name)


async def make_image(qemu_img: str, path: Path, pattern: int) -> None:
    """A 64 MiB qcow2 whose first MiB is ``pattern`` (how every demo image is made)."""
    sibling = Path(qemu_img).with_name("qemu-io")
    qemu_io = str(sibling) if "/" in qemu_img and sibling.exists() else "qemu-io"
    for argv in (
        [qemu_img, "create", "-q", "-f", "qcow2", str(path), "64M"],
        [qemu_io, "-f", "qcow2", "-c", f"write -P {pattern} 0 1M", str(path)],
    ):
        process = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
        )
        _, stderr = await process.communicate()
        if process.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed: {stderr.decode().strip()}")


async def _chunks(path: Path) -> AsyncIterator[bytes]:
    async with await anyio.open_file(path, "rb") as f:
        while chunk := await f.read(CHUNK):
            yield chunk
