"""Placement status: progress, throughput, ETA, risk, task counts and what each waits for.

Read-only (the state owner writes). Throughput is the bytes written by tasks finished in
the last ``THROUGHPUT_WINDOW`` seconds (0 once READY or FAILED); the ETA comes from the
same window; a deadline is at risk when it passed or the ETA passes it. ``phase`` says in
words what a placement is doing or waiting for (Rucio users ask for exactly this).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel
from sqlalchemy.engine import Connection, Engine
from sqlmodel import col

from datasync.db.ops_tables import WorkerRow
from datasync.db.transfer_tables import NO_DEADLINE, Placement, Task
from datasync.errors import UnknownReference, UserError
from datasync.models import PlacementState, TaskState, VersionSummary
from datasync.observe.workers import live_since
from datasync.transfer.state import STUCK_AFTER, active_pauses, as_utc

__all__ = [
    "NO_WORKER_AFTER",
    "NO_WORKER_MESSAGE",
    "THROUGHPUT_WINDOW",
    "PlacementStatus",
    "parse_deadline",
    "placement_id_of",
    "status",
]

THROUGHPUT_WINDOW = 60.0
LAST_ERRORS = 5


class PlacementStatus(BaseModel):
    id: int
    dataset: str
    version_id: str
    site: str
    state: PlacementState
    priority: int
    deadline: datetime | None
    created_at: datetime
    updated_at: datetime
    files_done: int
    files_total: int
    bytes_done: int
    bytes_total: int
    throughput_bytes_per_second: float
    eta_seconds: float | None
    at_risk: bool
    tasks: dict[str, int]
    bytes_moved: int  # written at the site by the placement's tasks (0 for blobs it had)
    error: str | None
    last_errors: list[dict[str, Any]]
    # What it is doing or waiting for, in words ("2 task(s) backing off until ...").
    phase: str

    @property
    def ref(self) -> str:
        return f"{self.dataset}@{self.version_id}"


def parse_deadline(text: str | None, *, now: datetime | None = None) -> datetime | None:
    """``+2h``/``+30m``/``+90s``/``+1d`` from now, or an ISO 8601 time (UTC if no zone).

    Anything else, or a time that no calendar holds (``+99999999999d``), is a ``UserError``."""
    if text is None or text == "":
        return None
    now = now or datetime.now(UTC)
    if text.startswith("+"):
        units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
        number, unit = text[1:-1], text[-1:].lower()
        if unit not in units or not number.replace(".", "", 1).isdigit():
            raise UserError(f"bad deadline {text!r}: use +90s, +30m, +2h, +1d or ISO 8601")
        try:
            value = now + timedelta(seconds=float(number) * units[unit])
        except OverflowError:
            value = datetime.max.replace(tzinfo=UTC)  # refused below
    else:
        try:
            value = datetime.fromisoformat(text)
            value = (value if value.tzinfo else value.replace(tzinfo=UTC)).astimezone(UTC)
        except ValueError as exc:
            raise UserError(f"bad deadline {text!r}: use +2h or ISO 8601 ({exc})") from exc
        except OverflowError:  # the zone moved it out of the calendar (year 0 or 10000)
            raise UserError(
                f"bad deadline {text!r}: give a time between the year 1 and"
                f" {NO_DEADLINE.year} (UTC)"
            ) from None
    if value.year >= NO_DEADLINE.year:  # that year means "no deadline" in the task queue
        raise UserError(f"bad deadline {text!r}: give a time before {NO_DEADLINE.year}")
    return value


def placement_id_of(engine: Engine, version: VersionSummary, site: str, ref: str) -> int:
    """The id of ``version``'s placement at ``site``; ``UnknownReference`` (naming what to
    run) if it has none. ``ref`` is what the user typed."""
    with engine.connect() as conn:
        pid = conn.execute(
            sa.select(col(Placement.id)).where(
                col(Placement.dataset) == version.dataset,
                col(Placement.version_id) == version.version_id,
                col(Placement.site) == site,
            )
        ).scalar_one_or_none()
    if pid is None:
        raise UnknownReference(
            f"{version.dataset}@{version.version_id[:12]} has no placement at {site!r}:"
            f" run `datasync replicate {ref} --to {site}` or `datasync stage`"
        )
    return int(pid)


def status(
    engine: Engine,
    *,
    placement_id: int | None = None,
    dataset: str | None = None,
    site: str | None = None,
    active_only: bool = False,
) -> list[PlacementStatus]:
    """Placements (newest first) with progress, throughput, ETA, task counts and errors.

    Five queries whatever the number of placements: the placements, then task counts,
    recent throughput, waits and last errors, each grouped by placement."""
    query = sa.select(Placement).order_by(
        col(Placement.created_at).desc(), col(Placement.id).desc()
    )
    if placement_id is not None:
        query = query.where(col(Placement.id) == placement_id)
    if dataset is not None:
        query = query.where(col(Placement.dataset) == dataset)
    if site is not None:
        query = query.where(col(Placement.site) == site)
    if active_only:
        query = query.where(col(Placement.state).not_in(_FINAL))
    now = datetime.now(UTC)
    with engine.connect() as conn:
        rows = conn.execute(query).mappings().all()
        ids = [int(r["id"]) for r in rows]
        if not ids:
            return []
        counts, written = _task_counts(conn, ids)
        recent = _recent(conn, ids, now - timedelta(seconds=THROUGHPUT_WINDOW))
        waits = _waits(conn, ids, now)
        orphaned = _orphaned(conn, ids, now)
        errors = _last_errors(conn, ids)
        # Work is due and nobody has claimed anything for a while: say so, never wait
        # silently. Asked only when some placement has queued tasks and none running (the
        # max over every task is a scan: not on each poll of a busy dashboard).
        idle = any(c.get(TaskState.QUEUED) and not c.get(TaskState.LEASED) for c in counts.values())
        last_claim = (
            as_utc(conn.execute(sa.select(sa.func.max(col(Task.started_at)))).scalar())
            if idle
            else now
        )
        paused = {
            site: f"site {site} paused by {p.by} until"
            f" {p.until.isoformat(timespec='seconds')}: {p.reason}"
            for site, p in active_pauses(conn, now).items()
        }
    no_worker = last_claim is None or last_claim < now - NO_WORKER_AFTER
    return [
        _one(
            row,
            counts.get(int(row["id"]), {}),
            written,
            recent,
            waits,
            orphaned,
            errors,
            now,
            no_worker=no_worker and (as_utc(row["updated_at"]) or now) < now - NO_WORKER_AFTER,
            paused=paused.get(str(row["site"])),
        )
        for row in rows
    ]


# Due work unclaimed for this long means no worker is running against this database.
NO_WORKER_AFTER = timedelta(seconds=30)
NO_WORKER_MESSAGE = (
    f"no worker has claimed a task for {int(NO_WORKER_AFTER.total_seconds())} s;"
    " start `datasync worker` or `datasync up` with this database"
)

_FINAL = (PlacementState.READY, PlacementState.FAILED, PlacementState.DAMAGED)
# Per placement: tasks backing off, until when, tasks blocked, tasks stuck, most failures.
_Waits = dict[int, tuple[int, datetime | None, int, int, int]]


def _one(
    row: Any,
    counts: dict[str, int],
    written: dict[int, int],
    recent: dict[int, tuple[int, int]],
    waits: _Waits,
    orphaned: dict[int, int],
    errors: dict[int, list[dict[str, Any]]],
    now: datetime,
    *,
    no_worker: bool,
    paused: str | None,
) -> PlacementStatus:
    pid = int(row["id"])
    state = PlacementState(row["state"])
    moved, logical = recent.get(pid, (0, 0))
    # Over the last window, or since the placement began if that is shorter.
    age = (now - (as_utc(row["created_at"]) or now)).total_seconds()
    span = max(1.0, min(THROUGHPUT_WINDOW, age))
    throughput = 0.0 if state.final else moved / span
    rate = logical / span
    remaining = int(row["bytes_total"]) - int(row["bytes_done"])
    eta: float | None = None
    if state is PlacementState.READY:
        eta = 0.0
    elif not state.final and rate > 0:
        eta = remaining / rate
    deadline = as_utc(row["deadline"])
    at_risk = bool(
        deadline is not None
        and not state.final
        and (deadline <= now or (eta is not None and now + timedelta(seconds=eta) > deadline))
    )
    return PlacementStatus(
        id=pid,
        dataset=row["dataset"],
        version_id=row["version_id"],
        site=row["site"],
        state=state,
        priority=row["priority"],
        deadline=deadline,
        created_at=as_utc(row["created_at"]) or now,
        updated_at=as_utc(row["updated_at"]) or now,
        files_done=row["files_done"],
        files_total=row["files_total"],
        bytes_done=row["bytes_done"],
        bytes_total=row["bytes_total"],
        throughput_bytes_per_second=throughput,
        eta_seconds=eta,
        at_risk=at_risk,
        tasks=counts,
        bytes_moved=written.get(pid, 0),
        error=row["error"],
        last_errors=errors.get(pid, []),
        phase=_phase(
            state,
            counts,
            waits.get(pid, (0, None, 0, 0, 0)),
            orphaned.get(pid, 0),
            now,
            no_worker=no_worker,
            paused=paused,
        ),
    )


def _task_counts(
    conn: Connection, ids: list[int]
) -> tuple[dict[int, dict[str, int]], dict[int, int]]:
    """Tasks per state, and bytes written, of each placement."""
    counts: dict[int, dict[str, int]] = {}
    moved: dict[int, int] = {}
    for pid, state, n, nbytes in conn.execute(
        sa.select(
            col(Task.placement_id),
            col(Task.state),
            sa.func.count(),
            sa.func.coalesce(sa.func.sum(col(Task.bytes_moved)), 0),
        )
        .where(col(Task.placement_id).in_(ids))
        .group_by(col(Task.placement_id), col(Task.state))
    ):
        counts.setdefault(int(pid), {})[str(state)] = int(n)
        moved[int(pid)] = moved.get(int(pid), 0) + int(nbytes)
    return counts, moved


def _recent(conn: Connection, ids: list[int], since: datetime) -> dict[int, tuple[int, int]]:
    """Bytes written and logical bytes completed since ``since``, per placement."""
    rows = conn.execute(
        sa.select(
            col(Task.placement_id),
            sa.func.coalesce(sa.func.sum(col(Task.bytes_moved)), 0),
            sa.func.coalesce(sa.func.sum(col(Task.bytes)), 0),
        )
        .where(
            col(Task.placement_id).in_(ids),
            col(Task.state) == TaskState.DONE,
            col(Task.finished_at) >= since,
        )
        .group_by(col(Task.placement_id))
    )
    return {int(pid): (int(moved), int(logical)) for pid, moved, logical in rows}


def _waits(conn: Connection, ids: list[int], now: datetime) -> _Waits:
    """Per placement: tasks backing off after errors, until when, tasks blocked, and tasks
    stuck (retried after ``STUCK_AFTER`` failed attempts) with the most failures of one."""
    queued = col(Task.state) == TaskState.QUEUED
    leased = col(Task.state) == TaskState.LEASED
    backing_off = sa.and_(queued, col(Task.not_before) > now)
    blocked = sa.and_(queued, col(Task.not_before) <= now, col(Task.blocked_by) > 0)
    # Failed attempts: ``attempts`` of a queued task, one fewer for a running one.
    failed = sa.case((leased, col(Task.attempts) - 1), else_=col(Task.attempts))
    stuck = failed >= STUCK_AFTER
    rows = conn.execute(
        sa.select(
            col(Task.placement_id),
            sa.func.count().filter(backing_off),
            sa.func.min(col(Task.not_before)).filter(backing_off),
            sa.func.count().filter(blocked),
            sa.func.count().filter(stuck),
            sa.func.coalesce(sa.func.max(failed), 0),
        )
        .where(col(Task.placement_id).in_(ids), sa.or_(queued, leased))
        .group_by(col(Task.placement_id))
    )
    return {
        int(pid): (int(w), as_utc(until), int(h), int(s), int(most))
        for pid, w, until, h, s, most in rows
    }


def _orphaned(conn: Connection, ids: list[int], now: datetime) -> dict[int, int]:
    """Leased tasks whose worker stopped heartbeating (``datasync.observe.workers``)."""
    rows = conn.execute(
        sa.select(col(Task.placement_id), sa.func.count())
        .select_from(Task)
        .outerjoin(WorkerRow, col(WorkerRow.owner) == col(Task.lease_owner))
        .where(
            col(Task.placement_id).in_(ids),
            col(Task.state) == TaskState.LEASED,
            sa.or_(col(WorkerRow.owner).is_(None), col(WorkerRow.last_seen) < live_since(now)),
        )
        .group_by(col(Task.placement_id))
    )
    return {int(pid): int(n) for pid, n in rows}


def _phase(
    state: PlacementState,
    counts: dict[str, int],
    waits: tuple[int, datetime | None, int, int, int],
    orphaned: int,
    now: datetime,
    *,
    no_worker: bool = False,
    paused: str | None = None,
) -> str:
    """Explain a placement's wait (Rucio users ask for exactly this: rucio#7598)."""
    if state.final:
        return state.lower()
    if state is PlacementState.PLANNING:
        planned = sum(counts.values())
        if not planned:
            return "planning: comparing the version with what the site holds"
        return f"planning ({planned} task(s) so far)"
    if state is PlacementState.PUBLISHING:
        return "publishing the view"
    waiting, until, held, stuck, most = waits
    parts = [paused] if paused else []  # first: nothing moves until it ends
    if stuck:  # first: the thing to act on (explain reads the backing-off part last)
        parts.append(f"{stuck} task(s) stuck: failing and retried, one of them {most} times")
    running = counts.get(TaskState.LEASED, 0) - orphaned
    if running > 0:
        parts.append(f"{running} task(s) running")
    if orphaned:
        parts.append(
            f"{orphaned} task(s) held by a worker that stopped heartbeating"
            " (taken over when the lease expires)"
        )
    due = counts.get(TaskState.QUEUED, 0) - waiting - held
    if due and running <= 0 and no_worker and not paused:
        parts.append(f"{due} task(s) waiting for a worker: {NO_WORKER_MESSAGE}")
    elif due:
        parts.append(f"{due} task(s) waiting for a worker")
    if waiting:
        when = (until or now).astimezone(UTC).isoformat(timespec="seconds")
        parts.append(f"{waiting} task(s) backing off after errors until {when}")
    if held:
        parts.append(f"{held} task(s) waiting for the tasks they depend on")
    return "; ".join(parts) or "transferring"


def _last_errors(conn: Connection, ids: list[int]) -> dict[int, list[dict[str, Any]]]:
    """The newest ``LAST_ERRORS`` errors of each placement's tasks (cancellations aside)."""
    rows = conn.execute(
        sa.select(col(Task.placement_id), col(Task.id), col(Task.kind), col(Task.errors))
        .where(
            col(Task.placement_id).in_(ids),
            sa.or_(
                col(Task.state) == TaskState.FAILED,
                col(Task.attempts) > 1,
                sa.and_(col(Task.state) == TaskState.QUEUED, col(Task.attempts) > 0),
            ),
        )
        .order_by(col(Task.id).desc())
        .limit(50 * len(ids))
    ).all()
    out: dict[int, list[dict[str, Any]]] = {}
    for pid, task_id, kind, history in rows:
        out.setdefault(int(pid), []).extend(
            {"task": int(task_id), "kind": kind, **entry}
            for entry in (history or [])[-LAST_ERRORS:]
            if entry.get("class") != "Cancelled"
        )
    for errors in out.values():
        errors.sort(key=lambda e: str(e.get("at", "")), reverse=True)
        del errors[LAST_ERRORS:]
    return out
