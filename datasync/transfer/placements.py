"""Placement service functions: replicate and status (sites live in ``transfer.sites``).

One way in: the CLI (``datasync.cli_transfer``), the API (``datasync.api.transfer_routes``)
and the tests all call these.

* ``replicate(ref, site)`` records "version V must be at site S" and plans it. It is
  idempotent per ``(version, site)``: an existing placement is returned (with priority and
  deadline updated when given); a FAILED one, or one whose planner died (PLANNING and not
  touched for ``STALE_PLANNING``), is planned again by exactly one caller. A placement with
  nothing missing still gets its ``publish`` task, so the view is published and READY
  follows at once.
* Before planning, the version's files at its registration source (or at ``--from``) are
  recorded as source replicas (``datasync.transfer.sites``). A version whose files are
  under no configured site cannot be replicated: its placement FAILS saying so.
* ``status`` reports progress, current throughput (bytes written by tasks finished in the
  last ``THROUGHPUT_WINDOW`` seconds; 0 once READY or FAILED), an ETA from the same window,
  whether a deadline is at risk, task counts and the newest errors.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel
from sqlalchemy.engine import Connection, Engine

from datasync.config import Settings
from datasync.db.engine import write_transaction
from datasync.db.tables import datasets_table, versions_table
from datasync.db.transfer_tables import Placement, Task
from datasync.errors import UserError
from datasync.manifest.store import ManifestStore
from datasync.transfer.planner import PlannerConfig, plan_placement
from datasync.transfer.sites import insert_source_rows, record_source_replicas, site_for_source
from datasync.transfer.taskqueue import as_utc

__all__ = [
    "STALE_PLANNING",
    "THROUGHPUT_WINDOW",
    "PlacementStatus",
    "parse_deadline",
    "record_source_replicas",  # from transfer.sites; kept here for existing callers
    "replan_stale",
    "replicate",
    "status",
]

THROUGHPUT_WINDOW = 60.0
STALE_PLANNING = timedelta(minutes=5)
LAST_ERRORS = 5

_P: sa.Table = Placement.__table__  # type: ignore[attr-defined]
_T: sa.Table = Task.__table__  # type: ignore[attr-defined]
_D, _V = datasets_table, versions_table


class PlacementStatus(BaseModel):
    id: int
    dataset: str
    version_id: str
    site: str
    state: str
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
    error: str | None
    last_errors: list[dict[str, Any]]
    # What it is doing or waiting for, in words ("2 task(s) backing off until ...").
    phase: str

    @property
    def ref(self) -> str:
        return f"{self.dataset}@{self.version_id}"


# -------------------------------------------------------------------------- replicate


def parse_deadline(text: str | None, *, now: datetime | None = None) -> datetime | None:
    """``+2h``/``+30m``/``+90s``/``+1d`` from now, or an ISO 8601 time (UTC if no zone)."""
    if text is None or text == "":
        return None
    now = now or datetime.now(UTC)
    if text.startswith("+"):
        units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
        number, unit = text[1:-1], text[-1:].lower()
        if unit not in units or not number.replace(".", "", 1).isdigit():
            raise UserError(f"bad deadline {text!r}: use +90s, +30m, +2h, +1d or ISO 8601")
        return now + timedelta(seconds=float(number) * units[unit])
    try:
        value = datetime.fromisoformat(text)
    except ValueError as exc:
        raise UserError(f"bad deadline {text!r}: use +2h or ISO 8601 ({exc})") from exc
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def replicate(
    engine: Engine,
    settings: Settings,
    ref: str,
    site: str,
    *,
    priority: int | None = None,
    deadline: datetime | None = None,
    planner: PlannerConfig | None = None,
    source: str | None = None,
) -> PlacementStatus:
    """Make sure version ``ref`` will be (or is) at ``site``; return its status.

    ``source`` (``SITE:prefix``, or a directory/URL under a site) says where the version's
    files are when its registration did not (a producer manifest); it is recorded as
    source replicas before planning.
    """
    if site not in settings.sites:
        known = ", ".join(sorted(settings.sites)) or "none configured"
        raise UserError(f"unknown site {site!r} (sites: {known})")
    if source is not None and site_for_source(settings, source) is None:
        raise UserError(
            f"--from {source!r} is not under any configured site: use SITE:prefix or a"
            " path/URL inside a site's root"
        )
    summary = ManifestStore(engine).resolve(ref)
    now = datetime.now(UTC)
    with write_transaction(engine) as conn:
        version = conn.execute(
            sa.select(_V.c.pk, _V.c.source)
            .join(_D, _D.c.pk == _V.c.dataset_pk)
            .where(_D.c.name == summary.dataset, _V.c.version_id == summary.version_id)
        ).one()
        existing = conn.execute(
            sa.select(_P.c.id, _P.c.state, _P.c.updated_at).where(
                _P.c.version_pk == version.pk, _P.c.site == site
            )
        ).one_or_none()
        if existing is None:
            placement_id = _insert_placement(
                conn, version.pk, summary.dataset, summary.version_id, site, priority, deadline, now
            )
            must_plan = True
        else:
            placement_id = int(existing.id)
            _reprioritize(conn, placement_id, priority, deadline, now)
            must_plan = _take_for_planning(conn, placement_id, now)
        # An explicit --from is recorded even for a running placement: workers fall back
        # to any ok source, so it helps without a re-plan.
        for where in ((version.source,) if must_plan else ()) + ((source,) if source else ()):
            found = site_for_source(settings, where)
            if found is not None:
                insert_source_rows(conn, found[0], found[1], version.pk)
    if must_plan:
        plan_placement(engine, settings, placement_id, planner)
    return status(engine, placement_id=placement_id)[0]


def _insert_placement(
    conn: Connection,
    version_pk: int,
    dataset: str,
    version_id: str,
    site: str,
    priority: int | None,
    deadline: datetime | None,
    now: datetime,
) -> int:
    values = {
        "dataset": dataset,
        "version_pk": version_pk,
        "version_id": version_id,
        "site": site,
        "priority": priority or 0,
        "deadline": deadline,
        "state": "PLANNING",
        "created_at": now,
        "updated_at": now,
        "files_total": 0,
        "bytes_total": 0,
        "files_done": 0,
        "bytes_done": 0,
    }
    # BEGIN IMMEDIATE (SQLite) / the unique constraint (PostgreSQL, under a savepoint)
    # make a concurrent replicate of the same (version, site) return the same row.
    try:
        with conn.begin_nested():
            return int(conn.execute(sa.insert(_P).values(values).returning(_P.c.id)).scalar_one())
    except sa.exc.IntegrityError:
        return int(
            conn.execute(
                sa.select(_P.c.id).where(_P.c.version_pk == version_pk, _P.c.site == site)
            ).scalar_one()
        )


def _reprioritize(
    conn: Connection,
    placement_id: int,
    priority: int | None,
    deadline: datetime | None,
    now: datetime,
) -> None:
    values: dict[str, Any] = {}
    if priority is not None:
        values["priority"] = priority
    if deadline is not None:
        values["deadline"] = deadline
    if not values:
        return
    # Tasks inherit both, so the queue reorders at once (retries never lose priority).
    # Tasks before the placement row: the lock order of every queue writer.
    conn.execute(
        sa.update(_T)
        .where(_T.c.placement_id == placement_id, _T.c.state.in_(("queued", "leased")))
        .values(**values)
    )
    conn.execute(sa.update(_P).where(_P.c.id == placement_id).values(updated_at=now, **values))


def _take_for_planning(
    conn: Connection, placement_id: int, now: datetime, stale: timedelta = STALE_PLANNING
) -> bool:
    """Move a FAILED, or stale PLANNING, placement to PLANNING; True if this caller did.

    Conditional update: of two callers racing to re-plan, exactly one wins and plans.
    """
    taken = conn.execute(
        sa.update(_P)
        .where(
            _P.c.id == placement_id,
            sa.or_(
                _P.c.state == "FAILED",
                sa.and_(_P.c.state == "PLANNING", _P.c.updated_at < now - stale),
            ),
        )
        .values(state="PLANNING", error=None, updated_at=now)
    )
    return taken.rowcount == 1


def replan_stale(
    engine: Engine, settings: Settings, *, older_than: timedelta = STALE_PLANNING
) -> int:
    """Plan again the placements whose planner died (PLANNING, untouched for a while)."""
    cutoff = datetime.now(UTC) - older_than
    with engine.connect() as conn:
        ids = list(
            conn.execute(
                sa.select(_P.c.id).where(_P.c.state == "PLANNING", _P.c.updated_at < cutoff)
            ).scalars()
        )
    planned = 0
    for placement_id in ids:
        with write_transaction(engine) as conn:
            mine = _take_for_planning(conn, int(placement_id), datetime.now(UTC), older_than)
        if mine:  # another scheduler may have taken it meanwhile
            plan_placement(engine, settings, int(placement_id))
            planned += 1
    return planned


# ----------------------------------------------------------------------------- status


def status(
    engine: Engine,
    *,
    placement_id: int | None = None,
    dataset: str | None = None,
    site: str | None = None,
    active_only: bool = False,
) -> list[PlacementStatus]:
    """Placements (newest first) with progress, throughput, ETA, task counts and errors."""
    query = sa.select(_P).order_by(_P.c.created_at.desc(), _P.c.id.desc())
    if placement_id is not None:
        query = query.where(_P.c.id == placement_id)
    if dataset is not None:
        query = query.where(_P.c.dataset == dataset)
    if site is not None:
        query = query.where(_P.c.site == site)
    if active_only:
        query = query.where(_P.c.state.not_in(("READY", "FAILED")))
    now = datetime.now(UTC)
    since = now - timedelta(seconds=THROUGHPUT_WINDOW)
    out: list[PlacementStatus] = []
    with engine.connect() as conn:
        for row in conn.execute(query).mappings().all():
            pid = int(row["id"])
            counts = {
                str(state): int(n)
                for state, n in conn.execute(
                    sa.select(_T.c.state, sa.func.count())
                    .where(_T.c.placement_id == pid)
                    .group_by(_T.c.state)
                )
            }
            moved, logical = conn.execute(
                sa.select(
                    sa.func.coalesce(sa.func.sum(_T.c.bytes_moved), 0),
                    sa.func.coalesce(sa.func.sum(_T.c.bytes), 0),
                ).where(_T.c.placement_id == pid, _T.c.state == "done", _T.c.finished_at >= since)
            ).one()
            # Over the last window, or since the placement began if that is shorter.
            age = (now - (as_utc(row["created_at"]) or now)).total_seconds()
            span = max(1.0, min(THROUGHPUT_WINDOW, age))
            final = row["state"] in ("READY", "FAILED")
            throughput = 0.0 if final else float(moved) / span
            rate = float(logical) / span
            remaining = int(row["bytes_total"]) - int(row["bytes_done"])
            eta: float | None = None
            if row["state"] == "READY":
                eta = 0.0
            elif not final and rate > 0:
                eta = remaining / rate
            deadline = as_utc(row["deadline"])
            at_risk = bool(
                deadline is not None
                and row["state"] not in ("READY", "FAILED")
                and (
                    deadline <= now or (eta is not None and now + timedelta(seconds=eta) > deadline)
                )
            )
            out.append(
                PlacementStatus(
                    id=pid,
                    dataset=row["dataset"],
                    version_id=row["version_id"],
                    site=row["site"],
                    state=row["state"],
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
                    error=row["error"],
                    last_errors=_last_errors(conn, pid),
                    phase=_phase(conn, pid, str(row["state"]), counts, now),
                )
            )
    return out


def _phase(
    conn: Connection, placement_id: int, state: str, counts: dict[str, int], now: datetime
) -> str:
    """Explain a placement's wait (Rucio users ask for exactly this: rucio#7598)."""
    if state in ("READY", "FAILED"):
        return state.lower()
    if state == "PLANNING":
        return f"planning ({sum(counts.values())} task(s) so far)"
    if state == "PUBLISHING":
        return "publishing the view"
    backing_off = sa.and_(_T.c.state == "queued", _T.c.not_before > now)
    blocked = sa.and_(_T.c.state == "queued", _T.c.not_before <= now, _T.c.blocked_by > 0)
    waiting, until, held = conn.execute(
        sa.select(
            sa.func.count().filter(backing_off),
            sa.func.min(_T.c.not_before).filter(backing_off),
            sa.func.count().filter(blocked),
        ).where(_T.c.placement_id == placement_id)
    ).one()
    parts = []
    if counts.get("leased"):
        parts.append(f"{counts['leased']} task(s) running")
    due = counts.get("queued", 0) - int(waiting) - int(held)
    if due:
        parts.append(f"{due} task(s) waiting for a worker")
    if waiting:
        when = (as_utc(until) or now).astimezone(UTC).isoformat(timespec="seconds")
        parts.append(f"{waiting} task(s) backing off after errors until {when}")
    if held:
        parts.append(f"{held} task(s) waiting for the tasks they depend on")
    return "; ".join(parts) or "transferring"


def _last_errors(conn: Connection, placement_id: int) -> list[dict[str, Any]]:
    rows = conn.execute(
        sa.select(_T.c.id, _T.c.kind, _T.c.errors)
        .where(
            _T.c.placement_id == placement_id,
            sa.or_(
                _T.c.state == "failed",
                _T.c.attempts > 1,
                sa.and_(_T.c.state == "queued", _T.c.attempts > 0),
            ),
        )
        .order_by(_T.c.id.desc())
        .limit(50)
    ).all()
    errors = [
        {"task": int(task_id), "kind": kind, **entry}
        for task_id, kind, history in rows
        for entry in (history or [])[-LAST_ERRORS:]
        if entry.get("class") != "Cancelled"
    ]
    errors.sort(key=lambda e: str(e.get("at", "")), reverse=True)
    return errors[:LAST_ERRORS]
