"""Prometheus metrics, served at ``GET /metrics``: where a job's time goes, step by step, and
what the database costs.

Owns the metric names and one registry per daemon (so daemons in one test process stay
apart). It measures nothing itself: the runner and the Store report to it.
"""

from __future__ import annotations

from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE: Final = CONTENT_TYPE_LATEST
# From a tenth of a millisecond (a SQLite read) to a minute (a guest's clean shutdown).
_BUCKETS: Final = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.step_seconds = Histogram(
            "rebuildd_step_duration_seconds",
            "Time in one pipeline step's run (journal writes excluded).",
            ["action", "step"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.db_seconds = Histogram(
            "rebuildd_db_transaction_seconds",
            "Time in one Store transaction, as the event loop waits for it.",
            ["kind"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.jobs = Counter(
            "rebuildd_jobs",
            "Jobs (instance actions) ended, by result: success, rolled_back, failed.",
            ["action", "result"],
            registry=self.registry,
        )
        self.guest_shutdowns = Counter(
            "rebuildd_guest_shutdowns",
            "Running guests a rebuild powered off, by result: clean (the guest shut down by "
            "itself within its timeout) or destroyed (timeout reached, or 0).",
            ["action", "result"],
            registry=self.registry,
        )
        self.image_downloads = Counter(
            "rebuildd_image_downloads",
            "Images fetched from the image service into the image cache.",
            registry=self.registry,
        )
        self.image_cache_removed = Counter(
            "rebuildd_image_cache_removed",
            "Unused base files the image cache cleanup removed.",
            registry=self.registry,
        )
        self.jobs_running = Gauge(
            "rebuildd_jobs_running", "Jobs holding a concurrency slot now.", registry=self.registry
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
