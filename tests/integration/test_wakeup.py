"""Idle workers are woken by new tasks, not by their fallback poll (``transfer.wakeup``).

Each worker here polls only every ``IDLE`` seconds. It is started, left to make its first
(empty) claim and settle into its wait, then a placement is replicated: the placement must
be READY long before the worker's next poll could have found its tasks. Without the
wake-up (NOTIFY on PostgreSQL, the FIFOs on SQLite) the worker sleeps through ``IDLE``
and these tests fail.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa

from datasync.bootstrap import App, bootstrap
from datasync.config import Settings
from datasync.db.engine import create_engine
from datasync.transfer.supervisor import WorkerOptions, run_worker
from datasync.transfer.wakeup import CHANNEL, fifo_dir
from tests.fixtures.replication import posix_site, settings_for

IDLE = 30.0
OPTIONS = WorkerOptions(queue_backoff_base=0.0, idle_sleep=IDLE, lease_seconds=30, grace=5)


@contextmanager
def _idle_worker(app: App, settings: Settings, processes: int) -> Iterator[None]:
    """A worker (``processes`` 0: a thread of this process) waiting with nothing to do."""
    stop = threading.Event()
    thread = threading.Thread(
        target=run_worker,
        args=(settings,),
        kwargs={"processes": processes, "stop_event": stop, "options": OPTIONS},
        daemon=True,
    )
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while _workers(app) == 0:  # registered: its first claim follows at once
            assert time.monotonic() < deadline, "worker did not start"
            time.sleep(0.05)
        time.sleep(1.0)  # past its first empty claim, into the IDLE wait
        yield
    finally:
        stop.set()
        thread.join(60)


def _workers(app: App) -> int:
    with app.engine.connect() as conn:
        return int(conn.execute(sa.text("SELECT count(*) FROM workers")).scalar_one())


def _replicate_and_wait(app: App, src: Path, name: str) -> float:
    """Seconds from ``replicate`` to READY (a two-file dataset)."""
    tree = src / name
    tree.mkdir(parents=True)
    (tree / "a.bin").write_bytes(b"a" * 1000)
    (tree / "b.bin").write_bytes(b"b" * 3000)
    v = app.service.register_directory(f"wake/{name}", tree)
    t0 = time.monotonic()
    placement = app.replication.replicate(f"wake/{name}@{v.version_id}", "dst")
    while time.monotonic() - t0 < IDLE * 2:
        st = app.replication.status(placement_id=placement.id)[0]
        if st.state in ("READY", "FAILED"):
            assert st.state == "READY", st.error
            return time.monotonic() - t0
        time.sleep(0.02)
    raise AssertionError("placement not READY")


def _settings(tmp_path: Path, db_url: str) -> Settings:
    src = posix_site("src", tmp_path / "src")
    dst = posix_site("dst", tmp_path / "dst")
    return settings_for(tmp_path / "home", db_url, [src, dst])


def test_a_new_replicate_wakes_an_idle_worker_process(tmp_path: Path, db_url: str) -> None:
    """A worker process (spawned, as in production) is woken across processes."""
    settings = _settings(tmp_path, db_url)
    app = bootstrap(settings)
    try:
        with _idle_worker(app, settings, processes=1):
            for round_ in range(2):  # and again after it went back to waiting
                seconds = _replicate_and_wait(app, tmp_path / "src", f"r{round_}")
                assert seconds < IDLE / 3, f"woken after {seconds:.1f}s: the poll, not a wake-up"
                time.sleep(0.5)
    finally:
        app.close()


def test_the_listener_reconnects_after_postgresql_drops_it(tmp_path: Path, pg_url: str) -> None:
    settings = _settings(tmp_path, pg_url)
    app = bootstrap(settings)
    try:
        with _idle_worker(app, settings, processes=0):
            with app.engine.connect() as conn:
                killed = conn.execute(
                    sa.text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                        " WHERE datname = current_database() AND query = :q"
                    ),
                    {"q": f"LISTEN {CHANNEL}"},
                ).all()
            assert killed == [(True,)]  # exactly the listener's connection
            time.sleep(2.0)  # it reconnects (and polls once, in case it missed something)
            seconds = _replicate_and_wait(app, tmp_path / "src", "after-drop")
            assert seconds < IDLE / 3, f"woken after {seconds:.1f}s: the listener did not return"
    finally:
        app.close()


def test_a_dead_workers_fifo_is_removed_and_never_fails_an_insert(
    tmp_path: Path, sqlite_url: str
) -> None:
    settings = _settings(tmp_path, sqlite_url)
    app = bootstrap(settings)
    try:
        wake = fifo_dir(create_engine(sqlite_url))
        assert wake is not None
        wake.mkdir()
        os.mkfifo(wake / "12345-dead")  # a worker killed before it could remove its FIFO
        (wake / "not-a-fifo").write_text("x")  # junk: ignored
        tree = tmp_path / "src" / "t"
        tree.mkdir(parents=True)
        (tree / "f").write_bytes(b"f")
        v = app.service.register_directory("wake/t", tree)
        placement = app.replication.replicate(f"wake/t@{v.version_id}", "dst")
        assert app.replication.status(placement_id=placement.id)[0].state == "TRANSFERRING"
        assert sorted(p.name for p in wake.iterdir()) == ["not-a-fifo"]
        assert (wake / "not-a-fifo").read_text() == "x"
    finally:
        app.close()
