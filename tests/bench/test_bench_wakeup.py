"""Idle worker -> first byte after ``replicate``, on SQLite and PostgreSQL.

One worker process (``run_worker``, spawned as ``datasync worker`` runs it) waits with
nothing to do; its fallback poll is ``IDLE`` seconds, so only the wake-up can start it
sooner. Each round registers a one-file dataset (1 MiB), then the clock starts,
``replicate`` plans it, and a watcher thread walks the destination every millisecond until
a non-empty file appears there (the first byte written) and the placement is READY. The
peer, in the same run, is ``rclone copy`` of the same file: process start to first byte.
Results go to ``docs/bench-results/wakeup.md``.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from datasync.bootstrap import App, bootstrap
from datasync.transfer.supervisor import WorkerOptions, run_worker
from tests.bench.targets import Target, record, write_section
from tests.fixtures.replication import posix_site, settings_for

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "docs" / "bench-results" / "wakeup.md"
ROUNDS = int(os.environ.get("BENCH_WAKEUP_ROUNDS", "7"))
IDLE = 5.0
TARGET = 0.3
MIB = 1024 * 1024
ROWS: list[str] = []


def _first_byte(root: Path, t0: float, done: threading.Event) -> list[float]:
    """Start a watcher: seconds from ``t0`` until a new non-empty file exists under ``root``
    (earlier rounds' files are there already)."""
    seen: list[float] = []
    before = {os.path.join(d, n) for d, _dirs, names in os.walk(root) for n in names}

    def watch() -> None:
        while not done.is_set():
            for dirpath, _dirs, names in os.walk(root):
                for name in names:
                    path = os.path.join(dirpath, name)
                    try:
                        if path not in before and os.path.getsize(path) > 0:
                            seen.append(time.perf_counter() - t0)
                            return
                    except OSError:
                        pass
            time.sleep(0.001)

    threading.Thread(target=watch, daemon=True).start()
    return seen


def _wait_for(seen: list[float], limit: float) -> float:
    deadline = time.perf_counter() + limit
    while not seen:
        assert time.perf_counter() < deadline, "no byte arrived"
        time.sleep(0.001)
    return seen[0]


def _round(app: App, src: Path, dst: Path, n: int) -> tuple[float, float, float]:
    """Seconds from ``replicate`` to the first byte, to READY, and until ``replicate``
    returned (planned: workers may start on its first page before that)."""
    tree = src / f"r{n}"
    tree.mkdir(parents=True)
    (tree / "f.bin").write_bytes(os.urandom(MIB))
    v = app.service.register_directory(f"wake/r{n}", tree)
    done = threading.Event()
    t0 = time.perf_counter()
    seen = _first_byte(dst, t0, done)
    placement = app.replication.replicate(f"wake/r{n}@{v.version_id}", "dst")
    planned = time.perf_counter() - t0
    try:
        first = _wait_for(seen, 2 * IDLE)
        while app.replication.status(placement_id=placement.id)[0].state != "READY":
            assert time.perf_counter() - t0 < 4 * IDLE, "placement not READY"
            time.sleep(0.005)
        return first, time.perf_counter() - t0, planned
    finally:
        done.set()


def _rclone_first_byte(rclone: str, src: Path, dst: Path) -> float:
    dst.mkdir(parents=True)
    done = threading.Event()
    t0 = time.perf_counter()
    seen = _first_byte(dst, t0, done)
    env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}
    subprocess.run(
        [rclone, "copy", str(src), str(dst)], check=True, env=env, stdout=subprocess.DEVNULL
    )
    try:
        return _wait_for(seen, 10)
    finally:
        done.set()


@pytest.fixture(scope="module", autouse=True)
def _write_results() -> Iterator[None]:
    yield
    if not ROWS:
        return
    write_section(
        OUT,
        "Idle worker to first byte",
        ", shared",
        f"One spawned worker process waits idle (fallback poll {IDLE:.0f} s, so only the "
        "wake-up starts it sooner); the clock runs from `replicate` (which plans the "
        "placement) to the first non-empty file at the destination, and to READY. Workers "
        "are woken by the commit of the plan's first page, so the first byte may come before "
        f"`replicate` returns. {ROUNDS} rounds of a 1 MiB one-file dataset, posix to posix. "
        f"Target: first byte <= {TARGET} s. Peer: `rclone copy` of the same file, process "
        "start to first byte, in the same run.",
        [
            "Database",
            "first byte: median",
            "best",
            "worst",
            "`replicate` returned: median",
            "READY: median",
            "rclone first byte: median",
            "datasync / rclone",
        ],
        ROWS,
        f"BENCH_WAKEUP_ROUNDS={ROUNDS} .venv/bin/pytest -q -s -p no:cacheprovider "
        "tests/bench/test_bench_wakeup.py",
    )


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_idle_worker_to_first_byte(
    tmp_path: Path, request: pytest.FixtureRequest, database: str
) -> None:
    rclone = shutil.which("rclone")
    if rclone is None:
        pytest.skip("rclone not installed (make bench installs it)")
    url = (
        f"sqlite:///{tmp_path / 'datasync.db'}"
        if database == "sqlite"
        else str(request.getfixturevalue("pg_url"))
    )
    src, dst = posix_site("src", tmp_path / "src"), posix_site("dst", tmp_path / "dst")
    assert src.root is not None and dst.root is not None
    settings = settings_for(tmp_path / "home", url, [src, dst])
    app = bootstrap(settings)
    stop = threading.Event()
    options = WorkerOptions(idle_sleep=IDLE, lease_seconds=60, grace=5)
    worker = threading.Thread(
        target=run_worker,
        args=(settings,),
        kwargs={"processes": 1, "stop_event": stop, "options": options},
        daemon=True,
    )
    worker.start()
    firsts: list[float] = []
    readies: list[float] = []
    planned: list[float] = []
    try:
        while True:  # the worker process is up and has made its first claim
            with app.engine.connect() as conn:
                if conn.execute(sa.text("SELECT count(*) FROM workers")).scalar_one():
                    break
            time.sleep(0.05)
        for n in range(ROUNDS):
            time.sleep(1.0)  # idle again, waiting
            first, ready, plan = _round(app, src.root, dst.root, n)
            firsts.append(first)
            readies.append(ready)
            planned.append(plan)
    finally:
        stop.set()
        worker.join(60)
        app.close()
    peers = [
        _rclone_first_byte(rclone, src.root / "r0", tmp_path / f"rclone{n}") for n in range(ROUNDS)
    ]
    med, peer = statistics.median(firsts), statistics.median(peers)
    ROWS.append(
        f"| {database} | {med:.3f} s | {min(firsts):.3f} s | {max(firsts):.3f} s "
        f"| {statistics.median(planned):.3f} s | {statistics.median(readies):.3f} s "
        f"| {peer:.3f} s | {med / peer:.2f}x |"
    )
    record(
        "wakeup",
        [
            Target(
                f"Worker idle -> first byte after replicate ({database})",
                f"{med:.3f} s (median of {ROUNDS})",
                f"rclone copy, start to first byte: {peer:.3f} s",
                f"{med / peer:.2f}x time",
                f"<= {TARGET} s",
                med <= TARGET,
            )
        ],
        f"BENCH_WAKEUP_ROUNDS={ROUNDS} .venv/bin/pytest -q -s -p no:cacheprovider"
        " tests/bench/test_bench_wakeup.py",
    )
    print(f"\n{database}: first byte median {med:.3f}s (rclone {peer:.3f}s), rounds {firsts}")
