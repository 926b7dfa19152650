"""Stage requests, pins, deadline slack and link statistics: the scheduling side's writes.

Invariants:

* A stage request is one row per ``(job_id, placement)``: asking twice returns the same
  request (idempotent). While not released it holds the pin ``job:<id>`` on its placement.
* A pinned placement (a pin not past its ``expires_at``) is never evicted.
* ``schedule`` sets every unfinished task of a placement to the placement's latest start
  time (the claim's first sort key) and its at-risk flag; an at-risk placement's tasks get
  ``AT_RISK_BOOST`` priority on top, so among equally late work they go first.
* Link statistics are an exponentially weighted average of measured throughput, persisted
  so that a restarted scheduler does not start from nothing.
"""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import col

from datasync.db.ops_tables import LinkStat, Pin, StageRequest
from datasync.db.transfer_tables import NO_DEADLINE, Placement, Task
from datasync.events import (
    LinkMeasured,
    PlacementAtRisk,
    PlacementEvicted,
    StageReleased,
    StageRequested,
)
from datasync.models import PlacementState, TaskState
from datasync.transfer.state._core import StateBase, Txn, row_id

__all__ = ["AT_RISK_BOOST", "EWMA_WEIGHT", "StagingStates"]

AT_RISK_BOOST = 1000
EWMA_WEIGHT = 0.3  # weight of a new measurement in the link's running average


def _upsert(txn: Txn, table: type[Pin] | type[LinkStat]) -> object:
    return postgresql.insert(table) if txn.pg else sqlite.insert(table)


class StagingStates(StateBase):
    """Every write to ``stage_requests``, ``pins`` and ``link_stats``, and the scheduling
    columns of ``placements`` and ``tasks``."""

    # -- stage requests and pins ---------------------------------------------------------

    def request(
        self, job_id: str, placement_id: int, deadline: datetime | None
    ) -> tuple[int, bool]:
        """The job's request for the placement, created (and pinned) if new. ``(id, created)``.

        Asking again un-releases a released request (the job wants the data again)."""
        with self._write() as txn:
            found = txn.conn.execute(
                sa.select(col(StageRequest.id), col(StageRequest.released_at)).where(
                    col(StageRequest.job_id) == job_id,
                    col(StageRequest.placement_id) == placement_id,
                )
            ).one_or_none()
            if found is not None:
                request_id, created = row_id(found.id), False
                if found.released_at is not None:
                    txn.conn.execute(
                        sa.update(StageRequest)
                        .where(col(StageRequest.id) == request_id)
                        .values(released_at=None)
                    )
            else:
                try:
                    with txn.conn.begin_nested():
                        request_id = row_id(
                            txn.conn.execute(
                                sa.insert(StageRequest)
                                .values(
                                    job_id=job_id,
                                    placement_id=placement_id,
                                    deadline=deadline,
                                    created_at=txn.now,
                                )
                                .returning(col(StageRequest.id))
                            ).scalar_one()
                        )
                    created = True
                except sa.exc.IntegrityError:  # a concurrent identical request (PostgreSQL)
                    request_id = row_id(
                        txn.conn.execute(
                            sa.select(col(StageRequest.id)).where(
                                col(StageRequest.job_id) == job_id,
                                col(StageRequest.placement_id) == placement_id,
                            )
                        ).scalar_one()
                    )
                    created = False
            self._pin(txn, placement_id, f"job:{job_id}", None)
            self._touch(txn, placement_id)
            txn.emit(
                StageRequested(
                    request_id=request_id,
                    job_id=job_id,
                    placement_id=placement_id,
                    created=created,
                )
            )
            return request_id, created

    def release(self, job_id: str, placement_ids: list[int] | None = None) -> list[int]:
        """Release the job's requests (all, or those of ``placement_ids``) and their pins.
        Returns the placements released."""
        with self._write() as txn:
            query = sa.select(col(StageRequest.placement_id)).where(
                col(StageRequest.job_id) == job_id, col(StageRequest.released_at).is_(None)
            )
            if placement_ids is not None:
                query = query.where(col(StageRequest.placement_id).in_(placement_ids))
            released = [int(p) for p in txn.conn.execute(query).scalars()]
            if not released:
                return []
            txn.conn.execute(
                sa.update(StageRequest)
                .where(
                    col(StageRequest.job_id) == job_id,
                    col(StageRequest.placement_id).in_(released),
                )
                .values(released_at=txn.now)
            )
            txn.conn.execute(
                sa.delete(Pin).where(
                    col(Pin.holder) == f"job:{job_id}", col(Pin.placement_id).in_(released)
                )
            )
            txn.emit(StageReleased(job_id=job_id, placement_ids=tuple(released)))
            return released

    def pin(self, placement_id: int, holder: str, expires_at: datetime | None) -> None:
        """Keep the placement's view from eviction for ``holder`` (until ``expires_at``)."""
        with self._write() as txn:
            self._pin(txn, placement_id, holder, expires_at)

    def unpin(self, holder: str, placement_ids: list[int] | None = None) -> int:
        with self._write() as txn:
            query = sa.delete(Pin).where(col(Pin.holder) == holder)
            if placement_ids is not None:
                query = query.where(col(Pin.placement_id).in_(placement_ids))
            return int(txn.conn.execute(query).rowcount or 0)

    def touch(self, placement_id: int) -> None:
        """A job used the placement's view: it moves to the back of the eviction order."""
        with self._write() as txn:
            self._touch(txn, placement_id)

    @staticmethod
    def _pin(txn: Txn, placement_id: int, holder: str, expires_at: datetime | None) -> None:
        stmt = _upsert(txn, Pin).values(  # type: ignore[attr-defined]
            placement_id=placement_id, holder=holder, created_at=txn.now, expires_at=expires_at
        )
        txn.conn.execute(
            stmt.on_conflict_do_update(
                index_elements=["placement_id", "holder"], set_={"expires_at": expires_at}
            )
        )

    @staticmethod
    def _touch(txn: Txn, placement_id: int) -> None:
        txn.conn.execute(
            sa.update(Placement)
            .where(col(Placement.id) == placement_id)
            .values(last_used_at=txn.now)
        )

    # -- deadline slack ------------------------------------------------------------------

    def schedule(
        self,
        placement_id: int,
        *,
        latest_start: datetime | None,
        at_risk: bool,
        eta: datetime | None,
    ) -> None:
        """Record the placement's latest start and risk, on it and its unfinished tasks."""
        with self._write() as txn:
            row = txn.conn.execute(
                sa.select(
                    col(Placement.at_risk), col(Placement.deadline), col(Placement.priority)
                ).where(col(Placement.id) == placement_id)
            ).one_or_none()
            if row is None:
                return
            priority = int(row.priority) + (AT_RISK_BOOST if at_risk else 0)
            # Tasks before the placement row, children before parents (highest id first: a
            # parent is inserted before its children), the order ``complete`` locks them in.
            # One UPDATE over the placement's tasks would lock them in heap order and
            # deadlock with a concurrent ``complete`` (found by the multi-host bench).
            ids = (
                txn.conn.execute(
                    sa.select(col(Task.id))
                    .where(
                        col(Task.placement_id) == placement_id,
                        col(Task.state).in_((TaskState.QUEUED, TaskState.LEASED)),
                    )
                    .order_by(col(Task.id).desc())
                    .with_for_update()
                )
                .scalars()
                .all()
            )
            if ids:
                txn.conn.execute(
                    sa.update(Task)
                    .where(col(Task.id).in_(ids))
                    .values(latest_start=latest_start or NO_DEADLINE, priority=priority)
                )
            txn.conn.execute(
                sa.update(Placement)
                .where(col(Placement.id) == placement_id)
                .values(at_risk=at_risk)
            )
            if bool(row.at_risk) != at_risk and row.deadline is not None:
                txn.emit(
                    PlacementAtRisk(
                        placement_id=placement_id, at_risk=at_risk, eta=eta, deadline=row.deadline
                    )
                )

    def record_link(self, src: str, dst: str, bytes_per_second: float) -> float:
        """Fold a throughput measurement into the link's running average; return it."""
        with self._write() as txn:
            old = txn.conn.execute(
                sa.select(col(LinkStat.bytes_per_second), col(LinkStat.samples)).where(
                    col(LinkStat.src_site) == src, col(LinkStat.dst_site) == dst
                )
            ).one_or_none()
            if old is None:
                value, samples = bytes_per_second, 1
            else:
                value = (1 - EWMA_WEIGHT) * float(old[0]) + EWMA_WEIGHT * bytes_per_second
                samples = int(old[1]) + 1
            stmt = _upsert(txn, LinkStat).values(  # type: ignore[attr-defined]
                src_site=src,
                dst_site=dst,
                bytes_per_second=value,
                samples=samples,
                updated_at=txn.now,
            )
            txn.conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=["src_site", "dst_site"],
                    set_={"bytes_per_second": value, "samples": samples, "updated_at": txn.now},
                )
            )
            txn.emit(LinkMeasured(src_site=src, dst_site=dst, bytes_per_second=value))
            return value

    def penalize(self, src: str, dst: str, until: datetime) -> None:
        """Reads over ``src -> dst`` failed for good: prefer other sources until ``until``."""
        with self._write() as txn:
            stmt = _upsert(txn, LinkStat).values(  # type: ignore[attr-defined]
                src_site=src,
                dst_site=dst,
                bytes_per_second=0.0,
                samples=0,
                updated_at=txn.now,
                penalty_until=until,
            )
            txn.conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=["src_site", "dst_site"], set_={"penalty_until": until}
                )
            )

    # -- eviction ------------------------------------------------------------------------

    def evicted(self, placement_id: int, site: str, bytes_freed: int) -> bool:
        """The placement's view was unpublished and its blobs freed: EVICTED."""
        with self._write() as txn:
            hit = txn.conn.execute(
                sa.update(Placement)
                .where(
                    col(Placement.id) == placement_id,
                    col(Placement.state).in_((PlacementState.READY, PlacementState.DAMAGED)),
                )
                .values(state=PlacementState.EVICTED, error=None, updated_at=txn.now)
            )
            if hit.rowcount:
                txn.entered(placement_id, PlacementState.EVICTED, f"{bytes_freed} bytes freed")
                txn.emit(
                    PlacementEvicted(placement_id=placement_id, site=site, bytes_freed=bytes_freed)
                )
            return bool(hit.rowcount)
