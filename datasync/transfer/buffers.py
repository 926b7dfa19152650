"""One memory budget per worker process: a pool of reusable transfer buffers.

Every byte a worker moves passes through a buffer taken from this pool, so the process's
transfer memory is bounded by ``budget_bytes`` whatever the number of threads or tasks
(rclone's ``--max-buffer-memory`` idea; research note, lesson 1).

Invariants:

* A buffer is at least ``MIN_BUFFER`` (1 MiB) long, so hashing a full buffer releases the
  GIL (xxhash releases it above 64 KiB) and per-call overhead is amortized.
* ``sum(len(b) for b in outstanding) <= budget_bytes``, except that one request larger than
  the whole budget is granted when nothing else is outstanding (otherwise it could never run).
* ``acquire`` blocks when the budget is exhausted; it is taken *before* any I/O starts, so a
  thread never holds a connection while it waits for memory.
* Buffers are reused: released buffers of the same size are handed out again; idle buffers of
  other sizes are dropped when a request needs their room.
* Buffers are anonymous memory maps (``PoolBuffer``): page-aligned, so a POSIX site can
  write them and read into them with direct I/O, and zero-filled lazily by the kernel as
  they are first written (a new 64 MiB ``bytearray`` is zeroed while holding the GIL).
"""

from __future__ import annotations

import mmap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["MIN_BUFFER", "BufferPool", "BufferTimeout", "PoolBuffer"]

MIN_BUFFER = 1024 * 1024
PoolBuffer = mmap.mmap  # what ``acquire`` hands out


class BufferTimeout(TimeoutError):
    """``acquire(timeout=...)`` gave up: the budget stayed exhausted."""


def _size_class(size: int) -> int:
    # Round up to a whole MiB so chunk sizes that differ by a few bytes share buffers.
    size = max(size, MIN_BUFFER)
    return -(-size // MIN_BUFFER) * MIN_BUFFER


class BufferPool:
    """A thread-safe pool of ``PoolBuffer`` buffers under one byte budget."""

    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes < MIN_BUFFER:
            raise ValueError(f"buffer budget must be at least {MIN_BUFFER} bytes")
        self.budget_bytes = budget_bytes
        self._cond = threading.Condition()
        self._free: dict[int, list[PoolBuffer]] = {}
        self._free_bytes = 0
        self._in_use_bytes = 0
        self._allocated = 0  # buffers ever allocated: lets tests see reuse

    @property
    def in_use_bytes(self) -> int:
        with self._cond:
            return self._in_use_bytes

    @property
    def allocated(self) -> int:
        with self._cond:
            return self._allocated

    def acquire(self, size: int, *, timeout: float | None = None) -> PoolBuffer:
        """Return a buffer of ``len >= size`` (>= 1 MiB), blocking while the budget is spent."""
        cls = _size_class(size)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._fits(cls):
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise BufferTimeout(
                        f"no {cls} byte buffer free within {timeout}s "
                        f"({self._in_use_bytes} of {self.budget_bytes} bytes in use)"
                    )
                self._cond.wait(remaining)
            free = self._free.get(cls)
            if free:
                buf = free.pop()
                self._free_bytes -= cls
            else:
                self._make_room(cls)
                buf = mmap.mmap(-1, cls)
                self._allocated += 1
            self._in_use_bytes += cls
            return buf

    def release(self, buf: PoolBuffer) -> None:
        cls = len(buf)
        with self._cond:
            self._in_use_bytes -= cls
            if self._in_use_bytes + self._free_bytes + cls <= self.budget_bytes:
                self._free.setdefault(cls, []).append(buf)
                self._free_bytes += cls
            self._cond.notify_all()

    @contextmanager
    def lease(self, size: int, *, timeout: float | None = None) -> Iterator[PoolBuffer]:
        buf = self.acquire(size, timeout=timeout)
        try:
            yield buf
        finally:
            self.release(buf)

    def _fits(self, cls: int) -> bool:
        if self._in_use_bytes == 0:
            return True  # an oversized request runs alone rather than never
        return self._in_use_bytes + cls <= self.budget_bytes

    def _make_room(self, cls: int) -> None:
        # Drop idle buffers of other sizes until a new one fits next to what is in use.
        for size in sorted(self._free, reverse=True):
            bufs = self._free[size]
            while bufs and self._in_use_bytes + self._free_bytes + cls > self.budget_bytes:
                bufs.pop()
                self._free_bytes -= size
        self._free = {k: v for k, v in self._free.items() if v}
