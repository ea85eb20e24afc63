"""Versioned notifications: ``instance.<action>.*`` events, logged and kept in an outbox.

Owns the notification envelope and payload (shaped after Nova's ``InstanceActionPayload``;
the full 1.10 payload is a later issue). Secrets (admin password, user data) are never put in a
payload. It must not decide when to notify: the pipeline's runner does.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

import structlog

from rebuildd.models import RequestContext, Server, utcnow
from rebuildd.ports import Store
from rebuildd.states import status_from_state

log = structlog.get_logger("rebuildd.notifications")


def _isotime(value: object) -> str | None:
    return None if value is None else f"{value:%Y-%m-%dT%H:%M:%SZ}"


def instance_payload(server: Server) -> dict[str, Any]:
    """The parts of Nova's InstanceActionPayload that rebuildd knows (no secrets)."""
    return {
        "uuid": server.id,
        "display_name": server.name,
        "display_description": server.description,
        "host": server.host,
        "node": server.node,
        "host_name": server.hostname,
        "image_uuid": server.image_ref,
        "tenant_id": server.project_id,
        "user_id": server.user_id,
        "state": server.vm_state,
        "task_state": server.task_state,
        "power_state": server.power_state,
        "status": status_from_state(server.vm_state, server.task_state),
        "key_name": server.key_name,
        "metadata": dict(server.metadata),
        "locked": server.locked,
        "flavor": {
            "flavorid": server.flavor.id,
            "name": server.flavor.name,
            "vcpus": server.flavor.vcpus,
            "memory_mb": server.flavor.ram,
            "root_gb": server.flavor.disk,
            "ephemeral_gb": server.flavor.ephemeral,
            "swap": server.flavor.swap,
        },
        "launched_at": _isotime(server.launched_at),
        "created_at": _isotime(server.created_at),
        "updated_at": _isotime(server.updated_at),
    }


class Notifier:
    """Writes each notification to the structured log and to the Store's outbox."""

    def __init__(self, store: Store, *, host: str) -> None:
        self.store = store
        self.publisher_id = f"nova-compute:{host}"

    async def notify(
        self,
        event_type: str,
        server: Server,
        *,
        context: RequestContext,
        priority: str = "INFO",
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        data = instance_payload(server)
        data["action_initiator_user"] = context.user_id
        data["action_initiator_project"] = context.project_id
        data.update(extra or {})
        payload = {
            "message_id": str(uuid.uuid4()),
            "publisher_id": self.publisher_id,
            "event_type": event_type,
            "priority": priority,
            "timestamp": f"{utcnow():%Y-%m-%d %H:%M:%S.%f}",
            "payload": {
                "nova_object.name": "InstanceActionPayload",
                "nova_object.namespace": "nova",
                "nova_object.version": "1.8",
                "nova_object.data": data,
            },
        }
        await self.store.add_notification(
            event_type=event_type,
            priority=priority,
            publisher_id=self.publisher_id,
            server_id=server.id,
            payload=payload,
        )
        log.info("notification", event_type=event_type, priority=priority, server_id=server.id)
