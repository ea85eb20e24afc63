"""The ports the pipeline talks through (typing.Protocol), so it imports no SQL, libvirt or HTTP.

Owns the interfaces only. Implementations: storage.Store, hypervisor.LibvirtHypervisor,
images.LocalImageService / images.ImageCache, disks.DiskManager, notifications.Notifier,
volumes.LocalVolumeService.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from rebuildd import configdrive, domxml
from rebuildd.models import (
    ActionEvent,
    BlockDevice,
    Fault,
    Flavor,
    Image,
    InstanceAction,
    KeyPair,
    NewAction,
    Notification,
    RequestContext,
    Server,
    Volume,
    VolumeAttachment,
)


class Store(Protocol):
    async def get_server(
        self, server_id: str, *, project_id: str | None = None, include_deleted: bool = False
    ) -> Server: ...

    async def create_server(
        self, server: Server, block_devices: Sequence[BlockDevice], action: NewAction
    ) -> Server: ...

    async def transition(
        self,
        server_id: str,
        *,
        action: str,
        expected_task_state: Collection[str | None],
        task_state: str | None,
        expected_vm_state: Collection[str] | None = None,
        changes: Mapping[str, Any] | None = None,
        new_action: NewAction | None = None,
        fault: Fault | None = None,
        block_device_changes: Mapping[str, Mapping[str, Any]] | None = None,
        job: tuple[str, str] | None = None,
    ) -> Server: ...

    async def save_journal(self, request_id: str, journal: dict[str, Any]) -> None: ...

    async def in_flight_actions(self) -> list[InstanceAction]: ...

    async def set_job_state(self, request_id: str, job_state: str) -> None: ...

    async def abandon_actions(self, server_id: str, *, keep: str, reason: str) -> int: ...

    async def get_block_devices(self, server_id: str) -> list[BlockDevice]: ...

    async def set_lock(
        self,
        server_id: str,
        *,
        locked: bool,
        reason: str | None,
        by: str | None,
        action: NewAction,
    ) -> None: ...

    async def add_finished_action(
        self, server_id: str, action: NewAction, events: Sequence[ActionEvent]
    ) -> None: ...

    async def get_flavor(self, flavor_id: str) -> Flavor: ...

    async def get_keypair(self, user_id: str, name: str) -> KeyPair | None: ...

    async def start_event(
        self,
        request_id: str,
        event_name: str,
        host: str,
        *,
        notifications: Sequence[Notification] = (),
        after: str | None = None,
    ) -> None: ...

    async def finish_event(
        self,
        request_id: str,
        event_name: str,
        *,
        result: str,
        traceback: str | None = None,
        details: str | None = None,
        finish_action: bool = False,
        notification: Notification | None = None,
    ) -> None: ...


class Hypervisor(Protocol):
    async def exists(self, name: str) -> bool: ...
    async def domain_xml(self, name: str, *, inactive: bool = True) -> str: ...
    async def power_state(self, name: str) -> int: ...
    async def find(self, name: str) -> int | None: ...  # power state; None: no such domain
    async def define(self, xml: str) -> None: ...
    async def start(self, name: str) -> int: ...  # the power state once started
    async def destroy(self, name: str) -> None: ...
    async def power_off(self, name: str, *, timeout: float) -> bool: ...
    async def undefine(self, name: str) -> None: ...
    async def disks_xml(self, name: str, targets: Sequence[str]) -> dict[str, str]: ...
    async def nics(self, name: str) -> list[tuple[str, str]]: ...
    async def detach_disks(self, name: str, targets: Sequence[str]) -> None: ...
    async def attach_disks(
        self,
        name: str,
        disks: Sequence[domxml.DiskSpec | str],
        *,
        metadata: domxml.Metadata | None = None,
    ) -> None: ...
    async def attach_device(self, name: str, disk_xml: str) -> None: ...
    async def detach_device(self, name: str, target: str) -> None: ...


class VolumeService(Protocol):
    """Cinder v3 volumes and attachments (3.44+), as Nova's compute uses them."""

    async def get(self, volume_id: str) -> Volume | None: ...

    async def attachment_create(
        self, volume_id: str, server_id: str, *, connector: Mapping[str, Any] | None = None
    ) -> VolumeAttachment: ...

    async def attachment_update(
        self, attachment_id: str, connector: Mapping[str, Any], *, mountpoint: str | None = None
    ) -> VolumeAttachment:
        """Returns the attachment with its connection_info."""
        ...

    async def attachment_complete(self, attachment_id: str) -> None: ...

    async def attachment_delete(self, attachment_id: str) -> None: ...

    async def create(
        self,
        context: RequestContext,
        *,
        size: int,
        name: str | None = None,
        image: Image | None = None,
        description: str | None = None,
    ) -> Volume:
        """Returns once the volume is available (or raises)."""
        ...

    async def delete(self, volume_id: str) -> None: ...

    async def reimage(self, volume_id: str, image: Image, *, reimage_reserved: bool) -> None:
        """Starts the re-image; its end is announced as ``volume-reimaged`` to the server's
        instance events (Cinder posts it; the local volumes deliver it before returning)."""
        ...


class ImageService(Protocol):
    """Image metadata and data (the local store, or Glance in a later backend)."""

    async def get(self, context: RequestContext | None, image_id: str) -> Image | None: ...

    async def download(self, image_id: str, dest: Path) -> None: ...


class ImageCache(Protocol):
    async def ensure(self, image: Image) -> Path: ...


class Disks(Protocol):
    def new_disk_path(self, server_id: str, kind: str) -> Path: ...

    async def create_blank(self, *, path: Path, size_mib: int, guest_format: str) -> None: ...

    async def create_config_drive(self, path: Path, data: configdrive.ConfigDriveData) -> None: ...

    async def create_overlay(
        self, *, base: Path, base_format: str, path: Path, size_bytes: int | None
    ) -> None: ...

    async def remove(self, path: Path) -> None: ...

    async def retire(self, path: Path) -> None: ...

    async def remove_instance_dir(self, server_id: str) -> None: ...


class Notifier(Protocol):
    def build(
        self,
        event_type: str,
        server: Server,
        *,
        context: RequestContext,
        priority: str = "INFO",
        extra: Mapping[str, Any] | None = None,
    ) -> Notification: ...


class StepObserver(Protocol):
    """Called at every step boundary of every pipeline job (test hooks, tracing)."""

    async def before_step(self, job: str, step: str, server_id: str) -> None: ...

    async def after_step(self, job: str, step: str, server_id: str) -> None: ...


class Authorizer(Protocol):
    """Nova's ``context.can``: raises Forbidden unless the named rule allows the caller."""

    def authorize(
        self, rule: str, context: RequestContext, target_project: str | None = None
    ) -> None: ...
