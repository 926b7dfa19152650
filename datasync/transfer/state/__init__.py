"""THE owner of every replication state change: placements, tasks, replicas, uploads.

No other module writes the ``placements``, ``tasks``, ``replicas``, ``stage_requests``,
``pins``, ``link_stats``, ``blob_moves``, ``blob_waits`` or ``site_pauses`` tables
(``tests/unit/test_state_owner.py`` scans the package for writes elsewhere). Each
transition is a method; each emits a typed event (``datasync.events``) after its
transaction committed, to the subscribers the composition root registered.

``EngineState`` groups the parts; build it once per process (``bootstrap``).
"""

from __future__ import annotations

from collections.abc import Mapping

from sqlalchemy.engine import Engine

from datasync.events import EventBus
from datasync.transfer.state._core import as_utc, row_id
from datasync.transfer.state.pauses import Pause, SitePauses, active_pauses
from datasync.transfer.state.placements import PlacementStates
from datasync.transfer.state.replicas import DEFAULT_RECHECK, ReplicaRow, ReplicaStates
from datasync.transfer.state.sharing import BlobSharing, BlobWant
from datasync.transfer.state.staging import AT_RISK_BOOST, StagingStates
from datasync.transfer.state.tasks import (
    ERROR_HISTORY,
    STUCK_AFTER,
    Cancelled,
    ClaimedTask,
    NewTask,
    RetryDecider,
    TaskStates,
    error_entry,
)
from datasync.transfer.state.uploads import ChunkMap, UploadState

__all__ = [
    "AT_RISK_BOOST",
    "DEFAULT_RECHECK",
    "ERROR_HISTORY",
    "STUCK_AFTER",
    "BlobSharing",
    "BlobWant",
    "Cancelled",
    "ChunkMap",
    "ClaimedTask",
    "EngineState",
    "NewTask",
    "Pause",
    "PlacementStates",
    "ReplicaRow",
    "ReplicaStates",
    "RetryDecider",
    "SitePauses",
    "StagingStates",
    "TaskStates",
    "UploadState",
    "active_pauses",
    "as_utc",
    "error_entry",
    "row_id",
]


class EngineState:
    """The state owner's four parts over one engine and one event bus."""

    def __init__(
        self,
        engine: Engine,
        bus: EventBus,
        retry: RetryDecider,
        link_caps: Mapping[tuple[str, str], int] | None = None,
    ) -> None:
        self.engine = engine
        self.bus = bus
        self.placements = PlacementStates(engine, bus)
        self.tasks = TaskStates(engine, bus, retry, link_caps)
        self.replicas = ReplicaStates(engine, bus)
        self.uploads = ChunkMap(engine, bus)
        self.staging = StagingStates(engine, bus)
        self.sharing = BlobSharing(engine, bus)
        self.pauses = SitePauses(engine, bus)
