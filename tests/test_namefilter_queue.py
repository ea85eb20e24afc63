"""The name filter's worker takes a bounded number of listings: one more is refused at once
with a 503 and Retry-After instead of waiting behind a flood of costly patterns."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from rebuildd import errors
from rebuildd.namefilter import MAX_PENDING, NameFilter
from tests.process import DaemonProcess

WAIT_LIMIT = 60.0  # an upper bound for a thread to reach the worker, not a speed


async def test_one_listing_beyond_the_bound_is_refused_at_once() -> None:
    """With ``MAX_PENDING`` listings queued or running on the worker, one more is
    NameFilterBusy (503, Retry-After) without waiting; once they end, listings run again."""
    entered, release = threading.Event(), threading.Event()

    def blocking_name(item: str) -> str:
        entered.set()
        release.wait(WAIT_LIMIT)
        return item

    held = [
        asyncio.create_task(NameFilter("a.c").select(["abc"], blocking_name, None))
        for _ in range(MAX_PENDING)
    ]
    try:
        assert await asyncio.to_thread(entered.wait, WAIT_LIMIT)
        with pytest.raises(errors.NameFilterBusy) as refused:
            await NameFilter("x.z").select(["xyz"], str, None)
        assert errors.http_fault(refused.value) == (503, "serviceUnavailable")
        assert refused.value.retry_after is not None
    finally:
        release.set()
    assert await asyncio.gather(*held) == [["abc"]] * MAX_PENDING
    assert await NameFilter("x.z").select(["xyz"], str, None) == ["xyz"]


async def test_a_cancelled_listing_gives_its_place_back() -> None:
    """A listing whose caller went away before the worker reached it frees its place."""
    entered, release = threading.Event(), threading.Event()

    def blocking_name(item: str) -> str:
        entered.set()
        release.wait(WAIT_LIMIT)
        return item

    running = asyncio.create_task(NameFilter("a.c").select(["abc"], blocking_name, None))
    try:
        assert await asyncio.to_thread(entered.wait, WAIT_LIMIT)
        for _ in range(3):  # each queued behind the running one, then abandoned
            queued = [
                asyncio.create_task(NameFilter("a.c").select(["abc"], str, None))
                for _ in range(MAX_PENDING - 1)
            ]
            await asyncio.sleep(0)
            for task in queued:
                task.cancel()
            await asyncio.gather(*queued, return_exceptions=True)
        last = asyncio.create_task(NameFilter("a.c").select(["abc"], str, None))
        await asyncio.sleep(0)
    finally:
        release.set()
    assert await running == ["abc"]
    assert await last == ["abc"]


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    process = DaemonProcess(tmp_path)
    process.prepare()
    process.start()
    yield process
    process.stop()


def test_a_flood_of_catastrophic_patterns_is_refused_with_503(daemon: DaemonProcess) -> None:
    """Sixteen catastrophic name patterns at once: each is the budget's 400 or a 503 with
    Retry-After, never a 500, and some are refused with the 503 rather than queued."""
    with daemon.client() as client:
        image = client.get("/image/v2/images").json()["images"][0]["id"]
        body = {"server": {"name": "a" * 40 + "!", "imageRef": image, "flavorRef": "1"}}
        assert client.post("/v2.1/servers", json=body).status_code == 202
    start = threading.Barrier(16)
    answers: list[httpx.Response] = []

    def attack() -> None:
        with daemon.client() as client:
            start.wait(WAIT_LIMIT)
            answers.append(client.get("/v2.1/servers", params={"name": "(a|aa)+$"}))

    threads = [threading.Thread(target=attack) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT_LIMIT)
    codes = sorted(a.status_code for a in answers)
    assert len(codes) == 16 and set(codes) <= {400, 503}, codes
    assert codes.count(503) >= 1, codes
    for answer in answers:
        if answer.status_code == 503:
            assert answer.headers["retry-after"].isdigit()
            assert "serviceUnavailable" in answer.json()
