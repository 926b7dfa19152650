"""Deadline scheduling on SQLite and PostgreSQL: slack ordering and at-risk detection on a
simulated clock, deadline-aware source choice, and competing deadlines end to end."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlmodel import col

from datasync.bootstrap import bootstrap
from datasync.config import Settings
from datasync.db.ops_tables import PlacementHistory
from datasync.events import EventBus, PlacementAtRisk
from datasync.models import PlacementState
from datasync.placement.schedule import Scheduler
from datasync.transfer.payloads import BlobsPayload
from datasync.transfer.planner import Planner, PlannerConfig
from datasync.transfer.state import AT_RISK_BOOST
from datasync.transfer.supervisor import WorkerOptions, run_worker
from tests.fixtures.replication import make_tree, posix_site, settings_for
from tests.fixtures.transfer import (
    MIB,
    Recorder,
    add_placement,
    fake_entry,
    make_state,
    payload_of,
    placement_row,
    record_sources,
    register,
    settings_with,
    tasks_of,
    version_pk,
)

T0 = datetime(2026, 11, 30, 8, 0, tzinfo=UTC)
RATE = 10 * MIB  # bytes per second on every link of these tests


@pytest.fixture
def settings(tmp_path: Path, db_url: str) -> Settings:
    return settings_with(
        tmp_path,
        db_url,
        {"cheap": "memory://s-cheap", "fast": "memory://s-fast", "dst": "memory://s-dst"},
        cheap={"dst": 0.01},
        fast={"dst": 0.09},
    )


def _placement(
    engine: Engine, settings: Settings, name: str, size: int, deadline: datetime | None
) -> int:
    """A placement of one ``size``-byte blob held at ``cheap``, planned, with a deadline."""
    version = register(engine, name, [fake_entry("blob.bin", name, size)], chunk_size=size)
    record_sources(engine, settings, version_pk(engine, version), "cheap:")
    placement = add_placement(engine, version, state="PLANNING")
    if deadline is not None:
        _deadline(engine, placement, deadline)
    Planner(engine, settings, make_state(engine)).plan(placement)
    return placement


def _deadline(engine: Engine, placement: int, deadline: datetime) -> None:
    with engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE placements SET deadline = :d WHERE id = :id").bindparams(
                sa.bindparam("d", type_=sa.DateTime(timezone=True))
            ),
            {"d": deadline, "id": placement},
        )


def test_slack_orders_the_claim_and_late_placements_are_flagged_at_risk(
    engine: Engine, settings: Settings
) -> None:
    recorder = Recorder()
    bus = EventBus()
    bus.subscribe(recorder)
    state = make_state(engine, bus)
    state.staging.record_link("cheap", "dst", RATE)
    # A: 100 MiB due in 60 s (needs 10 s: slack 50 s). B: 600 MiB due in 100 s (needs 60 s:
    # slack 40 s). B has the later deadline but less slack, so B is claimed first; as B's
    # slack holds and A's shrinks they take turns, and both are in time (the ETA is the
    # earliest-deadline-first schedule: A at 10 s, B at 70 s). C, no deadline, goes last.
    c = _placement(engine, settings, "drive/c", 50 * MIB, None)
    a = _placement(engine, settings, "drive/a", 100 * MIB, T0 + timedelta(seconds=60))
    b = _placement(engine, settings, "drive/b", 600 * MIB, T0 + timedelta(seconds=100))
    scheduler = Scheduler(engine, settings, state, clock=lambda: T0)
    est = scheduler.tick(T0)
    assert est[a].latest_start == T0 + timedelta(seconds=50)
    assert est[b].latest_start == T0 + timedelta(seconds=40)
    assert est[c].latest_start is None
    assert est[a].eta == T0 + timedelta(seconds=10) and not est[a].at_risk
    assert est[b].eta == T0 + timedelta(seconds=70) and not est[b].at_risk
    assert est[c].eta == T0 + timedelta(seconds=75)
    claimed = state.tasks.claim("w", 10, 60)
    blobs = [t for t in claimed if t.kind == "blobs"]
    assert [t.placement_id for t in blobs] == [b, a, c]
    # The link turns out slower, 5 MiB/s: A ends at 25 s (in time), B at 145 s (due at
    # 100 s: at risk, flagged and announced), a new D (due at 200 s) after B at 165 s.
    d = _placement(engine, settings, "drive/d", 100 * MIB, T0 + timedelta(seconds=200))
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE link_stats SET bytes_per_second = 5242880")
    est = scheduler.tick(T0 + timedelta(seconds=5))
    assert est[a].eta == T0 + timedelta(seconds=25) and not est[a].at_risk
    assert est[b].eta == T0 + timedelta(seconds=145) and est[b].at_risk
    assert est[d].eta == T0 + timedelta(seconds=165) and not est[d].at_risk
    assert [placement_row(engine, p).at_risk for p in (a, b, d)] == [False, True, False]
    assert [ev.placement_id for ev in recorder.of(PlacementAtRisk)] == [b]
    # A fresh placement due very soon is at risk at once: flagged, event, tasks boosted.
    e = _placement(engine, settings, "drive/e", 100 * MIB, T0 + timedelta(seconds=10))
    est = scheduler.tick(T0 + timedelta(seconds=5))
    assert est[e].at_risk and placement_row(engine, e).at_risk is True
    risky = [ev for ev in recorder.of(PlacementAtRisk) if ev.placement_id == e]
    assert len(risky) == 1 and risky[0].at_risk and risky[0].eta is not None
    assert {t.priority for t in tasks_of(engine, e) if t.state == "queued"} == {AT_RISK_BOOST}
    # Back in time (the deadline moved later): the flag drops, and so does the boost.
    _deadline(engine, e, T0 + timedelta(hours=2))
    scheduler.tick(T0 + timedelta(seconds=6))
    assert placement_row(engine, e).at_risk is False
    assert {t.priority for t in tasks_of(engine, e) if t.state == "queued"} == {0}


def test_the_source_is_the_cheapest_that_meets_the_deadline(
    engine: Engine, settings: Settings
) -> None:
    state = make_state(engine)
    state.staging.record_link("cheap", "dst", 1 * MIB)  # cheap, slow
    state.staging.record_link("fast", "dst", 100 * MIB)  # expensive, fast
    calls: list[int] = []

    def plan_with(deadline: datetime | None) -> set[str]:
        calls.append(1)
        n = len(calls)
        entries = [fake_entry(f"f{i}", f"src{n}-{i}", 5 * MIB) for i in range(4)]  # 20 MiB
        version = register(engine, f"drive/s{n}", entries, chunk_size=8 * MIB)
        pk = version_pk(engine, version)
        record_sources(engine, settings, pk, "cheap:")
        record_sources(engine, settings, pk, "fast:")
        placement = add_placement(engine, version, state="PLANNING")
        if deadline is not None:
            _deadline(engine, placement, deadline)
        Planner(engine, settings, state).plan(placement, PlannerConfig(batch_items=1))
        sources = set()
        for row in tasks_of(engine, placement):
            payload = payload_of(row)
            if isinstance(payload, BlobsPayload):
                sources |= {i.src.site for i in payload.items}
        return sources

    now = datetime.now(UTC)
    assert plan_with(None) == {"cheap"}  # no deadline: the cheapest
    assert plan_with(now + timedelta(hours=1)) == {"cheap"}  # 20 s at 1 MiB/s: in time
    assert plan_with(now + timedelta(seconds=5)) == {"fast"}  # only the fast link makes it
    state.staging.penalize("fast", "dst", now + timedelta(minutes=10))
    assert plan_with(now + timedelta(seconds=6)) == {"cheap"}  # penalized: the other one


def test_the_earlier_deadline_is_served_first_across_three_sites(
    tmp_path: Path, db_url: str
) -> None:
    """Three sites (a pipeline and two clusters), one worker with one task slot: of two
    placements queued at once, the one with the earlier deadline is READY first, even
    though it was asked for last."""
    pipeline = posix_site("pipeline", tmp_path / "pipeline")
    lustre = posix_site("lustre", tmp_path / "lustre")
    cloud = posix_site("cloud", tmp_path / "cloud")
    app = bootstrap(settings_for(tmp_path / "home", db_url, [pipeline, lustre, cloud]))
    try:
        assert pipeline.root is not None
        make_tree(pipeline.root / "a", seed=1, shards=(3 * MIB,))
        make_tree(pipeline.root / "b", seed=2, shards=(3 * MIB,))
        app.service.register("drive/late", str(pipeline.root / "a"), label="v1")
        app.service.register("drive/soon", str(pipeline.root / "b"), label="v1")
        now = datetime.now(UTC)
        late = app.staging.stage("drive/late@v1", "lustre", deadline=now + timedelta(hours=5))
        soon = app.staging.stage("drive/soon@v1", "cloud", deadline=now + timedelta(minutes=5))
        stop = threading.Event()
        options = WorkerOptions(task_slots=1, queue_backoff_base=0.0, idle_sleep=0.05)
        run_worker(app.settings, processes=0, once=True, stop_event=stop, options=options)
        ready = {}
        with app.engine.connect() as conn:
            for pid, at in conn.execute(
                sa.select(col(PlacementHistory.placement_id), col(PlacementHistory.at)).where(
                    col(PlacementHistory.state) == PlacementState.READY
                )
            ):
                ready[int(pid)] = at
        assert late.placement is not None and soon.placement is not None
        assert ready[soon.placement] < ready[late.placement]
    finally:
        app.close()
