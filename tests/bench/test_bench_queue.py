"""Task queue throughput on PostgreSQL: claim + complete, empty payloads, 8 worker processes.

datasync runs its production transitions (``TaskStates.claim`` / ``TaskStates.complete``,
the statement of ``claim_sql``) from 8 spawned processes, each with its own engine, claiming
``BATCH`` tasks at a time (a worker's default ``task_slots``) and completing each. The
peer, in the same run on the same server, is the bare minimum such a queue needs: psycopg
in autocommit, ``UPDATE ... WHERE id IN (SELECT ... FOR UPDATE SKIP LOCKED LIMIT n)`` to
claim and one ``UPDATE`` per task to complete, on a table with nothing else. Every claimed
id is counted: a task claimed twice is a double claim (must be 0). Results go to
``docs/bench-results/queue.md``.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections import Counter
from collections.abc import Iterator
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

from datasync.db.engine import create_engine, write_transaction
from datasync.db.migrate import upgrade_to_head
from datasync.db.transfer_tables import NO_DEADLINE
from datasync.transfer.payloads import BlobsPayload
from datasync.transfer.state import NewTask
from datasync.transfer.state._core import Txn
from datasync.transfer.state.tasks import insert_tasks
from tests.bench.targets import Target, record, write_section
from tests.fixtures.transfer import add_placement, fake_entry, make_state, register

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "docs" / "bench-results" / "queue.md"
N_TASKS = int(os.environ.get("BENCH_QUEUE_TASKS", "20000"))
WORKERS = int(os.environ.get("BENCH_QUEUE_WORKERS", "8"))
BATCH = 4  # WorkerOptions.task_slots: what a worker claims at once
TARGET = 5000.0
ROWS: list[str] = []

_BARE_CLAIM = """UPDATE bare_jobs SET state = 'leased', owner = %(owner)s
 WHERE id IN (SELECT id FROM bare_jobs WHERE state = 'queued'
               ORDER BY id FOR UPDATE SKIP LOCKED LIMIT %(n)s)
RETURNING id"""
_BARE_COMPLETE = "UPDATE bare_jobs SET state = 'done' WHERE id = %s AND owner = %s"


def _psycopg_dsn(url: str) -> str:
    return sa.engine.make_url(url).set(drivername="postgresql").render_as_string(False)


def datasync_worker(url: str, owner: str, start: Event, out: Queue[Any]) -> None:
    """Process entry: the production claim and complete until the queue is empty."""
    engine = create_engine(url)
    queue = make_state(engine).tasks
    got: list[int] = []
    try:
        engine.connect().close()  # connected before the clock starts
        start.wait(60)
        empty = 0
        while empty < 3:  # SKIP LOCKED may hide the last rows others hold for a moment
            claimed = queue.claim(owner, BATCH, lease_seconds=300)
            if not claimed:
                empty += 1
                continue
            empty = 0
            for task in claimed:
                got.append(task.id)
                queue.complete(owner, task.id, 0)
        out.put((owner, time.time(), got))
    finally:
        engine.dispose()


def bare_worker(url: str, owner: str, start: Event, out: Queue[Any]) -> None:
    """Process entry: the peer, bare psycopg, every commit flushed."""
    _bare(url, owner, start, out, relaxed=False)


def bare_worker_relaxed(url: str, owner: str, start: Event, out: Queue[Any]) -> None:
    """Process entry: the peer with ``synchronous_commit = off`` on every commit."""
    _bare(url, owner, start, out, relaxed=True)


def _bare(url: str, owner: str, start: Event, out: Queue[Any], *, relaxed: bool) -> None:
    got: list[int] = []
    with psycopg.connect(_psycopg_dsn(url), autocommit=True) as conn:
        if relaxed:
            conn.execute("SET synchronous_commit = off")
        start.wait(60)
        empty = 0
        while empty < 3:
            ids = [r[0] for r in conn.execute(_BARE_CLAIM, {"owner": owner, "n": BATCH})]
            if not ids:
                empty += 1
                continue
            empty = 0
            for task_id in ids:
                got.append(task_id)
                conn.execute(_BARE_COMPLETE, (task_id, owner))
    out.put((owner, time.time(), got))


def _race(target: Any, url: str) -> tuple[float, int, int]:
    """Run WORKERS processes of ``target``; (seconds, tasks claimed, double claims)."""
    ctx = mp.get_context("spawn")
    start = ctx.Event()
    out: Queue[Any] = ctx.Queue()
    procs = [ctx.Process(target=target, args=(url, f"w{i}", start, out)) for i in range(WORKERS)]
    for p in procs:
        p.start()
    time.sleep(3.0 + WORKERS * 0.5)  # spawned and connected (imports take a while here)
    t0 = time.time()
    start.set()
    results = [out.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(60)
    end = max(r[1] for r in results)
    counts = Counter(i for r in results for i in r[2])
    doubles = sum(c - 1 for c in counts.values() if c > 1)
    return end - t0, len(counts), doubles


def _fill_datasync(url: str) -> None:
    engine = create_engine(url)
    try:
        upgrade_to_head(engine)
        version = register(engine, "bench/queue", [fake_entry("a", "a", 10)])
        placement = add_placement(engine, version)
        with write_transaction(engine) as conn:
            insert_tasks(
                Txn(conn, True),
                placement,
                [NewTask(BlobsPayload("dst", ())) for _ in range(N_TASKS)],
                parent=None,
                priority=0,
                deadline=NO_DEADLINE,
                max_attempts=8,
            )
        with engine.connect() as conn:
            conn.execute(sa.text("ANALYZE tasks"))
            conn.commit()
    finally:
        engine.dispose()


def _fill_bare(url: str) -> None:
    with psycopg.connect(_psycopg_dsn(url), autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE bare_jobs (id bigserial PRIMARY KEY, state text NOT NULL,"
            " owner text, payload json NOT NULL)"
        )
        conn.execute("CREATE INDEX bare_queued ON bare_jobs (id) WHERE state = 'queued'")
        conn.execute(
            "INSERT INTO bare_jobs (state, payload)"
            " SELECT 'queued', '{}'::json FROM generate_series(1, %s)",
            (N_TASKS,),
        )
        conn.execute("ANALYZE bare_jobs")


def _done(url: str, sql: str) -> int:
    with psycopg.connect(_psycopg_dsn(url), autocommit=True) as conn:
        row = conn.execute(sql).fetchone()
        assert row is not None
        return int(row[0])


@pytest.fixture(scope="module", autouse=True)
def _write_results() -> Iterator[None]:
    yield
    if not ROWS:
        return
    write_section(
        OUT,
        "Task queue throughput (PostgreSQL)",
        ", PostgreSQL on loopback, shared with the workers",
        f"{WORKERS} worker processes claim {BATCH} tasks at a time and complete each; empty "
        "payloads. datasync runs `TaskStates.claim` / `TaskStates.complete` (the production "
        "code); the peer is a bare psycopg `FOR UPDATE SKIP LOCKED` loop on a one-index "
        f"table, in the same run. Target: >= {TARGET:,.0f} tasks/s.",
        ["Queue", "Tasks", "Seconds", "Tasks/s", "Double claims", "vs flushed peer"],
        ROWS,
        f"BENCH_QUEUE_TASKS={N_TASKS} .venv/bin/pytest -q -s -p no:cacheprovider "
        "tests/bench/test_bench_queue.py",
    )


def _reset_bare(url: str) -> None:
    with psycopg.connect(_psycopg_dsn(url), autocommit=True) as conn:
        conn.execute("UPDATE bare_jobs SET state = 'queued', owner = NULL")
        conn.execute("VACUUM ANALYZE bare_jobs")


def test_claim_and_complete_throughput(pg_url: str) -> None:
    _fill_datasync(pg_url)
    _fill_bare(pg_url)
    bare = _race(bare_worker, pg_url)
    assert _done(pg_url, "SELECT count(*) FROM bare_jobs WHERE state = 'done'") == N_TASKS
    _reset_bare(pg_url)
    relaxed = _race(bare_worker_relaxed, pg_url)
    assert _done(pg_url, "SELECT count(*) FROM bare_jobs WHERE state = 'done'") == N_TASKS
    ds = _race(datasync_worker, pg_url)
    assert _done(pg_url, "SELECT count(*) FROM tasks WHERE state = 'done'") == N_TASKS
    for _seconds, claimed, doubles in (bare, relaxed, ds):
        assert (claimed, doubles) == (N_TASKS, 0)
    peer_rate = N_TASKS / bare[0]
    for name, (seconds, _n, doubles) in (
        ("datasync `TaskStates`", ds),
        ("bare psycopg, every commit flushed", bare),
        ("bare psycopg, `synchronous_commit = off`", relaxed),
    ):
        rate = N_TASKS / seconds
        ROWS.append(
            f"| {name} | {N_TASKS:,} | {seconds:.2f} | {rate:,.0f} | {doubles} "
            f"| {rate / peer_rate:.2f}x |"
        )
        print(f"\nqueue: {name}: {rate:,.0f} tasks/s")
    rate = N_TASKS / ds[0]
    record(
        "queue",
        [
            Target(
                f"Queue: claim + complete, {WORKERS} workers on PostgreSQL, empty payloads",
                f"{rate:,.0f} tasks/s, {ds[2]} double claims",
                f"bare psycopg SKIP LOCKED: {peer_rate:,.0f} tasks/s",
                f"{rate / peer_rate:.2f}x the peer's tasks/s",
                f">= {TARGET:,.0f} tasks/s, 0 double claims",
                rate >= TARGET and ds[2] == 0,
            )
        ],
        f"BENCH_QUEUE_TASKS={N_TASKS} .venv/bin/pytest -q -s -p no:cacheprovider"
        " tests/bench/test_bench_queue.py",
    )
