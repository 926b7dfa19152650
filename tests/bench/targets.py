"""Issue 9's targets as one table: each benchmark records its rows here, in
``docs/bench-results/<section>.targets.json``; ``scripts/collect_bench.py`` prints them as
one table (datasync, the peer, the ratio, the target, met or missed) and puts it at the top
of ``docs/benchmarks.md``. A run that selects some tests (``-k``) replaces only its rows.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["Target", "record", "write_section"]

RESULTS = Path(__file__).resolve().parents[2] / "docs" / "bench-results"


@dataclass(frozen=True, slots=True)
class Target:
    workload: str
    datasync: str  # the measured value, with its unit
    peer: str  # the peer and its value, same unit
    ratio: str  # datasync against the peer, as the target states it ("0.53x files/s")
    target: str  # the target, in the same terms
    met: bool | None  # None: no peer could run this workload, so no ratio to judge


def record(section: str, rows: Sequence[Target], command: str) -> None:
    """Write (or update) ``section``'s rows; rows of other workloads are kept."""
    path = RESULTS / f"{section}.targets.json"
    kept: list[dict[str, object]] = []
    if path.exists():
        names = {r.workload for r in rows}
        kept = [r for r in json.loads(path.read_text())["rows"] if r["workload"] not in names]
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    new = [{**asdict(r), "measured": when} for r in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps({"command": command, "rows": kept + new}, indent=1) + "\n", encoding="utf-8"
    )


def write_section(
    out: Path,
    title: str,
    machine: str,
    setup: str,
    header: Sequence[str],
    rows: Sequence[str],
    reproduce: str | None = None,
) -> None:
    """A bench's result file: title, when and on what (``machine``: after the core count),
    ``setup``, its table (``rows`` are ready ``| ... |`` lines), and the command."""
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [
        f"# {title}",
        "",
        f"Measured {when} on this machine ({os.cpu_count()} cores{machine}). {setup}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *rows,
    ]
    if reproduce is not None:
        lines += ["", f"Reproduce: `{reproduce}`"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
