"""DiskManager on real qemu-img: overlays made from per-(base, size) templates."""

from __future__ import annotations

import asyncio
import stat
import subprocess
from pathlib import Path

import pytest

from rebuildd.disks import DiskManager
from rebuildd.errors import DiskError


def _counting_qemu_img(tmp_path: Path) -> tuple[Path, Path]:
    """A qemu-img wrapper that logs each ``create`` and fails while ``fail`` exists."""
    calls = tmp_path / "creates.log"
    fail = tmp_path / "fail"
    wrapper = tmp_path / "qemu-img"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = create ]; then echo create >> "{calls}"; '
        f'[ -e "{fail}" ] && {{ echo "injected failure" >&2; exit 1; }}; fi\n'
        'exec qemu-img "$@"\n'
    )
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    return wrapper, calls


@pytest.fixture
def base(tmp_path: Path) -> Path:
    path = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "64M"], check=True)
    return path


def _info(path: Path) -> str:
    return subprocess.run(
        ["qemu-img", "info", "--output=json", str(path)], check=True, capture_output=True, text=True
    ).stdout


class TestOverlayTemplates:
    def test_overlays_of_one_base_and_size_share_one_qemu_img_create(
        self, tmp_path: Path, base: Path
    ) -> None:
        """Two root disks of one image and size cost one qemu-img create, and each is a
        separate qcow2 file backed by the base with the requested virtual size."""
        wrapper, calls = _counting_qemu_img(tmp_path)
        disks = DiskManager(tmp_path / "instances", qemu_img=str(wrapper))
        first, second = tmp_path / "a" / "root.qcow2", tmp_path / "b" / "root.qcow2"
        for path in (first, second):
            asyncio.run(
                disks.create_overlay(base=base, base_format="qcow2", path=path, size_bytes=1 << 30)
            )
        assert calls.read_text().splitlines() == ["create"]
        assert first.stat().st_ino != second.stat().st_ino
        for path in (first, second):
            info = asyncio.run(disks.info(path, fmt="qcow2"))
            assert (info.format, info.virtual_size) == ("qcow2", 1 << 30)
            assert info.backing_file == str(base)

    def test_another_size_gets_its_own_template(self, tmp_path: Path, base: Path) -> None:
        """A different flavor root size is a different template, with its own virtual size."""
        wrapper, calls = _counting_qemu_img(tmp_path)
        disks = DiskManager(tmp_path / "instances", qemu_img=str(wrapper))
        for name, size in (("a", 1 << 30), ("b", 2 << 30)):
            path = tmp_path / name / "root.qcow2"
            asyncio.run(
                disks.create_overlay(base=base, base_format="qcow2", path=path, size_bytes=size)
            )
            assert asyncio.run(disks.info(path, fmt="qcow2")).virtual_size == size
        assert len(calls.read_text().splitlines()) == 2

    def test_a_failed_create_leaves_no_template_and_no_disk(
        self, tmp_path: Path, base: Path
    ) -> None:
        """qemu-img failing is a DiskError with its message; nothing half-made stays behind,
        and the next attempt makes the template."""
        wrapper, _calls = _counting_qemu_img(tmp_path)
        (tmp_path / "fail").touch()
        disks = DiskManager(tmp_path / "instances", qemu_img=str(wrapper))
        path = tmp_path / "a" / "root.qcow2"
        with pytest.raises(DiskError, match="injected failure"):
            asyncio.run(
                disks.create_overlay(base=base, base_format="qcow2", path=path, size_bytes=None)
            )
        assert not path.exists()
        assert list((tmp_path / "instances" / "_templates").iterdir()) == []
        (tmp_path / "fail").unlink()
        asyncio.run(
            disks.create_overlay(base=base, base_format="qcow2", path=path, size_bytes=None)
        )
        assert '"backing-filename"' in _info(path)

    def test_an_existing_disk_is_never_overwritten(self, tmp_path: Path, base: Path) -> None:
        """Creating a root disk over an existing file fails instead of replacing its bytes."""
        disks = DiskManager(tmp_path / "instances")
        path = tmp_path / "a" / "root.qcow2"
        path.parent.mkdir()
        path.write_bytes(b"guest data")
        with pytest.raises(DiskError, match="File exists"):
            asyncio.run(
                disks.create_overlay(base=base, base_format="qcow2", path=path, size_bytes=None)
            )
        assert path.read_bytes() == b"guest data"
