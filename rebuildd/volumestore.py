"""The volume half of the Store: local volumes, their Cinder attachments, and servers' volume
block device mappings.

Owns every query on ``volumes`` and ``volume_attachments`` and Cinder's state machine over
them. Each method is one transaction run through the Store's own ``_read``/``_write`` helpers
(same engine, same metrics), and every status change is a conditional UPDATE (compare-and-swap)
on the status the change starts from, so two racing requests can never both win. Statuses and
rules are Cinder's (``cinder/volume/api.py``: ``_attachment_reserve``, ``attachment_delete``;
``cinder/api/v3/attachments.py``: ``complete``). It must not touch files or libvirt.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Collection, Mapping, Sequence
from typing import Any, Final

from sqlalchemy import Connection, delete, insert, select, update

from rebuildd import errors, records
from rebuildd.models import BlockDevice, Volume, VolumeAttachment, utcnow
from rebuildd.storage import DEVICES, Store, _Columns
from rebuildd.tables import BlockDeviceRow, VolumeAttachmentRow, VolumeRow

VOLUMES = _Columns.of(VolumeRow)
ATTACHMENTS = _Columns.of(VolumeAttachmentRow)

# Cinder's _attachment_reserve: what a volume may be reserved from.
RESERVABLE: Final = ("available", "downloading")
RESERVABLE_MULTIATTACH: Final = ("available", "in-use", "downloading")
# Cinder's attachment_delete: the strongest remaining attach_status decides the volume's status.
_REMAINING: Final = (
    ("attached", "in-use"),
    ("attaching", "attaching"),
    ("detaching", "detaching"),
    ("reserved", "reserved"),
)
DELETABLE: Final = ("available", "error", "error_restoring", "error_extending", "error_managing")
_DELETE_REFUSED: Final = (
    "Volume status must be available or error or error_restoring or error_extending or "
    "error_managing and must not be migrating, attached, belong to a group, have snapshots, "
    "awaiting a transfer, or be disassociated from snapshots after volume transfer."
)
_VOLUME_FIELDS: Final = tuple(
    f.name for f in dataclasses.fields(Volume) if f.name not in {"attachments"}
)
_ATTACHMENT_FIELDS: Final = tuple(f.name for f in dataclasses.fields(VolumeAttachment))


def _attachment(row: Any) -> VolumeAttachment:
    return VolumeAttachment(**{name: getattr(row, name) for name in _ATTACHMENT_FIELDS})


def _volume(row: Any, attachments: Sequence[VolumeAttachment]) -> Volume:
    values = {name: getattr(row, name) for name in _VOLUME_FIELDS}
    values["volume_image_metadata"] = dict(row.volume_image_metadata or {})
    return Volume(**values, attachments=tuple(attachments))


def _either(*statuses: str) -> str:
    """Cinder's build_or_str: 'a or b'."""
    return " or ".join(statuses)


class VolumeStore:
    """Volumes, attachments and volume BDMs, over one :class:`~rebuildd.storage.Store`."""

    def __init__(self, store: Store) -> None:
        self.store = store

    # -- reads ----------------------------------------------------------------------------------

    async def get(self, volume_id: str, *, project_id: str | None = None) -> Volume | None:
        return await self.store._read(lambda conn: _get(conn, volume_id, project_id))

    async def list_volumes(self, *, project_id: str | None = None) -> list[Volume]:
        """Newest first, as Cinder lists (created_at desc)."""
        query = VOLUMES.select().order_by(VOLUMES.c.created_at.desc(), VOLUMES.c.id.desc())
        if project_id is not None:
            query = query.where(VOLUMES.c.project_id == project_id)

        def work(conn: Connection) -> list[Volume]:
            rows = conn.execute(query).all()
            by_volume = _attachments_of(conn, [r.id for r in rows])
            return [_volume(r, by_volume.get(r.id, [])) for r in rows]

        return await self.store._read(work)

    async def get_attachment(self, attachment_id: str) -> VolumeAttachment:
        query = ATTACHMENTS.select().where(ATTACHMENTS.c.id == attachment_id)
        row = await self.store._read(lambda conn: conn.execute(query).first())
        if row is None:
            raise errors.VolumeAttachmentNotFound(attachment_id=attachment_id)
        return _attachment(row)

    # -- volumes --------------------------------------------------------------------------------

    async def add(self, volume: Volume) -> Volume:
        values = VOLUMES.row(
            VolumeRow(**{n: getattr(volume, n) for n in _VOLUME_FIELDS if n != "attachments"})
        )
        await self.store._write(lambda conn: conn.execute(insert(VOLUMES.table).values(values)))
        return volume

    async def swap_status(
        self,
        volume_id: str,
        expected: Collection[str],
        status: str,
        *,
        action: str,
        changes: Mapping[str, Any] | None = None,
    ) -> Volume:
        """Move the volume to ``status`` only if it is in one of ``expected`` (one conditional
        UPDATE); otherwise InvalidVolume naming what it is, or VolumeNotFound."""
        values = {**(changes or {}), "status": status, "updated_at": utcnow()}
        statement = (
            update(VOLUMES.table)
            .where(VOLUMES.c.id == volume_id, VOLUMES.c.status.in_(list(expected)))
            .values(VOLUMES.values(values))
            .returning(VOLUMES.c.id)
        )

        def work(conn: Connection) -> Volume:
            if conn.execute(statement).first() is None:
                current = _get(conn, volume_id, None)
                if current is None:
                    raise errors.VolumeNotFound(volume_id=volume_id)
                raise errors.InvalidVolume(
                    reason=f"Volume {volume_id} status must be {_either(*expected)} to "
                    f"{action}, but the current status is {current.status}."
                )
            volume = _get(conn, volume_id, None)
            assert volume is not None
            return volume

        return await self.store._write(work)

    async def begin_delete(self, volume_id: str) -> Volume:
        """available/error/... with no attachment -> deleting (Cinder's check, one UPDATE)."""
        attached = select(ATTACHMENTS.c.id).where(ATTACHMENTS.c.volume_id == volume_id).exists()
        statement = (
            update(VOLUMES.table)
            .where(VOLUMES.c.id == volume_id, VOLUMES.c.status.in_(list(DELETABLE)), ~attached)
            .values(status="deleting", updated_at=utcnow())
            .returning(*VOLUMES.selected)
        )

        def work(conn: Connection) -> Volume:
            row = conn.execute(statement).first()
            if row is None:
                if _get(conn, volume_id, None) is None:
                    raise errors.VolumeNotFound(volume_id=volume_id)
                raise errors.InvalidVolume(reason=_DELETE_REFUSED)
            return _volume(row, [])

        return await self.store._write(work)

    async def remove(self, volume_id: str) -> None:
        statement = delete(VOLUMES.table).where(
            VOLUMES.c.id == volume_id, VOLUMES.c.status == "deleting"
        )
        await self.store._write(lambda conn: conn.execute(statement))

    # -- attachments (Cinder's state machine) ---------------------------------------------------

    async def reserve(self, volume_id: str, server_id: str, attachment_id: str) -> VolumeAttachment:
        """Cinder's ``_attachment_reserve``: available -> reserved (in-use too when
        multiattach), in one conditional UPDATE. Refused otherwise — unless the volume is
        in-use or reserved with an attachment to the same server already (LP 1694530: what
        lets Nova make a rebuild's new attachment before deleting the old one); the volume
        then keeps its status."""
        now = utcnow()

        def work(conn: Connection) -> VolumeAttachment:
            volume = _get(conn, volume_id, None)
            if volume is None:
                raise errors.VolumeNotFound(volume_id=volume_id)
            if "error" in volume.status:
                raise errors.InvalidVolume(
                    reason="Volume attachments can not be created if the volume is in an error "
                    f"state. The Volume {volume_id} currently has a status of: {volume.status} "
                )
            expected = RESERVABLE_MULTIATTACH if volume.multiattach else RESERVABLE
            swapped = conn.execute(
                update(VOLUMES.table)
                .where(
                    VOLUMES.c.id == volume_id,
                    VOLUMES.c.status.in_(list(expected)),
                    VOLUMES.c.multiattach == volume.multiattach,
                )
                .values(status="reserved", updated_at=now)
                .returning(VOLUMES.c.id)
            ).first()
            if swapped is None:
                current = _get(conn, volume_id, None)  # re-read: a racer may have just won
                assert current is not None
                same_server = current.status in ("in-use", "reserved") and any(
                    a.server_id == server_id for a in current.attachments
                )
                if not same_server:
                    raise errors.InvalidVolume(
                        reason=f"Volume {volume_id} status must be {_either(*expected)} to "
                        f"reserve, but the current status is {current.status}."
                    )
            row = {
                "id": attachment_id,
                "volume_id": volume_id,
                "server_id": server_id,
                "status": "reserved",
                "attach_mode": "rw",
                "connector": None,
                "connection_info": None,
                "mountpoint": None,
                "attached_at": None,
                "created_at": now,
            }
            conn.execute(insert(ATTACHMENTS.table).values(ATTACHMENTS.values(row)))
            return _attachment(_Row(row))

        return await self.store._write(work)

    async def connect(
        self,
        attachment_id: str,
        *,
        connector: Mapping[str, Any],
        connection_info: Mapping[str, Any],
        mountpoint: str | None,
    ) -> VolumeAttachment:
        """attachment_update: the attachment gets its connector and connection_info and is
        ``attaching`` (an ``attached`` one stays attached); a ``reserved`` volume becomes
        ``attaching``, an ``in-use`` one (a second attachment of the same server) stays."""
        now = utcnow()

        def work(conn: Connection) -> VolumeAttachment:
            row = _attachment_row(conn, attachment_id)
            volume = _get(conn, row.volume_id, None)
            assert volume is not None
            if "error" in volume.status:
                raise errors.InvalidVolume(
                    reason="Volume attachments can not be updated if the volume is in an error "
                    f"state. The Volume {volume.id} currently has a status of: {volume.status} "
                )
            status = "attached" if row.status == "attached" else "attaching"
            conn.execute(
                update(ATTACHMENTS.table)
                .where(ATTACHMENTS.c.id == attachment_id)
                .values(
                    status=status,
                    connector=dict(connector),
                    connection_info=dict(connection_info),
                    mountpoint=mountpoint,
                )
            )
            conn.execute(
                update(VOLUMES.table)
                .where(VOLUMES.c.id == volume.id, VOLUMES.c.status == "reserved")
                .values(status="attaching", updated_at=now)
            )
            return _attachment(_attachment_row(conn, attachment_id))

        return await self.store._write(work)

    async def complete(self, attachment_id: str) -> None:
        """os-complete: the attachment is ``attached``, its volume ``in-use``."""
        now = utcnow()

        def work(conn: Connection) -> None:
            row = _attachment_row(conn, attachment_id)
            conn.execute(
                update(ATTACHMENTS.table)
                .where(ATTACHMENTS.c.id == attachment_id)
                .values(status="attached", attached_at=row.attached_at or now)
            )
            conn.execute(
                update(VOLUMES.table)
                .where(VOLUMES.c.id == row.volume_id)
                .values(status="in-use", updated_at=now)
            )

        await self.store._write(work)

    async def delete_attachment(self, attachment_id: str) -> None:
        """Cinder's ``attachment_delete``: the volume ends ``available`` only when no
        attachment remains; else it takes the strongest remaining attach_status
        (attached > attaching > detaching > reserved)."""
        now = utcnow()

        def work(conn: Connection) -> None:
            row = _attachment_row(conn, attachment_id)
            conn.execute(delete(ATTACHMENTS.table).where(ATTACHMENTS.c.id == attachment_id))
            remaining = set(
                conn.execute(
                    select(ATTACHMENTS.c.status).where(ATTACHMENTS.c.volume_id == row.volume_id)
                ).scalars()
            )
            status = next((v for s, v in _REMAINING if s in remaining), "available")
            conn.execute(
                update(VOLUMES.table)
                .where(VOLUMES.c.id == row.volume_id)
                .values(status=status, updated_at=now)
            )

        await self.store._write(work)

    # -- servers' volume block device mappings ----------------------------------------------

    async def add_block_device(self, device: BlockDevice) -> None:
        now = utcnow()
        values = DEVICES.row(
            BlockDeviceRow(**dataclasses.asdict(device), created_at=now, updated_at=now)
        )
        await self.store._write(lambda conn: conn.execute(insert(DEVICES.table).values(values)))

    async def remove_block_device(self, server_id: str, device_id: str) -> None:
        """Idempotent: a mapping already gone is no error."""
        statement = delete(DEVICES.table).where(
            DEVICES.c.id == device_id, DEVICES.c.server_id == server_id
        )
        await self.store._write(lambda conn: conn.execute(statement))

    async def volume_devices(self, server_ids: Collection[str]) -> dict[str, list[BlockDevice]]:
        """The volume mappings of many servers in one query (for list views), by server. One
        server's (GET /servers/{id}, polled by every client) come from the Store's prebuilt
        statement for its block devices: building this query costs ~10x more (bench/)."""
        if not server_ids:
            return {}
        if len(server_ids) == 1:
            (server_id,) = server_ids
            devices = await self.store.get_block_devices(server_id)
            volumes = [d for d in devices if d.destination_type == "volume"]
            return {server_id: volumes} if volumes else {}
        query = (
            DEVICES.select()
            .where(
                DEVICES.c.server_id.in_(list(server_ids)), DEVICES.c.destination_type == "volume"
            )
            .order_by(DEVICES.c.server_id, DEVICES.c.device_name)
        )
        rows = await self.store._read(lambda conn: conn.execute(query).all())
        found: dict[str, list[BlockDevice]] = defaultdict(list)
        for row in rows:
            found[row.server_id].append(records.block_device_record(row))
        return dict(found)


class _Row:
    """A dict seen through attributes, to build a record from values just inserted."""

    def __init__(self, values: Mapping[str, Any]) -> None:
        self.__dict__.update(values)


def _attachment_row(conn: Connection, attachment_id: str) -> Any:
    row = conn.execute(ATTACHMENTS.select().where(ATTACHMENTS.c.id == attachment_id)).first()
    if row is None:
        raise errors.VolumeAttachmentNotFound(attachment_id=attachment_id)
    return row


def _attachments_of(
    conn: Connection, volume_ids: Sequence[str]
) -> dict[str, list[VolumeAttachment]]:
    if not volume_ids:
        return {}
    rows = conn.execute(
        ATTACHMENTS.select()
        .where(ATTACHMENTS.c.volume_id.in_(list(volume_ids)))
        .order_by(ATTACHMENTS.c.created_at, ATTACHMENTS.c.id)
    ).all()
    found: dict[str, list[VolumeAttachment]] = defaultdict(list)
    for row in rows:
        found[row.volume_id].append(_attachment(row))
    return found


def _get(conn: Connection, volume_id: str, project_id: str | None) -> Volume | None:
    query = VOLUMES.select().where(VOLUMES.c.id == volume_id)
    if project_id is not None:
        query = query.where(VOLUMES.c.project_id == project_id)
    row = conn.execute(query).first()
    if row is None:
        return None
    return _volume(row, _attachments_of(conn, [volume_id]).get(volume_id, []))


def reimage_expected(reimage_reserved: bool) -> tuple[str, ...]:
    """Cinder's reimage: from available or error, or reserved when ``reimage_reserved``."""
    return ("available", "error", "reserved") if reimage_reserved else ("available", "error")
