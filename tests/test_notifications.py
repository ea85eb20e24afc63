"""Versioned notifications have Nova's shape: InstanceActionRebuildPayload 1.10 for rebuilds,
with the fields of Nova's published notification samples, inside the oslo.messaging envelope."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rebuildd.notifications import oslo_envelope
from tests.live import Gate, LiveDaemon, start_live_daemon

# The keys of Nova's doc/notification_samples/common_payloads/InstancePayload.json (1.9),
# InstanceActionPayload.json (adds fault) and InstanceActionRebuildPayload.json (1.10).
INSTANCE_KEYS = {
    "architecture", "availability_zone", "block_devices", "created_at", "deleted_at",
    "display_name", "display_description", "host", "host_name", "ip_addresses", "kernel_id",
    "key_name", "launched_at", "image_uuid", "metadata", "locked", "node", "os_type", "progress",
    "ramdisk_id", "reservation_id", "state", "task_state", "power_state", "tenant_id",
    "terminated_at", "auto_disk_config", "flavor", "updated_at", "user_id", "uuid", "request_id",
    "action_initiator_user", "action_initiator_project", "locked_reason", "shares",
}  # fmt: skip
FLAVOR_KEYS = {
    "flavorid", "name", "root_gb", "vcpus", "ephemeral_gb", "memory_mb", "disabled",
    "rxtx_factor", "extra_specs", "projects", "swap", "is_public", "vcpu_weight", "description",
}  # fmt: skip
EXCEPTION_KEYS = {"module_name", "exception_message", "function_name", "exception", "traceback"}
MESSAGE_KEYS = {"message_id", "publisher_id", "event_type", "priority", "payload", "timestamp"}


def _messages(live: LiveDaemon, server_id: str) -> list[dict[str, Any]]:
    return [n[2] for n in live.run(live.daemon.store.list_notifications(server_id))]


def _check_rebuild_payload(message: dict[str, Any]) -> dict[str, Any]:
    assert set(message) == MESSAGE_KEYS
    assert message["publisher_id"].startswith("nova-compute:")
    payload = message["payload"]
    assert payload["nova_object.name"] == "InstanceActionRebuildPayload"
    assert payload["nova_object.version"] == "1.10"
    assert payload["nova_object.namespace"] == "nova"
    data: dict[str, Any] = payload["nova_object.data"]
    assert set(data) == INSTANCE_KEYS | {"fault", "trusted_image_certificates"}
    assert data["flavor"]["nova_object.name"] == "FlavorPayload"
    assert set(data["flavor"]["nova_object.data"]) == FLAVOR_KEYS
    return data


def test_a_rebuild_sends_scheduled_start_and_end(daemon: LiveDaemon) -> None:
    """rebuild_scheduled, rebuild.start (task_state rebuilding) and rebuild.end (active, the new
    image, power state by name), each keyed to the rebuild's request id."""
    server_id = daemon.create_server()
    response = daemon.client.post(
        f"/v2.1/servers/{server_id}/action", json={"rebuild": {"imageRef": daemon.image_ids[1]}}
    )
    request_id = response.headers["x-compute-request-id"]
    daemon.wait_for(server_id, "ACTIVE")
    rebuild = [
        m for m in _messages(daemon, server_id) if m["event_type"].startswith("instance.rebuild")
    ]
    assert [m["event_type"] for m in rebuild] == [
        "instance.rebuild_scheduled",
        "instance.rebuild.start",
        "instance.rebuild.end",
    ]
    start, end = (_check_rebuild_payload(m) for m in rebuild[1:])
    assert (start["task_state"], start["state"], start["fault"]) == ("rebuilding", "active", None)
    assert (end["task_state"], end["state"], end["power_state"]) == (None, "active", "running")
    assert end["image_uuid"] == daemon.image_ids[1]
    assert {start["request_id"], end["request_id"]} == {request_id}
    assert all(m["priority"] == "INFO" for m in rebuild)


def test_a_failed_rebuild_sends_error_with_an_exception_payload(tmp_path: Path) -> None:
    """instance.rebuild.error is ERROR priority and carries Nova's ExceptionPayload."""
    gate = Gate("start_domain")
    gate.fail_with = RuntimeError("boom at start")
    live = start_live_daemon(tmp_path, observer=gate)
    try:
        server_id = live.create_server()
        live.client.post(
            f"/v2.1/servers/{server_id}/action", json={"rebuild": {"imageRef": live.image_ids[1]}}
        )
        live.wait_for(server_id, "ERROR")
        # The error notification follows the final state; wait for it, not for the state.
        deadline = time.monotonic() + 30
        while _messages(live, server_id)[-1]["event_type"] != "instance.rebuild.error":
            assert time.monotonic() < deadline, "no instance.rebuild.error within 30 s"
            time.sleep(0.02)
        error = _messages(live, server_id)[-1]
        assert (error["event_type"], error["priority"]) == ("instance.rebuild.error", "ERROR")
        fault = _check_rebuild_payload(error)["fault"]
        assert fault["nova_object.name"] == "ExceptionPayload"
        assert set(fault["nova_object.data"]) == EXCEPTION_KEYS
        assert fault["nova_object.data"]["exception"] == "RuntimeError"
        # The exception's own message, without what the fault adds about the rollback.
        assert fault["nova_object.data"]["exception_message"] == "boom at start"
    finally:
        live.stop()


def test_other_actions_use_instance_action_payload(daemon: LiveDaemon) -> None:
    """create and power actions send InstanceActionPayload 1.9."""
    server_id = daemon.create_server()
    created = [m for m in _messages(daemon, server_id) if m["event_type"] == "instance.create.end"]
    assert created[0]["payload"]["nova_object.name"] == "InstanceActionPayload"
    assert created[0]["payload"]["nova_object.version"] == "1.9"


def test_oslo_envelope_round_trips() -> None:
    """The envelope is oslo.messaging 2.0: the message as a JSON string."""
    message = {"event_type": "instance.rebuild.end", "payload": {"a": 1}}
    envelope = oslo_envelope(message)
    assert envelope["oslo.version"] == "2.0"
    assert json.loads(envelope["oslo.message"]) == message
