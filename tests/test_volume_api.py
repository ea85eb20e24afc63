"""The Cinder-compatible volume API and Nova's os-volume_attachments against a live daemon on
the embedded default (test:///default): status codes, bodies per microversion, refusals, and
volumes_attached in the server views."""

from __future__ import annotations

import time
from typing import Any

from tests.live import POLL_INTERVAL, LiveDaemon

V = "/volume/v3/demo/volumes"


def _create_volume(live: LiveDaemon, name: str = "v1", size: int = 1) -> dict[str, Any]:
    response = live.client.post(V, json={"volume": {"size": size, "name": name}})
    assert response.status_code == 202, response.text
    volume: dict[str, Any] = response.json()["volume"]
    return volume


def _volume(live: LiveDaemon, volume_id: str) -> dict[str, Any]:
    response = live.client.get(f"{V}/{volume_id}")
    assert response.status_code == 200, response.text
    volume: dict[str, Any] = response.json()["volume"]
    return volume


def _wait_volume(live: LiveDaemon, volume_id: str, status: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        volume = _volume(live, volume_id)
        if volume["status"] == status:
            return volume
        time.sleep(POLL_INTERVAL)
    raise AssertionError(f"volume never reached {status}: {volume['status']}")


def _attach(live: LiveDaemon, server_id: str, volume_id: str, **extra: Any) -> Any:
    headers = extra.pop("headers", {})
    return live.client.post(
        f"/v2.1/servers/{server_id}/os-volume_attachments",
        json={"volumeAttachment": {"volumeId": volume_id, **extra}},
        headers=headers,
    )


class TestCinderApi:
    def test_version_documents_are_open_and_name_v3(self, daemon: LiveDaemon) -> None:
        """/volume answers 300 with v3.0 CURRENT and a self link; /volume/v3/ 200."""
        root = daemon.client.get("/volume/")
        assert root.status_code == 300
        (version,) = root.json()["versions"]
        assert (version["id"], version["status"], version["min_version"]) == (
            "v3.0",
            "CURRENT",
            "3.0",
        )
        assert {"rel": "self", "href": f"{daemon.url}/volume/v3/"} in version["links"]
        assert daemon.client.get("/volume/v3/").status_code == 200

    def test_create_list_show_delete(self, daemon: LiveDaemon) -> None:
        """202 available with Cinder's fields; listed (summary and detail); 202 delete; 404."""
        volume = _create_volume(daemon)
        assert volume["status"] == "available"
        assert volume["size"] == 1 and volume["bootable"] == "false"
        assert volume["attachments"] == []
        summary = daemon.client.get(V).json()["volumes"]
        assert [(v["id"], v["name"]) for v in summary] == [(volume["id"], "v1")]
        assert set(summary[0]) == {"id", "name", "links"}
        detail = daemon.client.get(f"{V}/detail", params={"name": "v1"}).json()["volumes"]
        assert [v["id"] for v in detail] == [volume["id"]]
        assert daemon.client.delete(f"{V}/{volume['id']}").status_code == 202
        gone = daemon.client.get(f"{V}/{volume['id']}")
        assert gone.status_code == 404
        assert gone.json() == {
            "itemNotFound": {
                "code": 404,
                "message": f"Volume {volume['id']} could not be found.",
            }
        }

    def test_create_from_an_image_takes_its_size_and_is_bootable(self, daemon: LiveDaemon) -> None:
        """imageRef without size: the image's size rounded up to GiB; bootable with metadata."""
        response = daemon.client.post(V, json={"volume": {"imageRef": daemon.image_ids[0]}})
        assert response.status_code == 202, response.text
        volume = response.json()["volume"]
        assert (volume["status"], volume["bootable"], volume["size"]) == ("available", "true", 1)
        assert volume["volume_image_metadata"]["image_id"] == daemon.image_ids[0]

    def test_bad_bodies_are_400_bad_request(self, daemon: LiveDaemon) -> None:
        """No size, size 0 and unknown fields: Cinder's badRequest body."""
        bodies: list[dict[str, Any]] = [
            {"volume": {}},
            {"volume": {"size": 0}},
            {"volume": {"size": 1, "x": 1}},
        ]
        for body in bodies:
            response = daemon.client.post(V, json=body)
            assert response.status_code == 400, body
            assert set(response.json()) == {"badRequest"}


class TestNovaAttachments:
    def test_attach_lists_shows_and_detaches_per_microversion(self, daemon: LiveDaemon) -> None:
        """200 with /dev/vdb; in-use with one attachment; 2.89 list has attachment_id and
        bdm_uuid but no id; volumes_attached shows it; 202 detach -> available."""
        server_id = daemon.create_server()
        volume = _create_volume(daemon)
        response = _attach(
            daemon, server_id, volume["id"], headers={"X-OpenStack-Nova-API-Version": "2.79"}
        )
        assert response.status_code == 200, response.text
        assert response.json() == {
            "volumeAttachment": {
                "id": volume["id"],
                "serverId": server_id,
                "volumeId": volume["id"],
                "device": "/dev/vdb",
                "tag": None,
                "delete_on_termination": False,
            }
        }
        shown = _wait_volume(daemon, volume["id"], "in-use")
        assert [(a["server_id"], a["device"]) for a in shown["attachments"]] == [
            (server_id, "/dev/vdb")
        ]
        daemon.wait_for(server_id, "ACTIVE")
        listed = daemon.client.get(
            f"/v2.1/servers/{server_id}/os-volume_attachments",
            headers={"X-OpenStack-Nova-API-Version": "2.89"},
        ).json()["volumeAttachments"]
        assert len(listed) == 1 and "id" not in listed[0]
        assert listed[0]["attachment_id"] == shown["attachments"][0]["attachment_id"]
        plain = daemon.client.get(
            f"/v2.1/servers/{server_id}/os-volume_attachments/{volume['id']}"
        ).json()["volumeAttachment"]
        assert set(plain) == {"id", "serverId", "volumeId", "device"}
        server = daemon.server(server_id, **{"X-OpenStack-Nova-API-Version": "2.3"})
        assert server["os-extended-volumes:volumes_attached"] == [
            {"id": volume["id"], "delete_on_termination": False}
        ]
        detail = daemon.client.get("/v2.1/servers/detail").json()["servers"]
        assert detail[0]["os-extended-volumes:volumes_attached"] == [{"id": volume["id"]}]
        response = daemon.client.delete(
            f"/v2.1/servers/{server_id}/os-volume_attachments/{volume['id']}"
        )
        assert response.status_code == 202, response.text
        assert _wait_volume(daemon, volume["id"], "available")["attachments"] == []
        daemon.wait_for(server_id, "ACTIVE")
        assert daemon.server(server_id)["os-extended-volumes:volumes_attached"] == []

    def test_an_in_use_volume_is_400_for_another_server(self, daemon: LiveDaemon) -> None:
        """A second server gets Cinder's refusal as a 400; the volume stays with the first."""
        first, second = daemon.create_server("a"), daemon.create_server("b")
        volume = _create_volume(daemon)
        assert _attach(daemon, first, volume["id"]).status_code == 200
        _wait_volume(daemon, volume["id"], "in-use")
        response = _attach(daemon, second, volume["id"])
        assert response.status_code == 400
        assert "current status is in-use" in response.json()["badRequest"]["message"]

    def test_refusals(self, daemon: LiveDaemon) -> None:
        """Unknown volume 404; a device in use 400 (nothing reserved); detach of a volume the
        server does not have 404, with Nova's messages."""
        server_id = daemon.create_server()
        missing = _attach(daemon, server_id, "44444444-4444-4444-8444-444444444444")
        assert missing.status_code == 404
        volume = _create_volume(daemon)
        taken = _attach(daemon, server_id, volume["id"], device="/dev/vda")
        assert taken.status_code == 400
        assert taken.json()["badRequest"]["message"] == (
            "The supplied device path (/dev/vda) is in use."
        )
        assert _volume(daemon, volume["id"])["status"] == "available"
        response = daemon.client.delete(
            f"/v2.1/servers/{server_id}/os-volume_attachments/{volume['id']}"
        )
        assert response.status_code == 404
        assert response.json()["itemNotFound"]["message"] == (
            f"No volume Block Device Mapping with id {volume['id']}."
        )

    def test_an_attach_during_a_rebuild_is_409_and_reserves_nothing(
        self, daemon: LiveDaemon
    ) -> None:
        """A server whose task_state is taken by a rebuild refuses an attach with 409."""
        server_id = daemon.create_server()
        volume = _create_volume(daemon)
        rebuild = {"rebuild": {"imageRef": daemon.image_ids[1]}}
        assert (
            daemon.client.post(f"/v2.1/servers/{server_id}/action", json=rebuild).status_code == 202
        )
        response = _attach(daemon, server_id, volume["id"])
        assert response.status_code == 409, response.text
        assert _volume(daemon, volume["id"])["status"] == "available"
        daemon.wait_for(server_id, "ACTIVE")
