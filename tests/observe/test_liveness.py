"""Worker liveness: the ``workers`` table tells a running task from a dead worker's.

A task leased by an owner with a fresh heartbeat is *running*; the same task after its
owner stopped beating (or without a row at all, as after a SIGKILL) is *orphaned* at once,
long before its lease expires: in ``status``'s phase, in the queue gauges and in the
active-transfer gauge. A placement still being planned says so instead of "0/0 (100%)".
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlmodel import col

from datasync.db.engine import write_transaction
from datasync.db.ops_tables import WorkerRow
from datasync.observe.state import queue_depth
from datasync.observe.workers import LIVE_SECONDS, WorkerLiveness
from datasync.transfer.status import status
from tests.fixtures.transfer import add_placement, add_task, fake_entry, make_state, register


def _rows(engine: Engine) -> dict[str, tuple[int, datetime]]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(col(WorkerRow.owner), col(WorkerRow.tasks_running), col(WorkerRow.last_seen))
        ).all()
    return {owner: (running, seen) for owner, running, seen in rows}


def _age(engine: Engine, owner: str, seconds: float) -> None:
    with write_transaction(engine) as conn:
        conn.execute(
            sa.update(WorkerRow)
            .where(col(WorkerRow.owner) == owner)
            .values(last_seen=datetime.now(UTC) - timedelta(seconds=seconds))
        )


def test_register_beat_deregister_and_prune(engine: Engine) -> None:
    live = WorkerLiveness(engine)
    live.register("host:1:a")
    live.register("host:2:b")
    live.beat("host:1:a", 3)
    rows = _rows(engine)
    assert set(rows) == {"host:1:a", "host:2:b"} and rows["host:1:a"][0] == 3
    live.deregister("host:2:b")
    assert set(_rows(engine)) == {"host:1:a"}
    live.beat("host:9:c", 1)  # a beat without a row (pruned during an outage) writes it
    assert set(_rows(engine)) == {"host:1:a", "host:9:c"}
    _age(engine, "host:9:c", 2 * 3600)
    live.register("host:3:d")  # a starting worker prunes rows silent for an hour
    assert set(_rows(engine)) == {"host:1:a", "host:3:d"}


def test_a_dead_workers_task_is_orphaned_not_running(engine: Engine) -> None:
    summary = register(engine, "test/live", [fake_entry("a", "x", 10)])
    pid = add_placement(engine, summary, site="dst")
    add_task(engine, pid, "blobs")
    add_task(engine, pid, "blobs")
    owner = "host:42:dead"
    claimed = make_state(engine).tasks.claim(owner, 1, lease_seconds=600)
    assert len(claimed) == 1

    def phase() -> str:
        return status(engine, placement_id=pid)[0].phase

    def queue() -> tuple[dict[str, int], dict[str, int]]:
        with engine.connect() as conn:
            depth = queue_depth(conn, datetime.now(UTC))
        return depth.tasks, depth.running_by_site

    # No row at all (a worker SIGKILLed before it registered, or an old version).
    assert phase().startswith("1 task(s) held by a worker that stopped heartbeating")
    assert "task(s) running" not in phase()
    assert queue() == ({"waiting": 1, "backoff": 0, "blocked": 0, "running": 0, "orphaned": 1}, {})
    WorkerLiveness(engine).register(owner)
    assert phase() == "1 task(s) running; 1 task(s) waiting for a worker"
    assert queue() == (
        {"waiting": 1, "backoff": 0, "blocked": 0, "running": 1, "orphaned": 0},
        {"dst": 1},
    )
    _age(engine, owner, LIVE_SECONDS + 1)  # SIGKILLed: its row stays, its beats stop
    assert phase().startswith("1 task(s) held by a worker that stopped heartbeating")
    assert queue()[0]["orphaned"] == 1 and queue()[1] == {}


def test_a_placement_being_planned_says_so(engine: Engine) -> None:
    summary = register(engine, "test/plan", [fake_entry("a", "x", 10)])
    pid = add_placement(engine, summary, site="dst", state="PLANNING")
    assert status(engine, placement_id=pid)[0].phase == (
        "planning: comparing the version with what the site holds"
    )
    add_task(engine, pid, "blobs")
    assert status(engine, placement_id=pid)[0].phase == "planning (1 task(s) so far)"
