"""The database task queue on SQLite and PostgreSQL: atomic claims, leases, heartbeats,
retries with backoff, permanent failures, claim order and the task dependency tree."""

from __future__ import annotations

import multiprocessing
import threading
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import Engine

from datasync.config import Settings
from datasync.errors import NotFound, Throttled, TransientError
from datasync.retry import Backoff, RetryPolicy
from datasync.transfer.supervisor import WorkerOptions, run_worker
from datasync.transfer.worker import pending_tasks
from tests.fixtures.transfer import (
    FixedRetry,
    add_placement,
    add_task,
    claim_until_empty,
    fake_entry,
    make_state,
    placement_row,
    register,
    task_row,
    task_states,
    tasks_of,
    turn_until_empty,
)


@pytest.fixture
def placement(engine: Engine) -> int:
    version = register(engine, "test/queue", [fake_entry("a", "a", 10)])
    return add_placement(engine, version)


def test_claim_order_is_slack_then_priority_then_age(engine: Engine, placement: int) -> None:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    old_low = add_task(engine, placement, priority=0, created_at=t0)
    new_high = add_task(engine, placement, priority=5, created_at=t0 + timedelta(hours=2))
    # A far deadline still has less slack than none; the latest start is what counts.
    late_start = add_task(
        engine, placement, deadline=t0 + timedelta(days=2), created_at=t0 + timedelta(hours=3)
    )
    soon_start = add_task(
        engine,
        placement,
        deadline=t0 + timedelta(days=3),
        latest_start=t0 + timedelta(hours=20),  # much to move: it must start before late_start
        created_at=t0 + timedelta(hours=1),
    )
    old_high = add_task(engine, placement, priority=5, created_at=t0 + timedelta(hours=1))
    queue = make_state(engine).tasks
    tasks = queue.claim("w", 10, 60)
    claimed = [t.id for t in tasks]
    assert claimed == [soon_start, late_start, old_high, new_high, old_low]
    assert tasks[0].deadline == t0 + timedelta(days=3)
    assert tasks[0].latest_start == t0 + timedelta(hours=20)
    assert tasks[2].deadline is None and tasks[2].latest_start is None  # NO_DEADLINE
    # One at a time gives the same order (the database orders, not Python).
    for task_id in claimed:
        queue.fail("w", task_id, NotFound("x"))
    fresh = [
        add_task(engine, placement, priority=1, created_at=t0 + timedelta(minutes=3)),
        add_task(engine, placement, priority=1, created_at=t0 + timedelta(minutes=1)),
        add_task(engine, placement, priority=2, created_at=t0 + timedelta(minutes=9)),
    ]
    one_by_one = [queue.claim("w", 1, 60)[0].id for _ in range(3)]
    assert one_by_one == [fresh[2], fresh[1], fresh[0]]


def test_a_full_link_keeps_its_tasks_queued_while_free_workers_take_other_links(
    engine: Engine, placement: int
) -> None:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    aws, gcp, azure = ("aws", "gaggle"), ("gcp", "gaggle"), ("azure", "gaggle")
    # The most urgent work is all on one link: a long queue, longer than the claim window.
    urgent = [
        add_task(engine, placement, latest_start=t0 + timedelta(seconds=i), link=aws)
        for i in range(150)
    ]
    later = [
        add_task(engine, placement, latest_start=t0 + timedelta(hours=1, seconds=i), link=gcp)
        for i in range(3)
    ]
    uncapped = add_task(engine, placement, latest_start=t0 + timedelta(hours=2), link=azure)
    queue = make_state(engine, link_caps={aws: 2, gcp: 1}).tasks
    assert [t.id for t in queue.claim("w", 3, 60)] == [urgent[0], urgent[1], later[0]]
    # Both capped links are full: only the link without a cap has room.
    assert [t.id for t in queue.claim("w", 10, 60)] == [uncapped]
    assert queue.claim("w", 10, 60) == []
    # A finished task frees its link's place for the next in claim order...
    assert queue.complete("w", urgent[0])
    assert [t.id for t in queue.claim("w", 10, 60)] == [urgent[2]]
    # ...and so does a lease that expired (its task is the first taken over).
    assert queue.fail("w", later[0], Throttled("slow down", retry_after=3600)) is not None
    (dying,) = queue.claim("dying", 1, lease_seconds=-1)
    assert dying.id == later[1]
    assert [t.id for t in queue.claim("w", 10, 60)] == [later[1]]
    # Without caps the same queue is claimed in plain claim order.
    plain = make_state(engine).tasks
    assert [t.id for t in plain.claim("w", 2, 60)] == [urgent[3], urgent[4]]


def test_a_worker_claims_only_tasks_within_its_reach(engine: Engine, placement: int) -> None:
    to_lustre = add_task(engine, placement, link=("aws", "lustre"))
    cloud_copy = add_task(engine, placement, link=("aws", "gcs"))
    publish_lustre = add_task(engine, placement, kind="publish", link=(None, "lustre"))
    from_lustre = add_task(engine, placement, link=("lustre", "gcs"))
    queue = make_state(engine, link_caps={("aws", "gcs"): 4}).tasks
    # A cloud worker: the on-prem file system is not mounted there.
    cloud = queue.claim("cloud", 10, 60, sites={"aws", "gcs"})
    assert [t.id for t in cloud] == [cloud_copy]
    assert pending_tasks(engine, None, {"aws", "gcs"}) == 1  # its own, leased
    onprem = queue.claim("onprem", 10, 60, sites={"aws", "gcs", "lustre"})
    assert sorted(t.id for t in onprem) == sorted([to_lustre, publish_lustre, from_lustre])
    assert queue.claim("anyone", 10, 60) == []


# Each process claims and completes task by task, or takes turns as the worker does
# (``complete_and_claim``: the previous turn's tasks completed with the next claim).
@pytest.mark.parametrize("entry", [claim_until_empty, turn_until_empty])
def test_concurrent_processes_never_claim_the_same_task(
    engine: Engine, placement: int, db_url: str, entry: Any
) -> None:
    ids = {add_task(engine, placement) for _ in range(600)}
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Barrier(5), ctx.Queue()  # 4 claimers + this test
    procs = [ctx.Process(target=entry, args=(db_url, f"proc{i}", 3, start, out)) for i in range(4)]
    for proc in procs:
        proc.start()
    start.wait(120)  # every process has connected: now they race
    results = [out.get(timeout=120)[1] for _ in procs]
    for proc in procs:
        proc.join(30)
        assert proc.exitcode == 0
    claimed = [task_id for ids_of_one in results for task_id in ids_of_one]
    duplicates = [task_id for task_id, n in Counter(claimed).items() if n > 1]
    assert duplicates == []
    assert set(claimed) == ids
    # Several processes got work: the claims really raced. (Not "all": SQLite's busy
    # handler is not fair, one process can lose every race in a short run.)
    assert sum(1 for r in results if r) >= 2, [len(r) for r in results]
    assert {row.state for row in tasks_of(engine, placement)} == {"done"}


def test_expired_lease_is_taken_over_and_the_old_owner_is_fenced(
    engine: Engine, placement: int
) -> None:
    task_id = add_task(engine, placement)
    queue = make_state(engine).tasks
    (first,) = queue.claim("dead-worker", 5, lease_seconds=-1)  # already expired
    assert first.attempts == 1
    (second,) = queue.claim("live-worker", 5, lease_seconds=60)
    assert second.id == task_id and second.attempts == 2
    row = task_row(engine, task_id)
    assert row.lease_owner == "live-worker"
    assert [e["class"] for e in row.errors] == ["LeaseExpired"]
    assert "dead-worker" in row.errors[0]["message"]
    # The dead worker wakes up: every call tells it the task is no longer its own.
    assert queue.heartbeat("dead-worker", [task_id], 60) == set()
    assert queue.complete("dead-worker", task_id, 10) is False
    assert queue.fail("dead-worker", task_id, TransientError("late")) is None
    assert task_row(engine, task_id).state == "leased"
    assert queue.complete("live-worker", task_id, 10) is True
    assert task_row(engine, task_id).state == "done"


def test_heartbeat_extends_only_the_owners_leases(engine: Engine, placement: int) -> None:
    a, b = add_task(engine, placement), add_task(engine, placement)
    queue = make_state(engine).tasks
    claimed = queue.claim("w1", 1, lease_seconds=30)
    assert [t.id for t in claimed] == [a]
    before = task_row(engine, a).lease_expires_at
    assert queue.heartbeat("w1", [a, b], lease_seconds=3600) == {a}
    after = task_row(engine, a).lease_expires_at
    assert after - before > timedelta(minutes=50)
    assert queue.heartbeat("w2", [a], lease_seconds=3600) == set()
    # A lease that expired but was not taken over yet can still be renewed by its owner.
    queue.heartbeat("w1", [a], lease_seconds=-1)
    assert queue.heartbeat("w1", [a], lease_seconds=60) == {a}
    assert [t.id for t in queue.claim("w2", 5, 60)] == [b]


def test_retryable_failure_requeues_with_backoff(engine: Engine, placement: int) -> None:
    task_id = add_task(engine, placement, max_attempts=3)
    slow = make_state(engine, retry=FixedRetry(3600)).tasks
    (task,) = slow.claim("w", 1, 60)
    assert slow.fail("w", task.id, TransientError("connection reset")) == "queued"
    row = task_row(engine, task_id)
    assert row.state == "queued" and row.lease_owner is None
    assert row.errors[0]["class"] == "TransientError"
    assert row.errors[0]["message"] == "connection reset"
    assert slow.claim("w", 1, 60) == []  # not due before its backoff ends
    # A zero backoff (the tests' switch) makes it due at once; attempts keep counting.
    fast = make_state(engine).tasks
    with engine.begin() as conn:
        conn.exec_driver_sql(f"UPDATE tasks SET not_before = created_at WHERE id = {task_id}")
    (again,) = fast.claim("w", 1, 60)
    assert again.attempts == 2
    assert fast.fail("w", task_id, TransientError("timeout")) == "queued"
    (last,) = fast.claim("w", 1, 60)
    assert last.attempts == 3
    # The last attempt fails for good even though the error is retryable.
    assert fast.fail("w", task_id, TransientError("timeout again")) == "failed"
    row = task_row(engine, task_id)
    assert row.state == "failed"
    assert [e["message"] for e in row.errors] == [
        "connection reset",
        "timeout",
        "timeout again",
    ]
    prow = placement_row(engine, placement)
    assert prow.state == "FAILED"
    assert "3 attempts" in prow.error and "timeout again" in prow.error


def test_throttled_retry_after_is_honoured(engine: Engine, placement: int) -> None:
    task_id = add_task(engine, placement)
    queue = make_state(engine).tasks
    queue.claim("w", 1, 60)
    before = datetime.now(UTC)
    assert queue.fail("w", task_id, Throttled("SlowDown", retry_after=120)) == "queued"
    not_before = task_row(engine, task_id).not_before
    not_before = not_before if not_before.tzinfo else not_before.replace(tzinfo=UTC)
    assert not_before >= before + timedelta(seconds=119)
    assert queue.claim("w", 1, 60) == []


def test_task_retries_follow_the_retry_policy() -> None:
    """The queue asks the one retry policy (datasync.retry): per-class budgets, then the
    task's own max_attempts; growing, jittered delays with retry_after as a floor."""
    policy = RetryPolicy(task_backoff=Backoff(2.0, 60.0), random=lambda: 1.0)
    assert policy.task_retry_delay(1, 8, TransientError("x")) == 2.0
    assert policy.task_retry_delay(3, 8, TransientError("x")) == 8.0
    assert policy.task_retry_delay(4, 8, TransientError("x")) is None  # class budget: 4
    assert policy.task_retry_delay(7, 8, Throttled("SlowDown")) == 60.0  # capped
    assert policy.task_retry_delay(8, 8, Throttled("SlowDown")) is None  # max_attempts
    assert policy.task_retry_delay(1, 8, Throttled("SlowDown", retry_after=99)) == 99
    assert policy.task_retry_delay(1, 8, NotFound("gone")) is None  # permanent
    assert policy.task_retry_delay(1, 8, KeyError("a bug")) is None  # unclassified
    jittered = RetryPolicy(task_backoff=Backoff(2.0, 60.0))
    assert len({jittered.task_retry_delay(3, 8, TransientError("x")) for _ in range(20)}) > 1


def test_permanent_failure_fails_placement_and_cancels_queued_tasks(
    engine: Engine, placement: int
) -> None:
    bad = add_task(engine, placement, priority=9)
    others = [add_task(engine, placement) for _ in range(3)]
    queue = make_state(engine).tasks
    (task,) = queue.claim("w", 1, 60)
    assert task.id == bad
    error = NotFound("no such object", url="memory://src/a.bin")
    assert queue.fail("w", bad, error) == "failed"
    prow = placement_row(engine, placement)
    assert prow.state == "FAILED"
    assert "permanent" in prow.error and "NotFound" in prow.error
    assert "memory://src/a.bin" in prow.error
    for task_id in others:
        row = task_row(engine, task_id)
        assert row.state == "failed"
        assert row.errors[-1]["class"] == "Cancelled"
    assert queue.claim("w", 10, 60) == []


def test_reap_fails_tasks_whose_workers_died_on_every_attempt(
    engine: Engine, placement: int
) -> None:
    task_id = add_task(engine, placement, max_attempts=1)
    queue = make_state(engine).tasks
    queue.claim("w", 1, lease_seconds=-1)
    assert queue.claim("w2", 1, 60) == []  # no attempts left: not taken over
    assert queue.reap() == 1
    row = task_row(engine, task_id)
    assert row.state == "failed" and row.errors[-1]["class"] == "LeaseExpired"
    assert placement_row(engine, placement).state == "FAILED"
    assert queue.reap() == 0


def test_dependencies_gate_finalize_and_publish(engine: Engine, placement: int) -> None:
    publish = add_task(engine, placement, "publish", blocked_by=2)
    finalize = add_task(engine, placement, "finalize", parent_id=publish, blocked_by=2, files=1)
    chunks = [
        add_task(engine, placement, "chunks", parent_id=finalize, priority=1, nbytes=100)
        for _ in range(2)
    ]
    blobs = add_task(engine, placement, "blobs", parent_id=publish, files=3, nbytes=30)
    queue = make_state(engine).tasks
    first = queue.claim("w", 10, 60)
    assert sorted(t.id for t in first) == sorted([*chunks, blobs])
    assert queue.complete("w", chunks[0], 100)
    assert queue.claim("w", 10, 60) == []  # finalize still waits for chunk 2
    assert queue.complete("w", chunks[1], 100)
    assert queue.complete("w", blobs, 30)
    (fin,) = queue.claim("w", 10, 60)
    assert fin.id == finalize and fin.kind == "finalize"
    assert queue.claim("w", 10, 60) == []  # publish waits for finalize
    assert queue.complete("w", finalize, 0)
    (pub,) = queue.claim("w", 10, 60)
    assert pub.id == publish
    assert placement_row(engine, placement).state == "PUBLISHING"
    assert queue.complete("w", publish, 0)
    prow = placement_row(engine, placement)
    assert prow.state == "READY" and prow.error is None
    assert (prow.files_done, prow.bytes_done) == (4, 230)
    assert task_states(engine, placement) == {"done": 5}


def test_completing_twice_or_without_the_lease_changes_nothing(
    engine: Engine, placement: int
) -> None:
    publish = add_task(engine, placement, "publish", blocked_by=1)
    child = add_task(engine, placement, parent_id=publish, files=1, nbytes=5)
    queue = make_state(engine).tasks
    assert queue.complete("w", child, 5) is False  # never claimed
    queue.claim("w", 1, 60)
    assert queue.complete("other", child, 5) is False
    assert queue.complete("w", child, 5) is True
    assert queue.complete("w", child, 5) is False
    assert task_row(engine, publish).blocked_by == 0
    assert placement_row(engine, placement).files_done == 1


def test_claim_of_zero_and_empty_queue(engine: Engine, placement: int) -> None:
    queue = make_state(engine).tasks
    assert queue.claim("w", 0, 60) == []
    assert queue.claim("w", 5, 60) == []
    assert queue.heartbeat("w", [], 60) == set()


def test_a_worker_alone_reaps_a_task_whose_last_attempt_died(
    engine: Engine, placement: int, db_url: str, tmp_path: Path
) -> None:
    """Without `datasync up`, a plain worker still fails a task whose lease expired on its
    last attempt, so its placement ends FAILED instead of waiting forever."""
    task_id = add_task(engine, placement, max_attempts=1)
    make_state(engine).tasks.claim("dead-worker", 1, lease_seconds=-1)
    settings = Settings(home=tmp_path / "home", database_url=db_url)
    stop = threading.Event()
    timer = threading.Timer(30, stop.set)  # a hang fails the assertions below, not the run
    timer.start()
    try:
        run_worker(
            settings,
            processes=0,
            once=True,
            stop_event=stop,
            options=WorkerOptions(lease_seconds=0.9, idle_sleep=0.05),
            placements=[placement],
        )
    finally:
        timer.cancel()
    assert not stop.is_set(), "the worker waited for the dead lease instead of reaping it"
    assert task_row(engine, task_id).state == "failed"
    assert placement_row(engine, placement).state == "FAILED"
