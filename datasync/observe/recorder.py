"""Domain events -> metrics: the one place where datasync's counters move.

``MetricsRecorder`` is an event subscriber (registered by ``datasync.bootstrap``). Every
number comes from an event field: bytes from ``TaskCompleted.bytes_moved``, files from
``TaskCompleted.files``, blobs from ``BlobReplicated``; the database is read only for
labels (``Lookup``). Task durations pair a ``TaskClaimed`` with the end of the same attempt
in this process (claims and ends happen in the worker that holds the lease).

``time_statements`` times every statement of an engine into
``datasync_db_statement_duration_seconds``.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy import event as sa_event
from sqlalchemy.engine import Engine

from datasync.events import (
    BlobReplicated,
    ChunkVerified,
    Event,
    LabelMoved,
    PlacementCreated,
    PlacementDamaged,
    PlacementFailed,
    PlacementReady,
    PlacementReopened,
    ReplicaMarkedBad,
    TaskClaimed,
    TaskCompleted,
    TaskFailed,
    TaskRetried,
    VersionRegistered,
)
from datasync.observe.lookup import Lookup
from datasync.observe.metrics import Metrics

__all__ = ["MetricsRecorder", "time_statements"]

_OPEN_CLAIMS = 10_000  # attempts whose end this process may never see (a lost lease)


class MetricsRecorder:
    """Subscriber: moves ``metrics`` from events. Thread-safe."""

    def __init__(self, metrics: Metrics, lookup: Lookup) -> None:
        self.metrics = metrics
        self.lookup = lookup
        self._claimed: OrderedDict[int, datetime] = OrderedDict()
        self._lock = threading.Lock()
        self._handlers: dict[type[Event], Callable[[Any], None]] = {
            TaskClaimed: self._claimed_task,
            TaskCompleted: self._completed,
            TaskRetried: self._retried,
            TaskFailed: self._failed,
            BlobReplicated: self._blob,
            ChunkVerified: self._chunk,
            ReplicaMarkedBad: self._bad,
            PlacementCreated: self._created,
            PlacementReady: self._ready,
            PlacementFailed: self._placement_failed,
            PlacementDamaged: self._damaged,
            PlacementReopened: self._reopened,
            VersionRegistered: self._registered,
            LabelMoved: self._label,
        }

    def __call__(self, event: Event) -> None:
        handler = self._handlers.get(type(event))
        if handler is not None:
            handler(event)

    # -- tasks ---------------------------------------------------------------------------

    def _claimed_task(self, e: TaskClaimed) -> None:
        self.metrics.tasks_claimed.labels(e.kind).inc()
        with self._lock:
            self._claimed[e.task_id] = e.at
            while len(self._claimed) > _OPEN_CLAIMS:
                self._claimed.popitem(last=False)

    def _attempt_ended(self, task_id: int, kind: str, outcome: str, at: datetime) -> None:
        with self._lock:
            started = self._claimed.pop(task_id, None)
        if started is not None:
            seconds = max(0.0, (at - started).total_seconds())
            self.metrics.task_duration.labels(kind, outcome).observe(seconds)

    def _completed(self, e: TaskCompleted) -> None:
        m = self.metrics
        m.tasks_completed.labels(e.kind).inc()
        self._attempt_ended(e.task_id, e.kind, "done", e.at)
        if e.bytes_moved or e.files:
            src, dst = self.lookup.task_link(e.task_id)
            m.transfer_bytes.labels(src, dst).inc(e.bytes_moved)
            m.transfer_files.labels(src, dst).inc(e.files)

    def _retried(self, e: TaskRetried) -> None:
        self.metrics.task_retries.labels(e.kind, e.error_class).inc()
        self._attempt_ended(e.task_id, e.kind, "retry", e.at)

    def _failed(self, e: TaskFailed) -> None:
        self.metrics.task_failures.labels(e.kind, e.error_class).inc()
        self._attempt_ended(e.task_id, e.kind, "failed", e.at)

    # -- replicas ------------------------------------------------------------------------

    def _blob(self, e: BlobReplicated) -> None:
        self.metrics.blobs_replicated.labels(e.site).inc()

    def _chunk(self, e: ChunkVerified) -> None:
        self.metrics.chunk_parts.labels(e.site).inc()

    def _bad(self, e: ReplicaMarkedBad) -> None:
        self.metrics.replicas_marked_bad.labels(e.site, e.kind).inc()

    # -- placements, versions ------------------------------------------------------------

    def _created(self, e: PlacementCreated) -> None:
        self.metrics.placements_created.labels(e.site).inc()

    def _ready(self, e: PlacementReady) -> None:
        site = self.lookup.placement(e.placement_id).site
        self.metrics.placements_finished.labels(site, "ready").inc()
        created, deadline = self.lookup.placement_times(e.placement_id)
        if created is not None:
            seconds = max(0.0, (e.at - created).total_seconds())
            self.metrics.placement_duration.labels(site).observe(seconds)
        if deadline is not None and e.at > deadline:
            self.metrics.deadline_misses.labels(site).inc()

    def _placement_failed(self, e: PlacementFailed) -> None:
        site = self.lookup.placement(e.placement_id).site
        self.metrics.placements_finished.labels(site, "failed").inc()

    def _damaged(self, e: PlacementDamaged) -> None:
        site = self.lookup.placement(e.placement_id).site
        self.metrics.placements_finished.labels(site, "damaged").inc()

    def _reopened(self, e: PlacementReopened) -> None:
        self.metrics.placements_reopened.labels(self.lookup.placement(e.placement_id).site).inc()

    def _registered(self, e: VersionRegistered) -> None:
        self.metrics.versions_registered.labels("created" if e.created else "existing").inc()

    def _label(self, _e: LabelMoved) -> None:
        self.metrics.labels_moved.inc()


_STATEMENTS = frozenset({"select", "insert", "update", "delete", "with", "begin", "commit"})
_START = "datasync_statement_started"


def time_statements(engine: Engine, metrics: Metrics) -> None:
    """Observe every statement's duration on ``engine`` (label: its first keyword)."""

    def before(conn: Any, _cursor: Any, _stmt: str, _params: Any, context: Any, _many: Any) -> None:
        context._datasync_started = time.perf_counter()

    def after(conn: Any, _cursor: Any, statement: str, _params: Any, context: Any, _m: Any) -> None:
        started = getattr(context, "_datasync_started", None)
        if started is None:
            return
        word = statement.lstrip().split(None, 1)[0].lower() if statement.strip() else ""
        label = word if word in _STATEMENTS else "other"
        metrics.db_statement.labels(label).observe(time.perf_counter() - started)

    sa_event.listen(engine, "before_cursor_execute", before)
    sa_event.listen(engine, "after_cursor_execute", after)
