"""What a server keeps of its image and of the caller's trust: ``trusted_image_certificates``
(2.63+) and the image properties shown in ``image.properties`` (2.98+), on create and rebuild,
their policy, and their rollback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from tests.live import Gate, LiveDaemon, start_live_daemon
from tests.test_auth_policy import _as, _start
from tests.test_rebuild_errors import _image

CERTS = ["0b5d2c72-12cc-4ba6-a8d6-3ff5b8a2e4a1", "674736e3-f25c-405c-8362-bbf991e0ce0a"]


def _mv(version: str) -> dict[str, str]:
    return {"OpenStack-API-Version": f"compute {version}"}


def _rebuild(live: LiveDaemon, server_id: str, version: str, **fields: Any) -> httpx.Response:
    body = {"rebuild": {"imageRef": live.image_ids[1], **fields}}
    return live.client.post(f"/v2.1/servers/{server_id}/action", json=body, headers=_mv(version))


def _done(live: LiveDaemon, server_id: str) -> dict[str, Any]:
    return live.poll(
        server_id,
        lambda s: s["status"] in ("ACTIVE", "ERROR") and s["OS-EXT-STS:task_state"] is None,
        "rebuild settled",
    )


def _certs(live: LiveDaemon, server_id: str) -> Any:
    return live.server(server_id, **_mv("2.63"))["trusted_image_certificates"]


class TestTrustedCertificates:
    def test_rebuild_sets_keeps_and_clears_them(self, daemon: LiveDaemon) -> None:
        """A list sets them (shown in the 202 and by GET), an omitted key keeps them, and null
        clears them, as Nova's rebuild does."""
        server_id = daemon.create_server()
        assert _certs(daemon, server_id) is None
        response = _rebuild(daemon, server_id, "2.63", trusted_image_certificates=CERTS)
        assert response.status_code == 202, response.text
        assert response.json()["server"]["trusted_image_certificates"] == CERTS
        _done(daemon, server_id)
        assert _certs(daemon, server_id) == CERTS
        assert _rebuild(daemon, server_id, "2.63").status_code == 202
        _done(daemon, server_id)
        assert _certs(daemon, server_id) == CERTS
        response = _rebuild(daemon, server_id, "2.63", trusted_image_certificates=None)
        assert response.status_code == 202, response.text
        _done(daemon, server_id)
        assert _certs(daemon, server_id) is None

    def test_create_stores_them_from_2_63_only(self, daemon: LiveDaemon) -> None:
        """A create at 2.63 keeps the certificates; at 2.62 the field is unknown (400)."""
        body = {
            "server": {
                "name": "vm",
                "imageRef": daemon.image_ids[0],
                "flavorRef": "1",
                "trusted_image_certificates": CERTS,
            }
        }
        old = daemon.client.post("/v2.1/servers", json=body, headers=_mv("2.62"))
        assert old.status_code == 400
        assert "trusted_image_certificates" in old.json()["badRequest"]["message"]
        created = daemon.client.post("/v2.1/servers", json=body, headers=_mv("2.63"))
        assert created.status_code == 202, created.text
        assert _certs(daemon, created.json()["server"]["id"]) == CERTS

    def test_a_failed_rebuild_keeps_the_old_ones(self, tmp_path: Path) -> None:
        """A rebuild that fails and rolls back leaves the certificates it was asked to set
        unset, like every other field the api stage changed."""
        gate = Gate("start_domain")
        gate.fail_with = RuntimeError("boom")
        live = start_live_daemon(tmp_path, observer=gate)
        try:
            server_id = live.create_server()
            response = _rebuild(live, server_id, "2.63", trusted_image_certificates=CERTS)
            assert response.status_code == 202, response.text
            server = live.poll(
                server_id,
                lambda s: (
                    s["OS-EXT-STS:task_state"] is None and s["image"]["id"] == live.image_ids[0]
                ),
                "rolled back",
                allow_error=True,
            )
            assert server["status"] == "ERROR"
            assert _certs(live, server_id) is None
        finally:
            live.stop()

    def test_their_policy_is_checked_only_when_they_are_sent(self, tmp_path: Path) -> None:
        """With rebuild:trusted_certs restricted to admins, a member's rebuild that sends the
        field is Nova's 403 and changes nothing; without the field it is accepted."""
        live = _start(
            tmp_path, policy='[rules]\n"os_compute_api:servers:rebuild:trusted_certs" = "admin"\n'
        )
        try:
            member = _as(live, "member-token", "2.63")
            created = member.post(
                "/v2.1/servers",
                json={"server": {"name": "vm", "imageRef": live.image_ids[0], "flavorRef": "1"}},
            )
            server_id = created.json()["server"]["id"]
            live.poll(server_id, lambda s: s["status"] == "ACTIVE", "ACTIVE")
            body = {"rebuild": {"imageRef": live.image_ids[1], "trusted_image_certificates": CERTS}}
            refused = member.post(f"/v2.1/servers/{server_id}/action", json=body)
            assert refused.status_code == 403
            assert refused.json() == {
                "forbidden": {
                    "code": 403,
                    "message": "Policy doesn't allow "
                    "os_compute_api:servers:rebuild:trusted_certs to be performed.",
                }
            }
            assert live.server(server_id)["image"]["id"] == live.image_ids[0]
            del body["rebuild"]["trusted_image_certificates"]
            assert member.post(f"/v2.1/servers/{server_id}/action", json=body).status_code == 202
        finally:
            live.stop()


class TestImageProperties:
    def test_shown_from_2_98_standard_names_only_and_replaced_by_a_rebuild(
        self, daemon: LiveDaemon
    ) -> None:
        """A server shows its image's standard properties (not custom ones) from 2.98, none
        below, and a rebuild replaces them with the new image's."""
        first = _image(daemon, hw_disk_bus="virtio", os_distro="debian", foo="bar")
        second = _image(daemon, name="second", hw_video_model="vga")
        body = {"server": {"name": "vm", "imageRef": first, "flavorRef": "1"}}
        server_id = daemon.client.post("/v2.1/servers", json=body).json()["server"]["id"]
        daemon.poll(server_id, lambda s: s["status"] == "ACTIVE", "ACTIVE")
        image = daemon.server(server_id, **_mv("2.98"))["image"]
        assert image["properties"] == {"hw_disk_bus": "virtio", "os_distro": "debian"}
        assert "properties" not in daemon.server(server_id, **_mv("2.97"))["image"]
        response = daemon.client.post(
            f"/v2.1/servers/{server_id}/action",
            json={"rebuild": {"imageRef": second}},
            headers=_mv("2.98"),
        )
        assert response.status_code == 202, response.text
        assert response.json()["server"]["image"]["properties"] == {"hw_video_model": "vga"}
        _done(daemon, server_id)
        image = daemon.server(server_id, **_mv("2.100"))["image"]
        assert (image["id"], image["properties"]) == (second, {"hw_video_model": "vga"})


class TestCreateHostname:
    def test_hostname_from_2_90_and_fqdn_from_2_94(self, daemon: LiveDaemon) -> None:
        """create takes ``hostname`` from 2.90 (a label; an FQDN is 400 before 2.94)."""

        def create(version: str, hostname: str) -> httpx.Response:
            body = {
                "server": {
                    "name": "vm",
                    "imageRef": daemon.image_ids[0],
                    "flavorRef": "1",
                    "hostname": hostname,
                }
            }
            return daemon.client.post("/v2.1/servers", json=body, headers=_mv(version))

        assert create("2.89", "web-1").status_code == 400
        assert create("2.90", "web-1.example.org").status_code == 400
        created = create("2.90", "web-1")
        assert created.status_code == 202, created.text
        server = daemon.server(created.json()["server"]["id"], **_mv("2.90"))
        assert server["OS-EXT-SRV-ATTR:hostname"] == "web-1"
        assert create("2.94", "web-1.example.org").status_code == 202
