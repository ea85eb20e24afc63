"""A rebuild journal written by the previous version (root disk only, old step names) is
read by today's pipeline as the same saga: its steps and facts keep their meaning."""

from __future__ import annotations

from rebuildd.pipeline import RebuildFacts, rebuild_stages, upgrade_journal

OLD = {
    "started": ["record_power_state", "power_off", "record_root_disk", "detach_root_disk",
                "plan_root_disk", "create_root_disk"],
    "done": ["record_power_state", "power_off", "record_root_disk", "detach_root_disk",
             "plan_root_disk"],
    "facts": {"was_running": True, "old_root_xml": "<disk/>", "old_root": "/i/root-a.qcow2",
              "new_root": "/i/root-b.qcow2"},
}  # fmt: skip


def _step_names() -> set[str]:
    return {step.name for stage in rebuild_stages() for step in stage.steps}


def test_old_step_names_become_todays() -> None:
    """Every step the old journal names is a step of today's rebuild, in the same order."""
    upgraded = upgrade_journal(OLD)
    assert upgraded is not None
    assert upgraded["started"][2:] == [
        "record_local_disks", "detach_local_disks", "plan_local_disks", "create_local_disks"
    ]  # fmt: skip
    assert set(upgraded["started"]) <= _step_names()
    assert upgraded["facts"] == OLD["facts"]


def test_old_root_facts_become_the_facts_of_the_root_target() -> None:
    """The old disk's XML and paths are the facts of target vda, so the undo puts it back."""
    facts = RebuildFacts.from_dict(OLD["facts"])  # type: ignore[arg-type]
    assert facts.was_running is True
    assert facts.old_disks == {"vda": "<disk/>"}
    assert facts.old_paths == {"vda": "/i/root-a.qcow2"}
    assert facts.new_paths == {"vda": "/i/root-b.qcow2"}


def test_todays_journal_is_left_as_it_is() -> None:
    """A journal of this version passes through unchanged."""
    today = {"started": ["detach_local_disks"], "done": [], "facts": {"old_disks": {"vda": "x"}}}
    assert upgrade_journal(today) == today
    assert RebuildFacts.from_dict(today["facts"]).old_disks == {"vda": "x"}  # type: ignore[arg-type]
