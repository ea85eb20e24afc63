"""The rebuild pipeline: Nova's api, conductor and compute stages as awaitable steps.

Owns what a rebuild does and in which order. The api stage (:func:`request_rebuild`) runs in
the request: checks in Nova's order, then one compare-and-swap ``task_state: None ->
rebuilding`` that records the instance action, all before the 202. The conductor and compute
stages run later on the :class:`~rebuildd.runner.Runner` as steps over a :class:`RebuildContext`.

The old root disk is never removed before the new domain has started: the new root disk is a
new file, the old ``<disk>`` element is kept in the journal, and removing the old file is a
cleanup step that runs only after success. On failure the runner undoes the steps newest first,
which puts the old disk and the domain's power state back; the server then ends in ERROR with a
fault that names the cause and says it was rolled back (``failed_rebuild_state`` "error", the
default: Nova's clients wait for ACTIVE or ERROR, so only ERROR tells them it failed), or in its
previous vm_state ("previous"). Only a rebuild does this: a failed stop or start leaves the
vm_state as it was (as Nova's do), a failed create is ERROR already. Restart recovery that
rolls a rebuild back applies the same rule, as it ends through the same ``_fail``.

This module imports no libvirt, lxml, httpx or SQL: only the ports.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import string
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import structlog

from rebuildd import configdrive, domxml, errors, guestdisks, imageprops, ports, rebuild_volumes
from rebuildd.instance_events import InstanceEvents
from rebuildd.models import (
    BlockDevice,
    Image,
    InstanceAction,
    KeyPair,
    NewAction,
    RequestContext,
    Server,
    utcnow,
)
from rebuildd.rebuild_checks import (
    REBUILDABLE_VM_STATES,
    check_image_fits,
    check_image_properties,
    check_quotas,
    check_rebuildable,
)
from rebuildd.runner import Job, Outcome, Runner, Stage, Step
from rebuildd.states import PowerState, TaskState, VmState

GiB: Final = 1024**3

log = structlog.get_logger("rebuildd.pipeline")


class Unset:
    """Marks a field the request did not send (distinct from an explicit null)."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Final = Unset()


@dataclass(frozen=True, slots=True)
class Deps:
    """The ports and host facts every pipeline needs."""

    store: ports.Store
    hypervisor: ports.Hypervisor
    images: ports.ImageService
    cache: ports.ImageCache
    disks: ports.Disks
    runner: Runner
    host: str
    shutdown_timeout: float
    policy: ports.Authorizer
    volumes: ports.VolumeService
    reimage_timeout_per_gb: float = 20.0  # Nova's reimage_timeout_per_gb
    # Where a rebuild rolled back leaves the server: "error" (ERROR, so clients' waits see
    # the failure) or "previous" (its vm_state before the rebuild).
    failed_rebuild_state: str = "error"
    instance_events: InstanceEvents = field(default_factory=InstanceEvents)
    # Defines a server's domain anew from the database, when libvirt no longer has it (Nova's
    # hard reboot regenerates the domain the same way); None: a vanished domain is an error.
    redefine: Callable[[Server], Awaitable[None]] | None = None


@dataclass(frozen=True, slots=True)
class RebuildSpec:
    """A validated rebuild request body (the API layer has already checked its shape)."""

    image_ref: str
    name: str | None = None
    admin_pass: str | None = None
    metadata: dict[str, str] | None = None
    preserve_ephemeral: bool = False
    auto_disk_config: bool | None = None
    access_ip_v4: str | None = None
    access_ip_v6: str | None = None
    description: str | Unset | None = UNSET
    key_name: str | Unset | None = UNSET
    personality: tuple[tuple[str, str], ...] = ()  # (path, base64 contents), up to 2.56
    user_data: str | Unset | None = UNSET  # 2.57+: omitted keeps it, null clears it
    hostname: str | None = None  # 2.90+
    # 2.63+: omitted keeps them, null clears them (stored and shown; see README on signatures)
    trusted_certs: tuple[str, ...] | Unset | None = UNSET
    reimage_boot_volume: bool = False  # 2.93+: a volume-backed server's root is re-imaged


def _copied(info: dict[str, Any]) -> dict[str, Any]:
    return {k: dict(v) if isinstance(v, dict) else v for k, v in info.items()}


@dataclass(slots=True)
class Observed:
    """What a step saw that a later one may use instead of asking again: in memory only, so
    a restarted daemon asks again."""

    found_power_state: int | None = None  # check_host's, for record_power_state
    power_state: int | None = None  # start_domain's, once the guest started


@dataclass(slots=True)
class RebuildFacts:
    """What the compute stage recorded so far, so every undo knows what to put back."""

    was_running: bool = False
    old_disks: dict[str, str] = field(default_factory=dict)  # target -> old <disk> XML
    old_paths: dict[str, str] = field(default_factory=dict)  # target -> old file
    new_paths: dict[str, str] = field(default_factory=dict)  # target -> new file
    # Volumes, by block device id: the attachment held before, the one made for the rebuild,
    # its connection_info, and the one an undo kept (see rebuild_volumes.py).
    old_attachments: dict[str, str] = field(default_factory=dict)
    new_attachments: dict[str, str] = field(default_factory=dict)
    connection_info: dict[str, dict[str, Any]] = field(default_factory=dict)
    kept_attachments: dict[str, str] = field(default_factory=dict)
    # How a running guest was powered off: "clean" (it answered the ACPI request in time) or
    # "destroyed". No undo needs it; it rides along with the next journal write.
    shutdown: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """A snapshot (the runner compares it with the next one to know whether to write the
        journal): every dict copied, connection_info one level deeper. By hand, as
        ``dataclasses.asdict``'s recursive deep copy cost ~14 us a call, 12 calls a rebuild;
        tests/test_rebuild_facts.py holds it equal to ``asdict``."""
        return {
            "was_running": self.was_running,
            "old_disks": dict(self.old_disks),
            "old_paths": dict(self.old_paths),
            "new_paths": dict(self.new_paths),
            "old_attachments": dict(self.old_attachments),
            "new_attachments": dict(self.new_attachments),
            "connection_info": {k: _copied(v) for k, v in self.connection_info.items()},
            "kept_attachments": dict(self.kept_attachments),
            "shutdown": self.shutdown,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RebuildFacts:
        known = {f.name for f in dataclasses.fields(cls)}
        facts = cls(**{k: v for k, v in data.items() if k in known})
        # A journal written before local disks other than the root existed (root on vda).
        for old, new in (("old_root_xml", "old_disks"), ("old_root", "old_paths"),
                         ("new_root", "new_paths")):  # fmt: skip
            if data.get(old) and not getattr(facts, new):
                setattr(facts, new, {LEGACY_ROOT_TARGET: data[old]})
        return facts


LEGACY_ROOT_TARGET: Final = "vda"
# Step names of journals written before every local disk was replaced (only the root was).
LEGACY_STEPS: Final = {
    "record_root_disk": "record_local_disks",
    "detach_root_disk": "detach_local_disks",
    "plan_root_disk": "plan_local_disks",
    "create_root_disk": "create_local_disks",
    "attach_root_disk": "attach_local_disks",
    "remove_old_root_disk": "remove_old_local_disks",
}


def upgrade_journal(journal: dict[str, Any] | None) -> dict[str, Any] | None:
    """A rebuild's journal with the step names of today, so an upgraded daemon resumes or
    undoes a rebuild the previous version left in flight."""
    if not journal:
        return journal
    renamed = {
        key: [LEGACY_STEPS.get(name, name) for name in journal.get(key, [])]
        for key in ("started", "done")
    }
    return {**journal, **renamed}


# Fields the api stage may change, restored when a rebuild rolls back.
RESTORED_FIELDS: Final = (
    "image_ref",
    "name",
    "metadata",
    "description",
    "key_name",
    "key_data",
    "access_ip_v4",
    "access_ip_v6",
    "auto_disk_config",
    "user_data",
    "hostname",
    "image_properties",
    "trusted_certs",
)


@dataclass(frozen=True, slots=True)
class RebuildContext:
    deps: Deps
    request: RequestContext
    before: Server  # as it was before the api stage
    server: Server  # as the api stage left it
    image_id: str
    root: BlockDevice
    devices: tuple[BlockDevice, ...]  # the local disks this rebuild makes anew, root first
    volumes: tuple[BlockDevice, ...] = ()  # the volumes it detaches and attaches again
    preserve_ephemeral: bool = False
    reimage_root: bool = False  # a volume-backed server's root volume gets the image (2.93+)
    image: Image | None = None
    # Only in memory (never journaled): a restarted daemon rolls back unless the new disks,
    # config drive included, were made.
    admin_pass: str | None = None
    personality: tuple[tuple[str, str], ...] = ()
    facts: RebuildFacts = field(default_factory=RebuildFacts)
    observed: Observed = field(default_factory=Observed)

    def params(self) -> dict[str, Any]:
        """What a restarted daemon needs to rebuild this context (see rebuild_job_from_action)."""
        before = {name: getattr(self.before, name) for name in (*RESTORED_FIELDS, "vm_state")}
        return {
            "image_id": self.image_id,
            "root_bdm_id": self.root.id,
            "preserve_ephemeral": self.preserve_ephemeral,
            "reimage_root": self.reimage_root,
            "before": before,
        }


def generate_password(length: int = 12) -> str:
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(length))


# -- api stage -------------------------------------------------------------------------------


async def request_rebuild(
    deps: Deps,
    request: RequestContext,
    server_id: str,
    spec: RebuildSpec,
    *,
    idempotency_key: str | None = None,
) -> tuple[Server, str]:
    """Nova's ``compute.api.API.rebuild``: check, commit REBUILD, schedule. Returns the
    server as it is now (status REBUILD) and the admin password to echo."""
    deps.runner.check_accepting()
    project = None if request.is_admin else request.project_id
    server = await deps.store.get_server(server_id, project_id=project)
    deps.policy.authorize("os_compute_api:servers:rebuild", request, server.project_id)
    if not isinstance(spec.trusted_certs, Unset):
        deps.policy.authorize(
            "os_compute_api:servers:rebuild:trusted_certs", request, server.project_id
        )
    check_rebuildable(server, request)
    key_changes = await _key_changes(deps, request, spec)
    image = await deps.images.get(request, spec.image_ref)
    if image is None:
        raise errors.ImageNotFoundForRebuild()
    devices = await deps.store.get_block_devices(server.id)
    root = _root_device(devices)
    volume_backed = rebuild_volumes.is_volume_backed(root)
    if volume_backed:
        await rebuild_volumes.check_root(deps, spec, root, image)
    check_image_properties(image, auto_disk_config=spec.auto_disk_config)
    check_quotas(spec)
    check_image_fits(image, server.flavor, volume_backed=volume_backed)
    await rebuild_volumes.check_attached(deps, devices)
    admin_pass = spec.admin_pass if spec.admin_pass is not None else generate_password()

    changes: dict[str, Any] = {
        # An empty image_ref is how Nova marks a volume-backed server: it stays empty.
        "image_ref": "" if volume_backed else image.id,
        "progress": 0,
        # Nova's _reset_image_metadata: the old image's properties go, the new one's come.
        "image_properties": imageprops.kept(image.properties),
        **key_changes,
    }
    if not isinstance(spec.trusted_certs, Unset):
        changes["trusted_certs"] = None if spec.trusted_certs is None else list(spec.trusted_certs)
    if spec.name is not None:
        changes["name"] = spec.name
    if spec.metadata is not None:
        changes["server_metadata"] = spec.metadata
    if not isinstance(spec.description, Unset):
        changes["description"] = spec.description
    if not isinstance(spec.user_data, Unset):
        changes["user_data"] = spec.user_data
    if spec.hostname is not None:
        changes["hostname"] = spec.hostname
    if spec.access_ip_v4 is not None:
        changes["access_ip_v4"] = spec.access_ip_v4
    if spec.access_ip_v6 is not None:
        changes["access_ip_v6"] = spec.access_ip_v6
    if spec.auto_disk_config is not None:
        changes["auto_disk_config"] = spec.auto_disk_config

    context = RebuildContext(
        deps=deps,
        request=request,
        before=server,
        server=server,
        image_id=image.id,
        root=root,
        devices=tuple(
            guestdisks.replaced_by_rebuild(devices, preserve_ephemeral=spec.preserve_ephemeral)
        ),
        volumes=tuple(rebuild_volumes.volumes_of(devices)),
        preserve_ephemeral=spec.preserve_ephemeral,
        reimage_root=volume_backed and spec.reimage_boot_volume,
        image=image,
        admin_pass=admin_pass,
        personality=spec.personality,
    )
    updated = await deps.store.transition(
        server.id,
        action="rebuild",
        expected_task_state=(None,),
        expected_vm_state=REBUILDABLE_VM_STATES,
        task_state=TaskState.REBUILDING,
        changes=changes,
        new_action=NewAction(
            action="rebuild",
            request_id=request.request_id,
            user_id=request.user_id,
            project_id=request.project_id,
            params=context.params(),
            idempotency_key=idempotency_key,
        ),
    )
    context = dataclasses.replace(context, server=updated)
    deps.runner.submit(rebuild_job(context))
    return updated, admin_pass


async def _key_changes(deps: Deps, request: RequestContext, spec: RebuildSpec) -> dict[str, Any]:
    if isinstance(spec.key_name, Unset):
        return {}
    if spec.key_name is None:
        return {"key_name": None, "key_data": None}
    keypair = await lookup_keypair(deps, request, spec.key_name)
    return {"key_name": keypair.name, "key_data": keypair.public_key}


async def lookup_keypair(deps: Deps, request: RequestContext, name: str) -> KeyPair:
    """Key pairs belong to users: look up the *calling* user's (as Nova does)."""
    keypair = await deps.store.get_keypair(request.user_id, name)
    if keypair is None:
        raise errors.InvalidKeyName()
    return keypair


def _root_device(devices: list[BlockDevice]) -> BlockDevice:
    for device in devices:
        if device.boot_index == 0:
            return device
    raise errors.OperationFailed(step="rebuild", reason="the server has no root block device")


# -- conductor and compute stages -------------------------------------------------------------


def rebuild_stages(
    *, volumes: bool = True, reimage: bool = True
) -> tuple[Stage[RebuildContext], Stage[RebuildContext]]:
    """The conductor and compute stages of a rebuild, step by step. The volume steps are
    there only for a server with volumes (and the re-image only for a volume-backed one at
    2.93+): a step with an undo costs a journal write, even when it has nothing to do."""
    conductor = Stage(
        event="rebuild_server",
        steps=(Step("check_host", run=_check_host),),
        notify_end="instance.rebuild_scheduled",
        notify_error="instance.rebuild.error",
    )
    restore = rebuild_volumes.restore
    steps: list[Step[RebuildContext] | None] = [
        Step("record_power_state", run=_record_power_state),
        Step("power_off", run=_power_off, undo=_power_on_again, writes_facts=False),
        Step("record_local_disks", run=_record_disks),
        # A new attachment per volume before the old one goes: never `available`.
        Step("reserve_volumes", run=rebuild_volumes.reserve, undo=restore) if volumes else None,
        Step("detach_local_disks", run=_detach_disks, undo=_reattach_old_disks),
        Step("release_old_attachments", run=rebuild_volumes.release_old, undo=restore)
        if volumes
        else None,
        Step("reimage_root_volume", run=rebuild_volumes.reimage_root) if reimage else None,
        Step(
            "block_device_mapping",
            task_state=TaskState.REBUILD_BLOCK_DEVICE_MAPPING,
            run=rebuild_volumes.connect if volumes else None,
        ),
        Step("plan_local_disks", task_state=TaskState.REBUILD_SPAWNING, run=_plan_disks),
        Step("create_local_disks", run=_create_disks, undo=_remove_new_disks),
        Step("attach_local_disks", run=_attach_new_disks),
        Step("complete_volume_attachments", run=rebuild_volumes.complete) if volumes else None,
        Step("start_domain", run=_start, undo=_destroy),
        Step("restore_power_state", run=_restore_power_state),
    ]
    compute = Stage(
        event="compute_rebuild_instance",
        notify_start="instance.rebuild.start",
        notify_end="instance.rebuild.end",
        notify_error="instance.rebuild.error",
        steps=tuple(step for step in steps if step is not None),
    )
    return conductor, compute


def rebuild_job(ctx: RebuildContext) -> Job[RebuildContext]:
    conductor, compute = rebuild_stages(volumes=bool(ctx.volumes), reimage=ctx.reimage_root)
    return Job(
        action="rebuild",
        request=ctx.request,
        server_id=ctx.server.id,
        task_state=TaskState.REBUILDING,
        stages=(conductor, compute),
        context=ctx,
        facts=ctx.facts,
        succeed=_succeed,
        fail=_fail,
        cleanup=(Step("remove_old_local_disks", run=_remove_old_disks),),
        # Once the new domain has started, finishing is safer than undoing.
        resume_forward=lambda done: "start_domain" in done,
    )


async def rebuild_job_from_action(
    deps: Deps, action: InstanceAction, server: Server
) -> Job[RebuildContext]:
    """The job of a rebuild a previous process left in flight, from its saved params."""
    params = action.job_params or {}
    before = dataclasses.replace(server, **params.get("before", {}))
    if before.trusted_certs is not None:  # a JSON list in the saved params
        before = dataclasses.replace(before, trusted_certs=tuple(before.trusted_certs))
    devices = await deps.store.get_block_devices(server.id)
    root = next(d for d in devices if d.id == params["root_bdm_id"])
    preserve = bool(params.get("preserve_ephemeral", False))
    reimage = bool(params.get("reimage_root", False))
    facts = RebuildFacts.from_dict((action.journal or {}).get("facts", {}))
    request = RequestContext(action.request_id, action.user_id, action.project_id)
    ctx = RebuildContext(
        deps=deps,
        request=request,
        before=before,
        server=server,
        image_id=params["image_id"],
        root=root,
        devices=tuple(guestdisks.replaced_by_rebuild(devices, preserve_ephemeral=preserve)),
        volumes=tuple(rebuild_volumes.volumes_of(devices)),
        preserve_ephemeral=preserve,
        reimage_root=reimage,
        facts=facts,
    )
    return rebuild_job(ctx)


async def _check_host(ctx: RebuildContext) -> None:
    """The domain is on this host. Its power state comes with the answer, and the compute
    stage's record_power_state takes it from there: one libvirt call fewer. Nothing acts on
    the guest between the two steps (only the stage boundary's Store write); after a restart
    record_power_state asks again."""
    state = await ctx.deps.hypervisor.find(ctx.server.domain_name)
    if state is None and ctx.deps.redefine is not None:
        log.warning("domain gone; defining it anew", server_id=ctx.server.id)
        await ctx.deps.redefine(ctx.before)
        state = await ctx.deps.hypervisor.find(ctx.server.domain_name)
    if state is None:
        raise errors.HypervisorError(
            call="lookupByName", reason=f"domain {ctx.server.domain_name} is not on this host"
        )
    ctx.observed.found_power_state = state


async def _record_power_state(ctx: RebuildContext) -> None:
    state = ctx.observed.found_power_state
    ctx.observed.found_power_state = None
    if state is None:
        state = await ctx.deps.hypervisor.power_state(ctx.server.domain_name)
    ctx.facts.was_running = state == PowerState.RUNNING


async def _power_off(ctx: RebuildContext) -> None:
    """A running guest is shut down cleanly within its timeout, else destroyed; which is a fact
    that the next journal write records (no write of its own), counted in memory
    (``rebuildd_guest_shutdowns``), and a destroy is logged, as Nova logs it."""
    timeout = shutdown_timeout(ctx.before, ctx.deps.shutdown_timeout)
    clean = await ctx.deps.hypervisor.power_off(ctx.server.domain_name, timeout=timeout)
    if ctx.facts.was_running:
        result = "clean" if clean and timeout > 0 else "destroyed"
        ctx.facts.shutdown = result
        ctx.deps.runner.metrics.guest_shutdowns.labels(action="rebuild", result=result).inc()
    if not clean and timeout > 0:
        log.warning(
            "guest did not shut down in time; destroyed",
            server_id=ctx.server.id,
            timeout=timeout,
            request_id=ctx.request.request_id,
        )


def shutdown_timeout(server: Server, default: float) -> float:
    """The image's ``os_shutdown_timeout`` (of the image the guest runs now), else the
    setting. Nova reads the property after its api stage swapped in the new image's; the
    guest being shut down is the old one, so its image's value is the one that fits."""
    value = server.image_properties.get("os_shutdown_timeout")
    try:
        timeout = float(value) if value is not None else default
    except ValueError:
        return default
    # "inf" or "nan" from an image owner would make every stop of the guest wait forever.
    return max(0.0, timeout) if math.isfinite(timeout) else default


async def _power_on_again(ctx: RebuildContext) -> None:
    if ctx.facts.was_running:
        await ctx.deps.hypervisor.start(ctx.server.domain_name)


def _targets(ctx: RebuildContext) -> list[str]:
    """The targets a rebuild detaches and attaches again: its local disks and volumes."""
    return [d.device_name for d in (*ctx.devices, *ctx.volumes)]


async def _record_disks(ctx: RebuildContext) -> None:
    found = await ctx.deps.hypervisor.disks_xml(ctx.server.domain_name, _targets(ctx))
    if ctx.root.device_name not in found:
        raise errors.HypervisorError(
            call="disks_xml", reason=f"the domain has no disk on {ctx.root.device_name}"
        )
    ctx.facts.old_disks = found
    ctx.facts.old_paths = {d.device_name: d.path for d in ctx.devices if d.path}
    await rebuild_volumes.record(ctx)


async def _detach_disks(ctx: RebuildContext) -> None:
    """The domain lets go of its disks — needed only when it has volumes, whose old
    attachments are deleted next (Nova's order). Local disks alone stay on their targets
    until attach_local_disks replaces them: one define a rebuild instead of two (the undo,
    putting the old disks back on their targets, is the same either way)."""
    if not ctx.volumes:
        return
    await ctx.deps.hypervisor.detach_disks(ctx.server.domain_name, _targets(ctx))


async def _reattach_old_disks(ctx: RebuildContext) -> None:
    """The old disks back on their targets; a target that had none is emptied again."""
    hv, name, old = ctx.deps.hypervisor, ctx.server.domain_name, ctx.facts.old_disks
    if not old:
        return
    extra = [t for t in _targets(ctx) if t not in old]
    if extra:
        await hv.detach_disks(name, extra)
    await hv.attach_disks(name, list(old.values()))


async def _plan_disks(ctx: RebuildContext) -> None:
    disks = ctx.deps.disks
    ctx.facts.new_paths = {
        d.device_name: str(disks.new_disk_path(ctx.server.id, guestdisks.kind(d)))
        for d in ctx.devices
    }


async def _create_disks(ctx: RebuildContext) -> None:
    deps = ctx.deps
    image = ctx.image or await deps.images.get(None, ctx.image_id)
    if image is None:
        raise errors.ImageFetchError(image_id=ctx.image_id, reason="the image no longer exists")
    nics: tuple[configdrive.Nic, ...] = ()
    if any(guestdisks.kind(d) == "config" for d in ctx.devices):
        found = await deps.hypervisor.nics(ctx.server.domain_name)
        nics = tuple(configdrive.Nic(mac=mac, interface_type=kind) for mac, kind in found)
    local_root = any(guestdisks.kind(d) == "root" for d in ctx.devices)
    contents = guestdisks.Contents(
        server=ctx.server,
        image=image,
        base=await deps.cache.ensure(image) if local_root else Path(),
        admin_pass=ctx.admin_pass,
        personality=ctx.personality,
        nics=nics,
    )
    for device in ctx.devices:
        path = Path(ctx.facts.new_paths[device.device_name])
        await guestdisks.create(deps.disks, device, path, contents)


async def _remove_new_disks(ctx: RebuildContext) -> None:
    for path in ctx.facts.new_paths.values():
        await ctx.deps.disks.remove(Path(path))


async def _attach_new_disks(ctx: RebuildContext) -> None:
    new, old = ctx.facts.new_paths, ctx.facts.old_disks
    specs: list[domxml.DiskSpec | str] = [
        guestdisks.new_disk(d, new[d.device_name], old.get(d.device_name)) for d in ctx.devices
    ]
    specs += rebuild_volumes.disks(ctx)
    await ctx.deps.hypervisor.attach_disks(
        ctx.server.domain_name, specs, metadata=domain_metadata(ctx.server, ctx.image_id)
    )


async def _start(ctx: RebuildContext) -> None:
    ctx.observed.power_state = await ctx.deps.hypervisor.start(ctx.server.domain_name)


async def _destroy(ctx: RebuildContext) -> None:
    await ctx.deps.hypervisor.destroy(ctx.server.domain_name)


async def _restore_power_state(ctx: RebuildContext) -> None:
    """Nova starts the rebuilt guest, then stops it again if the server was stopped, without
    a clean shutdown (``stop_instance(clean_shutdown=False)``): a guest still booting would
    miss the ACPI request and hold the rebuild for the whole shutdown timeout."""
    if ctx.before.vm_state == VmState.STOPPED:
        ctx.observed.power_state = None
        await ctx.deps.hypervisor.power_off(ctx.server.domain_name, timeout=0)


async def _succeed(ctx: RebuildContext) -> Outcome:
    stopped = ctx.before.vm_state == VmState.STOPPED
    power = ctx.observed.power_state
    if power is None:
        power = await ctx.deps.hypervisor.power_state(ctx.server.domain_name)
    return Outcome(
        changes={
            "vm_state": VmState.STOPPED if stopped else VmState.ACTIVE,
            "power_state": power,
            "launched_at": utcnow(),
            "progress": 0,
        },
        block_device_changes={
            **{
                d.id: {"path": ctx.facts.new_paths[d.device_name]}
                | ({"image_id": ctx.image_id} if d.id == ctx.root.id else {})
                for d in ctx.devices
            },
            **rebuild_volumes.succeeded(ctx),
        },
    )


async def _fail(ctx: RebuildContext, rolled_back: bool) -> Outcome:
    """Back on the old image and power state when the undo worked, in ERROR (the default
    ``failed_rebuild_state``: Nova's clients wait for ACTIVE or ERROR, so only ERROR tells
    them the rebuild failed) or in the vm_state it had (``previous``), its fault saying it
    was put back; ERROR when the undo did not work."""
    before = ctx.before
    try:
        power = await ctx.deps.hypervisor.power_state(before.domain_name)
    except errors.RebuilddError:
        power = PowerState.NOSTATE
    restored = {name: getattr(before, name) for name in RESTORED_FIELDS}
    restored["server_metadata"] = restored.pop("metadata")
    vm_state = VmState.ERROR
    if rolled_back and ctx.deps.failed_rebuild_state == "previous":
        vm_state = before.vm_state
    note = None
    if rolled_back:
        running = "running" if power == PowerState.RUNNING else "not running"
        note = (
            "The rebuild was rolled back: the server is on its previous image and power "
            f"state ({running}) again."
        )
    return Outcome(
        changes={**restored, "vm_state": vm_state, "power_state": power},
        block_device_changes=rebuild_volumes.rolled_back(ctx),
        fault_note=note,
    )


async def _remove_old_disks(ctx: RebuildContext) -> None:
    new = ctx.facts.new_paths
    for target, old in ctx.facts.old_paths.items():
        if old != new.get(target):
            await ctx.deps.disks.retire(Path(old))


def domain_metadata(server: Server, image_id: str) -> domxml.Metadata:
    """What rebuildd writes into the domain's ``<metadata>``."""
    return domxml.Metadata(
        items=(
            ("server", server.id),
            ("name", server.name),
            ("project", server.project_id),
            ("flavor", server.flavor.id),
            ("image", image_id),
        ),
        server=server,
        image_id=image_id,
    )
