"""GET /metrics: Prometheus text with step durations, Store transactions and job results."""

from __future__ import annotations

import time
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.live import Gate, LiveDaemon, start_live_daemon


def _samples(live: LiveDaemon) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = live.client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def _settled(live: LiveDaemon, result: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The samples once a rebuild job has been counted with ``result`` and no job runs (both
    follow the server's final state by a moment)."""
    key = ("rebuildd_jobs_total", (("action", "rebuild"), ("result", result)))
    deadline = time.monotonic() + 30
    idle = ("rebuildd_jobs_running", ())
    while (samples := _samples(live)).get(key) != 1 or samples.get(idle) != 0:
        assert time.monotonic() < deadline, f"no rebuild counted as {result}"
        time.sleep(0.01)
    return samples


def _rebuild(live: LiveDaemon, server_id: str) -> None:
    response = live.client.post(
        f"/v2.1/servers/{server_id}/action", json={"rebuild": {"imageRef": live.image_ids[1]}}
    )
    assert response.status_code == 202, response.text


def test_a_rebuild_is_counted_step_by_step(daemon: LiveDaemon) -> None:
    """Each step of a rebuild is observed once, the job counts as a success, and the Store's
    reads and writes are timed."""
    server_id = daemon.create_server()
    before = _samples(daemon)
    _rebuild(daemon, server_id)
    after = _settled(daemon, "success")

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    for step in ("power_off", "detach_local_disks", "create_local_disks", "start_domain"):
        count = delta("rebuildd_step_duration_seconds_count", action="rebuild", step=step)
        assert count == 1, step
    assert delta("rebuildd_db_transaction_seconds_count", kind="write") >= 5
    assert delta("rebuildd_db_transaction_seconds_count", kind="read") >= 1
    assert after[("rebuildd_jobs_running", ())] == 0


def test_a_failed_rebuild_counts_as_rolled_back(tmp_path: Path) -> None:
    """A rebuild that fails and puts the old disk back is counted under rolled_back."""
    gate = Gate("start_domain")
    gate.fail_with = RuntimeError("boom")
    live = start_live_daemon(tmp_path, observer=gate)
    try:
        server_id = live.create_server()
        _rebuild(live, server_id)
        samples = _settled(live, "rolled_back")
        assert ("rebuildd_jobs_total", (("action", "rebuild"), ("result", "success"))) not in (
            samples
        )
        assert live.server(server_id)["status"] == "ERROR"
    finally:
        live.stop()
