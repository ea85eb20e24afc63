"""Nova's state vocabulary: vm_state, task_state, power_state, and the derived API status.

Owns the strings and numbers only; it must not touch storage or transitions (the Store's
compare-and-swap does that). ``status`` is always derived, never stored, exactly as Nova's
``nova.api.openstack.common.status_from_state`` does.
"""

from __future__ import annotations

from typing import Final


class VmState:
    ACTIVE: Final = "active"
    BUILDING: Final = "building"
    STOPPED: Final = "stopped"
    ERROR: Final = "error"
    DELETED: Final = "deleted"


class TaskState:
    SCHEDULING: Final = "scheduling"
    BLOCK_DEVICE_MAPPING: Final = "block_device_mapping"
    SPAWNING: Final = "spawning"
    REBUILDING: Final = "rebuilding"
    REBUILD_BLOCK_DEVICE_MAPPING: Final = "rebuild_block_device_mapping"
    REBUILD_SPAWNING: Final = "rebuild_spawning"
    POWERING_OFF: Final = "powering-off"
    POWERING_ON: Final = "powering-on"
    DELETING: Final = "deleting"
    # rebuildd's own (Nova holds a lock instead): an attach or detach holds the server, so a
    # rebuild, a stop/start or another attach of it gets 409 meanwhile.
    ATTACHING_VOLUME: Final = "attaching_volume"
    DETACHING_VOLUME: Final = "detaching_volume"


REBUILD_TASK_STATES: Final = frozenset(
    {TaskState.REBUILDING, TaskState.REBUILD_BLOCK_DEVICE_MAPPING, TaskState.REBUILD_SPAWNING}
)


class PowerState:
    NOSTATE: Final = 0
    RUNNING: Final = 1
    PAUSED: Final = 3
    SHUTDOWN: Final = 4
    CRASHED: Final = 6
    SUSPENDED: Final = 7


_DEFAULT = "default"
_REBUILD = dict.fromkeys(REBUILD_TASK_STATES, "REBUILD")
_STATUS_MAP: Final[dict[str, dict[str, str]]] = {
    VmState.ACTIVE: {_DEFAULT: "ACTIVE", **_REBUILD},
    VmState.BUILDING: {_DEFAULT: "BUILD"},
    VmState.STOPPED: {_DEFAULT: "SHUTOFF", **_REBUILD},
    VmState.ERROR: {_DEFAULT: "ERROR", **_REBUILD},
    VmState.DELETED: {_DEFAULT: "DELETED"},
}


def status_from_state(vm_state: str, task_state: str | None) -> str:
    """The API ``status`` Nova shows for a (vm_state, task_state) pair."""
    by_task = _STATUS_MAP.get(vm_state)
    if by_task is None:
        return "UNKNOWN"
    if task_state is not None and task_state in by_task:
        return by_task[task_state]
    return by_task[_DEFAULT]


def states_for_status(status: str) -> list[tuple[str, str | None]]:
    """The (vm_state, task_state-or-None-for-any-default) pairs that show ``status``.

    Used by the ``?status=`` filter of the servers list. A ``None`` task_state means the
    default entry: any task_state that is not listed explicitly for that vm_state.
    """
    pairs: list[tuple[str, str | None]] = []
    for vm_state, by_task in _STATUS_MAP.items():
        for task_state, shown in by_task.items():
            if shown == status:
                pairs.append((vm_state, None if task_state == _DEFAULT else task_state))
    return pairs


def explicit_task_states(vm_state: str) -> list[str]:
    """The task_states that give ``vm_state`` a status other than its default."""
    return [t for t in _STATUS_MAP.get(vm_state, {}) if t != _DEFAULT]
