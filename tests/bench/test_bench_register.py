"""Registering an unchanged tree (stat cache warm) vs listing it with ``rclone lsf -R``.

A tree of ``BENCH_REGISTER_FILES`` (20,000) small files in 100 directories is registered
once (hashing every byte, filling the stat cache), then registered again unchanged: the
second ``datasync register`` (the console script, process start and imports included, as a
user runs it) stats every file, finds its digest in the stat cache and registers the same
version. The peer lists the same tree in the same run: ``rclone lsf -R`` (process start to
exit), which reads every directory and stats every file but hashes nothing. Median of 3
runs each, interleaved (register, rclone, register, ...) so that load on a shared machine
falls on both. Where the time goes is measured alongside: the interpreter alone
(``python -c pass``) and the interpreter plus every module ``datasync register`` imports
before it does anything (``_IMPORTS``); the rest is the registration itself. Results go
to ``docs/bench-results/register.md``.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.bench.targets import Target, record

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "docs" / "bench-results" / "register.md"
N_FILES = int(os.environ.get("BENCH_REGISTER_FILES", "20000"))
RUNS = 3
TARGET = 1.0
# What the console script has loaded when the command starts (``datasync.cli.main``).
_IMPORTS = "import datasync.cli.commands, datasync.observe.exposition, datasync.observe.logs"


def _timed(argv: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - t0


def test_register_unchanged_tree_vs_rclone_lsf(tmp_path: Path) -> None:
    rclone = shutil.which("rclone")
    if rclone is None:
        pytest.skip("rclone not installed (make bench installs it)")
    datasync = str(Path(sys.executable).with_name("datasync"))
    tree = tmp_path / "tree"
    for i in range(N_FILES):
        path = tree / f"d{i % 100:03d}" / f"f{i:06d}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(i.to_bytes(8, "little") * 128)  # 1 KiB, distinct
    env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}
    env["DATASYNC_HOME"] = str(tmp_path / "home")
    env.pop("DATASYNC_DATABASE_URL", None)
    register = [datasync, "register", "bench/unchanged", str(tree)]
    first = _timed(register, env)  # hashes everything, fills the stat cache
    runs: dict[str, list[float]] = {"again": [], "lsf": [], "python": [], "imports": []}
    for _ in range(RUNS):
        runs["again"].append(_timed(register, env))
        runs["lsf"].append(_timed([rclone, "lsf", "-R", str(tree)], env))
        runs["python"].append(_timed([sys.executable, "-c", "pass"], env))
        runs["imports"].append(_timed([sys.executable, "-c", _IMPORTS], env))
    ds, peer, python, imports = (statistics.median(runs[k]) for k in runs)
    verdict = "meets" if ds <= TARGET * peer else "misses"
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(
        "\n".join(
            [
                "# Registering an unchanged tree",
                "",
                f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on this "
                f"machine ({os.cpu_count()} cores, shared; page cache warm). {N_FILES:,} files "
                "of 1 KiB in 100 directories, SQLite database. `datasync register` of the "
                "unchanged tree (stat cache warm; the console script, imports included) vs "
                f"`rclone lsf -R` of the same tree, median of {RUNS} runs each, interleaved "
                f"in one run. Target: <= {TARGET:.1f}x rclone.",
                "",
                "| Step | Seconds | vs `rclone lsf -R` | Target |",
                "|---|---|---|---|",
                f"| first `datasync register` (hashes every file) | {first:.2f} "
                f"| {first / peer:.2f}x | |",
                f"| `datasync register`, unchanged | {ds:.2f} | {ds / peer:.2f}x | {verdict} |",
                f"| `rclone lsf -R` | {peer:.2f} | 1.00x | |",
                f"| of the unchanged register: the interpreter (`python -c pass`) | {python:.2f} "
                f"| {python / peer:.2f}x | |",
                f"| of it: interpreter + the command's imports | {imports:.2f} "
                f"| {imports / peer:.2f}x | |",
                f"| of it: the registration (the rest) | {ds - imports:.2f} "
                f"| {(ds - imports) / peer:.2f}x | |",
                "",
                f"Reproduce: `BENCH_REGISTER_FILES={N_FILES} .venv/bin/pytest -q -s -p "
                "no:cacheprovider tests/bench/test_bench_register.py`",
            ]
        )
        + "\n",
        encoding="utf-8",
    )
    record(
        "register",
        [
            Target(
                f"Registration of an unchanged {N_FILES:,}-file tree (stat cache)",
                f"{ds:.2f} s",
                f"rclone lsf -R: {peer:.2f} s",
                f"{ds / peer:.2f}x time",
                f"<= {TARGET:.1f}x rclone lsf -R time",
                ds <= TARGET * peer,
            )
        ],
        ".venv/bin/pytest -q -s -p no:cacheprovider tests/bench/test_bench_register.py",
    )
    print(
        f"\nregister unchanged {ds:.2f}s vs rclone lsf -R {peer:.2f}s ({ds / peer:.2f}x); "
        f"python {python:.2f}s, python + imports {imports:.2f}s"
    )
