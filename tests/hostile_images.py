"""Crafted image files that point qemu at a host file, made without ever touching that file.

``qemu-img create -o data_file=X`` or ``-b X`` truncates or opens ``X``, so each file is made
on a scratch name of the same length in the same directory, and the name is then patched to
the target's in the header bytes (the issue's SAFETY rule). The marker is a host file whose
bytes no guest disk may ever show.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

MARKER_BYTES = b"HOST-MARKER-rebuildd-must-never-show-this:" * 64


def marker(directory: Path) -> Path:
    """A host file with :data:`MARKER_BYTES`, the target of every crafted image."""
    path = directory / "host-marker.bin"
    path.write_bytes(MARKER_BYTES)
    return path


def _qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True, timeout=60)


def _scratch(target: Path) -> Path:
    scratch = target.with_name("s" * len(target.name))
    assert scratch != target and len(str(scratch)) == len(str(target))
    return scratch


def _patch(image: Path, old: Path, new: Path) -> bytes:
    data = image.read_bytes()
    assert data.count(str(old).encode()) == 1, "the scratch name must appear once"
    patched = data.replace(str(old).encode(), str(new).encode())
    image.write_bytes(patched)
    return patched


def qcow2_with_data_file(dest: Path, target: Path) -> bytes:
    """A qcow2 whose external data file (raw) is ``target``: OSSA-2024-001."""
    scratch = _scratch(target)
    _qemu_img(
        "create", "-q", "-f", "qcow2", "-o", f"data_file={scratch},data_file_raw=on",
        str(dest), "1M",
    )  # fmt: skip
    scratch.unlink()
    return _patch(dest, scratch, target)


def qcow2_with_backing_file(dest: Path, target: Path) -> bytes:
    """A qcow2 backed by ``target`` read as raw."""
    scratch = _scratch(target)
    # -u: the backing file is not opened (and the scratch never exists).
    _qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", str(scratch), "-F", "raw", str(dest), "1M")
    return _patch(dest, scratch, target)


def vmdk_with_host_extent(dest: Path, target: Path) -> bytes:
    """A sparse VMDK whose embedded descriptor names ``target`` as a flat extent:
    CVE-2022-47951."""
    _qemu_img("create", "-q", "-f", "vmdk", "-o", "subformat=monolithicSparse", str(dest), "1M")
    data = bytearray(dest.read_bytes())
    start = data.index(b"# Disk DescriptorFile")
    end = data.index(b"\0", start)
    text = bytes(data[start:end])
    line = next(x for x in text.split(b"\n") if x.startswith(b"RW "))
    new = text.replace(line, b'RW 2048 FLAT "' + str(target).encode() + b'" 0')
    new = new.ljust(len(text), b"\0")
    assert not any(data[end : start + len(new)]), "the descriptor's region must hold the text"
    data[start : start + len(new)] = new
    dest.write_bytes(bytes(data))
    return bytes(data)


def qcow2_overlay(dest: Path, base: Path, base_format: str) -> None:
    """An empty qcow2 over ``base`` (``-u``: the base is not opened)."""
    _qemu_img(
        "create", "-q", "-f", "qcow2", "-u", "-b", str(base), "-F", base_format, str(dest), "1M"
    )


def plain_vmdk(dest: Path) -> bytes:
    _qemu_img("create", "-q", "-f", "vmdk", str(dest), "1M")
    return dest.read_bytes()


def plain_qcow2(dest: Path, size: str = "1M") -> bytes:
    _qemu_img("create", "-q", "-f", "qcow2", str(dest), size)
    return dest.read_bytes()


def readable_bytes(disk: Path, fmt: str = "qcow2") -> bytes:
    """Every byte a guest reads through ``disk`` (and its chain), as qemu opens it."""
    out = disk.with_name(disk.name + ".read")
    try:
        _qemu_img("convert", "-U", "-f", fmt, "-O", "raw", str(disk), str(out))
        return out.read_bytes()
    finally:
        out.unlink(missing_ok=True)
