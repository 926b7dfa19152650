"""The stat cache: re-scanning a mostly unchanged tree re-hashes only what changed."""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import datasync.manifest.scan as scan_module
from datasync.manifest.hashing import hash_fd as real_hash_fd
from datasync.manifest.scan import scan_directory
from datasync.manifest.statcache import StatCache
from datasync.models import FileEntry

MiB = 1024 * 1024
D0 = "xxh3-128:" + "0" * 32


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts real hash calls made by the scanner (the real function still runs)."""
    calls: list[int] = []
    real: Callable[..., Any] = real_hash_fd

    def counting(fd: int, *args: Any, **kwargs: Any) -> Any:
        calls.append(fd)
        return real(fd, *args, **kwargs)

    monkeypatch.setattr(scan_module, "hash_fd", counting)
    return calls


def scan(root: Path, cache: StatCache) -> list[FileEntry]:
    return list(scan_directory(root, chunk_size=MiB, workers=2, stat_cache=cache))


def test_rescan_hashes_only_changed_files(tmp_path: Path, hashed: list[int]) -> None:
    root = tmp_path / "tree"
    root.mkdir()
    for i in range(20):
        (root / f"f{i:02}").write_bytes(os.urandom(1000 + i))
    (root / "big").write_bytes(os.urandom(2 * MiB + 1))
    # racy_window_ns=0: everything written before the scan began may be cached.
    with StatCache(tmp_path / "cache.sqlite", racy_window_ns=0) as cache:
        first = scan(root, cache)
        assert len(hashed) == 21
        hashed.clear()
        assert scan(root, cache) == first
        assert hashed == []

        (root / "f03").write_bytes(b"new content")  # content + mtime change
        st = os.stat(root / "f04")
        (root / "f04").write_bytes(os.urandom(1004))  # same size, mtime restored below
        os.utime(root / "f04", ns=(st.st_atime_ns, st.st_mtime_ns))  # ctime still moves
        (root / "f05").unlink()
        (root / "f05").write_bytes(b"replaced")  # new inode
        (root / "new").write_bytes(b"brand new")
        time.sleep(0.01)  # let ctime of the writes precede the next scan's start
        third = scan(root, cache)
    assert len(hashed) == 4
    before = {e.path: e for e in first}
    after = {e.path: e for e in third}
    assert {p for p in before if before[p] != after[p]} == {"f03", "f04", "f05"}
    assert set(after) - set(before) == {"new"}


def test_a_different_chunk_size_misses(tmp_path: Path, hashed: list[int]) -> None:
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "f").write_bytes(b"x")
    with StatCache(tmp_path / "c.sqlite", racy_window_ns=0) as cache:
        list(scan_directory(tmp_path / "t", chunk_size=MiB, workers=1, stat_cache=cache))
        list(scan_directory(tmp_path / "t", chunk_size=2 * MiB, workers=1, stat_cache=cache))
        list(scan_directory(tmp_path / "t", chunk_size=2 * MiB, workers=1, stat_cache=cache))
    assert len(hashed) == 2


def test_freshly_modified_files_are_not_cached(tmp_path: Path, hashed: list[int]) -> None:
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "f").write_bytes(b"just written")
    with StatCache(tmp_path / "c.sqlite") as cache:  # default 2 s racy window
        scan(tmp_path / "t", cache)
        scan(tmp_path / "t", cache)
        assert len(cache) == 0
    assert len(hashed) == 2


def test_entries_persist_and_batches_commit(tmp_path: Path) -> None:
    db = tmp_path / "c.sqlite"
    (tmp_path / "f").write_bytes(b"abc")
    st = os.stat(tmp_path / "f")
    later = time.time_ns() + 10**9
    cache = StatCache(db, batch_size=2, racy_window_ns=0)
    assert cache.store("/x/1", st, MiB, D0, (), hashed_at_ns=later)
    other = sqlite3.connect(db)

    def count() -> int:
        return int(other.execute("SELECT count(*) FROM stat_cache").fetchone()[0])

    assert count() == 0  # pending until the batch fills
    assert cache.lookup("/x/1", st, MiB) == (D0, ())  # but visible to its own lookups
    cache.store("/x/2", st, MiB, D0, (D0, D0), hashed_at_ns=later)
    assert count() == 2
    cache.store("/x/3", st, MiB, D0, (), hashed_at_ns=later)
    cache.close()
    assert count() == 3
    assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    other.close()
    with StatCache(db) as again:
        assert again.lookup("/x/2", st, MiB) == (D0, (D0, D0))
        assert again.lookup("/x/2", st, 2 * MiB) is None
        assert again.lookup("/x/9", st, MiB) is None
        (tmp_path / "f").write_bytes(b"abcd")
        assert again.lookup("/x/2", os.stat(tmp_path / "f"), MiB) is None


def test_store_refuses_racy_files(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"abc")
    st = os.stat(tmp_path / "f")
    with StatCache(tmp_path / "c.sqlite", racy_window_ns=2 * 10**9) as cache:
        assert not cache.store("/f", st, MiB, D0, (), hashed_at_ns=st.st_mtime_ns + 10**9)
        assert cache.store("/f", st, MiB, D0, (), hashed_at_ns=st.st_ctime_ns + 3 * 10**9)
