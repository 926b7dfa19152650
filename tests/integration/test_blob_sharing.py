"""Blobs in flight are shared between placements (``transfer/state/sharing.py``), on
SQLite and PostgreSQL, with real POSIX sites and real workers.

Two versions of one dataset requested at one site at the same time (yesterday's still in
flight when today's arrives): every blob they share moves once, both views are complete
and verified (hashed independently of the engine), and each placement's progress counts
its own files. When the task a placement waits for fails instead, the waiting placement is
planned again and moves the blob itself. A waiter's deadline makes its mover urgent.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlmodel import col

from datasync.bootstrap import App, bootstrap
from datasync.db.transfer_tables import BlobWait, Task
from datasync.transfer.supervisor import WorkerOptions, run_until_idle
from tests.fixtures.replication import (
    MIB,
    assert_view_matches,
    make_tree,
    posix_site,
    settings_for,
    write_tree,
    xxh,
)
from tests.fixtures.transfer import placement_row, tasks_of

FAST = WorkerOptions(queue_backoff_base=0.0, idle_sleep=0.05, lease_seconds=30)
DATASET = "drive/osaka"


@pytest.fixture
def app(tmp_path: Path, db_url: str) -> App:
    src = posix_site("pipeline", tmp_path / "pipeline")
    dst = posix_site("lustre", tmp_path / "lustre")
    application = bootstrap(settings_for(tmp_path / "home", db_url, [src, dst]))
    application.sites = {"pipeline": src, "lustre": dst}  # type: ignore[attr-defined]
    return application


def _versions(app: App, root: Path) -> tuple[tuple[str, dict[str, bytes]], ...]:
    """v1, and v2 = v1 plus two new files (one of them a chunked shard)."""
    v1_files = make_tree(root, shards=(3 * MIB + 5,))
    v1 = app.service.register_directory(DATASET, root, chunk_size=MIB)
    v2_files = dict(v1_files)
    v2_files["cam0/000500.jpg"] = b"new frame" * 300
    v2_files["shards/shard-09.bin"] = bytes(range(256)) * (9 * 1024)  # 2.25 MiB: chunked
    write_tree(root, v2_files)
    v2 = app.service.register_directory(DATASET, root, chunk_size=MIB)
    return (v1.version_id, v1_files), (v2.version_id, v2_files)


def _moved(app: App) -> int:
    with app.engine.connect() as conn:
        return int(
            conn.execute(
                sa.select(sa.func.coalesce(sa.func.sum(col(Task.bytes_moved)), 0))
            ).scalar_one()
        )


def _distinct_bytes(*trees: dict[str, bytes]) -> int:
    return sum({xxh(d): len(d) for tree in trees for d in tree.values()}.values())


def test_two_versions_in_flight_move_each_shared_blob_once(app: App, tmp_path: Path) -> None:
    (v1, files1), (v2, files2) = _versions(app, tmp_path / "pipeline" / "run")
    first = app.replication.replicate(f"{DATASET}@{v1}", "lustre")
    second = app.replication.replicate(f"{DATASET}@{v2}", "lustre")
    # v2 files tasks only for its two new blobs; it waits for everything v1 is moving.
    shared = {xxh(d) for d in files1.values()}
    with app.engine.connect() as conn:
        waits = conn.execute(
            sa.select(col(BlobWait.digest)).where(col(BlobWait.placement_id) == second.id)
        ).scalars()
        assert {d.removeprefix("xxh3-128:") for d in waits} == shared
    kinds = sorted(t.kind for t in tasks_of(app.engine, second.id))
    assert kinds == ["blobs", "chunks", "finalize", "publish"]
    why = app.explainer.explain_ref(f"{DATASET}@{v2}", "lustre").blockers
    assert f"waiting for {len(shared)} blob(s) placement {first.id} is moving to lustre" in (
        " ".join(why)
    )
    run_until_idle(app.settings, [first.id, second.id], processes=0, options=FAST)
    for placement, version, files in ((first, v1, files1), (second, v2, files2)):
        (st,) = app.replication.status(placement_id=placement.id)
        assert st.state == "READY", (st.error, st.last_errors)
        assert (st.files_done, st.bytes_done) == (st.files_total, st.bytes_total)
        assert_view_matches(app.sites["lustre"], DATASET, version, files)  # type: ignore[attr-defined]
    # Every distinct blob crossed once, however many placements needed it.
    assert _moved(app) == _distinct_bytes(files1, files2)
    with app.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(BlobWait)).scalar_one() == 0


def test_a_waiter_whose_mover_fails_is_planned_again_and_moves_the_blob(
    app: App, tmp_path: Path
) -> None:
    (v1, _files1), (v2, files2) = _versions(app, tmp_path / "pipeline" / "run")
    first = app.replication.replicate(f"{DATASET}@{v1}", "lustre")
    second = app.replication.replicate(f"{DATASET}@{v2}", "lustre")
    # The placement moving the shared blobs fails (an operator gave up on it, a source
    # went bad): its queued movers are cancelled, the waits are orphaned.
    app.state.placements.fail(first.id, "cancelled by the test")
    assert placement_row(app.engine, first.id).state == "FAILED"
    assert app.replication.settle_shared() == 1  # v2 planned again, on its own
    assert app.replication.settle_shared() == 0  # idempotent
    run_until_idle(app.settings, [second.id], processes=0, options=FAST)
    (st,) = app.replication.status(placement_id=second.id)
    assert st.state == "READY", (st.error, st.last_errors)
    assert (st.files_done, st.bytes_done) == (st.files_total, st.bytes_total)
    assert_view_matches(app.sites["lustre"], DATASET, v2, files2)  # type: ignore[attr-defined]
    assert placement_row(app.engine, first.id).state == "FAILED"


def test_a_waiters_deadline_makes_the_blob_mover_urgent(app: App, tmp_path: Path) -> None:
    (v1, _f1), (v2, _f2) = _versions(app, tmp_path / "pipeline" / "run")
    first = app.replication.replicate(f"{DATASET}@{v1}", "lustre")  # no deadline
    due = datetime.now(UTC) + timedelta(hours=1)
    second = app.replication.replicate(f"{DATASET}@{v2}", "lustre", deadline=due)
    app.scheduler.tick()
    movers = [t for t in tasks_of(app.engine, first.id) if t.kind != "publish"]
    waiter = next(t for t in tasks_of(app.engine, second.id) if t.kind == "publish")
    assert movers and all(t.latest_start <= waiter.latest_start for t in movers)
    assert waiter.latest_start.year == due.year  # a real deadline, not NO_DEADLINE
    (st,) = app.replication.status(placement_id=first.id)
    assert st.deadline is None  # the mover's own placement keeps its own deadline
