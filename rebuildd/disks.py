"""Disk files on this host: qcow2 overlays and image inspection through ``qemu-img``.

Owns the instance directory layout, the blank bases of ephemeral and swap disks, and every
``qemu-img``, ``mkfs`` and ``mkswap`` call (async subprocesses, never through a shell). Paths
are built from server uuids and generation tokens that rebuildd made itself, never from names a
client sent. It must not touch the Store or libvirt.

An empty overlay depends only on its backing file, that file's format and the virtual size, so
``qemu-img create`` runs once per (base, size) into a template under ``_templates`` and each
root disk is a copy of it: ~15 ms of process start-up per rebuild become a file copy of a few
hundred KiB (measured in bench/, see the README). Templates are named after their base, so the
image cache's cleanup can remove a base's templates with it.

Every ``qemu-img`` call names the format of the image it reads (``-f``, never a probe) and runs
under Nova's ``QEMU_IMG_LIMITS`` through ``prlimit``: 1 GiB of address space and 30 s of CPU
(a ``convert``, whose CPU time grows with an image already inspected and size-checked, gets
the address-space limit only). Image files reach it only after ``imagecheck`` passed them.

Ephemeral and swap disks are made as Nova's libvirt driver makes them: one raw base per (size,
format) under ``_base`` — ``ephemeral_<MiB>_<fs>`` formatted with ``mkfs`` (label
``ephemeral0``), ``swap_<MiB>`` with ``mkswap`` — and a qcow2 overlay on it per server.

A failure names the disk, never a host path: a full file system (ENOSPC, EDQUOT, EFBIG, from
the OS or in a tool's words) is :class:`DiskSpaceExhausted`, any other OS error its
``strerror`` alone, and a tool's message has its paths cut to their last component.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import anyio

from rebuildd import configdrive
from rebuildd.errors import (
    DiskError,
    FlavorDiskSmallerThanImage,
    InsufficientStorage,
    without_host_paths,
)
from rebuildd.offload import Offload

MiB: Final = 1024**2
GiB: Final = 1024**3
# Nova's QEMU_IMG_LIMITS (nova/virt/images.py): what a hostile header can make qemu-img take.
QEMU_IMG_ADDRESS_SPACE: Final = 1 * GiB
QEMU_IMG_CPU_SECONDS: Final = 30
# Filesystems an ephemeral disk may be formatted with ("none": left blank), and how.
EPHEMERAL_FORMATS: Final = {
    "ext4": ("mkfs.ext4", "-F", "-q", "-L", "ephemeral0"),
    "ext3": ("mkfs.ext3", "-F", "-q", "-L", "ephemeral0"),
    "ext2": ("mkfs.ext2", "-F", "-q", "-L", "ephemeral0"),
    "none": (),
}
NO_SPACE: Final = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
# The same errors in a tool's stderr (qemu-img, mkfs print strerror).
_NO_SPACE_WORDS: Final = tuple(os.strerror(code) for code in sorted(NO_SPACE))


class VolumeTooSmall(DiskError):
    """An image whose virtual size exceeds the volume it is written into."""

    template = "The image's virtual size {virtual_size} exceeds the volume's {size_bytes} bytes"


class DiskSpaceExhausted(InsufficientStorage):
    """The host's file system refused a disk's bytes (ENOSPC, EDQUOT, EFBIG): 413 before a
    202, a fault naming the disk (never its path) in a job, which rolls back."""

    template = "Not enough space on this host to create {what}: {reason}"


@dataclass(frozen=True, slots=True)
class ImageInfo:
    format: str
    virtual_size: int
    backing_file: str | None
    backing_format: str | None = None


class DiskManager:
    """Creates and removes the disk files of servers under ``<state_dir>/instances``."""

    def __init__(
        self,
        instances_dir: Path,
        *,
        base_dir: Path | None = None,
        qemu_img: str = "qemu-img",
        retention_seconds: float = 0,
        file_threads: int = 8,
    ) -> None:
        self.instances_dir = instances_dir
        self.base_dir = base_dir or instances_dir.parent / "_base"
        self.qemu_img = qemu_img
        self.retention_seconds = retention_seconds
        # The threads of blocking file calls on a rebuild's path (the image cache's too).
        self.files = Offload(file_threads, "files")

    def close(self) -> None:
        """Let the file threads go (once their calls end)."""
        self.files.shutdown()

    def instance_dir(self, server_id: str) -> Path:
        return self.instances_dir / str(uuid.UUID(server_id))

    def new_disk_path(self, server_id: str, kind: str) -> Path:
        """A fresh file name for one of a server's disks (``kind``: root, ephemeral0, swap,
        config), so a rebuild never overwrites the disk it replaces."""
        suffix = ".iso" if kind == "config" else ".qcow2"
        return self.instance_dir(server_id) / f"{kind}-{uuid.uuid4().hex[:12]}{suffix}"

    async def create_blank(self, *, path: Path, size_mib: int, guest_format: str) -> None:
        """An ephemeral (``guest_format`` a filesystem or "none") or swap disk: a qcow2
        overlay on the shared base of that size and format, made first if missing."""
        base = await self.blank_base(size_mib, guest_format)
        await self.create_overlay(base=base, base_format="raw", path=path, size_bytes=None)

    async def blank_base(self, size_mib: int, guest_format: str) -> Path:
        if guest_format == "swap":
            command: tuple[str, ...] = ("mkswap", "-q")
        elif guest_format in EPHEMERAL_FORMATS:
            command = EPHEMERAL_FORMATS[guest_format]
        else:
            raise DiskError(command="mkfs", reason=f"unsupported format {guest_format!r}")
        name = blank_base_name(size_mib, guest_format)
        base = self.base_dir / name
        if await self.files.run(touch, base):  # in use: keep it from the cleanup
            return base
        partial = base.with_name(f".{name}.{uuid.uuid4().hex[:8]}.partial")
        try:
            await anyio.Path(self.base_dir).mkdir(parents=True, exist_ok=True)
            await anyio.to_thread.run_sync(_sparse_file, partial, size_mib * MiB)
            if command:
                await _run(command[0], *command[1:], str(partial))
            await anyio.Path(partial).rename(base)
        except OSError as exc:
            raise os_error(f"the {name} base", exc) from exc
        except (DiskError, DiskSpaceExhausted) as exc:
            # mkswap and mkfs do not always say why a write failed: a full file system is.
            if isinstance(exc, DiskSpaceExhausted) or await self.files.run(_full, self.base_dir):
                reason = os.strerror(errno.ENOSPC)
                raise DiskSpaceExhausted(what=f"the {name} base", reason=reason) from exc
            raise
        finally:
            await anyio.Path(partial).unlink(missing_ok=True)
        return base

    async def create_config_drive(self, path: Path, data: configdrive.ConfigDriveData) -> None:
        """The config drive ISO (a new file; see configdrive.py)."""
        try:
            await anyio.Path(path.parent).mkdir(parents=True, exist_ok=True)
            await anyio.to_thread.run_sync(configdrive.build_iso, data, path)
        except OSError as exc:
            raise os_error("the config drive", exc) from exc
        except DiskError as exc:  # configdrive's own, for an OS error while writing
            if isinstance(exc.__cause__, OSError):
                raise os_error("the config drive", exc.__cause__) from exc
            raise

    async def remove_templates(self, base: Path) -> None:
        """Remove the overlay templates made from ``base`` (when the cache drops it)."""
        templates = anyio.Path(self.instances_dir / "_templates")
        if not await templates.exists():
            return
        async for template in templates.glob(f"{base.name}-*.qcow2"):
            await template.unlink(missing_ok=True)

    async def remove_partials(self) -> int:
        """At start: the half-made overlay templates a killed daemon left. Returns how many."""
        templates = anyio.Path(self.instances_dir / "_templates")
        if not await templates.exists():
            return 0
        removed = 0
        async for partial in templates.glob(".*.partial"):
            await partial.unlink(missing_ok=True)
            removed += 1
        return removed

    async def create_overlay(
        self, *, base: Path, base_format: str, path: Path, size_bytes: int | None
    ) -> None:
        """A qcow2 overlay backed by ``base`` (O(1) whatever the image size): a copy of the
        template for (base, format, size), made first if missing."""
        key = hashlib.sha256(f"{base}\0{base_format}\0{size_bytes}".encode())
        template = self.instances_dir / "_templates" / f"{base.name}-{key.hexdigest()[:24]}.qcow2"
        try:
            # One thread hop in the common case (the template exists), not three.
            if not await self.files.run(_copy_template, template, path):
                await self._template(template, base, base_format, size_bytes)
                await self.files.run(_copy_template, template, path)
        except OSError as exc:
            raise os_error(_disk_name(path), exc) from exc
        except DiskSpaceExhausted as exc:  # qemu-img's words for it
            raise DiskSpaceExhausted(what=_disk_name(path), reason=exc.kwargs["reason"]) from exc

    async def _template(
        self, template: Path, base: Path, base_format: str, size_bytes: int | None
    ) -> None:
        await anyio.Path(template.parent).mkdir(parents=True, exist_ok=True)
        # Made under a unique name and renamed: racing creators each leave a whole template.
        partial = template.with_name(f".{uuid.uuid4().hex}.partial")
        if size_bytes:  # Nova's verify_base_size: a root disk never cuts its image short
            image_size = (await self.info(base, fmt=base_format)).virtual_size
            if image_size > size_bytes:
                raise FlavorDiskSmallerThanImage(flavor_size=size_bytes, image_size=image_size)
        args = ["create", "-q", "-f", "qcow2", "-b", str(base), "-F", base_format, str(partial)]
        if size_bytes:
            args.append(str(size_bytes))
        try:
            await self._run(*args)
            await anyio.Path(partial).rename(template)
        finally:
            await anyio.Path(partial).unlink(missing_ok=True)

    async def info(self, path: Path, *, fmt: str, force_share: bool = False) -> ImageInfo:
        """The header of ``path`` read as ``fmt`` (never probed). ``force_share`` (``-U``):
        read the header of a disk a running QEMU holds locked (safe for the format and virtual
        size, which is all this returns)."""
        share = ("-U",) if force_share else ()
        out = await self._run("info", "-f", fmt, *share, "--output=json", str(path))
        data: dict[str, Any] = json.loads(out)
        return ImageInfo(
            format=str(data["format"]),
            virtual_size=int(data["virtual-size"]),
            backing_file=data.get("full-backing-filename") or data.get("backing-filename"),
            backing_format=data.get("backing-filename-format"),
        )

    async def write_volume(
        self, *, path: Path, size_bytes: int, source: Path | None = None, source_format: str = "raw"
    ) -> None:
        """A volume's file: sparse raw of ``size_bytes``, blank or holding ``source`` converted
        (``qemu-img convert``: a full copy, zeroes left sparse) and grown to the size. Written
        under a temporary name and renamed over ``path``, so a re-image replaces the old bytes
        only once the new ones are whole. A source larger than the size is refused."""
        partial = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
        try:
            await anyio.Path(path.parent).mkdir(parents=True, exist_ok=True)
            if source is None:
                await anyio.to_thread.run_sync(_sparse_file, partial, size_bytes)
            else:
                info = await self.info(source, fmt=source_format)
                if info.virtual_size > size_bytes:
                    raise VolumeTooSmall(virtual_size=info.virtual_size, size_bytes=size_bytes)
                await self._run(
                    "convert", "-q", "-f", source_format, "-O", "raw", str(source), str(partial),
                    cpu_limit=False,
                )  # fmt: skip
                await anyio.to_thread.run_sync(os.truncate, partial, size_bytes)
            await anyio.Path(partial).rename(path)
        except DiskSpaceExhausted as exc:  # qemu-img convert's words for it
            raise DiskSpaceExhausted(what="the volume", reason=exc.kwargs["reason"]) from exc
        except OSError as exc:
            # No DiskSpaceExhausted here: LocalVolumeService names the volume and its size.
            reason = exc.strerror or type(exc).__name__
            raise DiskError(command="write volume", reason=reason) from exc
        finally:
            await anyio.Path(partial).unlink(missing_ok=True)

    async def remove(self, path: Path) -> None:
        await self.files.run(_unlink, path)

    async def retire(self, path: Path) -> None:
        """A replaced root disk: removed now, or kept ``retention_seconds`` under a
        ``retired-<unix time>-`` name (as AWS keeps a replaced root volume) for the sweeper."""
        if self.retention_seconds <= 0:
            await self.remove(path)
            return
        source = anyio.Path(path)
        if await source.exists():
            await source.rename(path.with_name(f"retired-{int(time.time())}-{path.name}"))

    async def sweep_retired(self) -> int:
        """Remove retired disks older than the retention; return how many went."""
        cutoff = time.time() - self.retention_seconds
        removed = 0
        root = anyio.Path(self.instances_dir)
        if not await root.exists():
            return 0
        async for directory in root.iterdir():
            async for child in directory.glob("retired-*"):
                stamp = child.name.split("-", 2)[1]
                if stamp.isdigit() and int(stamp) < cutoff:
                    await child.unlink(missing_ok=True)
                    removed += 1
        return removed

    async def remove_instance_dir(self, server_id: str) -> None:
        directory = anyio.Path(self.instance_dir(server_id))
        if not await directory.exists():
            return
        async for child in directory.iterdir():
            await child.unlink(missing_ok=True)
        await directory.rmdir()

    async def _run(self, *args: str, cpu_limit: bool = True) -> str:
        limits = [f"--as={QEMU_IMG_ADDRESS_SPACE}"]
        if cpu_limit:
            limits.append(f"--cpu={QEMU_IMG_CPU_SECONDS}")
        command = f"{self.qemu_img} {args[0]}"
        return await _run("prlimit", *limits, "--", self.qemu_img, *args, name=command)


async def _run(program: str, *args: str, name: str | None = None) -> str:
    """One tool call; its failure is a DiskError with the tool's own message."""
    command = name or f"{program} {args[0]}"
    try:
        process = await asyncio.create_subprocess_exec(
            program,
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:
        raise DiskError(command=command, reason=exc.strerror or type(exc).__name__) from exc
    stdout, stderr = await process.communicate()
    if process.returncode != 0:
        reason = stderr.decode(errors="replace").strip() or f"exit {process.returncode}"
        for words in _NO_SPACE_WORDS:
            if words in reason:
                raise DiskSpaceExhausted(what=f"a disk ({command})", reason=words) from None
        raise DiskError(command=command, reason=without_host_paths(reason))
    return stdout.decode()


def os_error(what: str, exc: OSError) -> DiskError | DiskSpaceExhausted:
    """The error of ``exc`` while making ``what``, without the file name the OS put in it."""
    reason = exc.strerror or type(exc).__name__
    if exc.errno in NO_SPACE:
        return DiskSpaceExhausted(what=what, reason=reason)
    return DiskError(command=f"create {what}", reason=reason)


def _disk_name(path: Path) -> str:
    """``root-1a2b.qcow2`` -> "the root disk" (the kind new_disk_path put first)."""
    return f"the {path.name.split('-', 1)[0]} disk"


def blank_base_name(size_mib: int, guest_format: str) -> str:
    """The base file of blank disks of this size and format (Nova: ``swap_512``, ...)."""
    if guest_format == "swap":
        return f"swap_{size_mib}"
    return f"ephemeral_{size_mib}_{guest_format}"


def _sparse_file(path: Path, size: int) -> None:
    with path.open("xb") as f:
        f.truncate(size)


def _full(directory: Path) -> bool:
    """Whether the file system of ``directory`` has no block left for us."""
    return os.statvfs(directory).f_bavail == 0


def touch(path: Path) -> bool:
    """Mark a base as used now (the cache cleanup's age); False if it is not there."""
    try:
        os.utime(path)
    except FileNotFoundError:
        return False
    return True


def _unlink(path: Path) -> None:
    path.unlink(missing_ok=True)


def _copy_template(template: Path, dest: Path) -> bool:
    """A new ``dest`` (its directory made if needed) copied from ``template``; False if there
    is no template yet."""
    try:
        with template.open("rb") as src:
            dest.parent.mkdir(parents=True, exist_ok=True)
            with dest.open("xb") as out:
                shutil.copyfileobj(src, out)
    except FileNotFoundError as exc:
        if exc.filename == str(template):
            return False
        raise
    return True
