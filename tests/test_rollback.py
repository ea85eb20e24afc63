"""Injected libvirt, image and disk errors at each step of a rebuild roll back as specified:
the server is put back as it was (old disk attached, old image, name and power state), with an
Error event and an ``instance.rebuild.error`` notification, and ends in ERROR (the default
REBUILDD_FAILED_REBUILD_STATE=error) with a fault naming the cause and saying it was put back,
or in its previous vm_state under ``previous``. When the rollback itself fails it ends in ERROR
either way, from where another rebuild finishes the job."""

from __future__ import annotations

import collections
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rebuildd.errors import HypervisorError, VolumeServiceUnavailable
from tests.live import LiveDaemon, start_live_daemon
from tests.xmlutil import disk_source, parse


class FaultyHypervisor:
    """A fault injector in front of the real libvirt adapter (here on test:///default): once
    armed, the Nth call of a named method raises the HypervisorError libvirt's would."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.plan: dict[str, int] = {}
        self.unavailable: dict[str, range] = {}
        self.calls: collections.Counter[str] = collections.Counter()

    def arm(self, **plan: int) -> None:
        self.calls.clear()
        self.plan = plan
        self.unavailable = {}

    def arm_unavailable(self, name: str, calls: range) -> None:
        """Calls ``calls`` of ``name`` fail as an upstream service that is down would."""
        self.unavailable[name] = calls

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.real, name)
        if not callable(attr):
            return attr

        async def call(*args: Any, **kwargs: Any) -> Any:
            if name in self.plan or name in self.unavailable:
                self.calls[name] += 1
                if self.calls[name] == self.plan.get(name):
                    raise HypervisorError(call=name, reason=f"injected fault in {name}")
                if self.calls[name] in self.unavailable.get(name, ()):
                    raise VolumeServiceUnavailable(url="http://cinder.test", reason="down")
            return await attr(*args, **kwargs)

        return call


@pytest.fixture
def faulty(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[tuple[LiveDaemon, FaultyHypervisor]]:
    holder: dict[str, FaultyHypervisor] = {}

    def port(real: Any) -> FaultyHypervisor:
        holder["hv"] = FaultyHypervisor(real)
        return holder["hv"]

    settings = getattr(request, "param", {})
    live = start_live_daemon(tmp_path, hypervisor_port=port, **settings)
    try:
        yield live, holder["hv"]
    finally:
        live.stop()


def _settled(live: LiveDaemon, server_id: str) -> dict[str, Any]:
    return live.poll(
        server_id,
        lambda s: s["OS-EXT-STS:task_state"] is None,
        "task_state None",
        allow_error=True,
    )


def _root(live: LiveDaemon, server_id: str) -> Path:
    return disk_source(parse(live.run(live.daemon.hypervisor.domain_xml(f"rebuildd-{server_id}"))))


def _assert_rolled_back(
    live: LiveDaemon,
    server_id: str,
    request_id: str,
    old_disk: Path,
    message: str,
    *,
    running: bool = True,
    status: str = "ERROR",
) -> None:
    """Put back (old image, name, disk and power state) and ended in ``status`` (ERROR by
    default) with a fault naming the cause ``message`` and saying it was rolled back."""
    server = _settled(live, server_id)
    assert server["status"] == status
    assert server["OS-EXT-STS:power_state"] == (1 if running else 4)
    assert (server["image"]["id"], server["name"]) == (live.image_ids[0], "vm")
    assert _root(live, server_id) == old_disk and old_disk.exists()
    assert sorted(old_disk.parent.iterdir()) == [old_disk], "the new disk must be removed"
    power = live.run(live.daemon.hypervisor.power_state(f"rebuildd-{server_id}"))
    assert power == (1 if running else 4)
    detail = live.client.get(f"/v2.1/servers/{server_id}/os-instance-actions/{request_id}").json()
    events = {e["event"]: e for e in detail["instanceAction"]["events"]}
    failed = [e for e in events.values() if e["result"] == "Error"]
    assert len(failed) == 1 and message in (failed[0]["traceback"] or "")
    assert all(e["finish_time"] for e in events.values())
    kinds = [n[0] for n in live.run(live.daemon.store.list_notifications(server_id))]
    assert kinds[-1] == "instance.rebuild.error"
    fault = live.run(live.daemon.store.latest_faults([server_id]))[server_id]
    assert message in fault.message
    state = "running" if running else "not running"
    assert fault.message.endswith(
        f" The rebuild was rolled back: the server is on its previous image and power state "
        f"({state}) again."
    )
    if status == "ERROR":
        assert server["fault"]["message"] == fault.message


def _rebuild(live: LiveDaemon, server_id: str) -> str:
    response = live.client.post(
        f"/v2.1/servers/{server_id}/action",
        json={"rebuild": {"imageRef": live.image_ids[1], "name": "new"}},
    )
    assert response.status_code == 202, response.text
    return str(response.headers["x-compute-request-id"])


@pytest.mark.parametrize(
    ("method", "nth", "stopped"),
    [
        ("find", 1, False),  # conductor: check_host (record_power_state takes its answer)
        ("power_off", 1, False),  # power_off
        ("disks_xml", 1, False),  # record_local_disks
        ("attach_disks", 1, False),  # attach_local_disks (disks and metadata in one define)
        ("start", 1, False),  # start_domain
        ("start", 1, True),  # start_domain of a stopped server
        ("power_off", 2, True),  # restore_power_state of a stopped server
    ],
)
def test_libvirt_error_at_a_step_rolls_back(
    faulty: tuple[LiveDaemon, FaultyHypervisor], method: str, nth: int, stopped: bool
) -> None:
    """A libvirt error at this step leaves the server as it was, with a fault and an Error event."""
    live, hv = faulty
    server_id = live.create_server()
    if stopped:
        live.client.post(f"/v2.1/servers/{server_id}/action", json={"os-stop": None})
        live.wait_for(server_id, "SHUTOFF")
    old_disk = _root(live, server_id)
    hv.arm(**{method: nth})
    request_id = _rebuild(live, server_id)
    _assert_rolled_back(
        live, server_id, request_id, old_disk, f"injected fault in {method}", running=not stopped
    )


@pytest.mark.parametrize("faulty", [{"failed_rebuild_state": "previous"}], indirect=True)
@pytest.mark.parametrize("stopped", [False, True])
def test_failed_rebuild_state_previous_keeps_the_vm_state(
    faulty: tuple[LiveDaemon, FaultyHypervisor], stopped: bool
) -> None:
    """Under REBUILDD_FAILED_REBUILD_STATE=previous a rolled-back rebuild ends in the vm_state
    it had (ACTIVE or SHUTOFF), with the same fault, as before this setting."""
    live, hv = faulty
    server_id = live.create_server()
    if stopped:
        live.client.post(f"/v2.1/servers/{server_id}/action", json={"os-stop": None})
        live.wait_for(server_id, "SHUTOFF")
    old_disk = _root(live, server_id)
    hv.arm(start=1)
    request_id = _rebuild(live, server_id)
    _assert_rolled_back(
        live,
        server_id,
        request_id,
        old_disk,
        "injected fault in start",
        running=not stopped,
        status="SHUTOFF" if stopped else "ACTIVE",
    )


def test_a_rolled_back_rebuild_in_error_is_rebuilt_or_reset_to_active(
    faulty: tuple[LiveDaemon, FaultyHypervisor],
) -> None:
    """A server in ERROR after a rolled-back rebuild still runs its old guest; os-resetState
    (admin) returns it to ACTIVE, and a rebuild from ERROR succeeds."""
    live, hv = faulty
    server_id = live.create_server()
    hv.arm(start=1)
    _rebuild(live, server_id)
    assert _settled(live, server_id)["status"] == "ERROR"
    hv.arm()
    response = live.client.post(
        f"/v2.1/servers/{server_id}/action", json={"os-resetState": {"state": "active"}}
    )
    assert response.status_code == 202, response.text
    server = live.client.get(f"/v2.1/servers/{server_id}").json()["server"]
    assert (server["status"], server["OS-EXT-STS:power_state"]) == ("ACTIVE", 1)
    assert server["image"]["id"] == live.image_ids[0]
    hv.arm(start=1)
    _rebuild(live, server_id)
    assert _settled(live, server_id)["status"] == "ERROR"
    hv.arm()
    _rebuild(live, server_id)
    server = live.wait_for(server_id, "ACTIVE")
    assert server["image"]["id"] == live.image_ids[1]


def test_corrupt_image_data_rolls_back(faulty: tuple[LiveDaemon, FaultyHypervisor]) -> None:
    """Image bytes that do not match the image's sha512 fail the rebuild cleanly."""
    live, _ = faulty
    server_id = live.create_server()
    old_disk = _root(live, server_id)
    stored = live.settings.state_dir / "images" / live.image_ids[1]
    data = bytearray(stored.read_bytes())
    data[-1] ^= 0xFF
    stored.write_bytes(bytes(data))
    request_id = _rebuild(live, server_id)
    _assert_rolled_back(live, server_id, request_id, old_disk, "sha512 of the data is")
    assert not (live.settings.state_dir / "_base" / live.image_ids[1]).exists()


def test_disk_tool_error_rolls_back(tmp_path: Path) -> None:
    """qemu-img failing to create the new root disk fails the rebuild cleanly."""
    flag = tmp_path / "fail-create"
    wrapper = tmp_path / "qemu-img"
    wrapper.write_text(
        f'#!/bin/sh\nif [ "$1" = create ] && [ -e "{flag}" ]; then\n'
        '  echo "injected qemu-img failure" >&2; exit 1\nfi\nexec qemu-img "$@"\n'
    )
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    live = start_live_daemon(tmp_path / "state", qemu_img=str(wrapper))
    try:
        server_id = live.create_server()
        old_disk = _root(live, server_id)
        flag.touch()
        request_id = _rebuild(live, server_id)
        _assert_rolled_back(live, server_id, request_id, old_disk, "injected qemu-img failure")
    finally:
        live.stop()


def test_failed_rollback_ends_in_error_and_a_retry_finishes(
    faulty: tuple[LiveDaemon, FaultyHypervisor],
) -> None:
    """start fails and so does putting the old disk back: ERROR with a fault; the journal keeps
    what is where, and a rebuild from ERROR then succeeds."""
    live, hv = faulty
    server_id = live.create_server()
    hv.arm(start=1, attach_disks=2)  # attach #1 is the new disk; #2 the undo's old disk
    _rebuild(live, server_id)
    server = _settled(live, server_id)
    assert server["status"] == "ERROR"
    assert "injected fault in start" in server["fault"]["message"]
    assert "rolled back" not in server["fault"]["message"]
    actions = live.client.get(f"/v2.1/servers/{server_id}/os-instance-actions").json()[
        "instanceActions"
    ]
    journal = live.run(live.daemon.store.in_flight_actions())
    assert journal == []  # nothing left in flight: the failure is recorded, not pending
    assert actions[0]["action"] == "rebuild"
    hv.arm()
    _rebuild(live, server_id)
    server = live.wait_for(server_id, "ACTIVE")
    assert server["image"]["id"] == live.image_ids[1]
    root = _root(live, server_id)
    assert root.exists() and sorted(p.name for p in root.parent.iterdir()) == [root.name]


def test_an_undo_waits_for_a_service_that_is_down_then_rolls_back(
    faulty: tuple[LiveDaemon, FaultyHypervisor],
) -> None:
    """start fails, and putting the old disk back fails twice as if an upstream service were
    down (503): the undo is retried with backoff until it works, and the rebuild rolls back
    onto the old disk (its fault says so) instead of failing to."""
    live, hv = faulty
    server_id = live.create_server()
    old_disk = _root(live, server_id)
    hv.arm(start=1)
    hv.arm_unavailable("attach_disks", range(2, 4))  # #1 is the new disk; #2, #3 the undo's
    request_id = _rebuild(live, server_id)
    _assert_rolled_back(live, server_id, request_id, old_disk, "injected fault in start")
    assert hv.calls["attach_disks"] == 4


@pytest.mark.parametrize("faulty", [{"undo_retry_timeout": 0.0}], indirect=True)
def test_an_undo_gives_up_on_a_service_down_past_the_retry_timeout(
    faulty: tuple[LiveDaemon, FaultyHypervisor],
) -> None:
    """With REBUILDD_UNDO_RETRY_TIMEOUT=0 an undo whose service stays down is not retried:
    the rebuild ends in ERROR with the fault of the step that failed."""
    live, hv = faulty
    server_id = live.create_server()
    hv.arm(start=1)
    hv.arm_unavailable("attach_disks", range(2, 100))
    _rebuild(live, server_id)
    server = _settled(live, server_id)
    assert server["status"] == "ERROR"
    assert "injected fault in start" in server["fault"]["message"]
    assert hv.calls["attach_disks"] == 2


def test_a_rebuild_without_volumes_defines_its_disks_once(
    faulty: tuple[LiveDaemon, FaultyHypervisor],
) -> None:
    """With local disks only, the old disks are not detached first: attach_local_disks
    replaces them on their targets in the rebuild's one define of its disks."""
    live, hv = faulty
    server_id = live.create_server()
    hv.arm(detach_disks=1000, attach_disks=1000)  # counted, never failed
    _rebuild(live, server_id)
    live.wait_for(server_id, "ACTIVE")
    _settled(live, server_id)
    assert (hv.calls["detach_disks"], hv.calls["attach_disks"]) == (0, 1)
    root = _root(live, server_id)
    assert root.exists() and sorted(p.name for p in root.parent.iterdir()) == [root.name]
