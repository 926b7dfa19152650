"""Run one datasync replication of a bench row without its peers: for profiling and A/B.

    python scripts/drive_replication.py small 5000 /tmp/run    # row (b) with 5,000 files
    python scripts/drive_replication.py shards 4 /tmp/run      # row (a) with 4 shards
    python scripts/drive_replication.py incremental 20000 /tmp/run  # row (c): v2 timed
    py-spy record -f raw --subprocesses -r 40 -o prof.txt -- python scripts/drive_replication.py ...

Builds the row's tree (tests/bench/test_bench_replication.py), registers it, starts the
bench's worker processes (warmed up), and times ``replicate`` until READY. ``incremental``
replicates the small-file tree first, then changes 1% of its files as row (c) does and
times the second version.
"""

from __future__ import annotations

import random
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    from datasync.bootstrap import bootstrap
    from tests.bench.test_bench_replication import SMALL, _ds_replicate, _fill, _workers
    from tests.fixtures.replication import MIB, posix_site, settings_for

    kind, n, base = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    shutil.rmtree(base, ignore_errors=True)
    src = posix_site("pipeline", base / "src")
    dst = posix_site("lustre", base / "dst")
    assert src.root is not None
    tree = src.root / "run"
    names = {f"cam{i % 8}/{i // 8:06d}.jpg": SMALL for i in range(n)}
    if kind in ("small", "incremental"):
        _fill(tree, names, seed=2)
    else:
        _fill(tree, {f"shards/shard-{i:02d}.bin": 256 * MIB for i in range(n)}, seed=1)
    settings = settings_for(base / "home", f"sqlite:///{base / 'ds.db'}", [src, dst], 64 * MIB)
    app = bootstrap(settings)
    try:
        v = app.service.register_directory("bench/x", tree, chunk_size=64 * MIB)
        with _workers(app, settings, src.root / "warm"):
            seconds, moved = _ds_replicate(app, settings, v.version_id, "bench/x", "lustre")
            if kind == "incremental":
                changed = random.Random(3).sample(sorted(names), n // 100)
                _fill(tree, {p: SMALL for p in changed}, seed=4)
                v = app.service.register_directory("bench/x", tree, chunk_size=64 * MIB)
                seconds, moved = _ds_replicate(app, settings, v.version_id, "bench/x", "lustre")
    finally:
        app.close()
    print(f"{kind} {n}: {seconds:.2f} s, {moved} bytes, {n / seconds:.0f} files/s")


if __name__ == "__main__":  # spawned workers re-import this file: keep the guard
    main()
