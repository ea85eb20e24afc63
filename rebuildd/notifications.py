"""Versioned notifications in Nova's shape: ``instance.<action>.*`` events whose payload is an
``InstanceActionRebuildPayload`` 1.10 (rebuilds) or ``InstanceActionPayload`` 1.9 (the
others), logged and kept in the Store's outbox, ready to be published inside the
oslo.messaging 2.0 envelope (:func:`oslo_envelope`) on the ``versioned_notifications`` topic.

Owns the envelope and the payload only; it must not decide when to notify (the runner does).
Secrets (admin password, user data) are never put in a payload — Nova's has neither.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Mapping
from typing import Any, Final

import structlog

from rebuildd.models import Flavor, Notification, RequestContext, Server, utcnow
from rebuildd.states import PowerState

log = structlog.get_logger("rebuildd.notifications")

TOPIC: Final = "versioned_notifications"
# nova.objects.fields.InstancePowerState: the payload carries names, not numbers.
_POWER_STATE_NAMES: Final = {
    PowerState.NOSTATE: "pending",
    PowerState.RUNNING: "running",
    PowerState.PAUSED: "paused",
    PowerState.SHUTDOWN: "shutdown",
    PowerState.CRASHED: "crashed",
    PowerState.SUSPENDED: "suspended",
}


def _time(value: dt.datetime | None) -> str | None:
    return None if value is None else value.strftime("%Y-%m-%dT%H:%M:%SZ")


def _object(name: str, version: str, data: dict[str, Any]) -> dict[str, Any]:
    return {
        "nova_object.name": name,
        "nova_object.namespace": "nova",
        "nova_object.version": version,
        "nova_object.data": data,
    }


def flavor_payload(flavor: Flavor) -> dict[str, Any]:
    """Nova's FlavorPayload 1.4."""
    return _object(
        "FlavorPayload",
        "1.4",
        {
            "flavorid": flavor.id,
            "name": flavor.name,
            "memory_mb": flavor.ram,
            "vcpus": flavor.vcpus,
            "root_gb": flavor.disk,
            "ephemeral_gb": flavor.ephemeral,
            "swap": flavor.swap,
            "rxtx_factor": flavor.rxtx_factor,
            "disabled": flavor.disabled,
            "is_public": flavor.is_public,
            "extra_specs": dict(flavor.extra_specs),
            "projects": None,
            "vcpu_weight": 0,
            "description": flavor.description,
        },
    )


def instance_data(server: Server, context: RequestContext) -> dict[str, Any]:
    """The fields of Nova's InstancePayload 1.9 (what rebuildd knows; the rest as Nova shows
    them for a server without that feature)."""
    return {
        "uuid": server.id,
        "user_id": server.user_id,
        "tenant_id": server.project_id,
        "reservation_id": "",
        "display_name": server.name,
        "display_description": server.description,
        "host_name": server.hostname,
        "host": server.host,
        "node": server.node,
        "os_type": None,
        "architecture": None,
        "availability_zone": "nova",
        "flavor": flavor_payload(server.flavor),
        "image_uuid": server.image_ref,
        "key_name": server.key_name,
        "kernel_id": "",
        "ramdisk_id": "",
        "created_at": _time(server.created_at),
        "launched_at": _time(server.launched_at),
        "terminated_at": _time(server.terminated_at),
        "deleted_at": None,
        "updated_at": _time(server.updated_at),
        "state": server.vm_state,
        "power_state": _POWER_STATE_NAMES.get(server.power_state, "pending"),
        "task_state": server.task_state,
        "progress": server.progress,
        "ip_addresses": [],
        "block_devices": [],
        "metadata": dict(server.metadata),
        "locked": server.locked,
        "auto_disk_config": "AUTO" if server.auto_disk_config else "MANUAL",
        "request_id": context.request_id,
        "action_initiator_user": context.user_id,
        "action_initiator_project": context.project_id,
        "locked_reason": server.locked_reason,
        "shares": [],
    }


def action_payload(
    event_type: str,
    server: Server,
    context: RequestContext,
    fault: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """InstanceActionRebuildPayload 1.10 for ``instance.rebuild*``, else InstanceActionPayload."""
    data = instance_data(server, context)
    data["fault"] = None if fault is None else _object("ExceptionPayload", "1.1", dict(fault))
    if event_type.startswith("instance.rebuild"):
        certs = server.trusted_certs
        data["trusted_image_certificates"] = None if certs is None else list(certs)
        return _object("InstanceActionRebuildPayload", "1.10", data)
    return _object("InstanceActionPayload", "1.9", data)


def oslo_envelope(message: Mapping[str, Any]) -> dict[str, str]:
    """The oslo.messaging 2.0 envelope a notification travels in on the message bus."""
    return {"oslo.version": "2.0", "oslo.message": json.dumps(message)}


class Notifier:
    """Builds notifications; the runner writes each in the transaction of the bookkeeping it
    goes with (an event starting or finishing) and then calls :func:`sent`."""

    def __init__(self, *, host: str) -> None:
        self.publisher_id = f"nova-compute:{host}"

    def build(
        self,
        event_type: str,
        server: Server,
        *,
        context: RequestContext,
        priority: str = "INFO",
        extra: Mapping[str, Any] | None = None,
    ) -> Notification:
        fault = (extra or {}).get("fault")
        message = {
            "message_id": str(uuid.uuid4()),
            "publisher_id": self.publisher_id,
            "event_type": event_type,
            "priority": priority,
            "timestamp": f"{utcnow():%Y-%m-%d %H:%M:%S.%f}",
            "payload": action_payload(event_type, server, context, fault),
        }
        return Notification(event_type, priority, self.publisher_id, server.id, message)


def sent(notification: Notification | None) -> None:
    """Log a notification once it is in the outbox."""
    if notification is not None:
        log.info(
            "notification",
            event_type=notification.event_type,
            priority=notification.priority,
            server_id=notification.server_id,
        )
