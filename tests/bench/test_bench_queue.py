"""Task queue throughput on PostgreSQL: claim + complete, empty payloads, 8 worker processes.

datasync runs its production transition (``TaskStates.complete_and_claim``, a worker's turn:
the tasks finished since the last turn completed and the free slots claimed in one
transaction, the statement of ``claim_sql``) from 8 spawned processes, each with its own
engine, claiming ``BATCH`` tasks at a time (a worker's default ``task_slots``). The
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
ROUNDS = int(os.environ.get("BENCH_QUEUE_ROUNDS", "2"))
BATCH = 4  # WorkerOptions.task_slots: what a worker claims at once
TARGET = 5000.0
ROWS: list[str] = []
PROFILE: list[str] = []

_BARE_CLAIM = """UPDATE bare_jobs SET state = 'leased', owner = %(owner)s
 WHERE id IN (SELECT id FROM bare_jobs WHERE state = 'queued'
               ORDER BY id FOR UPDATE SKIP LOCKED LIMIT %(n)s)
RETURNING id"""
_BARE_COMPLETE = "UPDATE bare_jobs SET state = 'done' WHERE id = %s AND owner = %s"


def _psycopg_dsn(url: str) -> str:
    return sa.engine.make_url(url).set(drivername="postgresql").render_as_string(False)


def _backend_cpu(pid: int) -> float:
    """CPU seconds (user + system) PostgreSQL's backend ``pid`` has used (same host)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def datasync_worker(url: str, owner: str, start: Event, out: Queue[Any]) -> None:
    """Process entry: the production claim and complete until the queue is empty."""
    engine = create_engine(url)
    queue = make_state(engine).tasks
    got: list[int] = []
    try:
        with engine.connect() as conn:  # connected before the clock starts
            backend = int(conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one())
        start.wait(60)
        cpu, pg_cpu = time.process_time(), _backend_cpu(backend)
        empty = 0
        finished: dict[int, int] = {}
        while empty < 3:  # SKIP LOCKED may hide the last rows others hold for a moment
            # The worker's turn: complete what finished, claim the free slots.
            _done, claimed = queue.complete_and_claim(owner, finished, BATCH, lease_seconds=300)
            finished = {}
            if not claimed:
                empty += 1
                continue
            empty = 0
            for task in claimed:
                got.append(task.id)
                finished[task.id] = 0  # an empty task finishes at once
        cpu, pg_cpu = time.process_time() - cpu, _backend_cpu(backend) - pg_cpu
        out.put((owner, time.time(), got, cpu, pg_cpu))
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
        cpu, pg_cpu = time.process_time(), _backend_cpu(conn.info.backend_pid)
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
        cpu, pg_cpu = time.process_time() - cpu, _backend_cpu(conn.info.backend_pid) - pg_cpu
    out.put((owner, time.time(), got, cpu, pg_cpu))


def _race(target: Any, url: str) -> tuple[float, int, int, float, float]:
    """Run WORKERS processes of ``target``; (seconds, tasks claimed, double claims, CPU
    seconds of the workers, CPU seconds of their PostgreSQL backends)."""
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
    return end - t0, len(counts), doubles, sum(r[3] for r in results), sum(r[4] for r in results)


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
        "payloads. datasync runs `TaskStates.complete_and_claim` (the production worker's "
        "turn: the tasks finished since the last turn completed and the free slots claimed "
        "in one transaction); the peer is a bare psycopg `FOR UPDATE SKIP LOCKED` loop on a "
        f"one-index table, in the same run; {ROUNDS} interleaved rounds, each queue's best "
        f"shown. Target: >= {TARGET:,.0f} tasks/s.",
        [
            "Queue",
            "Tasks",
            "Seconds",
            "Tasks/s",
            "Double claims",
            "vs flushed peer",
            "Worker CPU per task",
            "PostgreSQL CPU per task",
        ],
        ROWS,
        f"BENCH_QUEUE_TASKS={N_TASKS} .venv/bin/pytest -q -s -p no:cacheprovider "
        "tests/bench/test_bench_queue.py",
    )
    with OUT.open("a", encoding="utf-8") as f:
        f.write("\n" + "\n".join(PROFILE) + "\n")


def _profile(ds: tuple[float, int, int, float, float]) -> list[str]:
    """Where a task's time goes in datasync's turn, and the ceiling it sets here."""
    cpu, pg_cpu = ds[3] / N_TASKS * 1e6, ds[4] / N_TASKS * 1e6
    cores = os.cpu_count() or 1
    ceiling = cores * 1e6 / (cpu + pg_cpu)
    # The raw-psycopg experiment's worker CPU, as a share of this path's (0.35-0.53x).
    raw_low, raw_high = (cores * 1e6 / (cpu * share + pg_cpu) for share in (0.53, 0.35))
    per_turn = BATCH
    return [
        "## Where a task's time goes",
        "",
        f"A turn completes the {per_turn} tasks of the previous turn and claims {per_turn} "
        "more in one transaction: 4 round trips (the pool's pre-ping `SELECT 1`, the "
        "completion `UPDATE`, the claim `UPDATE`, `COMMIT`) and one WAL flush per "
        f"{per_turn} tasks, where the flushed peer needs 5 round trips and 5 flushes. "
        "Before the turn, datasync claimed and completed each task in its own transaction "
        "(3 round trips each: 491 tasks/s, 0.21x the peer, in the run of 2026-11-29 17:21). "
        "The pre-ping is not what limits it: an A/B on 2026-11-30 (3 interleaved rounds of "
        "this bench's datasync queue, one with a ping only after a second idle) gave best "
        "2,454 vs 2,335 tasks/s and medians 1,924 vs 2,031 for the idle-only ping vs the "
        "pre-ping: no measurable difference, so the pre-ping stayed. "
        "CPU per task, from the table (worker: `time.process_time`; PostgreSQL: its "
        "backends' `/proc/<pid>/stat`):",
        "",
        "| Where | CPU per task | What it is | What would cut it |",
        "|---|---|---|---|",
        f"| datasync worker (Python) | {cpu:,.0f} µs | SQLAlchemy per statement: pool "
        "checkout, pre-ping and return, compiled-statement lookup and parameter processing, "
        "psycopg building each result's cursor description, row conversion (payload JSON, "
        "datetimes), the event objects (a cProfile of one worker spreads it over many small "
        "functions) | "
        "the two hot statements through the raw psycopg connection: measured on "
        "2026-11-30 with the same SQL in a bare psycopg loop (one worker, no SQLAlchemy, no "
        "events), 137-197 µs of worker CPU per task against 375-388 µs for this path in the "
        "same minutes (0.35-0.53x), PostgreSQL's CPU unchanged: with this run's figures a "
        f"ceiling of about {raw_low:,.0f}-{raw_high:,.0f} tasks/s instead of {ceiling:,.0f} |",
        f"| PostgreSQL backends | {pg_cpu:,.0f} µs | parse/plan/execute of 4 statements "
        "per turn (the claim's custom plan costs more to plan than to run: 0.41 ms vs "
        "0.26 ms in `EXPLAIN ANALYZE`), the claim's index scan over entries of rows just "
        "claimed by others, the commit | more tasks per turn (a worker's `task_slots` is 4: "
        "each turn's fixed cost is shared by 4 tasks); `plan_cache_mode = "
        "force_generic_plan` was tried (one worker, 2 runs each): not measurably cheaper |",
        "",
        f"With {cpu + pg_cpu:,.0f} µs of CPU per task and {cores} cores shared by the 8 "
        f"workers and PostgreSQL, this machine cannot pass ~{ceiling:,.0f} tasks/s "
        f"however the work is scheduled; the {TARGET:,.0f} tasks/s target needs at most "
        f"{cores * 1e6 / TARGET:,.0f} µs per task, worker and database together.",
    ]


def _reset_bare(url: str) -> None:
    with psycopg.connect(_psycopg_dsn(url), autocommit=True) as conn:
        conn.execute("UPDATE bare_jobs SET state = 'queued', owner = NULL")
        conn.execute("VACUUM ANALYZE bare_jobs")


def _reset_datasync(url: str) -> None:
    with psycopg.connect(_psycopg_dsn(url), autocommit=True) as conn:
        conn.execute(
            "UPDATE tasks SET state = 'queued', lease_owner = NULL, lease_expires_at = NULL,"
            " attempts = 0, finished_at = NULL"
        )
        conn.execute("VACUUM ANALYZE tasks")


_Race = tuple[float, int, int, float, float]


def test_claim_and_complete_throughput(pg_url: str) -> None:
    _fill_datasync(pg_url)
    _fill_bare(pg_url)
    # Interleaved rounds (the machine is shared): each queue's best round is reported.
    rounds: dict[str, list[_Race]] = {"bare": [], "relaxed": [], "ds": []}
    for _ in range(ROUNDS):
        for name, worker, table, reset in (
            ("bare", bare_worker, "bare_jobs", _reset_bare),
            ("ds", datasync_worker, "tasks", _reset_datasync),
            ("relaxed", bare_worker_relaxed, "bare_jobs", _reset_bare),
        ):
            rounds[name].append(_race(worker, pg_url))
            assert _done(pg_url, f"SELECT count(*) FROM {table} WHERE state = 'done'") == N_TASKS
            reset(pg_url)
    for _seconds, claimed, doubles, _cpu, _pg in (r for rs in rounds.values() for r in rs):
        assert (claimed, doubles) == (N_TASKS, 0)
    bare, relaxed, ds = (min(rounds[n]) for n in ("bare", "relaxed", "ds"))
    peer_rate = N_TASKS / bare[0]
    for name, (seconds, _n, doubles, cpu, pg_cpu) in (
        ("datasync `TaskStates.complete_and_claim`", ds),
        ("bare psycopg, every commit flushed", bare),
        ("bare psycopg, `synchronous_commit = off`", relaxed),
    ):
        rate = N_TASKS / seconds
        ROWS.append(
            f"| {name} | {N_TASKS:,} | {seconds:.2f} | {rate:,.0f} | {doubles} "
            f"| {rate / peer_rate:.2f}x | {cpu / N_TASKS * 1e6:,.0f} µs "
            f"| {pg_cpu / N_TASKS * 1e6:,.0f} µs |"
        )
        print(f"\nqueue: {name}: {rate:,.0f} tasks/s")
    rate = N_TASKS / ds[0]
    PROFILE.extend(_profile(ds))
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
