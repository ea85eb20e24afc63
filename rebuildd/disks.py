"""Disk files on this host: qcow2 overlays and image inspection through ``qemu-img``.

Owns the instance directory layout and every ``qemu-img`` call (async subprocesses, never
through a shell). Paths are built from server uuids and generation tokens that rebuildd made
itself, never from names a client sent. It must not touch the Store or libvirt.

An empty overlay depends only on its backing file, that file's format and the virtual size, so
``qemu-img create`` runs once per (base, size) into a template under ``_templates`` and each
root disk is a copy of it: ~15 ms of process start-up per rebuild become a file copy of a few
hundred KiB (measured in bench/, see the README).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from rebuildd.errors import DiskError


@dataclass(frozen=True, slots=True)
class ImageInfo:
    format: str
    virtual_size: int
    backing_file: str | None


class DiskManager:
    """Creates and removes the disk files of servers under ``<state_dir>/instances``."""

    def __init__(
        self, instances_dir: Path, *, qemu_img: str = "qemu-img", retention_seconds: float = 0
    ) -> None:
        self.instances_dir = instances_dir
        self.qemu_img = qemu_img
        self.retention_seconds = retention_seconds

    def instance_dir(self, server_id: str) -> Path:
        return self.instances_dir / str(uuid.UUID(server_id))

    def new_root_path(self, server_id: str) -> Path:
        """A fresh file name for a root disk, so a rebuild never overwrites the old one."""
        return self.instance_dir(server_id) / f"root-{uuid.uuid4().hex[:12]}.qcow2"

    async def create_overlay(
        self, *, base: Path, base_format: str, path: Path, size_bytes: int | None
    ) -> None:
        """A qcow2 overlay backed by ``base`` (O(1) whatever the image size): a copy of the
        template for (base, format, size), made first if missing."""
        await anyio.Path(path.parent).mkdir(parents=True, exist_ok=True)
        template = await self._template(base, base_format, size_bytes)
        try:
            await anyio.to_thread.run_sync(_copy_new, template, path)
        except OSError as exc:
            raise DiskError(command="copy overlay template", reason=str(exc)) from exc

    async def _template(self, base: Path, base_format: str, size_bytes: int | None) -> Path:
        key = hashlib.sha256(f"{base}\0{base_format}\0{size_bytes}".encode())
        template = self.instances_dir / "_templates" / f"{key.hexdigest()[:32]}.qcow2"
        if await anyio.Path(template).exists():
            return template
        await anyio.Path(template.parent).mkdir(parents=True, exist_ok=True)
        # Made under a unique name and renamed: racing creators each leave a whole template.
        partial = template.with_name(f".{uuid.uuid4().hex}.partial")
        args = ["create", "-q", "-f", "qcow2", "-b", str(base), "-F", base_format, str(partial)]
        if size_bytes:
            args.append(str(size_bytes))
        try:
            await self._run(*args)
            await anyio.Path(partial).rename(template)
        finally:
            await anyio.Path(partial).unlink(missing_ok=True)
        return template

    async def info(self, path: Path) -> ImageInfo:
        out = await self._run("info", "--output=json", str(path))
        data: dict[str, Any] = json.loads(out)
        return ImageInfo(
            format=str(data["format"]),
            virtual_size=int(data["virtual-size"]),
            backing_file=data.get("full-backing-filename") or data.get("backing-filename"),
        )

    async def remove(self, path: Path) -> None:
        await anyio.Path(path).unlink(missing_ok=True)

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

    async def _run(self, *args: str) -> str:
        """One ``qemu-img`` call; its failure is a DiskError with qemu-img's own message."""
        try:
            process = await asyncio.create_subprocess_exec(
                self.qemu_img,
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            raise DiskError(command=f"{self.qemu_img} {args[0]}", reason=str(exc)) from exc
        stdout, stderr = await process.communicate()
        if process.returncode != 0:
            reason = stderr.decode(errors="replace").strip() or f"exit {process.returncode}"
            raise DiskError(command=f"{self.qemu_img} {args[0]}", reason=reason)
        return stdout.decode()


def _copy_new(source: Path, dest: Path) -> None:
    """Copy ``source`` to a new file ``dest``, never over an existing one."""
    with source.open("rb") as src, dest.open("xb") as out:
        shutil.copyfileobj(src, out)
