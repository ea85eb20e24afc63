"""The image cache on the embedded default (test driver, local images): an image is fetched
once however many servers are rebuilt from it, and the cleanup removes only bases no server
uses, with their overlay templates."""

from __future__ import annotations

import os
import time
from pathlib import Path

from rebuildd.daemon import clean_image_cache_once
from tests.live import LiveDaemon, start_live_daemon


def _downloads(live: LiveDaemon) -> float:
    value = live.daemon.cache.metrics.registry.get_sample_value("rebuildd_image_downloads_total")
    return value or 0.0


def _age(path: Path, seconds: float) -> None:
    old = time.time() - seconds
    os.utime(path, (old, old))


def test_a_hundred_rebuilds_from_one_image_fetch_it_once(tmp_path: Path) -> None:
    """100 servers of image A, all rebuilt at once onto image B: B is downloaded once."""
    live = start_live_daemon(tmp_path, max_concurrent_operations=16)
    try:
        servers = []
        for n in range(100):
            body = {"server": {"name": f"s{n}", "imageRef": live.image_ids[0], "flavorRef": "1"}}
            response = live.client.post("/v2.1/servers", json=body)
            assert response.status_code == 202, response.text
            servers.append(response.json()["server"]["id"])
        for server_id in servers:
            live.wait_for(server_id, "ACTIVE")
        assert _downloads(live) == 1  # image A, for the hundred creates
        for server_id in servers:
            response = live.client.post(
                f"/v2.1/servers/{server_id}/action",
                json={"rebuild": {"imageRef": live.image_ids[1]}},
            )
            assert response.status_code == 202, response.text
        for server_id in servers:
            assert live.wait_for(server_id, "ACTIVE")["image"]["id"] == live.image_ids[1]
        assert _downloads(live) == 2  # and image B once, for the hundred rebuilds
    finally:
        live.stop()


def test_cleanup_removes_unused_bases_and_their_templates_only(tmp_path: Path) -> None:
    """After every server moved to image B, A's base (old enough) and its templates go; B's
    base, in use, stays; a base used more recently than the minimum age stays too."""
    live = start_live_daemon(tmp_path, image_cache_min_age=3600)
    try:
        base_dir = live.settings.state_dir / "_base"
        templates = live.settings.state_dir / "instances" / "_templates"
        image_a, image_b = live.image_ids
        server_id = live.create_server()
        response = live.client.post(
            f"/v2.1/servers/{server_id}/action", json={"rebuild": {"imageRef": image_b}}
        )
        assert response.status_code == 202
        live.wait_for(server_id, "ACTIVE")
        assert (base_dir / image_a).exists() and (base_dir / image_b).exists()
        assert any(t.name.startswith(image_a) for t in templates.iterdir())

        # A was used just now: younger than the minimum age, it is kept.
        assert live.run(clean_image_cache_once(live.daemon)) == []
        assert (base_dir / image_a).exists()

        for base in base_dir.iterdir():
            _age(base, 7200)
        assert live.run(clean_image_cache_once(live.daemon)) == [image_a]
        assert not (base_dir / image_a).exists() and (base_dir / image_b).exists()
        assert not any(t.name.startswith(image_a) for t in templates.iterdir())
        assert any(t.name.startswith(image_b) for t in templates.iterdir())

        # A rebuild back onto A fetches it again, and the server is fine.
        response = live.client.post(
            f"/v2.1/servers/{server_id}/action", json={"rebuild": {"imageRef": image_a}}
        )
        assert response.status_code == 202
        assert live.wait_for(server_id, "ACTIVE")["image"]["id"] == image_a

        # Once the server is deleted, nothing uses either base.
        live.client.delete(f"/v2.1/servers/{server_id}")
        deadline = time.monotonic() + 30
        while live.client.get(f"/v2.1/servers/{server_id}").status_code != 404:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        for base in base_dir.iterdir():
            _age(base, 7200)
        assert sorted(live.run(clean_image_cache_once(live.daemon))) == sorted(live.image_ids)
        assert list(base_dir.iterdir()) == []
    finally:
        live.stop()


def test_cleanup_keeps_the_blank_bases_of_live_servers(tmp_path: Path) -> None:
    """The ephemeral and swap bases of a live server's flavor are in use; once the server is
    gone they are removed like an image's base."""
    live = start_live_daemon(tmp_path, image_cache_min_age=0)
    try:
        flavor = {"flavor": {"name": "eph", "id": "eph", "ram": 64, "vcpus": 1, "disk": 1,
                             "OS-FLV-EXT-DATA:ephemeral": 1, "swap": 32}}  # fmt: skip
        assert live.client.post("/v2.1/flavors", json=flavor).status_code == 200
        server_id = live.create_server(flavor="eph")
        base_dir = live.settings.state_dir / "_base"
        blanks = {"ephemeral_1024_ext4", "swap_32"}
        assert blanks <= {p.name for p in base_dir.iterdir()}
        for base in base_dir.iterdir():
            _age(base, 10)
        assert live.run(clean_image_cache_once(live.daemon)) == []
        assert blanks | {live.image_ids[0]} <= {p.name for p in base_dir.iterdir()}
        live.client.delete(f"/v2.1/servers/{server_id}")
        deadline = time.monotonic() + 30
        while live.client.get(f"/v2.1/servers/{server_id}").status_code != 404:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        for base in base_dir.iterdir():
            _age(base, 10)
        removed = set(live.run(clean_image_cache_once(live.daemon)))
        assert blanks | {live.image_ids[0]} <= removed
    finally:
        live.stop()
