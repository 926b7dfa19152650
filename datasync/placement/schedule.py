"""Deadline scheduling: link throughput learned from completed tasks, latest start times,
ETAs and at-risk placements.

Each ``tick`` (every worker, and ``datasync up``'s scheduler, run it; it is idempotent):

1. **Measure links.** For each link ``src -> dst`` with tasks finished in the last
   ``window`` seconds: the bytes they moved over the span from the first one's start to the
   last one's end, folded into the link's running average (``link_stats``, persisted).
2. **Estimate.** For each unfinished placement: its remaining bytes per link (the
   ``move_bytes`` of its queued and leased tasks), the time they need at each link's rate,
   and so its *latest start* ``deadline - max over links(remaining / rate)``. The claim
   orders tasks by it: least slack first (``slack = latest start - now``), then priority,
   then age. Its ETA models each link as a queue served earliest deadline first (no
   deadline: last): EDF is the feasibility test, since if any order of the work meets every
   deadline EDF does, and so does least-slack-first as its slack is kept current (a
   running placement's slack holds while a waiting one's shrinks, so they take turns at
   task boundaries). A placement that EDF cannot finish by its deadline is at risk.
3. **Record.** A placement whose ETA passes its deadline is *at risk*: the state owner
   flags it, emits ``PlacementAtRisk``, and boosts its tasks' priority; the flag drops when
   it is back in time. Only changes are written. Then a task moving a blob that other
   placements wait for (``transfer/state/sharing.py``) inherits the smallest latest start
   and highest priority among them.

A placement serves every job that asked for it (its open stage requests), so it is
scheduled for the earliest of their deadlines that it can still meet (its *target*): when
the first job's start can no longer be met, the next job's still can, and the placement
keeps its place for that one instead of making every job that shares it late.

One exception to least-slack-first: a placement that cannot meet any of its deadlines,
even with every link to itself, left first in line would only make others late too (the
domino effect that makes pure slack or deadline ordering collapse under overload). Its
tasks go behind every placement that can still make it, in deadline order, but before work
without a deadline (``HOPELESS_SHIFT``). It stays at risk and is reported so.

Time is injected (``now``), so the ordering and at-risk detection are tested on a
simulated clock.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlmodel import col

from datasync.config import Settings
from datasync.db.ops_tables import StageRequest
from datasync.db.transfer_tables import Placement, Task
from datasync.models import PlacementState, TaskState
from datasync.transfer.links import Links, load_links
from datasync.transfer.state import EngineState, as_utc, row_id

__all__ = ["HOPELESS_SHIFT", "Estimate", "Scheduler"]

_ACTIVE = (PlacementState.PLANNING, PlacementState.TRANSFERRING, PlacementState.PUBLISHING)
# Smaller moves of a latest start are not worth a write (tasks would churn every tick).
_RESCHEDULE_AFTER = timedelta(seconds=30)
# How far a placement that can no longer meet its deadline moves back in the claim order:
# past every latest start a feasible placement can have, still before NO_DEADLINE.
HOPELESS_SHIFT = timedelta(days=3650)


@dataclass(frozen=True, slots=True)
class Estimate:
    placement_id: int
    deadline: datetime | None  # the earliest of its deadlines (at risk: the ETA passes it)
    remaining_bytes: int
    # The claim's sort key: deadline - own time needed (None without a deadline), moved back
    # by HOPELESS_SHIFT once it has passed.
    latest_start: datetime | None
    eta: datetime
    at_risk: bool

    @property
    def slack_seconds(self) -> float | None:
        """Seconds to spare at ``eta`` (negative: late), None without a deadline."""
        if self.deadline is None:
            return None
        return (self.deadline - self.eta).total_seconds()


class Scheduler:
    """Keeps latest starts and risk current. One per process; thread-safe enough (each
    tick reads and writes through its own connections)."""

    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        state: EngineState,
        *,
        window: float = 300.0,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.state = state
        self.window = window
        self.clock = clock
        self._written: dict[int, tuple[datetime | None, bool]] = {}

    def tick(self, now: datetime | None = None) -> dict[int, Estimate]:
        now = now or self.clock()
        self.measure_links(now)
        estimates = self.estimate(now)
        for est in estimates.values():
            before = self._written.get(est.placement_id)
            if (
                before is not None
                and before[1] == est.at_risk
                and _close(before[0], est.latest_start)
            ):
                continue
            self.state.staging.schedule(
                est.placement_id, latest_start=est.latest_start, at_risk=est.at_risk, eta=est.eta
            )
            self._written[est.placement_id] = (est.latest_start, est.at_risk)
        for gone in set(self._written) - set(estimates):
            del self._written[gone]
        # A task moving a blob others wait for is as urgent as the most urgent of them.
        self.state.sharing.inherit_urgency()
        return estimates

    def measure_links(self, now: datetime) -> dict[tuple[str, str], float]:
        since = now - timedelta(seconds=self.window)
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(
                    col(Task.src_site),
                    col(Task.dst_site),
                    sa.func.sum(col(Task.bytes_moved)),
                    sa.func.min(col(Task.started_at)),
                    sa.func.max(col(Task.finished_at)),
                )
                .where(
                    col(Task.state) == TaskState.DONE,
                    col(Task.finished_at) >= since,
                    col(Task.finished_at) <= now,
                    col(Task.src_site).is_not(None),
                    col(Task.bytes_moved) > 0,
                )
                .group_by(col(Task.src_site), col(Task.dst_site))
            ).all()
        measured = {}
        for src, dst, nbytes, first, last in rows:
            start, end = as_utc(first), as_utc(last)
            if start is None or end is None or src is None or dst is None:
                continue
            span = max(1.0, (end - start).total_seconds())
            measured[(src, dst)] = self.state.staging.record_link(src, dst, int(nbytes) / span)
        return measured

    def estimate(self, now: datetime, links: Links | None = None) -> dict[int, Estimate]:
        links = links or load_links(self.engine, self.settings)
        with self.engine.connect() as conn:
            placements = {
                row_id(pid): as_utc(deadline)
                for pid, deadline in conn.execute(
                    sa.select(col(Placement.id), col(Placement.deadline)).where(
                        col(Placement.state).in_(_ACTIVE)
                    )
                )
            }
            asked: dict[int, list[datetime]] = defaultdict(list)
            for pid, deadline in conn.execute(
                sa.select(col(StageRequest.placement_id), col(StageRequest.deadline))
                .join(Placement, col(Placement.id) == col(StageRequest.placement_id))
                .where(
                    col(Placement.state).in_(_ACTIVE),
                    col(StageRequest.released_at).is_(None),
                    col(StageRequest.deadline).is_not(None),
                )
            ):
                asked[row_id(pid)].append(as_utc(deadline) or now)
            work = conn.execute(
                sa.select(
                    col(Task.placement_id),
                    col(Task.src_site),
                    col(Task.dst_site),
                    sa.func.coalesce(sa.func.sum(col(Task.move_bytes)), 0),
                )
                .where(
                    col(Task.state).in_((TaskState.QUEUED, TaskState.LEASED)),
                    col(Task.src_site).is_not(None),
                )
                .group_by(col(Task.placement_id), col(Task.src_site), col(Task.dst_site))
            ).all()
        per_link: dict[int, dict[tuple[str, str], int]] = defaultdict(dict)
        for pid, src, dst, nbytes in work:
            if pid in placements:
                per_link[int(pid)][(str(src), str(dst))] = int(nbytes)
        own: dict[int, timedelta] = {
            pid: timedelta(
                seconds=max((b / links.rate(*link) for link, b in per_link[pid].items()), default=0)
            )
            for pid in placements
        }
        # The deadline each placement is scheduled for, and whether none can be met.
        target: dict[int, datetime | None] = {}
        hopeless: set[int] = set()
        for pid, deadline in placements.items():
            mine = sorted({*asked.get(pid, ()), *((deadline,) if deadline else ())})
            feasible = [d for d in mine if d - own[pid] >= now]
            target[pid] = feasible[0] if feasible else (mine[0] if mine else None)
            if mine and not feasible and own[pid]:
                hopeless.add(pid)
        claim_at = {
            pid: None
            if d is None
            else d - own[pid] + (HOPELESS_SHIFT if pid in hopeless else timedelta(0))
            for pid, d in target.items()
        }
        # Each link as a queue, earliest deadline first: the feasibility test (see above).
        finish: dict[int, datetime] = {pid: now for pid in placements}
        queues: dict[tuple[str, str], list[int]] = defaultdict(list)
        for pid, links_of in per_link.items():
            for link in links_of:
                queues[link].append(pid)
        far = datetime.max.replace(tzinfo=UTC)
        for link, pids in queues.items():
            rate = links.rate(*link)
            done = 0.0
            # Feasible placements earliest target first, then the hopeless ones, then those
            # without a deadline: the claim's order.
            for pid in sorted(
                pids, key=lambda p: (target[p] is None, p in hopeless, target[p] or far, p)
            ):
                done += per_link[pid][link] / rate
                finish[pid] = max(finish[pid], now + timedelta(seconds=done))
        return {
            pid: Estimate(
                placement_id=pid,
                deadline=deadline,
                remaining_bytes=sum(per_link[pid].values()),
                latest_start=claim_at[pid],
                eta=finish[pid],
                at_risk=deadline is not None and finish[pid] > deadline,
            )
            for pid, deadline in placements.items()
        }


def _close(a: datetime | None, b: datetime | None) -> bool:
    if a is None or b is None:
        return a is b
    return abs(a - b) < _RESCHEDULE_AFTER
