"""A local cache of digests keyed by a file's stat identity, so unchanged files aren't re-hashed.

One SQLite file (WAL, shared safely by several processes on one host), one row per
absolute path: ``(dev, ino, size, mtime_ns, ctime_ns, chunk_size) -> digest, chunks``.
A lookup hits only if all six match, so any write (mtime), metadata-preserving rewrite
(``touch -r`` still moves ctime), replacement (inode) or chunk-size change misses.

Racy files: a file modified in the same timestamp tick as it was hashed would keep its
stat identity with new content (git's "racy clean" problem). ``store`` therefore skips
files whose mtime or ctime is within ``racy_window_ns`` of the moment hashing started;
they are simply hashed again next time. The default (2 s) also absorbs coarse
timestamps and small clock skew on network filesystems.

Lookups are batched too (``lookup_many``: one ``IN`` query for a run of files): one
query per file cost an unchanged 20,000-file registration a quarter of its scan.

Writes are batched (``batch_size`` rows per transaction); ``flush``/``close`` commit the
rest. A lost batch only costs re-hashing. The cache is an optimisation, never a source
of truth: a corrupt or unreadable cache file is reported, not silently trusted.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Final

__all__ = ["Hit", "StatCache"]

Hit = tuple[str, tuple[str, ...]]  # (digest, chunk digests)

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS stat_cache (
    path TEXT PRIMARY KEY,
    dev INTEGER NOT NULL,
    ino INTEGER NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL,
    chunk_size INTEGER NOT NULL,
    digest TEXT NOT NULL,
    chunks TEXT NOT NULL
) WITHOUT ROWID
"""

# SQLite integers are signed 64-bit; st_dev/st_ino are unsigned and may exceed that.
_I64: Final = 1 << 63
# Paths per ``IN (...)`` query: under SQLite's oldest limit on bound parameters (999).
_LOOKUP_ROWS: Final = 500
_Row = tuple[int, int, int, int, int, int, str, str]  # the key, chunk_size, digest, chunks


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= _I64 else v


def _hit(row: _Row | None, key: tuple[int, int, int, int, int], chunk_size: int) -> Hit | None:
    """A hit only if all five fields of the stat identity and the chunk size match."""
    if row is None or row[:5] != key or row[5] != chunk_size:
        return None
    return row[6], tuple(row[7].split()) if row[7] else ()


class StatCache:
    """Digest cache in an SQLite file. Thread-safe; one connection guarded by a lock."""

    def __init__(
        self,
        path: Path,
        *,
        batch_size: int = 2000,
        racy_window_ns: int = 2_000_000_000,
    ) -> None:
        self.path = Path(path)
        self.batch_size = batch_size
        self.racy_window_ns = racy_window_ns
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(
            str(self.path), timeout=30.0, isolation_level=None, check_same_thread=False
        )
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute(_SCHEMA)
        self._pending: dict[str, _Row] = {}

    @staticmethod
    def _key(st: os.stat_result) -> tuple[int, int, int, int, int]:
        return (_signed(st.st_dev), _signed(st.st_ino), st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def lookup(
        self, path: str | os.PathLike[str], st: os.stat_result, chunk_size: int
    ) -> Hit | None:
        """``(digest, chunks)`` if ``path`` was hashed with exactly this stat identity."""
        return self.lookup_many([(os.fspath(path), st)], chunk_size)[0]

    def lookup_many(
        self, files: Sequence[tuple[str, os.stat_result]], chunk_size: int
    ) -> list[Hit | None]:
        """``lookup`` for each ``(path, stat)``, in order, with one query per 500 paths."""
        rows: dict[str, _Row] = {}
        with self._lock:
            missing = []
            for path, _ in files:
                row = self._pending.get(path)
                if row is None:
                    missing.append(path)
                else:
                    rows[path] = row
            for start in range(0, len(missing), _LOOKUP_ROWS):
                part = missing[start : start + _LOOKUP_ROWS]
                for path, dev, ino, size, mtime, ctime, chunk, digest, chunks in self._conn.execute(
                    "SELECT path, dev, ino, size, mtime_ns, ctime_ns, chunk_size, digest, chunks "
                    f"FROM stat_cache WHERE path IN ({','.join('?' * len(part))})",
                    part,
                ):
                    rows[path] = (dev, ino, size, mtime, ctime, chunk, digest, chunks)
        return [_hit(rows.get(path), self._key(st), chunk_size) for path, st in files]

    def store(
        self,
        path: str | os.PathLike[str],
        st: os.stat_result,
        chunk_size: int,
        digest: str,
        chunks: tuple[str, ...],
        *,
        hashed_at_ns: int | None = None,
    ) -> bool:
        """Remember a digest. ``st`` must be the stat taken before hashing and
        ``hashed_at_ns`` (``time.time_ns()``) when hashing began; returns False when the
        file is too recently modified to be trusted later (see module docstring)."""
        started = time.time_ns() if hashed_at_ns is None else hashed_at_ns
        if max(st.st_mtime_ns, st.st_ctime_ns) >= started - self.racy_window_ns:
            return False
        with self._lock:
            self._pending[os.fspath(path)] = (
                *self._key(st),
                chunk_size,
                digest,
                " ".join(chunks),
            )
            if len(self._pending) >= self.batch_size:
                self._flush_locked()
        return True

    def _flush_locked(self) -> None:
        if not self._pending:
            return
        rows = [(k, *v) for k, v in self._pending.items()]
        with self._conn:  # one transaction per batch
            self._conn.execute("BEGIN IMMEDIATE")
            self._conn.executemany(
                "INSERT OR REPLACE INTO stat_cache "
                "(path, dev, ino, size, mtime_ns, ctime_ns, chunk_size, digest, chunks) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
        self._pending.clear()

    def flush(self) -> None:
        """Commit pending rows."""
        with self._lock:
            self._flush_locked()

    def __len__(self) -> int:
        with self._lock:
            self._flush_locked()
            (count,) = self._conn.execute("SELECT count(*) FROM stat_cache").fetchone()
        return int(count)

    def close(self) -> None:
        with self._lock:
            try:
                self._flush_locked()
            finally:
                self._conn.close()

    def __enter__(self) -> StatCache:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
