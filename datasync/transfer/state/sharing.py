"""Blobs in flight are moved once per site, however many placements need them.

Rucio files one transfer per (file, destination) whatever number of rules want it; here
the unit of planning is the placement, so sharing is explicit:

* Filing a ``blobs`` or ``finalize`` task records it as the *mover* of each of its blobs to
  its site (``blob_moves``).
* A placement planned while another placement's queued or leased task is moving a blob it
  needs does not move it again: it *waits* (``blob_waits``), holding one count in its
  publish task's ``blocked_by`` per blob, and bumping the mover's ``waiters``. Attaching
  checks the mover is still queued or leased in the same statement that bumps it, so a
  mover cannot complete unseen in between.
* When the mover completes, the same transaction credits each waiting placement with the
  blob's files and bytes and releases its publish counts (``take_waits``).
* When the mover ends any other way (failed, its placement failed or was re-planned or
  removed), ``settle_orphans`` (a worker chore) releases the waits and returns the waiting
  placements so they are planned again: the blob is then present, in flight elsewhere, or
  moved by the waiter itself.
* A waiter's urgency is the mover's: ``inherit_urgency`` (each scheduler tick) gives the
  mover, and a chunked blob's chunk tasks, the smallest latest start and the highest
  priority among the placements waiting on it (priority inheritance).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import aliased
from sqlmodel import col

from datasync.db.transfer_tables import BlobMove, BlobWait, Placement, Task
from datasync.models import PlacementState, TaskState
from datasync.transfer.payloads import BlobsPayload, FinalizePayload, Payload
from datasync.transfer.state._core import StateBase, Txn, row_id

__all__ = [
    "BlobSharing",
    "BlobWant",
    "attach_waits",
    "moved_blobs",
    "record_moves",
    "take_waits",
]

_ACTIVE = (TaskState.QUEUED, TaskState.LEASED)
# Waiting placements still worth planning again when their mover is gone.
_REPLAN = (PlacementState.PLANNING, PlacementState.TRANSFERRING)


@dataclass(frozen=True, slots=True)
class BlobWant:
    """A blob a placement needs that another placement's task ``mover_id`` is moving."""

    digest: str
    files: int  # the waiter's paths holding it
    nbytes: int  # logical bytes credited to the waiter on arrival (size x files)
    mover_id: int


def moved_blobs(payload: Payload) -> tuple[str, ...]:
    """The digests a task brings into its site's blob store (none for publish, labels)."""
    match payload:
        case BlobsPayload():
            return tuple(item.digest for item in payload.items)
        case FinalizePayload():
            return (payload.blob.digest,)
        case _:
            return ()


def record_moves(txn: Txn, site: str, moves: Iterable[tuple[str, int]]) -> None:
    """Name ``task_id`` the mover of each ``(digest, task_id)`` to ``site`` (newest wins:
    the planner files a mover only when no live one exists)."""
    rows = [{"site": site, "digest": d, "task_id": t} for d, t in moves]
    if not rows:
        return
    insert = (postgresql.insert if txn.pg else sqlite.insert)(BlobMove)
    txn.conn.execute(
        insert.on_conflict_do_update(
            index_elements=["site", "digest"], set_={"task_id": insert.excluded.task_id}
        ),
        rows,
    )


def attach_waits(
    txn: Txn, placement_id: int, publish_id: int, wants: Sequence[BlobWant]
) -> list[BlobWant]:
    """Make the placement wait for each wanted blob's mover. A mover that completed
    meanwhile credits the placement at once; one that is gone is returned: the caller
    moves those blobs itself."""
    by_mover: dict[int, list[BlobWant]] = defaultdict(list)
    for want in wants:
        by_mover[want.mover_id].append(want)
    unresolved: list[BlobWant] = []
    credit_files = credit_bytes = waiting = 0
    for mover, mine in by_mover.items():
        live = txn.conn.execute(
            sa.update(Task)
            .where(col(Task.id) == mover, col(Task.state).in_(_ACTIVE))
            .values(waiters=col(Task.waiters) + len(mine))
            .returning(col(Task.id))
        ).first()
        if live is not None:
            txn.conn.execute(
                sa.insert(BlobWait),
                [
                    {
                        "mover_id": mover,
                        "publish_id": publish_id,
                        "placement_id": placement_id,
                        "digest": w.digest,
                        "files": w.files,
                        "bytes": w.nbytes,
                    }
                    for w in mine
                ],
            )
            waiting += len(mine)
            continue
        state = txn.conn.execute(
            sa.select(col(Task.state)).where(col(Task.id) == mover)
        ).scalar_one_or_none()
        if state == TaskState.DONE:  # it arrived between the plan's read and now
            credit_files += sum(w.files for w in mine)
            credit_bytes += sum(w.nbytes for w in mine)
        else:
            unresolved.extend(mine)
    if waiting:
        txn.conn.execute(
            sa.update(Task)
            .where(col(Task.id) == publish_id)
            .values(blocked_by=col(Task.blocked_by) + waiting)
        )
    if credit_files or credit_bytes:
        _credit(txn, placement_id, credit_files, credit_bytes)
    return unresolved


_Waits = Sequence[tuple[int, int, int, int]]  # publish, placement, files, bytes


def take_waits(txn: Txn, mover_ids: Sequence[int]) -> _Waits:
    """The movers completed: remove the waits on them and return them. The caller (the
    completion, same transaction) releases each wait's publish count and credits its
    placement with the blob's files and bytes."""
    if not mover_ids:
        return []
    return _delete_waits(txn, col(BlobWait.mover_id).in_(mover_ids))


_WAIT_COLUMNS = (
    col(BlobWait.publish_id),
    col(BlobWait.placement_id),
    col(BlobWait.files),
    col(BlobWait.bytes),
)


def _delete_waits(txn: Txn, where: sa.ColumnElement[bool]) -> _Waits:
    rows = txn.conn.execute(sa.delete(BlobWait).where(where).returning(*_WAIT_COLUMNS))
    return [(int(a), int(b), int(c), int(d)) for a, b, c, d in rows]


def _release(txn: Txn, waits: _Waits) -> None:
    """Give back the publish counts the waits held."""
    counts: dict[int, int] = defaultdict(int)
    for publish_id, _placement, _files, _bytes in waits:
        counts[publish_id] += 1
    for publish_id, n in counts.items():
        txn.conn.execute(
            sa.update(Task)
            .where(col(Task.id) == publish_id)
            .values(blocked_by=col(Task.blocked_by) - n)
        )


def _credit(txn: Txn, placement_id: int, files: int, nbytes: int) -> None:
    txn.conn.execute(
        sa.update(Placement)
        .where(col(Placement.id) == placement_id)
        .values(
            files_done=col(Placement.files_done) + files,
            bytes_done=col(Placement.bytes_done) + nbytes,
            updated_at=txn.now,
        )
    )


class BlobSharing(StateBase):
    """Reads and chores of blob sharing (the transitions run inside tasks/placements)."""

    def in_flight(self, site: str, digests: Sequence[str], placement_id: int) -> dict[str, int]:
        """Of ``digests``, those another placement's live task is moving to ``site``:
        digest -> mover task id."""
        if not digests:
            return {}
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(col(BlobMove.digest), col(BlobMove.task_id))
                .join(Task, col(Task.id) == col(BlobMove.task_id))
                .where(
                    col(BlobMove.site) == site,
                    col(BlobMove.digest).in_(list(digests)),
                    col(Task.state).in_(_ACTIVE),
                    col(Task.placement_id) != placement_id,
                )
            ).all()
        return {str(d): int(t) for d, t in rows}

    def waiting_on(self, placement_id: int) -> dict[int, int]:
        """Blobs the placement waits for, by the placement moving them: {placement: n}."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(col(Task.placement_id), sa.func.count())
                .select_from(BlobWait)
                .join(Task, col(Task.id) == col(BlobWait.mover_id))
                .where(col(BlobWait.placement_id) == placement_id)
                .group_by(col(Task.placement_id))
            ).all()
        return {int(p): int(n) for p, n in rows}

    def settle_orphans(self) -> list[int]:
        """Release waits whose mover ended without completing (or was deleted); return the
        waiting placements to plan again. Also forgets stale ``blob_moves`` rows."""
        with self._write() as txn:
            orphaned = sa.or_(
                col(BlobWait.mover_id).is_(None),
                col(BlobWait.mover_id).in_(
                    sa.select(col(Task.id)).where(col(Task.state).not_in(_ACTIVE))
                ),
            )
            waits = _delete_waits(txn, orphaned)
            _release(txn, waits)
            txn.conn.execute(
                sa.delete(BlobMove).where(
                    col(BlobMove.task_id).in_(
                        sa.select(col(Task.id)).where(col(Task.state).not_in(_ACTIVE))
                    )
                )
            )
            if not waits:
                return []
            placements = sorted({int(w[1]) for w in waits})
            return [
                row_id(p)
                for p in txn.conn.execute(
                    sa.select(col(Placement.id)).where(
                        col(Placement.id).in_(placements), col(Placement.state).in_(_REPLAN)
                    )
                ).scalars()
            ]

    def inherit_urgency(self) -> int:
        """Give each mover (and a chunked blob's chunk tasks) the smallest latest start and
        highest priority of the placements waiting on it. Returns the tasks changed."""
        waiter = aliased(Task, name="waiter")
        urgency = (
            sa.select(
                col(BlobWait.mover_id).label("mover"),
                sa.func.min(col(waiter.latest_start)).label("latest_start"),
                sa.func.max(col(waiter.priority)).label("priority"),
            )
            .join(waiter, col(waiter.id) == col(BlobWait.publish_id))
            .where(col(BlobWait.mover_id).is_not(None))
            .group_by(col(BlobWait.mover_id))
            .subquery()
        )
        changed = 0
        with self._write() as txn:
            for mover, latest_start, priority in txn.conn.execute(sa.select(urgency)).all():
                movers = sa.and_(
                    sa.or_(col(Task.id) == mover, col(Task.parent_id) == mover),
                    col(Task.state).in_(_ACTIVE),
                )
                for column, value, later in (
                    (col(Task.latest_start), latest_start, col(Task.latest_start) > latest_start),
                    (col(Task.priority), priority, col(Task.priority) < priority),
                ):
                    result = txn.conn.execute(
                        sa.update(Task).where(movers, later).values({column: value})
                    )
                    changed += result.rowcount
        return changed
