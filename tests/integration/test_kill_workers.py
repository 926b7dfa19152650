"""SIGKILL worker processes at random instants and at named failpoints (invariant 4).

Each round registers a new version (new frames and new shards, so there is real work),
replicates it, starts worker processes that die mid-task (SIGKILL from a failpoint inside
the worker, or from this test at a random instant), then runs fresh workers to completion.
Every round must end with:

* the placement READY and every task ``done``: no lost task, none failed;
* a view that is bit-identical to the source tree, re-read and re-hashed from disk, with
  no staging directory, temp file or label temp visible under the dataset;
* chunked blobs resumed from the verified parts: the bytes the completing attempts moved
  for chunk/finalize tasks are fewer than the chunked blobs' size whenever a kill came after
  a part was recorded.

All writes are traced (``DATASYNC_TRACE_WRITES``): no destination part or object is ever
written by two processes at overlapping times (the lease makes a task single-owner; a
killed worker's open write ends when it dies).

Workers are forked from this process (fast start; each builds its own engine through
``bootstrap``); leases are 2 s so a killed worker's tasks are taken over quickly.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time
from collections import defaultdict
from multiprocessing.process import BaseProcess
from pathlib import Path

import pytest
import sqlalchemy as sa

from datasync.bootstrap import App, bootstrap
from datasync.config import Settings
from datasync.db.tables import table_of
from datasync.db.transfer_tables import Task
from datasync.transfer.failpoints import reset_failpoints
from datasync.transfer.supervisor import WorkerOptions, run_worker
from datasync.transfer.tracing import read_trace, reset_tracing
from tests.fixtures.replication import (
    MIB,
    assert_view_matches,
    make_tree,
    posix_site,
    settings_for,
    write_tree,
)

pytestmark = pytest.mark.slow

ROUNDS = 15
LEASE = 2.0
OPTIONS = WorkerOptions(
    lease_seconds=LEASE, queue_backoff_base=0.0, idle_sleep=0.05, task_slots=3, io_threads=4
)
DATASET = "drive/kill"
_T = table_of(Task)
# (failpoint or "random", whether a recorded part must have been skipped afterwards)
SCENARIOS = [
    ("after_put_part:3", False),  # parts in flight on other threads may be unrecorded
    ("after_mark_part:2", True),
    ("before_commit:1", False),
    ("after_commit:1", False),
    ("mid_publish:1", False),
    ("before_rename:1", False),
    ("after_publish:1", False),
    ("before_complete:1", False),  # tasks done, the turn that completes them never sent
    ("random", False),
]
_FORK = multiprocessing.get_context("fork")


def _worker_main(settings_json: str, failpoint: str | None, trace: str) -> None:
    """A forked worker process: its own engine, pools and backends; dies at ``failpoint``."""
    os.environ["DATASYNC_TRACE_WRITES"] = trace
    if failpoint:
        os.environ["DATASYNC_FAILPOINT"] = failpoint
    else:
        os.environ.pop("DATASYNC_FAILPOINT", None)
    reset_failpoints()
    reset_tracing()
    run_worker(Settings.model_validate_json(settings_json), processes=0, once=True, options=OPTIONS)


def _start(settings: Settings, failpoint: str | None, trace: Path) -> BaseProcess:
    proc = _FORK.Process(
        target=_worker_main, args=(settings.model_dump_json(), failpoint, str(trace)), daemon=True
    )
    proc.start()
    return proc


def _kill(proc: BaseProcess, deaths: dict[int, int]) -> None:
    if proc.is_alive() and proc.pid is not None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.join(30)
    if proc.pid is not None:
        deaths[proc.pid] = time.monotonic_ns()


def _new_version(
    app: App, src_root: Path, rng: random.Random, round_no: int
) -> tuple[str, dict[str, bytes]]:
    run = src_root / "run"
    if round_no == 0:
        files = make_tree(run, seed=rng.randrange(1 << 30))
    else:
        files = {str(p.relative_to(run)): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    # New shards and frames every round: new blobs, chunk tasks, publish.
    changed = {
        "shards/a.bin": rng.randbytes(6 * MIB + rng.randrange(1000)),
        "shards/b.bin": rng.randbytes(2 * MIB + 511),
        f"cam0/{round_no:06d}-new.jpg": rng.randbytes(3000),
        "cam1/000001.jpg": rng.randbytes(2500),
    }
    write_tree(run, changed)
    files.update(changed)
    v = app.service.register_directory(DATASET, run, chunk_size=MIB)
    return v.version_id, files


def _chunked_moved(engine: sa.Engine, placement_id: int) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                sa.select(sa.func.coalesce(sa.func.sum(_T.c.bytes_moved), 0)).where(
                    _T.c.placement_id == placement_id, _T.c.kind.in_(("chunks", "finalize"))
                )
            ).scalar_one()
        )


def _assert_no_overlapping_writes(trace: Path, deaths: dict[int, int]) -> int:
    """No part or object written by two processes at overlapping times, and no commit of
    an object overlapping another process's part write of it. Returns intervals checked."""
    open_: dict[tuple[str, int, int], tuple[int, str]] = {}
    per_key: dict[str, list[tuple[int, int, int, str, str]]] = defaultdict(list)
    for ev, target, kind, pid, tid, t in read_trace(str(trace)):
        if ev == "start":
            open_[(target, pid, tid)] = (t, kind)
        else:
            start, _ = open_.pop((target, pid, tid))
            per_key[target.split("#", 1)[0]].append((start, t, pid, target, kind))
    for (target, pid, _tid), (start, kind) in open_.items():  # killed mid-write
        end = deaths.get(pid)
        assert end is not None, f"pid {pid} left {target} open but was not killed"
        per_key[target.split("#", 1)[0]].append((start, end, pid, target, kind))
    for key, ivs in per_key.items():
        for i, (s1, e1, p1, t1, k1) in enumerate(ivs):
            for s2, e2, p2, t2, k2 in ivs[i + 1 :]:
                conflict = t1 == t2 or "commit" in (k1, k2)
                if p1 != p2 and conflict and s1 < e2 and s2 < e1:
                    raise AssertionError(
                        f"{key}: {t1} ({k1}) by pid {p1} overlaps {t2} ({k2}) by pid {p2}"
                    )
    return sum(len(v) for v in per_key.values())


def test_sigkill_rounds(tmp_path: Path, db_url: str) -> None:
    rng = random.Random(int(os.environ.get("DATASYNC_KILL_SEED", "20261127")))
    src = posix_site("pipeline", tmp_path / "pipeline")
    dst = posix_site("lustre", tmp_path / "lustre")
    settings = settings_for(tmp_path / "home", db_url, [src, dst])
    assert src.root is not None and dst.root is not None
    trace = tmp_path / "writes.trace"
    deaths: dict[int, int] = {}
    app = bootstrap(settings)
    resumed_rounds = 0
    try:
        for round_no in range(ROUNDS):
            scenario, must_skip = SCENARIOS[round_no % len(SCENARIOS)]
            version_id, files = _new_version(app, src.root, rng, round_no)
            placement = app.replication.replicate(f"{DATASET}@{version_id}", "lustre")
            app.engine.dispose()  # no pooled connection crosses the fork
            if scenario == "random":
                victims = [_start(settings, None, trace) for _ in range(2)]
                time.sleep(rng.uniform(0.05, 0.8))
                for proc in victims:
                    _kill(proc, deaths)
            else:
                victim = _start(settings, scenario, trace)
                victim.join(60)
                assert victim.exitcode is not None, "the failpoint never fired or finished"
                deaths[victim.pid or 0] = time.monotonic_ns()
                killed = victim.exitcode == -signal.SIGKILL
                assert killed, f"round {round_no}: failpoint {scenario} never fired"
            finishers = [_start(settings, None, trace) for _ in range(2)]
            for proc in finishers:
                proc.join(120)
                assert proc.exitcode == 0, f"round {round_no} ({scenario}): worker {proc.exitcode}"
            st = app.replication.status(placement_id=placement.id)[0]
            where = f"round {round_no} ({scenario})"
            assert st.state == "READY", (where, st.error, st.last_errors)
            assert set(st.tasks) == {"done"}, (where, st.tasks)
            assert_view_matches(dst, DATASET, version_id, files)
            if must_skip:
                chunked = 6 * MIB + 2 * MIB  # lower bound of the two shards' sizes
                moved = _chunked_moved(app.engine, placement.id)
                assert moved < chunked, f"{where}: resumed from zero ({moved} bytes re-sent)"
                resumed_rounds += 1
        assert resumed_rounds >= 2, "the resume scenarios must actually have killed a worker"
        checked = _assert_no_overlapping_writes(trace, deaths)
        assert checked > ROUNDS * 5
    finally:
        app.close()


def test_concurrent_workers_never_write_the_same_destination(tmp_path: Path, db_url: str) -> None:
    """Four processes share one placement with many chunks and small blobs: every part and
    every object is written by one process at a time, and the view is complete."""
    src = posix_site("pipeline", tmp_path / "pipeline")
    dst = posix_site("lustre", tmp_path / "lustre")
    settings = settings_for(tmp_path / "home", db_url, [src, dst])
    assert src.root is not None
    files = make_tree(src.root / "run", shards=(9 * MIB + 1, 5 * MIB, 3 * MIB + 7))
    trace = tmp_path / "writes.trace"
    app = bootstrap(settings)
    try:
        v = app.service.register_directory(DATASET, src.root / "run", chunk_size=MIB)
        # Two placements of versions sharing blobs would race on the same blob keys too.
        placement = app.replication.replicate(f"{DATASET}@{v.version_id}", "lustre")
        app.engine.dispose()
        workers = [_start(settings, None, trace) for _ in range(4)]
        for proc in workers:
            proc.join(120)
            assert proc.exitcode == 0
        st = app.replication.status(placement_id=placement.id)[0]
        assert st.state == "READY", st.error
        assert_view_matches(dst, DATASET, v.version_id, files)
        writers = {pid for _ev, _target, _kind, pid, _tid, _t in read_trace(str(trace))}
        assert len(writers) >= 2, "the work was shared by several processes"
        assert _assert_no_overlapping_writes(trace, {}) > 20
    finally:
        app.close()


@pytest.mark.emulator
@pytest.mark.parametrize("failpoint", ["after_put_part:1", "after_mark_part:1"])
def test_s3_upload_resumes_from_listparts(
    tmp_path: Path, request: pytest.FixtureRequest, sqlite_url: str, failpoint: str
) -> None:
    """A worker killed after sending a part to S3 (recorded in the chunk map or not): the
    next worker skips the parts S3 already holds (``ListParts``) and completes the upload."""
    from tests.fixtures.replication import cloud_site, view_files, xxh

    src = posix_site("pipeline", tmp_path / "pipeline")
    dst = cloud_site("aws", "s3", request)
    settings = settings_for(tmp_path / "home", sqlite_url, [src, dst])
    assert src.root is not None
    shard = 16 * MIB + 3  # 1 MiB chunks -> four 5 MiB S3 parts (5, 5, 5, 1+3)
    write_tree(src.root / "run", {"shard.bin": random.Random(7).randbytes(shard)})
    trace = tmp_path / "writes.trace"
    app = bootstrap(settings)
    try:
        v = app.service.register_directory(DATASET, src.root / "run", chunk_size=MIB)
        placement = app.replication.replicate(f"{DATASET}@{v.version_id}", "aws")
        app.engine.dispose()
        victim = _start(settings, failpoint, trace)
        victim.join(120)
        assert victim.exitcode == -signal.SIGKILL, "the failpoint must have fired"
        finisher = _start(settings, None, trace)
        finisher.join(120)
        assert finisher.exitcode == 0
        st = app.replication.status(placement_id=placement.id)[0]
        assert st.state == "READY", st.error
        data = (src.root / "run/shard.bin").read_bytes()
        assert view_files(dst, DATASET, v.version_id) == {"shard.bin": xxh(data)}
        moved = _chunked_moved(app.engine, placement.id)
        assert moved <= shard - 5 * MIB, f"the part S3 already held was sent again ({moved})"
    finally:
        app.close()
