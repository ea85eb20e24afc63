"""Reads rebuildd's ``GET /metrics`` around a scenario: where a rebuild's time went, by step,
and what the Store cost (issue 5's per-stage breakdown with DB time)."""

from __future__ import annotations

import timeit
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(client: httpx.AsyncClient) -> Samples:
    response = await client.get("/metrics")
    response.raise_for_status()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def breakdown(before: Samples, after: Samples, *, action: str, jobs: int) -> dict[str, Any]:
    """Mean milliseconds per job in each step of ``action`` and in Store reads and writes,
    and Store transactions per job, from two scrapes around ``jobs`` jobs."""

    def delta(name: str, labels: dict[str, str]) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    steps: dict[str, float] = {}
    for name, labels in after:
        fields = dict(labels)
        if name == "rebuildd_step_duration_seconds_sum" and fields.get("action") == action:
            steps[fields["step"]] = delta(name, fields) * 1000 / jobs
    db = {}
    for kind in ("read", "write"):
        db[kind] = {
            "ms_per_job": delta("rebuildd_db_transaction_seconds_sum", {"kind": kind})
            * 1000
            / jobs,
            "per_job": delta("rebuildd_db_transaction_seconds_count", {"kind": kind}) / jobs,
        }
    return {"steps_ms": steps, "db": db}


def speed_probe() -> float:
    """Microseconds this machine takes for one fixed piece of pure-Python work (the best of
    five rounds of ``sum(range(10_000))``), in the harness's own process. These machines' speed
    drifts by a third and more within an hour; a run's probe says how fast the hour was, so
    runs of different hours can be told apart (only runs interleaved in one hour compare
    code)."""
    loops = 2000
    return min(timeit.repeat("sum(range(10_000))", number=loops, repeat=5)) / loops * 1e6
