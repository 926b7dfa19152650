"""Writers of several task rows lock them in one order: children before parents.

``complete`` updates the finished task, then its parent (``blocked_by - 1``). The
scheduler's ``schedule`` rewrites every unfinished task of a placement. When it locked
them in heap order (parent first), a ``complete`` running at the same moment deadlocked
with it on PostgreSQL; the worker lost the completion and the task waited out its lease
(found by ``tests/bench/test_bench_multihost.py``). Here the ``complete`` is held between
its two updates while ``schedule`` runs: both must finish, neither may be aborted.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlmodel import col

from datasync.bootstrap import bootstrap
from datasync.db.transfer_tables import Task
from datasync.transfer.planner import PlannerConfig
from tests.fixtures.replication import posix_site, settings_for, write_tree

pytestmark = pytest.mark.postgres


def _waiting_on_locks(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                sa.text(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
            ).scalar_one()
        )


def test_schedule_never_deadlocks_with_a_complete(tmp_path: Path, pg_url: str) -> None:
    src = posix_site("pipeline", tmp_path / "pipeline")
    dst = posix_site("lustre", tmp_path / "lustre")
    assert src.root is not None
    write_tree(src.root / "run", {f"f{i}.bin": bytes([i]) * 100 for i in range(4)})
    app = bootstrap(settings_for(tmp_path / "home", pg_url, [src, dst]))
    try:
        v = app.service.register_directory("drive/locks", src.root / "run")
        placement = app.replication.replicate(
            f"drive/locks@{v.version_id}", "lustre", planner=PlannerConfig(batch_items=1)
        )
        with app.engine.connect() as conn:
            child, parent = conn.execute(
                sa.select(col(Task.id), col(Task.parent_id))
                .where(col(Task.placement_id) == placement.id, col(Task.parent_id).isnot(None))
                .order_by(col(Task.id))
            ).first() or (None, None)
        assert child is not None and parent is not None and parent < child
        children = (col(Task.placement_id) == placement.id) & col(Task.parent_id).isnot(None)
        with app.engine.begin() as conn:
            # Rewrite the children's indexed ``state`` (there and back): their index entries
            # now come after their parent's, as rows of a busy table come to lie, so a
            # placement-wide UPDATE through that index reaches the parent first.
            for state in ("leased", "queued"):
                conn.execute(sa.update(Task).where(children).values(state=state))

        errors: list[BaseException] = []

        def schedule() -> None:
            try:
                app.state.staging.schedule(
                    placement.id,
                    latest_start=datetime.now(UTC) + timedelta(hours=1),
                    at_risk=False,
                    eta=None,
                )
            except BaseException as exc:
                errors.append(exc)

        with app.engine.connect() as completing:
            with completing.begin():
                # complete's first write: the finished task's row.
                completing.execute(
                    sa.update(Task).where(col(Task.id) == child).values(bytes_moved=0)
                )
                scheduler = threading.Thread(target=schedule)
                scheduler.start()
                deadline = time.monotonic() + 30
                while _waiting_on_locks(app.engine) < 1:
                    assert time.monotonic() < deadline, "schedule never reached the locked row"
                    time.sleep(0.02)
                # complete's second write: its parent's count. With the old lock order
                # PostgreSQL aborted one of the two transactions here (deadlock detected).
                completing.execute(
                    sa.update(Task)
                    .where(col(Task.id) == parent)
                    .values(blocked_by=col(Task.blocked_by) - 1)
                )
            scheduler.join(30)
        assert not scheduler.is_alive()
        assert not errors, errors
        with app.engine.connect() as conn:
            starts = conn.execute(
                sa.select(col(Task.latest_start)).where(col(Task.placement_id) == placement.id)
            ).scalars()
            assert all(s.year < 9999 for s in starts), "schedule did not write every task"
    finally:
        app.close()
