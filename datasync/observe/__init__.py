"""Observers of the engine: metrics, logs, worker liveness, the dashboard's reads.

They only listen (domain events on the bus) and read (the database); none of them writes
replication state. The composition root builds them (``build_observability``) and
subscribes them; ``datasync/observe/metrics.py`` declares every metric.

* ``metrics`` / ``recorder``: event metrics; ``collector`` / ``state``: database gauges;
  ``exposition``: where values live across processes and what ``/metrics`` shows.
* ``logs``: the handler every command installs, and events as records with ``action`` keys.
* ``workers``: the ``workers`` table (registered, beating, gone).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy.engine import Engine

from datasync.config import Settings
from datasync.observe.exposition import (
    enable_multiprocess,
    exposition_registry,
    host_metrics_dir,
    multiprocess_dir,
    process_metrics,
    wants_host_metrics,
)
from datasync.observe.logs import EventLog, current_logging, setup_logging
from datasync.observe.lookup import Lookup
from datasync.observe.metrics import Metrics
from datasync.observe.recorder import MetricsRecorder, time_statements
from datasync.transfer.payloads import TaskKind

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

__all__ = ["ChildObservability", "Observability", "build_observability"]

log = logging.getLogger(__name__)


@dataclass
class Observability:
    """One ``App``'s observers: its metrics (private registry in single-process mode), the
    lookups they share, and the subscribers to put on the bus."""

    metrics: Metrics
    registry: CollectorRegistry | None  # private; None in multiprocess mode
    lookup: Lookup
    recorder: MetricsRecorder
    event_log: EventLog

    def exposition(self, engine: Engine, settings: Settings) -> CollectorRegistry:
        """A registry for ``/metrics``: event metrics plus database gauges."""
        from datasync.observe.collector import StateCollector

        return exposition_registry(self.registry, StateCollector(engine, settings))

    def exposition_events(self) -> CollectorRegistry:
        """A registry of the event metrics alone (``datasync worker --metrics-port``)."""
        return exposition_registry(self.registry)


def build_observability(engine: Engine, settings: Settings) -> Observability:
    """Metrics in the host's directory when this process asked for it, else private."""
    registry: CollectorRegistry | None = None
    if wants_host_metrics():
        try:
            enable_multiprocess(host_metrics_dir(settings.home))
        except OSError as exc:  # another user's home, a read-only file system: count alone
            log.warning("metrics stay in this process: %s", exc)
    if multiprocess_dir() is not None:
        metrics = process_metrics()
    else:
        from prometheus_client import CollectorRegistry

        registry = CollectorRegistry(auto_describe=True)
        metrics = Metrics(registry)
    metrics.start_at_zero(settings.sites, [kind.value for kind in TaskKind])
    time_statements(engine, metrics)
    lookup = Lookup(engine)
    return Observability(
        metrics, registry, lookup, MetricsRecorder(metrics, lookup), EventLog(lookup)
    )


@dataclass(frozen=True, slots=True)
class ChildObservability:
    """What a spawned worker process needs to log and count like its parent."""

    metrics_dir: str | None
    log_level: int | None
    log_format: str | None

    @classmethod
    def of_this_process(cls) -> ChildObservability:
        directory = multiprocess_dir()
        logs = current_logging()
        return cls(
            str(directory) if directory is not None else None,
            logs.level if logs is not None else None,
            logs.fmt if logs is not None else None,
        )

    def apply(self) -> None:
        """In the child, before it builds anything."""
        if self.log_level is not None:
            setup_logging(self.log_level, "json" if self.log_format == "json" else "human")
        if self.metrics_dir is not None:
            enable_multiprocess(Path(self.metrics_dir))
