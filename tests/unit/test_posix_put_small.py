"""``PosixBackend.put_small``: the one-call group commit of small objects (and read-back),
and the directories it makes (``PosixFiles.ensure_dir``).

Pins, on POSIX: nothing partial is ever visible under a final name (temps only, removed
on failure), bytes are durable before the renames and names before the call returns
(``syncfs`` twice per batch, or fsync per file and directory), each item fails alone, and
the digest returned is of the bytes at the key, so a write that went wrong is seen.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import xxhash

from datasync.backends.base import SmallPut
from datasync.backends.posix import PosixBackend
from datasync.backends.posix import writer as posix_writer
from datasync.errors import Conflict, NotFound, StorageError


def digest(data: bytes) -> str:
    return f"xxh3-128:{xxhash.xxh3_128(data).hexdigest()}"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "root"
    path.mkdir()
    return path


def _visible(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize("mode", ["fsync", "syncfs"])
def test_a_batch_is_durable_before_and_after_the_renames(
    root: Path, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = PosixBackend(root, lustre=False, group_sync=mode)
    events: list[str] = []
    real_rename, real_fsync = os.rename, os.fsync

    def fsync(fd: int) -> None:
        events.append("fsync")
        real_fsync(fd)

    def rename(a: str, b: str) -> None:
        events.append("rename")
        real_rename(a, b)

    monkeypatch.setattr(posix_writer, "syncfs_fd", lambda fd: events.append("syncfs"))
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    items = [(f".datasync/blobs/{i:02x}/b{i}", b"%03d" % i) for i in range(20)]
    results = backend.put_small(items)
    assert [r.digest for r in results if isinstance(r, SmallPut)] == [digest(x) for _, x in items]
    first_rename = events.index("rename")
    last_rename = len(events) - 1 - events[::-1].index("rename")
    if mode == "syncfs":
        assert events[:first_rename] == ["syncfs"]
        assert events[last_rename + 1 :] == ["syncfs"]
    else:
        assert events[:first_rename] == ["fsync"] * 20  # every file before any rename
        assert events[last_rename + 1 :] and set(events[last_rename + 1 :]) == {"fsync"}
    for key, data in items:
        assert (root / key).read_bytes() == data
        assert (root / key).stat().st_mode & 0o777 == 0o444
    assert list(backend.partial_uploads()) == []


def test_a_failed_item_leaves_no_temp_and_the_others_commit(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = PosixBackend(root, lustre=False)
    (root / "in").mkdir()
    (root / "in/file").write_bytes(b"not a directory")  # "in/file/x" cannot be created
    (root / "g/b").mkdir(parents=True)  # a directory in the way: the rename onto g/b fails
    items = [("g/a", b"a"), ("in/file/x", b"x"), ("g/b", b"b"), ("g/c", b"c")]
    a, x, b, c = backend.put_small(items)
    assert isinstance(x, Conflict)
    assert isinstance(b, StorageError)
    assert isinstance(a, SmallPut) and isinstance(c, SmallPut)
    assert _visible(root) == ["g/a", "g/c", "in/file"]
    assert list(backend.partial_uploads()) == []


def test_a_failed_flush_raises_and_leaves_no_temp(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = PosixBackend(root, lustre=False, group_sync="syncfs")

    def broken(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(posix_writer, "syncfs_fd", broken)
    with pytest.raises(StorageError):
        backend.put_small([("g/a", b"a"), ("g/b", b"b")])
    assert _visible(root) == [], "nothing renamed, no temp left"


def test_bytes_changed_after_the_write_show_in_the_digest(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = PosixBackend(root, lustre=False)
    real = posix_writer._read_back

    def corrupt_b(files: object, key: str, path: str) -> SmallPut:
        if key == "g/b":
            os.chmod(path, 0o644)
            with open(path, "r+b") as f:
                f.write(b"X")
        return real(files, key, path)  # type: ignore[arg-type]

    monkeypatch.setattr(posix_writer, "_read_back", corrupt_b)
    a, b = backend.put_small([("g/a", b"aaaa"), ("g/b", b"bbbb")])
    assert isinstance(a, SmallPut) and a.digest == digest(b"aaaa")
    assert isinstance(b, SmallPut) and b.digest == digest(b"Xbbb")


def test_directories_are_made_from_the_deepest_missing_one(root: Path) -> None:
    files = PosixBackend(root, lustre=False).files
    (root / "a").mkdir()
    deferred: set[str] = set()
    files.ensure_dir(str(root / "a/b/c/d"), "url", deferred)
    assert (root / "a/b/c/d").is_dir()
    assert deferred == {str(root / "a"), str(root / "a/b"), str(root / "a/b/c")}
    deferred.clear()
    files.ensure_dir(str(root / "a/b/c/e"), "url", deferred)  # one mkdir
    assert deferred == {str(root / "a/b/c")}
    (root / "f").write_bytes(b"")
    with pytest.raises(Conflict, match="cannot hold other keys"):
        files.ensure_dir(str(root / "f/g/h"), "url", set())
    gone = PosixBackend(root / "missing", lustre=False).files
    with pytest.raises(NotFound, match="not mounted"):
        gone.ensure_dir(str(root / "missing/x/y"), "url", set())
    assert not (root / "missing").exists()
