"""Images: the local, Glance-compatible image store and the per-host image cache.

Owns image files under ``<state_dir>/images`` (the store) and ``<state_dir>/_base`` (the cache
of base files that root-disk overlays back onto, and its cleanup of unused bases). Image
records live in the Store. File names are image uuids that rebuildd generated, never client
input. It must not call libvirt.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Collection
from pathlib import Path
from typing import Any

import anyio

from rebuildd import errors
from rebuildd.auth import image_visible
from rebuildd.disks import DiskManager, touch
from rebuildd.metrics import Metrics
from rebuildd.models import Image, RequestContext, utcnow
from rebuildd.ports import ImageService
from rebuildd.storage import ImageFilters, Store

CHUNK = 1 << 20
DISK_FORMATS = frozenset({"qcow2", "raw"})
CONTAINER_FORMATS = frozenset({"bare"})
_TOUCH_EVERY = 60.0  # seconds


class LocalImageService:
    """Images kept on this host: records in the Store, bytes in a directory."""

    def __init__(self, store: Store, directory: Path, disks: DiskManager) -> None:
        self.store = store
        self.directory = directory
        self.disks = disks

    def _path(self, image_id: str) -> Path:
        return self.directory / str(uuid.UUID(image_id))

    # -- the ImageService port ----------------------------------------------------------------

    async def get(self, context: RequestContext | None, image_id: str) -> Image | None:
        """The image, if the caller may see it (Glance's visibility); None as if there were
        no such image otherwise. Without a context: rebuildd's own look-up (a job's image)."""
        try:
            uuid.UUID(image_id)
        except ValueError:
            return None
        image = await self.store.get_image(image_id)
        if image is None or context is None or image_visible(context, image):
            return image
        return None

    async def download(self, image_id: str, dest: Path) -> None:
        """Place the image's bytes at ``dest``: a hard link when possible, else a copy."""
        source = self._path(image_id)

        def place() -> None:
            try:
                os.link(source, dest)
            except OSError:
                shutil.copyfile(source, dest)

        try:
            await anyio.to_thread.run_sync(place)
        except OSError as exc:
            raise errors.ImageFetchError(image_id=image_id, reason=str(exc)) from exc

    # -- the Glance-compatible API's operations -------------------------------------------------

    async def create(self, context: RequestContext, fields: dict[str, Any]) -> Image:
        now = utcnow()
        image = Image(
            id=str(fields.pop("id", None) or uuid.uuid4()),
            name=fields.pop("name", None),
            status="queued",
            disk_format=fields.pop("disk_format", None),
            container_format=fields.pop("container_format", None),
            size=None,
            virtual_size=None,
            checksum=None,
            os_hash_algo=None,
            os_hash_value=None,
            min_disk=int(fields.pop("min_disk", 0)),
            min_ram=int(fields.pop("min_ram", 0)),
            visibility=str(fields.pop("visibility", "shared")),
            protected=bool(fields.pop("protected", False)),
            owner=context.project_id,
            properties=fields,
            created_at=now,
            updated_at=now,
        )
        if await self.store.get_image(image.id) is not None:
            raise errors.Duplicate(
                f"Image with identifier {image.id} already exists!", kind="Image", name=image.id
            )
        return await self.store.create_image(image)

    async def list(self, filters: ImageFilters) -> list[Image]:
        return await self.store.list_images(filters)

    async def upload(self, image_id: str, chunks: AsyncIterator[bytes]) -> Image:
        """Store the bytes, check they are the declared disk_format, and activate the image."""
        image = await self.store.get_image(image_id)
        if image is None:
            raise errors.ImageNotFound(image_id=image_id)
        if image.status != "queued":
            raise errors.Conflict(
                f"Image status transition from {image.status} to saving is not allowed"
            )
        if image.disk_format not in DISK_FORMATS:
            raise errors.Invalid(
                f"Image {image_id} needs a disk_format of "
                f"{', '.join(sorted(DISK_FORMATS))} before upload"
            )
        await self.store.update_image(image_id, status="saving")
        await anyio.Path(self.directory).mkdir(parents=True, exist_ok=True)
        path = self._path(image_id)
        partial = path.with_suffix(".part")
        md5, sha512, size = hashlib.md5(usedforsecurity=False), hashlib.sha512(), 0
        try:
            async with await anyio.open_file(partial, "wb") as out:
                async for chunk in chunks:
                    md5.update(chunk)
                    sha512.update(chunk)
                    size += len(chunk)
                    await out.write(chunk)
            try:
                info = await self.disks.info(partial)
            except errors.DiskError as exc:  # qemu-img could not even parse the bytes
                raise errors.ImageDataInvalid(
                    disk_format=image.disk_format, reason="qemu-img cannot read it"
                ) from exc
            if info.format != image.disk_format or info.backing_file:
                raise errors.ImageDataInvalid(
                    disk_format=image.disk_format,
                    reason=f"qemu-img sees {info.format}"
                    + (" with a backing file" if info.backing_file else ""),
                )
            await anyio.Path(partial).rename(path)
        except BaseException:
            await anyio.Path(partial).unlink(missing_ok=True)
            await self.store.update_image(image_id, status="queued")
            raise
        return await self.store.update_image(
            image_id,
            status="active",
            size=size,
            virtual_size=info.virtual_size,
            checksum=md5.hexdigest(),
            os_hash_algo="sha512",
            os_hash_value=sha512.hexdigest(),
        )

    async def read(self, image_id: str) -> AsyncIterator[bytes]:
        async with await anyio.open_file(self._path(image_id), "rb") as source:
            while chunk := await source.read(CHUNK):
                yield chunk

    async def delete(self, image_id: str) -> None:
        image = await self.store.get_image(image_id)
        if image is None:
            raise errors.ImageNotFound(image_id=image_id)
        if image.protected:
            raise errors.Forbidden(f"Image {image_id} is protected and cannot be deleted.")
        await self.store.delete_image(image_id)
        await anyio.Path(self._path(image_id)).unlink(missing_ok=True)


class ImageCache:
    """One verified base file per image under ``<state_dir>/_base``; fetched once per image.

    A base's modification time is its last use: :meth:`cleanup` removes bases no server
    uses that have not been used for ``min_age`` seconds (Nova's
    ``remove_unused_original_minimum_age_seconds``), so a base a rebuild has just fetched or
    is about to back a disk onto is never taken away under it.
    """

    def __init__(
        self,
        directory: Path,
        images: ImageService,
        disks: DiskManager,
        *,
        metrics: Metrics | None = None,
    ) -> None:
        self.directory = directory
        self.images = images
        self.disks = disks
        self.metrics = metrics or Metrics()
        self._locks: dict[str, asyncio.Lock] = {}
        # Base name -> when this process last touched it: a base used again within
        # _TOUCH_EVERY is not touched again (one thread hop fewer a rebuild). Its mtime, the
        # cleanup's age, lags by that much at most, against a minimum age of hours.
        self._touched: dict[str, float] = {}

    async def ensure(self, image: Image) -> Path:
        path = self.directory / str(uuid.UUID(image.id))
        lock = self._locks.setdefault(image.id, asyncio.Lock())
        async with lock:
            if self._used_lately(path.name):
                return path
            if await self.disks.files.run(touch, path):  # one hop: there, and now used
                self._touched[path.name] = time.monotonic()
                return path
            await anyio.Path(self.directory).mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(f".{uuid.uuid4().hex[:8]}.part")
            try:
                self.metrics.image_downloads.inc()
                await self.images.download(image.id, partial)
                await _verify(image, partial)
                await anyio.Path(partial).rename(path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    await anyio.Path(partial).unlink()
        return path

    def _used_lately(self, name: str) -> bool:
        touched = self._touched.get(name)
        return touched is not None and time.monotonic() - touched < _TOUCH_EVERY

    async def cleanup(self, in_use: Collection[str], *, min_age: float) -> list[str]:
        """Remove the bases (image bases, and blank ephemeral/swap bases) whose names are not
        ``in_use`` and that were last used more than ``min_age`` seconds ago, with their
        overlay templates. Returns the names removed."""
        root = anyio.Path(self.directory)
        if not await root.exists():
            return []
        cutoff = time.time() - min_age
        removed = []
        async for entry in root.iterdir():
            name = entry.name
            if name in in_use or name.startswith(".") or ".part" in name:
                continue
            lock = self._locks.setdefault(name, asyncio.Lock())
            async with lock:  # not while ensure() is fetching or touching it
                try:
                    if (await entry.stat()).st_mtime > cutoff:
                        continue
                    await entry.unlink()
                except FileNotFoundError:
                    continue
                finally:
                    self._touched.pop(name, None)
            await self.disks.remove_templates(Path(entry))
            self._locks.pop(name, None)
            removed.append(name)
        return removed


async def _verify(image: Image, path: Path) -> None:
    """Check the bytes against the image's os_hash_value (else its md5 checksum)."""
    if image.os_hash_algo and image.os_hash_value:
        algo, expected = image.os_hash_algo, image.os_hash_value
    elif image.checksum:
        algo, expected = "md5", image.checksum
    else:
        return

    def digest() -> str:
        h = hashlib.new(algo, usedforsecurity=False)
        with path.open("rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
        return h.hexdigest()

    actual = await anyio.to_thread.run_sync(digest)
    if actual != expected:
        raise errors.ImageFetchError(
            image_id=image.id, reason=f"{algo} of the data is {actual}, expected {expected}"
        )
