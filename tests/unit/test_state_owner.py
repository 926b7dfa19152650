"""Only the state owner (``datasync/transfer/state/``) writes placements, tasks, replicas
and the scheduling tables (stage requests, pins, link statistics, placement history).

The scan reads every module of the package and flags two forms of a write outside the
owner: SQL text (``UPDATE tasks``, ``INSERT INTO replicas``, ``DELETE FROM placements``)
and SQLAlchemy statements built on the models (``sa.update(Task)``, ``insert(Replica)``,
``delete(Placement)``, including dialect inserts such as ``postgresql.insert(Replica)``).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import datasync

PACKAGE = Path(datasync.__file__).parent
OWNER = PACKAGE / "transfer" / "state"
TABLES = (
    "placements",
    "tasks",
    "replicas",
    "stage_requests",
    "pins",
    "link_stats",
    "placement_history",
    "blob_moves",
    "blob_waits",
    "site_pauses",
)
MODELS = (
    "Placement",
    "Task",
    "Replica",
    "StageRequest",
    "Pin",
    "LinkStat",
    "PlacementHistory",
    "BlobMove",
    "BlobWait",
    "SitePause",
)
_SQL = re.compile(
    r"\b(UPDATE|INSERT\s+INTO|DELETE\s+FROM)\s+(" + "|".join(TABLES) + r")\b", re.IGNORECASE
)


def _writes(path: Path) -> list[str]:
    found = []
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            found += [
                f"{path}:{node.lineno}: SQL {m.group(0)!r}" for m in _SQL.finditer(node.value)
            ]
        if isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            target = node.args[0]
            writes = name in ("update", "insert", "delete")
            if writes and isinstance(target, ast.Name) and target.id in MODELS:
                found.append(f"{path}:{node.lineno}: {name}({target.id})")
    return found


def test_no_module_outside_the_state_owner_writes_the_state_tables() -> None:
    offenders = [
        hit
        for path in sorted(PACKAGE.rglob("*.py"))
        if OWNER not in path.parents and "migrations" not in path.parts
        for hit in _writes(path)
    ]
    assert offenders == []


def test_the_scan_sees_writes_in_the_owner() -> None:
    # The owner's own modules are full of them: proof the scan can fail.
    hits = [hit for path in sorted(OWNER.rglob("*.py")) for hit in _writes(path)]
    assert any("update(Task)" in h for h in hits)
    assert any("SQL 'UPDATE tasks'" in h for h in hits)
    assert any("insert(Replica)" in h for h in hits)
    assert any("update(Placement)" in h for h in hits)
