"""Hashing benchmark: datasync's hash_file against Debian's xxh128sum on a 2 GiB file.

Run with ``make bench`` or
``.venv/bin/pytest -q -s -p no:cacheprovider tests/bench/test_bench_hashing.py``.
Writes ``docs/bench-results/hashing.md``. Targets (issue 2): at least 0.9x xxh128sum's
throughput on one core; faster than it with both cores.

The file lives on disk (``.bench/hashing/``). "warm" runs read it from the page cache (the
issue's setting: it measures hashing, not the disk); "cold" runs first drop this file's
pages with ``POSIX_FADV_DONTNEED``, which is what registering uncached data looks like.
Every candidate runs in the same interleaved rounds so background load hits them alike;
the table reports the best round and the median. "whole" is the same work xxh128sum
does (one digest); "64 MiB chunks" adds the per-chunk digests a manifest records.
"""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from datasync.manifest.hashing import DEFAULT_BUFFER_SIZE, hash_file
from datasync.manifest.scan import scan_directory

MiB = 1024 * 1024
SIZE = 2 * 1024 * MiB
ROUNDS = 7
RESULTS = Path(__file__).resolve().parents[2] / "docs" / "bench-results" / "hashing.md"
COMMAND = ".venv/bin/pytest -q -s -p no:cacheprovider tests/bench/test_bench_hashing.py"


NOTES = [
    "## Reading the numbers",
    "",
    "- `whole` is xxh128sum's workload: one digest. `64 MiB chunks` adds the 32 per-chunk",
    "  digests a manifest records (chunk 0 is free, the rest re-hash a buffer still in cache).",
    "- `threads 2` adds a reader thread that `readv`s the next buffer while the caller",
    "  hashes (opt-in: `hash_file(threads=2)`, `scan_directory(hash_threads=2)`). The",
    "  default is one thread per file: a scan uses both cores by hashing two files at",
    "  once (the `scan_directory` rows).",
    "- Cold rows first drop the file's pages (`POSIX_FADV_DONTNEED`): a disk read.",
    "- `2 x xxh128sum` is the box's own two-core scaling for this workload. Where it is",
    "  about 1x (as on the shared 2-vCPU VM these numbers came from: memory bandwidth and",
    "  other tenants), no two-thread variant of anything can beat one thread, and",
    "  differences of +-20% between runs are noise; compare rows within one run.",
    "- Buffers: 8 MiB spills out of L2 between the kernel's copy and the hash and is",
    "  clearly slower; 1-2 MiB are equivalent; the default is 2 MiB.",
]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


@pytest.fixture(scope="module")
def big_file() -> Iterator[Path]:
    # Not pytest's tmp dir: concurrent pytest runs prune old basetemps, which could delete
    # the file mid-benchmark. ``.bench/`` is git-ignored and removed by ``make clean``.
    directory = Path(__file__).resolve().parents[2] / ".bench" / "hashing"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "2GiB.bin"
    block = os.urandom(64 * MiB)
    with path.open("wb") as f:
        for i in range(SIZE // len(block)):
            # Vary each block so no two chunks share a digest.
            f.write(i.to_bytes(8, "little") + block[8:])
        f.flush()
        os.fsync(f.fileno())  # clean pages, so FADV_DONTNEED can really drop them
    try:
        yield path
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _set_cache(path: Path, warm: bool) -> None:
    """Warm: read the file once (pages stay cached). Cold: drop this file's pages only."""
    with path.open("rb", buffering=0) as f:
        if warm:
            while f.read(16 * MiB):
                pass
        else:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


Key = tuple[str, str, str, str]  # tool, threads, digests, page cache


def test_bench_hashing(big_file: Path) -> None:
    exe = shutil.which("xxh128sum")
    if exe is None:
        pytest.skip("xxh128sum not installed (apt-get install xxhash; `make bench` does it)")

    def xxh128sum() -> str:
        out = subprocess.run([exe, str(big_file)], capture_output=True, text=True, check=True)
        return "xxh3-128:" + out.stdout.split()[0]

    def ours(threads: int, chunk: int, buf: int = DEFAULT_BUFFER_SIZE) -> Callable[[], str]:
        return lambda: hash_file(big_file, chunk, buf, threads=threads)[0]

    whole = 8 * 1024 * MiB  # larger than the file: no chunk digests, the xxh128sum workload
    chunks = 64 * MiB
    candidates: dict[Key, Callable[[], str]] = {}
    for cache in ("warm", "cold"):
        candidates[("xxh128sum", "1", "whole", cache)] = xxh128sum
        for threads in (1, 2):
            candidates[("datasync", str(threads), "whole", cache)] = ours(threads, whole)
        for threads in (1, 2):
            candidates[("datasync", str(threads), "64 MiB chunks", cache)] = ours(threads, chunks)
    for mib in (1, 8):  # the buffer-size choice, measured rather than assumed
        key = (f"datasync buf {mib} MiB", "2", "64 MiB chunks", "warm")
        candidates[key] = ours(2, chunks, mib * MiB)
    # A tree of four 2 GiB files (hard links to the same warm bytes): how a scan uses
    # both cores, one file per worker, against xxh128sum given the same four files.
    tree = big_file.parent / "tree"
    tree.mkdir(exist_ok=True)
    links = [tree / f"shard{i}.bin" for i in range(4)]
    for link in links:
        if not link.exists():
            os.link(big_file, link)

    def xxh128sum_tree() -> str:
        out = subprocess.run([exe, *map(str, links)], capture_output=True, text=True, check=True)
        (digest,) = {"xxh3-128:" + line.split()[0] for line in out.stdout.splitlines()}
        return digest

    def scan(workers: int) -> Callable[[], str]:
        def run() -> str:
            entries = list(scan_directory(tree, chunk_size=chunks, workers=workers))
            assert len(entries) == 4
            (digest,) = {e.digest for e in entries}
            return digest

        return run

    def xxh128sum_tree_two_processes() -> str:
        # The box's own two-core scaling, as a reference: two xxh128sum at once.
        procs = [
            subprocess.Popen([exe, *map(str, half)], stdout=subprocess.PIPE, text=True)
            for half in (links[:2], links[2:])
        ]
        outs = [p.communicate()[0] for p in procs]
        assert all(p.returncode == 0 for p in procs)
        (digest,) = {"xxh3-128:" + line.split()[0] for out in outs for line in out.splitlines()}
        return digest

    candidates[("xxh128sum", "1", "4 files, whole", "warm")] = xxh128sum_tree
    candidates[("2 x xxh128sum", "2 processes", "4 files, whole", "warm")] = (
        xxh128sum_tree_two_processes
    )
    for workers in (1, 2):
        key = ("datasync scan_directory", f"{workers} workers", "4 files, 64 MiB chunks", "warm")
        candidates[key] = scan(workers)
    # On a shared box, raise our priority (root only) so other work disturbs less;
    # xxh128sum runs as our child and inherits it, so the comparison stays fair.
    try:
        niceness = os.nice(-10)
    except OSError:
        niceness = os.nice(0)
    load_before = os.getloadavg()
    times: dict[Key, list[float]] = {k: [] for k in candidates}
    digests: set[str] = set()
    for _ in range(ROUNDS):
        for key, run in candidates.items():
            _set_cache(big_file, warm=key[3] == "warm")
            t0 = time.perf_counter()
            digests.add(run())
            times[key].append(time.perf_counter() - t0)
    load_after = os.getloadavg()
    assert len(digests) == 1, f"digests disagree: {digests}"

    base = {c: min(times[("xxh128sum", "1", "whole", c)]) for c in ("warm", "cold")}
    tree_base = min(times[("xxh128sum", "1", "4 files, whole", "warm")])
    rows = []

    def reference(key: Key) -> float:
        return tree_base if key[2].startswith("4 files") else base[key[3]]

    for key, ts in times.items():
        tool, nthreads, work, cache = key
        best = min(ts)
        nbytes = 4 * SIZE if work.startswith("4 files") else SIZE
        rows.append(
            f"| {tool} | {nthreads} | {work} | {cache} | {best:.3f} | {statistics.median(ts):.3f} "
            f"| {nbytes / best / 1e9:.2f} | {reference(key) / best:.2f}x |"
        )

    def ratio(key: Key) -> float:
        return reference(key) / min(times[key])

    one = ratio(("datasync", "1", "whole", "warm"))
    two = ratio(("datasync", "2", "whole", "warm"))
    two_chunks = ratio(("datasync", "2", "64 MiB chunks", "warm"))
    two_cold = ratio(("datasync", "2", "64 MiB chunks", "cold"))
    scan_one = ratio(("datasync scan_directory", "1 workers", "4 files, 64 MiB chunks", "warm"))
    scan_two = ratio(("datasync scan_directory", "2 workers", "4 files, 64 MiB chunks", "warm"))
    box_two = ratio(("2 x xxh128sum", "2 processes", "4 files, whole", "warm"))
    verdict = [
        f"- one thread, whole-file digest: {one:.2f}x xxh128sum "
        f"(target >= 0.9x: {'met' if one >= 0.9 else 'MISSED'})",
        f"- two threads, whole-file digest: {two:.2f}x "
        f"(target > 1x: {'met' if two > 1 else 'MISSED'})",
        f"- two threads with 64 MiB chunk digests as registered: {two_chunks:.2f}x "
        f"(target > 1x: {'met' if two_chunks > 1 else 'MISSED'})",
        f"- the same from disk (page cache dropped for this file): {two_cold:.2f}x "
        "(no target; what registering uncached data looks like)",
        f"- a tree of 4 such files, scan_directory with 2 workers: {scan_two:.2f}x "
        f"xxh128sum over the same files (both cores: {'faster' if scan_two > 1 else 'SLOWER'}); "
        f"1 worker: {scan_one:.2f}x",
        f"- two xxh128sum processes on the same 4 files: {box_two:.2f}x one process "
        "(how much a second core helps on this box at all)",
    ]
    text = "\n".join(
        [
            "# Hashing benchmark (datasync hash_file vs xxh128sum)",
            "",
            f"- Command: `{COMMAND}` (also part of `make bench`)",
            f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
            f"- Machine: {os.cpu_count()} CPUs, {_cpu_model()}, Python {platform.python_version()}",
            f"- xxh128sum: `{exe}`; file: 2 GiB random data on disk under `.bench/`; "
            "warm = read once before each run, cold = `POSIX_FADV_DONTNEED` on the file",
            f"- Load average before/after: {load_before[0]:.2f} / {load_after[0]:.2f} "
            "(other work on the box slows every candidate alike; rounds are interleaved)",
            f"- {ROUNDS} interleaved rounds; default buffer {DEFAULT_BUFFER_SIZE // MiB} MiB; "
            f"niceness {niceness} (all candidates alike)",
            "",
            "| tool | threads | digests | page cache | best s | median s | GB/s (best) "
            "| vs xxh128sum (same cache) |",
            "|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            "## Targets",
            "",
            *verdict,
            "",
            *NOTES,
            "",
        ]
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)
    print("\n" + text)
