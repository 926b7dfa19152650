"""``datasync explain``: why is my data not there yet?

Users of Rucio and FTS most often cannot see why their data is not there; a waiting
placement here explains itself, from the database alone (every host sees the same):

* its **phases** with timings (``placement_history``: every state it entered and when);
* files and bytes done and left, the ETA and the deadline's slack (``status``);
* its **queue position**: how many claimable tasks come before its next one, in the
  claim's own order (least slack, then priority, then age);
* what **blocks** it, in words: no worker claiming, backing off after errors (throttled or
  not), waiting for the tasks it depends on, quota, no source, an unverified producer
  manifest, penalized or slow links, pins, a deadline at risk;
* the **last error of each failing task**.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel
from sqlalchemy.engine import Connection, Engine
from sqlmodel import col

from datasync.db.ops_tables import Pin, PlacementHistory, StageRequest
from datasync.db.transfer_tables import Task
from datasync.errors import UserError
from datasync.manifest.store import ManifestStore
from datasync.models import PlacementState, TaskState
from datasync.placement.schedule import Scheduler
from datasync.placement.staging import StageService
from datasync.transfer.links import load_links
from datasync.transfer.state import BlobSharing, as_utc
from datasync.transfer.status import PlacementStatus, placement_id_of, status

__all__ = ["Explainer", "Explanation", "Phase"]


class Phase(BaseModel):
    phase: str
    since: datetime
    seconds: float
    note: str | None = None


class Explanation(BaseModel):
    placement: PlacementStatus
    queue_position: int | None
    blockers: list[str]
    phases: list[Phase]
    last_errors: list[dict[str, Any]]
    pins: list[str]
    links: dict[str, float]  # "src->dst" -> bytes/s expected
    slack_seconds: float | None
    summary: str


class Explainer:
    def __init__(
        self,
        engine: Engine,
        store: ManifestStore,
        scheduler: Scheduler,
        staging: StageService,
        sharing: BlobSharing,
    ) -> None:
        self.engine = engine
        self.store = store
        self.scheduler = scheduler
        self.staging = staging
        self.sharing = sharing

    def explain_ref(self, ref: str, site: str) -> Explanation:
        return self.explain(placement_id_of(self.engine, self.store.resolve(ref), site, ref))

    def explain(self, placement_id: int) -> Explanation:
        rows = status(self.engine, placement_id=placement_id)
        if not rows:
            raise UserError(f"no placement {placement_id}")
        st = rows[0]
        now = datetime.now(UTC)
        estimate = None
        if not st.state.final:
            estimate = self.scheduler.estimate(now).get(placement_id)
        with self.engine.connect() as conn:
            phases = _phases(conn, placement_id, now)
            position = _queue_position(conn, placement_id, now)
            pins = _pins(conn, placement_id, now)
            failing = _task_errors(conn, placement_id)
            links = _links(conn, placement_id)
        known = load_links(self.engine, self.scheduler.settings)
        rates = {f"{src}->{dst}": known.rate(src, dst) for src, dst in sorted(links)}
        blockers = self._blockers(st, position, estimate is not None and estimate.at_risk)
        slack = None if estimate is None else estimate.slack_seconds
        return Explanation(
            placement=st,
            queue_position=position,
            blockers=blockers,
            phases=phases,
            last_errors=failing,
            pins=pins,
            links=rates,
            slack_seconds=slack,
            summary=_summary(st, blockers),
        )

    def _blockers(self, st: PlacementStatus, position: int | None, at_risk: bool) -> list[str]:
        out: list[str] = []
        if st.state is PlacementState.FAILED:
            out.append(f"failed: {st.error}")
            return out
        if st.state is PlacementState.DAMAGED:
            out.append(f"damaged: {st.error}; `datasync verify {st.site} --repair` mends it")
            return out
        if st.state.final:
            return out
        idle = self.staging.idle_reason(st.id)
        if idle:
            out.append(idle)
        if "backing off" in st.phase:
            throttled = any(e.get("class") == "Throttled" for e in st.last_errors)
            cause = "throttled by the site" if throttled else "after errors"
            out.append(f"{st.phase.split('; ')[-1]} ({cause})")
        if "depend on" in st.phase:
            out.append(
                "waiting for the tasks it depends on (chunks before finalize, all before publish)"
            )
        for other, n in sorted(self.sharing.waiting_on(st.id).items()):
            out.append(
                f"waiting for {n} blob(s) placement {other} is moving to {st.site}"
                " (shared, not moved twice)"
            )
        if position:
            out.append(f"{position} task(s) of other placements are ahead in the queue")
        if at_risk or st.at_risk:
            out.append("deadline at risk: its ETA passes the deadline; its tasks are boosted")
        version = self.store.resolve(f"{st.dataset}@{st.version_id}")
        if not version.verified:
            out.append("source unverified: a producer manifest; every byte is hashed on the way")
        return out


def _phases(conn: Connection, placement_id: int, now: datetime) -> list[Phase]:
    rows = conn.execute(
        sa.select(col(PlacementHistory.state), col(PlacementHistory.at), col(PlacementHistory.note))
        .where(col(PlacementHistory.placement_id) == placement_id)
        .order_by(col(PlacementHistory.at), col(PlacementHistory.id))
    ).all()
    phases: list[Phase] = []
    for i, (state, at, note) in enumerate(rows):
        since = as_utc(at) or now
        until = (as_utc(rows[i + 1][1]) or now) if i + 1 < len(rows) else now
        phases.append(
            Phase(
                phase=str(state),
                since=since,
                seconds=max(0.0, (until - since).total_seconds()),
                note=note,
            )
        )
    return phases


def _queue_position(conn: Connection, placement_id: int, now: datetime) -> int | None:
    """Claimable tasks of other placements ahead of this placement's next one."""
    claimable = sa.and_(
        col(Task.state) == TaskState.QUEUED,
        col(Task.blocked_by) == 0,
        col(Task.not_before) <= now,
    )
    head = conn.execute(
        sa.select(col(Task.latest_start), col(Task.priority), col(Task.created_at), col(Task.id))
        .where(col(Task.placement_id) == placement_id, claimable)
        .order_by(
            col(Task.latest_start), col(Task.priority).desc(), col(Task.created_at), col(Task.id)
        )
        .limit(1)
    ).one_or_none()
    if head is None:
        return None
    ls, prio, created, tid = head
    ahead = sa.or_(
        col(Task.latest_start) < ls,
        sa.and_(col(Task.latest_start) == ls, col(Task.priority) > prio),
        sa.and_(
            col(Task.latest_start) == ls,
            col(Task.priority) == prio,
            sa.or_(
                col(Task.created_at) < created,
                sa.and_(col(Task.created_at) == created, col(Task.id) < tid),
            ),
        ),
    )
    return int(
        conn.execute(
            sa.select(sa.func.count()).where(
                claimable, col(Task.placement_id) != placement_id, ahead
            )
        ).scalar_one()
    )


def _pins(conn: Connection, placement_id: int, now: datetime) -> list[str]:
    rows = conn.execute(
        sa.select(col(Pin.holder), col(Pin.expires_at)).where(col(Pin.placement_id) == placement_id)
    ).all()
    out = []
    for holder, expires in rows:
        until = as_utc(expires)
        if until is not None and until <= now:
            continue
        out.append(
            holder if until is None else f"{holder} (until {until.isoformat(timespec='seconds')})"
        )
    jobs = conn.execute(
        sa.select(sa.func.count()).where(
            col(StageRequest.placement_id) == placement_id, col(StageRequest.released_at).is_(None)
        )
    ).scalar_one()
    if jobs:
        out.append(f"{jobs} stage request(s) not released")
    return sorted(out)


def _task_errors(conn: Connection, placement_id: int) -> list[dict[str, Any]]:
    """The last error of each task that has failed at least once, newest first."""
    rows = conn.execute(
        sa.select(
            col(Task.id), col(Task.kind), col(Task.state), col(Task.attempts), col(Task.errors)
        ).where(col(Task.placement_id) == placement_id)
    ).all()
    out = []
    for task_id, kind, state, attempts, errors in rows:
        real = [e for e in (errors or []) if e.get("class") != "Cancelled"]
        if real:
            out.append(
                {
                    "task": int(task_id),
                    "kind": kind,
                    "state": state,
                    "attempts": attempts,
                    **real[-1],
                }
            )
    out.sort(key=lambda e: str(e.get("at", "")), reverse=True)
    return out[:20]


def _links(conn: Connection, placement_id: int) -> set[tuple[str, str]]:
    rows = conn.execute(
        sa.select(col(Task.src_site), col(Task.dst_site))
        .where(col(Task.placement_id) == placement_id, col(Task.src_site).is_not(None))
        .distinct()
    ).all()
    return {(str(s), str(d)) for s, d in rows}


def _summary(st: PlacementStatus, blockers: list[str]) -> str:
    pct = 100.0 * st.bytes_done / st.bytes_total if st.bytes_total else 0.0
    head = (
        f"{st.dataset}@{st.version_id[:12]} at {st.site}: {st.state}, {st.files_done:,}/"
        f"{st.files_total:,} files, {pct:.0f}% of the bytes"
    )
    if st.state is PlacementState.READY:
        return head + "; ready"
    if blockers:
        return head + "; " + blockers[0]
    return head + f"; {st.phase}"
