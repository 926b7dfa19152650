"""Three worker hosts share one PostgreSQL queue; one of them dies mid-run (issue 9).

Three ``datasync worker --processes 2`` hosts (``tests/fixtures/hosts.py``: each in its own
network and UTS namespace, process group and ``DATASYNC_HOME``, reaching PostgreSQL only
through a relay on a veth link) move one version of 2,000 small files and four chunked
shards (the bench moves 20,000: ``tests/bench/test_bench_multihost.py``). Each host has its
own ``concurrency`` for the destination site (1, 2 and 3). Once host C has finished a task
and holds leases, its whole process group is SIGKILLed; its leases (6 s) expire and the
other two finish. Then:

* the placement is READY, every task ``done``, and the view equals the source tree, hashed
  by ``xxh128sum``;
* every host completed tasks (the owner of each ``done`` task names its host);
* no task ran twice: every task has exactly one attempt and no error, except the ones C
  held when it died, which have exactly two, the second by A or B and started only after
  C's lease had expired (``LeaseExpired`` in their history);
* no destination object or part was written by two processes at overlapping times, and on
  each host the writes that hold a destination slot never exceeded that host's limit.

Without lease expiry the placement never becomes READY (the test times out); a lease
taken over early, or a task claimed twice, breaks the attempt counts.
"""

from __future__ import annotations

import os
import random
import subprocess
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlmodel import col

from datasync.bootstrap import App, bootstrap
from datasync.db.transfer_tables import Task
from datasync.transfer.planner import PlannerConfig
from datasync.transfer.tracing import read_trace
from tests.faults.harness import xxh
from tests.fixtures.hosts import DATASYNC, WorkerHost, host_network, in_slot_peak, start_host
from tests.fixtures.replication import MIB, posix_site, settings_for, write_tree, xxh128sum_tree
from tests.integration.test_kill_workers import _assert_no_overlapping_writes

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

DATASET = "drive/multihost"
N_SMALL = 2000
SHARDS = (9 * MIB + 1, 7 * MIB, 5 * MIB + 3, 3 * MIB)
LEASE = 6.0
LIMITS = {"host-a": 1, "host-b": 2, "host-c": 3}  # the destination's concurrency per host
VICTIM = "host-c"
# Small batches and chunk tasks: about 80 tasks for 3 hosts x 2 processes x 4 slots.
PLANNER = PlannerConfig(batch_items=32, chunks_per_task=2)


def make_files(n_small: int, shards: tuple[int, ...], seed: int = 9) -> dict[str, bytes]:
    rng = random.Random(seed)
    files = {
        f"cam{i % 4}/{i:06d}.jpg": rng.randbytes(rng.randint(500, 4000)) for i in range(n_small)
    }
    files |= {f"shards/shard-{i:02d}.bin": rng.randbytes(size) for i, size in enumerate(shards)}
    return files


def task_rows(app: App, placement_id: int) -> list[sa.RowMapping]:
    with app.engine.connect() as conn:
        return list(
            conn.execute(
                sa.select(
                    col(Task.id),
                    col(Task.kind),
                    col(Task.state),
                    col(Task.attempts),
                    col(Task.lease_owner),
                    col(Task.lease_expires_at),
                    col(Task.started_at),
                    col(Task.errors),
                ).where(col(Task.placement_id) == placement_id)
            ).mappings()
        )


def host_of(owner: str | None) -> str:
    return (owner or "").split(":", 1)[0]


def wait_for(what: str, check: Callable[[], bool], timeout: float, hosts: list[WorkerHost]) -> None:
    """Poll ``check``; fail at once if a host that was not killed has exited."""
    deadline = time.monotonic() + timeout
    while not check():
        for h in hosts:
            if h.killed_at_ns is None and h.proc.poll() is not None:
                raise AssertionError(f"{h.name} exited ({h.proc.returncode}):\n{h.log_tail()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def live_workers(app: App) -> dict[str, int]:
    with app.engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT host, count(*) FROM workers GROUP BY host"))
        return {str(h): int(n) for h, n in rows}


def test_three_hosts_share_the_queue_and_survive_one_dying(tmp_path: Path, pg_url: str) -> None:
    src = posix_site("pipeline", tmp_path / "pipeline")
    dst = posix_site("lustre", tmp_path / "lustre")
    assert src.root is not None and dst.root is not None
    settings = settings_for(tmp_path / "home", pg_url, [src, dst])
    files = make_files(N_SMALL, SHARDS)
    write_tree(src.root / "run", files)
    app = bootstrap(settings)
    hosts: list[WorkerHost] = []
    try:
        version = app.service.register_directory(DATASET, src.root / "run", chunk_size=MIB)
        with host_network(list(LIMITS), pg_url) as nets:
            for name, limit in LIMITS.items():
                hosts.append(
                    start_host(
                        name,
                        nets[name],
                        settings,
                        tmp_path / "hosts",
                        processes=2,
                        lease_seconds=LEASE,
                        concurrency={"lustre": limit},
                    )
                )
            by_name = {h.name: h for h in hosts}
            wait_for(
                "every host's 2 workers",
                lambda: all(live_workers(app).get(n) == 2 for n in LIMITS),
                90,
                hosts,
            )
            placement = app.replication.replicate(
                f"{DATASET}@{version.version_id}", "lustre", planner=PLANNER
            )
            pid = placement.id

            def victim_busy() -> bool:
                rows = task_rows(app, pid)
                done = any(
                    r["state"] == "done" and host_of(r["lease_owner"]) == VICTIM for r in rows
                )
                held = any(
                    r["state"] == "leased" and host_of(r["lease_owner"]) == VICTIM for r in rows
                )
                return done and held

            wait_for(f"{VICTIM} to finish a task and hold a lease", victim_busy, 60, hosts)
            by_name[VICTIM].kill()
            held = {
                r["id"]: r["lease_expires_at"]
                for r in task_rows(app, pid)
                if r["state"] == "leased" and host_of(r["lease_owner"]) == VICTIM
            }
            assert held, f"{VICTIM} held no lease when it died"
            with app.engine.connect() as conn:
                now = conn.execute(sa.select(sa.func.now())).scalar_one()
            longest = max(held.values()) - now
            # --lease-seconds reached the workers: no lease runs past it (60 s by default).
            assert longest.total_seconds() <= LEASE, longest

            def ready() -> bool:
                st = app.replication.status(placement_id=pid)[0]
                assert st.state != "FAILED", st.error
                return st.state == "READY"

            wait_for("the placement to be READY", ready, 120, hosts)
            for h in hosts:
                if h.name != VICTIM:
                    assert h.stop() == 0, f"{h.name} did not stop cleanly:\n{h.log_tail()}"

        rows = task_rows(app, pid)
        assert {r["state"] for r in rows} == {"done"}
        view = xxh128sum_tree(dst.root / DATASET / version.version_id)
        assert view == {p: xxh(d) for p, d in files.items()}

        done_by: dict[str, int] = {}
        for r in rows:
            done_by[host_of(r["lease_owner"])] = done_by.get(host_of(r["lease_owner"]), 0) + 1
        assert set(done_by) == set(LIMITS), done_by
        assert all(n >= 1 for n in done_by.values()), done_by

        for r in rows:
            if r["id"] in held:
                taken_over = held[r["id"]]
                assert isinstance(taken_over, datetime)
                classes = [e.get("class") for e in r["errors"]]
                assert r["attempts"] == 2 and classes == ["LeaseExpired"], dict(r)
                assert host_of(r["lease_owner"]) != VICTIM
                assert r["started_at"] >= taken_over, "taken over before the lease expired"
            else:
                assert r["attempts"] == 1 and not r["errors"], f"task ran twice: {dict(r)}"

        trace = tmp_path / "all.trace"
        trace.write_bytes(b"".join(h.trace.read_bytes() for h in hosts))
        victim = by_name[VICTIM]
        assert victim.killed_at_ns is not None
        deaths = dict.fromkeys(victim.pids, victim.killed_at_ns)
        assert _assert_no_overlapping_writes(trace, deaths) > N_SMALL
        peaks = {h.name: in_slot_peak(read_trace(str(h.trace))) for h in hosts}
        print(f"tasks done by host {done_by}; taken over {len(held)}; slot peaks {peaks}")
        assert max(peaks.values()) >= 2, f"the trace never saw two writes at once: {peaks}"
        for name, peak in peaks.items():
            assert 1 <= peak <= LIMITS[name], f"{name}: {peak} writes at once, limit {LIMITS[name]}"
    finally:
        for h in hosts:
            if h.proc.poll() is None:
                h.kill()
        app.close()


def test_a_lease_shorter_than_the_minimum_is_refused(tmp_path: Path) -> None:
    done = subprocess.run(
        [DATASYNC, "worker", "--lease-seconds", "2"],
        env={**os.environ, "DATASYNC_HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "--lease-seconds" in done.stderr
