"""Processes and the database die mid-run (issue 13, item 3).

* ``datasync up`` (API, scheduler and two worker processes, the real CLI in a subprocess)
  is SIGKILLed at a random instant while it moves a version, sometimes after one of its
  workers was SIGKILLed first, sometimes together with both; then fresh workers finish.
* The machine's PostgreSQL is restarted (``pg_ctlcluster ... restart``) while two worker
  processes move a version.

Every round must end READY with a view equal to the source tree (``xxh128sum``), every task
done (none lost, none left leased), and nothing temporary visible next to the views.
``tests/integration/test_kill_workers.py`` kills workers at named failpoints; here the
victims are the processes an operator runs.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlmodel import col

from datasync.bootstrap import App, bootstrap
from datasync.config import Settings
from datasync.db.transfer_tables import Task
from datasync.transfer.supervisor import WorkerOptions, run_until_idle
from tests.faults.harness import (
    Figures,
    assert_blob_store_sound,
    assert_no_task_lost,
    assert_outcome,
    assert_published_right,
    leftover_temps,
    record,
    run_workers,
    timed,
)
from tests.fixtures.replication import MIB, make_tree, posix_site, settings_for, write_tree

pytestmark = pytest.mark.slow

DATASET = "drive/crash"
ROUNDS = 2
DATASYNC = str(Path(sys.executable).parent / "datasync")


def write_config(settings: Settings) -> dict[str, str]:
    """A ``datasync.toml`` for ``settings``; the environment a CLI subprocess needs."""
    path = settings.home / "datasync.toml"
    settings.home.mkdir(parents=True, exist_ok=True)
    lines = [f"database_url = {json.dumps(settings.database_url)}", "chunk_size = 1048576"]
    for name, site in settings.sites.items():
        lines.append(f"[sites.{name}]\nurl = {json.dumps(site.url)}")
    path.write_text("\n".join(lines) + "\n")
    return {
        **os.environ,
        "DATASYNC_HOME": str(settings.home),
        "DATASYNC_CONFIG": str(path),
        "DATASYNC_DATABASE_URL": settings.database_url,
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _children(pid: int) -> list[int]:
    """Worker processes of ``pid`` (its spawned children, not the resource tracker)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid and b"spawn_main" in cmdline:
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_gone(pids: list[int], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in pids):
        assert time.monotonic() < deadline, f"processes {pids} outlived {timeout}s"
        time.sleep(0.1)


def _started(app: App, placement_id: int, timeout: float = 60.0) -> None:
    """Wait until a worker has claimed one of the placement's tasks."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with app.engine.connect() as conn:
            n = conn.execute(
                sa.select(sa.func.count()).where(
                    col(Task.placement_id) == placement_id, col(Task.attempts) > 0
                )
            ).scalar_one()
        if n:
            return
        time.sleep(0.05)
    raise AssertionError("no worker claimed a task")


def _expire_dead_leases(app: App) -> None:
    """The clock jumps past the leases of the killed workers (all dead by now), instead of
    the test waiting out the 60 s lease ``datasync up`` gives its workers."""
    with app.engine.begin() as conn:
        conn.execute(
            sa.update(Task)
            .where(col(Task.state) == "leased")
            .values(lease_expires_at=datetime(2000, 1, 1, tzinfo=UTC))
        )


def _new_version(root: Path, rng: random.Random, round_no: int) -> dict[str, bytes]:
    run = root / "run"
    files = (
        make_tree(run, seed=round_no + 1)
        if round_no == 0
        else {str(p.relative_to(run)): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    )
    changed = {
        f"shards/{round_no}-a.bin": rng.randbytes(5 * MIB + rng.randrange(1000)),
        f"shards/{round_no}-b.bin": rng.randbytes(3 * MIB + 7),
        **{f"cam0/{round_no:03d}-{i:03d}.jpg": rng.randbytes(4000 + i) for i in range(40)},
    }
    write_tree(run, changed)
    return {**files, **changed}


def test_sigkill_of_up_and_its_workers_at_random_instants(tmp_path: Path, db_url: str) -> None:
    rng = random.Random(int(os.environ.get("DATASYNC_KILL_SEED", "13")))
    src = posix_site("pipeline", tmp_path / "pipeline")
    dst = posix_site("lustre", tmp_path / "lustre")
    assert src.root is not None and dst.root is not None
    settings = settings_for(tmp_path / "home", db_url, [src, dst])
    env = write_config(settings)
    db = "postgresql" if db_url.startswith("postgresql") else "sqlite"
    figures = Figures(
        fault="SIGKILL of `datasync up` and its workers",
        where="posix -> posix",
        db=db,
        command=f"pytest tests/faults/test_process_faults.py -k 'sigkill and {db}'",
    )
    kills = 0
    with bootstrap(settings) as app, timed(figures):
        for round_no in range(ROUNDS):
            files = _new_version(src.root, rng, round_no)
            v = app.service.register_directory(DATASET, src.root / "run", chunk_size=MIB)
            placement = app.replication.replicate(f"{DATASET}@{v.version_id}", "lustre")
            log = (tmp_path / f"up-{round_no}.log").open("wb")
            up = subprocess.Popen(
                [DATASYNC, "up", "--port", str(_free_port()), "--processes", "2"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
            try:
                _started(app, placement.id)
                time.sleep(rng.uniform(0.0, 1.0))
                workers = _children(up.pid)
                # the server alone; a worker, then the server; both workers and the server
                variant = (round_no + (db == "postgresql")) % 3
                victims = {0: [], 1: workers[:1], 2: workers}[variant]
                for pid in victims:  # a worker first (or both) ...
                    os.kill(pid, signal.SIGKILL)
                time.sleep(rng.uniform(0.0, 0.5))
                up.send_signal(signal.SIGKILL)  # ... then the server, at any instant
                kills += 1 + len(victims)
                up.wait(30)
                _wait_gone(workers)  # the survivors stop with their parent
            finally:
                if up.poll() is None:
                    up.kill()
                up.wait(30)
                log.close()
            _expire_dead_leases(app)
            assert run_workers(app, [placement.id], timeout=120)
            state = assert_outcome(app, placement.id, figures)
            assert state == "READY", figures.reason
            assert set(assert_no_task_lost(app, placement.id)) == {"done"}
            assert_published_right(dst, DATASET, v.version_id, files, state)
            hidden = [p.name for p in (dst.root / DATASET).iterdir() if p.name.startswith(".")]
            assert not hidden, f"staging or temp entries next to the views: {hidden}"
        figures.data_lost = assert_blob_store_sound(app, dst)
        # Killed writers leave hidden temps; the audit moves them to the quarantine.
        temps = leftover_temps(dst)
        report = app.auditor.audit("lustre", grace=timedelta(0))
        assert not report.lost and not report.missing_views, report.summary()
        assert sorted(report.dark) == temps, (report.dark, temps)
        assert not leftover_temps(dst), report.quarantined
    figures.injected = kills
    figures.extra = {"rounds": ROUNDS, "temps quarantined by the audit": len(temps)}
    record(figures)


@pytest.fixture
def restartable_pg(pg_server: str) -> Iterator[str]:
    """A fresh database whose admin connections survive the server's restart (``pg_url``'s
    pooled admin connection would not: it dies with the server)."""
    name = f"dstest_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(pg_server, isolation_level="AUTOCOMMIT", pool_pre_ping=True)
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield pg_server.rsplit("/", 1)[0] + f"/{name}"
    finally:
        for _ in range(50):  # the server may still be starting up
            try:
                with admin.connect() as conn:
                    conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
                break
            except sa.exc.OperationalError:
                time.sleep(0.2)
        admin.dispose()


def _workers_running(app: App, placement_id: int, want: int, timeout: float = 30.0) -> None:
    """Wait until ``want`` worker processes have claimed tasks of the placement (a worker
    still starting when the server goes down would exit: see docs/reliability.md)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with app.engine.connect() as conn:
            owners = conn.execute(
                sa.select(sa.func.count(sa.distinct(col(Task.lease_owner)))).where(
                    col(Task.placement_id) == placement_id, col(Task.attempts) > 0
                )
            ).scalar_one()
        if owners >= want:
            return
        time.sleep(0.05)
    raise AssertionError(f"fewer than {want} worker processes claimed a task")


@pytest.mark.postgres
def test_a_postgresql_restart_mid_run(tmp_path: Path, restartable_pg: str) -> None:
    pg_url = restartable_pg
    ctl = shutil.which("pg_ctlcluster")
    clusters = sorted(os.listdir("/etc/postgresql")) if os.path.isdir("/etc/postgresql") else []
    if ctl is None or not clusters:
        pytest.skip("no local PostgreSQL cluster to restart (pg_ctlcluster)")
    src = posix_site("pipeline", tmp_path / "pipeline")
    # 16 Mbit/s keeps the run going for seconds: fast workers would otherwise finish the
    # version before the second worker process has started, and restart nothing mid-run.
    dst = posix_site("lustre", tmp_path / "lustre", bandwidth_mbps=16)
    assert src.root is not None
    settings = settings_for(tmp_path / "home", pg_url, [src, dst])
    files = _new_version(src.root, random.Random(5), 0)
    figures = Figures(
        fault="PostgreSQL restart mid-run",
        where="posix -> posix, 2 worker processes",
        db="postgresql",
        command="pytest tests/faults/test_process_faults.py -k postgresql_restart",
    )
    with bootstrap(settings) as app, timed(figures):
        v = app.service.register_directory(DATASET, src.root / "run", chunk_size=MIB)
        placement = app.replication.replicate(f"{DATASET}@{v.version_id}", "lustre")
        options = WorkerOptions(
            queue_backoff_base=0.0, idle_sleep=0.05, lease_seconds=3.0, task_slots=2
        )
        errors: list[BaseException] = []

        def workers() -> None:
            try:
                run_until_idle(settings, [placement.id], processes=2, options=options)
            except BaseException as exc:
                errors.append(exc)

        runner = threading.Thread(target=workers)
        runner.start()
        _workers_running(app, placement.id, 2)
        restart = subprocess.run(
            [ctl, "--skip-systemctl-redirect", clusters[-1], "main", "restart"],
            capture_output=True,
            text=True,
        )
        assert restart.returncode == 0, restart.stderr
        runner.join(300)
        assert not runner.is_alive() and not errors, errors
        app.engine.dispose()  # its pooled connections died with the server
        state = assert_outcome(app, placement.id, figures)
        figures.extra["tasks"] = assert_no_task_lost(app, placement.id)
        figures.data_lost = assert_published_right(
            dst, DATASET, v.version_id, files, state
        ) + assert_blob_store_sound(app, dst)
        with app.engine.connect() as conn:
            histories = conn.execute(
                sa.select(col(Task.errors)).where(col(Task.placement_id) == placement.id)
            ).scalars()
            figures.task_retries = sum(len(h or []) for h in histories)
    figures.injected = 1
    record(figures)
    assert state == "READY", figures.reason
