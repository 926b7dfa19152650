"""The task queue: tasks live in the database under leases (procrastinate's design).

State machine (``docs/task-states.md`` draws it)::

    queued --claim--> leased --complete--> done
      ^                 |  \\--fail(permanent or attempts exhausted)--> failed
      |                 |
      +--fail(retryable, backoff not_before)
      +--lease expired: the next claim takes the task over (one attempt counted)

Invariants:

* A claim is ONE statement. PostgreSQL: ``UPDATE ... WHERE id IN (SELECT ... FOR UPDATE
  SKIP LOCKED LIMIT n) RETURNING``. SQLite: the same UPDATE inside ``BEGIN IMMEDIATE``
  (the database write lock), so two claimers never get the same task.
* Claimable = queued, unblocked (``blocked_by = 0``) and due (``not_before <= now``), or
  leased with an expired lease and attempts left. Order: priority DESC, deadline ASC NULLS
  LAST (stored as ``NO_DEADLINE``), created_at, id. Each branch reads the head of its own
  partial index, so a claim costs the same with ten tasks queued or ten million.
* Only the lease owner can heartbeat, complete or fail a task; a worker whose lease was taken
  over learns it from the return value and must stop (its work is idempotent anyway).
* Completing a task decrements its parent's ``blocked_by`` and adds the task's logical
  files/bytes to its placement in the same transaction; completing ``publish`` makes the
  placement READY.
* A permanent failure (or the last attempt) fails the task, fails the placement with an
  actionable reason, and cancels the placement's still-queued tasks.
* Every error is kept in the task's history as ``{at, class, message}`` (the newest
  ``ERROR_HISTORY`` entries), so a waiting placement can explain itself.

Times come from the database clock on PostgreSQL (many hosts, one clock) and from this
host's UTC clock on SQLite (one host).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from datasync.db.engine import is_postgresql, write_transaction
from datasync.db.transfer_tables import NO_DEADLINE, Task
from datasync.errors import DatasyncError, Throttled

__all__ = [
    "ERROR_HISTORY",
    "REAP_EVERY_SECONDS",
    "Cancelled",
    "ClaimedTask",
    "TaskQueue",
    "as_utc",
    "error_entry",
    "fail_placement",
]

ERROR_HISTORY = 50
# How often expired last-attempt leases are reaped (by `datasync up` and by every worker).
REAP_EVERY_SECONDS = 30
MAX_MESSAGE = 2000
_TS = sa.DateTime(timezone=True)
_T: sa.Table = Task.__table__  # type: ignore[attr-defined]

_RETURNING = (
    "id, placement_id, parent_id, kind, payload, attempts, max_attempts, lease_expires_at,"
    " priority, deadline, created_at"
)

# Claimable rows, as one SQL predicate (``{now}`` is ``now()`` or ``:now``).
_CLAIMABLE = """((state = 'queued' AND blocked_by = 0 AND not_before <= {now})
       OR (state = 'leased' AND lease_expires_at < {now} AND attempts < max_attempts))"""
# Candidates: the head of each claim index (queued in claim order; expired leases), so a
# claim reads O(window) rows however long the queue is, instead of sorting the whole OR.
_CANDIDATES = """
    SELECT id FROM (SELECT id FROM tasks
                     WHERE state = 'queued' AND blocked_by = 0 AND not_before <= {now}
                     ORDER BY priority DESC, deadline, created_at, id
                     LIMIT :window) AS queued
    UNION ALL
    SELECT id FROM (SELECT id FROM tasks
                     WHERE state = 'leased' AND lease_expires_at < {now}
                       AND attempts < max_attempts
                     ORDER BY lease_expires_at
                     LIMIT :window) AS expired"""
_TAKEOVER_NOTE = "'lease of ' || {t}lease_owner || ' expired'"

# The claim, PostgreSQL: ONE statement. The middle SELECT re-checks the candidates, locks
# the ones nobody else holds (SKIP LOCKED) in claim order, and the UPDATE leases them.
# Taking over an expired lease records why that attempt ended in the error history.
# (``deadline`` is never NULL: tasks without one carry NO_DEADLINE, i.e. NULLS LAST.)
CLAIM_PG = sa.text(
    f"""
UPDATE tasks AS t
   SET state = 'leased',
       lease_owner = :owner,
       lease_expires_at = now() + make_interval(secs => :lease_seconds),
       attempts = t.attempts + 1,
       errors = CASE WHEN t.state = 'leased'
                THEN (t.errors::jsonb || jsonb_build_array(jsonb_build_object(
                        'at', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"+00:00"'),
                        'class', 'LeaseExpired',
                        'message', {_TAKEOVER_NOTE.format(t="t.")})))::json
                ELSE t.errors END
 WHERE t.id IN (
        SELECT id FROM tasks
         WHERE id IN ({_CANDIDATES.format(now="now()")})
           AND {_CLAIMABLE.format(now="now()")}
         ORDER BY priority DESC, deadline, created_at, id
           FOR UPDATE SKIP LOCKED
         LIMIT :n)
RETURNING {_RETURNING}
"""
)

# The claim, SQLite: the same statement without row locks; it runs inside BEGIN IMMEDIATE,
# which already excludes every other writer.
CLAIM_SQLITE = sa.text(
    f"""
UPDATE tasks
   SET state = 'leased',
       lease_owner = :owner,
       lease_expires_at = :until,
       attempts = attempts + 1,
       errors = CASE WHEN state = 'leased'
                THEN json_insert(errors, '$[#]', json_object(
                        'at', strftime('%Y-%m-%dT%H:%M:%S+00:00', 'now'),
                        'class', 'LeaseExpired',
                        'message', {_TAKEOVER_NOTE.format(t="")}))
                ELSE errors END
 WHERE id IN (
        SELECT id FROM tasks
         WHERE id IN ({_CANDIDATES.format(now=":now")})
           AND {_CLAIMABLE.format(now=":now")}
         ORDER BY priority DESC, deadline, created_at, id
         LIMIT :n)
RETURNING {_RETURNING}
"""
).bindparams(sa.bindparam("now", type_=_TS), sa.bindparam("until", type_=_TS))

_CLAIM_COLUMNS: dict[str, sa.types.TypeEngine[Any]] = {
    "payload": sa.JSON(),
    "lease_expires_at": _TS,
    "deadline": _TS,
    "created_at": _TS,
}

HEARTBEAT_PG = sa.text(
    """
UPDATE tasks SET lease_expires_at = now() + make_interval(secs => :lease_seconds)
 WHERE id IN :ids AND state = 'leased' AND lease_owner = :owner
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


def as_utc(value: datetime | None) -> datetime | None:
    """SQLite returns naive UTC datetimes; make every datetime aware."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


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


@dataclass(frozen=True, slots=True)
class ClaimedTask:
    """A task leased to one owner until ``lease_expires_at`` (extend with ``heartbeat``)."""

    id: int
    placement_id: int
    parent_id: int | None
    kind: str
    payload: dict[str, Any]
    attempts: int
    max_attempts: int
    lease_expires_at: datetime
    priority: int
    deadline: datetime | None
    created_at: datetime


def _deadline(value: datetime) -> datetime | None:
    aware = as_utc(value)
    return None if aware is None or aware.year == NO_DEADLINE.year else aware


def _claim_order(task: ClaimedTask) -> tuple[int, datetime, datetime, int]:
    return (-task.priority, task.deadline or NO_DEADLINE, task.created_at, task.id)


class TaskQueue:
    """Claim, heartbeat, complete and fail tasks. Thread-safe (one connection per call).

    ``backoff_base``/``backoff_cap`` (seconds) shape the jittered exponential backoff of
    retryable failures: ``min(cap, base * 2**(attempt-1)) * U(0.5, 1.5)``; tests set them to
    0 so no test sleeps. A ``Throttled`` error's ``retry_after`` wins when larger.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        backoff_base: float = 2.0,
        backoff_cap: float = 300.0,
        rng: random.Random | None = None,
    ) -> None:
        self.engine = engine
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self._rng = rng or random.Random()
        self._pg = is_postgresql(engine)

    # -- clock -------------------------------------------------------------------------

    def _now(self, conn: Connection) -> datetime:
        if self._pg:
            value = conn.execute(sa.text("SELECT now()")).scalar_one()
            assert isinstance(value, datetime)
            return value
        return datetime.now(UTC)

    def backoff(self, attempts: int, exc: BaseException) -> float:
        """Seconds to wait before the next attempt after ``attempts`` failed ones."""
        delay = min(self.backoff_cap, self.backoff_base * 2.0 ** max(0, attempts - 1))
        delay *= self._rng.uniform(0.5, 1.5)
        if isinstance(exc, Throttled) and exc.retry_after:
            delay = max(delay, exc.retry_after)
        return delay

    # -- claim ---------------------------------------------------------------------------

    def claim(self, owner: str, limit: int, lease_seconds: float) -> list[ClaimedTask]:
        """Lease up to ``limit`` claimable tasks to ``owner``, in claim order."""
        if limit <= 0:
            return []
        with write_transaction(self.engine) as conn:
            if self._pg:
                stmt = CLAIM_PG.columns(**_CLAIM_COLUMNS)
                params: dict[str, Any] = {"owner": owner, "lease_seconds": lease_seconds}
            else:
                now = datetime.now(UTC)
                stmt = CLAIM_SQLITE.columns(**_CLAIM_COLUMNS)
                params = {
                    "owner": owner,
                    "now": now,
                    "until": now + timedelta(seconds=lease_seconds),
                }
            window = max(4 * limit, limit + 64)  # room to skip rows other claimers lock
            rows = conn.execute(stmt, {**params, "n": limit, "window": window}).mappings().all()
            tasks = [
                ClaimedTask(
                    id=r["id"],
                    placement_id=r["placement_id"],
                    parent_id=r["parent_id"],
                    kind=r["kind"],
                    payload=r["payload"],
                    attempts=r["attempts"],
                    max_attempts=r["max_attempts"],
                    lease_expires_at=as_utc(r["lease_expires_at"]) or datetime.now(UTC),
                    priority=r["priority"],
                    deadline=_deadline(r["deadline"]),
                    created_at=as_utc(r["created_at"]) or datetime.now(UTC),
                )
                for r in rows
            ]
            publishing = [t.placement_id for t in tasks if t.kind == "publish"]
            if publishing:
                conn.execute(
                    sa.text(
                        "UPDATE placements SET state = 'PUBLISHING', updated_at = :now"
                        " WHERE id IN :ids AND state = 'TRANSFERRING'"
                    ).bindparams(
                        sa.bindparam("ids", expanding=True), sa.bindparam("now", type_=_TS)
                    ),
                    {"ids": publishing, "now": self._now(conn)},
                )
        return sorted(tasks, key=_claim_order)

    def heartbeat(self, owner: str, task_ids: Iterable[int], lease_seconds: float) -> set[int]:
        """Extend the leases ``owner`` still holds; return their ids (lost ones are absent)."""
        ids = list(task_ids)
        if not ids:
            return set()
        with write_transaction(self.engine) as conn:
            if self._pg:
                result = conn.execute(
                    HEARTBEAT_PG, {"ids": ids, "owner": owner, "lease_seconds": lease_seconds}
                )
            else:
                until = datetime.now(UTC) + timedelta(seconds=lease_seconds)
                result = conn.execute(
                    HEARTBEAT_SQLITE, {"ids": ids, "owner": owner, "until": until}
                )
            return {int(row[0]) for row in result}

    # -- finish --------------------------------------------------------------------------

    def complete(self, owner: str, task_id: int, bytes_moved: int = 0) -> bool:
        """Mark a leased task done. False (and nothing changed) if ``owner`` lost the lease."""
        with write_transaction(self.engine) as conn:
            now = self._now(conn)
            row = conn.execute(
                sa.text(
                    "UPDATE tasks SET state = 'done', lease_expires_at = NULL,"
                    " finished_at = :now, bytes_moved = :moved"
                    " WHERE id = :id AND state = 'leased' AND lease_owner = :owner"
                    " RETURNING parent_id, placement_id, kind, files, bytes"
                ).bindparams(sa.bindparam("now", type_=_TS)),
                {"now": now, "moved": bytes_moved, "id": task_id, "owner": owner},
            ).one_or_none()
            if row is None:
                return False
            parent_id, placement_id, kind, files, nbytes = row
            if parent_id is not None:
                conn.execute(
                    sa.text("UPDATE tasks SET blocked_by = blocked_by - 1 WHERE id = :id"),
                    {"id": parent_id},
                )
            ready = kind == "publish"
            if not (ready or files or nbytes):
                return True  # nothing to add: spare the hot placement row its lock
            conn.execute(
                sa.text(
                    "UPDATE placements SET files_done = files_done + :files,"
                    " bytes_done = bytes_done + :bytes, updated_at = :now,"
                    " state = CASE WHEN :ready AND state <> 'FAILED' THEN 'READY' ELSE state END,"
                    " error = CASE WHEN :ready AND state <> 'FAILED' THEN NULL ELSE error END"
                    " WHERE id = :id"
                ).bindparams(
                    sa.bindparam("now", type_=_TS), sa.bindparam("ready", type_=sa.Boolean)
                ),
                {"files": files, "bytes": nbytes, "now": now, "ready": ready, "id": placement_id},
            )
            return True

    def fail(self, owner: str, task_id: int, exc: BaseException) -> str | None:
        """Record a failed attempt. Returns the task's new state (``queued`` = will retry,
        ``failed``), or None if ``owner`` no longer holds the lease.

        ``DatasyncError.retryable`` decides; any other exception is treated as retryable
        (an untranslated OS error is more often transient than not), bounded by attempts.
        """
        retryable = exc.retryable if isinstance(exc, DatasyncError) else True
        with write_transaction(self.engine) as conn:
            row = conn.execute(
                sa.select(
                    _T.c.attempts, _T.c.max_attempts, _T.c.placement_id, _T.c.kind, _T.c.errors
                )
                .where(_T.c.id == task_id, _T.c.state == "leased", _T.c.lease_owner == owner)
                .with_for_update()
            ).one_or_none()
            if row is None:
                return None
            attempts, max_attempts, placement_id, kind, errors = row
            now = self._now(conn)
            history = [*(errors or []), error_entry(now, exc)][-ERROR_HISTORY:]
            if retryable and attempts < max_attempts:
                not_before = now + timedelta(seconds=self.backoff(attempts, exc))
                conn.execute(
                    sa.update(_T)
                    .where(_T.c.id == task_id)
                    .values(
                        state="queued",
                        lease_owner=None,
                        lease_expires_at=None,
                        not_before=not_before,
                        errors=history,
                    )
                )
                return "queued"
            why = "permanent error" if not retryable else f"{attempts} attempts"
            reason = (
                f"{kind} task {task_id} failed ({why}): {type(exc).__name__}: "
                f"{history[-1]['message']}"
            )
            conn.execute(
                sa.update(_T)
                .where(_T.c.id == task_id)
                .values(state="failed", lease_expires_at=None, finished_at=now, errors=history)
            )
            fail_placement(conn, placement_id, reason, now)
            return "failed"

    def reap(self) -> int:
        """Fail tasks whose lease expired with no attempts left (their workers kept dying).

        Run periodically by the scheduler; the claim never takes these over. Returns how
        many tasks it failed.
        """
        with write_transaction(self.engine) as conn:
            now = self._now(conn)
            rows = conn.execute(
                sa.select(_T.c.id, _T.c.placement_id, _T.c.kind, _T.c.lease_owner, _T.c.errors)
                .where(
                    _T.c.state == "leased",
                    _T.c.lease_expires_at < now,
                    _T.c.attempts >= _T.c.max_attempts,
                )
                .with_for_update(skip_locked=True)
            ).all()
            for task_id, placement_id, kind, lease_owner, errors in rows:
                entry = {
                    "at": now.astimezone(UTC).isoformat(timespec="seconds"),
                    "class": "LeaseExpired",
                    "message": f"lease of {lease_owner} expired on the last attempt",
                }
                conn.execute(
                    sa.update(_T)
                    .where(_T.c.id == task_id)
                    .values(
                        state="failed",
                        lease_expires_at=None,
                        finished_at=now,
                        errors=[*(errors or []), entry][-ERROR_HISTORY:],
                    )
                )
                fail_placement(
                    conn,
                    placement_id,
                    f"{kind} task {task_id} failed: its worker died or hung on every attempt",
                    now,
                )
            return len(rows)

    def counts(self, placement_id: int | None = None) -> dict[str, int]:
        """Tasks per state (all placements, or one)."""
        query = sa.select(_T.c.state, sa.func.count()).group_by(_T.c.state)
        if placement_id is not None:
            query = query.where(_T.c.placement_id == placement_id)
        with self.engine.connect() as conn:
            return {str(state): int(n) for state, n in conn.execute(query)}


class Cancelled(Exception):
    """Labels the history entry of a task cancelled because its placement failed."""


_APPEND_PG = "(errors::jsonb || jsonb_build_array(CAST(:entry AS jsonb)))::json"
_APPEND_SQLITE = "json_insert(errors, '$[#]', json(:entry))"


def fail_placement(conn: Connection, placement_id: int, reason: str, now: datetime) -> None:
    """Mark a placement FAILED with ``reason`` and cancel its queued tasks (same transaction).

    A READY placement stays READY: its view is complete whatever a straggler task says.
    Locks tasks before the placement row, the order every writer here uses (complete,
    claim, planner), so two transactions never wait on each other in a cycle.
    """
    entry = error_entry(now, Cancelled(f"placement {placement_id} failed: {reason}"))
    append = _APPEND_PG if is_postgresql(conn) else _APPEND_SQLITE
    conn.execute(
        sa.text(
            f"UPDATE tasks SET state = 'failed', finished_at = :now, errors = {append}"
            " WHERE placement_id = :id AND state = 'queued'"
            " AND EXISTS (SELECT 1 FROM placements p WHERE p.id = :id AND p.state <> 'READY')"
        ).bindparams(sa.bindparam("now", type_=_TS)),
        {"now": now, "id": placement_id, "entry": json.dumps(entry)},
    )
    conn.execute(
        sa.text(
            "UPDATE placements SET state = 'FAILED', error = :reason, updated_at = :now"
            " WHERE id = :id AND state <> 'READY'"
        ).bindparams(sa.bindparam("now", type_=_TS)),
        {"reason": reason, "now": now, "id": placement_id},
    )
