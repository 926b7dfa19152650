"""Placement transitions ("version V must be at site S"), each emitting its event.

State machine (``docs/task-states.md`` draws it)::

    PLANNING --planned--> TRANSFERRING --publish claimed--> PUBLISHING --done--> READY
       |  ^                    |                               |                  |
       |  +--reopen------------+---- FAILED <----- permanent error / no source ---+
       |  +--reopen------------------ DAMAGED <---- view or blob found damaged ----+
       +--> FAILED (a blob has no source)

Invariants:

* One row per ``(version, site)``: ``ensure`` returns the existing row to a concurrent
  caller (``BEGIN IMMEDIATE`` on SQLite, the unique constraint under a savepoint on
  PostgreSQL).
* ``reopen`` is a conditional update: of two callers racing to re-plan, exactly one wins.
* ``fail`` never changes a READY placement, and cancels its still-queued tasks in the
  same transaction. Writers lock tasks before the placement row, always, so two
  transactions never wait on each other in a cycle.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlmodel import col

from datasync.db.transfer_tables import NO_DEADLINE, Placement, Task
from datasync.events import (
    PlacementCreated,
    PlacementDamaged,
    PlacementPlanned,
    PlacementReopened,
)
from datasync.models import PlacementState, TaskState
from datasync.transfer.payloads import PublishPayload, link_of
from datasync.transfer.state._core import StateBase, Txn, as_utc, row_id
from datasync.transfer.state.sharing import BlobWant, attach_waits, moved_blobs, record_moves
from datasync.transfer.state.tasks import NewTask, fail_placement, insert_tasks

__all__ = ["PlacementStates"]

_REOPENABLE = (PlacementState.FAILED, PlacementState.DAMAGED, PlacementState.EVICTED)


class PlacementStates(StateBase):
    """Every write to ``placements``."""

    def ensure(
        self,
        *,
        version_pk: int,
        dataset: str,
        version_id: str,
        site: str,
        priority: int | None,
        deadline: datetime | None,
        origin: str = "operator",
        merge: bool = False,
    ) -> tuple[int, bool]:
        """The placement of ``version_pk`` at ``site``, created if needed: ``(id, created)``.

        An existing placement takes the given priority and deadline (and so do its
        unfinished tasks, so the queue reorders at once). With ``merge`` (many jobs or
        policies asking for one version) the deadline only moves earlier and the priority
        only up: the most urgent asker counts."""
        with self._write() as txn:
            found = txn.conn.execute(
                sa.select(col(Placement.id)).where(
                    col(Placement.version_pk) == version_pk, col(Placement.site) == site
                )
            ).scalar_one_or_none()
            if found is not None:
                if merge:
                    now = txn.conn.execute(
                        sa.select(col(Placement.deadline), col(Placement.priority)).where(
                            col(Placement.id) == found
                        )
                    ).one()
                    current = as_utc(now.deadline)
                    if deadline is not None and current is not None:
                        deadline = min(deadline, current)
                    if priority is not None and priority < int(now.priority):
                        priority = None
                self._reprioritize(txn, row_id(found), priority, deadline)
                return row_id(found), False
            values: dict[str, Any] = {
                "dataset": dataset,
                "version_pk": version_pk,
                "version_id": version_id,
                "site": site,
                "priority": priority or 0,
                "deadline": deadline,
                "state": PlacementState.PLANNING,
                "created_at": txn.now,
                "updated_at": txn.now,
                "origin": origin,
            }
            try:
                with txn.conn.begin_nested():
                    new_id = txn.conn.execute(
                        sa.insert(Placement).values(values).returning(col(Placement.id))
                    ).scalar_one()
            except sa.exc.IntegrityError:  # a concurrent caller created it (PostgreSQL)
                existing = txn.conn.execute(
                    sa.select(col(Placement.id)).where(
                        col(Placement.version_pk) == version_pk, col(Placement.site) == site
                    )
                ).scalar_one()
                return row_id(existing), False
            txn.entered(row_id(new_id), PlacementState.PLANNING, f"created by {origin}")
            txn.emit(
                PlacementCreated(
                    placement_id=row_id(new_id),
                    dataset=dataset,
                    version_id=version_id,
                    site=site,
                    priority=priority or 0,
                    deadline=deadline,
                )
            )
            return row_id(new_id), True

    def _reprioritize(
        self, txn: Txn, placement_id: int, priority: int | None, deadline: datetime | None
    ) -> None:
        values: dict[str, Any] = {}
        if priority is not None:
            values["priority"] = priority
        if deadline is not None:
            values["deadline"] = deadline
        if not values:
            return
        # Tasks inherit both (retries never lose priority). Tasks before the placement row.
        txn.conn.execute(
            sa.update(Task)
            .where(
                col(Task.placement_id) == placement_id,
                col(Task.state).in_((TaskState.QUEUED, TaskState.LEASED)),
            )
            .values(**values)
        )
        txn.conn.execute(
            sa.update(Placement)
            .where(col(Placement.id) == placement_id)
            .values(updated_at=txn.now, **values)
        )

    def reopen(self, placement_id: int, *, stale_after: timedelta) -> bool:
        """Take a FAILED, DAMAGED or EVICTED placement, or one whose planner died (PLANNING
        untouched for ``stale_after``), back to PLANNING. True if this caller won it."""
        with self._write() as txn:
            row = txn.conn.execute(
                sa.select(col(Placement.state)).where(col(Placement.id) == placement_id)
            ).scalar_one_or_none()
            taken = txn.conn.execute(
                sa.update(Placement)
                .where(
                    col(Placement.id) == placement_id,
                    sa.or_(
                        col(Placement.state).in_(_REOPENABLE),
                        sa.and_(
                            col(Placement.state) == PlacementState.PLANNING,
                            col(Placement.updated_at) < txn.now - stale_after,
                        ),
                    ),
                )
                .values(state=PlacementState.PLANNING, error=None, updated_at=txn.now)
            )
            if taken.rowcount != 1:
                return False
            txn.entered(placement_id, PlacementState.PLANNING, f"re-planned after {row}")
            txn.emit(PlacementReopened(placement_id=placement_id, previous=str(row)))
            return True

    def reopen_for_repair(self, placement_id: int, reason: str) -> bool:
        """Take a placement that is publishing (or DAMAGED) back to PLANNING because some of
        its blobs were found missing or damaged at the site: they must move again. True if
        this caller won it and must plan."""
        with self._write() as txn:
            row = txn.conn.execute(
                sa.select(col(Placement.state)).where(col(Placement.id) == placement_id)
            ).scalar_one_or_none()
            taken = txn.conn.execute(
                sa.update(Placement)
                .where(
                    col(Placement.id) == placement_id,
                    col(Placement.state).in_(
                        (
                            PlacementState.TRANSFERRING,
                            PlacementState.PUBLISHING,
                            PlacementState.DAMAGED,
                        )
                    ),
                )
                .values(state=PlacementState.PLANNING, error=reason, updated_at=txn.now)
            )
            if taken.rowcount != 1:
                return False
            txn.entered(placement_id, PlacementState.PLANNING, reason)
            txn.emit(PlacementReopened(placement_id=placement_id, previous=str(row)))
            return True

    def begin_planning(
        self,
        placement_id: int,
        publish: PublishPayload,
        *,
        max_attempts: int,
        totals: tuple[int, int],
        present: tuple[int, int],
    ) -> int:
        """Start (re)planning: drop the placement's old tasks, insert its publish task with
        the planning hold (``blocked_by = 1``), and set progress. Returns the publish id.

        Replicas recorded by earlier tasks stay, so nothing verified moves twice."""
        with self._write() as txn:
            row = txn.conn.execute(
                sa.select(col(Placement.priority), col(Placement.deadline)).where(
                    col(Placement.id) == placement_id
                )
            ).one()
            txn.conn.execute(sa.delete(Task).where(col(Task.placement_id) == placement_id))
            (publish_id,) = insert_tasks(
                txn,
                placement_id,
                [NewTask(publish)],
                parent=None,
                priority=int(row.priority),
                deadline=row.deadline or NO_DEADLINE,
                max_attempts=max_attempts,
                hold=1,
            )
            txn.conn.execute(
                sa.update(Placement)
                .where(col(Placement.id) == placement_id)
                .values(
                    state=PlacementState.PLANNING,
                    updated_at=txn.now,
                    files_total=totals[0],
                    bytes_total=totals[1],
                    files_done=present[0],
                    bytes_done=present[1],
                )
            )
            return publish_id

    def add_tasks(
        self,
        placement_id: int,
        publish_id: int,
        tasks: Sequence[NewTask],
        *,
        max_attempts: int,
        wants: Sequence[BlobWant] = (),
    ) -> list[BlobWant]:
        """One page of planned tasks, children of the publish task, in one transaction;
        each ``blobs``/``finalize`` task becomes its blobs' mover at the site. The placement
        waits for ``wants`` (blobs other placements' tasks are moving, see ``sharing``);
        returns those whose mover is gone, for the planner to move itself."""
        with self._write() as txn:
            row = txn.conn.execute(
                sa.select(col(Placement.priority), col(Placement.deadline)).where(
                    col(Placement.id) == placement_id
                )
            ).one()
            ids = insert_tasks(
                txn,
                placement_id,
                tasks,
                parent=publish_id,
                priority=int(row.priority),
                deadline=row.deadline or NO_DEADLINE,
                max_attempts=max_attempts,
            )
            for task, task_id in zip(tasks, ids, strict=True):
                _src, dst = link_of(task.payload)
                record_moves(txn, dst, ((d, task_id) for d in moved_blobs(task.payload)))
            unresolved = attach_waits(txn, placement_id, publish_id, wants) if wants else []
            txn.conn.execute(
                sa.update(Placement)
                .where(col(Placement.id) == placement_id)
                .values(updated_at=txn.now)
            )
            return unresolved

    def finish_planning(
        self,
        placement_id: int,
        publish_id: int,
        planned: PlacementPlanned,
        *,
        failure: str | None = None,
    ) -> PlacementState:
        """Release the planning hold; TRANSFERRING, or FAILED with ``failure``."""
        with self._write() as txn:
            txn.conn.execute(
                sa.update(Task)
                .where(col(Task.id) == publish_id)
                .values(blocked_by=col(Task.blocked_by) - 1)
            )
            if failure is not None:
                fail_placement(txn, placement_id, failure)
                return PlacementState.FAILED
            moved = txn.conn.execute(
                sa.update(Placement)
                .where(
                    col(Placement.id) == placement_id,
                    col(Placement.state) == PlacementState.PLANNING,
                )
                .values(state=PlacementState.TRANSFERRING, error=None, updated_at=txn.now)
            )
            if moved.rowcount:
                txn.entered(placement_id, PlacementState.TRANSFERRING)
            txn.tasks_ready()  # the publish task may be claimable now (nothing to move)
            txn.emit(planned)
            return PlacementState.TRANSFERRING

    def fail(self, placement_id: int, reason: str) -> None:
        with self._write() as txn:
            fail_placement(txn, placement_id, reason)

    def damage(self, placement_id: int, reason: str) -> bool:
        """A READY view was found damaged: DAMAGED until repaired (re-planned)."""
        with self._write() as txn:
            hit = txn.conn.execute(
                sa.update(Placement)
                .where(
                    col(Placement.id) == placement_id,
                    col(Placement.state) == PlacementState.READY,
                )
                .values(state=PlacementState.DAMAGED, error=reason, updated_at=txn.now)
            )
            if hit.rowcount:
                txn.entered(placement_id, PlacementState.DAMAGED, reason)
                txn.emit(PlacementDamaged(placement_id=placement_id, reason=reason))
            return bool(hit.rowcount)
