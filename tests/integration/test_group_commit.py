"""A worker's turn on SQLite and PostgreSQL: the tasks it finished completed in one
transaction (``TaskStates.complete_many``, group commit), with its next claim
(``complete_and_claim``). Invariant 6: only a lease's owner completes its task; invariant
4: a worker that dies before its completions reach the database loses nothing."""

from __future__ import annotations

import pytest
from sqlalchemy.engine import Engine

from datasync.events import EventBus, PlacementPublishing, PlacementReady, TaskCompleted
from tests.fixtures.transfer import (
    Recorder,
    add_placement,
    add_task,
    fake_entry,
    make_state,
    placement_row,
    register,
    task_row,
)


@pytest.fixture
def placement(engine: Engine) -> int:
    version = register(engine, "test/group-commit", [fake_entry("a", "a", 10)])
    return add_placement(engine, version)


def test_a_batch_completes_only_the_tasks_whose_lease_the_owner_still_holds(
    engine: Engine, placement: int
) -> None:
    publish = add_task(engine, placement, "publish", blocked_by=4)
    kept = [add_task(engine, placement, parent_id=publish, files=1, nbytes=10) for _ in range(2)]
    stale = add_task(engine, placement, parent_id=publish, files=1, nbytes=10)
    never = add_task(engine, placement, parent_id=publish, files=1, nbytes=10, priority=-1)
    bus, seen = EventBus(), Recorder()
    bus.subscribe(seen)
    queue = make_state(engine, bus).tasks
    assert {t.id for t in queue.claim("w1", 2, 60)} == set(kept)
    assert [t.id for t in queue.claim("w1", 1, lease_seconds=-1)] == [stale]  # expired
    assert [t.id for t in queue.claim("w2", 1, 60)] == [stale]  # taken over
    batch = {kept[0]: 100, kept[1]: 200, stale: 300, never: 400}
    assert queue.complete_many("w1", batch) == set(kept)
    assert [task_row(engine, t).bytes_moved for t in kept] == [100, 200]
    assert (task_row(engine, stale).state, task_row(engine, stale).lease_owner) == ("leased", "w2")
    assert task_row(engine, never).state == "queued"
    assert task_row(engine, publish).blocked_by == 2  # one count per completed child
    assert (
        placement_row(engine, placement).files_done,
        placement_row(engine, placement).bytes_done,
    ) == (2, 20)
    completed = [e.task_id for e in seen.events if isinstance(e, TaskCompleted)]
    assert completed == sorted(kept)
    # Done tasks cannot be completed again, by anyone.
    assert queue.complete_many("w1", batch) == set()
    assert queue.complete_many("w2", {stale: 30}) == {stale}
    assert task_row(engine, publish).blocked_by == 1


def test_a_turn_completes_then_claims_what_the_completions_unblocked(
    engine: Engine, placement: int
) -> None:
    publish = add_task(engine, placement, "publish", blocked_by=2)
    children = [add_task(engine, placement, parent_id=publish, files=2, nbytes=5) for _ in range(2)]
    bus, seen = EventBus(), Recorder()
    bus.subscribe(seen)
    queue = make_state(engine, bus).tasks
    done, claimed = queue.complete_and_claim("w", {}, 4, 60)
    assert done == set() and {t.id for t in claimed} == set(children)
    done, claimed = queue.complete_and_claim("w", dict.fromkeys(children, 5), 4, 60)
    assert done == set(children)
    assert [t.id for t in claimed] == [publish]  # unblocked by this very turn
    assert placement_row(engine, placement).state == "PUBLISHING"
    done, claimed = queue.complete_and_claim("w", {publish: 0}, 4, 60)
    assert (done, claimed) == ({publish}, [])
    row = placement_row(engine, placement)
    assert (row.state, row.files_done, row.bytes_done) == ("READY", 4, 10)
    kinds = [type(e).__name__ for e in seen.events]
    assert kinds.count("TaskClaimed") == 3 and kinds.count("TaskCompleted") == 3
    assert sum(isinstance(e, PlacementPublishing) for e in seen.events) == 1
    assert sum(isinstance(e, PlacementReady) for e in seen.events) == 1


def test_a_worker_that_dies_before_its_turn_loses_nothing(engine: Engine, placement: int) -> None:
    """The group commit's crash case: a task ran, its completion was still waiting for the
    next turn when the worker died. Its lease expires, another worker runs it again (a
    no-op for an idempotent task) and completes it; the dead worker's batch, should it
    ever arrive, changes nothing."""
    task_id = add_task(engine, placement, files=1, nbytes=7)
    queue = make_state(engine).tasks
    (first,) = queue.claim("dead", 4, lease_seconds=-1)  # ran, then died: lease expired
    _, (again,) = queue.complete_and_claim("live", {}, 4, 60)
    assert again.id == task_id and again.attempts == first.attempts + 1
    assert queue.complete_and_claim("dead", {task_id: 7}, 4, 60) == (set(), [])
    assert queue.complete_and_claim("live", {task_id: 0}, 4, 60) == ({task_id}, [])
    row = task_row(engine, task_id)
    assert (row.state, row.bytes_moved) == ("done", 0)
    assert placement_row(engine, placement).files_done == 1  # credited once
