"""RebuildFacts' journal snapshot: the same as ``dataclasses.asdict`` for every field (a field
added without being snapshotted fails here), and a copy the next step cannot change."""

from __future__ import annotations

import dataclasses

from rebuildd.pipeline import RebuildFacts


def _filled() -> RebuildFacts:
    facts = RebuildFacts(was_running=True)
    facts.old_disks["vda"] = "<disk/>"
    facts.old_paths["vda"] = "/old"
    facts.new_paths["vda"] = "/new"
    facts.old_attachments["bdm"] = "a1"
    facts.new_attachments["bdm"] = "a2"
    facts.connection_info["bdm"] = {"driver_volume_type": "nfs", "data": {"name": "volume-x"}}
    facts.kept_attachments["bdm"] = "a2"
    return facts


def test_the_snapshot_is_asdict() -> None:
    """to_dict() equals dataclasses.asdict(), field for field."""
    facts = _filled()
    assert facts.to_dict() == dataclasses.asdict(facts)
    assert set(facts.to_dict()) == {f.name for f in dataclasses.fields(RebuildFacts)}


def test_the_snapshot_does_not_change_with_the_facts() -> None:
    """A step that records more (even inside a connection_info) leaves the snapshot taken
    before it as it was, so the runner sees the difference and writes the journal."""
    facts = _filled()
    before = facts.to_dict()
    facts.old_paths["vdb"] = "/old-b"
    facts.connection_info["bdm"]["data"]["device_path"] = "/mnt/x/volume-x"
    assert before != facts.to_dict()
    assert "vdb" not in before["old_paths"]
    assert "device_path" not in before["connection_info"]["bdm"]["data"]
    assert RebuildFacts.from_dict(facts.to_dict()) == facts
