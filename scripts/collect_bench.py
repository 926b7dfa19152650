"""Collect the per-benchmark result tables (docs/bench-results/*.md) into docs/benchmarks.md.

Each benchmark writes its own table with the command that reproduces it; this script only
concatenates them under a fixed preamble, so the document always shows the last real run.
"""

from __future__ import annotations

import json
import platform
import re
import sys
from pathlib import Path

ORDER = [
    "hashing",
    "scale",
    "cloud-download",
    "cloud-replication",
    "fsspec",
    "replication",
    "shards-profile",
    "wakeup",
    "queue",
    "register",
    "multihost",
    "scheduler",
]

PREAMBLE = """# Benchmarks

All figures come from `make bench` (pytest `tests/bench/`) on the project's reference
machine: 2 cores, 24 GiB RAM, local disk, emulators on loopback. Peers (xxh128sum, rclone, cp)
run in the same benchmark, on the same data, in the same run; ratios compare the two.
Targets come from the issues; a missed target is reported as missed, with what limits it.
Each section below was written by the benchmark itself and names the command that reproduces it.
"""


# Issue 9's rows, one table: the benches that record them (``tests/bench/targets.py``).
TARGET_SECTIONS = {
    "replication": "test_bench_replication.py",
    "cloud-replication": "test_bench_cloud_replication.py",
    "queue": "test_bench_queue.py",
    "wakeup": "test_bench_wakeup.py",
    "register": "test_bench_register.py",
}


def targets_table(results: Path) -> str:
    """Every recorded target row: datasync, the peer, the ratio, the target, met or missed."""
    lines = [
        "## Targets (issue 9), one table",
        "",
        "Each row was written by its benchmark in its last run (`docs/bench-results/"
        "*.targets.json`); the sections below have the details, profiles and peers' commands.",
        "",
        "| Workload | datasync | Peer | Ratio | Target | Met | Measured |",
        "|---|---|---|---|---|---|---|",
    ]
    for section, test in TARGET_SECTIONS.items():
        path = results / f"{section}.targets.json"
        command = f"`.venv/bin/pytest -q -s -p no:cacheprovider tests/bench/{test}`"
        if not path.exists():
            lines.append(f"| {section}: no run recorded yet ({command}) | | | | | | |")
            continue
        for r in json.loads(path.read_text(encoding="utf-8"))["rows"]:
            met = {True: "met", False: "**missed**", None: "no peer"}[r["met"]]
            cells = [r["workload"], r["datasync"], r["peer"], r["ratio"], r["target"], met]
            lines.append("| " + " | ".join([*cells, r["measured"]]) + " |")
    return "\n".join(lines) + "\n"


def main(root: Path) -> int:
    results = root / "docs" / "bench-results"
    table = targets_table(results)
    print(table)
    parts = [
        PREAMBLE,
        f"Python {platform.python_version()} on {platform.machine()}.\n",
        table,
    ]
    names = sorted(p.stem for p in results.glob("*.md"))
    for name in sorted(names, key=lambda n: (ORDER.index(n) if n in ORDER else 99, n)):
        text = (results / f"{name}.md").read_text(encoding="utf-8").strip()
        # Each result file is a document of its own; nest its headings one level down.
        text = re.sub(r"^(#+) ", r"#\1 ", text, flags=re.MULTILINE)
        parts.append(text + "\n")
    (root / "docs" / "benchmarks.md").write_text("\n".join(parts), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(__file__).resolve().parent.parent))
