"""Images: the local, Glance-compatible image store and the per-host image cache.

Owns image files under ``<state_dir>/images`` (the store) and ``<state_dir>/_base`` (the cache
of base files that root-disk overlays back onto, and its cleanup of unused bases). Image
records live in the Store. File names are image uuids that rebuildd generated, never client
input. It must not call libvirt.

Bytes are inspected (``imagecheck``) before any qemu process reads them, and cannot change
once checked: an upload holds the image by one compare-and-swap ``queued -> saving`` and
writes a private temporary file; the cache's base is its own copy (never a hard link into the
store), checked against the image's hash and inspected before first use in each process.
A daemon killed during an upload or a fetch leaves a ``.part`` file and an image in ``saving``:
the next start removes this host's ``.part`` files and puts their images back to ``queued``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Collection
from pathlib import Path
from typing import Any

import anyio
import structlog

from rebuildd import errors, imagecheck
from rebuildd.auth import image_visible
from rebuildd.disks import DiskManager, os_error, touch
from rebuildd.metrics import Metrics
from rebuildd.models import Image, RequestContext, utcnow
from rebuildd.ports import ImageService
from rebuildd.storage import ImageFilters, Store

CHUNK = 1 << 20
DISK_FORMATS = frozenset({"qcow2", "raw"})
CONTAINER_FORMATS = frozenset({"bare"})
_TOUCH_EVERY = 60.0  # seconds

log = structlog.get_logger("rebuildd.images")


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
        """Copy the image's bytes to ``dest``: a copy of its own, never a hard link, so the
        cache's checked bytes share no inode with the store."""
        try:
            await anyio.to_thread.run_sync(shutil.copyfile, self._path(image_id), dest)
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__  # never the host path
            raise errors.ImageFetchError(image_id=image_id, reason=reason) from exc

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
        """Store the bytes, check they are the declared disk_format and safe, and activate the
        image. Only the caller whose ``queued -> saving`` swap won writes; a refused upload
        leaves the image ``queued``."""
        image = await self.store.get_image(image_id)
        if image is None:
            raise errors.ImageNotFound(image_id=image_id)
        if image.status == "queued" and image.disk_format not in DISK_FORMATS:
            raise errors.Invalid(
                f"Image {image_id} needs a disk_format of "
                f"{', '.join(sorted(DISK_FORMATS))} before upload"
            )
        image = await self.store.swap_image_status(image_id, "queued", "saving")
        await anyio.Path(self.directory).mkdir(parents=True, exist_ok=True)
        path = self._path(image_id)
        partial = self.directory / f".{path.name}.{uuid.uuid4().hex}.part"
        try:
            try:
                size, md5, sha512 = await _write_new(partial, chunks)
            except OSError as exc:  # a full disk is Glance's 413; no path either way
                raise os_error("the image", exc) from exc
            info = await self._check(partial, image.disk_format)
            await anyio.Path(partial).rename(path)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await anyio.Path(partial).unlink(missing_ok=True)
                with contextlib.suppress(errors.RebuilddError):
                    await self.store.swap_image_status(image_id, "saving", "queued")
            raise
        try:
            return await self.store.swap_image_status(
                image_id,
                "saving",
                "active",
                size=size,
                virtual_size=info.virtual_size,
                checksum=md5,
                os_hash_algo="sha512",
                os_hash_value=sha512,
            )
        except errors.RebuilddError:  # deleted while saving: its bytes go with it
            await anyio.Path(path).unlink(missing_ok=True)
            raise

    async def recover_uploads(self, *, database_local: bool) -> tuple[str, ...]:
        """At start, before this process takes any upload: what the uploads of a killed daemon
        left. Their private ``.part`` files (on this host) are removed and their images go back
        ``saving -> queued``, to be uploaded again. Another image in ``saving`` may be an upload
        running on another host that shares the database: it is reset only when the database is
        this host's own (``database_local``, SQLite). Returns the ids put back."""
        stale: set[str] = set()
        root = anyio.Path(self.directory)
        if await root.exists():
            async for entry in root.glob(".*.part"):
                stale.add(entry.name[1:].split(".", 1)[0])
                await entry.unlink(missing_ok=True)
        saving = await self.store.list_images(ImageFilters(status="saving"))
        reset = tuple(i.id for i in saving if i.id in stale or database_local)
        for image_id in reset:
            with contextlib.suppress(errors.Conflict, errors.ImageNotFound):
                await self.store.swap_image_status(image_id, "saving", "queued")
        if reset or stale:
            log.warning("interrupted_uploads_reset", image_ids=reset, part_files=len(stale))
        return reset

    async def _check(self, path: Path, disk_format: str | None) -> imagecheck.Inspected:
        """Inspection first; only then may qemu-img open the file (with -f, to see it can)."""
        inspected = await anyio.to_thread.run_sync(imagecheck.inspect, path, disk_format)
        try:
            await self.disks.info(path, fmt=inspected.disk_format)
        except errors.DiskError as exc:
            raise errors.ImageDataInvalid(
                disk_format=inspected.disk_format, reason="qemu-img cannot read it"
            ) from exc
        return inspected

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
        # Bases this process has checked (hash and inspection): a base left by an earlier
        # process, or an older rebuildd, is checked again before its first use here.
        self._checked: set[str] = set()
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
            there = await self.disks.files.run(touch, path)  # one hop: there, and now used
            if there and (path.name in self._checked or await self._still_good(image, path)):
                self._checked.add(path.name)
                self._touched[path.name] = time.monotonic()
                return path
            await anyio.Path(self.directory).mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(f".{uuid.uuid4().hex[:8]}.part")
            try:
                self.metrics.image_downloads.inc()
                await self.images.download(image.id, partial)
                await self._check(image, partial)
                await anyio.Path(partial).rename(path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    await anyio.Path(partial).unlink()
            self._checked.add(path.name)
        return path

    async def _check(self, image: Image, path: Path) -> None:
        """The hash, then the inspection, of the cache's own copy: what qemu will read."""
        await _verify(image, path)
        try:
            await anyio.to_thread.run_sync(imagecheck.inspect, path, image.disk_format)
        except errors.ImageDataInvalid as exc:
            raise errors.ImageUnacceptable(image_id=image.id, reason=exc.message) from exc

    async def _still_good(self, image: Image, path: Path) -> bool:
        """A base this process did not fetch: kept if it is a file of its own that passes the
        checks, else removed (with its overlay templates) to be fetched again."""
        try:
            if (await anyio.Path(path).stat()).st_nlink == 1:
                await self._check(image, path)
                return True
        except (errors.ImageUnacceptable, errors.ImageFetchError):
            pass
        await anyio.Path(path).unlink(missing_ok=True)
        await self.disks.remove_templates(path)
        return False

    async def remove_partials(self) -> int:
        """At start: the half-fetched bases (``.part``) and half-made blank bases
        (``.partial``) a killed daemon left in this host's cache. Returns how many went."""
        root = anyio.Path(self.directory)
        if not await root.exists():
            return 0
        removed = 0
        async for entry in root.iterdir():
            if entry.name.endswith((".part", ".partial")):
                await entry.unlink(missing_ok=True)
                removed += 1
        return removed

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
                    self._checked.discard(name)
                except FileNotFoundError:
                    continue
                finally:
                    self._touched.pop(name, None)
            await self.disks.remove_templates(Path(entry))
            self._locks.pop(name, None)
            removed.append(name)
        return removed


async def recover_interrupted(images: object, cache: ImageCache, store: Store) -> None:
    """At a daemon's start: what uploads and fetches a killed daemon left on this host."""
    if isinstance(images, LocalImageService):
        await images.recover_uploads(database_local=store.engine.dialect.name == "sqlite")
    await cache.remove_partials()
    await cache.disks.remove_partials()


async def _write_new(path: Path, chunks: AsyncIterator[bytes]) -> tuple[int, str, str]:
    """Write ``chunks`` into a new file (never an existing one); its size, md5 and sha512."""
    md5, sha512, size = hashlib.md5(usedforsecurity=False), hashlib.sha512(), 0
    async with await anyio.open_file(path, "xb") as out:
        async for chunk in chunks:
            md5.update(chunk)
            sha512.update(chunk)
            size += len(chunk)
            await out.write(chunk)
    return size, md5.hexdigest(), sha512.hexdigest()


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
