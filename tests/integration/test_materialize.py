"""Views are published atomically (invariant 3), idempotently, and fall back to copies.

POSIX runs on the real file system (a tmpfs under /dev/shm gives a real EXDEV; 65,000 real
hard links give a real EMLINK). Object stores run on the in-memory backend (same
conformance suite as the real ones) and on moto's S3 server.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import xxhash

from datasync.backends.base import Backend
from datasync.backends.memory import MemoryBackend, drop_store
from datasync.backends.posix import PosixBackend
from datasync.errors import ChecksumMismatch, NotFound
from datasync.transfer.materialize import (
    COMPLETE_MARKER,
    ViewFile,
    blob_key,
    publish_view,
)

VID = "a" * 64
VID2 = "b" * 64


def digest(data: bytes) -> str:
    return "xxh3-128:" + xxhash.xxh3_128_hexdigest(data)


def put(backend: Backend, key: str, data: bytes) -> None:
    w = backend.begin(key, len(data), max(len(data), 1))
    if data:
        w.put_part(0, data)
    w.commit()


FILES = {
    "cam0/000001.jpg": b"jpeg-1" * 100,
    "cam0/000002.jpg": b"jpeg-2" * 100,
    "lidar/sweep 01.bin": os.urandom(5000),
    "ünïcode/ø.txt": b"non-ascii",
    "empty": b"",
    "copy-of-1.jpg": b"jpeg-1" * 100,  # same blob under two paths
}


def stock(backend: Backend, files: dict[str, bytes] = FILES) -> list[ViewFile]:
    views = []
    for path, data in files.items():
        put(backend, blob_key(digest(data)), data)
        views.append(ViewFile(path, digest(data), len(data), blob_key(digest(data))))
    return views


@pytest.fixture
def posix(tmp_path: Path) -> PosixBackend:
    root = tmp_path / "site"
    root.mkdir()
    return PosixBackend(root)


def tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


# -- POSIX ------------------------------------------------------------------------------------


def test_posix_view_is_hard_links_renamed_into_place(posix: PosixBackend) -> None:
    views = stock(posix)
    root = Path(posix.root)
    result = publish_view(posix, "drive/tokyo", VID, lambda: views, labels=["latest", "v1"])
    final = root / "drive/tokyo" / VID
    assert result.location == str(final) and not result.already
    assert (result.files, result.bytes, result.copied) == (
        len(FILES),
        sum(map(len, FILES.values())),
        0,
    )
    assert tree(final) == FILES
    for v in views:
        assert os.stat(final / v.path).st_ino == os.stat(root / v.key).st_ino, "a hard link"
    assert os.readlink(root / "drive/tokyo/latest") == VID
    assert os.readlink(root / "drive/tokyo/v1") == VID
    leftovers = [p.name for p in (root / "drive/tokyo").iterdir() if p.name.startswith(".")]
    assert leftovers == [], "no staging dir or temp symlink left"


def test_posix_republish_is_a_noop_and_moves_labels(posix: PosixBackend) -> None:
    views = stock(posix)
    root = Path(posix.root)
    publish_view(posix, "drive/tokyo", VID, lambda: views, labels=["latest"])
    before = os.stat(root / "drive/tokyo" / VID).st_ino
    again = publish_view(posix, "drive/tokyo", VID, lambda: iter(()), labels=["latest"])
    assert again.already and os.stat(root / "drive/tokyo" / VID).st_ino == before

    other = {"new.bin": b"second version"}
    v2 = stock(posix, other)
    publish_view(posix, "drive/tokyo", VID2, lambda: v2, labels=["latest"])
    assert os.readlink(root / "drive/tokyo/latest") == VID2, "label replaced atomically"
    assert tree(root / "drive/tokyo/latest") == other
    assert tree(root / "drive/tokyo" / VID) == FILES, "the old version is untouched"


def test_posix_leftover_staging_of_a_killed_worker_is_cleaned(posix: PosixBackend) -> None:
    views = stock(posix)
    root = Path(posix.root)
    stale = root / "drive/tokyo" / f".staging-{VID}-deadbeef"
    (stale / "cam0").mkdir(parents=True)
    (stale / "cam0/000001.jpg").write_bytes(b"half")
    other_version = root / "drive/tokyo" / f".staging-{VID2}-cafe"
    other_version.mkdir()
    publish_view(posix, "drive/tokyo", VID, lambda: views)
    assert not stale.exists()
    assert other_version.exists(), "another version's staging dir is not ours to remove"
    assert tree(root / "drive/tokyo" / VID) == FILES


def test_posix_missing_blob_publishes_nothing(posix: PosixBackend) -> None:
    views = stock(posix)
    views.append(ViewFile("ghost.bin", digest(b"ghost"), 5, blob_key(digest(b"ghost"))))
    with pytest.raises(NotFound, match=r"ghost\.bin"):
        publish_view(posix, "drive/tokyo", VID, lambda: views)
    dataset_dir = Path(posix.root) / "drive/tokyo"
    assert not (dataset_dir / VID).exists(), "no partial version is ever visible"


def test_posix_cross_device_falls_back_to_copy(tmp_path: Path) -> None:
    shm = Path("/dev/shm") / f"datasync-test-{uuid.uuid4().hex[:8]}"
    if os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("/dev/shm is on the same device as the temp dir here")
    root = tmp_path / "site"
    root.mkdir()
    shm.mkdir()
    try:
        # The blob store lives on another file system: os.link gets a real EXDEV.
        (root / ".datasync").symlink_to(shm)
        posix = PosixBackend(root)
        views = stock(posix)
        result = publish_view(posix, "drive/tokyo", VID, lambda: views)
        final = root / "drive/tokyo" / VID
        assert result.copied == len(FILES)
        assert tree(final) == FILES
        assert all(os.stat(final / v.path).st_nlink == 1 for v in views)
        assert not [p for p in final.rglob(".*tmp-*")], "copies go through temp + rename"
    finally:
        shutil.rmtree(shm, ignore_errors=True)


@pytest.mark.slow
def test_posix_link_limit_falls_back_to_copy(posix: PosixBackend, tmp_path: Path) -> None:
    data = b"very popular frame"
    views = stock(posix, {"popular.jpg": data})
    blob = Path(posix.root) / views[0].key
    junk = Path(posix.root) / "junk"
    junk.mkdir()
    n = 1
    try:
        while True:  # ext4 stops at 65,000 links: a real EMLINK
            os.link(blob, junk / str(n))
            n += 1
            if n > 70_000:
                pytest.skip("this file system has no small link limit")
    except OSError as exc:
        assert exc.errno == __import__("errno").EMLINK
    result = publish_view(posix, "drive/tokyo", VID, lambda: views)
    assert result.copied == 1
    view_file = Path(posix.root) / "drive/tokyo" / VID / "popular.jpg"
    assert view_file.read_bytes() == data and os.stat(view_file).st_nlink == 1


# -- object stores ------------------------------------------------------------------------------


@pytest.fixture
def memory() -> Iterator[MemoryBackend]:
    name = f"mat-{uuid.uuid4().hex[:8]}"
    yield MemoryBackend(name)
    drop_store(name)


def objects(backend: Backend, prefix: str) -> dict[str, bytes]:
    return {
        o.key[len(prefix) :]: backend.read_range(o.key, 0, o.size) for o in backend.list(prefix)
    }


def _object_store_publish(backend: Backend) -> None:
    views = stock(backend)
    prefix = f"drive/tokyo/{VID}/"
    result = publish_view(backend, "drive/tokyo", VID, lambda: views, labels=["latest"])
    assert not result.already and result.files == len(FILES)
    got = objects(backend, prefix)
    marker = json.loads(got.pop(COMPLETE_MARKER))
    assert got == FILES
    assert marker["version_id"] == VID and marker["files"] == len(FILES)
    assert backend.read_range("drive/tokyo/.labels/latest", 0, 100) == VID.encode()
    assert publish_view(backend, "drive/tokyo", VID, lambda: views).already


def test_object_store_view_with_marker_last_memory(memory: MemoryBackend) -> None:
    _object_store_publish(memory)


def test_object_store_view_on_s3(request: pytest.FixtureRequest) -> None:
    from tests.fixtures.emulators import make_s3_backend

    _object_store_publish(make_s3_backend(request))


def test_object_store_marker_is_written_after_every_file(memory: MemoryBackend) -> None:
    views = stock(memory)
    # A copy fails half-way: files may exist, the marker must not.
    memory.inject(lambda: NotFound("injected: copy source vanished"), times=1, ops={"copy"})
    with pytest.raises(NotFound):
        publish_view(memory, "drive/tokyo", VID, lambda: views)
    with pytest.raises(NotFound):
        memory.stat(f"drive/tokyo/{VID}/{COMPLETE_MARKER}")
    publish_view(memory, "drive/tokyo", VID, lambda: views)
    memory.stat(f"drive/tokyo/{VID}/{COMPLETE_MARKER}")


def test_object_store_leftover_wrong_copy_is_replaced(memory: MemoryBackend) -> None:
    views = stock(memory)
    # A killed publisher (or anything else) left wrong bytes at a view key.
    put(memory, f"drive/tokyo/{VID}/cam0/000001.jpg", b"X" * 600)
    publish_view(memory, "drive/tokyo", VID, lambda: views)
    assert objects(memory, f"drive/tokyo/{VID}/")["cam0/000001.jpg"] == FILES["cam0/000001.jpg"]


def test_object_store_copy_that_does_not_verify_is_deleted(memory: MemoryBackend) -> None:
    data = b"true bytes"
    put(memory, blob_key(digest(data)), b"rotten bytes")  # the blob store itself is corrupt
    views = [ViewFile("f.bin", digest(data), len(data), blob_key(digest(data)))]
    with pytest.raises(ChecksumMismatch, match=r"f\.bin"):
        publish_view(memory, "drive/tokyo", VID, lambda: views)
    assert list(memory.list(f"drive/tokyo/{VID}/")) == [], "nothing unverified is left"
