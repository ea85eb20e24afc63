"""status is derived from vm_state and task_state exactly as Nova derives it."""

from __future__ import annotations

import pytest

from rebuildd.states import TaskState, VmState, states_for_status, status_from_state


@pytest.mark.parametrize(
    ("vm_state", "task_state", "status"),
    [
        (VmState.ACTIVE, None, "ACTIVE"),
        (VmState.ACTIVE, TaskState.REBUILDING, "REBUILD"),
        (VmState.ACTIVE, TaskState.REBUILD_BLOCK_DEVICE_MAPPING, "REBUILD"),
        (VmState.ACTIVE, TaskState.REBUILD_SPAWNING, "REBUILD"),
        (VmState.STOPPED, TaskState.REBUILDING, "REBUILD"),
        (VmState.ERROR, TaskState.REBUILD_SPAWNING, "REBUILD"),
        (VmState.ERROR, None, "ERROR"),
        (VmState.STOPPED, None, "SHUTOFF"),
        (VmState.ACTIVE, TaskState.POWERING_OFF, "ACTIVE"),
        (VmState.BUILDING, TaskState.SPAWNING, "BUILD"),
        ("resized", None, "UNKNOWN"),
    ],
)
def test_status_from_state(vm_state: str, task_state: str | None, status: str) -> None:
    """Each (vm_state, task_state) shows Nova's status."""
    assert status_from_state(vm_state, task_state) == status


def test_states_for_status_inverts_the_map() -> None:
    """The status filter finds every pair that shows the status, and only those."""
    pairs = states_for_status("REBUILD")
    assert (VmState.STOPPED, TaskState.REBUILDING) in pairs
    assert all(status_from_state(v, t) == "REBUILD" for v, t in pairs if t is not None)
    assert states_for_status("ACTIVE") == [(VmState.ACTIVE, None)]
