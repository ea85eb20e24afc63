"""A rebuild POST repeated with the same idempotency key gets the first answer, not a 409 or
a second rebuild (as EC2's ClientToken does)."""

from __future__ import annotations

import asyncio
import uuid

import httpx

from tests.live import LiveDaemon


def _post(live: LiveDaemon, server_id: str, image: int, **headers: str) -> httpx.Response:
    return live.client.post(
        f"/v2.1/servers/{server_id}/action",
        json={"rebuild": {"imageRef": live.image_ids[image]}},
        headers=headers,
    )


def _rebuilds(live: LiveDaemon, server_id: str) -> int:
    actions = live.client.get(f"/v2.1/servers/{server_id}/os-instance-actions").json()
    return sum(a["action"] == "rebuild" for a in actions["instanceActions"])


def test_repeat_with_the_same_key_replays_the_first_answer(daemon: LiveDaemon) -> None:
    """The repeat is a 202 with the identical body (same adminPass); one rebuild happened."""
    server_id = daemon.create_server()
    first = _post(daemon, server_id, 1, **{"X-Idempotency-Key": "retry-1"})
    second = _post(daemon, server_id, 1, **{"X-Idempotency-Key": "retry-1"})
    assert (first.status_code, second.status_code) == (202, 202)
    assert second.json() == first.json()
    assert second.headers["location"] == first.headers["location"]
    daemon.wait_for(server_id, "ACTIVE")
    third = _post(daemon, server_id, 1, **{"X-Idempotency-Key": "retry-1"})
    assert third.json() == first.json()
    assert _rebuilds(daemon, server_id) == 1


def test_a_different_key_while_running_is_still_409(daemon: LiveDaemon) -> None:
    """Keys only deduplicate repeats; another rebuild in flight is a conflict."""
    server_id = daemon.create_server()
    codes = []
    for key in ("a", "b"):
        codes.append(_post(daemon, server_id, 1, **{"X-Idempotency-Key": key}).status_code)
    assert codes[0] == 202
    assert codes[1] in {202, 409}  # 202 only if the first had already finished
    daemon.wait_for(server_id, "ACTIVE")


def test_concurrent_repeats_all_get_the_one_answer(daemon: LiveDaemon) -> None:
    """Twenty simultaneous POSTs with one key: twenty identical 202s, one rebuild."""
    server_id = daemon.create_server()

    async def storm() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=daemon.url, timeout=60) as client:
            return await asyncio.gather(
                *(
                    client.post(
                        f"/v2.1/servers/{server_id}/action",
                        json={"rebuild": {"imageRef": daemon.image_ids[1]}},
                        headers={"X-Idempotency-Key": "storm"},
                    )
                    for _ in range(20)
                )
            )

    responses = asyncio.run(storm())
    assert {r.status_code for r in responses} == {202}
    assert len({r.content for r in responses}) == 1
    daemon.wait_for(server_id, "ACTIVE")
    assert _rebuilds(daemon, server_id) == 1


def test_a_client_chosen_request_id_works_as_the_key(daemon: LiveDaemon) -> None:
    """Reusing X-OpenStack-Request-ID (req-<uuid>) deduplicates the same way."""
    server_id = daemon.create_server()
    request_id = f"req-{uuid.uuid4()}"
    first = _post(daemon, server_id, 1, **{"X-OpenStack-Request-ID": request_id})
    second = _post(daemon, server_id, 1, **{"X-OpenStack-Request-ID": request_id})
    assert second.status_code == 202 and second.json() == first.json()
    daemon.wait_for(server_id, "ACTIVE")
    assert _rebuilds(daemon, server_id) == 1


def test_keys_are_per_server(daemon: LiveDaemon) -> None:
    """The same key on another server is another rebuild."""
    one, two = daemon.create_server("one"), daemon.create_server("two")
    a = _post(daemon, one, 1, **{"X-Idempotency-Key": "k"})
    b = _post(daemon, two, 1, **{"X-Idempotency-Key": "k"})
    assert a.json()["server"]["id"] == one and b.json()["server"]["id"] == two


def test_an_overlong_key_is_400(daemon: LiveDaemon) -> None:
    """Keys longer than 255 characters are refused."""
    server_id = daemon.create_server()
    response = _post(daemon, server_id, 1, **{"X-Idempotency-Key": "k" * 256})
    assert response.status_code == 400
