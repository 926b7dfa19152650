"""Named crash points for the kill tests: ``DATASYNC_FAILPOINT=name[:N][,name2[:M]]``.

When the variable names a point, the N-th time (default 1st) a process passes it the process
SIGKILLs itself: no ``finally``, no atexit, no flush, exactly like an OOM kill or a node
loss. Unset (production), ``failpoint`` costs one dict lookup. The variable is read on first
use, not at import.

Points: ``after_put_part`` (a chunk written, not yet in the chunk map), ``after_mark_part``,
``before_commit``, ``after_commit`` (object committed, replica not yet recorded),
``mid_publish`` (staging half built), ``before_rename`` (staging complete, not yet visible),
``after_publish`` (view visible, placement not yet READY), ``before_complete`` (tasks
finished, their completion not yet sent: the worker's group commit).
"""

from __future__ import annotations

import os
import signal
import threading

__all__ = ["failpoint", "reset_failpoints"]

_lock = threading.Lock()
_armed: dict[str, int] | None = None
_hits: dict[str, int] = {}


def _parse(spec: str) -> dict[str, int]:
    armed: dict[str, int] = {}
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        name, _, count = item.partition(":")
        armed[name] = int(count) if count else 1
    return armed


def failpoint(name: str) -> None:
    """SIGKILL this process if ``name`` is armed and this is its N-th hit."""
    global _armed
    if _armed is None:
        with _lock:
            if _armed is None:
                _armed = _parse(os.environ.get("DATASYNC_FAILPOINT", ""))
    if not _armed or name not in _armed:
        return
    with _lock:
        _hits[name] = _hits.get(name, 0) + 1
        hit = _hits[name] == _armed[name]
    if hit:
        os.kill(os.getpid(), signal.SIGKILL)


def reset_failpoints() -> None:
    """Re-read the environment on next use (tests that change it in-process)."""
    global _armed
    with _lock:
        _armed = None
        _hits.clear()
