"""Cinder v3 as rebuildd's volume service (``REBUILDD_VOLUME_BACKEND=cinder``), over one
long-lived ``httpx.AsyncClient``: the :class:`~rebuildd.ports.VolumeService` port, as Nova's
``nova/volume/cinder.py`` speaks to Cinder.

Owns the conversation with Cinder at microversion 3.68 (attachments of 3.44+, ``os-reimage``
of 3.68, URLs without a project id since 3.67): volume show plus the volume's attachment list
(``all_tenants``: rebuildd's service user is an admin, as Nova's is to Cinder) read into
:class:`~rebuildd.models.Volume`; attachment create/update/complete/delete; volume create
(from an image) and delete, waited for as Nova's ``_await_block_device_map_created`` waits;
``os-reimage`` with ``reimage_reserved`` — it returns once Cinder accepted it: Cinder announces
the end by posting ``volume-reimaged`` to ``os-server-external-events``, which the compute
stage awaits. Every request carries rebuildd's service token (``keystone.ServiceTokenAuth``:
``X-Service-Token``, without which Cinder refuses to delete an attachment, OSSA-2023-003);
a volume created for a request carries that user's token too, so it belongs to the user's
project. The connection_info Cinder answers is connected on this host
(:func:`connector.connect_volume`: an NFS share mounted) before it is handed on.

Every failure to talk to Cinder becomes :class:`errors.VolumeServiceUnavailable` at one
boundary (:func:`_calling`); Cinder's own refusals (400/409/413) become
:class:`errors.InvalidVolume` with Cinder's message, its 404 the caller's NotFound. It reads no
settings and does not own or close the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Final, TypeVar

import httpx
import pydantic
import structlog
from pydantic import BaseModel, ConfigDict, Field

from rebuildd import connector, errors
from rebuildd.models import Image, RequestContext, Volume, VolumeAttachment

log = structlog.get_logger("rebuildd.cinder")

MICROVERSION: Final = "3.68"
M = TypeVar("M", bound=BaseModel)


def new_client(
    url: str,
    *,
    timeout: float,
    transport: httpx.AsyncBaseTransport | None = None,
    auth: httpx.Auth | None = None,
) -> httpx.AsyncClient:
    """The one client of a daemon's Cinder; ``url`` is its root or any of its v3 endpoints
    (``http://h:8776/v3/<project>`` as catalogs list it): requests go to ``/v3/...``."""
    return httpx.AsyncClient(
        base_url=endpoint(url),
        timeout=httpx.Timeout(timeout),
        transport=transport,
        auth=auth,
        headers={"Accept": "application/json", "OpenStack-API-Version": f"volume {MICROVERSION}"},
    )


def endpoint(url: str) -> str:
    """Cinder's root from an endpoint: everything from the ``/v3`` (or ``/v2``) on dropped."""
    base = url.rstrip("/")
    for marker in ("/v3", "/v2"):
        at = base.find(marker + "/")
        if base.endswith(marker):
            return base[: -len(marker)]
        if at >= 0:
            return base[:at]
    return base


# -- Cinder's JSON, read at the edge -------------------------------------------------------------


class _Attachment(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str
    status: str
    instance: str | None = None
    volume_id: str
    attach_mode: str | None = "rw"
    attached_at: dt.datetime | str | None = None
    connection_info: dict[str, Any] | None = None


class _AttachmentBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    attachment: _Attachment


class _AttachmentList(BaseModel):
    model_config = ConfigDict(extra="ignore")
    attachments: list[_Attachment]


class _Volume(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    id: str
    name: str | None = None
    description: str | None = None
    size: int
    status: str
    user_id: str | None = None
    project_id: str | None = Field(default=None, alias="os-vol-tenant-attr:tenant_id")
    bootable: bool | str = False
    multiattach: bool = False
    volume_type: str | None = None
    volume_image_metadata: dict[str, Any] | None = None
    availability_zone: str | None = None
    created_at: dt.datetime
    updated_at: dt.datetime | None = None


class _VolumeBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    volume: _Volume


# -- the port -------------------------------------------------------------------------------------


class CinderVolumeService:
    """Cinder's volumes and attachments behind rebuildd's VolumeService port."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        nfs_mount_point_base: Path,
        wait_timeout: float = 180.0,
        poll_interval: float = 0.5,
    ) -> None:
        self.client = client
        self.nfs_mount_point_base = nfs_mount_point_base
        self.wait_timeout = wait_timeout
        self.poll_interval = poll_interval

    @property
    def url(self) -> str:
        return str(self.client.base_url)

    async def get(self, volume_id: str) -> Volume | None:
        with self._calling("show volume"):
            response = await self.client.get(f"/v3/volumes/{volume_id}")
            if response.status_code == 404:
                return None
            volume = self._read(response, _VolumeBody, "show volume").volume
            listed = await self.client.get(
                "/v3/attachments/detail", params={"volume_id": volume_id, "all_tenants": "1"}
            )
            attachments = self._read(listed, _AttachmentList, "list attachments").attachments
        return _volume_record(volume, attachments)

    async def attachment_create(
        self, volume_id: str, server_id: str, *, connector: Mapping[str, Any] | None = None
    ) -> VolumeAttachment:
        body: dict[str, Any] = {
            "volume_uuid": volume_id,
            "instance_uuid": server_id,
            "mode": "rw",
        }
        if connector is not None:
            body["connector"] = dict(connector)
        with self._calling("create attachment"):
            response = await self.client.post("/v3/attachments", json={"attachment": body})
            self._refused(response, errors.VolumeNotFound(volume_id=volume_id))
            created = self._read(response, _AttachmentBody, "create attachment").attachment
        log.info("cinder attachment created", volume_id=volume_id, attachment_id=created.id)
        return await self._connected(created)

    async def attachment_update(
        self, attachment_id: str, connector: Mapping[str, Any], *, mountpoint: str | None = None
    ) -> VolumeAttachment:
        sent = dict(connector)
        if mountpoint is not None:
            sent["mountpoint"] = mountpoint
        with self._calling("update attachment"):
            response = await self.client.put(
                f"/v3/attachments/{attachment_id}", json={"attachment": {"connector": sent}}
            )
            self._refused(response, errors.VolumeAttachmentNotFound(attachment_id=attachment_id))
            updated = self._read(response, _AttachmentBody, "update attachment").attachment
        return await self._connected(updated, mountpoint=mountpoint)

    async def attachment_complete(self, attachment_id: str) -> None:
        with self._calling("complete attachment"):
            response = await self.client.post(
                f"/v3/attachments/{attachment_id}/action", json={"os-complete": None}
            )
            self._refused(response, errors.VolumeAttachmentNotFound(attachment_id=attachment_id))

    async def attachment_delete(self, attachment_id: str) -> None:
        """Idempotent, as Nova's: an attachment Cinder no longer has is no error."""
        with self._calling("delete attachment"):
            response = await self.client.delete(f"/v3/attachments/{attachment_id}")
            if response.status_code == 404:
                return
            self._refused(response, errors.VolumeAttachmentNotFound(attachment_id=attachment_id))
        log.info("cinder attachment deleted", attachment_id=attachment_id)

    async def create(
        self,
        context: RequestContext,
        *,
        size: int,
        name: str | None = None,
        image: Image | None = None,
        description: str | None = None,
    ) -> Volume:
        body: dict[str, Any] = {"size": size, "name": name, "description": description}
        if image is not None:
            body["imageRef"] = image.id
        # The user's token, when the request came with one, so the volume is the user's.
        headers = {"X-Auth-Token": context.auth_token} if context.auth_token else {}
        with self._calling("create volume"):
            response = await self.client.post("/v3/volumes", json={"volume": body}, headers=headers)
            missing: errors.RebuilddError = (
                errors.ImageNotFound(image_id=image.id)
                if image is not None
                else errors.InvalidVolume(reason=_message(response))
            )
            self._refused(response, missing)
            volume_id = self._read(response, _VolumeBody, "create volume").volume.id
        log.info("cinder volume creating", volume_id=volume_id, size=size)
        return await self._await_status(volume_id, "available", failed=("error",))

    async def delete(self, volume_id: str) -> None:
        with self._calling("delete volume"):
            response = await self.client.delete(f"/v3/volumes/{volume_id}")
            if response.status_code == 404:
                return
            self._refused(response, errors.VolumeNotFound(volume_id=volume_id))
        deadline = time.monotonic() + self.wait_timeout
        while time.monotonic() < deadline:
            volume = await self.get(volume_id)
            if volume is None:
                return
            if volume.status == "error_deleting":
                break
            await asyncio.sleep(self.poll_interval)
        raise errors.VolumeNotDeleted(volume_id=volume_id, seconds=self.wait_timeout)

    async def reimage(self, volume_id: str, image: Image, *, reimage_reserved: bool) -> None:
        """Asks for the re-image; Cinder posts ``volume-reimaged`` when it is done."""
        body = {"os-reimage": {"image_id": image.id, "reimage_reserved": reimage_reserved}}
        with self._calling("re-image volume"):
            response = await self.client.post(f"/v3/volumes/{volume_id}/action", json=body)
            self._refused(response, errors.VolumeNotFound(volume_id=volume_id))
        log.info("cinder re-image requested", volume_id=volume_id, image_id=image.id)

    # -- helpers ------------------------------------------------------------------------------

    async def _connected(
        self, attachment: _Attachment, *, mountpoint: str | None = None
    ) -> VolumeAttachment:
        """The attachment, its connection_info (if Cinder gave one) connected on this host."""
        record = _attachment_record(attachment)
        info = record.connection_info
        if info:
            info = await connector.connect_volume(
                info, nfs_mount_point_base=self.nfs_mount_point_base
            )
        return dataclasses.replace(record, connection_info=info, mountpoint=mountpoint)

    async def _await_status(
        self, volume_id: str, wanted: str, *, failed: tuple[str, ...]
    ) -> Volume:
        deadline = time.monotonic() + self.wait_timeout
        status = "unknown"
        while time.monotonic() < deadline:
            volume = await self.get(volume_id)
            status = volume.status if volume is not None else "deleted"
            if volume is not None and status == wanted:
                return volume
            if status in failed or volume is None:
                break
            await asyncio.sleep(self.poll_interval)
        raise errors.VolumeNotCreated(
            volume_id=volume_id, seconds=self.wait_timeout, volume_status=status
        )

    @contextlib.contextmanager
    def _calling(self, call: str) -> Iterator[None]:
        """The one boundary where httpx's errors become rebuildd's."""
        try:
            yield
        except httpx.RequestError as exc:
            log.error("cinder unreachable", call=call, error=type(exc).__name__)
            reason = f"{call}: {type(exc).__name__}: {exc}".rstrip(": ")
            raise errors.VolumeServiceUnavailable(url=self.url, reason=reason) from None

    def _refused(self, response: httpx.Response, not_found: errors.RebuilddError) -> None:
        """Cinder's refusals as rebuildd's errors; nothing for a 2xx."""
        status = response.status_code
        if status < 300:
            return
        message = _message(response)
        if status == 404:
            raise not_found
        if status in (400, 409, 413):
            raise errors.InvalidVolume(reason=message)
        log.error("cinder failed", status=status, message=message[:300])
        hint = " (rebuildd's service user needs the admin role)" if status in (401, 403) else ""
        raise errors.VolumeServiceUnavailable(
            url=self.url, reason=f"HTTP {status}: {message}{hint}"
        )

    def _read(self, response: httpx.Response, model: type[M], call: str) -> M:
        """The answer as ``model``; a refusal not handled before (a 404 of a listing) is
        Cinder failing."""
        gone = errors.VolumeServiceUnavailable(url=self.url, reason=f"{call}: HTTP 404")
        self._refused(response, gone)
        try:
            return model.model_validate_json(response.content)
        except pydantic.ValidationError as exc:
            log.error("cinder answered what rebuildd cannot read", call=call, error=str(exc)[:300])
            raise errors.VolumeServiceUnavailable(
                url=self.url, reason=f"{call}: an unreadable answer"
            ) from None


def _message(response: httpx.Response) -> str:
    """Cinder's fault message (``{"badRequest": {"message": ...}}``), else the body's start."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:300] or response.reason_phrase
    if isinstance(body, dict):
        for fault in body.values():
            if isinstance(fault, dict) and isinstance(fault.get("message"), str):
                return str(fault["message"])
    return response.text[:300]


def _nested(info: dict[str, Any] | None) -> dict[str, Any] | None:
    """Cinder's attachment API answers connection_info flat (``driver_volume_type`` beside the
    driver's keys); Nova's and rebuildd's shape is ``{"driver_volume_type", "data": {...}}``
    (what Nova's ``_translate_attachment_ref`` makes of it)."""
    if not info or "data" in info:
        return info or None
    data = dict(info)
    kind = data.pop("driver_volume_type", None)
    return {"driver_volume_type": kind, "data": data}


def _aware(value: dt.datetime | str | None) -> dt.datetime | None:
    if not isinstance(value, dt.datetime):
        return None
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def _attachment_record(attachment: _Attachment) -> VolumeAttachment:
    return VolumeAttachment(
        id=attachment.id,
        volume_id=attachment.volume_id,
        server_id=attachment.instance or "",
        status=attachment.status,
        attach_mode=attachment.attach_mode or "rw",
        connection_info=_nested(attachment.connection_info),
        attached_at=_aware(attachment.attached_at),
    )


def _volume_record(volume: _Volume, attachments: list[_Attachment]) -> Volume:
    created = _aware(volume.created_at)
    assert created is not None
    bootable = volume.bootable
    return Volume(
        id=volume.id,
        name=volume.name,
        description=volume.description,
        size=volume.size,
        status=volume.status,
        project_id=volume.project_id or "",
        user_id=volume.user_id or "",
        bootable=bootable if isinstance(bootable, bool) else bootable.lower() == "true",
        multiattach=volume.multiattach,
        volume_type=volume.volume_type,
        attachments=tuple(_attachment_record(a) for a in attachments if a.volume_id == volume.id),
        volume_image_metadata={
            key: str(value) for key, value in (volume.volume_image_metadata or {}).items()
        },
        created_at=created,
        updated_at=_aware(volume.updated_at) or created,
        availability_zone=volume.availability_zone or "nova",
    )
