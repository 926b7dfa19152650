"""Every datasync metric, declared here and nowhere else.

Two kinds, both named by Prometheus conventions (``datasync_`` prefix, base units, ``_total``
for counters) with bounded labels: site names, task kinds, states, error classes, outcomes;
never paths, digests or ids.

* **Event metrics** (``Metrics``): counters and histograms that ``MetricsRecorder`` moves
  from the domain events of its process (``datasync.events``). In a process that records
  into the host's multiprocess directory (``datasync.observe.exposition``) their values
  live in per-process files that ``/metrics`` adds up.
* **State gauges** (``STATE_GAUGES``): what the database says now (queue depth, placements
  by state, risk, site usage, worker heartbeats, database latency), read at scrape time by
  ``StateCollector``. They are global (one database), so several API servers report the
  same values: aggregate them with ``max``.

prometheus_client is imported when a ``Metrics`` is built, never at import time: the
composition root first decides where multiprocess values go.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter, Histogram

__all__ = ["STATE_GAUGES", "GaugeSpec", "Metrics", "metric_names"]

TASK_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0)
PLACEMENT_BUCKETS = (
    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0,
    43200.0, 86400.0,
)  # fmt: skip
DB_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass(frozen=True, slots=True)
class GaugeSpec:
    """A gauge the state collector fills from the database at scrape time."""

    name: str
    help: str
    labels: tuple[str, ...] = ()


# Queue states: ``waiting`` (due, nobody claimed it), ``backoff`` (retry delay not over),
# ``blocked`` (waits for the tasks it depends on), ``running`` (leased by a live worker),
# ``orphaned`` (leased by a worker that stopped heartbeating: its lease will expire).
QUEUE_STATES = ("waiting", "backoff", "blocked", "running", "orphaned")

STATE_GAUGES: tuple[GaugeSpec, ...] = (
    GaugeSpec("datasync_queue_tasks", "Unfinished tasks by queue state.", ("state",)),
    GaugeSpec(
        "datasync_queue_oldest_waiting_seconds",
        "How long the oldest claimable task has waited for a worker (0: none waits).",
    ),
    GaugeSpec(
        "datasync_active_transfers",
        "Tasks running on live workers, by destination site.",
        ("site",),
    ),
    GaugeSpec(
        "datasync_placements", "Placements by destination site and state.", ("site", "state")
    ),
    GaugeSpec(
        "datasync_placements_at_risk",
        "Unfinished placements whose deadline passed or whose ETA passes it.",
        ("site",),
    ),
    GaugeSpec(
        "datasync_placement_deadline_slack_seconds",
        "Least slack (deadline - now - ETA; an unknown ETA counts 0) of the site's"
        " unfinished placements with a deadline; negative: late.",
        ("site",),
    ),
    GaugeSpec(
        "datasync_site_used_bytes",
        "Bytes datasync keeps at the site: its blob store, plus view copies on object stores.",
        ("site",),
    ),
    GaugeSpec("datasync_site_quota_bytes", "The site's configured quota_bytes.", ("site",)),
    GaugeSpec(
        "datasync_site_paused",
        "1 while an operator's pause holds the site's tasks (datasync pause), else 0.",
        ("site",),
    ),
    GaugeSpec(
        "datasync_workers",
        "Registered worker processes by host; stale: no heartbeat within the live window.",
        ("host", "state"),
    ),
    GaugeSpec(
        "datasync_worker_heartbeat_age_seconds",
        "Seconds since the host's most recent worker heartbeat.",
        ("host",),
    ),
    GaugeSpec(
        "datasync_link_throughput_bytes_per_second",
        "Observed throughput per link (moving average kept by the scheduler).",
        ("src", "dst"),
    ),
    GaugeSpec("datasync_database_up", "1 if the database answered this scrape, else 0."),
    GaugeSpec(
        "datasync_database_latency_seconds",
        "Round trip of one trivial query at scrape time.",
    ),
    GaugeSpec(
        "datasync_state_collect_seconds",
        "Time this scrape spent reading state gauges from the database.",
    ),
)


class Metrics:
    """The event metrics of one process (or of one ``App`` in single-process mode)."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        from prometheus_client import Counter, Histogram

        def counter(name: str, doc: str, *labels: str) -> Counter:
            return Counter(name, doc, labels, registry=registry)

        def histogram(name: str, doc: str, buckets: tuple[float, ...], *labels: str) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=registry)

        # Bytes moved come from TaskCompleted.bytes_moved and nowhere else.
        self.transfer_bytes = counter(
            "datasync_transfer_bytes",
            "Bytes written at the destination by completed tasks, by source and destination"
            " site (src 'mixed': a batch read from several sites).",
            "src",
            "dst",
        )
        self.transfer_files = counter(
            "datasync_transfer_files",
            "Files made available at the destination by completed tasks (logical: a blob"
            " under three paths counts three).",
            "src",
            "dst",
        )
        self.blobs_replicated = counter(
            "datasync_blobs_replicated",
            "Blobs verified and recorded in a site's blob store.",
            "site",
        )
        self.chunk_parts = counter(
            "datasync_chunk_parts_written",
            "Parts of large blobs verified chunk by chunk and written.",
            "site",
        )
        self.tasks_claimed = counter("datasync_tasks_claimed", "Tasks claimed.", "kind")
        self.tasks_completed = counter("datasync_tasks_completed", "Tasks completed.", "kind")
        self.task_retries = counter(
            "datasync_task_retries",
            "Failed task attempts that will be retried, by error class.",
            "kind",
            "error_class",
        )
        self.task_failures = counter(
            "datasync_task_failures",
            "Tasks failed for good, by error class.",
            "kind",
            "error_class",
        )
        self.task_duration = histogram(
            "datasync_task_duration_seconds",
            "From claim to the end of the attempt (outcome: done, retry, failed).",
            TASK_BUCKETS,
            "kind",
            "outcome",
        )
        self.replicas_marked_bad = counter(
            "datasync_replicas_marked_bad",
            "Replicas found wrong (checksum mismatch, short or missing) and marked bad, by"
            " site and kind (blob, source).",
            "site",
            "kind",
        )
        self.placements_created = counter(
            "datasync_placements_created", "Placements recorded.", "site"
        )
        self.placements_finished = counter(
            "datasync_placements_finished",
            "Placements that became READY, FAILED or DAMAGED (outcome: ready, failed, damaged).",
            "site",
            "outcome",
        )
        self.placements_reopened = counter(
            "datasync_placements_reopened",
            "FAILED, DAMAGED or stale placements taken for (re)planning.",
            "site",
        )
        self.placement_duration = histogram(
            "datasync_placement_duration_seconds",
            "From a placement's creation to READY.",
            PLACEMENT_BUCKETS,
            "site",
        )
        self.deadline_misses = counter(
            "datasync_placement_deadline_misses",
            "Placements that became READY after their deadline.",
            "site",
        )
        self.versions_registered = counter(
            "datasync_versions_registered",
            "Registrations (outcome: created, existing).",
            "outcome",
        )
        self.labels_moved = counter("datasync_labels_moved", "Labels set or moved.")
        self.db_statement = histogram(
            "datasync_db_statement_duration_seconds",
            "Database statements by their first keyword (select, insert, update, ...).",
            DB_BUCKETS,
            "statement",
        )

    def start_at_zero(self, sites: Iterable[str], kinds: Iterable[str]) -> None:
        """Create, at 0, the series that alert rules compare over time: a counter whose
        series is born at 1 shows Prometheus no increase."""
        for site in sites:
            for kind in ("blob", "source"):
                self.replicas_marked_bad.labels(site, kind)
            for outcome in ("ready", "failed", "damaged"):
                self.placements_finished.labels(site, outcome)
        for kind in kinds:
            self.tasks_completed.labels(kind)
            self.task_retries.labels(kind, "ChecksumMismatch")
            self.task_failures.labels(kind, "ChecksumMismatch")


def metric_names() -> set[str]:
    """Every series family name ``/metrics`` can show (counters with ``_total``,
    histograms with ``_bucket``, ``_sum`` and ``_count``); for dashboard and rule checks."""
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    Metrics(registry)
    names = {spec.name for spec in STATE_GAUGES}
    for family in registry.collect():
        names.update(sample.name for sample in family.samples)
        if family.type == "counter":
            names.add(family.name + "_total")
        if family.type == "histogram":
            names.update(family.name + s for s in ("_bucket", "_sum", "_count"))
    return names
