"""Reads of what the database says now, for ``/metrics`` gauges and the dashboard.

Each function is one grouped query with bounded output (per state, site, host or link),
so a scrape costs the same with ten placements or ten thousand. They never write.
Placement risk and deadline slack come from ``transfer.status`` (the one definition of
ETA and at-risk).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlmodel import col

from datasync.config import SiteConfig
from datasync.db.ops_tables import LinkStat, WorkerRow
from datasync.db.transfer_tables import Placement, Replica, Task
from datasync.models import PlacementState, ReplicaKind, ReplicaState, TaskState
from datasync.observe.metrics import QUEUE_STATES
from datasync.observe.workers import live_since
from datasync.transfer.state import as_utc
from datasync.transfer.status import PlacementStatus

__all__ = [
    "QueueDepth",
    "WorkerHost",
    "deadline_slack",
    "link_throughput",
    "placements_by_state",
    "queue_depth",
    "recent_finished",
    "site_usage",
    "workers_by_host",
]


@dataclass(frozen=True, slots=True)
class QueueDepth:
    tasks: dict[str, int]  # QUEUE_STATES -> count
    oldest_waiting_seconds: float
    running_by_site: dict[str, int]  # tasks leased by live workers, by destination site


def queue_depth(conn: Connection, now: datetime) -> QueueDepth:
    """Unfinished tasks by queue state (``metrics.QUEUE_STATES``)."""
    queued = col(Task.state) == TaskState.QUEUED
    due = col(Task.not_before) <= now
    waiting = sa.and_(due, col(Task.blocked_by) == 0)
    row = conn.execute(
        sa.select(
            sa.func.count().filter(waiting),
            sa.func.count().filter(col(Task.not_before) > now),
            sa.func.count().filter(sa.and_(due, col(Task.blocked_by) > 0)),
            sa.func.min(col(Task.not_before)).filter(waiting),
        ).where(queued)
    ).one()
    tasks = dict.fromkeys(QUEUE_STATES, 0)
    tasks["waiting"], tasks["backoff"], tasks["blocked"] = int(row[0]), int(row[1]), int(row[2])
    oldest = as_utc(row[3])
    live = sa.and_(
        col(WorkerRow.owner).is_not(None), col(WorkerRow.last_seen) >= live_since(now)
    ).label("live")
    running: dict[str, int] = {}
    for site, is_live, n in conn.execute(
        sa.select(col(Placement.site), live, sa.func.count())
        .select_from(Task)
        .join(Placement, col(Placement.id) == col(Task.placement_id))
        .outerjoin(WorkerRow, col(WorkerRow.owner) == col(Task.lease_owner))
        .where(col(Task.state) == TaskState.LEASED)
        .group_by(col(Placement.site), live)
    ):
        if is_live:
            running[str(site)] = running.get(str(site), 0) + int(n)
            tasks["running"] += int(n)
        else:
            tasks["orphaned"] += int(n)
    age = max(0.0, (now - oldest).total_seconds()) if oldest is not None else 0.0
    return QueueDepth(tasks, age, running)


def placements_by_state(conn: Connection) -> dict[tuple[str, str], int]:
    """``(site, state) -> count`` over every placement."""
    rows = conn.execute(
        sa.select(col(Placement.site), col(Placement.state), sa.func.count()).group_by(
            col(Placement.site), col(Placement.state)
        )
    )
    return {(str(site), str(state)): int(n) for site, state, n in rows}


def deadline_slack(
    active: list[PlacementStatus], now: datetime
) -> tuple[dict[str, int], dict[str, float]]:
    """Per site: unfinished placements at risk, and the least deadline slack (seconds)."""
    at_risk: dict[str, int] = {}
    slack: dict[str, float] = {}
    for p in active:
        if p.at_risk:
            at_risk[p.site] = at_risk.get(p.site, 0) + 1
        if p.deadline is not None:
            left = (p.deadline - now).total_seconds() - (p.eta_seconds or 0.0)
            slack[p.site] = min(slack.get(p.site, left), left)
    return at_risk, slack


def site_usage(conn: Connection, sites: Mapping[str, SiteConfig]) -> dict[str, int]:
    """Bytes datasync keeps at each site: blob-store replicas, plus the views of object
    stores, whose views are copies (POSIX views are hard links and cost nothing more).

    Sums every replica row: run it seldom (``StateCollector`` caches it)."""
    used: dict[str, int] = {}
    for site, nbytes in conn.execute(
        sa.select(col(Replica.site), sa.func.coalesce(sa.func.sum(col(Replica.size)), 0))
        .where(col(Replica.kind) == ReplicaKind.BLOB, col(Replica.state) == ReplicaState.OK)
        .group_by(col(Replica.site))
    ):
        used[str(site)] = int(nbytes)
    copies = [name for name, cfg in sites.items() if _views_are_copies(cfg.url)]
    if copies:
        for site, nbytes in conn.execute(
            sa.select(col(Placement.site), sa.func.sum(col(Placement.bytes_total)))
            .where(
                col(Placement.site).in_(copies),
                col(Placement.state).in_((PlacementState.READY, PlacementState.DAMAGED)),
            )
            .group_by(col(Placement.site))
        ):
            used[str(site)] = used.get(str(site), 0) + int(nbytes or 0)
    return used


def _views_are_copies(url: str) -> bool:
    scheme = url.split("://", 1)[0] if "://" in url else "file"
    return scheme not in ("file", "posix")


@dataclass(frozen=True, slots=True)
class WorkerHost:
    live: int
    stale: int
    heartbeat_age_seconds: float
    tasks_running: int


def workers_by_host(conn: Connection, now: datetime) -> dict[str, WorkerHost]:
    since = live_since(now)
    is_live = col(WorkerRow.last_seen) >= since
    out: dict[str, WorkerHost] = {}
    for host, live, stale, last, running in conn.execute(
        sa.select(
            col(WorkerRow.host),
            sa.func.count().filter(is_live),
            sa.func.count().filter(sa.not_(is_live)),
            sa.func.max(col(WorkerRow.last_seen)),
            sa.func.coalesce(sa.func.sum(col(WorkerRow.tasks_running)).filter(is_live), 0),
        ).group_by(col(WorkerRow.host))
    ):
        seen = as_utc(last) or now
        age = max(0.0, (now - seen).total_seconds())
        out[str(host)] = WorkerHost(int(live), int(stale), age, int(running))
    return out


def link_throughput(conn: Connection) -> dict[tuple[str, str], float]:
    rows = conn.execute(
        sa.select(col(LinkStat.src_site), col(LinkStat.dst_site), col(LinkStat.bytes_per_second))
    )
    return {(str(s), str(d)): float(bps) for s, d, bps in rows}


def recent_finished(conn: Connection, limit: int) -> list[tuple[int, datetime]]:
    """``(id, updated_at)`` of the ``limit`` most recently finished placements."""
    final = [s for s in PlacementState if s.final]
    rows = conn.execute(
        sa.select(col(Placement.id), col(Placement.updated_at))
        .where(col(Placement.state).in_(final))
        .order_by(col(Placement.updated_at).desc())
        .limit(limit)
    )
    return [(int(pid or 0), as_utc(at) or datetime.min.replace(tzinfo=UTC)) for pid, at in rows]
