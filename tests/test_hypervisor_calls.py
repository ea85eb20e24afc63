"""LibvirtHypervisor's one helper for blocking calls, on libvirt's real test driver: calls run
in the adapter's own threads, at most ``threads`` at once, libvirt's errors become
HypervisorError, and a cancelled caller does not go on before its call has ended (so an undo
never races the call of the step it undoes)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator

import pytest

from rebuildd.errors import HypervisorError
from rebuildd.hypervisor import LibvirtHypervisor

libvirt = pytest.importorskip("libvirt")


@pytest.fixture
async def hypervisor() -> AsyncIterator[LibvirtHypervisor]:
    hv = LibvirtHypervisor("test:///default", threads=2)
    await hv.open()
    try:
        yield hv
    finally:
        await hv.close()


class TestCall:
    async def test_a_cancelled_caller_waits_for_its_call_to_end(
        self, hypervisor: LibvirtHypervisor
    ) -> None:
        """Task.cancel() during a call: the CancelledError reaches the caller only once the
        call in its thread has finished."""
        ended: list[float] = []

        def slow() -> None:
            time.sleep(0.3)
            ended.append(time.monotonic())

        task = asyncio.create_task(hypervisor._call("slow", slow))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert ended, "the CancelledError came before the call ended"

    async def test_calls_run_off_the_loop_at_most_threads_at_once(
        self, hypervisor: LibvirtHypervisor
    ) -> None:
        """Blocking calls run in worker threads, never the loop's, two at a time here."""
        lock = threading.Lock()
        running, peak, names = 0, 0, set()

        def work() -> None:
            nonlocal running, peak
            with lock:
                running += 1
                peak = max(peak, running)
                names.add(threading.current_thread().name)
            time.sleep(0.05)
            with lock:
                running -= 1

        await asyncio.gather(*(hypervisor._call("work", work) for _ in range(6)))
        assert peak == 2
        assert threading.main_thread().name not in names

    async def test_a_libvirt_error_is_a_hypervisor_error_naming_the_call(
        self, hypervisor: LibvirtHypervisor
    ) -> None:
        """libvirt's own error becomes HypervisorError with the call's name and message."""
        with pytest.raises(HypervisorError, match="libvirt XMLDesc failed: Domain not found"):
            await hypervisor.domain_xml("no-such-domain")
