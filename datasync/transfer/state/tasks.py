"""Task transitions: insert, claim, heartbeat, complete, fail, reap (procrastinate's design).

State machine (``docs/task-states.md`` draws it)::

    queued --claim--> leased --complete--> done
      ^                 |  \\--fail(permanent or budget spent)--> failed
      |                 |
      +--fail(retryable: delay from the retry policy, ``not_before``)
      +--lease expired: the next claim takes the task over (one attempt counted)
    queued --pause_site(a site found down)--> queued, not before the pause ends (no attempt)

Invariants:

* A claim is ONE statement (``claim_sql``). PostgreSQL: ``UPDATE ... WHERE id IN (SELECT
  ... FOR UPDATE SKIP LOCKED LIMIT n) RETURNING``. SQLite: the same UPDATE inside ``BEGIN
  IMMEDIATE`` (the database write lock), so two claimers never get the same task. A link
  with a cap (``link_caps``) never gets more live leases than it; its tasks wait in the
  queue while others' are claimed (then the claim is a few such statements, one
  transaction).
* Claimable = queued, unblocked (``blocked_by = 0``) and due (``not_before <= now``), or
  leased with an expired lease and attempts left. Order: deadline slack first
  (``latest_start`` ASC: the deadline minus the remaining bytes over the link's observed
  throughput, ``NO_DEADLINE`` without one; the scheduler keeps it current), then priority
  DESC, then age. Each branch reads the head of its own partial index, so a claim costs the
  same with ten tasks queued or ten million.
* Only the lease owner can heartbeat, complete or fail a task; a worker whose lease was
  taken over learns it from the return value and must stop (its work is idempotent).
* A worker's turn is one transaction (``complete_and_claim``): the tasks it finished since
  its last turn are completed (``completion``), then its free slots claimed. Rows are
  locked in one order: task rows (descending id, as ``schedule`` and the heartbeat lock
  them) before placement rows (descending id).
* Completing a task decrements its parent's ``blocked_by`` and adds the task's logical
  files/bytes to its placement in the same transaction; completing ``publish`` makes the
  placement READY.
* A permanent failure (or a spent retry budget) fails the task and its placement with an
  actionable reason, and cancels the placement's still-queued tasks.
* Every error is kept in the task's history as ``{at, class, message, attempt}`` (the
  newest ``ERROR_HISTORY``), so a waiting placement can explain itself.
* ``attempts`` is never reset while the task lives (the claim increments it, nothing
  lowers it): a task retried after ``STUCK_AFTER`` failed attempts is **stuck** until it
  completes or its budget is spent (``TaskStuck``, once; ``status`` shows it). A failing
  placement's reason counts its earlier failures from its history, which re-planning
  never clears.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import sqlalchemy as sa
from sqlmodel import col

from datasync.db.engine import DB_UNAVAILABLE
from datasync.db.ops_tables import PlacementHistory
from datasync.db.transfer_tables import NO_DEADLINE, Placement, Task
from datasync.errors import DatasyncError, TransientError
from datasync.events import (
    PlacementFailed,
    SitePaused,
    TaskClaimed,
    TaskFailed,
    TaskRetried,
    TaskStuck,
)
from datasync.models import PlacementState, TaskState
from datasync.transfer.payloads import Payload, TaskKind, encode, kind_of, link_of
from datasync.transfer.state._core import StateBase, Txn, as_utc, row_id
from datasync.transfer.state.claim_sql import claim_statement
from datasync.transfer.state.completion import complete_tasks, write_placements

__all__ = [
    "ERROR_HISTORY",
    "SITE_DOWN",
    "STUCK_AFTER",
    "Cancelled",
    "ClaimedTask",
    "NewTask",
    "RetryDecider",
    "TaskStates",
    "error_entry",
    "fail_placement",
    "insert_tasks",
]

ERROR_HISTORY = 50
# A task still being retried after this many failed attempts is "stuck" (``fail``).
STUCK_AFTER = 3
# Tasks filed outside a placement's plan (``enqueue``): their failure is theirs alone, it
# never fails the placement (a label in the way of a user's file leaves the view READY).
_OUTSIDE_PLAN = frozenset({TaskKind.LABELS})
MAX_MESSAGE = 2000
_TS = sa.DateTime(timezone=True)

HEARTBEAT_PG = sa.text(
    """
UPDATE tasks SET lease_expires_at = now() + make_interval(secs => :lease_seconds)
 WHERE id IN (SELECT id FROM tasks
               WHERE id IN :ids AND state = 'leased' AND lease_owner = :owner
               ORDER BY id DESC
                 FOR UPDATE)
RETURNING id
"""
).bindparams(sa.bindparam("ids", expanding=True))

HEARTBEAT_SQLITE = sa.text(
    """
UPDATE tasks SET lease_expires_at = :until
 WHERE id IN :ids AND state = 'leased' AND lease_owner = :owner
RETURNING id
"""
).bindparams(sa.bindparam("ids", expanding=True), sa.bindparam("until", type_=_TS))


def error_entry(at: datetime, exc: BaseException) -> dict[str, Any]:
    """One line of a task's error history."""
    message = str(exc) or repr(exc)
    if len(message) > MAX_MESSAGE:
        message = message[: MAX_MESSAGE - 3] + "..."
    return {
        "at": at.astimezone(UTC).isoformat(timespec="seconds"),
        "class": type(exc).__name__,
        "message": message,
    }


class RetryDecider(Protocol):
    """What the task queue asks the retry policy (``datasync.retry``)."""

    def task_retry_delay(
        self, attempts: int, max_attempts: int, exc: BaseException
    ) -> float | None:
        """Seconds before the next attempt, or None when the task must fail now."""
        ...


@dataclass(frozen=True, slots=True)
class NewTask:
    """A task the planner wants, with the children that block it (chunks of a finalize)."""

    payload: Payload
    files: int = 0  # logical progress completing it brings to its placement
    nbytes: int = 0
    children: tuple[NewTask, ...] = ()
    move_bytes: int = 0  # physical bytes it moves on its link


@dataclass(frozen=True, slots=True)
class ClaimedTask:
    """A task leased to one owner until ``lease_expires_at`` (extend with ``heartbeat``)."""

    id: int
    placement_id: int
    parent_id: int | None
    kind: TaskKind
    payload: dict[str, Any]  # raw JSON: ``Executor`` decodes it (a bad one fails that task)
    attempts: int
    max_attempts: int
    lease_expires_at: datetime
    priority: int
    deadline: datetime | None
    created_at: datetime
    latest_start: datetime | None = None  # None: no deadline


class Cancelled(Exception):
    """Labels the history entry of a task cancelled because its placement failed."""


def _was_stuck(errors: list[dict[str, Any]] | None) -> bool:
    return any(e.get("stuck") for e in errors or ())


_APPEND_PG = "(errors::jsonb || jsonb_build_array(CAST(:entry AS jsonb)))::json"
_APPEND_SQLITE = "json_insert(errors, '$[#]', json(:entry))"
# The class of the newest entry of a task's error history.
_LAST_CLASS_PG = "(errors::jsonb -> -1 ->> 'class')"
_LAST_CLASS_SQLITE = "json_extract(errors, '$[#-1].class')"
# The error-history class of a pause by ``pause_site``.
SITE_DOWN = "SiteDown"


def fail_placement(txn: Txn, placement_id: int, reason: str) -> None:
    """Mark a placement FAILED with ``reason`` and cancel its queued tasks (same transaction).

    A READY placement stays READY: its view is complete whatever a straggler task says. A
    FAILED one keeps its first reason (the cause; its other tasks' errors are in their
    histories), so each failure is one entry in its history. A placement that failed before
    says how often and since when: re-planning replaces its tasks (and their counters), but
    its history is never reset (no Rucio-style cycle between retrying and stuck that hides
    how long it has been failing).
    """
    now = txn.now
    before, first = txn.conn.execute(
        sa.select(sa.func.count(), sa.func.min(col(PlacementHistory.at))).where(
            col(PlacementHistory.placement_id) == placement_id,
            col(PlacementHistory.state) == PlacementState.FAILED,
        )
    ).one()
    if before:
        since = (as_utc(first) or now).isoformat(timespec="seconds")
        reason = f"{reason} (failure {before + 1} of this placement since {since})"
    entry = error_entry(now, Cancelled(f"placement {placement_id} failed: {reason}"))
    append = _APPEND_PG if txn.pg else _APPEND_SQLITE
    txn.conn.execute(
        sa.text(
            f"UPDATE tasks SET state = 'failed', finished_at = :now, errors = {append}"
            " WHERE placement_id = :id AND state = 'queued'"
            " AND EXISTS (SELECT 1 FROM placements p WHERE p.id = :id AND p.state <> 'READY')"
        ).bindparams(sa.bindparam("now", type_=_TS)),
        {"now": now, "id": placement_id, "entry": json.dumps(entry)},
    )
    failed = txn.conn.execute(
        sa.update(Placement)
        .where(
            col(Placement.id) == placement_id,
            col(Placement.state).not_in((PlacementState.READY, PlacementState.FAILED)),
        )
        .values(state=PlacementState.FAILED, error=reason, updated_at=now)
    )
    if failed.rowcount:
        txn.entered(placement_id, PlacementState.FAILED, reason)
        txn.emit(PlacementFailed(placement_id=placement_id, reason=reason))


def _deadline(value: datetime) -> datetime | None:
    aware = as_utc(value)
    return None if aware is None or aware.year == NO_DEADLINE.year else aware


def _claimed(r: sa.RowMapping) -> ClaimedTask:
    return ClaimedTask(
        id=r["id"],
        placement_id=r["placement_id"],
        parent_id=r["parent_id"],
        kind=TaskKind(r["kind"]),
        payload=r["payload"],
        attempts=r["attempts"],
        max_attempts=r["max_attempts"],
        lease_expires_at=as_utc(r["lease_expires_at"]) or datetime.now(UTC),
        priority=r["priority"],
        deadline=_deadline(r["deadline"]),
        created_at=as_utc(r["created_at"]) or datetime.now(UTC),
        latest_start=_deadline(r["latest_start"]),
    )


def _claim_order(task: ClaimedTask) -> tuple[datetime, int, datetime, int]:
    return (task.latest_start or NO_DEADLINE, -task.priority, task.created_at, task.id)


def insert_tasks(
    txn: Txn,
    placement_id: int,
    tasks: Sequence[NewTask],
    *,
    parent: int | None,
    priority: int,
    deadline: datetime,
    max_attempts: int,
    hold: int = 0,
    latest_start: datetime | None = None,
) -> list[int]:
    """Insert ``tasks`` (and, recursively, their children) under ``parent``, whose
    ``blocked_by`` grows by one per task. ``hold`` adds extra blocks (the planning hold).
    Returns the new ids, in order. Idle workers are woken when the transaction commits
    (``Txn.tasks_ready``)."""
    if not tasks:
        return []
    now = txn.now

    def row(task: NewTask) -> dict[str, Any]:
        src, dst = link_of(task.payload)
        return {
            "src_site": src,
            "dst_site": dst,
            "move_bytes": task.move_bytes,
            "latest_start": latest_start or deadline,
            "placement_id": placement_id,
            "parent_id": parent,
            "kind": kind_of(task.payload),
            "state": TaskState.QUEUED,
            "priority": priority,
            "deadline": deadline,
            "created_at": now,
            "not_before": now,
            "blocked_by": hold,  # each child adds one as it is inserted below
            "attempts": 0,
            "max_attempts": max_attempts,
            "payload": encode(task.payload),
            "errors": [],
            "files": task.files,
            "bytes": task.nbytes,
            "bytes_moved": 0,
        }

    ids = [
        row_id(i)
        for i in txn.conn.execute(
            sa.insert(Task).returning(col(Task.id), sort_by_parameter_order=True),
            [row(t) for t in tasks],
        ).scalars()
    ]
    for task_id, task in zip(ids, tasks, strict=True):
        if task.children:
            insert_tasks(
                txn,
                placement_id,
                task.children,
                parent=task_id,
                priority=priority,
                deadline=deadline,
                max_attempts=max_attempts,
                latest_start=latest_start,
            )
    if parent is not None:
        txn.conn.execute(
            sa.update(Task)
            .where(col(Task.id) == parent)
            .values(blocked_by=col(Task.blocked_by) + len(tasks))
        )
    if hold == 0 and any(not t.children for t in tasks):
        txn.tasks_ready()  # claimable now: wake idle workers at commit
    return ids


class TaskStates(StateBase):
    """Every write to ``tasks`` (and the placement changes a task's end causes)."""

    def __init__(
        self,
        engine: sa.engine.Engine,
        bus: Any,
        retry: RetryDecider,
        link_caps: Mapping[tuple[str, str], int] | None = None,
    ) -> None:
        super().__init__(engine, bus)
        self.retry = retry
        # Most live leases per link (src, dst), cluster-wide: see ``claim_sql``.
        self.link_caps = dict(link_caps or {})

    def enqueue(self, placement_id: int, payload: Payload, *, max_attempts: int = 8) -> bool:
        """File one task outside any plan (a ``labels`` sync) under ``placement_id``, with
        its priority and deadline, unless an identical one is still queued. True if filed."""
        kind = kind_of(payload)
        with self._write() as txn:
            queued = txn.conn.execute(
                sa.select(col(Task.payload)).where(
                    col(Task.placement_id) == placement_id,
                    col(Task.kind) == kind,
                    col(Task.state) == TaskState.QUEUED,
                )
            ).scalars()
            if any(p == encode(payload) for p in queued):
                return False
            row = txn.conn.execute(
                sa.select(col(Placement.priority), col(Placement.deadline)).where(
                    col(Placement.id) == placement_id
                )
            ).one()
            insert_tasks(
                txn,
                placement_id,
                [NewTask(payload)],
                parent=None,
                priority=int(row.priority),
                deadline=row.deadline or NO_DEADLINE,
                max_attempts=max_attempts,
            )
            return True

    # -- claim ---------------------------------------------------------------------------

    def claim(
        self,
        owner: str,
        limit: int,
        lease_seconds: float,
        sites: Collection[str] | None = None,
    ) -> list[ClaimedTask]:
        """Lease up to ``limit`` claimable tasks to ``owner``, in claim order; with ``sites``,
        only tasks whose source and destination are among them (what the worker reaches)."""
        return self.complete_and_claim(owner, {}, limit, lease_seconds, sites)[1]

    def complete_and_claim(
        self,
        owner: str,
        moved: Mapping[int, int],
        limit: int,
        lease_seconds: float,
        sites: Collection[str] | None = None,
    ) -> tuple[set[int], list[ClaimedTask]]:
        """A worker's turn, in one transaction: complete the tasks of ``moved`` (task id ->
        bytes moved) that ``owner`` still holds, then claim up to ``limit`` more (as
        ``claim``). Returns the ids completed and the tasks claimed."""
        if limit <= 0 and not moved:
            return set(), []
        with self._write() as txn:
            # Task rows first (ours in descending id order, then parents), placements last.
            done = complete_tasks(txn, owner, moved)
            tasks = self._claim_in(txn, owner, limit, lease_seconds, sites) if limit > 0 else []
            publishing = {t.placement_id for t in tasks if t.kind is TaskKind.PUBLISH}
            write_placements(txn, done.credits, publishing)
        return done.done, tasks

    def _claim_in(
        self,
        txn: Txn,
        owner: str,
        limit: int,
        lease_seconds: float,
        sites: Collection[str] | None,
    ) -> list[ClaimedTask]:
        caps = self.link_caps
        stmt = claim_statement(self.pg, bool(caps), sites is not None)
        params: dict[str, Any] = {"owner": owner}
        if sites is not None:
            params["sites"] = json.dumps(sorted(sites))
        if self.pg:
            params["lease_seconds"] = lease_seconds
        else:
            params |= {"now": txn.now, "until": txn.now + timedelta(seconds=lease_seconds)}
        if caps:
            params["caps"] = json.dumps(
                [{"src": s, "dst": d, "n": n} for (s, d), n in sorted(caps.items())]
            )
        tasks: list[ClaimedTask] = []
        # With caps, a round stops at the links it fills; the next round's scan leaves
        # them out and reaches the others' tasks (at most one round per capped link).
        while len(tasks) < limit:
            n = limit - len(tasks)
            if caps:
                params["window"] = max(4 * n, n + 64)  # room to skip rows others lock
            rows = txn.conn.execute(stmt, {**params, "n": n}).mappings()
            got = [_claimed(r) for r in rows.all()]
            tasks += got
            if not caps or not got:
                break
        for t in tasks:
            txn.emit(
                TaskClaimed(
                    task_id=t.id,
                    placement_id=t.placement_id,
                    kind=t.kind,
                    owner=owner,
                    attempt=t.attempts,
                )
            )
        return sorted(tasks, key=_claim_order)

    def heartbeat(self, owner: str, task_ids: Iterable[int], lease_seconds: float) -> set[int]:
        """Extend the leases ``owner`` still holds; return their ids (lost ones are absent)."""
        ids = list(task_ids)
        if not ids:
            return set()
        with self._write() as txn:
            if self.pg:
                params: dict[str, Any] = {
                    "ids": ids,
                    "owner": owner,
                    "lease_seconds": lease_seconds,
                }
                result = txn.conn.execute(HEARTBEAT_PG, params)
            else:
                until = datetime.now(UTC) + timedelta(seconds=lease_seconds)
                result = txn.conn.execute(
                    HEARTBEAT_SQLITE, {"ids": ids, "owner": owner, "until": until}
                )
            return {int(row[0]) for row in result}

    # -- finish --------------------------------------------------------------------------

    def complete(self, owner: str, task_id: int, bytes_moved: int = 0) -> bool:
        """Mark a leased task done. False (and nothing changed) if ``owner`` lost the lease."""
        return task_id in self.complete_many(owner, {task_id: bytes_moved})

    def complete_many(self, owner: str, moved: Mapping[int, int]) -> set[int]:
        """Mark done, in one transaction, the tasks of ``moved`` (task id -> bytes moved)
        that ``owner`` still holds; return their ids. A task whose lease was lost is left
        as it is (the new owner's run is a no-op: tasks are idempotent). See
        ``completion``."""
        if not moved:
            return set()
        return self.complete_and_claim(owner, moved, 0, 0)[0]

    def fail(self, owner: str, task_id: int, exc: BaseException) -> TaskState | None:
        """Record a failed attempt. Returns the task's new state (``queued`` = will retry,
        ``failed``), or None if ``owner`` no longer holds the lease.

        The retry policy decides from the error's class (``DatasyncError.retryable``) and
        the attempts so far; the database failing under the attempt (a restart, a network
        blip) is a ``TransientError``; any other error that is not a ``DatasyncError`` (a
        bug or an untranslated error) fails the task at once. A task retried after
        ``STUCK_AFTER`` failed attempts is stuck: ``TaskStuck`` is emitted the first time
        (its history entry says so); ``attempts``, which only the claim increments, is its
        counter."""
        with self._write() as txn:
            row = txn.conn.execute(
                sa.select(
                    col(Task.attempts),
                    col(Task.max_attempts),
                    col(Task.placement_id),
                    col(Task.kind),
                    col(Task.errors),
                )
                .where(
                    col(Task.id) == task_id,
                    col(Task.state) == TaskState.LEASED,
                    col(Task.lease_owner) == owner,
                )
                .with_for_update()
            ).one_or_none()
            if row is None:
                return None
            attempts, max_attempts, placement_id, kind, errors = row
            now = txn.now
            if isinstance(exc, DB_UNAVAILABLE):
                cause = " ".join(str(getattr(exc, "orig", None) or exc).split())
                exc = TransientError(f"the database was unavailable during the attempt: {cause}")
            delay = self.retry.task_retry_delay(attempts, max_attempts, exc)
            entry = {**error_entry(now, exc), "attempt": attempts}
            stuck = delay is not None and attempts >= STUCK_AFTER and not _was_stuck(errors)
            if stuck:
                entry["stuck"] = True
            history = [*(errors or []), entry][-ERROR_HISTORY:]
            if delay is not None:
                txn.conn.execute(
                    sa.update(Task)
                    .where(col(Task.id) == task_id)
                    .values(
                        state=TaskState.QUEUED,
                        lease_owner=None,
                        lease_expires_at=None,
                        not_before=now + timedelta(seconds=delay),
                        errors=history,
                    )
                )
                txn.emit(
                    TaskRetried(
                        task_id=task_id,
                        placement_id=placement_id,
                        kind=kind,
                        error_class=type(exc).__name__,
                        message=entry["message"],
                        attempt=attempts,
                        delay_seconds=delay,
                    )
                )
                if stuck:
                    txn.emit(
                        TaskStuck(
                            task_id=task_id,
                            placement_id=placement_id,
                            kind=kind,
                            attempts=attempts,
                            since=str(history[0].get("at", entry["at"])),
                            error_class=type(exc).__name__,
                            message=entry["message"],
                        )
                    )
                return TaskState.QUEUED
            if not isinstance(exc, DatasyncError):
                why = "unclassified error"
            elif not exc.retryable:
                why = "permanent error"
            else:
                why = f"{attempts} attempts"
            message = entry["message"]
            reason = f"{kind} task {task_id} failed ({why}): {type(exc).__name__}: {message}"
            txn.conn.execute(
                sa.update(Task)
                .where(col(Task.id) == task_id)
                .values(
                    state=TaskState.FAILED, lease_expires_at=None, finished_at=now, errors=history
                )
            )
            txn.emit(
                TaskFailed(
                    task_id=task_id,
                    placement_id=placement_id,
                    kind=kind,
                    error_class=type(exc).__name__,
                    message=entry["message"],
                )
            )
            if kind not in _OUTSIDE_PLAN:
                fail_placement(txn, placement_id, reason)
            return TaskState.FAILED

    def reap(self) -> int:
        """Fail tasks whose lease expired with no attempts left (their workers kept dying).

        Run periodically by the scheduler and by every worker; the claim never takes these
        over. Returns how many tasks it failed."""
        with self._write() as txn:
            now = txn.now
            rows = txn.conn.execute(
                sa.select(
                    col(Task.id),
                    col(Task.placement_id),
                    col(Task.kind),
                    col(Task.lease_owner),
                    col(Task.errors),
                )
                .where(
                    col(Task.state) == TaskState.LEASED,
                    col(Task.lease_expires_at) < now,
                    col(Task.attempts) >= col(Task.max_attempts),
                )
                .with_for_update(skip_locked=True)
            ).all()
            for task_id, placement_id, kind, lease_owner, errors in rows:
                message = f"lease of {lease_owner} expired on the last attempt"
                entry = {
                    "at": now.astimezone(UTC).isoformat(timespec="seconds"),
                    "class": "LeaseExpired",
                    "message": message,
                }
                txn.conn.execute(
                    sa.update(Task)
                    .where(col(Task.id) == task_id)
                    .values(
                        state=TaskState.FAILED,
                        lease_expires_at=None,
                        finished_at=now,
                        errors=[*(errors or []), entry][-ERROR_HISTORY:],
                    )
                )
                txn.emit(
                    TaskFailed(
                        task_id=task_id,
                        placement_id=placement_id,
                        kind=kind,
                        error_class="LeaseExpired",
                        message=message,
                    )
                )
                if kind not in _OUTSIDE_PLAN:
                    fail_placement(
                        txn,
                        placement_id,
                        f"{kind} task {task_id} failed: its worker died or hung on every attempt",
                    )
            return len(rows)

    def pause_site(self, site: str, until: datetime, reason: str) -> int:
        """Hold the queued tasks that read from or write to ``site`` (its health probe
        failed) until ``until``: ``not_before`` moves there (never earlier) and no attempt
        is counted. ``reason`` joins the error history of each task whose newest entry is
        not already such a pause, so a site that stays down does not fill it. Returns the
        number of tasks held."""
        with self._write() as txn:
            entry = {
                "at": txn.now.astimezone(UTC).isoformat(timespec="seconds"),
                "class": SITE_DOWN,
                "message": reason[:MAX_MESSAGE],
            }
            append, last = (
                (_APPEND_PG, _LAST_CLASS_PG) if txn.pg else (_APPEND_SQLITE, _LAST_CLASS_SQLITE)
            )
            held = txn.conn.execute(
                sa.text(
                    "UPDATE tasks SET"
                    " not_before = CASE WHEN not_before < :until THEN :until ELSE not_before END,"
                    f" errors = CASE WHEN COALESCE({last}, '') = :paused THEN errors"
                    f" ELSE {append} END"
                    " WHERE state = 'queued' AND (src_site = :site OR dst_site = :site)"
                ).bindparams(sa.bindparam("until", type_=_TS)),
                {
                    "until": until,
                    "site": site,
                    "paused": SITE_DOWN,
                    "entry": json.dumps(entry),
                },
            ).rowcount
            txn.emit(SitePaused(site=site, until=until, reason=reason, tasks=held))
            return held

    def retry_now(self, placement_id: int) -> int:
        """An operator's retry: the placement's queued tasks backing off become due now
        (attempts and their error history are kept). Returns how many were due later."""
        with self._write() as txn:
            due = int(
                txn.conn.execute(
                    sa.update(Task)
                    .where(
                        col(Task.placement_id) == placement_id,
                        col(Task.state) == TaskState.QUEUED,
                        col(Task.not_before) > txn.now,
                    )
                    .values(not_before=txn.now)
                ).rowcount
            )
            if due:
                txn.tasks_ready()
            return due
