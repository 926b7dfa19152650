"""The state gauges of ``/metrics``: read from the database at scrape time.

``StateCollector`` is a prometheus_client custom collector (``metrics.STATE_GAUGES``
declares its families). A database that does not answer yields ``datasync_database_up 0``
and no other state gauge, never a failed scrape. Site usage sums every replica row, so it
is recomputed at most every ``usage_ttl`` seconds.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy.engine import Connection, Engine

from datasync.config import Settings
from datasync.db.engine import DB_UNAVAILABLE
from datasync.observe import state
from datasync.observe.metrics import STATE_GAUGES
from datasync.observe.workers import db_now
from datasync.transfer.state import active_pauses
from datasync.transfer.status import status

if TYPE_CHECKING:
    from prometheus_client.metrics_core import GaugeMetricFamily, Metric

__all__ = ["USAGE_TTL_SECONDS", "StateCollector"]

log = logging.getLogger(__name__)
USAGE_TTL_SECONDS = 300.0


class StateCollector:
    """Database state as gauges, for a ``CollectorRegistry``."""

    def __init__(
        self, engine: Engine, settings: Settings, *, usage_ttl: float = USAGE_TTL_SECONDS
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.usage_ttl = usage_ttl
        self._usage: tuple[float, dict[str, int]] | None = None
        self._lock = threading.Lock()

    def describe(self) -> list[Metric]:
        return []  # families depend on the data; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.metrics_core import GaugeMetricFamily

        families = {
            spec.name: GaugeMetricFamily(spec.name, spec.help, labels=spec.labels)
            for spec in STATE_GAUGES
        }
        started = time.perf_counter()
        try:
            self._fill(families)
            up = 1.0
        except DB_UNAVAILABLE:
            log.warning("state gauges: the database did not answer", exc_info=True)
            keep = ("datasync_database_up", "datasync_state_collect_seconds")
            families = {name: families[name] for name in keep}
            up = 0.0
        families["datasync_database_up"].add_metric([], up)
        families["datasync_state_collect_seconds"].add_metric([], time.perf_counter() - started)
        yield from families.values()

    def _fill(self, f: dict[str, GaugeMetricFamily]) -> None:
        with self.engine.connect() as conn:
            ping = time.perf_counter()
            now: datetime = db_now(conn)
            if self.engine.dialect.name != "postgresql":  # db_now asked PostgreSQL already
                conn.exec_driver_sql("SELECT 1").scalar_one()
            f["datasync_database_latency_seconds"].add_metric([], time.perf_counter() - ping)
            queue = state.queue_depth(conn, now)
            by_state = state.placements_by_state(conn)
            hosts = state.workers_by_host(conn, now)
            links = state.link_throughput(conn)
            usage = self._site_usage(conn)
            paused = set(active_pauses(conn, now))
        for name, n in queue.tasks.items():
            f["datasync_queue_tasks"].add_metric([name], n)
        f["datasync_queue_oldest_waiting_seconds"].add_metric([], queue.oldest_waiting_seconds)
        for site in sorted(set(self.settings.sites) | set(queue.running_by_site)):
            f["datasync_active_transfers"].add_metric([site], queue.running_by_site.get(site, 0))
        for (site, placement_state), n in sorted(by_state.items()):
            f["datasync_placements"].add_metric([site, placement_state], n)
        at_risk, slack = state.deadline_slack(status(self.engine, active_only=True), now)
        for site in sorted(set(self.settings.sites) | set(at_risk)):
            f["datasync_placements_at_risk"].add_metric([site], at_risk.get(site, 0))
        for site, seconds in sorted(slack.items()):
            f["datasync_placement_deadline_slack_seconds"].add_metric([site], seconds)
        for site in sorted(set(self.settings.sites) | set(usage)):
            f["datasync_site_used_bytes"].add_metric([site], usage.get(site, 0))
        for site, cfg in sorted(self.settings.sites.items()):
            if cfg.quota_bytes is not None:
                f["datasync_site_quota_bytes"].add_metric([site], cfg.quota_bytes)
        for site in sorted(set(self.settings.sites) | paused):
            f["datasync_site_paused"].add_metric([site], 1.0 if site in paused else 0.0)
        for host, w in sorted(hosts.items()):
            f["datasync_workers"].add_metric([host, "live"], w.live)
            f["datasync_workers"].add_metric([host, "stale"], w.stale)
            f["datasync_worker_heartbeat_age_seconds"].add_metric([host], w.heartbeat_age_seconds)
        for (src, dst), bps in sorted(links.items()):
            f["datasync_link_throughput_bytes_per_second"].add_metric([src, dst], bps)

    def _site_usage(self, conn: Connection) -> dict[str, int]:
        with self._lock:
            cached = self._usage
        if cached is not None and time.monotonic() - cached[0] < self.usage_ttl:
            return cached[1]
        usage = state.site_usage(conn, self.settings.sites)
        with self._lock:
            self._usage = (time.monotonic(), usage)
        return usage
