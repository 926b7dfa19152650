"""Typed domain events and the bus that carries them to subscribers.

Every state transition of the replication engine (``datasync.transfer.state``) emits one
event, AFTER its transaction committed: a subscriber never sees a change that was rolled
back, and a failing subscriber never undoes or blocks a transition (its error is logged).
Subscribers are registered once, in the composition root (``datasync.bootstrap``):
metrics, logs, the dashboard and ``explain`` listen here and never count anything a
second time elsewhere.

Events are in-process: each worker process has its own bus. Anything that must be seen
across processes (progress, errors) is in the database, which the events mirror.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

__all__ = [
    "BlobReplicated",
    "ChunkVerified",
    "Event",
    "EventBus",
    "LabelMoved",
    "LabelsSynced",
    "LinkMeasured",
    "PlacementAtRisk",
    "PlacementCreated",
    "PlacementDamaged",
    "PlacementEvicted",
    "PlacementFailed",
    "PlacementPlanned",
    "PlacementPublishing",
    "PlacementReady",
    "PlacementReopened",
    "ReplicaMarkedBad",
    "SiteHeld",
    "SitePaused",
    "SiteResumed",
    "StageReleased",
    "StageRequested",
    "Subscriber",
    "TaskClaimed",
    "TaskCompleted",
    "TaskFailed",
    "TaskRetried",
    "TaskStuck",
    "VersionRegistered",
]

log = logging.getLogger(__name__)


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    at: datetime = field(default_factory=_now)


# -- versions and labels (the manifest side) -----------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class VersionRegistered(Event):
    """A registration finished: a new version, or identical content found again."""

    dataset: str
    version_id: str
    source: str  # "directory:/abs", a URL, "SITE:path" or "manifest:file"
    verified: bool  # the registration hashed every file (not a producer manifest)
    created: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class LabelMoved(Event):
    dataset: str
    label: str
    version_id: str


# -- placements -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class PlacementCreated(Event):
    placement_id: int
    dataset: str
    version_id: str
    site: str
    priority: int
    deadline: datetime | None


@dataclass(frozen=True, slots=True, kw_only=True)
class PlacementPlanned(Event):
    placement_id: int
    site: str
    tasks: dict[str, int]  # kind -> count
    blobs: int
    bytes_to_move: int
    files_present: int
    bytes_present: int


@dataclass(frozen=True, slots=True, kw_only=True)
class PlacementPublishing(Event):
    placement_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class PlacementReady(Event):
    placement_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class PlacementFailed(Event):
    placement_id: int
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class PlacementDamaged(Event):
    """A READY view was found damaged; the placement is not READY until repaired."""

    placement_id: int
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class PlacementReopened(Event):
    """A FAILED, DAMAGED or stale placement was taken for (re)planning."""

    placement_id: int
    previous: str


@dataclass(frozen=True, slots=True, kw_only=True)
class PlacementAtRisk(Event):
    """The placement's ETA passed its deadline (or stopped doing so: ``at_risk`` False)."""

    placement_id: int
    at_risk: bool
    eta: datetime | None
    deadline: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class PlacementEvicted(Event):
    placement_id: int
    site: str
    bytes_freed: int


@dataclass(frozen=True, slots=True, kw_only=True)
class StageRequested(Event):
    request_id: int
    job_id: str
    placement_id: int
    created: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class StageReleased(Event):
    job_id: str
    placement_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkMeasured(Event):
    """The scheduler's current estimate of a link's throughput."""

    src_site: str
    dst_site: str
    bytes_per_second: float


# -- tasks ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskClaimed(Event):
    task_id: int
    placement_id: int
    kind: str
    owner: str
    attempt: int


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskCompleted(Event):
    task_id: int
    placement_id: int
    kind: str
    owner: str
    bytes_moved: int  # written at the destination by this attempt
    files: int  # logical progress it completes
    bytes: int


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskRetried(Event):
    task_id: int
    placement_id: int
    kind: str
    error_class: str
    message: str
    attempt: int
    delay_seconds: float


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskStuck(Event):
    """A task failed ``attempts`` times and is still being retried (emitted once per task,
    when it first counts as stuck: ``datasync.transfer.state.tasks.STUCK_AFTER``)."""

    task_id: int
    placement_id: int
    kind: str
    attempts: int  # failed attempts so far: the task's counter, which never resets
    since: str  # ISO time of its first recorded failure
    error_class: str
    message: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SitePaused(Event):
    """A site's health probe failed: its queued tasks wait until ``until`` (attempts kept)."""

    site: str
    until: datetime
    reason: str
    tasks: int  # queued tasks held


@dataclass(frozen=True, slots=True, kw_only=True)
class SiteHeld(Event):
    """An operator paused a site: no task of it is claimed until ``until`` or a resume."""

    site: str
    until: datetime
    reason: str
    by: str  # who paused it (token name, or "local" for the CLI)


@dataclass(frozen=True, slots=True, kw_only=True)
class SiteResumed(Event):
    """An operator resumed a paused site: its tasks are claimable again."""

    site: str
    by: str


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskFailed(Event):
    """A task failed for good (permanent error, budget spent, or its workers kept dying)."""

    task_id: int
    placement_id: int
    kind: str
    error_class: str
    message: str


# -- replicas and bytes ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class BlobReplicated(Event):
    """A blob's bytes were verified in a site's blob store and recorded."""

    site: str
    digest: str
    size: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ChunkVerified(Event):
    """A part of a large blob was verified chunk by chunk and written."""

    site: str
    digest: str
    part: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplicaMarkedBad(Event):
    site: str
    digest: str
    key: str
    kind: str
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class LabelsSynced(Event):
    site: str
    dataset: str
    labels: dict[str, str | None]  # label -> version id now at the site (None: removed)


Subscriber = Callable[[Event], None]


class EventBus:
    """Synchronous fan-out to subscribers. Thread-safe."""

    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []
        self._lock = threading.Lock()

    def subscribe(self, subscriber: Subscriber) -> None:
        with self._lock:
            self._subscribers.append(subscriber)

    def emit(self, event: Event) -> None:
        with self._lock:
            subscribers = tuple(self._subscribers)
        for subscriber in subscribers:
            try:
                subscriber(event)
            except Exception:  # an observer must never break the engine
                log.exception("event subscriber %r failed on %s", subscriber, type(event).__name__)
