"""The stat cache: re-scanning a mostly unchanged tree re-hashes only what changed."""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

import datasync.manifest.scan as scan_module
from datasync.bootstrap import bootstrap
from datasync.config import Settings
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


_IDENTITY = ("st_dev", "st_ino", "st_size", "st_mtime_ns", "st_ctime_ns")


def _changed(st: os.stat_result, field: str) -> os.stat_result:
    """``st`` with one field of the identity moved by one (a stat no real file gave)."""
    seq = list(st[:10])
    extra = {f: getattr(st, f) for f in ("st_atime", "st_mtime", "st_ctime")}
    extra |= {f: getattr(st, f) for f in ("st_atime_ns", "st_mtime_ns", "st_ctime_ns")}
    index = {"st_dev": 2, "st_ino": 1, "st_size": 6}
    if field in index:
        seq[index[field]] += 1
    else:
        extra[field] += 1
    return os.stat_result(seq, extra)


@pytest.mark.parametrize("field", _IDENTITY)
def test_a_hit_needs_every_field_of_the_stat_identity(tmp_path: Path, field: str) -> None:
    (tmp_path / "f").write_bytes(b"abc")
    st = os.stat(tmp_path / "f")
    later = time.time_ns() + 10**9
    with StatCache(tmp_path / "c.sqlite", batch_size=1, racy_window_ns=0) as cache:
        cache.store("/f", st, MiB, D0, (), hashed_at_ns=later)
        assert cache.lookup_many([("/f", st)], MiB) == [(D0, ())]
        assert getattr(_changed(st, field), field) != getattr(st, field)
        assert cache.lookup_many([("/f", _changed(st, field))], MiB) == [None]


def test_lookup_many_answers_in_order_across_queries_and_pending_rows(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"abc")
    st = os.stat(tmp_path / "f")
    later = time.time_ns() + 10**9
    digests = [f"xxh3-128:{i:032x}" for i in range(1200)]
    with StatCache(tmp_path / "c.sqlite", batch_size=1000, racy_window_ns=0) as cache:
        for i, d in enumerate(digests):  # 1000 committed, 200 still pending
            if i % 3:
                cache.store(f"/t/{i:04}", st, MiB, d, (d,) if i % 2 else (), hashed_at_ns=later)
        asked = [(f"/t/{i:04}", st) for i in reversed(range(1200))]
        got = cache.lookup_many(asked, MiB)
    want = [(d, (d,) if i % 2 else ()) if i % 3 else None for i, d in enumerate(digests)]
    assert got == want[::-1]


def test_a_rescan_never_returns_a_stale_digest(tmp_path: Path, hashed: list[int]) -> None:
    """Over several lookup runs (``_RESOLVE_BATCH`` files each): whatever changed is
    hashed again and the result equals a scan without any cache."""
    root = tmp_path / "tree"
    n = 2 * scan_module._RESOLVE_BATCH + 7
    for i in range(n):
        (root / f"d{i % 3}").mkdir(parents=True, exist_ok=True)
        (root / f"d{i % 3}" / f"f{i:04}").write_bytes(i.to_bytes(4, "little") * 64)
    with StatCache(tmp_path / "cache.sqlite", racy_window_ns=0) as cache:
        first = scan(root, cache)
        hashed.clear()
        same = root / "d0" / "f0003"  # new bytes, same size, mtime put back
        st = os.stat(same)
        same.write_bytes(b"\xff" * st.st_size)
        os.utime(same, ns=(st.st_atime_ns, st.st_mtime_ns))
        touched = root / "d1" / "f0301"  # bytes unchanged, mtime moved
        os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        renamed = root / "d2" / "f0500"  # a new inode renamed over it, same size and mtime
        st = os.stat(renamed)
        (root / "d2" / "tmp").write_bytes(b"\xee" * st.st_size)
        os.utime(root / "d2" / "tmp", ns=(st.st_atime_ns, st.st_mtime_ns))
        os.replace(root / "d2" / "tmp", renamed)
        time.sleep(0.01)
        again = scan(root, cache)
    assert len(hashed) == 3
    assert again == list(scan_directory(root, chunk_size=MiB, workers=2))  # no cache at all
    changed = {a.path for a, b in zip(first, again, strict=True) if a != b}
    assert changed == {"d0/f0003", "d2/f0500"}


def test_an_unchanged_tree_is_not_hashed_and_writes_nothing(
    tmp_path: Path, hashed: list[int]
) -> None:
    """Invariant 1 through the service, as ``datasync register`` runs it: every file a
    stat-cache hit, the same version id, and not one write."""
    tree = tmp_path / "tree"
    for i in range(600):  # a few lookup runs
        (tree / f"d{i % 4}").mkdir(parents=True, exist_ok=True)
        (tree / f"d{i % 4}" / f"f{i:04}").write_bytes(i.to_bytes(4, "little") * 8)
    url = f"sqlite:///{tmp_path / 'ds.db'}"
    with bootstrap(Settings(home=tmp_path / "home", database_url=url)) as app:
        app.stat_cache.racy_window_ns = 0  # the files were just written
        first = app.service.register("drive/a", str(tree), label="v1")
        assert first.created and len(hashed) == 600
        hashed.clear()
        cached = len(app.stat_cache)
        writes: list[str] = []

        @sa.event.listens_for(app.engine, "before_cursor_execute")
        def record(_c: object, _cur: object, statement: str, *_args: object) -> None:
            if not statement.lstrip().upper().startswith(("SELECT", "PRAGMA", "BEGIN DEFERRED")):
                writes.append(statement)

        again = app.service.register("drive/a", str(tree), label="v1")
        assert (again.created, again.version_id, again.labels) == (
            False,
            first.version_id,
            first.labels,
        )
        assert hashed == [] and writes == [] and len(app.stat_cache) == cached

        # One changed file (same size) is hashed again and makes a new version.
        victim = tree / "d1" / "f0005"
        victim.write_bytes(b"\0" * victim.stat().st_size)
        changed = app.service.register("drive/a", str(tree))
        assert changed.created and changed.version_id != first.version_id and len(hashed) == 1
