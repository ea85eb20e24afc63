"""Attaching a volume to a server and detaching it: Nova's ``API.attach_volume`` /
``detach_volume`` (api stage) and the compute manager's side (a job on the Runner).

Owns the order of a volume attach — Cinder ``attachment_create`` (reserve) in the request, then
in the job ``attachment_update`` with this host's connector (-> connection_info), the ``<disk>``
into the domain (live when it runs), ``attachment_complete`` — and of a detach — the disk out
of the domain (live, verified), ``attachment_delete`` — each step with its undo, so a failure
leaves the server and the volume as they were.

Why a job with a task_state, where Nova only takes a lock: a rebuild, stop, start or delete of
a server needs its task_state to be None and takes it with the Store's compare-and-swap, so
holding ``attaching_volume``/``detaching_volume`` for the attach or detach is what guarantees
that they never interleave with one (the loser gets 409), in this process or any other sharing
the database, and the journal makes an attach interrupted by a crash roll back (a detach whose
disk is out rolls forward). Imports only ports and pure modules.
"""

from __future__ import annotations

import contextlib
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Final

from rebuildd import domxml, errors
from rebuildd.connector import host_connector
from rebuildd.models import BlockDevice, InstanceAction, NewAction, RequestContext, Server
from rebuildd.pipeline import Deps
from rebuildd.runner import Job, Outcome, Stage, Step
from rebuildd.states import TaskState, VmState
from rebuildd.volumestore import VolumeStore

# Nova's check_instance_state for attach_volume / detach_volume, as far as rebuildd has states.
ATTACHABLE_VM_STATES: Final = (VmState.ACTIVE, VmState.STOPPED)
_DEVICE: Final = re.compile(r"^(?:/dev/)?(vd[a-z])$")


@dataclass(frozen=True, slots=True)
class AttachSpec:
    volume_id: str
    device: str | None = None  # "/dev/vdX"; None: the next free one
    tag: str | None = None  # 2.49+
    delete_on_termination: bool = False  # 2.79+


@dataclass(slots=True)
class VolumeFacts:
    """What the job's steps learn: the connection_info of the attachment."""

    connection_info: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"connection_info": self.connection_info}


@dataclass(frozen=True, slots=True)
class VolumeContext:
    deps: Deps
    volumes: VolumeStore
    request: RequestContext
    server: Server
    device: BlockDevice  # the volume's mapping (attachment_id set)
    facts: VolumeFacts = field(default_factory=VolumeFacts)


def next_device(devices: list[BlockDevice], requested: str | None) -> str:
    """Nova's ``get_next_device_name``: the requested ``/dev/vdX`` if free, else the first
    ``vd*`` no disk of the server uses."""
    used = {d.device_name for d in devices}
    if requested is not None:
        match = _DEVICE.match(requested)
        if match is None:
            raise errors.InvalidDevicePath(path=requested)
        if match.group(1) in used:
            raise errors.DevicePathInUse(path=requested)
        return match.group(1)
    for letter in "bcdefghijklmnopqrstuvwxyz":
        if f"vd{letter}" not in used:
            return f"vd{letter}"
    raise errors.InvalidDevicePath(path="/dev/vd*")


# -- attach --------------------------------------------------------------------------------------


async def request_attach(
    deps: Deps, volumes: VolumeStore, request: RequestContext, server_id: str, spec: AttachSpec
) -> BlockDevice:
    """Nova's ``API.attach_volume``: checks, the Cinder reservation (a 400 if the volume cannot
    be reserved), then the compare-and-swap that holds the server; the job does the rest."""
    server = await _server_for(deps, request, server_id, "os-volumes-attachments:create")
    volume = await deps.volumes.get(spec.volume_id)
    if volume is None or (not request.is_admin and volume.project_id != request.project_id):
        raise errors.VolumeNotFound(volume_id=spec.volume_id)
    devices = await deps.store.get_block_devices(server.id)
    if any(d.volume_id == volume.id for d in devices):
        raise errors.InvalidVolume(reason=f"volume {volume.id} already attached")
    target = next_device(devices, spec.device)
    _check_state(server, "attach_volume")
    attachment = await deps.volumes.attachment_create(volume.id, server.id)
    device = BlockDevice(
        id=str(uuid.uuid4()),
        server_id=server.id,
        boot_index=None,
        source_type="volume",
        destination_type="volume",
        device_name=target,
        image_id=None,
        volume_id=volume.id,
        path=None,
        disk_bus="virtio",
        device_type="disk",
        attachment_id=attachment.id,
        delete_on_termination=spec.delete_on_termination,
        tag=spec.tag,
    )
    try:
        server = await _hold(deps, request, server, "attach_volume", device)
    except BaseException:
        await deps.volumes.attachment_delete(attachment.id)
        raise
    await volumes.add_block_device(device)
    ctx = VolumeContext(deps=deps, volumes=volumes, request=request, server=server, device=device)
    deps.runner.submit(_attach_job(ctx))
    return device


def _attach_job(ctx: VolumeContext) -> Job[VolumeContext]:
    stage = Stage(
        event="compute_attach_volume",
        notify_start="instance.volume_attach.start",
        notify_end="instance.volume_attach.end",
        notify_error="instance.volume_attach.error",
        steps=(
            # Its undo (release the reservation, forget the mapping) runs on any failure.
            Step("reserve_volume", undo=_release),
            Step("connect_volume", run=_connect),
            Step("attach_disk", run=_attach_disk, undo=_detach_disk),
            Step("complete_attachment", run=_complete),
        ),
    )
    return _job(ctx, "attach_volume", TaskState.ATTACHING_VOLUME, stage, _attached)


async def _connect(ctx: VolumeContext) -> None:
    assert ctx.device.attachment_id is not None
    attachment = await ctx.deps.volumes.attachment_update(
        ctx.device.attachment_id,
        host_connector(ctx.deps.host),
        mountpoint=f"/dev/{ctx.device.device_name}",
    )
    ctx.facts.connection_info = attachment.connection_info


async def _attach_disk(ctx: VolumeContext) -> None:
    assert ctx.facts.connection_info is not None and ctx.device.volume_id is not None
    disk = domxml.volume_disk(
        ctx.device.device_name, ctx.facts.connection_info, volume_id=ctx.device.volume_id
    )
    await ctx.deps.hypervisor.attach_device(ctx.server.domain_name, domxml.to_string(disk))


async def _detach_disk(ctx: VolumeContext) -> None:
    await ctx.deps.hypervisor.detach_device(ctx.server.domain_name, ctx.device.device_name)


async def _complete(ctx: VolumeContext) -> None:
    assert ctx.device.attachment_id is not None
    await ctx.deps.volumes.attachment_complete(ctx.device.attachment_id)


async def _release(ctx: VolumeContext) -> None:
    assert ctx.device.attachment_id is not None
    # Already released when an undo ran before a crash.
    with contextlib.suppress(errors.VolumeAttachmentNotFound):
        await ctx.deps.volumes.attachment_delete(ctx.device.attachment_id)
    await ctx.volumes.remove_block_device(ctx.server.id, ctx.device.id)


async def _attached(ctx: VolumeContext) -> Outcome:
    """The mapping gets its connection_info in the job's last transaction."""
    power = await ctx.deps.hypervisor.power_state(ctx.server.domain_name)
    return Outcome(
        {"power_state": power},
        block_device_changes={ctx.device.id: {"connection_info": ctx.facts.connection_info}},
    )


# -- detach --------------------------------------------------------------------------------------


async def request_detach(
    deps: Deps, volumes: VolumeStore, request: RequestContext, server_id: str, volume_id: str
) -> None:
    """Nova's ``API.detach_volume``: 404 unless the server has the volume, 400 for its root."""
    server = await _server_for(deps, request, server_id, "os-volumes-attachments:delete")
    device = volume_device(await deps.store.get_block_devices(server.id), volume_id)
    if device.boot_index == 0:
        raise errors.Invalid("Cannot detach a root device volume")
    _check_state(server, "detach_volume")
    server = await _hold(deps, request, server, "detach_volume", device)
    ctx = VolumeContext(deps=deps, volumes=volumes, request=request, server=server, device=device)
    deps.runner.submit(_detach_job(ctx))


def volume_device(devices: list[BlockDevice], volume_id: str) -> BlockDevice:
    for device in devices:
        if device.destination_type == "volume" and device.volume_id == volume_id:
            return device
    raise errors.VolumeBDMNotFound(volume_id=volume_id)


def _detach_job(ctx: VolumeContext) -> Job[VolumeContext]:
    stage = Stage(
        event="compute_detach_volume",
        notify_start="instance.volume_detach.start",
        notify_end="instance.volume_detach.end",
        notify_error="instance.volume_detach.error",
        steps=(
            Step("detach_disk", run=_detach_disk, undo=_reattach_disk),
            Step("delete_attachment", run=_forget),
        ),
    )
    return _job(
        ctx,
        "detach_volume",
        TaskState.DETACHING_VOLUME,
        stage,
        _detached,
        resume_forward=lambda done: "detach_disk" in done,
    )


async def _reattach_disk(ctx: VolumeContext) -> None:
    info = ctx.device.connection_info
    if info is None or ctx.device.volume_id is None:
        return
    disk = domxml.volume_disk(ctx.device.device_name, info, volume_id=ctx.device.volume_id)
    await ctx.deps.hypervisor.attach_device(ctx.server.domain_name, domxml.to_string(disk))


async def _forget(ctx: VolumeContext) -> None:
    """The attachment goes (the volume ``available`` when it was the last), then the mapping;
    both idempotent, so a crash in between rolls forward."""
    if ctx.device.attachment_id is not None:
        with contextlib.suppress(errors.VolumeAttachmentNotFound):
            await ctx.deps.volumes.attachment_delete(ctx.device.attachment_id)
    await ctx.volumes.remove_block_device(ctx.server.id, ctx.device.id)


async def _detached(ctx: VolumeContext) -> Outcome:
    power = await ctx.deps.hypervisor.power_state(ctx.server.domain_name)
    return Outcome({"power_state": power})


# -- shared ----------------------------------------------------------------------------------------


async def _server_for(deps: Deps, request: RequestContext, server_id: str, rule: str) -> Server:
    deps.runner.check_accepting()
    project = None if request.is_admin else request.project_id
    server = await deps.store.get_server(server_id, project_id=project)
    deps.policy.authorize(f"os_compute_api:{rule}", request, server.project_id)
    if server.locked and not request.is_admin:
        raise errors.InstanceIsLocked(server_id=server.id)
    return server


def _check_state(server: Server, action: str) -> None:
    """Nova's ``check_instance_state`` before anything is reserved (the swap re-checks)."""
    if server.vm_state not in ATTACHABLE_VM_STATES:
        raise errors.InstanceInvalidState(
            action=action, server_id=server.id, attr="vm_state", state=server.vm_state
        )
    if server.task_state is not None:
        raise errors.InstanceInvalidState(
            action=action, server_id=server.id, attr="task_state", state=server.task_state
        )


async def _hold(
    deps: Deps, request: RequestContext, server: Server, action: str, device: BlockDevice
) -> Server:
    task_state = (
        TaskState.ATTACHING_VOLUME if action == "attach_volume" else TaskState.DETACHING_VOLUME
    )
    return await deps.store.transition(
        server.id,
        action=action,
        expected_task_state=(None,),
        expected_vm_state=ATTACHABLE_VM_STATES,
        task_state=task_state,
        new_action=NewAction(
            action,
            request.request_id,
            request.user_id,
            request.project_id,
            params={"device": _device_params(device)},
        ),
    )


def _device_params(device: BlockDevice) -> dict[str, Any]:
    return {
        "id": device.id,
        "volume_id": device.volume_id,
        "attachment_id": device.attachment_id,
        "device_name": device.device_name,
        "connection_info": device.connection_info,
        "delete_on_termination": device.delete_on_termination,
        "tag": device.tag,
    }


def _job(
    ctx: VolumeContext,
    action: str,
    task_state: str,
    stage: Stage[VolumeContext],
    succeed: Any,
    *,
    resume_forward: Any = None,
) -> Job[VolumeContext]:
    return Job(
        action=action,
        request=ctx.request,
        server_id=ctx.server.id,
        task_state=task_state,
        stages=(stage,),
        context=ctx,
        facts=ctx.facts,
        succeed=succeed,
        fail=_unchanged,
        resume_forward=resume_forward or (lambda _done: False),
    )


async def _unchanged(ctx: VolumeContext, rolled_back: bool) -> Outcome:
    power = await ctx.deps.hypervisor.power_state(ctx.server.domain_name)
    return Outcome({"power_state": power})


# -- resuming after a crash --------------------------------------------------------------------


ACTIONS: Final = frozenset({"attach_volume", "detach_volume"})


def job_from_action(
    deps: Deps, volumes: VolumeStore, action: InstanceAction, server: Server
) -> Job[VolumeContext]:
    """The job of an attach or detach a previous process left in flight."""
    params = (action.job_params or {})["device"]
    device = BlockDevice(
        id=params["id"],
        server_id=server.id,
        boot_index=None,
        source_type="volume",
        destination_type="volume",
        device_name=params["device_name"],
        image_id=None,
        volume_id=params["volume_id"],
        path=None,
        disk_bus="virtio",
        device_type="disk",
        attachment_id=params["attachment_id"],
        connection_info=params["connection_info"],
        delete_on_termination=params["delete_on_termination"],
        tag=params["tag"],
    )
    facts = VolumeFacts(**((action.journal or {}).get("facts") or {}))
    request = RequestContext(action.request_id, action.user_id, action.project_id)
    ctx = VolumeContext(
        deps=deps, volumes=volumes, request=request, server=server, device=device, facts=facts
    )
    return _attach_job(ctx) if action.action == "attach_volume" else _detach_job(ctx)
