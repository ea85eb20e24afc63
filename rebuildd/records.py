"""Rows <-> records: the rows of tables.py turned into the frozen records of models.py, and
back. Pure functions; storage.py is their only user. A row read is either a SQLModel row or a
Core row whose columns carry the row class's attribute names (storage.py selects them so)."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

from rebuildd.models import (
    ActionEvent,
    BlockDevice,
    Flavor,
    Image,
    InstanceAction,
    KeyPair,
    NewAction,
    Server,
)
from rebuildd.tables import InstanceActionRow

# A SQLModel row, or a Core row with the same attribute names.
RowLike = Any


def action_row(server_id: str, action: NewAction, now: dt.datetime) -> InstanceActionRow:
    return InstanceActionRow(**action_values(server_id, action, now))


def action_values(server_id: str, action: NewAction, now: dt.datetime) -> dict[str, Any]:
    """What :func:`action_row` holds, by attribute, every field's default applied — without
    building the SQLModel row, which costs a hundred times more (bench/, see the README)."""
    defaults = {
        name: field.get_default(call_default_factory=True)
        for name, field in InstanceActionRow.model_fields.items()
        if not field.is_required()
    }
    return {
        **defaults,
        "server_id": server_id,
        "action": action.action,
        "request_id": action.request_id,
        "user_id": action.user_id,
        "project_id": action.project_id,
        "message": action.message,
        "start_time": now,
        "updated_at": now,
        "job_state": "running" if action.params is not None else None,
        "job_params": action.params,
        "journal": {} if action.params is not None else None,
        "idempotency_key": action.idempotency_key,
    }


def server_values(server: Server) -> dict[str, Any]:
    values = {f.name: getattr(server, f.name) for f in dataclasses.fields(server)}
    flavor: Flavor = values.pop("flavor")
    values["flavor"] = dataclasses.asdict(flavor)
    values["flavor_id"] = flavor.id
    values["server_metadata"] = values.pop("metadata")
    certs = values.pop("trusted_certs")
    values["trusted_certs"] = None if certs is None else list(certs)
    return values


def flavor_record(row: RowLike) -> Flavor:
    return Flavor(
        id=row.id,
        name=row.name,
        vcpus=row.vcpus,
        ram=row.ram,
        disk=row.disk,
        ephemeral=row.ephemeral,
        swap=row.swap,
        rxtx_factor=row.rxtx_factor,
        is_public=row.is_public,
        disabled=row.disabled,
        description=row.description,
        extra_specs=dict(row.extra_specs),
    )


def image_record(row: RowLike) -> Image:
    fields = {f.name for f in dataclasses.fields(Image)}
    return Image(**{name: getattr(row, name) for name in fields})


def keypair_record(row: RowLike) -> KeyPair:
    return KeyPair(
        name=row.name,
        user_id=row.user_id,
        public_key=row.public_key,
        fingerprint=row.fingerprint,
        type=row.type,
        created_at=row.created_at,
    )


_SERVER_FIELDS = tuple(
    f.name
    for f in dataclasses.fields(Server)
    if f.name not in {"flavor", "metadata", "image_properties", "trusted_certs"}
)


def server_record(row: RowLike) -> Server:
    values = {name: getattr(row, name) for name in _SERVER_FIELDS}
    certs = row.trusted_certs
    return Server(
        **values,
        flavor=Flavor(**row.flavor),
        metadata=dict(row.server_metadata),
        image_properties=dict(row.image_properties or {}),
        trusted_certs=None if certs is None else tuple(certs),
    )


def block_device_record(row: RowLike) -> BlockDevice:
    fields = {f.name for f in dataclasses.fields(BlockDevice)}
    return BlockDevice(**{name: getattr(row, name) for name in fields})


def action_record(row: RowLike, events: tuple[ActionEvent, ...]) -> InstanceAction:
    assert row.id is not None
    return InstanceAction(
        id=row.id,
        server_id=row.server_id,
        action=row.action,
        request_id=row.request_id,
        user_id=row.user_id,
        project_id=row.project_id,
        start_time=row.start_time,
        finish_time=row.finish_time,
        message=row.message,
        updated_at=row.updated_at,
        events=events,
        job_state=row.job_state,
        job_params=row.job_params,
        journal=row.journal,
        idempotency_key=row.idempotency_key,
        response=row.response,
    )


def event_record(row: RowLike) -> ActionEvent:
    return ActionEvent(
        event=row.event,
        start_time=row.start_time,
        finish_time=row.finish_time,
        result=row.result,
        traceback=row.traceback,
        details=row.details,
        host=row.host,
    )
