"""Completing leased tasks: any number of one owner's tasks in one transaction.

A worker hands in every task that finished since its last look at once
(``TaskStates.complete_many``, group commit); ``complete`` is the batch of one. Per
batch, whatever its size: one statement marks the tasks done, one unblocks their parents
(and the publish tasks of placements waiting on their blobs), one credits their placements.

Invariants:

* Only the lease owner completes: a task whose lease was taken over, that failed or that
  is already done is left as it is and reported not completed; the rest of the batch
  still completes.
* Rows are locked in one order, the one ``StagingStates.schedule`` uses: task rows before
  placement rows, tasks in descending id order (children before parents: a parent is
  inserted before its children), placements likewise. PostgreSQL therefore never finds a
  deadlock between two batches, a batch and a heartbeat, or a batch and a schedule.
* Completing a ``publish`` task makes its placement READY; a placement whose tasks add no
  files or bytes is not written (its row is the hottest of the batch).
* Events (``TaskCompleted``, ``PlacementReady``) are emitted after the commit.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlmodel import col

from datasync.db.transfer_tables import Placement, Task
from datasync.events import PlacementPublishing, PlacementReady, TaskCompleted
from datasync.models import PlacementState
from datasync.transfer.payloads import TaskKind
from datasync.transfer.state._core import Txn
from datasync.transfer.state.claim_sql import returning_columns
from datasync.transfer.state.sharing import take_waits

__all__ = ["Completion", "Credit", "complete_tasks", "write_placements"]

_TS = sa.DateTime(timezone=True)
_RETURNING = "id, parent_id, placement_id, kind, files, bytes, waiters, bytes_moved"
# Lock the owner's rows first, in descending id order, then mark them done.
_DONE_PG = sa.text(
    f"""
WITH mine AS MATERIALIZED (
    SELECT id FROM tasks
     WHERE id = ANY(CAST(:ids AS bigint[])) AND state = 'leased' AND lease_owner = :owner
     ORDER BY id DESC
       FOR UPDATE)
UPDATE tasks AS t
   SET state = 'done', lease_expires_at = NULL, finished_at = now(), bytes_moved = d.moved
  FROM mine, unnest(CAST(:ids AS bigint[]), CAST(:moved AS bigint[])) AS d(id, moved)
 WHERE t.id = mine.id AND d.id = mine.id
RETURNING {", ".join(f"t.{c.strip()}" for c in _RETURNING.split(","))}
"""
).columns(*returning_columns(_RETURNING, {}))
# SQLite: no row locks (``BEGIN IMMEDIATE`` holds the database's); :done is [[id, moved]].
_DONE_SQLITE = (
    sa.text(
        f"""
UPDATE tasks
   SET state = 'done', lease_expires_at = NULL, finished_at = :now, bytes_moved = d.moved
  FROM (SELECT json_extract(value, '$[0]') AS id, json_extract(value, '$[1]') AS moved
          FROM json_each(:done)) AS d
 WHERE tasks.id = d.id AND tasks.state = 'leased' AND tasks.lease_owner = :owner
RETURNING {", ".join(f"tasks.{c.strip()}" for c in _RETURNING.split(","))}
"""
    )
    .bindparams(sa.bindparam("now", type_=_TS))
    .columns(*returning_columns(_RETURNING, {}))
)
_UNBLOCK = (
    sa.update(Task)
    .where(col(Task.id) == sa.bindparam("task_id"))
    .values(blocked_by=col(Task.blocked_by) - sa.bindparam("n"))
)


@dataclass(slots=True)
class Credit:
    """What a batch adds to one placement."""

    files: int = 0
    nbytes: int = 0
    publish: bool = False  # a publish task of this placement completed


@dataclass(slots=True)
class Completion:
    """The tasks a batch completed, and the placement writes it still owes (made by
    ``write_placements`` once every task row of the transaction is written)."""

    done: set[int] = field(default_factory=set)
    credits: dict[int, Credit] = field(default_factory=dict)


def complete_tasks(txn: Txn, owner: str, moved: Mapping[int, int]) -> Completion:
    """Mark the tasks of ``moved`` (task id -> bytes it moved) that ``owner`` still holds
    done, in ``txn``, and unblock their parents; their placements are left to
    ``write_placements``."""
    if not moved:
        return Completion()
    ids = sorted(moved, reverse=True)
    if txn.pg:
        rows = txn.conn.execute(
            _DONE_PG, {"ids": ids, "moved": [moved[i] for i in ids], "owner": owner}
        )
    else:
        done = json.dumps([[i, moved[i]] for i in ids])
        rows = txn.conn.execute(_DONE_SQLITE, {"done": done, "owner": owner, "now": txn.now})
    finished = sorted(rows.all())
    unblock: dict[int, int] = defaultdict(int)  # task id -> blocks to remove
    credits: dict[int, Credit] = defaultdict(Credit)
    movers: list[int] = []
    for task_id, parent_id, placement_id, kind, files, nbytes, waiters, bytes_moved in finished:
        txn.emit(
            TaskCompleted(
                task_id=task_id,
                placement_id=placement_id,
                kind=kind,
                owner=owner,
                bytes_moved=bytes_moved,
                files=files,
                bytes=nbytes,
            )
        )
        if parent_id is not None:
            unblock[parent_id] += 1
        if waiters:  # other placements waited for the blobs this task moved
            movers.append(task_id)
        if files or nbytes or kind == TaskKind.PUBLISH:
            credit = credits[placement_id]
            credit.files += files
            credit.nbytes += nbytes
            credit.publish |= kind == TaskKind.PUBLISH
    for publish_id, placement_id, files, nbytes in take_waits(txn, movers):
        unblock[publish_id] += 1
        credit = credits[placement_id]
        credit.files += files
        credit.nbytes += nbytes
    if unblock:
        txn.conn.execute(
            _UNBLOCK,
            [{"task_id": t, "n": n} for t, n in sorted(unblock.items(), reverse=True)],
        )
    return Completion({row[0] for row in finished}, dict(credits))


def write_placements(
    txn: Txn, credits: Mapping[int, Credit], publishing: Collection[int] = ()
) -> None:
    """The placement writes of a transaction, in descending id order: progress credited
    (a completed publish makes its placement READY), and placements whose publish task
    was just claimed entering PUBLISHING."""
    for placement_id in sorted({*credits, *publishing}, reverse=True):
        credit = credits.get(placement_id)
        if credit is not None:
            _credit(txn, placement_id, credit)
        if placement_id in publishing:
            entered = txn.conn.execute(
                sa.update(Placement)
                .where(
                    col(Placement.id) == placement_id,
                    col(Placement.state) == PlacementState.TRANSFERRING,
                )
                .values(state=PlacementState.PUBLISHING, updated_at=txn.clock)
            )
            if entered.rowcount:
                txn.entered(placement_id, PlacementState.PUBLISHING)
                txn.emit(PlacementPublishing(placement_id=placement_id))


def _credit(txn: Txn, placement_id: int, credit: Credit) -> None:
    values = {
        "files_done": col(Placement.files_done) + credit.files,
        "bytes_done": col(Placement.bytes_done) + credit.nbytes,
        "updated_at": txn.clock,
    }
    if credit.publish:
        became_ready = txn.conn.execute(
            sa.update(Placement)
            .where(
                col(Placement.id) == placement_id,
                col(Placement.state).in_((PlacementState.PUBLISHING, PlacementState.TRANSFERRING)),
            )
            .values(state=PlacementState.READY, error=None, last_used_at=txn.clock, **values)
        )
        if became_ready.rowcount:
            txn.entered(placement_id, PlacementState.READY)
            txn.emit(PlacementReady(placement_id=placement_id))
            return
    if credit.files or credit.nbytes:
        txn.conn.execute(
            sa.update(Placement).where(col(Placement.id) == placement_id).values(**values)
        )
