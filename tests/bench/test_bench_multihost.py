"""Workers on 1, 2 and 3 hosts sharing one PostgreSQL: tasks/s and bytes/s (issue 9).

One version of ``BENCH_MH_SMALL_FILES`` (20,000) small files (1-64 KiB, 32 KiB on average)
and ``BENCH_MH_SHARDS`` (4) shards of 128 MiB (8 MiB chunks) is registered once; it is then
replicated to a fresh destination site by 1, 2, 3, 3, 2 and 1 hosts (``BENCH_MH_ORDER``;
mirrored, so a load that drifts during the run favours no host count), each a
``datasync worker --processes 2`` with default options in its own network namespace,
hostname, process group and ``DATASYNC_HOME`` (``tests/fixtures/hosts.py``), reaching the
database through a relay on a veth link. The hosts are started and registered before the
clock starts; the time runs from ``replicate`` (planning, default task sizes) until the
placement is READY, every byte verified. Each view is then hashed by ``xxh128sum`` and
compared with the source. The peer is the one-host run of the same data in the same run.

Results go to ``docs/bench-results/multihost.md``. On the 2-core reference machine three
hosts (six worker processes) share two cores: no linear scaling is possible there; what
the rows show is that adding hosts shares the work without collapsing throughput.
"""

from __future__ import annotations

import os
import random
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlmodel import col

from datasync.bootstrap import App, bootstrap
from datasync.db.transfer_tables import Task
from tests.fixtures.hosts import WorkerHost, host_network, start_host
from tests.fixtures.replication import MIB, posix_site, settings_for, xxh128sum_tree

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "docs" / "bench-results" / "multihost.md"
N_SMALL = int(os.environ.get("BENCH_MH_SMALL_FILES", "20000"))
N_SHARDS = int(os.environ.get("BENCH_MH_SHARDS", "4"))
SHARD = 128 * MIB
CHUNK = 8 * MIB
HOSTS = ("host-a", "host-b", "host-c")
# Host counts in run order: mirrored, so a load drifting during the run favours none.
ORDER = tuple(int(n) for n in os.environ.get("BENCH_MH_ORDER", "1,2,3,3,2,1").split(","))
PROCESSES = 2
DATASET = "bench/multihost"


def _fill(root: Path, seed: int = 3) -> dict[str, int]:
    """The source tree (unique bytes per file); returns ``path -> size``."""
    rng = random.Random(seed)
    block = rng.randbytes(16 * MIB)
    sizes = {f"cam{i % 8}/{i:06d}.jpg": rng.randint(1024, 64 * 1024) for i in range(N_SMALL)}
    sizes |= {f"shards/shard-{i:02d}.bin": SHARD for i in range(N_SHARDS)}
    for rel, size in sizes.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as f:
            f.write(rng.randbytes(min(64, size)))
            left = size - min(64, size)
            while left:
                off = rng.randrange(len(block) // 2)
                n = min(left, len(block) - off)
                f.write(block[off : off + n])
                left -= n
    return sizes


def _children_cpu() -> float:
    """CPU seconds of this process's reaped children: a host's worker processes are reaped
    by its ``datasync worker``, which this process reaps."""
    t = os.times()
    return t.children_user + t.children_system


def _workers_by_host(app: App) -> dict[str, int]:
    with app.engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT host, count(*) FROM workers GROUP BY host"))
        return {str(h): int(n) for h, n in rows}


def _wait(what: str, check: Callable[[], bool], timeout: float, hosts: list[WorkerHost]) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        for h in hosts:
            assert h.proc.poll() is None, f"{h.name} exited:\n{h.log_tail()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _tasks(app: App, placement_id: int) -> tuple[dict[str, int], int, int, float]:
    """Tasks done per host, tasks, bytes moved, and the seconds from the first task's
    start to the last one's finish (the database's clock)."""
    with app.engine.connect() as conn:
        rows = conn.execute(
            sa.select(
                col(Task.lease_owner),
                col(Task.bytes_moved),
                col(Task.started_at),
                col(Task.finished_at),
            ).where(col(Task.placement_id) == placement_id, col(Task.state) == "done")
        ).all()
    per_host: dict[str, int] = {}
    for owner, _moved, _s, _f in rows:
        host = str(owner).split(":", 1)[0]
        per_host[host] = per_host.get(host, 0) + 1
    starts = [r[2] for r in rows if r[2] is not None]
    ends = [r[3] for r in rows if r[3] is not None]
    window = max(ends) - min(starts)
    return per_host, len(rows), sum(int(r[1]) for r in rows), window.total_seconds()


@dataclass
class Run:
    hosts: int
    tasks: int
    per_host: str
    wall: float
    moved: int
    files: int
    window: float
    load: tuple[float, float]  # 1-minute load average before and after
    cpu: float  # CPU seconds the hosts' processes used, start to exit


def _table(runs: list[Run]) -> list[str]:
    one = statistics.mean(r.wall for r in runs if r.hosts == 1)
    lines = [
        "| run | hosts | worker processes | tasks | tasks done per host | wall s | tasks/s |"
        " MB/s | files/s | transfer window s | hosts' CPU s (per wall s) | load before/after |"
        " 1-host mean wall / wall |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(runs, 1):
        cells = [
            str(i),
            str(r.hosts),
            str(r.hosts * PROCESSES),
            str(r.tasks),
            r.per_host,
            f"{r.wall:.1f}",
            f"{r.tasks / r.wall:.2f}",
            f"{r.moved / r.wall / 1e6:.1f}",
            f"{r.files / r.wall:.0f}",
            f"{r.window:.1f}",
            f"{r.cpu:.0f} ({r.cpu / r.wall:.2f})",
            f"{r.load[0]:.1f} / {r.load[1]:.1f}",
            f"{one / r.wall:.2f}x",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| hosts | runs | mean tasks/s | mean MB/s | mean files/s | vs 1 host |"]
    lines.append("|---|---|---|---|---|---|")
    for n in sorted({r.hosts for r in runs}):
        mine = [r for r in runs if r.hosts == n]
        wall = statistics.mean(r.wall for r in mine)
        cells = [
            str(n),
            str(len(mine)),
            f"{statistics.mean(r.tasks / r.wall for r in mine):.2f}",
            f"{statistics.mean(r.moved / r.wall / 1e6 for r in mine):.1f}",
            f"{statistics.mean(r.files / r.wall for r in mine):.0f}",
            f"{one / wall:.2f}x",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


@pytest.fixture(scope="module")
def results() -> Iterator[list[Run]]:
    runs: list[Run] = []
    yield runs
    if not runs:
        return
    OUT.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Multi-host benchmark: 1, 2 and 3 worker hosts on one PostgreSQL",
        "",
        "- Command: `.venv/bin/pytest -q -s -p no:cacheprovider"
        " tests/bench/test_bench_multihost.py` (part of `make bench`; needs root for the"
        " network namespaces)",
        f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; machine:"
        f" {os.cpu_count()} cores, shared with other jobs (the load column): compare rows of"
        " one run, and the mirrored order (1, 2, 3, 3, 2, 1 hosts) evens out a load that"
        " drifts during the run",
        f"- Data: {N_SMALL:,} files of 1-64 KiB + {N_SHARDS} x {SHARD // MIB} MiB shards"
        f" ({CHUNK // MIB} MiB chunks), posix -> posix; default task sizes (256-file batches,"
        " 4 chunks per task) and worker options",
        f"- Each host: `datasync worker --processes {PROCESSES}` in its own network namespace"
        " (PostgreSQL through a relay on a veth link), hostname, process group and"
        " `DATASYNC_HOME`; started before the clock; time = `replicate` until READY, every byte"
        " verified; each view re-hashed by `xxh128sum` afterwards and equal to the source",
        "- Transfer window = first task started to last task finished (database clock);"
        " MB/s = bytes written at the destination / wall time",
        "",
        *_table(runs),
        "",
        f"This box has {os.cpu_count()} cores for every host together, so three hosts (six"
        " worker processes, each hashing every byte it reads and re-reading every byte it"
        " writes) cannot scale linearly here. What the rows show: every host takes a share"
        " of the tasks, and adding hosts does not make the run slower.",
        "",
        "Hosts' CPU s per wall s is how much of the box the hosts got: below 2 (both cores),"
        " the rest went to other jobs. On a shared box more worker processes win a larger"
        " share of the CPU from those jobs, which is most of why more hosts can be faster"
        " here; on an idle 2-core box expect no gain beyond the second process.",
    ]
    OUT.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.mark.timeout(3600)  # six runs of 20,000 files on a shared 2-core box
def test_one_two_three_hosts(
    tmp_path_factory: pytest.TempPathFactory, pg_url: str, results: list[Run]
) -> None:
    base = tmp_path_factory.mktemp("bench-multihost")
    src = posix_site("pipeline", base / "src")
    dsts = [posix_site(f"lustre{i}", base / f"dst{i}") for i in range(len(ORDER))]
    assert src.root is not None
    sizes = _fill(src.root / "run")
    settings = settings_for(base / "home", pg_url, [src, *dsts], CHUNK)
    app = bootstrap(settings)
    try:
        t0 = time.perf_counter()
        version = app.service.register_directory(DATASET, src.root / "run", chunk_size=CHUNK)
        print(f"\nregistered {len(sizes)} files in {time.perf_counter() - t0:.1f} s")
        want = xxh128sum_tree(src.root / "run")
        with host_network(list(HOSTS), pg_url) as nets:
            for i, (n, dst) in enumerate(zip(ORDER, dsts, strict=True)):
                assert dst.root is not None
                names = HOSTS[:n]
                cpu0 = _children_cpu()
                hosts = [
                    start_host(
                        name,
                        nets[name],
                        settings,
                        base / f"run{i}",
                        processes=PROCESSES,
                        lease_seconds=60,
                    )
                    for name in names
                ]

                def up(names: tuple[str, ...] = names) -> bool:
                    by_host = _workers_by_host(app)
                    return all(by_host.get(h) == PROCESSES for h in names)

                try:
                    _wait(f"{n} host(s) up", up, 120, hosts)
                    load = os.getloadavg()[0]
                    t0 = time.perf_counter()
                    placement = app.replication.replicate(
                        f"{DATASET}@{version.version_id}", dst.name
                    )

                    def ready(pid: int = placement.id) -> bool:
                        st = app.replication.status(placement_id=pid)[0]
                        assert st.state != "FAILED", st.error
                        return st.state == "READY"

                    _wait("READY", ready, 1800, hosts)
                    wall = time.perf_counter() - t0
                    loads = (load, os.getloadavg()[0])
                finally:
                    codes = [h.stop() for h in hosts]
                cpu = _children_cpu() - cpu0
                assert codes == [0] * n, [h.log_tail() for h in hosts]
                per_host, tasks, moved, window = _tasks(app, placement.id)
                if tasks >= 8 * n * PROCESSES:  # (4 slots per process: tiny runs may not share)
                    assert set(per_host) == set(names), per_host
                assert xxh128sum_tree(dst.root / DATASET / version.version_id) == want
                shares = ", ".join(f"{h[-1]}: {per_host.get(h, 0)}" for h in names)
                run = Run(n, tasks, shares, wall, moved, len(sizes), window, loads, cpu)
                results.append(run)
                print(run)
    finally:
        app.close()
