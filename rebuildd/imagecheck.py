"""Image inspection: what an image file really holds, read before any qemu process opens it.

Owns the one rule every entry of image bytes goes through (a local upload, a download into the
image cache, the base of an adopted domain's disk): the format is detected from the content
with OpenStack's own inspector (``oslo_utils.imageutils.format_inspector``, the fix of
OSSA-2024-001 / CVE-2024-32498 and CVE-2022-47951), it must be the declared ``disk_format``,
and the inspector's safety checks must pass: no backing file, no external data file, no
unknown qcow2 feature, nothing VMDK or any other format could point at a host file with, since
only raw and qcow2 are accepted. It reads the file and nothing else: no qemu-img, no Store.
Blocking; callers run it in a thread.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from oslo_utils.imageutils import format_inspector as fi

from rebuildd import errors

# The disk formats rebuildd writes disks from; qemu reads each with an explicit -f.
SUPPORTED: Final = frozenset({"raw", "qcow2"})
# What the inspector may call bytes declared raw: qemu reads them as plain bytes under -f raw.
# An MBR or GPT partition table is reported as "gpt"; Nova accepts it as raw too.
_RAW_CONTENT: Final = frozenset({"raw", "gpt"})


@dataclass(frozen=True, slots=True)
class Inspected:
    disk_format: str  # raw or qcow2: what qemu must be told with -f
    virtual_size: int  # bytes the guest sees


def inspect(path: Path, disk_format: str | None, *, allow: Collection[str] = ()) -> Inspected:
    """The file's format and virtual size, once it is known to be the declared ``disk_format``
    and safe. ``allow`` names safety checks that may fail (adopt: ``backing_file`` of an
    existing overlay, whose base is inspected in turn). Raises ImageDataInvalid with the
    reason (no path in it)."""
    declared = disk_format or "raw"
    if declared not in SUPPORTED:
        raise errors.ImageDataInvalid(
            disk_format=declared, reason=f"only {', '.join(sorted(SUPPORTED))} are accepted"
        )
    try:
        found = fi.detect_file_format(str(path))
    except fi.ImageFormatError as exc:
        raise errors.ImageDataInvalid(disk_format=declared, reason=str(exc)) from exc
    name = str(found) if found is not None else "unknown"
    if found is None or not (name == declared or (declared == "raw" and name in _RAW_CONTENT)):
        raise errors.ImageDataInvalid(disk_format=declared, reason=f"its content is {name}")
    _safety_check(found, declared, allow)
    size = path.stat().st_size if declared == "raw" else found.virtual_size
    return Inspected(disk_format=declared, virtual_size=size)


def _safety_check(found: fi.FileInspector, declared: str, allow: Collection[str]) -> None:
    try:
        found.safety_check()
    except fi.SafetyCheckFailed as exc:
        failed = {name: str(why) for name, why in exc.failures.items() if name not in allow}
        if failed:
            reason = "; ".join(f"{why} ({name})" for name, why in sorted(failed.items()))
            raise errors.ImageDataInvalid(disk_format=declared, reason=reason) from exc
    except fi.ImageFormatError as exc:
        raise errors.ImageDataInvalid(disk_format=declared, reason=str(exc)) from exc
