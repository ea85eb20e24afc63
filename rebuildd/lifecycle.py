"""The other server pipelines: build (create), stop, start and delete.

Owns their api stages (checks, then the compare-and-swap that records the instance action)
and their compute steps, run on the same :class:`~rebuildd.runner.Runner` as a rebuild, so a
rebuild and a stop/start/delete of one server can never interleave: each needs
``task_state`` None to begin. Imports only ports and pure modules.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import secrets
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from rebuildd import boot_volumes, configdrive, domxml, errors, guestdisks, imageprops
from rebuildd.models import (
    BlockDevice,
    Flavor,
    Image,
    InstanceAction,
    NewAction,
    RequestContext,
    Server,
    utcnow,
)
from rebuildd.pipeline import (
    UNSET,
    Deps,
    Unset,
    domain_metadata,
    generate_password,
    lookup_keypair,
    shutdown_timeout,
)
from rebuildd.rebuild_checks import check_image_fits
from rebuildd.runner import Job, Outcome, Stage, Step
from rebuildd.states import PowerState, TaskState, VmState

# How long a server stays in a task_state no job holds before a delete may take it.
STUCK_AFTER: Final = dt.timedelta(seconds=5)


@dataclass(frozen=True, slots=True)
class DomainSettings:
    """How new domains look on this host (from the settings)."""

    domain_type: str
    name_prefix: str
    interface: str
    network: str
    ephemeral_format: str = "ext4"  # a filesystem for ephemeral disks, or "none"
    force_config_drive: bool = False  # every new server gets a config drive
    console_log_dir: str | None = None  # new domains log their serial console there


@dataclass(frozen=True, slots=True)
class CreateSpec:
    name: str
    image_ref: str
    flavor_ref: str
    admin_pass: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    key_name: str | None = None
    user_data: str | None = None
    description: str | Unset | None = UNSET
    access_ip_v4: str = ""
    access_ip_v6: str = ""
    auto_disk_config: bool = False
    config_drive: bool = False
    trusted_certs: tuple[str, ...] | None = None  # 2.63+
    hostname: str | None = None  # 2.90+; else derived from the name, as Nova does
    block_devices: tuple[boot_volumes.Mapping, ...] = ()  # block_device_mapping_v2 volumes


@dataclass(frozen=True, slots=True)
class ServerContext:
    """Context of build/stop/start/delete: the server as the api stage left it."""

    deps: Deps
    request: RequestContext
    server: Server
    image: Image | None = None
    devices: tuple[BlockDevice, ...] = ()  # a new server's local disks, root first
    domain: DomainSettings | None = None
    # Only in memory: a create interrupted by a restart ends in ERROR (as Nova's), never resumes.
    admin_pass: str | None = None
    mac: str | None = None
    facts: boot_volumes.BuildFacts = field(default_factory=boot_volumes.BuildFacts)


# -- create ------------------------------------------------------------------------------------


async def request_create(
    deps: Deps, domain: DomainSettings, request: RequestContext, spec: CreateSpec
) -> tuple[Server, str]:
    """Nova's ``API.create`` for one server booted from an image on this host."""
    deps.runner.check_accepting()
    deps.policy.authorize("os_compute_api:servers:create", request, request.project_id)
    if spec.trusted_certs is not None:
        deps.policy.authorize(
            "os_compute_api:servers:create:trusted_certs", request, request.project_id
        )
    try:
        flavor = await deps.store.get_flavor(spec.flavor_ref)
    except errors.FlavorNotFound:
        raise errors.InvalidFlavorRef() from None
    volume_backed = boot_volumes.root_mapping(spec.block_devices) is not None
    image: Image | None
    if volume_backed:
        image = await boot_volumes.check(deps, request, spec.block_devices, spec.image_ref)
    else:
        if spec.block_devices:
            await boot_volumes.check(deps, request, spec.block_devices, spec.image_ref)
        image = await deps.images.get(request, spec.image_ref or "")
        if image is None:
            raise errors.ImageNotFoundForBuild()
    if image is not None:
        check_image_fits(image, flavor, volume_backed=volume_backed)
    key_name = key_data = None
    if spec.key_name is not None:
        keypair = await lookup_keypair(deps, request, spec.key_name)
        key_name, key_data = keypair.name, keypair.public_key
    admin_pass = spec.admin_pass if spec.admin_pass is not None else generate_password()
    server = _new_server(deps, domain, request, spec, flavor, image, key_name, key_data)
    if volume_backed:
        server = dataclasses.replace(server, image_ref="")  # how Nova marks it volume-backed
    devices = guestdisks.layout(
        server.id,
        flavor,
        image_id=image.id if image is not None and not volume_backed else None,
        config_drive=server.config_drive,
        ephemeral_format=domain.ephemeral_format,
        disks=deps.disks,
    )
    used = {d.device_name for d in devices}
    devices += boot_volumes.devices(server.id, spec.block_devices, used)
    devices.sort(key=lambda d: (d.boot_index != 0, d.device_name))
    action = NewAction(
        "create",
        request.request_id,
        request.user_id,
        request.project_id,
        params={"image_id": image.id if image else "", "root_bdm_id": devices[0].id},
    )
    await deps.store.create_server(server, devices, action)
    ctx = ServerContext(
        deps=deps,
        request=request,
        server=server,
        image=image,
        devices=tuple(devices),
        domain=domain,
        admin_pass=admin_pass,
        mac=new_mac() if domain.interface != "none" else None,
    )
    deps.runner.submit(_build_job(ctx))
    return server, admin_pass


def _new_server(
    deps: Deps,
    domain: DomainSettings,
    request: RequestContext,
    spec: CreateSpec,
    flavor: Flavor,
    image: Image | None,
    key_name: str | None,
    key_data: str | None,
) -> Server:
    server_id = str(uuid.uuid4())
    now = utcnow()
    return Server(
        id=server_id,
        name=spec.name,
        project_id=request.project_id,
        user_id=request.user_id,
        image_ref=image.id if image is not None else "",
        flavor=flavor,
        vm_state=VmState.BUILDING,
        task_state=TaskState.SCHEDULING,
        power_state=PowerState.NOSTATE,
        host=deps.host,
        node=deps.host,
        domain_name=f"{domain.name_prefix}{server_id}",
        hostname=spec.hostname or hostname_for(spec.name, server_id),
        metadata=dict(spec.metadata),
        key_name=key_name,
        key_data=key_data,
        user_data=spec.user_data,
        description=None if isinstance(spec.description, Unset) else spec.description,
        access_ip_v4=spec.access_ip_v4,
        access_ip_v6=spec.access_ip_v6,
        auto_disk_config=spec.auto_disk_config,
        locked=False,
        locked_reason=None,
        config_drive=spec.config_drive or domain.force_config_drive,
        progress=0,
        launched_at=None,
        terminated_at=None,
        created_at=now,
        updated_at=now,
        image_properties=imageprops.kept(image.properties) if image is not None else {},
        trusted_certs=spec.trusted_certs,
    )


def hostname_for(name: str, server_id: str) -> str:
    """Nova's sanitize_hostname: lower-case letters, digits and dashes, at most 63."""
    cleaned = "".join(c if c.isalnum() and c.isascii() else "-" for c in name.lower())
    cleaned = "-".join(part for part in cleaned.split("-") if part)[:63].strip("-")
    return cleaned or f"server-{server_id}"


def _build_job(ctx: ServerContext) -> Job[ServerContext]:
    compute = Stage(
        event="compute__do_build_and_run_instance",
        notify_start="instance.create.start",
        notify_end="instance.create.end",
        notify_error="instance.create.error",
        steps=_build_steps(volumes=bool(boot_volumes.volumes_of(ctx.devices))),
    )
    return Job(
        action="create",
        request=ctx.request,
        server_id=ctx.server.id,
        task_state=TaskState.SCHEDULING,
        stages=(compute,),
        context=ctx,
        facts=ctx.facts,
        succeed=_running,
        fail=_build_failed,
    )


def _build_steps(*, volumes: bool) -> tuple[Step[ServerContext], ...]:
    """The build's compute steps; the volume work only for a server with volumes (a step with
    an undo costs a journal write even when it has nothing to do)."""
    mapping: Step[ServerContext] = Step(
        "block_device_mapping", task_state=TaskState.BLOCK_DEVICE_MAPPING
    )
    if volumes:
        mapping = dataclasses.replace(
            mapping, run=boot_volumes.prepare, undo=boot_volumes.undo_prepare
        )
    steps = [
        mapping,
        Step("create_local_disks", task_state=TaskState.SPAWNING, run=_create_disks,
             undo=_remove_root),
        Step("define_domain", run=_define, undo=_undefine),
        Step("complete_volume_attachments", run=boot_volumes.complete) if volumes else None,
        Step("start_domain", run=_start, undo=_destroy),
    ]  # fmt: skip
    return tuple(step for step in steps if step is not None)


async def _create_disks(ctx: ServerContext) -> None:
    local_root = any(guestdisks.kind(d) == "root" for d in ctx.devices)
    assert ctx.image is not None or not local_root
    contents = guestdisks.Contents(
        server=ctx.server,
        image=ctx.image,
        base=await ctx.deps.cache.ensure(ctx.image) if ctx.image and local_root else Path(),
        admin_pass=ctx.admin_pass,
        personality=(),
        nics=(configdrive.Nic(mac=ctx.mac, interface_type=ctx.domain.interface),)
        if ctx.mac and ctx.domain
        else (),
    )
    for device in ctx.devices:
        if guestdisks.kind(device) != "other":
            assert device.path is not None
            await guestdisks.create(ctx.deps.disks, device, Path(device.path), contents)


def new_mac() -> str:
    """A MAC under Nova's fa:16:3e prefix, known before the domain is defined (the config
    drive's network_data.json names it)."""
    tail = secrets.token_bytes(3)
    return "fa:16:3e:" + ":".join(f"{b:02x}" for b in tail)


async def _remove_root(ctx: ServerContext) -> None:
    await ctx.deps.disks.remove_instance_dir(ctx.server.id)


async def _remove_disks(ctx: ServerContext) -> None:
    """The server's own disk files, wherever they are (an adopted domain's may live outside
    the instance directory); disks rebuildd does not own and volumes stay."""
    for device in await ctx.deps.store.get_block_devices(ctx.server.id):
        if guestdisks.kind(device) != "other" and device.path:
            await ctx.deps.disks.remove(Path(device.path))
    await ctx.deps.disks.remove_instance_dir(ctx.server.id)


async def _define(ctx: ServerContext) -> None:
    assert ctx.domain is not None
    disks: tuple[domxml.DiskSpec | domxml.Element, ...] = (
        *_local_disk_specs(ctx),
        *boot_volumes.disks(ctx),
    )
    spec = _domain_spec(ctx.server, ctx.domain, disks, mac=ctx.mac)
    await ctx.deps.hypervisor.define(domxml.to_string(domxml.build_domain(spec)))


def _domain_spec(
    server: Server,
    domain: DomainSettings,
    disks: tuple[domxml.DiskSpec | domxml.Element, ...],
    *,
    mac: str | None = None,
) -> domxml.DomainSpec:
    """The domain of ``server`` on this host, with ``disks`` (``mac``: libvirt's choice if
    None)."""
    return domxml.DomainSpec(
        name=server.domain_name,
        uuid=server.id,
        domain_type=domain.domain_type,
        memory_mib=server.flavor.ram,
        vcpus=server.flavor.vcpus,
        disks=disks,
        interface=domain.interface,  # type: ignore[arg-type]
        network=domain.network,
        mac=mac,
        metadata=domain_metadata(server, server.image_ref),
        console_log=f"{domain.console_log_dir}/{server.domain_name}.log"
        if domain.console_log_dir
        else None,
    )


async def define_anew(deps: Deps, domain: DomainSettings, server: Server) -> None:
    """Define a server's domain again from the database alone, as Nova's hard reboot
    regenerates it: its flavor, its local disks where the database says they are, its volumes
    from their saved connection_info. What the database does not keep (the MAC address) is
    libvirt's choice. For a domain undefined behind rebuildd's back, or forgotten by the test
    driver when the daemon restarted."""
    devices = await deps.store.get_block_devices(server.id)
    disks: list[domxml.DiskSpec | domxml.Element] = [
        guestdisks.disk_spec(d, d.path) for d in devices if guestdisks.kind(d) != "other" and d.path
    ]
    disks += [
        domxml.volume_disk(d.device_name, d.connection_info, volume_id=d.volume_id, bus=d.disk_bus)
        for d in boot_volumes.volumes_of(tuple(devices))
        if d.connection_info and d.volume_id
    ]
    spec = _domain_spec(server, domain, tuple(disks))
    await deps.hypervisor.define(domxml.to_string(domxml.build_domain(spec)))


async def _power_state(ctx: ServerContext) -> int:
    """The domain's power state; NOSTATE when it is gone (Nova's sync records it so)."""
    state = await ctx.deps.hypervisor.find(ctx.server.domain_name)
    return PowerState.NOSTATE if state is None else state


def _local_disk_specs(ctx: ServerContext) -> list[domxml.DiskSpec]:
    return [
        guestdisks.disk_spec(d, d.path or "") for d in ctx.devices if guestdisks.kind(d) != "other"
    ]


async def _undefine(ctx: ServerContext) -> None:
    await ctx.deps.hypervisor.undefine(ctx.server.domain_name)


async def _start(ctx: ServerContext) -> None:
    hypervisor, name = ctx.deps.hypervisor, ctx.server.domain_name
    if ctx.deps.redefine is not None and await hypervisor.find(name) is None:
        await ctx.deps.redefine(ctx.server)
    await hypervisor.start(name)


async def _destroy(ctx: ServerContext) -> None:
    await ctx.deps.hypervisor.destroy(ctx.server.domain_name)


async def _running(ctx: ServerContext) -> Outcome:
    power = await ctx.deps.hypervisor.power_state(ctx.server.domain_name)
    return Outcome(
        {"vm_state": VmState.ACTIVE, "power_state": power, "launched_at": utcnow()},
        block_device_changes=boot_volumes.built(ctx),
    )


async def _build_failed(ctx: ServerContext, rolled_back: bool) -> Outcome:
    return Outcome({"vm_state": VmState.ERROR, "power_state": PowerState.NOSTATE})


# -- stop, start, delete -------------------------------------------------------------------------


async def request_power_action(
    deps: Deps, request: RequestContext, server_id: str, action: str
) -> Server:
    """``os-stop`` (from active or error) and ``os-start`` (from stopped), as Nova checks them."""
    vm_states: tuple[str, ...]
    if action == "stop":
        vm_states, task_state, job_factory = (
            (VmState.ACTIVE, VmState.ERROR),
            TaskState.POWERING_OFF,
            _stop_job,
        )
    else:
        vm_states, task_state, job_factory = (VmState.STOPPED,), TaskState.POWERING_ON, _start_job
    server = await _begin(deps, request, server_id, action, vm_states, task_state)
    deps.runner.submit(job_factory(ServerContext(deps=deps, request=request, server=server)))
    return server


async def request_delete(deps: Deps, request: RequestContext, server_id: str) -> Server:
    """Delete from any vm_state, as Nova does. A server left in a task_state that no job of
    this process holds (its job ended without clearing it), unchanged for ``STUCK_AFTER``,
    is stuck: its delete takes the
    server from that task_state (Nova's delete of a BUILD or ERROR server likewise goes
    ahead whatever the task), and the abandoned action and its events end as failed. A server
    a job holds answers 409 until that job ends."""
    vm_states = (VmState.ACTIVE, VmState.STOPPED, VmState.ERROR, VmState.BUILDING)
    server = await _begin(
        deps, request, server_id, "delete", vm_states, TaskState.DELETING, force_stuck=True
    )
    deps.runner.submit(_delete_job(ServerContext(deps=deps, request=request, server=server)))
    return server


async def _begin(
    deps: Deps,
    request: RequestContext,
    server_id: str,
    action: str,
    vm_states: tuple[str, ...],
    task_state: str,
    *,
    force_stuck: bool = False,
) -> Server:
    deps.runner.check_accepting()
    project = None if request.is_admin else request.project_id
    server = await deps.store.get_server(server_id, project_id=project)
    deps.policy.authorize(f"os_compute_api:servers:{action}", request, server.project_id)
    if server.locked and not request.is_admin:
        raise errors.InstanceIsLocked(server_id=server.id)
    expected: tuple[str | None, ...] = (None,)
    stuck = (
        force_stuck
        and server.task_state is not None
        and not deps.runner.owns(server.id)
        # An api stage commits the task_state a moment before its job is submitted.
        and utcnow() - server.updated_at > STUCK_AFTER
    )
    if stuck:
        expected = (server.task_state,)
    begun = await deps.store.transition(
        server.id,
        action=action,
        expected_task_state=expected,
        expected_vm_state=vm_states,
        task_state=task_state,
        new_action=NewAction(
            action, request.request_id, request.user_id, request.project_id, params={}
        ),
    )
    if stuck:
        await deps.store.abandon_actions(
            server.id, keep=request.request_id, reason=f"Superseded by {action}"
        )
    return begun


def _single_stage_job(
    ctx: ServerContext,
    *,
    action: str,
    event: str,
    notification: str,
    task_state: str,
    steps: tuple[Step[ServerContext], ...],
    succeed: Any,
    fail: Any,
) -> Job[ServerContext]:
    stage = Stage(
        event=event,
        steps=steps,
        notify_start=f"{notification}.start",
        notify_end=f"{notification}.end",
        notify_error=f"{notification}.error" if action == "delete" else None,
    )
    return Job(
        action=action,
        request=ctx.request,
        server_id=ctx.server.id,
        task_state=task_state,
        stages=(stage,),
        context=ctx,
        facts=ctx.facts,
        succeed=succeed,
        fail=fail,
        # Stopping, starting and deleting again are idempotent: finish them after a crash.
        resume_forward=lambda _done: True,
    )


def _stop_job(ctx: ServerContext) -> Job[ServerContext]:
    return _single_stage_job(
        ctx,
        action="stop",
        event="compute_stop_instance",
        notification="instance.power_off",
        task_state=TaskState.POWERING_OFF,
        steps=(Step("power_off", run=_power_off),),
        succeed=_stopped,
        fail=_unchanged,
    )


def _start_job(ctx: ServerContext) -> Job[ServerContext]:
    return _single_stage_job(
        ctx,
        action="start",
        event="compute_start_instance",
        notification="instance.power_on",
        task_state=TaskState.POWERING_ON,
        steps=(Step("start_domain", run=_start, undo=_destroy),),
        succeed=_running_again,
        fail=_unchanged,
    )


def _delete_job(ctx: ServerContext) -> Job[ServerContext]:
    return _single_stage_job(
        ctx,
        action="delete",
        event="compute_terminate_instance",
        notification="instance.delete",
        task_state=TaskState.DELETING,
        steps=(
            Step("undefine_domain", run=_undefine),
            Step("release_volumes", run=boot_volumes.release),
            Step("remove_disks", run=_remove_disks),
        ),
        succeed=_deleted,
        fail=_delete_failed,
    )


async def _power_off(ctx: ServerContext) -> None:
    timeout = shutdown_timeout(ctx.server, ctx.deps.shutdown_timeout)
    await ctx.deps.hypervisor.power_off(ctx.server.domain_name, timeout=timeout)


async def _stopped(ctx: ServerContext) -> Outcome:
    return Outcome({"vm_state": VmState.STOPPED, "power_state": await _power_state(ctx)})


async def _running_again(ctx: ServerContext) -> Outcome:
    power = await ctx.deps.hypervisor.power_state(ctx.server.domain_name)
    return Outcome({"vm_state": VmState.ACTIVE, "power_state": power})


async def _unchanged(ctx: ServerContext, rolled_back: bool) -> Outcome:
    return Outcome({"power_state": await _power_state(ctx)})


async def _deleted(ctx: ServerContext) -> Outcome:
    now = utcnow()
    return Outcome(
        {
            "vm_state": VmState.DELETED,
            "power_state": PowerState.NOSTATE,
            "deleted": True,
            "deleted_at": now,
            "terminated_at": now,
        }
    )


async def _delete_failed(ctx: ServerContext, rolled_back: bool) -> Outcome:
    return Outcome({"vm_state": VmState.ERROR})


# -- resuming after a crash ------------------------------------------------------------------


async def job_from_action(
    deps: Deps, domain: DomainSettings, action: InstanceAction, server: Server
) -> Job[ServerContext]:
    """The job of a create/stop/start/delete a previous process left in flight."""
    request = RequestContext(action.request_id, action.user_id, action.project_id)
    ctx = ServerContext(deps=deps, request=request, server=server, domain=domain)
    if action.action == "create":
        params = action.job_params or {}
        devices = await deps.store.get_block_devices(server.id)
        image = await deps.images.get(None, params.get("image_id", ""))
        facts = boot_volumes.BuildFacts.from_dict((action.journal or {}).get("facts", {}))
        return _build_job(
            dataclasses.replace(ctx, devices=tuple(devices), image=image, facts=facts)
        )
    factories = {"stop": _stop_job, "start": _start_job, "delete": _delete_job}
    return factories[action.action](ctx)


# -- lock and unlock -------------------------------------------------------------------------


async def request_lock(
    deps: Deps, request: RequestContext, server_id: str, *, locked: bool, reason: str | None
) -> None:
    """Nova's lock/unlock: a lock records who set it (owner or admin); only an admin may lift
    a lock an admin set (``unlock_override``). Locks stop non-admin actions, not admins'."""
    project = None if request.is_admin else request.project_id
    server = await deps.store.get_server(server_id, project_id=project)
    action = "lock" if locked else "unlock"
    deps.policy.authorize(f"os_compute_api:os-lock-server:{action}", request, server.project_id)
    if not locked and server.locked_by == "admin":
        deps.policy.authorize(
            "os_compute_api:os-lock-server:unlock:unlock_override", request, server.project_id
        )
    by = ("owner" if request.project_id == server.project_id else "admin") if locked else None
    await deps.store.set_lock(
        server.id,
        locked=locked,
        reason=reason if locked else None,
        by=by,
        action=NewAction(action, request.request_id, request.user_id, request.project_id),
    )


# os-resetState's states (Nova's admin_actions.state_map).
RESET_STATES: Final = {"active": VmState.ACTIVE, "error": VmState.ERROR}


async def request_reset_state(
    deps: Deps, request: RequestContext, server_id: str, state: str
) -> Server:
    """Nova's ``os-resetState`` (admin by default): the vm_state set to ``state``, the
    task_state cleared, a finished ``resetState`` action recorded. Unlike Nova, a server a job
    of this process still holds (or whose task_state was set a moment ago, its job about to
    start) answers 409: clearing its task_state would let a second job run on the same
    domain and disks while the first one still works on them."""
    project = None if request.is_admin else request.project_id
    server = await deps.store.get_server(server_id, project_id=project)
    deps.policy.authorize("os_compute_api:os-admin-actions:reset_state", request, server.project_id)
    busy = server.task_state is not None and (
        deps.runner.owns(server.id) or utcnow() - server.updated_at <= STUCK_AFTER
    )
    if busy:
        raise errors.InstanceInvalidState(
            action="os-resetState",
            server_id=server.id,
            attr="task_state",
            state=server.task_state,
        )
    reset = await deps.store.transition(
        server.id,
        action="os-resetState",
        expected_task_state=(server.task_state,),
        task_state=None,
        changes={"vm_state": RESET_STATES[state]},
    )
    if server.task_state is not None:
        await deps.store.abandon_actions(
            server.id, keep=request.request_id, reason="Superseded by os-resetState"
        )
    await deps.store.add_finished_action(
        server.id,
        NewAction("resetState", request.request_id, request.user_id, request.project_id),
        (),
    )
    return reset
