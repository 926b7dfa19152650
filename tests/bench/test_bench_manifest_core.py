"""Manifest-core throughput at 1M entries: canonical encode + sha256 id, producer parsing.

Run with ``.venv/bin/pytest -q -s -p no:cacheprovider tests/bench/test_bench_manifest_core.py``.
Writes ``docs/bench-results/manifest-core.md``. Aims (issue 2 brief): 1M entries encoded
and hashed in a few seconds; 1M producer lines parsed and validated well under 30 s.
These are the pure-Python parts of registering a 1M-file version; the store's own
numbers are in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import io
import json
import os
import platform
import random
import time
from pathlib import Path

from datasync.manifest.canonical import VersionIdBuilder
from datasync.manifest.producer import read_producer_manifest
from datasync.models import FileEntry, ManifestHeader

N = 1_000_000
RESULTS = Path(__file__).resolve().parents[2] / "docs" / "bench-results" / "manifest-core.md"
COMMAND = ".venv/bin/pytest -q -s -p no:cacheprovider tests/bench/test_bench_manifest_core.py"


def test_bench_manifest_core() -> None:
    rnd = random.Random(7)
    paths = sorted(
        f"drive/cam{i % 8}/seq{i // 1000:05}/frame_{i:07}.jpg" for i in range(N)
    )  # ASCII: str order is byte order
    entries = [
        FileEntry(p, rnd.randrange(20_000, 200_000), f"xxh3-128:{rnd.getrandbits(128):032x}")
        for p in paths
    ]
    load_before = os.getloadavg()

    t0 = time.perf_counter()
    builder = VersionIdBuilder(ManifestHeader())
    for e in entries:
        builder.add(e)
    vid = builder.hexdigest()
    encode_s = time.perf_counter() - t0

    shuffled = list(entries)
    rnd.shuffle(shuffled)
    buf = io.BytesIO()
    buf.write(b'{"format":"datasync-producer/1"}\n')
    for e in shuffled:
        buf.write(json.dumps({"path": e.path, "size": e.size, "digest": e.digest}).encode() + b"\n")
    size_mb = buf.tell() / 1e6
    buf.seek(0)
    t0 = time.perf_counter()
    _, it = read_producer_manifest(buf)
    parsed = sum(1 for _ in it)
    parse_s = time.perf_counter() - t0
    load_after = os.getloadavg()

    assert builder.files == parsed == N and len(vid) == 64
    text = "\n".join(
        [
            "# Manifest core at 1M entries",
            "",
            f"- Command: `{COMMAND}`",
            f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
            f"- Machine: {os.cpu_count()} CPUs, Python {platform.python_version()}; "
            f"load average before/after {load_before[0]:.2f} / {load_after[0]:.2f}",
            "",
            "| step | entries | wall s | entries/s | aim |",
            "|---|---|---|---|---|",
            f"| canonical encode + sha256 version id (`VersionIdBuilder.add`) | {N:,} "
            f"| {encode_s:.2f} | {N / encode_s:,.0f} | a few seconds |",
            f"| producer JSON Lines parse + validate ({size_mb:.0f} MB, shuffled order) | {N:,} "
            f"| {parse_s:.2f} | {N / parse_s:,.0f} | well under 30 s |",
            "",
        ]
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)
    print("\n" + text)
