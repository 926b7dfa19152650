"""Write-interval tracing for the concurrency tests: ``DATASYNC_TRACE_WRITES=/path/file``.

When set, every destination write (a blob commit, a part, a chunked commit, a
``put_small`` batch and each object in it) appends two lines, ``start`` and ``end``, with
the target, kind, pid, thread and a monotonic timestamp (CLOCK_MONOTONIC is one clock for
every process on the host). Each line is one ``O_APPEND`` write, so lines from many
processes never interleave. The kill tests read the file to prove two workers never wrote
the same destination at the same time. Unset (the default) it costs one attribute check.
Read on first use, never at import.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["read_trace", "reset_tracing", "traced_write"]

_state: dict[str, int | None] = {}
_lock = threading.Lock()


def _fd() -> int | None:
    if "fd" not in _state:
        with _lock:
            if "fd" not in _state:
                path = os.environ.get("DATASYNC_TRACE_WRITES")
                _state["fd"] = (
                    os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if path else None
                )
    return _state["fd"]


def _emit(fd: int, event: str, target: str, kind: str) -> None:
    fields = (event, target, kind, os.getpid(), threading.get_ident(), time.monotonic_ns())
    os.write(fd, ("\t".join(map(str, fields)) + "\n").encode())


@contextmanager
def traced_write(target: str, kind: str) -> Iterator[None]:
    fd = _fd()
    if fd is None:
        yield
        return
    _emit(fd, "start", target, kind)
    try:
        yield
    finally:
        _emit(fd, "end", target, kind)


def reset_tracing() -> None:
    """Re-read the environment on next use (a forked test worker sets its own)."""
    with _lock:
        _state.clear()


def read_trace(path: str) -> list[tuple[str, str, str, int, int, int]]:
    """Parse a trace file: ``(event, target, kind, pid, thread, t_ns)`` per line."""
    out: list[tuple[str, str, str, int, int, int]] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) == 6:
                ev, target, kind, pid, tid, t = parts
                out.append((ev, target, kind, int(pid), int(tid), int(t)))
    return out
