"""The walking skeleton over HTTP: create, rebuild, stop/start, errors, on the embedded default."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from pathlib import Path

import httpx
import pytest

from tests.live import Gate, LiveDaemon, start_live_daemon
from tests.xmlutil import disk_source, parse


def _rebuild(
    live: LiveDaemon, server_id: str, body: Mapping[str, object], **headers: str
) -> httpx.Response:
    return live.client.post(
        f"/v2.1/servers/{server_id}/action", json={"rebuild": body}, headers=headers
    )


class TestCreate:
    def test_create_goes_build_then_active(self, daemon: LiveDaemon) -> None:
        """POST /servers answers 202 with an admin password; the server goes BUILD -> ACTIVE."""
        body = {"server": {"name": "web", "imageRef": daemon.image_ids[0], "flavorRef": "1"}}
        response = daemon.client.post("/v2.1/servers", json=body)
        assert response.status_code == 202
        created = response.json()["server"]
        assert response.headers["location"].endswith(f"/v2.1/servers/{created['id']}")
        assert created["adminPass"]
        server = daemon.wait_for(created["id"], "ACTIVE")
        assert server["image"]["id"] == daemon.image_ids[0]
        assert server["OS-EXT-STS:power_state"] == 1
        assert server["OS-SRV-USG:launched_at"] is not None

    def test_create_with_unknown_flavor_is_400(self, daemon: LiveDaemon) -> None:
        """An unknown flavorRef is Nova's 400 'Invalid flavorRef provided.'."""
        body = {"server": {"name": "web", "imageRef": daemon.image_ids[0], "flavorRef": "nope"}}
        response = daemon.client.post("/v2.1/servers", json=body)
        assert response.status_code == 400
        assert response.json() == {
            "badRequest": {"code": 400, "message": "Invalid flavorRef provided."}
        }


class TestRebuild:
    def test_rebuild_shows_rebuild_then_active_with_new_image_and_name(
        self, daemon: LiveDaemon
    ) -> None:
        """The 202 says REBUILD with the new image; polling ends ACTIVE with new image and name."""
        server_id = daemon.create_server("before")
        response = _rebuild(daemon, server_id, {"imageRef": daemon.image_ids[1], "name": "x"})
        assert response.status_code == 202, response.text
        body = response.json()["server"]
        assert body["status"] == "REBUILD"
        assert body["image"]["id"] == daemon.image_ids[1]
        assert body["name"] == "x"
        assert body["adminPass"]
        assert response.headers["location"].endswith(f"/v2.1/servers/{server_id}")
        server = daemon.wait_for(server_id, "ACTIVE")
        assert server["name"] == "x"
        assert server["image"]["id"] == daemon.image_ids[1]

    def test_instance_action_records_both_events(self, daemon: LiveDaemon) -> None:
        """os-instance-actions shows the rebuild, keyed by the POST's request id, with both events."""
        server_id = daemon.create_server()
        response = _rebuild(daemon, server_id, {"imageRef": daemon.image_ids[1]})
        request_id = response.headers["x-compute-request-id"]
        daemon.wait_for(server_id, "ACTIVE")
        actions = daemon.client.get(f"/v2.1/servers/{server_id}/os-instance-actions").json()
        assert [a["action"] for a in actions["instanceActions"]] == ["rebuild", "create"]
        assert actions["instanceActions"][0]["request_id"] == request_id
        detail = daemon.client.get(
            f"/v2.1/servers/{server_id}/os-instance-actions/{request_id}"
        ).json()
        events = {e["event"]: e for e in detail["instanceAction"]["events"]}
        assert set(events) == {"rebuild_server", "compute_rebuild_instance"}
        assert all(e["result"] == "Success" and e["finish_time"] for e in events.values())

    def test_rebuild_of_stopped_server_ends_shutoff(self, daemon: LiveDaemon) -> None:
        """A SHUTOFF server is rebuilt and ends SHUTOFF again, on the new image."""
        server_id = daemon.create_server()
        stop = daemon.client.post(f"/v2.1/servers/{server_id}/action", json={"os-stop": None})
        assert stop.status_code == 202
        daemon.wait_for(server_id, "SHUTOFF")
        response = _rebuild(daemon, server_id, {"imageRef": daemon.image_ids[1]})
        assert response.json()["server"]["status"] == "REBUILD"
        server = daemon.wait_for(server_id, "SHUTOFF")
        assert server["image"]["id"] == daemon.image_ids[1]
        assert server["OS-EXT-STS:power_state"] == 4

    def test_rebuild_replaces_metadata_and_sets_description(self, daemon: LiveDaemon) -> None:
        """metadata is replaced as a whole; description (2.19) is set."""
        server_id = daemon.create_server()
        body = {"imageRef": daemon.image_ids[1], "metadata": {"a": "1"}, "description": "d"}
        response = _rebuild(daemon, server_id, body, **{"OpenStack-API-Version": "compute 2.19"})
        assert response.status_code == 202, response.text
        server = daemon.wait_for(server_id, "ACTIVE")
        assert server["metadata"] == {"a": "1"}
        assert (
            daemon.server(server_id, **{"OpenStack-API-Version": "compute 2.19"})["description"]
            == "d"
        )

    def test_rebuild_with_key_name_at_2_54(self, daemon: LiveDaemon) -> None:
        """key_name (2.54) sets the key; an unknown key is 400 'Invalid key_name provided.'."""
        key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHV0TEl0dGxlS2V5Rm9yVGVzdGluZ1JlYnVpbGRkMTI= t"
        created = daemon.client.post(
            "/v2.1/os-keypairs", json={"keypair": {"name": "k1", "public_key": key}}
        )
        assert created.status_code == 200, created.text
        server_id = daemon.create_server()
        headers = {"OpenStack-API-Version": "compute 2.54"}
        bad = _rebuild(
            daemon, server_id, {"imageRef": daemon.image_ids[1], "key_name": "nope"}, **headers
        )
        assert bad.status_code == 400
        assert bad.json()["badRequest"]["message"] == "Invalid key_name provided."
        ok = _rebuild(
            daemon, server_id, {"imageRef": daemon.image_ids[1], "key_name": "k1"}, **headers
        )
        assert ok.status_code == 202
        assert ok.json()["server"]["key_name"] == "k1"
        daemon.wait_for(server_id, "ACTIVE")


class TestRebuildConflicts:
    def test_second_rebuild_while_one_runs_is_409(self, tmp_path: Path) -> None:
        """While a rebuild is in flight, another rebuild of the server is 409 conflictingRequest."""
        gate = Gate("power_off")
        live = start_live_daemon(tmp_path, observer=gate)
        try:
            server_id = live.create_server()
            first = _rebuild(live, server_id, {"imageRef": live.image_ids[1]})
            assert first.status_code == 202
            assert gate.reached.wait(30)
            second = _rebuild(live, server_id, {"imageRef": live.image_ids[0]})
            assert second.status_code == 409
            message = second.json()["conflictingRequest"]["message"]
            assert (
                message
                == f"Cannot 'rebuild' instance {server_id} while it is in task_state rebuilding"
            )
            gate.release.set()
            server = live.wait_for(server_id, "ACTIVE")
            assert server["image"]["id"] == live.image_ids[1]
        finally:
            gate.release.set()
            live.stop()

    def test_failed_rebuild_puts_old_disk_back_with_a_fault(self, tmp_path: Path) -> None:
        """A step failing after the detach leaves the server on its old image and disk, in
        ERROR with a fault, an Error event and an instance.rebuild.error notification."""
        gate = Gate("start_domain")
        gate.fail_with = RuntimeError("injected failure at start_domain")
        live = start_live_daemon(tmp_path, observer=gate)
        try:
            server_id = live.create_server()
            before = live.run(live.daemon.hypervisor.domain_xml(f"rebuildd-{server_id}"))
            response = _rebuild(live, server_id, {"imageRef": live.image_ids[1], "name": "new"})
            request_id = response.headers["x-compute-request-id"]
            server = live.wait_for(server_id, "ERROR")
            assert server["image"]["id"] == live.image_ids[0]
            assert server["name"] == "vm"
            after = live.run(live.daemon.hypervisor.domain_xml(f"rebuildd-{server_id}"))
            assert disk_source(parse(after)) == disk_source(parse(before))
            assert Path(disk_source(parse(after))).exists()
            assert (
                len(list(Path(disk_source(parse(after))).parent.iterdir())) == 1
            )  # new disk removed
            detail = live.client.get(
                f"/v2.1/servers/{server_id}/os-instance-actions/{request_id}"
            ).json()
            events = {e["event"]: e for e in detail["instanceAction"]["events"]}
            assert events["compute_rebuild_instance"]["result"] == "Error"
            assert "injected failure" in events["compute_rebuild_instance"]["traceback"]
            kinds = [n[0] for n in live.run(live.daemon.store.list_notifications(server_id))]
            assert kinds[-2:] == ["instance.rebuild.start", "instance.rebuild.error"]
            faults = live.run(live.daemon.store.latest_faults([server_id]))
            # Not ours: its class only, as Nova since OSSA-2019-003 (its words may be secret).
            assert faults[server_id].message == (
                "RuntimeError The rebuild was rolled back: the server is on its previous image "
                "and power state (running) again."
            )
        finally:
            live.stop()


class TestErrors:
    def test_unknown_server_is_404(self, daemon: LiveDaemon) -> None:
        """Rebuilding or showing an unknown server is 404 itemNotFound with Nova's message."""
        missing = str(uuid.uuid4())
        response = _rebuild(daemon, missing, {"imageRef": daemon.image_ids[1]})
        assert response.status_code == 404
        assert response.json() == {
            "itemNotFound": {"code": 404, "message": f"Instance {missing} could not be found."}
        }
        assert daemon.client.get(f"/v2.1/servers/{missing}").status_code == 404

    @pytest.mark.parametrize(
        ("content", "message"),
        [
            (b"{not json", "Malformed request body"),
            (b"", "Malformed request body"),
            (b'{"rebuild": {}, "os-stop": null}', "Malformed request body"),
            (b'{"explode": {}}', "There is no such action: explode"),
            (b'{"rebuild": {}}', "'imageRef' is a required property"),
            (b'{"rebuild": {"imageRef": "not-a-uuid"}}', "is not a 'uuid'"),
            (
                b'{"rebuild": {"imageRef": "%s", "colour": "red"}}',
                "Additional properties are not allowed ('colour' was unexpected)",
            ),
            (b'{"rebuild": {"imageRef": "%s", "name": " padded"}}', "whitespace"),
            (
                b'{"rebuild": {"imageRef": "%s", "description": "below 2.19"}}',
                "Additional properties are not allowed ('description' was unexpected)",
            ),
            (b'{"rebuild": {"imageRef": "%s", "name": null}}', "None is not valid for 'name'"),
        ],
    )
    def test_bad_body_is_400_with_a_nova_fault(
        self, daemon: LiveDaemon, content: bytes, message: str
    ) -> None:
        """Malformed or invalid bodies are 400 badRequest, JSON, and the server is untouched."""
        server_id = daemon.create_server()
        if b"%s" in content:
            content = content % daemon.image_ids[1].encode()
        response = daemon.client.post(
            f"/v2.1/servers/{server_id}/action",
            content=content,
            headers={"Content-Type": "application/json"},
        )
        assert response.status_code == 400, response.text
        assert response.headers["content-type"] == "application/json"
        fault = response.json()["badRequest"]
        assert fault["code"] == 400
        assert message in fault["message"]
        server = daemon.server(server_id)
        assert (server["status"], server["image"]["id"]) == ("ACTIVE", daemon.image_ids[0])

    def test_unknown_image_is_400(self, daemon: LiveDaemon) -> None:
        """An image that does not exist is Nova's 400 'Cannot find image for rebuild'."""
        server_id = daemon.create_server()
        response = _rebuild(daemon, server_id, {"imageRef": str(uuid.uuid4())})
        assert response.status_code == 400
        assert response.json()["badRequest"]["message"] == "Cannot find image for rebuild"

    def test_image_too_big_for_flavor_is_400(self, daemon: LiveDaemon) -> None:
        """An image whose min_disk exceeds the flavor's root disk is refused before any change."""
        created = daemon.client.post(
            "/image/v2/images",
            json={"name": "big", "disk_format": "qcow2", "container_format": "bare", "min_disk": 5},
        ).json()
        image_file = daemon.settings.state_dir / "images" / daemon.image_ids[0]
        upload = daemon.client.put(
            f"/image/v2/images/{created['id']}/file",
            content=image_file.read_bytes(),
            headers={"Content-Type": "application/octet-stream"},
        )
        assert upload.status_code == 204, upload.text
        server_id = daemon.create_server()
        response = _rebuild(daemon, server_id, {"imageRef": created["id"]})
        assert response.status_code == 400
        assert response.json()["badRequest"]["message"].startswith(
            "Flavor's disk is smaller than the minimum size specified in image metadata."
        )

    def test_body_over_the_limit_is_413(self, daemon: LiveDaemon) -> None:
        """A body over the size limit is 413 overLimit, before it is parsed."""
        server_id = daemon.create_server()
        response = _rebuild(
            daemon, server_id, {"imageRef": daemon.image_ids[1], "adminPass": "x" * 200_000}
        )
        assert response.status_code == 413
        assert response.json()["overLimit"]["code"] == 413

    def test_rebuild_of_a_building_server_is_409(self, tmp_path: Path) -> None:
        """A server still building is in vm_state building: rebuild is 409."""
        gate = Gate("start_domain", job="create")
        live = start_live_daemon(tmp_path, observer=gate)
        try:
            body = {"server": {"name": "b", "imageRef": live.image_ids[0], "flavorRef": "1"}}
            server_id = live.client.post("/v2.1/servers", json=body).json()["server"]["id"]
            assert gate.reached.wait(30)
            response = _rebuild(live, server_id, {"imageRef": live.image_ids[1]})
            assert response.status_code == 409
            assert "vm_state building" in response.json()["conflictingRequest"]["message"]
        finally:
            gate.release.set()
            live.stop()


class TestDelete:
    def test_delete_removes_server_domain_and_disks(self, daemon: LiveDaemon) -> None:
        """DELETE is 204; the server then 404s, its domain and instance directory are gone."""
        server_id = daemon.create_server()
        assert daemon.client.delete(f"/v2.1/servers/{server_id}").status_code == 204
        daemon_dir = daemon.settings.state_dir / "instances" / server_id
        import time

        deadline = time.monotonic() + 30
        while daemon.client.get(f"/v2.1/servers/{server_id}").status_code != 404:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert not daemon_dir.exists()
        assert not daemon.run(daemon.daemon.hypervisor.exists(f"rebuildd-{server_id}"))
