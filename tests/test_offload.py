"""The disk manager's file calls (rebuildd.offload, the helper libvirt's calls use too): they run
in its own threads, a cancelled caller goes on only once its call has ended (an undo that
removes a new disk never races the copy still writing it), and close lets the threads go."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

from rebuildd.disks import DiskManager


async def test_a_file_call_runs_in_the_disk_managers_threads(tmp_path: Path) -> None:
    disks = DiskManager(tmp_path / "instances")
    try:
        name = await disks.files.run(lambda: threading.current_thread().name)
    finally:
        disks.close()
    assert name.startswith("files")


async def test_a_cancelled_caller_waits_for_its_file_call(tmp_path: Path) -> None:
    disks = DiskManager(tmp_path / "instances")
    target = tmp_path / "late"
    started = threading.Event()

    def slow_write() -> None:
        started.set()
        time.sleep(0.3)
        target.write_bytes(b"written after the cancel")

    caller = asyncio.create_task(disks.files.run(slow_write))
    try:
        await asyncio.to_thread(started.wait, 5)
        caller.cancel()
        cancelled = False
        try:
            await caller
        except asyncio.CancelledError:
            cancelled = True
        assert cancelled
        # The file exists when the cancellation arrives: an undo removing it now removes it
        # for good.
        assert target.exists()
    finally:
        disks.close()


async def test_close_lets_the_threads_go_and_a_later_call_still_runs(tmp_path: Path) -> None:
    disks = DiskManager(tmp_path / "instances")
    # The threads themselves, not their names: another test's pool may hold a "files_0".
    before = await disks.files.run(threading.current_thread)
    assert before.name.startswith("files")
    disks.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and before.is_alive():
        await asyncio.sleep(0.01)
    assert not before.is_alive()
    assert await disks.files.run(lambda: 42) == 42
    disks.close()
