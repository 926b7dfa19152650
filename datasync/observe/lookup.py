"""What events leave out, read from the database for the observers (metrics, logs).

Events name placements and tasks by id; metrics need the destination site (a bounded
label) and logs the version. These reads are small, cached where the answer never
changes (a placement's dataset, version and site), and never count anything: the numbers
always come from the event. A database that does not answer gives ``unknown`` labels
rather than a lost count.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.sql import Executable
from sqlmodel import col

from datasync.db.engine import DB_UNAVAILABLE
from datasync.db.transfer_tables import Placement, Task
from datasync.transfer.state import as_utc

__all__ = ["UNKNOWN", "Lookup", "PlacementInfo", "link_of"]

log = logging.getLogger(__name__)
UNKNOWN = "unknown"
MIXED = "mixed"
_CACHE_SIZE = 4096


@dataclass(frozen=True, slots=True)
class PlacementInfo:
    dataset: str
    version_id: str
    site: str

    @property
    def ref(self) -> str:
        return f"{self.dataset}@{self.version_id[:12]}"


_NO_PLACEMENT = PlacementInfo(UNKNOWN, UNKNOWN, UNKNOWN)


def link_of(payload: dict[str, Any]) -> tuple[str, str]:
    """``(src, dst)`` of a task payload: the source the planner chose (``mixed`` for a batch
    read from several sites) and the destination site."""
    blob = payload.get("blob")
    if isinstance(blob, dict):  # chunks, finalize
        return str(blob.get("src", {}).get("site", UNKNOWN)), str(blob.get("dst_site", UNKNOWN))
    dst = str(payload.get("dst_site", UNKNOWN))
    sources = {str(item.get("src", {}).get("site", UNKNOWN)) for item in payload.get("items", ())}
    if not sources:  # publish, labels: nothing read from elsewhere
        return dst, dst
    return (sources.pop() if len(sources) == 1 else MIXED), dst


class Lookup:
    """Cached reads of placements and tasks for labels. Thread-safe."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._placements: OrderedDict[int, PlacementInfo] = OrderedDict()
        self._lock = threading.Lock()

    def placement(self, placement_id: int) -> PlacementInfo:
        with self._lock:
            hit = self._placements.get(placement_id)
            if hit is not None:
                self._placements.move_to_end(placement_id)
                return hit
        query = sa.select(
            col(Placement.dataset), col(Placement.version_id), col(Placement.site)
        ).where(col(Placement.id) == placement_id)
        row = self._read(query)
        if row is None:
            return _NO_PLACEMENT
        info = PlacementInfo(str(row[0]), str(row[1]), str(row[2]))
        with self._lock:
            self._placements[placement_id] = info
            while len(self._placements) > _CACHE_SIZE:
                self._placements.popitem(last=False)
        return info

    def placement_times(self, placement_id: int) -> tuple[datetime | None, datetime | None]:
        """``(created_at, deadline)`` as they are now (a deadline can be changed)."""
        query = sa.select(col(Placement.created_at), col(Placement.deadline)).where(
            col(Placement.id) == placement_id
        )
        row = self._read(query)
        return (None, None) if row is None else (as_utc(row[0]), as_utc(row[1]))

    def task_link(self, task_id: int) -> tuple[str, str]:
        row = self._read(sa.select(col(Task.payload)).where(col(Task.id) == task_id))
        if row is None or not isinstance(row[0], dict):
            return UNKNOWN, UNKNOWN
        return link_of(row[0])

    def _read(self, query: Executable) -> tuple[Any, ...] | None:
        try:
            with self.engine.connect() as conn:
                row = conn.execute(query).one_or_none()
                return None if row is None else tuple(row)
        except DB_UNAVAILABLE:
            log.warning("observer lookup failed; labelling %s", UNKNOWN, exc_info=True)
            return None
