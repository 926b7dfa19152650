"""Retry discipline (issue 13, item 5): budgets per error class, permanent errors stop at
once with a reason, and a task that keeps failing is **stuck** with a counter that never
resets (Rucio's rules cycle between STUCK and REPLICATING while a 14-day timer resets).

* A destination that answers every request with ``503 SlowDown`` (a fault proxy in front of
  moto): each call is retried within its budget, then the task is retried by the queue;
  after ``STUCK_AFTER`` failed attempts it is stuck (one ``TaskStuck`` event, ``status`` and
  ``explain`` say so), its ``attempts`` only grow, and it fails when the Throttled budget
  is spent. Re-planning the placement gives it new tasks, but its failures are still
  counted from its history. When the storm ends, the same placement completes.
* Missing source, no permission, and repeated checksum mismatch from the one source: the
  task fails on its first attempt, and the placement says why.
* The database failing under a task (a restart) is a retryable error, not a bug.
"""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlmodel import col

from datasync.bootstrap import bootstrap
from datasync.config import SiteConfig
from datasync.db.transfer_tables import Task
from datasync.errors import Throttled
from datasync.events import Event, EventBus, TaskFailed, TaskRetried, TaskStuck
from datasync.models import TaskState
from datasync.retry import RetryPolicy
from datasync.transfer.state import STUCK_AFTER, EngineState
from tests.faults.conftest import through_proxy
from tests.faults.harness import (
    EventLog,
    Figures,
    assert_no_task_lost,
    assert_outcome,
    assert_published_right,
    record,
    run_workers,
    timed,
)
from tests.faults.proxy import Fault, FaultProxy
from tests.fixtures.emulators import S3_KEYS, unique_name
from tests.fixtures.replication import (
    Site,
    cloud_site,
    make_tree,
    posix_site,
    seed_cloud_source,
    settings_for,
)
from tests.fixtures.transfer import (
    add_placement,
    add_task,
    fake_entry,
    register,
    task_row,
    version_pk,
)

DATASET = "drive/retries"
THROTTLED_BUDGET = RetryPolicy().task_budget(Throttled("x"))  # 8 attempts


@pytest.mark.emulator
def test_a_task_that_keeps_failing_is_stuck_and_its_counter_never_resets(
    tmp_path: Path,
    request: pytest.FixtureRequest,
    db_url: str,
    fault_proxy: Callable[[str], FaultProxy],
) -> None:
    proxy = fault_proxy("s3")
    pipeline = posix_site("pipeline", tmp_path / "pipeline")
    direct = cloud_site("cloud", "s3", request)
    assert pipeline.root is not None
    files = {k: v for k, v in make_tree(pipeline.root / "run").items() if k.startswith("lidar/")}
    for stale in (pipeline.root / "run").rglob("*.jpg"):
        stale.unlink()
    (pipeline.root / "run/calib/empty.txt").unlink()
    (pipeline.root / "run/calib/ünïcødé name.json").unlink()
    settings = settings_for(tmp_path / "home", db_url, [pipeline, through_proxy(direct, proxy)])
    db = "postgresql" if db_url.startswith("postgresql") else "sqlite"
    figures = Figures(
        fault="a storm that never ends (every request 503 SlowDown)",
        where="posix -> s3",
        db=db,
        command=f"pytest tests/faults/test_retry_discipline.py -k 'keeps_failing and {db}'",
    )
    with bootstrap(settings) as app, timed(figures):
        app.retry = replace(app.retry, sleep=lambda _s: None)  # the policy's testing switch
        events = EventLog(app)
        stuck_seen: list[str] = []

        def when_stuck(event: Event) -> None:
            if isinstance(event, TaskStuck) and not stuck_seen:
                (st,) = app.replication.status(placement_id=event.placement_id)
                stuck_seen.append(st.phase)

        app.bus.subscribe(when_stuck)
        v = app.service.register_directory(DATASET, pipeline.root / "run")
        proxy.set_fault(Fault("storm", every=1, retry_after=0.0))
        placement = app.replication.replicate(f"{DATASET}@{v.version_id}", "cloud")
        assert run_workers(app, [placement.id])
        state = assert_outcome(app, placement.id, figures)
        assert state == "FAILED"
        assert f"({THROTTLED_BUDGET} attempts): Throttled" in (figures.reason or "")
        # Stuck once per task, at attempt STUCK_AFTER, and the phase said so then.
        stuck = [e for e in events.events if isinstance(e, TaskStuck)]
        assert stuck and all(e.attempts == STUCK_AFTER for e in stuck)
        assert max(Counter(e.task_id for e in stuck).values()) == 1
        assert "stuck" in stuck_seen[0], stuck_seen
        # The counter: attempts 1, 2, 3, ... in the history, never reset, budget spent.
        (failed,) = [e for e in events.failures() if e.error_class == "Throttled"][:1]
        row = task_row(app.engine, failed.task_id)
        assert row.attempts == THROTTLED_BUDGET
        real = [e for e in row.errors if e["class"] == "Throttled"]
        assert [e["attempt"] for e in real] == list(range(1, THROTTLED_BUDGET + 1))
        assert [e["attempt"] for e in real if e.get("stuck")] == [STUCK_AFTER]
        assert_no_task_lost(app, placement.id)
        assert_published_right(direct, DATASET, v.version_id, files, state)
        first_reason = figures.reason
        # Re-planned (replicate again): new tasks, but the failures are still counted.
        app.replication.replicate(f"{DATASET}@{v.version_id}", "cloud")
        assert run_workers(app, [placement.id])
        (st,) = app.replication.status(placement_id=placement.id)
        assert st.state == "FAILED" and "failure 2 of this placement since" in (st.error or "")
        # The storm ends: the same placement completes.
        figures.injected = proxy.stats.injected
        proxy.set_fault(None)
        app.replication.replicate(f"{DATASET}@{v.version_id}", "cloud")
        assert run_workers(app, [placement.id])
        (st,) = app.replication.status(placement_id=placement.id)
        assert st.state == "READY", (st.error, st.last_errors)
        figures.data_lost = assert_published_right(direct, DATASET, v.version_id, files, "READY")
        figures.outcome = "FAILED twice (classified), READY once the storm ended"
        figures.reason = first_reason
        figures.retries_seen = proxy.stats.retried
        figures.task_retries = events.count(TaskRetried)
        figures.stuck = len(stuck)
    record(figures)


# -- permanent errors stop at once ------------------------------------------------------------


@pytest.mark.parametrize("cause", ["missing source", "no permission", "corrupt source"])
def test_permanent_errors_stop_on_the_first_attempt(
    tmp_path: Path, request: pytest.FixtureRequest, sqlite_url: str, cause: str
) -> None:
    pipeline = posix_site("pipeline", tmp_path / "pipeline")
    lustre = posix_site("lustre", tmp_path / "lustre")
    assert pipeline.root is not None
    files = make_tree(pipeline.root / "run")
    sites = [pipeline, lustre]
    if cause == "no permission":  # a bucket whose server refuses our key (a real 403)
        endpoint = str(request.getfixturevalue("moto_server_auth"))
        opts = {"endpoint_url": endpoint, "region_name": "us-east-1", **S3_KEYS}
        sites.append(Site("locked", SiteConfig(url=f"s3://{unique_name()}", options=opts), "s3"))
    settings = settings_for(tmp_path / "home", sqlite_url, sites)
    expected = {
        "missing source": "ChecksumMismatch",
        "no permission": "PermissionDenied",
        "corrupt source": "ChecksumMismatch",
    }[cause]
    with bootstrap(settings) as app:
        events = EventLog(app)
        v = app.service.register_directory(DATASET, pipeline.root / "run")
        if cause == "missing source":
            (pipeline.root / "run/cam0/000004.jpg").unlink()
        elif cause == "corrupt source":
            (pipeline.root / "run/cam0/000004.jpg").write_bytes(b"\0" * 3000)
        else:  # the only source is the locked bucket
            pk = version_pk(app.engine, app.store.resolve(f"{DATASET}@{v.version_id}"))
            seed_cloud_source(app, pk, sites[-1], "run")
            shutil.rmtree(pipeline.root / "run")
        placement = app.replication.replicate(f"{DATASET}@{v.version_id}", "lustre")
        assert run_workers(app, [placement.id])
        (st,) = app.replication.status(placement_id=placement.id)
        assert st.state == "FAILED"
        assert f"(permanent error): {expected}" in (st.error or ""), st.error
        assert not events.retried(), "a permanent error is never retried"
        failed = [e for e in events.events if isinstance(e, TaskFailed)]
        assert failed
        assert task_row(app.engine, failed[0].task_id).attempts == 1
        assert_published_right(lustre, DATASET, v.version_id, files, "FAILED")


def test_a_database_error_under_a_task_is_transient(engine: sa.Engine) -> None:
    """A task whose attempt hit a restarting database is retried, not failed as a bug."""
    summary = register(engine, DATASET, [fake_entry("a", "a", 10)])
    pid = add_placement(engine, summary)
    task_id = add_task(engine, pid)
    state = EngineState(engine, EventBus(), RetryPolicy(sleep=lambda _s: None))
    (claimed,) = state.tasks.claim("w1", 1, 30)
    down = sa.exc.OperationalError("SELECT 1", {}, Exception("the database system is starting up"))
    assert state.tasks.fail("w1", claimed.id, down) is TaskState.QUEUED
    row = task_row(engine, task_id)
    assert row.errors[-1]["class"] == "TransientError"
    assert "starting up" in row.errors[-1]["message"]
    # A bug (an error nothing classified) still fails at once.
    with engine.begin() as conn:  # the back-off after the first failure has passed
        due = sa.update(Task).where(col(Task.id) == task_id).values(not_before=sa.func.now())
        conn.execute(due)
    (again,) = state.tasks.claim("w1", 1, 30)
    assert state.tasks.fail("w1", again.id, KeyError("a bug")) is TaskState.FAILED
    with engine.connect() as conn:
        error = conn.execute(
            sa.select(col(Task.errors)).where(col(Task.id) == task_id)
        ).scalar_one()
    assert error[-1]["class"] == "KeyError"
